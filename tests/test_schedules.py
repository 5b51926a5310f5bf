"""Schedules vs torch's own schedulers, vs the lr values in the authors' Caffe logs, and vs the paper's shapes."""

from __future__ import annotations

import bisect
import gzip
import io
import re

import numpy as np
import pytest
import torch

from harness.config import SCHEDULES, ConfigError, TrialConfig
from harness.trial.schedules import build_scheduler, curve, lr_momentum

try:
    from tests.paper_material import FIXTURES, LOG_EXCERPTS, caffe_logs_dir
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from paper_material import FIXTURES, LOG_EXCERPTS, caffe_logs_dir

PAPER_CLR = {"schedule": "triangular", "base_lr": 0.1, "max_lr": 3.0, "stepsize": 5000, "steps": 10000}
PAPER_PC = {"schedule": "multistep", "max_lr": 0.35, "milestones": (50000, 70000), "gamma": 0.1, "steps": 80000}
ONE_CYCLE = {"schedule": "one_cycle", "base_lr": 0.08, "max_lr": 0.8, "steps": 200, "stepsize": 90}


def cfg_of(**kw) -> TrialConfig:
    return TrialConfig.from_dict(kw)


def optimizer_for(name: str, lr: float, momentum: float = 0.9, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999))
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=name == "nesterov")


def run(optimizer, scheduler, steps: int) -> list[tuple[float, float]]:
    """(lr, momentum) at steps 0..steps-1, stepping the way the trial does."""
    out = []
    for k in range(steps):
        out.append(lr_momentum(optimizer))
        if k < steps - 1:
            optimizer.step()
            scheduler.step()
    return out


def resumed_at(make_optimizer, cfg: TrialConfig, cut: int, steps: int) -> list[tuple[float, float]]:
    """(lr, momentum) at steps cut..steps-1 after a checkpoint at step `cut`, resumed the way a fresh process does:
    build optimizer and scheduler as at the start, then load both state_dicts."""
    opt = make_optimizer()
    sched = build_scheduler(opt, cfg)
    run(opt, sched, cut)  # leaves step cut-1 in effect
    opt.step()
    sched.step()          # step `cut`: the checkpoint is taken here
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2 = make_optimizer()
    sched2 = build_scheduler(opt2, cfg)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    return run(opt2, sched2, steps - cut)


def caffe_tolerance(max_lr: float) -> dict[str, float]:
    """Caffe computes lr in float32 (its triangular policy: 1 - |k/stepsize - 2*cycle + 1|, an error of about
    one float32 ulp of 1 times max_lr, e.g. 0.00250006 for 0.0025) and prints 6 significant digits."""
    return {"rel": 2e-6, "abs": 2e-7 * max_lr}


def assert_logged(cfg: TrialConfig, logged: dict[int, float]) -> None:
    lr = curve(cfg, max(logged) + 1).lr.to_numpy()
    for step, value in logged.items():
        assert lr[step] == pytest.approx(value, **caffe_tolerance(cfg.max_lr)), f"step {step}"


# --- errors ---------------------------------------------------------------------------------------------------
def test_unknown_schedule_is_one_line_listing_allowed_names():
    opt = optimizer_for("sgd", 0.1)
    with pytest.raises(ValueError) as err:
        build_scheduler(opt, TrialConfig(schedule="onecycle"))
    msg = str(err.value)
    assert "\n" not in msg and "onecycle" in msg
    assert all(name in msg for name in SCHEDULES)


# --- constant, multistep, cosine --------------------------------------------------------------------------------
def test_constant_is_max_lr_and_leaves_momentum():
    df = curve(cfg_of(schedule="constant", max_lr=0.35, steps=50, momentum=0.8))
    assert (df.lr == 0.35).all() and (df.momentum == 0.8).all()
    assert list(df.columns) == ["step", "lr", "momentum"] and list(df.step) == list(range(50))


def test_multistep_drops_at_milestones_every_step():
    cfg = cfg_of(schedule="multistep", max_lr=0.35, milestones=[30, 70], gamma=0.1, steps=100)
    lr = curve(cfg).lr.to_numpy()
    expect = [0.35 * 0.1 ** bisect.bisect_right([30, 70], k) for k in range(100)]
    np.testing.assert_allclose(lr, expect, rtol=1e-12, atol=0)
    assert lr[29] == 0.35 and lr[30] == pytest.approx(0.035) and lr[69] == pytest.approx(0.035)
    assert lr[70] == pytest.approx(0.0035)


