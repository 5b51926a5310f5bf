"""SC3's rule for the LR range test (harness.analysis.claims.range_reading), calibrated on the authors' own range
tests: ResNet-56, LR 0 -> 3 linearly over 5k, 20k and 100k iterations (harness/analysis/reference/), which the paper
says stay "consistently high". The rule: median accuracy at LR 0.3-1.2 minus the lowest smoothed accuracy (median
within +-0.25 LR) at LR 2-3; "stays accurate" when that drop is at most RANGE_DROP (15 points)."""

import numpy as np
import pandas as pd
import pytest

from harness import plan
from harness.analysis import claims
from harness.analysis.caffe_logs import load_curve

# (reference accuracy, high-end accuracy, LR of the high end, drop) of each log under the rule
AUTHORS = {"range3Iter5kFig2b": (0.7279, 0.6881, 2.88, 0.0398),
           "range3Iter20kFig2b": (0.7744, 0.7103, 2.15, 0.0641),
           "range3Iter100kFig2b": (0.8096, 0.7348, 2.99, 0.0748)}


def _ramp(n=200, top=3.0, seed=0, noise=0.02):
    """A healthy synthetic range test: 10% at LR 0, ~80% from LR 0.3 on, evaluation noise."""
    lr = np.linspace(0, top, n + 1)
    rng = np.random.default_rng(seed)
    acc = np.clip(0.1 + 0.7 * (1 - np.exp(-lr / 0.1)) + rng.normal(0, noise, lr.size), 0, 1)
    return lr, acc


def test_rule_constants():
    assert claims.RANGE_DROP == 0.15 and claims.RANGE_REF == (0.1, 0.4)
    assert claims.RANGE_END == (2 / 3, 1.0) and claims.RANGE_SMOOTH == 1 / 12


@pytest.mark.parametrize("name", list(AUTHORS))
def test_authors_range_tests_stay_accurate(name):
    d = load_curve(name)
    r = claims.range_reading(d["lr"], d["test_acc"], top_lr=3.0)
    ref, high, where, drop = AUTHORS[name]
    assert r.reference == pytest.approx(ref, abs=1e-4) and r.high_end == pytest.approx(high, abs=1e-4)
    assert r.high_end_lr == pytest.approx(where, abs=0.01) and r.drop == pytest.approx(drop, abs=1e-4)
    assert r.stays_accurate and claims.RANGE_DROP - r.drop >= 0.07          # room of at least 7 points
    assert claims.range_reading(d["lr"], d["test_acc"]).drop == pytest.approx(drop, abs=0.01)   # top LR from the curve


def test_old_rule_failed_the_100k_log():
    d = load_curve("range3Iter100kFig2b").dropna(subset=["test_acc"])
    assert d["test_acc"].max() - d["test_acc"].iloc[-1] == pytest.approx(0.1424, abs=1e-4)   # > the old 10 points


def test_collapse_to_chance_fails():
    lr, acc = _ramp()
    acc = np.where(lr >= 1.5, 0.1, acc)       # falls to chance at LR 1.5 and stays there
    r = claims.range_reading(lr, acc, top_lr=3.0)
    assert r.high_end == pytest.approx(0.1) and r.drop > 0.65 and not r.stays_accurate


def test_divergence_fails():
    lr, acc = _ramp()
    late = np.where(lr >= 2.7, 0.1, acc)      # diverges at LR 2.7: chance for the last tenth of the ramp
    r = claims.range_reading(lr, late, top_lr=3.0)
    assert r.drop > 0.65 and not r.stays_accurate and r.high_end_lr >= 2.7
    stopped = lr < 1.8                        # the run stopped (diverged) before LR 2: its final accuracy counts
    r = claims.range_reading(lr[stopped], acc[stopped], top_lr=3.0, final_acc=0.1)
    assert np.isnan(r.high_end_lr) and r.high_end == 0.1 and not r.stays_accurate


def test_gradual_decline_beyond_threshold_fails():
    lr, acc = _ramp(noise=0.0)
    acc = acc - np.clip(lr - 1.5, 0, None) * 0.15     # loses 22.5 points by LR 3
    r = claims.range_reading(lr, acc, top_lr=3.0)
    assert 0.15 < r.drop < 0.25 and not r.stays_accurate


@pytest.mark.parametrize("n", [50, 200, 1000])
def test_one_noisy_dip_still_passes_at_any_ramp_length(n):
    lr, acc = _ramp(n=n, seed=n)
    base = claims.range_reading(lr, acc, top_lr=3.0)
    dipped = acc.copy()
    dipped[-1] = dipped[np.argmin(np.abs(lr - 2.5))] = 0.1     # two lone evaluations at chance, one at the very end
    r = claims.range_reading(lr, dipped, top_lr=3.0)
    assert base.stays_accurate and r.stays_accurate and abs(base.drop) < 0.03 and r.drop < 0.06


def _range_plan(seeds):
    configs = [{"seed": s, "lr_scale": 1.0, "steps": 100, "max_lr": 3.0, "target_acc": 0.7,
                "schedule": "range_test"} for s in range(seeds)]
    comps = plan.expand({"comparisons": [{"claim": "SC3", "kind": "range_test", "field": "schedule",
                                          "where": {"schedule": "range_test"}}]}, configs)
    df = pd.DataFrame([{**c, "run_id": f"r{i}", "status": "completed", "scale": "quick", "outcome_acc": 0.8,
                        "steps_to_target_eff": np.inf, "train_seconds": 1.0} for i, c in enumerate(configs)])
    return comps, df


def _curves(df, make):
    rows = []
    for _, r in df.iterrows():
        lr, acc = make(int(r["seed"]))
        rows += [{"run_id": r["run_id"], "step": k, "lr": x, "test_acc": a} for k, (x, a) in enumerate(zip(lr, acc))]
    return pd.DataFrame(rows)


def test_verdict_uses_the_rule_per_seed():
    comps, df = _range_plan(6)
    v = claims.plan_verdicts(comps, df, _curves(df, lambda s: _ramp(seed=s))).verdicts[0]
    assert v.verdict == "supported" and v.metric == "range_drop" and v.n_a == 6
    assert "LR 0.3-1.2 minus the lowest accuracy at LR 2-3" in v.measured and "threshold 15" in v.measured
    assert abs(v.median_a) < 0.03 and v.per_seed == "" and "one-sample t" in v.test

    def collapse(s):
        lr, acc = _ramp(seed=s)
        return lr, np.where(lr >= 1.5, 0.1 + 0.001 * s, acc)
    v = claims.plan_verdicts(comps, df, _curves(df, collapse)).verdicts[0]
    assert v.verdict == "contradicted" and v.median_a > 0.65

    comps, df = _range_plan(3)            # below MIN_N: per-run margins and an exact sign-flip test (p >= 0.25)
    v = claims.plan_verdicts(comps, df, _curves(df, lambda s: _ramp(seed=s))).verdicts[0]
    assert v.verdict == "inconclusive" and v.seed_label == "per-run drops minus the threshold"
    assert v.seed_high < 0 and "cannot give p below" in v.reason
