"""Verdicts of the analysis plans: the shipped studies' own trials (expanded by harness.spec exactly as a run
would), given synthetic outcomes, evaluated by harness.analysis.claims; plus the decision rule and its calibration."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from harness import plan
from harness import spec as specs
from harness.analysis import claims

try:
    from tests.paper_material import claims_md
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from paper_material import claims_md


def frame(trials, scale: str, outcome, seconds=None) -> pd.DataFrame:
    """One row per trial as harness.analysis.results makes it: the typed config plus the outcome columns.
    outcome(config) -> (test accuracy, validation accuracy); seconds(config) -> training seconds."""
    rows = []
    for t in trials:
        acc, val = outcome(t.config.to_dict())
        rows.append({**t.config.to_dict(), "run_id": t.key, "cell": t.cell, "status": "completed", "scale": scale,
                     "outcome_acc": acc, "final_acc": acc, "final_val_acc": val,
                     "steps_to_target_eff": t.config.steps if acc >= t.config.target_acc else np.inf,
                     "train_seconds": seconds(t.config.to_dict()) if seconds else float(t.config.steps)})
    return pd.DataFrame(rows)


def curves_for(df: pd.DataFrame, points: int = 10) -> pd.DataFrame:
    """Evaluation curves rising linearly to each trial's final accuracy over its training seconds."""
    rows = []
    for _, r in df.iterrows():
        for k in range(1, points + 1):
            rows.append({"run_id": r["run_id"], "step": k * r["steps"] // points, "lr": r["max_lr"],
                         "train_seconds": r["train_seconds"] * k / points, "test_acc": r["outcome_acc"] * k / points})
    return pd.DataFrame(rows)


def study(name: str, scale: str):
    s = specs.load_spec(name)
    trials = specs.trials(s, scale)
    return s, trials, claims.planned_comparisons(s, scale)


def one(ev: claims.Evaluation, claim_id: str) -> claims.Verdict:
    found = [v for v in ev.verdicts if v.claim_id == claim_id]
    assert len(found) == 1, (claim_id, [v.comparison for v in ev.verdicts], ev.not_tested)
    return found[0]


# ------------------------------------------------------------------------------------------------ the plan
def test_batch_size_effect_paper_plan_compares_1024_with_128_at_the_da_authors_epoch_budgets():
    _, trials, comps = study("batch_size_effect", "paper")
    assert len(trials) == 72
    by_claim = {c.claim: c for c in comps}
    assert set(by_claim) == {"DA2", "question"}
    da2, q = by_claim["DA2"], by_claim["question"]
    assert da2.a.match == {"batch_size": (1024,)} and da2.b.match == {"batch_size": (128,)}
    assert da2.where_match() == {"schedule": ("caffe_1cycle",)}
    assert da2.tuning == "best_on_validation" and da2.n_lr_scales == 3 and da2.n_a == da2.n_b == 3
    assert da2.metric == "final_acc" and da2.equal_time
    assert da2.line().startswith("DA2: batch_size=1024 vs batch_size=128, trials with schedule caffe_1cycle, n=3 per "
                                 "arm, final test accuracy at each arm's own epoch budget (")
    assert "steps 5664 vs 18750" in da2.line()                     # the confound the plan knows
    assert q.kind == "interaction" and q.by == "schedule" and q.by_a == ("caffe_1cycle",) and q.by_b == ("multistep",)


def test_sc4_is_its_own_study_with_the_papers_batches_and_bn_over_tbs_over_8():
    _, trials, comps = study("total_batch", "paper")
    assert {(t.config.batch_size, t.config.bn_batch) for t in trials} == {(256, 32), (512, 64), (1000, 125),
                                                                          (1536, 192)}
    assert {(t.config.schedule, t.config.base_lr, t.config.max_lr, t.config.stepsize, t.config.steps)
            for t in trials} == {("triangular", 0.1, 3.0, 5000, 10000)}    # SC1's CLR, the same iterations
    (sc4,) = comps
    assert sc4.kind == "trend" and sc4.a.match == {"batch_size": (1536,)} and sc4.b.match == {"batch_size": (256,)}
    assert sc4.levels == (256, 512, 1000, 1536)