def test_multistep_matches_caffe_pc_lr_logs():
    # lr35Fig1a.log.gz and lr35AdamFig9.log.gz (Adam ran PC-LR from 0.0035)
    assert_logged(cfg_of(**PAPER_PC), {0: 0.35, 100: 0.35, 49900: 0.35, 50000: 0.035, 50100: 0.035,
                                        69900: 0.035, 70000: 0.0035, 70100: 0.0035, 79900: 0.0035})
    adam = cfg_of(**{**PAPER_PC, "max_lr": 0.0035, "optimizer": "adam"})
    assert_logged(adam, {0: 0.0035, 49900: 0.0035, 50000: 0.00035, 70000: 3.5e-05, 79900: 3.5e-05})


def test_multistep_is_torch_multisteplr_every_step():
    cfg = cfg_of(schedule="multistep", max_lr=0.35, milestones=[30, 70], gamma=0.1, steps=100)
    ref_opt = optimizer_for("sgd", 0.35)
    ref = run(ref_opt, torch.optim.lr_scheduler.MultiStepLR(ref_opt, [30, 70], 0.1), 100)
    assert list(curve(cfg).lr) == [lr for lr, _ in ref]


def test_cosine_is_closed_form_cosine_to_zero():
    cfg = cfg_of(schedule="cosine", max_lr=0.5, steps=300)
    lr = curve(cfg).lr.to_numpy()
    k = np.arange(300)
    np.testing.assert_allclose(lr, 0.5 * (1 + np.cos(np.pi * k / 300)) / 2, rtol=0, atol=1e-12)
    assert lr[0] == 0.5 and lr.max() == 0.5


# --- triangular (CLR) and the range test -------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_triangular_is_torch_cycliclr_every_step(opt_name):
    cfg = cfg_of(**{**PAPER_CLR, "steps": 12000}, optimizer=opt_name)  # past one cycle: it repeats
    ours = curve(cfg)
    ref_opt = optimizer_for(opt_name, 3.0)
    ref = run(ref_opt, torch.optim.lr_scheduler.CyclicLR(
        ref_opt, 0.1, 3.0, step_size_up=5000, mode="triangular", cycle_momentum=True,
        base_momentum=0.85, max_momentum=0.95), 12000)
    assert list(ours.lr) == [lr for lr, _ in ref]
    assert list(ours.momentum) == [m for _, m in ref]
    assert ours.lr[5000] == 3.0 and ours.lr[10000] == pytest.approx(0.1) and ours.lr[11000] > 0.1
    assert ours.momentum[0] == 0.95 and ours.momentum[5000] == pytest.approx(0.85)


def test_triangular_matches_caffe_clr_logs():
    # clr3SS5kFig1a.log.gz: base 0.1, max 3, stepsize 5000, max_iter 10000
    assert_logged(cfg_of(**PAPER_CLR), {0: 0.1, 100: 0.158, 200: 0.216, 2400: 1.492, 4900: 2.942, 5000: 3.0,
                                        5100: 2.942, 7400: 1.608, 7500: 1.55, 9800: 0.216, 9900: 0.158})


def test_triangular_default_stepsize_is_half_the_steps():
    lr = curve(cfg_of(schedule="triangular", base_lr=0.1, max_lr=1.0, steps=101)).lr
    assert lr.idxmax() == 50 and lr[50] == 1.0 and lr[0] == 0.1


# --- triangular2 (CLR with the amplitude halved every cycle) ------------------------------------------------------
CLR1_ARM = {"schedule": "triangular2", "base_lr": 0.001, "max_lr": 0.005, "stepsize": 2000, "steps": 25000}


def triangular2_formula(k: int, base: float, peak: float, stepsize: int) -> float:
    """Smith 2015 (arXiv 1506.01186), Section 3.1: cycle = floor(1 + k / (2 stepsize)),
    x = |k / stepsize - 2 cycle + 1|, lr = base + (max - base) * max(0, 1 - x) / 2^(cycle - 1)."""
    cycle = np.floor(1 + k / (2 * stepsize))
    x = np.abs(k / stepsize - 2 * cycle + 1)
    return base + (peak - base) * np.maximum(0, 1 - x) / 2 ** (cycle - 1)


