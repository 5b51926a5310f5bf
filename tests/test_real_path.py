"""Tests through the real path: every shipped study at every scale it has gets a verdict for every planned
comparison, and the verdict it should, from runs read back out of a real MLflow store.

For each (study, scale): the trials `harness.spec.trials` expands are written by the harness's own writers
(tracking.start_study_run, TrialLogger) to a sqlite store - super_convergence at quick scale also to an `mlflow
server` over HTTP - with outcomes chosen from the plan (tests/real_path_store.py) so that every comparison comes
out as claimed, and, in a second invocation, every comparison the opposite way. `load_study` reads the runs back
and `claims.verdicts` evaluates the plan the parent run logged. Asserted: nothing is left untested (no "no usable
trial", no claim without a comparison); one verdict per planned comparison, on the planned line and the planned
number of units; the observed direction is the claim's (flipped: the opposite); and the verdict is the one the
decision rule gives such clear-cut runs: supported (flipped: contradicted) when the units allow it, inconclusive
when they cannot (fewer than 2 units, or an exact test that cannot reach p < 0.05), and at smoke scale only
"pipeline check (smoke scale): would be ...". The flipped invocation proves the assertions can fail.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import real_path_store as store
from servers import MlflowServer

from harness import plan
from harness import spec as specs
from harness.analysis import claims
from harness.analysis.results import load_study
from harness.report import summary

pytestmark = pytest.mark.slow  # Ray, an MLflow server or spawned processes: the full suite, not the fast tier


def shipped() -> list:
    """(study, scale) for every study file and scale it has; a study file that does not load is one failing case."""
    out = []
    for name, _ in specs.list_studies():
        try:
            spec = specs.load_spec(name)
        except specs.SpecError as e:
            out.append(pytest.param(name, f"unloadable: {e}", id=f"{name}-unloadable"))
            continue
        out += [pytest.param(name, s, id=f"{name}-{s}") for s in specs.SCALES
                if s == "smoke" or s in (spec.get("scales") or {})]
    return out


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> Iterator[str]:
    """One sqlite store for the module, in memory where possible (every write commits: no disk syncs)."""
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="real-path-", dir=shm)) if os.access(shm, os.W_OK) else \
        tmp_path_factory.mktemp("real-path")
    yield f"sqlite:///{folder}/mlflow.db"
    shutil.rmtree(folder, ignore_errors=True)


_DONE: dict = {}


def evaluated(uri: str, study: str, scale: str, way: str) -> tuple[store.Written, claims.Evaluation]:
    """Write one invocation `way` to the store, read it back with load_study, evaluate its logged plan (once)."""
    if scale.startswith("unloadable"):
        pytest.fail(f"{study}: {scale}")
    if (uri, study, scale, way) not in _DONE:
        written = store.write(uri, study, scale, way)
        res = load_study(study, uri, run=written.parent, curves=written.needs_curves)
        _DONE[uri, study, scale, way] = written, claims.verdicts(res)
    return _DONE[uri, study, scale, way]


# ------------------------------------------------------------------------------------------------ expectations
def decisive(c: plan.Comparison) -> bool:
    """Can the decision rule reach supported/contradicted on runs where every unit of one side beats every unit of
    the other? Not below 2 units; below MIN_N only when the exact test can give p < ALPHA (two groups: 2 of the
    C(n_a + n_b, n_a) splits are as extreme; paired contrasts and range tests: 2 of the 2^n sign patterns)."""
    n = min(c.n_a, c.n_b)
    if n < 2:
        return False
    if c.kind == "non_inferior" or n >= claims.MIN_N:
        return True
    if c.kind in ("two_arm", "trend", "best_level"):
        return 2 / math.comb(c.n_a + c.n_b, c.n_a) < claims.ALPHA
    return 2 / 2 ** n < claims.ALPHA


def expected(c: plan.Comparison, way: str) -> tuple[str, str]:
    """(verdict word the statistics give, observed direction) for runs made to come out `way`; a control's
    claimed runs have equal arms, its flipped runs arm a better in every unit."""
    if c.expect == "no_difference":
        if way == "claimed":
            return "inconclusive", "no difference"
        word = "supported" if decisive(c) else "inconclusive"
        return word, f"{c.a.words} better" if c.kind == "two_arm" else "same as the claim"
    word = ("supported" if way == "claimed" else "contradicted") if decisive(c) else "inconclusive"
    if c.kind == "non_inferior":
        return word, "within the margin" if way == "claimed" else "worse than the margin"
    return word, "same as the claim" if way == "claimed" else "opposite to the claim"


def problems(written: store.Written, ev: claims.Evaluation) -> list[str]:
    """What the evaluation got wrong, one line each (empty: every comparison came out as designed)."""
    out = [f"not tested: {cid}: {why}" for cid, why in ev.not_tested]
    lines = [c.line() for c in written.comparisons]
    got = [v.planned for v in ev.verdicts]
    if got != lines and not out:
        out.append(f"verdicts {got} are not one per planned comparison {lines}")
    for c, v in zip(written.comparisons, ev.verdicts, strict=False):
        word, observed = expected(c, written.way)
        at = f"{c.line()} -> {v.verdict_text} ({v.observed}; {v.reason})"
        if v.observed != observed:
            out.append(f"{at}: observed should be '{observed}'")
        if v.would_be != word:
            out.append(f"{at}: should be {word}")
        held = "" if not c.expect else "not tested" if min(c.n_a, c.n_b) < 2 else \
            "held" if written.way == "claimed" else "failed"
        if v.expectation != held:
            out.append(f"{at}: the control's expectation should be '{held}', got '{v.expectation}'")
        control = f"; control, no difference expected: expectation {v.expectation}" if v.expectation else ""
        if written.scale == "smoke" and (v.verdict, v.verdict_text) != (
                "pipeline check", f"pipeline check (smoke scale): would be {v.would_be}{control}"):
            out.append(f"{at}: a smoke-scale verdict is a pipeline check only")
        if written.scale != "smoke" and v.verdict != v.would_be:
            out.append(f"{at}: the verdict is not the statistics' ({v.would_be})")
        units = (c.n_a, max(c.n_a, c.n_a_max)), (c.n_b, max(c.n_b, c.n_b_max))
        if not all(lo <= n <= hi for n, (lo, hi) in zip((v.n_a, v.n_b), units, strict=True)):
            out.append(f"{at}: n = {v.n_a} vs {v.n_b}, planned {c.n_a} vs {c.n_b}")
    return out


def assert_as_designed(written: store.Written, ev: claims.Evaluation) -> None:
    found = problems(written, ev)
    assert not found, f"{written.study} {written.scale} ({written.way}):\n  " + "\n  ".join(found)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("way", store.WAYS)
@pytest.mark.parametrize("study, scale", shipped())
def test_every_planned_comparison_gets_the_designed_verdict(uri, study, scale, way):
    assert_as_designed(*evaluated(uri, study, scale, way))


def test_the_check_fails_on_runs_that_came_out_the_other_way(uri):
    """Failing-capable: the runs made to come out opposite to the claims, checked as if made the claimed way,
    give a problem for every comparison (and the claimed runs checked as flipped, too)."""
    for way, other in (("flipped", "claimed"), ("claimed", "flipped")):
        written, ev = evaluated(uri, "super_convergence", "quick", way)
        relabelled = store.Written(written.study, written.scale, other, written.parent, written.comparisons)
        found = problems(relabelled, ev)
        assert written.comparisons and all(any(c.line() in p for p in found) for c in written.comparisons), found


def test_a_plan_whose_comparisons_contradict_each_other_is_named():
    """The store's design is itself failing-capable: a plan that asks for a > b and b > a at once is a Conflict
    naming both comparisons, not outcomes that quietly satisfy one of them."""
    spec = copy.deepcopy(specs.load_spec("super_convergence"))
    first = next(c for c in spec["analysis"]["comparisons"] if c["kind"] == "two_arm")
    spec["analysis"]["comparisons"] = [first, {**first, "a": first["b"], "b": first["a"]}]
    configs = [t.config.to_dict() for t in specs.trials(spec, "quick")]
    comparisons = plan.expand(spec["analysis"], configs)
    with pytest.raises(store.Conflict) as e:
        store.design(comparisons, configs, "claimed")
    assert all(c.line() in str(e.value) for c in comparisons), str(e.value)


def with_seeds(spec: dict, scale: str, n: int) -> dict:
    """The study file with `n` seeds at `scale` (the other scales as they are)."""
    out = copy.deepcopy(spec)
    over = out.setdefault("scales", {}).setdefault(scale, {}) or {}
    out["scales"][scale] = {**over, "grid": {**(over.get("grid") or {}), "seed": list(range(n))}}
    return out


def powered() -> list[str]:
    """Few studies whose quick plans hold, between them, every (kind, metric) the shipped quick plans use (greedy:
    the study with the most not yet covered first)."""
    plans = {}
    for name, _ in specs.list_studies():
        try:
            spec = specs.load_spec(name)
            plans[name] = {(c.kind, c.metric) for c in claims.planned_comparisons(spec, "quick")}
        except (specs.SpecError, plan.PlanError):
            continue          # a study file that does not load fails in the test above
    covered, out = set(), []
    while plans and (best := max(plans, key=lambda n: len(plans[n] - covered))) and plans[best] - covered:
        out.append(best)
        covered |= plans.pop(best)
    return out


@pytest.mark.parametrize("study", powered())
def test_with_enough_seeds_the_same_plans_reach_supported_and_contradicted(uri, study):
    """The shipped studies have at most 3 seeds, so most verdicts stay inconclusive; with MIN_N seeds the same
    plans on the same kind of runs must say supported (claimed) and contradicted (flipped)."""
    spec = with_seeds(specs.load_spec(study), "quick", claims.MIN_N)
    for way in store.WAYS:
        written = store.write(uri, study, "quick", way, spec=spec)
        assert all(min(c.n_a, c.n_b) >= claims.MIN_N for c in written.comparisons), \
            [c.line() for c in written.comparisons]
        res = load_study(study, uri, run=written.parent, curves=written.needs_curves)
        ev = claims.verdicts(res)
        assert_as_designed(written, ev)
        assert [v.verdict for v in ev.verdicts] == [expected(c, way)[0] for c in written.comparisons]
        assert [t for t, _ in summary.summary_groups([v for v in ev.verdicts if not v.expectation])] == \
            [summary.GROUPS[0]]
        assert {v.verdict for v in ev.verdicts if not v.expectation} == \
            {"supported" if way == "claimed" else "contradicted"}


def test_over_http_through_a_real_mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    try:
        for way in store.WAYS:
            written = store.write(server.uri, "super_convergence", "quick", way)
            res = load_study("super_convergence", server.uri, run=written.parent, curves=True)
            assert len(res.curves), "history.csv came back through the server's artifact proxy"
            assert_as_designed(written, claims.verdicts(res))
    finally:
        server.stop()


def _null_comparisons(written: store.Written) -> list[plan.Comparison]:
    """Comparisons whose where, stratum or arms name the value null (None)."""
    def says_null(match: dict) -> bool:
        return any(v is None for vals in match.values() for v in vals)
    return [c for c in written.comparisons
            if says_null({**c.where_match(), **c.stratum_match(), **c.a.match, **c.b.match})]


@pytest.mark.parametrize("study, expect", [("super_convergence", "SC1"), ("activation_mystery", "question")])
def test_a_plan_that_says_null_finds_its_trials_at_every_scale(uri, study, expect):
    """super_convergence's SC1 (where stepsize [null, ...]: the multistep arm has no stepsize) and
    activation_mystery's comparison at lr 0.001 (where lr_from_finder null) get a verdict on all their units."""
    spec = specs.load_spec(study)
    for scale in [s for s in specs.SCALES if s == "smoke" or s in spec["scales"]]:
        written, ev = evaluated(uri, study, scale, "claimed")
        nulls = _null_comparisons(written)
        assert [c.claim for c in nulls].count(expect) >= 1, (scale, [c.line() for c in written.comparisons])
        by_line = {v.planned: v for v in ev.verdicts}
        for c in nulls:
            v = by_line.get(c.line())
            assert v is not None, (scale, c.line(), ev.not_tested)
            assert (v.n_a, v.n_b) == (c.n_a, c.n_b) and min(v.n_a, v.n_b) >= 1, (scale, c.line(), v.evidence)


