"""negative_mnist, by experiment (issue 18): the instability metrics read from runs written to a real MLflow store,
the controls' expectation, the per-pixel standardization, and the plan the dry run prints."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
from real_path_store import SYSTEM
from synthetic_store import summary

from harness import plan
from harness import spec as specs
from harness.analysis import claims
from harness.analysis.results import load_study
from harness.study import tracking
from harness.trial import data

STUDY = "negative_mnist"


# ------------------------------------------------------------------------------------------------ curve metrics
def _records(config: dict, curve: list[tuple[int, float]], dead: float, recall: float) -> list[dict]:
    return [{"step": step, "epoch": step / 10, "lr": config["max_lr"], "momentum": 0.0, "train_loss": 1 - acc,
             "test_loss": 1 - acc, "test_acc": acc, "images_per_s": 100.0, "train_seconds": float(step),
             "dead_output_frac": dead, "min_class_recall": recall} for step, acc in curve]


def test_instability_metrics_are_read_from_the_curves_the_store_returns(tmp_path):
    """Three smoke trials written by the harness's writers: a finished run (its curve from history.csv), a diverged
    one (the planned evaluations after it stopped count as below chance) and one still running (its curve from
    the metric histories). Their instability, dead outputs and worst class as load_study reads them back."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = specs.load_spec(STUDY)
    trials = specs.trials(spec, "smoke")
    assert {(t.config.steps, t.config.eval_every) for t in trials[:3]} == {(40, 5)}
    parent = tracking.start_study_run(uri, specs.at_scale(spec, "smoke"), "smoke", "/neg/curves", "test",
                                      {"CPU": 2.0}, "test", resume=False)
    exp = tracking.experiment_id(uri, STUDY)
    curves = {  # acc at each evaluation; chance + 10 points = 0.2 on digits' 10 classes
        "completed": [(5, 0.15), (10, 0.6), (15, 0.8), (20, 0.3), (25, 0.12), (30, 0.7), (35, 0.85), (40, 0.9)],
        "diverged": [(5, 0.3), (10, 0.5), (15, 0.6), (20, 0.4), (22, 0.1)],
        "running": [(5, 0.19), (10, 0.5), (15, 0.45)],
    }
    ids = {}
    for t, (status, curve) in zip(trials, curves.items(), strict=False):
        config = t.config.to_dict()
        records = _records(config, curve, dead=0.1 * len(ids), recall=0.4 + 0.1 * len(ids))
        logger = tracking.TrialLogger(uri, experiment_id=exp, parent_run_id=parent, trial=t, grace_s=5)
        logger.start(t.workers, SYSTEM)
        for r in records:
            logger.log_eval(r)
        logger.flush()
        if status != "running":
            assert logger.finish(summary(config, records, status), records)
        ids[status] = logger.run_id
    res = load_study(STUDY, uri, run=parent)
    rows = res.trials.set_index("run_id")
    got = {s: rows.loc[rid, ["max_acc_drop", "evals_below_chance", "final_dead_output_frac",
                             "final_min_class_recall"]].astype(float).tolist() for s, rid in ids.items()}
    assert got["completed"] == pytest.approx([0.5, 2, 0.0, 0.4])        # 0.8 -> 0.3; 0.15 and 0.12
    assert got["diverged"] == pytest.approx([0.3, 1 + 4, 0.1, 0.5])     # 0.4 -> 0.1; at 22, then 25, 30, 35, 40
    assert got["running"] == pytest.approx([0.05, 1, 0.2, 0.6])         # from the metric histories


# ------------------------------------------------------------------------------------------------ controls
def _frame(trials, acc) -> pd.DataFrame:
    """One completed row per trial (as harness.analysis.results makes it) with final accuracy acc(config)."""
    rows = []
    for t in trials:
        c = t.config.to_dict()
        rows.append({**c, "run_id": t.key, "cell": t.cell, "status": "completed", "scale": "quick",
                     "outcome_acc": acc(c), "final_acc": acc(c), "final_val_acc": acc(c),
                     "steps_to_target_eff": np.inf, "train_seconds": 1.0})
    return pd.DataFrame(rows)


def _control_verdict(seeds: int, acc) -> claims.Verdict:
    """The verdict of the control 'without the final ReLU, inversion does not matter' (final accuracy)."""
    spec = copy.deepcopy(specs.load_spec(STUDY))
    spec["grid"]["seed"] = list(range(seeds))
    trials = specs.trials(spec, "quick")
    control = [c for c in claims.planned_comparisons(spec, "quick") if c.expect and c.metric == "final_acc"
               and c.where_match() == {"mlp_final_relu": (False,)}]
    assert len(control) == 1
    ev = claims.plan_verdicts(control, _frame(trials, acc), scale="quick")
    assert len(ev.verdicts) == 1, ev.not_tested
    return ev.verdicts[0]