def test_triangular2_matches_the_paper_formula_at_chosen_steps():
    lr = curve(cfg_of(**CLR1_ARM)).lr.to_numpy()
    by_hand = {0: 0.001, 1000: 0.003, 2000: 0.005, 3000: 0.003, 4000: 0.001,   # cycle 1: full amplitude 0.004
               5000: 0.002, 6000: 0.003, 8000: 0.001,                        # cycle 2: 0.002
               10000: 0.002, 14000: 0.0015, 18000: 0.00125, 22000: 0.001125,  # cycles 3-6 peak at 0.004 / 2^(c-1)
               24000: 0.001, 24999: 0.001 + 0.004 / 64 * (999 / 2000)}       # cycle 7 rises 1/64 of the way
    for k, value in by_hand.items():
        assert lr[k] == pytest.approx(value, rel=1e-12), f"step {k}"
        assert lr[k] == pytest.approx(triangular2_formula(k, 0.001, 0.005, 2000), rel=1e-12), f"step {k}"
    k = np.arange(25000)
    np.testing.assert_allclose(lr, triangular2_formula(k, 0.001, 0.005, 2000), rtol=1e-12, atol=0)
    assert lr.max() == pytest.approx(0.005, rel=1e-12) and lr.argmax() == 2000 and lr.min() == pytest.approx(0.001)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_triangular2_is_torch_cycliclr_triangular2_every_step(opt_name):
    cfg = cfg_of(schedule="triangular2", base_lr=0.1, max_lr=1.0, stepsize=20, steps=130, optimizer=opt_name)
    ours = curve(cfg)
    ref_opt = optimizer_for(opt_name, 1.0)
    ref = run(ref_opt, torch.optim.lr_scheduler.CyclicLR(
        ref_opt, 0.1, 1.0, step_size_up=20, mode="triangular2", cycle_momentum=True,
        base_momentum=0.85, max_momentum=0.95), 130)
    assert list(ours.lr) == [lr for lr, _ in ref] and list(ours.momentum) == [m for _, m in ref]
    # the momentum's swing halves with the lr's: 0.95 -> 0.85 in cycle 1, -> 0.90 in cycle 2
    assert ours.momentum[20] == pytest.approx(0.85) and ours.momentum[60] == pytest.approx(0.90)
    no_cycle = curve(cfg.replace(cycle_momentum=False, momentum=0.9))
    assert list(no_cycle.lr) == list(ours.lr) and (no_cycle.momentum == 0.9).all()


def test_triangular2_differs_from_triangular_only_after_the_first_cycle():
    kw = {"base_lr": 0.1, "max_lr": 1.0, "stepsize": 10, "steps": 60}
    tri, tri2 = curve(cfg_of(schedule="triangular", **kw)).lr, curve(cfg_of(schedule="triangular2", **kw)).lr
    assert list(tri[:21]) == list(tri2[:21])
    assert tri[30] == 1.0 and tri2[30] == pytest.approx(0.55) and tri2[50] == pytest.approx(0.325)


# --- CLR stages (restarts): the run of Smith 2015's Figure 1 / Table 1, Table 2's three triangular2 stages ---------
TABLE2 = (                     # (start step, base_lr, max_lr, stepsize)
    (0, 0.001, 0.005, 2000),
    (16000, 0.0001, 0.0005, 1000),
    (22000, 0.00001, 0.00005, 500),
)
CLR1_TABLE2 = {**CLR1_ARM, "clr_stages": [list(stage) for stage in TABLE2[1:]]}


def staged_formula(k: int, stages=TABLE2) -> float:
    """The stage in effect at step k, its triangular2 counted from its own start."""
    start, base, peak, stepsize = next(stage for stage in reversed(stages) if k >= stage[0])
    return triangular2_formula(k - start, base, peak, stepsize)


