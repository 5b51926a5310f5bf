"""The statistics behind the verdicts at small n, and the non_inferior kind: each rule with a frame that makes it
fire and one where it must not. Frames are built in memory (no study, no Ray): configs over a grid x seeds,
expanded by harness.plan exactly as a study's plan is, evaluated by harness.analysis.claims."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest

from harness import plan
from harness.analysis import claims
from harness.config import FIELDS


def expand(comparison: dict, grid: dict, seeds=range(3)) -> tuple[list[dict], list[plan.Comparison]]:
    """Trial configs over `grid` x `seeds` (one LR scale) and the plan's comparisons for them."""
    configs = [{"seed": s, "lr_scale": 1.0, "steps": 100, "max_lr": 1.0, "target_acc": 0.9, **dict(zip(grid, v))}
               for v in itertools.product(*grid.values()) for s in seeds]
    return configs, plan.expand({"comparisons": [{"claim": "question", **comparison}]}, configs)


def frame(configs: list[dict], acc, steps=lambda c: np.inf) -> pd.DataFrame:
    return pd.DataFrame([{**c, "run_id": f"r{i}", "status": "completed", "scale": "quick", "outcome_acc": acc(c),
                          "steps_to_target_eff": steps(c), "train_seconds": 1.0} for i, c in enumerate(configs)])


def verdict(comparison: dict, grid: dict, acc, seeds=range(3), steps=lambda c: np.inf, curves=None):
    configs, comps = expand(comparison, grid, seeds)
    df = frame(configs, acc, steps)
    ev = claims.plan_verdicts(comps, df, curves(df) if curves else None)
    assert len(ev.verdicts) == 1, ev.not_tested
    return ev.verdicts[0]


TWO_ARM = {"kind": "two_arm", "field": "schedule", "a": "one_cycle", "b": "multistep"}
SCHEDULES = {"schedule": ["one_cycle", "multistep"]}


def better_by(delta, spread=0.001):
    """One-cycle better than multistep by `delta`, every seed (seed s adds s * spread to both)."""
    return lambda c: 0.9 + delta * (c["schedule"] == "one_cycle") + spread * c["seed"]


# ------------------------------------------------------------------------------------------------ below MIN_N
def test_below_5_units_no_interval_but_an_exact_permutation_test_and_the_per_seed_range():
    v = verdict(TWO_ARM, SCHEDULES, better_by(0.01), seeds=range(3))
    assert claims.MIN_N == 5 and v.n_a == v.n_b == 3
    assert not v.ci_shown and "95% CI" not in v.measured
    # 3 vs 3 units: 20 splits, the observed one is the most extreme of 2 (both tails): p = 2/20, the best there is
    assert v.p == pytest.approx(0.1) and v.p_min == pytest.approx(0.1)
    assert v.test == "exact permutation test on the difference of means (all 20 splits of the units)"
    assert v.seed_label == "per-seed differences (paired by seed)"
    assert v.seed_low == pytest.approx(0.01) and v.seed_high == pytest.approx(0.01)
    assert v.verdict == "inconclusive" and "cannot give p below 0.1" in v.reason
    assert "per-seed differences (paired by seed) from +1.00 pp to +1.00 pp" in v.evidence
    assert "exact permutation test on the difference of means (all 20 splits of the units) p = 0.1" in v.evidence
    assert v.interval_and_test.startswith("no interval: fewer than 5 units in an arm (n = 3 vs 3)")
    # the same effect with 5 units per arm: the bootstrap interval and Welch's test, no per-seed range
    v5 = verdict(TWO_ARM, SCHEDULES, better_by(0.01), seeds=range(5))
    assert v5.ci_shown and v5.test == "Welch t" and v5.seed_label == "" and math.isnan(v5.p_min)
    assert v5.verdict == "supported" and "95% CI" in v5.measured


