"""activation_mystery (issue 18): x*x*c activations, the seed's loop (gradients never zeroed) and metric (accuracy on
the batch just stepped on), the plan's `at_best` / `best_lr`, and the report's best-LR table from a real sqlite
MLflow store written through the harness's own writers. No Ray; no MLflow server."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from real_path_store import SYSTEM, _record
from synthetic_store import summary

from harness import plan
from harness import spec as specs
from harness.analysis import claims
from harness.analysis.results import load_study
from harness.config import ConfigError, TrialConfig
from harness.report.best_lr import best_lr_section, draw_accuracy_vs_lr, square_factor
from harness.study import cli, tracking
from harness.trial.loop import run_trial
from harness.trial.models import Square, Square400, mlp
from harness.trial.step import prepare, train_step

TINY = {"dataset": "digits", "model": "mlp", "mlp_hidden": [16], "preprocess": "none", "optimizer": "sgd",
        "momentum": 0.0, "weight_decay": 0.0, "batch_size": 50, "schedule": "constant", "max_lr": 0.05,
        "steps": 2, "eval_every": 2, "device": "cpu", "precision": "fp32"}


# ------------------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("name, c", [("square1", 1.0), ("square20", 20.0), ("square400", 400.0)])
def test_square_c_is_x_times_x_times_c(name, c):
    x = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0])
    act = mlp(4, (3,), activation=name)[2]
    assert isinstance(act, Square) and act.factor == c and square_factor(name) == c
    torch.testing.assert_close(act(x), c * x * x)
    assert type(mlp(4, (3,), activation="square400")[2]) is Square400   # the seed's class, as before
    assert square_factor("relu") is None


def test_zero_grad_is_left_out_of_trial_keys_at_its_default():
    trial = specs.Trial("s", "quick", 1, TrialConfig.from_dict(TINY), ("seed",))
    never = specs.Trial("s", "quick", 1, TrialConfig.from_dict({**TINY, "zero_grad": False}), ("seed",))
    assert "zero_grad" in specs.LATE_FIELDS and trial.key != never.key
    # the key of a config written before zero_grad existed: the earlier late fields at their defaults left out too
    before = {k: v for k, v in trial.config.to_dict().items()
              if k != "zero_grad" and not (k in specs.LATE_FIELDS and v == specs.LATE_FIELDS[k])}
    assert trial.key == hashlib.sha1(json.dumps(["s", "quick", 1, before], sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ the step
def _by_hand(cfg: TrialConfig, accumulate: bool) -> list[torch.Tensor]:
    """Two SGD steps on the trial's first two batches written out: w1 = w0 - lr g(w0; b0), then
    w2 = w1 - lr (g(w1; b1) + g(w0; b0) if the gradients accumulate else g(w1; b1))."""
    s = prepare(cfg)
    params = [p.detach().clone().requires_grad_(True) for p in s.model.parameters()]
    net = copy.deepcopy(s.model)

    def grads(ws, x, y):
        for p, w in zip(net.parameters(), ws, strict=True):
            p.data.copy_(w)
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        return [p.grad.detach().clone() for p in net.parameters()]

    lr = cfg.max_lr
    g0 = grads(params, *s.batches.get(0))
    w1 = [w.detach() - lr * g for w, g in zip(params, g0, strict=True)]
    g1 = grads(w1, *s.batches.get(1))
    step2 = [a + b for a, b in zip(g0, g1, strict=True)] if accumulate else g1
    return [w - lr * g for w, g in zip(w1, step2, strict=True)]


@pytest.mark.parametrize("zero_grad", [True, False])
def test_zero_grad_false_accumulates_every_gradient_so_far(zero_grad):
    cfg = TrialConfig.from_dict({**TINY, "zero_grad": zero_grad})
    s = prepare(cfg)
    for k in range(2):
        train_step(s, *s.batches.get(k))
    got = [p.detach() for p in s.model.parameters()]
    for w, want in zip(got, _by_hand(cfg, accumulate=not zero_grad), strict=True):
        torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-6)
    other = _by_hand(cfg, accumulate=zero_grad)   # the other loop's weights differ: the check can fail
    assert any(not torch.allclose(w, o, atol=1e-6) for w, o in zip(got, other, strict=True))


def test_train_batch_acc_is_the_accuracy_of_the_batch_just_stepped_on(monkeypatch):
    cfg = TrialConfig.from_dict({**TINY, "mlp_activation": "square20", "max_lr": 0.5})
    s = prepare(cfg)
    x, y = s.batches.get(0)
    with torch.no_grad():
        before = (s.model(x).argmax(1) == y).float().mean().item()   # the step's own forward: before its update
    train_step(s, x, y)
    with torch.no_grad():
        after = (s.model(x).argmax(1) == y).float().mean().item()
    assert s.batch_acc.item() == pytest.approx(before) and before != after
    # run_trial reports it at each evaluation: the last step's batch (batch 1 of a 2-step trial)
    out = run_trial(cfg)
    s2 = prepare(cfg)
    train_step(s2, *s2.batches.get(0))
    x1, y1 = s2.batches.get(1)
    with torch.no_grad():
        want = (s2.model(x1).argmax(1) == y1).float().mean().item()
    assert out["history"][-1]["train_batch_acc"] == pytest.approx(want)


def test_finder_val_needs_a_held_out_training_split():
    with pytest.raises(ConfigError, match="finder_val scores held-out training images: set val_size"):
        TrialConfig.from_dict({**TINY, "kind": "lr_finder", "base_lr": 1e-4, "max_lr": 1.0, "finder_val": True})
    assert TrialConfig.from_dict({**TINY, "kind": "lr_finder", "base_lr": 1e-4, "max_lr": 1.0, "finder_val": True,
                                  "val_size": 100}).val_size == 100


# ------------------------------------------------------------------------------------------------ the plan
def test_dry_run_lists_three_square_factors_and_one_line_per_factor_comparison(capsys):
    assert cli.main(["activation_mystery", "--dry-run", "--scale", "quick"]) == 0
    out = capsys.readouterr().out
    configs = [t.config for t in specs.trials(specs.load_spec("activation_mystery"), "quick")]
    assert {c.mlp_activation for c in configs} >= {"square1", "square20", "square400", "relu"}
    for c in ("square1", "square20", "square400"):
        line = [ln for ln in out.splitlines() if f"mlp_activation={c} vs mlp_activation=relu" in ln
                and "each arm at its own best max_lr" in ln]
        assert len(line) == 1 and "AlgoPerf would not" in line[0] and "n=3 per arm" in line[0], out
    seed = [ln for ln in out.splitlines() if "square400 vs mlp_activation=relu, trials with max_lr 0.001" in ln]
    assert len(seed) == 1 and "best" not in seed[0]
    assert sum("zero_grad=False vs zero_grad=True" in ln for ln in out.splitlines()) == 2
    assert sum(c.zero_grad is False for c in configs) == 6   # square400 and ReLU at 0.001, 3 seeds each


def _analysis(**extra) -> dict:
    return {"comparisons": [{"claim": "question", "kind": "two_arm", "field": "mlp_activation", "a": "square20",
                             "b": "relu", **extra}]}


@pytest.mark.parametrize("analysis, message", [
    (_analysis(at_best="max_lrr"), "at_best must be a trial field other than the compared one, on kind two_arm"),
    ({**_analysis(), "comparisons": [{**_analysis()["comparisons"][0], "kind": "trend", "at_best": "max_lr"}]},
     "on kind two_arm"),
    ({**_analysis(), "best_lr": {"field": "mlp_activaton"}}, "analysis.best_lr: field must be a trial field other "
                                                              "than max_lr (did you mean 'mlp_activation'?)"),
    ({**_analysis(), "best_lr": {"field": "mlp_activation", "where": {"zero_grads": True}}},
     "analysis.best_lr: where: 'zero_grads' is not a trial field"),
])
def test_bad_at_best_and_best_lr_are_one_line(analysis, message):
    with pytest.raises(plan.PlanError, match=re.escape(message)) as e:
        plan.validate(analysis, "x.yaml", specs.FIELDS, specs.KNOWN_CLAIMS)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ the report
BEST = {"square1": 0.1, "square20": 0.01, "square400": 0.0001, "relu": 0.1}   # the smoke grid's designed best LRs
BATCH_ACC = {("square400", False): 0.94, ("square400", True): 0.61, ("relu", False): 0.71, ("relu", True): 0.33}


def _acc(config: dict) -> float:
    if config["lr_from_finder"]:
        return 0.5
    if not config["zero_grad"]:
        return 0.4
    return 0.9 if config["max_lr"] == BEST[config["mlp_activation"]] else 0.6


def _write_smoke(uri: str) -> str:
    """activation_mystery's smoke trials through start_study_run + TrialLogger, with designed outcomes."""
    spec = specs.load_spec("activation_mystery")
    trials = specs.trials(spec, "smoke")
    parent = tracking.start_study_run(uri, specs.at_scale(spec, "smoke"), "smoke", "/t/am", "python -m harness.study",
                                      {"CPU": 2.0}, "test", resume=False)
    exp = tracking.experiment_id(uri, "activation_mystery")
    for t in trials:
        c = t.config.to_dict()
        records = [_record(c, 10, 0.3), _record(c, 20, _acc(c))]
        for r in records:
            r["train_batch_acc"] = BATCH_ACC.get((c["mlp_activation"], c["zero_grad"]), 0.5) - 0.1 * (r["step"] < 20)
        logger = tracking.TrialLogger(uri, experiment_id=exp, parent_run_id=parent, trial=t, grace_s=5)
        logger.start(t.workers, SYSTEM)
        for r in records:
            logger.log_eval(r)
        assert logger.finish(summary(c, records, "completed"), records)
    assert tracking.end_study_run(uri, parent, "FINISHED")
    return parent