def test_da1_is_two_comparisons_each_reading_its_own_constant_arm():
    """The paper's numbers (cyclical 92.0 vs constant 0.9 91.4 and constant 0.95 92.1): better than 0.9, not worse
    than 0.95 by more than the margin. Pooling both constants (the old plan) would hide the 0.95 tie."""
    _, trials, comps = study("momentum", "paper")
    better, tie = [c for c in comps if c.claim == "DA1"]
    assert better.kind == "two_arm" and better.b.match == {"cycle_momentum": (False,), "momentum": (0.9,)}
    assert tie.kind == "non_inferior" and tie.margin == 0.005 and tie.b.match["momentum"] == (0.95,)
    paper = {(True, 0.9): 0.920, (False, 0.9): 0.914, (False, 0.95): 0.921}

    def outcome(c):
        base = paper.get((c["cycle_momentum"], c["momentum"]), 0.9)
        return base + 0.0005 * c["seed"], None
    df = frame(trials, "paper", outcome)
    ev = claims.plan_verdicts([better, tie], df)
    v_better, v_tie = ev.verdicts
    assert set(df[df["run_id"].isin(v_better.run_ids)]["momentum"]) == {0.9}         # cyclical + constant 0.9
    assert set(df[df["run_id"].isin(v_tie.run_ids)].query("not cycle_momentum")["momentum"]) == {0.95}
    assert v_better.diff == pytest.approx(0.006) and v_better.observed == "same as the claim"
    assert v_tie.diff == pytest.approx(-0.001) and v_tie.verdict == "supported"      # within 0.5 pp, per seed


def test_sc10_compares_sgd_clr_with_each_logged_adaptive_run_and_nesterov_with_itself():
    _, trials, comps = study("optimizers", "paper")
    assert len(comps) == 10
    for c, b in zip(comps[:3], ("adam", "adagrad", "adadelta"), strict=True):
        assert c.a.match == {"optimizer": ("caffe_sgd",), "schedule": ("triangular",)}   # the values present
        assert c.b.match == {"optimizer": (b,), "schedule": ("multistep",)}
        assert c.where_match() == {"nesterov": (False,)} and c.n_a == c.n_b == 3
    assert comps[3].field == "schedule" and comps[3].where_match() == {"nesterov": (True,)}


def test_sc10_puts_the_adaptive_optimizers_under_the_large_lr_cycle_so_the_plan_could_fail():
    """Our extension (declared in the references): each adaptive optimizer under SGD's cycle against SGD's cycle,
    and against its own PC-LR. If Adam super-converged, its cycle would tie SGD's and beat its own PC-LR."""
    _, trials, comps = study("optimizers", "paper")
    clr = {t.config.optimizer: t for t in trials if t.config.schedule == "triangular" and not t.config.nesterov}
    assert set(clr) == {"caffe_sgd", "adam", "adagrad", "adadelta"}
    assert (clr["adam"].config.base_lr, clr["adam"].config.max_lr) == (0.001, 0.03)    # SGD's range x1/100
    assert clr["adam"].reference == "SC10-adam-clr"
    vs_sgd, vs_own_pc = comps[4:7], comps[7:10]
    for c, b in zip(vs_sgd, ("adam", "adagrad", "adadelta"), strict=True):
        assert c.a.match == {"optimizer": ("caffe_sgd",)} and c.b.match == {"optimizer": (b,)}
        assert c.where_match() == {"nesterov": (False,), "schedule": ("triangular",)}
    for c, b in zip(vs_own_pc, ("adam", "adagrad", "adadelta"), strict=True):
        assert c.field == "schedule" and c.a.match == {"schedule": ("multistep",)}
        assert c.b.match == {"schedule": ("triangular",)} and c.where_match() == {"optimizer": (b,)}
    adam_super_converges = {("caffe_sgd", "triangular"): 0.924, ("adam", "triangular"): 0.93,
                            ("adam", "multistep"): 0.87}

    def outcome(c):
        return adam_super_converges.get((c["optimizer"], c["schedule"]), 0.85) + 0.001 * c["seed"], None
    ev = claims.plan_verdicts([vs_sgd[0], vs_own_pc[0]], frame(trials, "paper", outcome))
    assert [v.observed for v in ev.verdicts] == ["opposite to the claim", "opposite to the claim"]