def test_4_vs_4_separated_arms_are_supported_by_the_exact_test_and_a_crossing_seed_is_not():
    v = verdict(TWO_ARM, SCHEDULES, better_by(0.01), seeds=range(4))
    assert v.p == pytest.approx(2 / 70) and v.verdict == "supported"
    assert "range of the per-seed differences (paired by seed) excludes 0" in v.reason
    # seed 3's multistep run beats its one-cycle run: the range includes 0, not supported
    cross = verdict(TWO_ARM, SCHEDULES, lambda c: better_by(0.01)(c) - 0.03 * (c["seed"] == 3) *
                    (c["schedule"] == "one_cycle"), seeds=range(4))
    assert cross.seed_low < 0 < cross.seed_high and cross.verdict == "inconclusive" and "includes 0" in cross.reason


def test_the_permutation_test_is_exact():
    """Its p is the share of all splits of the pooled units whose |difference of means| is at least the observed."""
    a, b = np.array([0.91, 0.93, 0.90, 0.94]), np.array([0.89, 0.92, 0.88])
    pooled, obs = np.concatenate([a, b]), a.mean() - b.mean()
    null = [pooled[list(i)].mean() - np.delete(pooled, list(i)).mean() for i in itertools.combinations(range(7), 4)]
    brute = 2 * min(np.mean(np.array(null) >= obs - 1e-12), np.mean(np.array(null) <= obs + 1e-12))
    got = claims.permutation_test(a, b, "final_acc")
    assert len(null) == 35 and got.p == pytest.approx(min(1.0, brute)) and got.label.startswith("exact")
    # steps-to-target: ranks, so a miss (+inf) counts as the slowest, not as a NaN mean
    steps = claims.permutation_test([900, 1000, 1100, 1200], [np.inf] * 4, "steps_to_target")
    assert "difference of mean ranks" in steps.label and steps.p == pytest.approx(2 / 70)
    # past EXACT_MAX splits it says it is randomized (and is seeded)
    big = claims.permutation_test(np.arange(12.0), np.arange(12.0) + 3, "final_acc", seed=1)
    assert big.label.startswith("randomized") and big.p == claims.permutation_test(
        np.arange(12.0), np.arange(12.0) + 3, "final_acc", seed=1).p


def test_per_seed_differences_are_paired_only_when_the_arms_share_seeds():
    paired = verdict(TWO_ARM, SCHEDULES, better_by(0.01, spread=0.01), seeds=range(3))
    assert paired.seed_label == "per-seed differences (paired by seed)"
    assert paired.seed_low == pytest.approx(0.01) and paired.seed_high == pytest.approx(0.01)
    # the same values, but multistep ran seeds 10-12: every pair of units, from min(a) - max(b) to max(a) - min(b)
    configs, comps = expand(TWO_ARM, SCHEDULES, seeds=range(3))
    for c in configs:
        if c["schedule"] == "multistep":
            c["seed"] += 10
    df = frame(configs, lambda c: 0.9 + 0.01 * (c["schedule"] == "one_cycle") + 0.01 * (c["seed"] % 10))
    v = claims.plan_verdicts(comps, df).verdicts[0]
    assert v.seed_label.startswith("differences of every pair of units")
    assert v.seed_low == pytest.approx(0.91 - 0.92) and v.seed_high == pytest.approx(0.93 - 0.90)


def test_one_unit_in_an_arm_gets_nothing_but_the_per_seed_values():
    v = verdict(TWO_ARM, SCHEDULES, better_by(0.01), seeds=[0])
    assert math.isnan(v.p) and v.test == "" and v.seed_label == "" and not v.ci_shown
    assert v.verdict == "inconclusive" and v.reason.startswith("fewer than 2 units in an arm")
    assert v.interval_and_test.startswith("none: fewer than 2 units")
    assert "s0 91.00%" in v.per_seed