@pytest.mark.parametrize("study", ["activation_mystery", "negative_mnist"])
def test_what_the_runs_say_places_every_verdict_once_by_its_own_range(uri, study):
    """The report's 'What the runs say' (harness/report/summary.py) on verdicts from the store: each verdict in
    exactly one group, by the rule's decision, else by whether its interval or every per-seed difference lies on
    one side of 0; the runs written the claimed way at 3 seeds fill the one-way group."""
    decided, one_way, split = summary.GROUPS
    written, ev = evaluated(uri, study, "quick", "claimed")
    groups = dict(summary.summary_groups(ev.verdicts))
    placed = [v for vs in groups.values() for v in vs]
    assert len(placed) == len(ev.verdicts) and {id(v) for v in placed} == {id(v) for v in ev.verdicts}
    assert groups.get(one_way), [(v.planned, v.seed_low, v.seed_high) for v in ev.verdicts]
    for title, vs in groups.items():
        for v in vs:
            lo, hi = (v.ci_low, v.ci_high) if v.ci_shown else (v.seed_low, v.seed_high)
            if not math.isnan(v.margin):
                lo, hi = sorted((lo * v.direction + v.margin, hi * v.direction + v.margin))
            if title == decided:
                assert v.would_be in summary.DECIDED
            else:
                assert v.would_be not in summary.DECIDED
                assert (lo > 0 or hi < 0) == (title == one_way), (v.planned, lo, hi)
            line = summary.summary_line(v)
            assert line.startswith(v.comparison_words or v.comparison) and "per seed " not in line
            assert ("control, no difference expected" in line) == bool(v.expectation)


