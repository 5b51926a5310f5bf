"""harness.trial.optim.CaffeSGD against Caffe's update computed by hand, and its wiring into build_optimizer."""

from __future__ import annotations

import pytest
import torch

from harness.config import TrialConfig
from harness.trial.models import build_model
from harness.trial.optim import CaffeSGD
from harness.trial.schedules import build_scheduler
from harness.trial.step import build_optimizer

LRS = [0.1, 0.4, 0.25, 0.05]          # a changing LR, one per step
MOMENTUM, WD = 0.9, 0.01


def caffe_by_hand(w0: float, grad_of, lr_mult: float, decay_mult: float) -> list[float]:
    """Caffe's SGDSolver in plain floats: g' = g + wd*decay_mult*w; v = m v + lr*lr_mult*g'; w -= v."""
    w, v, out = w0, 0.0, []
    for lr in LRS:
        g = grad_of(w) + WD * decay_mult * w
        v = MOMENTUM * v + lr * lr_mult * g
        w = w - v
        out.append(w)
    return out


def test_caffe_sgd_matches_the_hand_computed_caffe_update_with_lr_mult_and_decay_mult():
    weight = torch.nn.Parameter(torch.tensor([1.5], dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor([-0.5], dtype=torch.float64))
    opt = CaffeSGD([{"params": [weight]},                                   # lr_mult 1, decay_mult 1
                    {"params": [bias], "lr_mult": 2.0, "decay_mult": 0.0}],  # Caffe's conv bias
                   lr=LRS[0], momentum=MOMENTUM, weight_decay=WD)
    got_w, got_b = [], []
    for lr in LRS:
        for group in opt.param_groups:
            group["lr"] = lr  # as a scheduler does
        loss = (weight ** 2).sum() + 3.0 * bias.sum()  # dL/dw = 2w, dL/db = 3
        opt.zero_grad()
        loss.backward()
        opt.step()
        got_w.append(weight.item())
        got_b.append(bias.item())
    assert got_w == pytest.approx(caffe_by_hand(1.5, lambda w: 2 * w, 1.0, 1.0), rel=1e-12)
    assert got_b == pytest.approx(caffe_by_hand(-0.5, lambda b: 3.0, 2.0, 0.0), rel=1e-12)
    # torch's SGD (lr applied after the momentum buffer) is a different trajectory under a changing LR
    w = torch.nn.Parameter(torch.tensor([1.5], dtype=torch.float64))
    sgd = torch.optim.SGD([w], lr=LRS[0], momentum=MOMENTUM, weight_decay=WD)
    for lr in LRS:
        sgd.param_groups[0]["lr"] = lr
        sgd.zero_grad()
        (w ** 2).sum().backward()
        sgd.step()
    assert abs(w.item() - got_w[-1]) > 1e-3


def test_caffe_sgd_equals_torch_sgd_while_the_lr_is_constant():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(16, 4)
    opt_a = CaffeSGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(5):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight)


def test_build_optimizer_gives_caffe_resnets_the_prototxt_multipliers_under_a_scheduler():
    cfg = TrialConfig.from_dict({"model": "resnet20", "optimizer": "caffe_sgd", "schedule": "triangular",
                                 "base_lr": 0.1, "max_lr": 3.0, "stepsize": 10, "steps": 20, "cycle_momentum": False})
    model = build_model(cfg, 3, 10, 32)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, CaffeSGD)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {(g["lr_mult"], g["decay_mult"]): {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(groups) == {(1.0, 1.0), (2.0, 0.0), (2.0, 1.0)}
    assert groups[(2.0, 1.0)] == {"fc.bias"}
    assert groups[(2.0, 0.0)] and all(n.endswith("bias") and "bn" not in n for n in groups[(2.0, 0.0)])
    assert sum(len(g) for g in groups.values()) == len(names)
    scheduler = build_scheduler(opt, cfg)
    for _ in range(5):
        opt.step()
        scheduler.step()
    assert all(g["lr"] == pytest.approx(0.1 + 2.9 * 5 / 10) for g in opt.param_groups)  # schedule sets lr ...
    assert {g["lr_mult"] for g in opt.param_groups} == {1.0, 2.0}                      # ... lr_mult survives


def test_caffe_sgd_trains_a_trial():
    from harness.trial.loop import run_trial
    summary = run_trial(TrialConfig.from_dict({
        "dataset": "digits", "model": "small_cnn", "optimizer": "caffe_sgd", "steps": 20, "eval_every": 20,
        "batch_size": 125, "base_lr": 0.08, "max_lr": 0.8, "device": "cpu"}))
    assert summary["status"] == "completed" and summary["final_acc"] > 0.3


def test_caffe_nesterov_matches_caffes_nesterov_solver_by_hand():
    """nesterov_solver.cpp: v' = m v + lr g'; w -= (1 + m) v' - m v (here with a changing LR and weight decay)."""
    weight = torch.nn.Parameter(torch.tensor([1.5], dtype=torch.float64))
    opt = CaffeSGD([weight], lr=LRS[0], momentum=MOMENTUM, weight_decay=WD, nesterov=True)
    w, v, expected = 1.5, 0.0, []
    for lr in LRS:
        g = 2 * w + WD * w
        v_new = MOMENTUM * v + lr * g
        w, v = w - ((1 + MOMENTUM) * v_new - MOMENTUM * v), v_new
        expected.append(w)
    got = []
    for lr in LRS:
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        (weight ** 2).sum().backward()
        opt.step()
        got.append(weight.item())
    assert got == pytest.approx(expected, rel=1e-12)
    assert got != pytest.approx(caffe_by_hand(1.5, lambda x: 2 * x, 1.0, 1.0), rel=1e-6)  # not plain SGD


@pytest.mark.parametrize("optimizer, nesterov, kind", [("sgd", True, torch.optim.SGD), ("caffe_sgd", True, CaffeSGD)])
def test_nesterov_is_a_field_of_sgd_and_caffe_sgd(optimizer, nesterov, kind):
    cfg = TrialConfig.from_dict({"model": "small_cnn", "optimizer": optimizer, "nesterov": nesterov})
    opt = build_optimizer(build_model(cfg, 1, 10, 8), cfg)
    assert isinstance(opt, kind) and all(g["nesterov"] for g in opt.param_groups)


def test_nesterov_with_an_adaptive_optimizer_is_refused_in_one_line():
    from harness.config import ConfigError
    with pytest.raises(ConfigError, match="nesterov needs optimizer sgd or caffe_sgd"):
        TrialConfig.from_dict({"optimizer": "adam", "nesterov": True}).validate()


def test_adaptive_solvers_use_caffes_constants():
    """The authors' SC10 solvers set no delta, momentum2 or (AdaDelta) momentum: Caffe's defaults apply."""
    def built(name):
        cfg = TrialConfig.from_dict({"model": "small_cnn", "optimizer": name, "max_lr": 0.35})
        return build_optimizer(build_model(cfg, 1, 10, 8), cfg).param_groups[0]
    assert built("adadelta")["rho"] == 0.0 and built("adadelta")["eps"] == 1e-8
    assert built("adagrad")["eps"] == 1e-8
    assert built("adam")["betas"] == (0.9, 0.999) and built("adam")["eps"] == 1e-8