# ------------------------------------------------------------------------------------------------ no spread
def test_no_welch_test_on_an_arm_with_no_spread():
    assert math.isnan(claims.welch_p([0.9] * 6, [0.91, 0.92, 0.93, 0.94, 0.95, 0.96]))
    assert math.isnan(claims.welch_p([0.9] * 6, [0.8] * 6))
    assert claims.welch_p([0.90, 0.91, 0.92], [0.93, 0.94, 0.96]) < 0.05
    # every multistep run diverged to 10%: Welch would call the difference near-certain on 6 runs
    v = verdict(TWO_ARM, SCHEDULES, lambda c: 0.1 if c["schedule"] == "multistep" else 0.9 + 0.01 * c["seed"],
                seeds=range(6))
    assert v.ci_shown and v.no_test == "no Welch t test: an arm has no spread"
    assert v.test.startswith("exact permutation test") and v.p == pytest.approx(2 / 924)
    assert "no Welch t test: an arm has no spread" in v.evidence and "Welch t p" not in v.evidence
    # both arms spread: Welch as before
    w = verdict(TWO_ARM, SCHEDULES, better_by(0.01, spread=0.001), seeds=range(6))
    assert w.test == "Welch t" and w.no_test == "" and w.p < 1e-3


def test_no_mann_whitney_test_on_an_arm_with_no_spread():
    comp = {**TWO_ARM, "metric": "steps_to_target"}
    missed = verdict(comp, SCHEDULES, lambda c: 0.9, seeds=range(5),
                     steps=lambda c: np.inf if c["schedule"] == "multistep" else 1000 + 10 * c["seed"])
    assert missed.no_test == "no Mann-Whitney U test: an arm has no spread"
    assert "difference of mean ranks" in missed.test and missed.verdict == "supported"   # fewer steps, B missed
    spread = verdict(comp, SCHEDULES, lambda c: 0.9, seeds=range(5),
                     steps=lambda c: (1000 if c["schedule"] == "one_cycle" else 3000) + 10 * c["seed"])
    assert spread.test == "Mann-Whitney U" and spread.no_test == ""


# ------------------------------------------------------------------------------------------------ rank correlation
def test_no_rank_correlation_on_fewer_than_3_levels():
    assert math.isnan(claims.spearman([1, 1, 1, 2, 2, 2], [1, 2, 3, 4, 5, 6])[0])
    assert claims.spearman([1, 1, 2, 2, 3, 3], [1, 2, 3, 4, 5, 6])[0] > 0.9
    trend = {"kind": "trend", "field": "batch_size"}
    two = verdict(trend, {"batch_size": [128, 1000]}, lambda c: 0.9 + 1e-5 * c["batch_size"] + 0.001 * c["seed"],
                  seeds=range(5))
    assert math.isnan(two.rho) and "Spearman rho =" not in two.evidence
    assert "no Spearman rho: fewer than 3 levels of batch_size" in two.evidence
    three = verdict(trend, {"batch_size": [128, 256, 1000]},
                    lambda c: 0.9 + 1e-5 * c["batch_size"] + 0.001 * c["seed"], seeds=range(5))
    assert three.rho > 0 and "Spearman rho = +" in three.evidence and "no Spearman rho" not in three.evidence


# ------------------------------------------------------------------------------------------------ other kinds
INTERACTION = {"kind": "interaction", "field": "schedule", "a": "one_cycle", "b": "multistep", "by": "batch_size",
               "by_a": 1000, "by_b": 128}


def test_interaction_below_5_units_gets_per_seed_contrasts_and_a_sign_flip_test():
    def acc(c):
        return 0.9 + 0.01 * (c["schedule"] == "one_cycle") * (c["batch_size"] == 1000) + 0.001 * c["seed"]
    grid = {**SCHEDULES, "batch_size": [128, 1000]}
    v = verdict(INTERACTION, grid, acc, seeds=range(4))
    assert not v.ci_shown and v.seed_label == "per-seed contrasts (paired by seed)"
    assert v.seed_low == pytest.approx(0.01) and v.seed_high == pytest.approx(0.01)
    assert v.test == "exact sign-flip test on the mean per-seed contrast (all 16 sign patterns)"
    assert v.p == pytest.approx(0.125) and v.verdict == "inconclusive" and "cannot give p below 0.12" in v.reason
    v5 = verdict(INTERACTION, grid, acc, seeds=range(5))
    assert v5.ci_shown and v5.test.startswith("bootstrap") and v5.seed_label == ""