def test_the_verdicts_use_every_planned_trial_family_and_select_lr_scales_on_validation():
    _, trials, comps = study("batch_size_effect", "paper")

    def outcome(c):  # lr_scale 2 looks best on validation, lr_scale 1 is best on test: selection must use val
        test = 0.90 + 0.01 * (c["batch_size"] == 1024) + 0.002 * c["seed"] - 0.02 * (c["lr_scale"] != 1)
        return test, 0.90 + 0.05 * (c["lr_scale"] == 2)
    df = frame(trials, "paper", outcome)
    ev = claims.plan_verdicts(comps, df, curves_for(df))
    used = {rid for v in ev.verdicts for rid in v.run_ids}
    chosen = df[df["run_id"].isin(used)]
    assert set(chosen["lr_scale"]) == {2.0}                          # validation picked the scale, not the test set
    assert set(chosen["schedule"]) == {"caffe_1cycle", "multistep"}   # multistep trials feed the interaction
    q = one(ev, "question")
    assert {"caffe_1cycle", "multistep"} <= set(df[df["run_id"].isin(q.run_ids)]["schedule"])
    da2 = one(ev, "DA2")
    assert set(df[df["run_id"].isin(da2.run_ids)]["batch_size"]) == {128, 1024}
    # DA2 reads each arm's FINAL accuracy (the end of its own one-cycle), never a point mid-cycle
    assert da2.median_a == pytest.approx(0.90 + 0.01 + 0.002 - 0.02)
    assert da2.median_b == pytest.approx(0.90 + 0.002 - 0.02)
    # and says plainly that the arms' measured training seconds were not equal on this hardware
    assert "116 vs 48 epochs took" in da2.measured and "did NOT give the arms equal time" in da2.measured


def test_every_shipped_study_declares_a_plan_that_expands_at_every_scale():
    for name, _ in specs.list_studies():
        s = specs.load_spec(name)
        if all(t.config.kind == "lr_finder" for t in specs.trials(s, "smoke")):
            continue  # an LR-finder study feeds other studies' max LRs; it compares nothing itself
        assert s.get("analysis"), f"{name} declares no analysis plan"
        for scale in specs.SCALES:
            if scale not in (s.get("scales") or {}):
                continue
            comps = claims.planned_comparisons(s, scale)
            assert comps, (name, scale)
            for c in comps:
                assert c.n_a >= 1 and c.n_b >= 1, (name, scale, c.line())
                assert c.claim == "question" or c.claim in s.get("claims", []), (name, c.claim)


def test_dry_run_prints_the_plan(capsys):
    from harness.study.cli import main
    assert main(["batch_size_effect", "--dry-run", "--scale", "paper"]) == 0
    out = capsys.readouterr().out
    plan_lines = out[out.index("analysis plan"):].splitlines()[1:]
    assert any(ln.strip().startswith("DA2: batch_size=1024 vs batch_size=128") and "final test accuracy at each "
               "arm's own epoch budget (" in ln for ln in plan_lines)
    assert main(["total_batch", "--dry-run", "--scale", "paper"]) == 0
    out = capsys.readouterr().out
    assert "SC4: batch_size=1536 vs batch_size=256" in out[out.index("analysis plan"):]
    assert any(ln.strip().startswith("question: (batch_size=1024 - batch_size=128) under schedule=caffe_1cycle")
               for ln in plan_lines)


@pytest.mark.parametrize("bad, message", [
    ({"tuning": "best_on_test"}, "analysis.tuning 'best_on_test' is not known"),
    ({"comparisons": [{"claim": "SC4", "kind": "trend", "field": "batchsize"}]},
     "'batchsize' is not a trial field (did you mean 'batch_size'?)"),
    ({"comparisons": [{"claim": "SC99", "kind": "trend", "field": "batch_size"}]}, "claim 'SC99' is not known"),
    ({"comparisons": [{"claim": "SC4", "kind": "two_arm", "field": "batch_size", "a": 4000, "b": "min"}]},
     "no trial has batch_size in [4000]"),
    ({"comparisons": [{"claim": "SC4", "kind": "interaction", "field": "batch_size", "a": "max", "b": "min"}]},
     "needs by, by_a and by_b"),
])
def test_a_bad_plan_is_one_line(tmp_path, bad, message):
    import yaml
    s = specs.load_spec("batch_size_effect")
    s["analysis"] = {**s["analysis"], **bad}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(s))
    with pytest.raises(specs.SpecError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
                       .replace("?", r"\?")) as e:
        specs.load_spec(str(path))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ the rule