def test_table2_stages_match_the_paper_formula_at_chosen_steps():
    lr = curve(cfg_of(**CLR1_TABLE2)).lr.to_numpy()
    by_hand = {
        0: 0.001, 2000: 0.005, 6000: 0.003,        # stage 1: base, peak of cycle 1, peak of cycle 2 (half height)
        15999: 0.001 + 0.004 / 8 * 0.0005,         # cycle 4, one step before its end (x = 0.9995)
        16000: 0.0001, 17000: 0.0005,              # stage 2 restarts: its base, then its full peak a stepsize on
        19000: 0.0001 + 0.0004 / 2,                # its cycle 2 peak
        21999: 0.0001 + 0.0004 / 4 * 0.001,        # its cycle 3, one step before its end (x = 0.999)
        22000: 0.00001, 22500: 0.00005,            # stage 3: base, full peak
        23500: 0.00001 + 0.00004 / 2,              # its cycle 2 peak
        24999: 0.00001 + 0.00004 / 4 * 0.002,      # its cycle 3, the trial's last step (x = 0.998)
    }
    for k, value in by_hand.items():
        assert lr[k] == pytest.approx(value, rel=1e-12), f"step {k}"
        assert lr[k] == pytest.approx(staged_formula(k), rel=1e-12), f"step {k}"
    np.testing.assert_allclose(lr, [staged_formula(k) for k in range(25000)], rtol=1e-12, atol=0)
    # the first stage is the one-stage arm's curve up to the restart, exactly
    assert list(lr[:16000]) == list(curve(cfg_of(**CLR1_ARM), 16000).lr)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_each_stage_is_a_fresh_torch_cycliclr_every_step(opt_name):
    stages = ((0, 0.1, 1.0, 10), (45, 0.01, 0.2, 5), (70, 0.001, 0.05, 3))
    cfg = cfg_of(schedule="triangular2", base_lr=0.1, max_lr=1.0, stepsize=10, steps=90, optimizer=opt_name,
                 clr_stages=[list(stage) for stage in stages[1:]])
    ours = curve(cfg)
    ends = [stage[0] for stage in stages[1:]] + [90]
    for (start, base, peak, stepsize), end in zip(stages, ends):
        ref_opt = optimizer_for(opt_name, peak)
        ref = run(ref_opt, torch.optim.lr_scheduler.CyclicLR(
            ref_opt, base, peak, step_size_up=stepsize, mode="triangular2", cycle_momentum=True,
            base_momentum=0.85, max_momentum=0.95), end - start)
        assert list(ours.lr[start:end]) == [lr for lr, _ in ref], f"stage from {start}"
        assert list(ours.momentum[start:end]) == [m for _, m in ref], f"stage from {start}"
    assert ours.momentum[45] == 0.95 and ours.momentum[50] == pytest.approx(0.85)  # momentum restarts too
    tri = curve(cfg.replace(schedule="triangular")).lr  # triangular stages: the same restarts, no halving
    assert tri[45] == pytest.approx(0.01) and tri[50] == pytest.approx(0.2) and tri[60] == pytest.approx(0.2)


@pytest.mark.parametrize("cut", [15999, 16000, 17500, 22000, 23456])  # at, beside and between restarts
def test_staged_schedule_resumes_from_a_state_dict_as_if_uninterrupted(cut):
    cfg = cfg_of(**CLR1_TABLE2, cycle_momentum=True)
    full = curve(cfg)
    resumed = resumed_at(lambda: optimizer_for("sgd", 0.005), cfg, cut, 25000)
    assert [lr for lr, _ in resumed] == list(full.lr[cut:])
    assert [m for _, m in resumed] == list(full.momentum[cut:])


def test_lr_scale_scales_every_stage():
    plain, half = curve(cfg_of(**CLR1_TABLE2)).lr.to_numpy(), curve(cfg_of(**CLR1_TABLE2, lr_scale=0.5)).lr.to_numpy()
    np.testing.assert_allclose(half, 0.5 * plain, rtol=1e-12, atol=0)
    assert half[2000] == pytest.approx(0.0025) and half[17000] == pytest.approx(0.00025)
    assert half[22500] == pytest.approx(0.000025) and half[24999] == pytest.approx(0.5 * plain[24999])
    scaled = cfg_of(**CLR1_TABLE2, lr_scale=0.5).scaled()
    assert scaled.clr_stages == ((16000, 0.00005, 0.00025, 1000), (22000, 0.000005, 0.000025, 500))
    assert scaled.lr_scale == 1.0 and scaled.base_lr == 0.0005 and scaled.max_lr == 0.0025


def test_stages_round_trip_through_json_and_default_to_none():
    cfg = cfg_of(**CLR1_TABLE2)
    assert cfg.clr_stages == TABLE2[1:] and all(isinstance(stage, tuple) for stage in cfg.clr_stages)
    assert cfg.to_dict()["clr_stages"] == [list(stage) for stage in TABLE2[1:]]
    back = TrialConfig.from_json(cfg.to_json())
    assert back == cfg and back.clr_stages == TABLE2[1:]
    plain = cfg_of(**CLR1_ARM)
    assert plain.clr_stages == () and plain.to_dict()["clr_stages"] == []
    opt = optimizer_for("sgd", 1.0)
    assert type(build_scheduler(opt, plain)) is torch.optim.lr_scheduler.CyclicLR  # one stage: as before