def test_best_shift_below_5_units_gets_per_seed_shifts():
    comp = {"kind": "best_shift", "field": "weight_decay", "by": "schedule", "by_a": "one_cycle", "by_b": "constant"}
    grid = {"weight_decay": [1e-3, 1e-4, 1e-5], "schedule": ["one_cycle", "constant"]}
    best = {"one_cycle": 1e-4, "constant": 1e-3}
    def acc(c):
        return 0.9 + 0.02 * (c["weight_decay"] == best[c["schedule"]]) + 0.001 * c["seed"]
    v = verdict(comp, grid, acc, seeds=range(4))
    assert not v.ci_shown and v.seed_label.startswith("per-seed shifts of the best level")
    assert v.seed_low == v.seed_high == -1 and v.p == pytest.approx(0.125) and v.verdict == "inconclusive"
    assert "from -1 grid positions to -1 grid positions" in v.interval_and_test
    assert verdict(comp, grid, acc, seeds=range(5)).verdict == "supported"


def range_curves(drop):
    """A 30-evaluation ramp to LR 3: accuracy 0.8 below LR 2, then 0.75 - `drop(run index)` on LR 2-3, so under
    the SC3 rule each run drops 0.05 + drop(i) from its reference (0.8 at LR 0.3-1.2): 0.10 - drop(i) within the
    threshold of 0.15."""
    def curves(df):
        return pd.DataFrame([{"run_id": r, "step": k, "lr": k / 10,
                              "test_acc": 0.8 if k < 20 else 0.75 - drop(i)}
                             for i, r in enumerate(df["run_id"]) for k in range(1, 31)])
    return curves


def test_range_test_below_5_runs_and_with_no_spread():
    comp = {"kind": "range_test", "field": "schedule", "where": {"schedule": "range_test"}}
    grid = {"schedule": ["range_test"]}
    small = verdict(comp, grid, lambda c: 0.8, seeds=range(3), curves=range_curves(lambda i: 0.01 * i))
    assert not small.ci_shown and small.seed_label == "per-run drops minus the threshold"
    assert small.seed_low == pytest.approx(-0.1) and small.seed_high == pytest.approx(-0.08)
    assert small.p == pytest.approx(0.25) and small.verdict == "inconclusive"
    # six runs with the same drop: no one-sample t test (no spread), the sign-flip test instead: 2/64
    flat = verdict(comp, grid, lambda c: 0.8, seeds=range(6), curves=range_curves(lambda i: 0.0))
    assert flat.ci_shown and flat.no_test == "no one-sample t test: the runs have no spread"
    assert flat.p == pytest.approx(2 / 64) and flat.verdict == "supported"
    spread = verdict(comp, grid, lambda c: 0.8, seeds=range(6), curves=range_curves(lambda i: 0.002 * i))
    assert spread.test == "one-sample t" and spread.no_test == "" and spread.verdict == "supported"


# ------------------------------------------------------------------------------------------------ planned n
N_OF_LINE = re.compile(r", n=(\d+)(?:-\d+)?(?: vs (\d+)(?:-\d+)?)? per arm,")