def test_decision_rule():
    assert claims.decide(0.01, 0.05, 0.001, +1, [4, 4])[0] == "supported"
    assert claims.decide(-0.05, -0.01, 0.001, +1, [4, 4])[0] == "contradicted"
    assert claims.decide(-0.01, 0.05, 0.001, +1, [4, 4])[0] == "inconclusive"
    assert claims.decide(0.01, 0.05, 0.2, +1, [4, 4])[0] == "inconclusive"
    assert claims.decide(0.01, 0.05, 0.001, +1, [1, 4])[0] == "inconclusive"        # one unit: nothing to test
    assert claims.decide(-math.inf, -math.inf, 0.03, -1, [4, 4])[0] == "supported"  # fewer steps, the other missed
    assert claims.decide(0.01, 0.05, math.nan, +1, [6, 6], no_test="why")[1].endswith("but no test: why")
    # below MIN_N the bounds are the per-seed range and the test exact; the reason names both and p's floor
    verdict, reason = claims.decide(0.01, 0.02, 0.1, +1, [3, 3], "the range of the per-seed differences",
                                    "exact permutation test", p_min=0.1)
    assert verdict == "inconclusive" and reason == (
        "the range of the per-seed differences excludes 0 in the claimed direction, but exact permutation test "
        "p = 0.1 >= 0.05 (3 vs 3 units: this test cannot give p below 0.1)")


def test_bootstrap_is_seeded_and_handles_misses():
    a, b = [0.92, 0.915, 0.925, 0.93], [0.85, 0.855, 0.845, 0.86]
    assert claims.bootstrap_median_diff(a, b, seed=1) == claims.bootstrap_median_diff(a, b, seed=1)
    diff, lo, hi = claims.bootstrap_median_diff(a, b, seed=1)
    assert diff == pytest.approx(0.07) and 0 < lo <= diff <= hi
    d, lo, hi = claims.bootstrap_median_diff([9500, 9600, 9700], [np.inf] * 3, seed=0)
    assert d == lo == hi == -np.inf


def test_below_min_n_there_is_no_interval_only_per_seed_values_the_direction_and_an_exact_test():
    _, trials, comps = study("batch_size_effect", "quick")           # 2 seeds per cell
    df = frame(trials, "quick", lambda c: (0.85 - 0.1 * (c["batch_size"] == 1000) + 0.01 * c["seed"], None))
    v = one(claims.plan_verdicts(comps, df, curves_for(df)), "DA2")
    assert v.n_a == v.n_b == 2 and not v.ci_shown
    assert v.p == pytest.approx(1 / 3) and v.test.startswith("exact permutation test")  # 2 vs 2: 6 splits
    assert v.seed_label == "per-seed differences (paired by seed)" and v.seed_high == pytest.approx(-0.1)
    assert v.verdict == "inconclusive" and v.observed == "opposite to the claim"
    assert "s0 75.00%" in v.per_seed and "s1 86.00%" in v.per_seed and "CI" not in v.measured


def test_smoke_scale_is_only_a_pipeline_check():
    _, trials, comps = study("batch_size_effect", "smoke")
    df = frame(trials, "smoke", lambda c: (0.9 + 0.05 * (c["batch_size"] == 1000), None))
    v = one(claims.plan_verdicts(comps, df, curves_for(df)), "DA2")
    assert v.verdict == "pipeline check" and v.verdict_text.startswith("pipeline check (smoke scale): would be")


def _three_seed_plan(kind_extra: dict, grid: dict, seeds=4):
    """A small in-memory study: configs over `grid` x seeds and one comparison."""
    configs = []
    import itertools
    keys = list(grid)
    for values in itertools.product(*grid.values()):
        for s in range(seeds):
            configs.append({"seed": s, "lr_scale": 1.0, "steps": 100, "max_lr": 1.0, "target_acc": 0.9,
                            **dict(zip(keys, values, strict=True))})
    comps = plan.expand({"comparisons": [{"claim": "SC9", **kind_extra}]}, configs)
    return configs, comps


def _frame_of(configs, acc) -> pd.DataFrame:
    return pd.DataFrame([{**c, "run_id": f"r{i}", "status": "completed", "scale": "quick", "outcome_acc": acc(c),
                          "steps_to_target_eff": np.inf, "train_seconds": 1.0} for i, c in enumerate(configs)])