def _acc(gap_by_seed):
    """Plain images without the final ReLU at 0.95 + gap(seed), everything else at 0.95."""
    def acc(c):
        plain = not c["invert_images"] and not c["mlp_final_relu"]
        return 0.95 + 0.001 * c["seed"] + (gap_by_seed(c["seed"]) if plain else 0.0)
    return acc


def test_a_control_holds_when_the_seeds_disagree_and_fails_when_they_all_point_one_way():
    held = _control_verdict(3, _acc(lambda s: (-0.004, 0.003, 0.001)[s]))
    assert (held.would_be, held.expectation) == ("inconclusive", "held")
    assert held.verdict_text == "inconclusive; control, no difference expected: expectation held"
    assert "control, no difference expected: expectation held (no difference found" in held.evidence
    failed = _control_verdict(3, _acc(lambda s: 0.002 + 0.001 * s))     # small, but the same sign in every seed
    assert (failed.would_be, failed.expectation) == ("inconclusive", "failed")   # 3 vs 3: no test reaches p < 0.05
    assert failed.verdict_text.endswith("expectation failed")
    assert failed.observed == "plain images better"                      # a control claims no direction
    assert "every one of the per-seed differences (paired by seed) has the same sign" in failed.expectation_why
    decided = _control_verdict(claims.MIN_N, _acc(lambda s: 0.02 + 0.001 * s))
    assert (decided.would_be, decided.expectation) == ("supported", "failed")
    assert decided.expectation_why == "the decision rule finds a difference (supported)"
    alone = _control_verdict(1, _acc(lambda s: 0.02))
    assert alone.expectation == "not tested"


def test_a_claim_has_no_expectation_and_the_words_name_the_where():
    comps = claims.planned_comparisons(specs.load_spec(STUDY), "quick")
    words = {c.words for c in comps}
    assert "plain images vs inverted images [final ReLU, preprocess none, 12000 steps]" in words
    assert "plain images vs inverted images [no final ReLU]; control" in words
    assert "plain images vs inverted images [final ReLU, preprocess none, 3000 steps, max LR 0.3]" in words
    assert all(bool(c.expect) == c.words.endswith("; control") for c in comps)


def test_where_max_and_min_name_the_long_and_the_short_arms_at_every_scale():
    spec = specs.load_spec(STUDY)
    for scale, long, short in (("smoke", 40, 20), ("quick", 12000, 3000)):
        comps = claims.planned_comparisons(spec, scale)
        assert {c.where_match().get("steps") for c in comps} == {(long,), (short,), None}, scale


@pytest.mark.parametrize("extra, message", [
    ({"expect": "none"}, "analysis.comparisons[0].expect 'none' is not known; allowed: no_difference"),
    ({"kind": "trend", "expect": "no_difference"}, "expect: no_difference (a control) is only for kinds two_arm and "
                                                   "interaction, not trend"),
    ({"metric": "max_drop"}, "analysis.comparisons[0].metric 'max_drop' is not known (did you mean 'max_acc_drop'?)"),
])
def test_a_bad_control_or_metric_is_one_line(extra, message):
    analysis = {"comparisons": [{"claim": "question", "kind": "two_arm", "field": "invert_images", "a": False,
                                 "b": True, **extra}]}
    with pytest.raises(plan.PlanError) as e:
        plan.validate(analysis, "negative_mnist.yaml", specs.FIELDS, specs.KNOWN_CLAIMS)
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ data, dry run
def torch_close(a, b, atol: float = 1e-4) -> bool:
    import torch
    b = b if isinstance(b, torch.Tensor) else torch.full_like(a, b)
    return bool(torch.allclose(a, b, atol=atol))


def test_pixel_standard_standardizes_each_pixel_on_the_training_set_and_undoes_the_inversion():
    ds = data.load_dataset("digits", preprocess="pixel_standard", invert=True)
    x = ds.train_x.flatten(1)
    varies = x.std(dim=0) > 0
    assert 0 < int(varies.sum()) < x.shape[1]        # digits has pixels that are 0 in every training image
    assert x.mean(dim=0).abs().max() < 1e-4          # float32 sums of 1437 images
    assert torch_close(x.std(dim=0)[varies], 1.0)
    assert ds.augment == "none"
    plain = data.load_dataset("digits", preprocess="pixel_standard")
    assert torch_close(ds.train_x, -plain.train_x) and torch_close(ds.test_x, -plain.test_x)


def test_dry_run_prints_the_instability_lines_and_the_controls(capsys):
    from harness.study.cli import main
    assert main([STUDY, "--dry-run", "--scale", "quick"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("analysis plan"):].splitlines()[1:]
    assert any("steps 12000" in ln and "instability: the largest drop of test accuracy between consecutive "
               "evaluations" in ln for ln in lines)
    assert any("instability: evaluations with test accuracy below chance + 10 points" in ln for ln in lines)
    controls = [ln for ln in lines if "control, no difference expected" in ln]
    assert len(controls) == 5 and all("mlp_final_relu False" in ln or "preprocess pixel_standard" in ln
                                      for ln in controls)