@pytest.mark.parametrize("change, message", [
    ({"schedule": "one_cycle"}, "clr_stages (restarts of a cyclical schedule) need schedule triangular or "
                                "triangular2, got 'one_cycle'"),
    ({"clr_stages": [[22000, 1e-4, 5e-4, 1000], [16000, 1e-5, 5e-5, 500]]},
     "clr_stages' start steps must be increasing, > 0 and < steps (25000), got [22000, 16000]"),
    ({"clr_stages": [[16000, 1e-4, 5e-4, 1000], [16000, 1e-5, 5e-5, 500]]},
     "clr_stages' start steps must be increasing, > 0 and < steps (25000), got [16000, 16000]"),
    ({"clr_stages": [[0, 1e-4, 5e-4, 1000]]}, "clr_stages' start steps must be increasing, > 0 and < steps"),
    ({"clr_stages": [[25000, 1e-4, 5e-4, 1000]]}, "clr_stages' start steps must be increasing, > 0 and < steps"),
    ({"clr_stages": [[16000, 5e-4, 1e-4, 1000]]},
     "clr_stages[0] (from step 16000) needs 0 <= base_lr <= max_lr and max_lr > 0, got base_lr 0.0005, "
     "max_lr 0.0001"),
    ({"clr_stages": [[16000, -1e-4, 5e-4, 1000]]}, "clr_stages[0] (from step 16000) needs 0 <= base_lr <= max_lr"),
    ({"clr_stages": [[16000, 1e-4, 5e-4, 1000], [22000, 1e-5, 5e-5, 0]]},
     "clr_stages[1] (from step 22000) needs stepsize >= 1, got 0"),
    ({"clr_stages": [[16000, 1e-4, 5e-4]]},
     "clr_stages: each stage must be [start step, base_lr, max_lr, stepsize], got [16000, 0.0001, 0.0005]"),
    ({"clr_stages": [[16000.5, 1e-4, 5e-4, 1000]]},
     "clr_stages must be a list of [start step, base_lr, max_lr, stepsize] stages"),
])
def test_a_bad_stage_is_one_clear_config_error_line(change, message):
    with pytest.raises(ConfigError) as err:
        cfg_of(**{**CLR1_TABLE2, **change})
    assert "\n" not in str(err.value) and message in str(err.value)


def test_range_test_matches_caffe_logs():
    # range3Iter5kFig2b, range3Iter20kFig2b, range3Iter100kFig2b (0 -> 3), range2SS80kRes56LR (0 -> 2)
    rng = {"schedule": "range_test", "base_lr": 0.0, "max_lr": 3.0}
    assert_logged(cfg_of(**rng, steps=5000), {0: 0.0, 100: 0.0599999, 200: 0.12, 2400: 1.44, 2500: 1.5, 4900: 2.94})
    assert_logged(cfg_of(**rng, steps=20000), {100: 0.015, 4900: 0.735, 12800: 1.92, 19900: 2.985})
    assert_logged(cfg_of(**rng, steps=100000), {99900: 2.997})
    assert_logged(cfg_of(**{**rng, "max_lr": 2.0}, steps=80000), {100: 0.00250006, 42400: 1.06, 79900: 1.9975})


def test_range_test_is_linear_and_momentum_constant():
    df = curve(cfg_of(schedule="range_test", base_lr=0.0, max_lr=3.0, steps=500, momentum=0.9))
    np.testing.assert_allclose(df.lr, 3.0 * np.arange(500) / 500, rtol=0, atol=1e-12)
    assert (df.momentum == 0.9).all()


def test_every_logged_lr_in_every_caffe_log():
    """All 43 logs of ../shared when it is there, else the committed excerpts (every lr line of 4 logs)."""
    log_dir = caffe_logs_dir()
    paths = sorted(log_dir.glob("*.log.gz"))
    full = log_dir != FIXTURES / "caffe-logs"
    assert len(paths) == (43 if full else len(LOG_EXCERPTS))
    curves: dict[tuple, np.ndarray] = {}
    checked = 0
    for path in paths:
        with gzip.open(path, "rt", errors="replace") as f:
            text = f.read()
        solver = text[: text.find("Iteration ")] if "Iteration " in text else text

        def field(name, default=None, _solver=solver):
            found = re.findall(rf"^\s*{name}: (\S+)", _solver, re.MULTILINE)
            return found if name == "stepvalue" else (found[0].strip('"') if found else default)

        policy, steps, base = field("lr_policy"), int(field("max_iter")), float(field("base_lr"))
        if policy == "multistep":
            kw = {"schedule": "multistep", "max_lr": base, "gamma": float(field("gamma")),
                  "milestones": [int(v) for v in field("stepvalue")]}
        else:
            assert policy == "triangular", path.name
            size = int(field("stepsize"))
            kw = {"schedule": "range_test" if size == steps else "triangular", "base_lr": base,
                  "max_lr": float(field("max_lr")), "stepsize": size}
        key = tuple(sorted((k, str(v)) for k, v in kw.items())) + (steps,)
        if key not in curves:
            curves[key] = curve(cfg_of(**kw, steps=steps)).lr.to_numpy()
        logged = [(int(k), float(v)) for k, v in re.findall(r"Iteration (\d+), lr = (\S+)", text)]
        assert logged, path.name
        for step, value in logged:
            assert curves[key][step] == pytest.approx(value, **caffe_tolerance(kw["max_lr"])), f"{path.name} {step}"
        checked += len(logged)
    assert checked > (10000 if full else 1000)


