"""The claims registry and its verdict statistics: on hand-made frames and on the synthetic MLflow store."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from harness import claims
from harness.results import load_study, parse_param

try:
    from tests.paper_material import claims_md
    from tests.synthetic_store import synthetic_uri
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from paper_material import claims_md
    from synthetic_store import synthetic_uri

JITTER = (-0.004, 0.0, 0.004, 0.002)


def frame(specs, scale="quick", seeds=4) -> pd.DataFrame:
    """specs: (fields, accuracy, steps_to_target or None, status) -> one row per seed, as harness.results makes."""
    rows = []
    for spec in specs:
        fields, acc, stt, status = (*spec, *(None, None, None, "completed")[len(spec):])
        cell = ",".join(f"{k}={v}" for k, v in fields.items())
        for s in range(seeds):
            rows.append({"run_id": f"{cell}/{s}", "cell": cell, "status": status, "scale": scale, "seed": s,
                         "outcome_acc": acc + JITTER[s % 4], "best_acc": acc, "dataset": "cifar10",
                         "model": "resnet56", "steps_to_target_eff": np.inf if stt is None else stt + 10 * s,
                         **fields})
    return pd.DataFrame(rows)


def one(ev: claims.Evaluation, claim_id: str) -> claims.Verdict:
    found = [v for v in ev.verdicts if v.claim_id == claim_id]
    assert len(found) == 1, (claim_id, [v.comparison for v in ev.verdicts], ev.not_tested)
    return found[0]


# ------------------------------------------------------------------------------------------------ decision rule
def test_decision_rule():
    assert claims.decide(0.01, 0.05, 0.001, +1, [4, 4])[0] == "supported"
    assert claims.decide(-0.05, -0.01, 0.001, +1, [4, 4])[0] == "contradicted"
    assert claims.decide(-0.01, 0.05, 0.001, +1, [4, 4])[0] == "inconclusive"
    assert claims.decide(0.01, 0.05, 0.2, +1, [4, 4])[0] == "inconclusive"
    assert claims.decide(0.01, 0.05, 0.001, +1, [2, 4])[0] == "inconclusive"        # n < MIN_N
    assert claims.decide(-math.inf, -math.inf, 0.03, -1, [4, 4])[0] == "supported"  # fewer steps, the other missed


def test_bootstrap_is_seeded_and_handles_misses():
    a, b = [0.92, 0.915, 0.925, 0.93], [0.85, 0.855, 0.845, 0.86]
    assert claims.bootstrap_median_diff(a, b, seed=1) == claims.bootstrap_median_diff(a, b, seed=1)
    diff, lo, hi = claims.bootstrap_median_diff(a, b, seed=1)
    assert diff == pytest.approx(0.07) and 0 < lo <= diff <= hi
    d, lo, hi = claims.bootstrap_median_diff([9500, 9600, 9700], [np.inf] * 3, seed=0)
    assert d == lo == hi == -np.inf
    assert claims.bootstrap_median_diff([np.inf] * 3, [np.inf] * 3, seed=0) == (0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------ comparisons
def test_sc1_supported_with_paired_step_budgets():
    df = frame([({"schedule": "triangular", "steps": 10000}, 0.92, 9500),
                ({"schedule": "multistep", "steps": 80000}, 0.85, None)])
    v = one(claims.evaluate_frame(df, claim_ids=["SC1"]), "SC1")
    assert v.verdict == "supported" and v.comparison == "triangular vs multistep"
    assert v.n_a == v.n_b == 4 and v.diff == pytest.approx(0.07) and v.ci_low > 0 and v.p < 0.05
    assert v.secondary[0]["would_be"] == "supported"      # steps to target: 9.5k vs never (Mann-Whitney)
    assert "steps 10000 vs 80000" in v.measured           # paired fields go with their arm, not a stratum
    assert v.paper == "CLR 92.4 vs PC 91.2" and v.log.startswith("92.44 vs 90.32")


def test_contradicted_and_inconclusive():
    df = frame([({"schedule": "one_cycle"}, 0.80, None), ({"schedule": "multistep"}, 0.86, None)])
    assert one(claims.evaluate_frame(df, claim_ids=["SC1"]), "SC1").verdict == "contradicted"
    df = frame([({"schedule": "one_cycle"}, 0.861, None), ({"schedule": "multistep"}, 0.86, None)])
    v = one(claims.evaluate_frame(df, claim_ids=["SC1"]), "SC1")
    assert v.verdict == "inconclusive" and "CI includes 0" in v.reason


def test_diverged_trials_count_with_their_accuracy():
    ok = frame([({"schedule": "one_cycle"}, 0.92, 900), ({"schedule": "multistep"}, 0.88, None)])
    # two of four one_cycle seeds diverge to chance: the median drops and the comparison is no longer clear
    ok.loc[(ok["schedule"] == "one_cycle") & (ok["seed"] < 2), ["outcome_acc", "status", "steps_to_target_eff"]] = \
        [0.1, "diverged", np.inf]
    v = one(claims.evaluate_frame(ok, claim_ids=["SC1"]), "SC1")
    assert v.n_a == 4 and v.verdict != "supported" and "2 diverged" in v.evidence


def test_smoke_scale_is_only_a_pipeline_check():
    df = frame([({"schedule": "triangular"}, 0.92, 95), ({"schedule": "multistep"}, 0.85, None)], scale="smoke")
    v = one(claims.evaluate_frame(df, claim_ids=["SC1"]), "SC1")
    assert v.verdict == "pipeline check" and v.would_be == "supported"
    assert v.verdict_text == "pipeline check (smoke scale): would be supported"


def test_trend_sc4_uses_extremes_and_spearman_within_schedule_strata():
    specs = []
    for bs, lr, acc in ((256, 0.4, 0.90), (512, 0.6, 0.91), (1024, 1.0, 0.92)):
        specs.append(({"schedule": "one_cycle", "batch_size": bs, "max_lr": lr}, acc))
        specs.append(({"schedule": "multistep", "batch_size": bs, "max_lr": lr}, 0.95 - acc))   # not evaluated
    v = one(claims.evaluate_frame(frame(specs), claim_ids=["SC4"]), "SC4")
    assert v.verdict == "supported" and v.rho > 0.8 and "1024 vs 256" in v.comparison
    assert v.cells and not any("one_cycle" in c and "multistep" in c for c in v.cells)  # one schedule per stratum


def test_two_arm_strata_and_shared_arms():
    # SC7: one verdict per model, with the paper's and the log's number of that model
    specs = [({"model": m, "schedule": s}, acc, None) for m in ("resnet20", "resnet110")
             for s, acc in (("triangular", 0.904), ("multistep", 0.886))]
    ev = claims.evaluate_frame(frame(specs), claim_ids=["SC7"])
    logs = {v.stratum: v.log for v in ev.verdicts}
    assert logs == {"model=resnet20": "90.42 vs 88.64", "model=resnet110": "92.37 vs 91.21"}
    # DA1: the cyclical-momentum arm (one momentum value, which does not apply to it) meets each constant one
    df = frame([({"schedule": "one_cycle", "cycle_momentum": True, "momentum": 0.9}, 0.92),
                ({"schedule": "one_cycle", "cycle_momentum": False, "momentum": 0.9}, 0.91),
                ({"schedule": "one_cycle", "cycle_momentum": False, "momentum": 0.95}, 0.921)])
    vs = claims.evaluate_frame(df, claim_ids=["DA1"]).verdicts
    assert [(v.b_label, v.verdict) for v in vs] == [("cycle_momentum=False (momentum=0.9)", "supported"),
                                                   ("cycle_momentum=False (momentum=0.95)", "inconclusive")]
    assert vs[1].log == "91.91 (const 0.95)"


def test_interaction_sc5_and_best_levels():
    specs = []
    for ts, a, b in ((10000, 0.80, 0.71), (30000, 0.89, 0.86), (None, 0.924, 0.903)):
        specs += [({"schedule": "triangular", "train_size": ts}, a), ({"schedule": "multistep", "train_size": ts}, b)]
    v = one(claims.evaluate_frame(frame(specs), claim_ids=["SC5"]), "SC5")
    assert v.verdict == "supported" and v.diff == pytest.approx(0.09 - 0.021) and "10000 vs full" in v.comparison
    specs = [({"schedule": "triangular", "momentum": m, "cycle_momentum": False}, acc)
             for m, acc in ((0.8, 0.905), (0.85, 0.92), (0.9, 0.924), (0.95, 0.89))]
    v = one(claims.evaluate_frame(frame(specs), claim_ids=["SC9"]), "SC9")
    assert v.a_label.startswith("momentum=0.9") and v.b_label.startswith("momentum=0.8") and v.verdict == "supported"
    specs = []
    for wd, clr, const in ((1e-3, 0.85, 0.90), (3e-4, 0.88, 0.91), (1e-4, 0.92, 0.89), (1e-5, 0.90, 0.85)):
        specs += [({"schedule": "one_cycle", "weight_decay": wd}, clr), ({"schedule": "constant", "weight_decay": wd},
                                                                          const)]
    v = one(claims.evaluate_frame(frame(specs), claim_ids=["DA3"]), "DA3")
    assert v.verdict == "supported" and "0.0001 with one_cycle vs 0.0003 with constant" in v.measured


def test_not_tested_when_cells_are_missing():
    df = frame([({"schedule": "one_cycle", "batch_size": 512}, 0.9)])
    ev = claims.evaluate_frame(df, claim_ids=["SC1", "SC4", "SC8", "SC10", "XX9"])
    assert ev.verdicts == []
    why = dict(ev.not_tested)
    assert set(why) == {"SC1", "SC4", "SC8", "SC10", "XX9"}
    assert "multistep" in why["SC1"] and "cifar100" in why["SC8"] and "unknown claim" in why["XX9"]


def test_registry_numbers_are_those_of_claims_md():
    assert set(claims.CLAIMS) == {f"SC{i}" for i in range(1, 11)} | {"DA1", "DA2", "DA3", "DA4", "CLR1"}
    rows = {}
    for line in claims_md().splitlines():  # ../shared/paper/claims.md, else its table in tests/fixtures
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


# ------------------------------------------------------------------------------------------------ MLflow store
@pytest.fixture(scope="module")
def uri():
    return synthetic_uri()


@pytest.mark.parametrize("study, claim_id, expected", [
    ("super_convergence", "SC1", "supported"),
    ("batch_size_effect", "SC4", "contradicted"),
    ("batch_size_effect", "DA2", "contradicted"),
    ("momentum_effect", "SC9", "inconclusive"),
    ("weight_decay", "SC6", "supported"),
])
def test_verdicts_from_the_synthetic_store(uri, study, claim_id, expected):
    ev = claims.evaluate(load_study(study, uri, curves=False))
    assert one(ev, claim_id).verdict == expected


def test_diverged_and_errored_trials_in_the_store(uri):
    res = load_study("weight_decay", uri)
    t = res.trials
    div = t[t["status"] == "diverged"]
    assert len(div) == 3 and div["steps_to_target"].isna().all() and np.isinf(div["steps_to_target_eff"]).all()
    assert div["outcome_acc"].tolist() == pytest.approx([0.1] * 3)
    ev = claims.evaluate(res)
    assert ev.excluded == {"error": 1} and ev.n_trials == 9
    v = one(ev, "SC6")
    assert "3 diverged" in v.evidence and "0.001: 10.00%" in v.measured


def test_parse_param():
    assert parse_param("None") is None and parse_param("True") is True and parse_param("1000") == 1000
    assert parse_param("0.0001") == 1e-4 and parse_param("[50000, 70000]") == "[50000, 70000]"
    assert parse_param("one_cycle") == "one_cycle"