@pytest.mark.parametrize("comparison, grid, curves", [
    (TWO_ARM, SCHEDULES, None),
    ({"kind": "trend", "field": "batch_size"}, {"batch_size": [128, 256, 1000]}, None),
    ({"kind": "best_level", "field": "momentum", "a": [0.85, 0.9]}, {"momentum": [0.8, 0.85, 0.9, 0.95]}, None),
    ({"kind": "best_level", "field": "momentum", "a": 0.9}, {"momentum": [0.8, 0.85, 0.9, 0.95]}, None),
    (INTERACTION, {**SCHEDULES, "batch_size": [128, 1000]}, None),
    ({"kind": "best_shift", "field": "weight_decay", "by": "schedule", "by_a": "one_cycle", "by_b": "constant"},
     {"weight_decay": [1e-3, 1e-4], "schedule": ["one_cycle", "constant"]}, None),
    ({"kind": "range_test", "field": "schedule"}, {"schedule": ["range_test"]}, range_curves(lambda i: 0.0)),
    ({**TWO_ARM, "kind": "non_inferior", "margin": 0.005}, SCHEDULES, None),
    ({**TWO_ARM, "b": ["multistep", "constant"]}, {"schedule": ["one_cycle", "multistep", "constant"]}, None),
], ids=["two_arm", "trend", "best_level-two-levels", "best_level-one-level", "interaction", "best_shift",
        "range_test", "non_inferior", "two_arm-pooled-arm"])
def test_the_n_the_dry_run_prints_is_the_n_the_verdict_uses(comparison, grid, curves):
    configs, comps = expand(comparison, grid, seeds=range(3))
    df = frame(configs, lambda c: 0.9 + 0.001 * c["seed"])
    ev = claims.plan_verdicts(comps, df, curves(df) if curves else None)
    (c,), (v,) = comps, ev.verdicts
    m = N_OF_LINE.search(c.line())
    assert m, c.line()
    printed = (int(m.group(1)), int(m.group(2) or m.group(1)))
    assert printed == (v.n_a, v.n_b) == (c.n_a, c.n_b), (c.line(), v.n_a, v.n_b)
    assert f"(planned {v.n_a} vs {v.n_b})" in v.evidence


def test_best_level_n_is_one_levels_units_and_a_range_when_levels_differ():
    configs, comps = expand({"kind": "best_level", "field": "momentum", "a": [0.85, 0.9]},
                            {"momentum": [0.8, 0.85, 0.9, 0.95]}, seeds=range(3))
    assert "n=3 per arm" in comps[0].line()          # not 6: each arm's best level is compared, 3 seeds each
    configs = [c for c in configs if not (c["momentum"] == 0.95 and c["seed"] == 2)]
    comps = plan.expand({"comparisons": [{"claim": "question", "kind": "best_level", "field": "momentum",
                                          "a": [0.85, 0.9]}]}, configs)
    assert "n=3 vs 2-3 per arm" in comps[0].line()


# ------------------------------------------------------------------------------------------------ non_inferior
NON_INFERIOR = {**TWO_ARM, "kind": "non_inferior", "margin": 0.005}