# --- one_cycle ---------------------------------------------------------------------------------------------------
def test_one_cycle_shape_and_endpoints():
    df = curve(cfg_of(**ONE_CYCLE))
    lr, mom = df.lr.to_numpy(), df.momentum.to_numpy()
    assert len(df) == 200
    assert lr[0] == 0.08 and lr[90] == 0.8 and lr[180] == 0.08 and lr[-1] == 0.08 / 1000
    assert lr.max() == 0.8 and lr.argmax() == 90
    np.testing.assert_allclose(np.diff(lr[:91]), 0.72 / 90, rtol=1e-9)      # rise, one increment a step
    np.testing.assert_allclose(np.diff(lr[90:181]), -0.72 / 90, rtol=1e-9)   # fall
    np.testing.assert_allclose(np.diff(lr[180:]), (0.08 / 1000 - 0.08) / 19, rtol=1e-9)  # annihilation
    assert mom[0] == 0.95 and mom[90] == 0.85 and mom[180] == 0.95 and (mom[180:] == 0.95).all()
    np.testing.assert_allclose(mom[:181], 0.95 - 0.1 * (lr[:181] - 0.08) / 0.72, atol=1e-12)  # mirrors the lr


def test_one_cycle_default_stepsize_is_45_percent():
    lr = curve(cfg_of(schedule="one_cycle", base_lr=0.1, max_lr=1.0, steps=1000)).lr
    assert lr.idxmax() == 450 and lr[900] == 0.1 and lr.iloc[-1] == 0.1 / 1000


# --- caffe_1cycle: the DA author's Caffe policy (every logged value: tests/test_reference_runs.py) ----------------
CAFFE_1CYCLE = {"schedule": "caffe_1cycle", "base_lr": 0.08, "max_lr": 0.8, "stepsize": 40, "steps": 130,
                "max_momentum": 0.95, "min_momentum": 0.85}


def test_caffe_1cycle_shape_falls_to_zero_then_holds_base_over_1000():
    df = curve(cfg_of(**CAFFE_1CYCLE))
    lr, mom = df.lr.to_numpy(), df.momentum.to_numpy()
    assert lr[0] == 0.08 and lr[40] == 0.8 and lr.argmax() == 40 and lr[79] == pytest.approx(0.8 / 40)
    np.testing.assert_allclose(np.diff(lr[:41]), 0.72 / 40, rtol=1e-9)     # rise from base
    np.testing.assert_allclose(np.diff(lr[40:80]), -0.8 / 40, rtol=1e-9)   # fall towards 0, not to base
    assert (lr[80:] == 0.08 / 1000).all()                                  # then base / final_div, held
    assert mom[0] == 0.95 and mom[40] == 0.85 and mom[80] == 0.95
    np.testing.assert_allclose(mom[:81], 0.95 - 0.1 * (1 - np.abs(np.arange(81) - 40) / 40), atol=1e-12)
    np.testing.assert_allclose(mom[80:121], 0.95 - 0.05 * (1 - np.abs(np.arange(80, 121) - 120) / 40), atol=1e-12)
    assert mom[120] == pytest.approx(0.90) and mom[129] > mom[120]         # the second triangle, half as deep


def test_caffe_1cycle_differs_from_one_cycle_after_the_peak():
    caffe = curve(cfg_of(**CAFFE_1CYCLE)).lr
    ours = curve(cfg_of(**{**CAFFE_1CYCLE, "schedule": "one_cycle"})).lr
    assert (caffe[:41] == ours[:41]).all() and (caffe[41:80] < ours[41:80]).all()
    assert ours[80] == 0.08 and caffe[80] == 0.08 / 1000


def test_caffe_1cycle_final_div_and_default_stepsize():
    lr = curve(cfg_of(schedule="caffe_1cycle", base_lr=0.1, max_lr=1.0, steps=1000, final_div=25)).lr
    assert lr.idxmax() == 450 and lr[899] == pytest.approx(1.0 / 450) and lr[900] == 0.1 / 25