def test_claim_sections_have_headings_that_tell_them_apart(uri):
    """negative_mnist asks one question in 22 comparisons: each report section's heading names its comparisons in
    words and no two headings are the same."""
    from harness.report import build

    _, ev = evaluated(uri, "negative_mnist", "quick", "claimed")
    sections = build.section_titles(build.verdict_groups(ev))
    titles = [t for _, t in sections]
    assert len(sections) > 1 and len(set(titles)) == len(titles), titles
    for vs, title in sections:
        assert all((v.comparison_words or v.comparison) in title for v in vs), title


def test_a_non_inferiority_verdict_is_placed_by_its_margin(uri):
    """SC1's 'reaches' (not worse by more than 0.5 pp): a range from -7 to -0.4 pp straddles the margin; one wholly
    beyond it points one way (worse), one wholly within it the other."""
    import dataclasses

    _, ev = evaluated(uri, "negative_mnist", "quick", "claimed")
    base = dataclasses.replace(ev.verdicts[0], margin=0.005, direction=1, ci_low=math.nan, ci_high=math.nan)
    for low, high, way in ((-0.07, -0.004, 0), (-0.07, -0.006, -1), (-0.004, 0.01, 1)):
        assert summary.one_way(dataclasses.replace(base, seed_low=low, seed_high=high)) == way, (low, high)