def test_best_level_and_best_shift_and_range_test():
    configs, comps = _three_seed_plan({"kind": "best_level", "field": "momentum", "a": [0.85, 0.9]},
                                      {"momentum": [0.8, 0.85, 0.9, 0.95]})
    acc = {0.8: 0.905, 0.85: 0.92, 0.9: 0.924, 0.95: 0.89}
    v = claims.plan_verdicts(comps, _frame_of(configs, lambda c: acc[c["momentum"]] + 0.001 * c["seed"])).verdicts[0]
    assert v.verdict == "supported" and v.median_a == pytest.approx(0.9255) and v.median_b == pytest.approx(0.9065)
    configs, comps = _three_seed_plan({"kind": "best_shift", "field": "weight_decay", "by": "schedule",
                                       "by_a": "one_cycle", "by_b": "constant"},
                                      {"weight_decay": [1e-3, 1e-4, 1e-5], "schedule": ["one_cycle", "constant"]},
                                      seeds=5)   # below 5 per level: per-seed shifts only (tests/test_statistics.py)
    best = {"one_cycle": 1e-4, "constant": 1e-3}
    df = _frame_of(configs, lambda c: 0.9 + 0.02 * (c["weight_decay"] == best[c["schedule"]]) + 0.001 * c["seed"])
    v = claims.plan_verdicts(comps, df).verdicts[0]
    assert v.verdict == "supported" and "0.0001 under schedule=one_cycle vs 0.001 under schedule=constant" in v.measured
    configs, comps = _three_seed_plan({"kind": "range_test", "field": "schedule", "where": {"schedule": "range_test"}},
                                      {"schedule": ["range_test"]}, seeds=6)   # equal drops: a sign-flip test, 2/64
    df = _frame_of(configs, lambda c: 0.8)
    curves = pd.DataFrame([{"run_id": r, "step": k, "lr": 3 * k / 10, "test_acc": 0.5 + 0.03 * k - 0.04 * (k == 10)}
                           for r in df["run_id"] for k in range(1, 11)])
    v = claims.plan_verdicts(comps, df, curves).verdicts[0]
    # the SC3 rule: median accuracy at LR 0.3-1.2 (0.575) minus the lowest smoothed accuracy at LR 2-3 (0.71)
    assert v.verdict == "supported" and v.median_a == pytest.approx(-0.135)


@pytest.mark.slow
def test_null_calibration_supported_at_most_5_percent():
    """Simulated no-effect outcomes (every arm the same distribution) through the paper-scale plan of
    batch_size_effect and a 5-seed two-arm plan: the rule may call 'supported' in at most 5% of studies."""
    _, trials, comps = study("batch_size_effect", "paper")
    comps = [c for c in comps if c.metric == "final_acc"]            # DA2 and the interaction
    configs, two_arm = _three_seed_plan({"kind": "two_arm", "field": "schedule", "a": "one_cycle", "b": "multistep"},
                                        {"schedule": ["one_cycle", "multistep"]}, seeds=5)
    rng = np.random.default_rng(0)
    supported = total = 0
    for _ in range(150):
        df = frame(trials, "paper", lambda c: (rng.normal(0.9, 0.01), rng.normal(0.9, 0.01)))
        small = _frame_of(configs, lambda c: rng.normal(0.9, 0.01))
        verdicts = claims.plan_verdicts(comps, df).verdicts + claims.plan_verdicts(two_arm, small).verdicts
        supported += sum(v.verdict == "supported" for v in verdicts)
        total += len(verdicts)
    assert total == 450
    assert supported / total <= 0.05, supported / total


def test_registry_numbers_are_those_of_claims_md():
    """claims.CLAIMS transcribes claims.md's table: ../shared/paper/claims.md, else its copy in tests/fixtures."""
    assert set(claims.CLAIMS) == {f"SC{i}" for i in range(1, 11)} | {"DA1", "DA2", "DA3", "DA4", "CLR1"}
    rows = {}
    for line in claims_md().splitlines():
        m = re.match(r"\| (SC\d+|DA\d|CLR1) \|", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    assert set(rows) == set(claims.CLAIMS)
    for cid, cells in rows.items():
        c = claims.CLAIMS[cid]
        _, statement, setup, paper, log = cells
        assert c.statement == statement, cid
        assert all(part in setup for part in c.setup.split(", ")), cid  # DA4 lists its nets, comma-separated
        assert c.log == log, cid
        if paper == "as given":  # DA4, CLR1: the paper's numbers are written in the setup column
            assert decimals(c.paper) == decimals(setup) != [], cid
        else:
            assert c.paper == paper, cid


def decimals(text: str) -> list[str]:
    return re.findall(r"\d+\.\d+", text)