@pytest.mark.parametrize("cut", [10, 40, 55, 79, 80, 100])
def test_caffe_1cycle_resumes_mid_cycle_from_a_state_dict(cut):
    from harness.trial.optim import CaffeSGD
    cfg = cfg_of(**CAFFE_1CYCLE, optimizer="caffe_sgd", nesterov=True)
    full = curve(cfg)
    resumed = resumed_at(lambda: CaffeSGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9, nesterov=True),
                         cfg, cut, 130)
    assert [lr for lr, _ in resumed] == list(full.lr[cut:])
    assert [m for _, m in resumed] == list(full.momentum[cut:])


@pytest.mark.parametrize("base,peak,steps,stepsize", [(0.08, 0.8, 200, 90), (0.1, 3.0, 1000, 450),
                                                     (0.1, 1.0, 37, 10), (0.08, 0.8, 2000, 999)])
def test_one_cycle_vs_torch_onecyclelr_three_phase(base, peak, steps, stepsize):
    ours = curve(cfg_of(schedule="one_cycle", base_lr=base, max_lr=peak, steps=steps, stepsize=stepsize))
    ref_opt = optimizer_for("sgd", peak)
    ref = np.array(run(ref_opt, torch.optim.lr_scheduler.OneCycleLR(
        ref_opt, max_lr=peak, total_steps=steps, pct_start=stepsize / steps, div_factor=peak / base,
        final_div_factor=1000, three_phase=True, anneal_strategy="linear",
        base_momentum=0.85, max_momentum=0.95), steps))
    d_lr, d_mom = np.abs(ours.lr.to_numpy() - ref[:, 0]), np.abs(ours.momentum.to_numpy() - ref[:, 1])
    inc, mom_inc = (peak - base) / stepsize, 0.1 / stepsize
    # equal at the start, the end, and through the annihilation's last stretch
    assert ours.lr[0] == pytest.approx(ref[0, 0], rel=1e-15) and d_mom[0] == 0
    assert ours.lr.iloc[-1] == pytest.approx(ref[-1, 0], rel=1e-12) and d_mom[-1] == 0
    # torch peaks at stepsize-1 (ours at stepsize): the rise differs by at most one of our increments ...
    assert d_lr[:stepsize].max() <= inc * (1 + 1e-9) and d_lr[stepsize - 1] == pytest.approx(inc)
    # ... and it is back at base at 2*stepsize-2 (ours at 2*stepsize): two increments there, never more
    cycle = d_lr[: 2 * stepsize - 1]
    assert cycle.max() == pytest.approx(2 * inc) and cycle.argmax() == 2 * stepsize - 2
    assert cycle.max() <= 2 * inc * (1 + 1e-9)
    assert d_mom.max() == pytest.approx(2 * mom_inc) and d_mom.max() <= 2 * mom_inc * (1 + 1e-9)
    # its annihilation so starts 2 steps earlier (N+2 steps for our N): at most 2 of its increments apart
    n, drop = steps - 1 - 2 * stepsize, base - base / 1000
    assert d_lr[2 * stepsize:].max() == pytest.approx(2 * drop / (n + 2)) and d_lr[2 * stepsize:].argmax() == 0
    assert d_lr.max() <= 2 * max(inc, drop / (n + 2)) * (1 + 1e-9)
    assert ref[stepsize - 1, 0] == pytest.approx(peak) and ours.lr[stepsize] == peak


# --- one_cycle_cos -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stepsize,pct", [(None, 0.25), (60, 0.3)])
def test_one_cycle_cos_is_torch_onecyclelr_cos(stepsize, pct):
    cfg = cfg_of(schedule="one_cycle_cos", base_lr=0.04, max_lr=1.0, steps=200, stepsize=stepsize,
                 optimizer="adam")
    ours = curve(cfg)
    ref_opt = optimizer_for("adam", 1.0)
    ref = run(ref_opt, torch.optim.lr_scheduler.OneCycleLR(
        ref_opt, max_lr=1.0, total_steps=200, pct_start=pct, div_factor=25.0, final_div_factor=1000,
        anneal_strategy="cos", base_momentum=0.85, max_momentum=0.95), 200)
    assert list(ours.lr) == [lr for lr, _ in ref] and list(ours.momentum) == [m for _, m in ref]
    assert ours.lr.idxmax() == int(pct * 200) - 1 and ours.lr.max() == 1.0
    assert ours.lr.iloc[-1] == pytest.approx(0.04 / 1000) and ours.momentum.iloc[-1] == pytest.approx(0.95)