def test_best_lr_table_and_seed_settings_come_from_the_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = _write_smoke(uri)
    res = load_study("activation_mystery", uri, run=parent)
    section = best_lr_section(res, specs.load_spec("activation_mystery")["analysis"], "smoke")
    table = section.table.set_index("level")
    assert list(section.table["level"]) == ["square1", "square20", "square400", "relu"]   # by c, then the rest
    assert table["best_lr"].to_dict() == BEST
    assert table.loc["square20", "predicted"] == pytest.approx(0.1 / 20)
    assert table.loc["square20", "ratio"] == pytest.approx(0.01 / 0.005)
    assert table.loc["square400", "ratio"] == pytest.approx(1e-4 / (0.1 / 400))
    assert math.isnan(table.loc["relu", "predicted"]) and table.loc["relu", "best_acc"] == pytest.approx(0.9)
    want = np.polyfit(np.log10([1, 20, 400]), np.log10([0.1, 0.01, 1e-4]), 1)[0]
    assert section.exponent == pytest.approx(want)
    assert set(section.points["run_id"]) <= set(res.trials["run_id"]) and len(section.points) == 8  # grid only
    seed = section.seed_table.set_index(["level", "loop"])
    assert len(seed) == 4 and set(seed["max_lr"]) == {0.001}
    for (act, zero), acc in BATCH_ACC.items():
        row = seed.loc[(act, "zeroed each step" if zero else "never zeroed (the seed's listing)")]
        assert row["train_batch_acc"] == pytest.approx(acc)           # the last step's, not the first's
        assert row["test_acc"] == pytest.approx(_acc({"lr_from_finder": None, "zero_grad": zero, "max_lr": 0.001,
                                                      "mlp_activation": act}))
    assert section.finders == []   # no finder study in this store: no figure, no error
    fig = Figure(figsize=(9, 3.4))
    draw_accuracy_vs_lr(fig, (0, 0, 1, 1), section)
    medians = [ln for ln in fig.axes[0].get_lines() if str(ln.get_label()).endswith("(median)")]
    assert len(medians) == 4 and len({str(ln.get_color()) for ln in medians}) == 4
    assert len({str(ln.get_linestyle()) for ln in medians}) == 4 and fig.axes[0].get_xscale() == "log"
    # the verdicts: the fair comparisons read each arm at its own best LR
    ev = claims.verdicts(res)
    fair = [v for v in ev.verdicts if "each arm at its own best max_lr" in v.planned]
    assert len(fair) == 3 and all("at each arm's best max_lr (test data): max_lr=" in v.measured for v in fair)
    assert all(v.median_b == pytest.approx(0.9) for v in fair)   # ReLU at 0.1, not at 0.001 (0.6)