def test_non_inferior_plan_line_and_its_validation():
    _, (c,) = expand(NON_INFERIOR, SCHEDULES)
    assert c.line().startswith("question: schedule=one_cycle not worse than schedule=multistep by more than "
                               "0.005 (0.5 pp), n=3 per arm, final test accuracy")
    assert "not worse than one-cycle" not in c.words and "by more than 0.005 (0.5 pp)" in c.words
    fields = tuple(FIELDS)
    ok = {"comparisons": [NON_INFERIOR | {"claim": "question"}]}
    plan.validate(ok, "s", fields, ())
    for bad, message in [
        ({k: v for k, v in NON_INFERIOR.items() if k != "margin"}, "kind non_inferior needs margin"),
        ({**NON_INFERIOR, "margin": -0.01}, "kind non_inferior needs margin, a positive number"),
        ({**NON_INFERIOR, "margin": "half a point"}, "margin"),
        ({k: v for k, v in NON_INFERIOR.items() if k != "b"}, "kind non_inferior needs arms a and b"),
        ({**TWO_ARM, "margin": 0.005}, "margin is only for kind non_inferior, not two_arm"),
        ({**TWO_ARM, "kind": "trend", "b_where": {"momentum": 0.9}},
         "a_where and b_where are only for kinds two_arm and non_inferior, not trend"),
        ({**TWO_ARM, "a_where": {"momentm": 0.9}}, "'momentm' is not a trial field (did you mean 'momentum'?)"),
        ({**TWO_ARM, "equal_time": "yes"}, "equal_time"),
    ]:
        with pytest.raises(plan.PlanError, match=re.escape(message)) as e:
            plan.validate({"comparisons": [{"claim": "question", **bad}]}, "s", fields, ())
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("seeds, delta, spread, expected", [
    (range(6), -0.001, 0.001, "supported"),        # A 0.1 pp worse, CI well within 0.5 pp
    (range(6), -0.02, 0.001, "contradicted"),      # A 2 pp worse, the whole CI beyond the margin
    (range(6), -0.005, 0.004, "inconclusive"),     # A 0.5 pp worse: the CI straddles -margin
    (range(6), +0.01, 0.001, "supported"),         # A better: not worse
    (range(3), -0.001, 0.001, "supported"),        # 3 seeds: the worst per-seed difference, labelled
    (range(3), -0.02, 0.001, "contradicted"),
])
def test_non_inferior_verdicts(seeds, delta, spread, expected):
    rng = np.random.default_rng(0)
    noise = {(s, k): rng.normal(0, spread) for s in seeds for k in SCHEDULES["schedule"]}
    v = verdict(NON_INFERIOR, SCHEDULES, lambda c: better_by(delta, 0.0)(c) + noise[c["seed"], c["schedule"]],
                seeds=seeds)
    assert v.verdict == expected, (v.reason, v.measured)
    assert v.margin == 0.005 and "non-inferiority margin 0.50 pp" in v.evidence
    if len(seeds) < claims.MIN_N:
        assert not v.ci_shown and v.seed_label == "per-seed differences (paired by seed)"
        assert "worst per-seed difference (paired by seed)" in v.reason or expected == "contradicted"
    else:
        assert v.ci_shown and "95% CI" in v.reason or expected == "contradicted"


def test_non_inferior_below_5_units_one_bad_seed_is_enough_to_withhold_support():
    """Median difference well within the margin, but one seed is 1 pp worse: the worst seed decides."""
    v = verdict(NON_INFERIOR, SCHEDULES, lambda c: 0.9 - 0.01 * (c["seed"] == 2) * (c["schedule"] == "one_cycle"),
                seeds=range(3))
    assert v.diff == 0 and v.seed_low == pytest.approx(-0.01) and v.verdict == "inconclusive"
    assert v.reason.startswith("the worst per-seed difference (paired by seed), -1.00 pp, is beyond the margin")


def test_non_inferior_on_steps_reads_the_margin_in_steps_and_fewer_is_better():
    comp = {**NON_INFERIOR, "metric": "steps_to_target", "margin": 500}
    def steps(extra):
        return lambda c: 1000 + 10 * c["seed"] + extra * (c["schedule"] == "one_cycle")
    _, (c,) = expand(comp, SCHEDULES)
    assert "by more than 500 steps" in c.line()
    assert verdict(comp, SCHEDULES, lambda c: 0.9, seeds=range(3), steps=steps(100)).verdict == "supported"
    assert verdict(comp, SCHEDULES, lambda c: 0.9, seeds=range(3), steps=steps(-300)).verdict == "supported"
    assert verdict(comp, SCHEDULES, lambda c: 0.9, seeds=range(3), steps=steps(2000)).verdict == "contradicted"
    missed = verdict(comp, SCHEDULES, lambda c: 0.9, seeds=range(6),
                     steps=lambda c: np.inf if c["schedule"] == "one_cycle" else 1000 + 10 * c["seed"])
    assert missed.verdict == "contradicted"                       # A never reaches the target