# --- momentum --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["triangular", "triangular2", "one_cycle", "one_cycle_cos"])
@pytest.mark.parametrize("opt_name", ["sgd", "nesterov", "adam"])
def test_momentum_cycles_in_every_group_for_sgd_and_adam_beta1(schedule, opt_name):
    cfg = cfg_of(schedule=schedule, base_lr=0.1, max_lr=1.0, steps=100, optimizer="sgd" if opt_name == "nesterov"
                 else opt_name, nesterov=opt_name == "nesterov")
    opt = optimizer_for(opt_name, 1.0, momentum=0.9, groups=2)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(99):
        moms = [g["betas"][0] if opt_name == "adam" else g["momentum"] for g in opt.param_groups]
        assert moms[0] == moms[1] and len({g["lr"] for g in opt.param_groups}) == 1
        if opt_name == "adam":
            assert all(g["betas"][1] == 0.999 for g in opt.param_groups)
        seen.append(moms[0])
        opt.step()
        sched.step()
    assert seen[0] == 0.95 and min(seen) == pytest.approx(0.85, abs=0.01)
    assert list(curve(cfg).momentum[:99]) == seen


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_momentum_stays_put_when_not_cycled(schedule):
    base = {"schedule": schedule, "base_lr": 0.1, "max_lr": 1.0, "steps": 100, "momentum": 0.8, "milestones": [50]}
    for opt_name in ("sgd", "adam"):
        df = curve(cfg_of(**base, optimizer=opt_name, cycle_momentum=False))
        assert (df.momentum == 0.8).all()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("opt_name", ["adagrad", "adadelta"])
def test_optimizers_without_momentum_get_the_same_lr_and_no_momentum(schedule, opt_name):
    kw = {"schedule": schedule, "base_lr": 0.1, "max_lr": 1.0, "steps": 100, "milestones": [50]}
    df = curve(cfg_of(**kw, optimizer=opt_name))
    assert df.momentum.isna().all()
    assert list(df.lr) == list(curve(cfg_of(**kw, optimizer="sgd")).lr)


# --- conventions over all schedules -----------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_max_lr_is_the_peak_and_step0_is_set_at_construction(schedule):
    cfg = cfg_of(schedule=schedule, base_lr=0.1, max_lr=1.0, steps=100, milestones=[50])
    df = curve(cfg)
    opt = optimizer_for("sgd", 123.0)  # whatever lr the optimizer had, construction sets step 0's
    build_scheduler(opt, cfg)
    assert lr_momentum(opt) == (df.lr[0], df.momentum[0])
    assert df.lr.max() <= 1.0
    if schedule == "range_test":
        assert df.lr.iloc[-1] == pytest.approx(1.0 - 0.9 / 100)  # Caffe: max_lr would be step `steps`
    else:
        assert df.lr.max() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7])
def test_tiny_runs_work(schedule, steps):
    df = curve(cfg_of(schedule=schedule, base_lr=0.1, max_lr=1.0, steps=steps, milestones=[1]))
    assert len(df) == steps and np.isfinite(df.lr).all() and (df.lr <= 1.0).all() and (df.lr > 0).all()


# --- checkpointing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_state_dict_round_trip_resumes_the_same_values(schedule, opt_name):
    cfg = cfg_of(schedule=schedule, base_lr=0.1, max_lr=1.0, steps=120, milestones=[30, 80], stepsize=25,
                 optimizer=opt_name)
    full = curve(cfg)
    opt = optimizer_for(opt_name, 1.0)
    sched = build_scheduler(opt, cfg)
    run(opt, sched, 61)  # leaves step 60 in effect
    opt.step()
    sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    # resume in a fresh process's way: build as at the start, then load both states
    opt2 = optimizer_for(opt_name, 1.0)
    sched2 = build_scheduler(opt2, cfg)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    resumed = run(opt2, sched2, 59)  # steps 61..119
    assert [lr for lr, _ in resumed] == list(full.lr[61:])
    assert np.array_equal([m for _, m in resumed], full.momentum[61:].to_numpy(), equal_nan=True)


@pytest.mark.parametrize("schedule", ["one_cycle", "triangular", "multistep"])
def test_curve_of_a_caffe_sgd_trial_is_the_sgd_curve(schedule):
    """The schedule does not depend on where the LR enters the update: caffe_sgd trials get the same LR and
    momentum per step as sgd trials (the report draws them from curve())."""
    kw = dict(schedule=schedule, base_lr=0.1, max_lr=1.0, steps=60, stepsize=20, milestones=(30, 50), lr_scale=0.5)
    caffe = curve(TrialConfig(optimizer="caffe_sgd", **kw))
    sgd = curve(TrialConfig(optimizer="sgd", **kw))
    assert len(caffe) == 60 and caffe["momentum"].notna().all()
    assert np.allclose(caffe[["lr", "momentum"]].to_numpy(), sgd[["lr", "momentum"]].to_numpy())
    assert caffe["lr"].max() == pytest.approx(0.5)    # lr_scale applied
