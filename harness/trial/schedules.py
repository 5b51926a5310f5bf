"""Learning rate and momentum per optimizer step, as torch LR schedulers.

The trial builds its optimizer with lr=cfg.max_lr and momentum (Adam: beta1) cfg.momentum, then
`build_scheduler(optimizer, cfg)`, and per optimizer step calls `optimizer.step(); scheduler.step()`.
After construction the param groups hold step 0's lr/momentum; after k scheduler steps, step k's.

Peak convention: `max_lr` is the largest lr of every schedule; `base_lr` is the floor of the cyclic ones.

- constant:      max_lr throughout.
- multistep:     PC-LR, max_lr x gamma at each milestone (torch MultiStepLR; Caffe "multistep").
- triangular:    Caffe CLR, base -> max over `stepsize` steps and back, repeating (torch CyclicLR).
- triangular2:   the same, with the amplitude halved every cycle (Smith 2015, arXiv 1506.01186, Section 3.1;
                 torch CyclicLR mode "triangular2"): lr = base + (max - base) * max(0, 1 - |x|) / 2^(cycle - 1),
                 cycle = floor(1 + k / (2 stepsize)), x = k / stepsize - 2 cycle + 1. Default stepsize: steps/2.
  with cfg.clr_stages (triangular and triangular2): restarts, as the run of Smith 2015's Figure 1 (Table 2):
                 the cycle above from step 0, then at each stage's start step a fresh CyclicLR with that
                 stage's (base_lr, max_lr, stepsize), counted from its start (k - start in the formula),
                 chained by torch SequentialLR (milestones = the start steps).
- one_cycle:     Smith's 1cycle, exactly: base -> max at step=stepsize -> base at 2*stepsize, then linear
                 annihilation to base/final_div at the last step (our `OneCycle`, see why there).
- caffe_1cycle:  the disciplined-approach author's Caffe `lr_policy: "1cycle"` as his logs (da-logs/) print it:
                 base -> max over `stepsize`, max -> 0 over the next (lr = max (2s - k) / s), then base/final_div
                 from k = 2s on (final_div 1000 in his Caffe); momentum max -> min -> max, then a second triangle
                 of half the depth (our `CaffeOneCycle`, see there).
- one_cycle_cos: the fastai/torch shape, torch OneCycleLR(anneal_strategy="cos"), rise over `stepsize`
                 (stepsize None: 25% of steps, fastai's default pct_start), then cosine down to
                 base/final_div.
- cosine:        torch CosineAnnealingLR from max_lr to 0 over `steps`.
- range_test:    Caffe "triangular" with stepsize = max_iter: lr = base + (max - base) * k / steps, as in the
                 authors' range-test logs (so the last step runs at max - (max-base)/steps; max_lr itself
                 would be step `steps`). A given `stepsize` replaces `steps` there.
Momentum cycles max_momentum -> min_momentum -> max_momentum, mirroring the lr, for one_cycle, caffe_1cycle,
one_cycle_cos, triangular and triangular2 (whose momentum swing halves with the lr's) when cfg.cycle_momentum;
optimizers without momentum (adagrad, adadelta) are silently not cycled. Otherwise momentum is left at what
the optimizer was built with (cfg.momentum).

Resuming: build optimizer and scheduler as at the start, then load the optimizer's state_dict and the
scheduler's (MultiStepLR and CosineAnnealingLR compute each lr from the previous one held in the optimizer).
SequentialLR's state_dict holds its step and each stage's, so a resumed staged schedule is the same per step.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch.optim import lr_scheduler

from harness.config import SCHEDULES, TrialConfig

MOMENTUM_CYCLING = ("triangular", "triangular2", "one_cycle", "one_cycle_cos", "caffe_1cycle")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrialConfig) -> lr_scheduler.LRScheduler:
    """The scheduler for cfg.schedule; step it once per optimizer step."""
    name = cfg.schedule
    if name not in SCHEDULES:
        raise ValueError(f"schedule '{name}' is not known; allowed: {', '.join(SCHEDULES)}")
    cycle = cfg.cycle_momentum and name in MOMENTUM_CYCLING and _has_momentum(optimizer)
    moms = {"base_momentum": cfg.min_momentum, "max_momentum": cfg.max_momentum}
    _set_lr(optimizer, cfg.max_lr)
    if name == "constant":
        return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if name == "multistep":
        return lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    if name == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps, eta_min=0.0)
    if name in ("triangular", "triangular2", "range_test"):
        default = cfg.steps if name == "range_test" else max(1, cfg.steps // 2)
        mode = "triangular2" if name == "triangular2" else "triangular"
        stages = [(0, cfg.base_lr, cfg.max_lr, cfg.stepsize or default), *cfg.clr_stages]
        cyclic = [lr_scheduler.CyclicLR(optimizer, base_lr=base, max_lr=peak, step_size_up=stepsize, mode=mode,
                                        cycle_momentum=cycle, **moms)
                  for _, base, peak, stepsize in stages]
        if len(cyclic) == 1:
            return cyclic[0]
        return staged(optimizer, cyclic, [start for start, *_ in cfg.clr_stages])
    if name == "one_cycle":
        stepsize = cfg.stepsize or max(1, int(0.45 * cfg.steps))
        return OneCycle(optimizer, cfg.base_lr, cfg.max_lr, stepsize, cfg.steps, cfg.final_div,
                        (cfg.min_momentum, cfg.max_momentum) if cycle else None)
    if name == "caffe_1cycle":
        return CaffeOneCycle(optimizer, cfg.base_lr, cfg.max_lr, cfg.stepsize or max(1, int(0.45 * cfg.steps)),
                             cfg.final_div, (cfg.min_momentum, cfg.max_momentum) if cycle else None)
    # one_cycle_cos. torch divides by pct*total - 1: keep the rise >= 2 steps (only matters for steps < 8)
    total = max(cfg.steps, 2)
    pct = min(max(cfg.stepsize / total if cfg.stepsize else 0.25, 2.0 / total), 1.0)
    return lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.max_lr, total_steps=total, pct_start=pct,
                                   div_factor=cfg.max_lr / cfg.base_lr if cfg.base_lr > 0 else math.inf,
                                   final_div_factor=cfg.final_div, anneal_strategy="cos",
                                   cycle_momentum=cycle, **moms)


def staged(optimizer: torch.optim.Optimizer, schedulers: list[lr_scheduler.LRScheduler],
           starts: list[int]) -> lr_scheduler.SequentialLR:
    """schedulers[0] from step 0, schedulers[i] restarted at step starts[i-1] (its own step 0 there).

    torch's SequentialLR is exactly this for CyclicLR stages (checked per step against each stage's own CyclicLR
    and through state_dict round trips in tests/test_schedules.py): each CyclicLR sets the optimizer's lr (and
    momentum) to its own step 0 when built, but SequentialLR then undoes the later stages' initial steps and
    redoes the first's, so step 0 is stage 0's; at a start step it sets that stage's step to 0 (`_update_lr(0)`,
    since torch 2.9 without the old `step(0)` deprecation warning) and steps it from there, and CyclicLR computes
    each lr from its own step alone, never from the optimizer's current lr. Its state_dict holds its own step and
    every stage's state."""
    return lr_scheduler.SequentialLR(optimizer, schedulers, milestones=list(starts))


class OneCycle(lr_scheduler.LRScheduler):
    """Smith's 1cycle with linear phases, as the paper describes it (step k = 0 .. steps-1):

    lr rises base -> max over k in [0, stepsize] (max exactly at k = stepsize), falls back to base at
    k = 2*stepsize, then falls linearly to base/final_div at k = steps-1 and stays there. With
    momentum=(min_m, max_m) the momentum mirrors it: max_m -> min_m -> max_m, then max_m.

    Why not torch's OneCycleLR(three_phase=True, anneal_strategy="linear"): its phases end at
    pct*total - 1 and 2*pct*total - 2, so its peak comes one step before `stepsize` and its return to
    base two steps before 2*stepsize; it is otherwise the same curve (compared in tests).
    """

    def __init__(self, optimizer, base_lr: float, max_lr: float, stepsize: int, steps: int,
                 final_div: float, momentum: tuple[float, float] | None = None):
        self.lr_range = (base_lr, max_lr)
        self.stepsize, self.total_steps, self.final_div = stepsize, steps, final_div
        self.momentum_range = momentum
        super().__init__(optimizer)

    def point(self, k: int) -> tuple[float, float]:
        """(lr, t) at step k; t in [0, 1] is how far up the triangle (0 at base, 1 at max)."""
        base, peak = self.lr_range
        s = self.stepsize
        if k <= 2 * s:
            t = k / s if k <= s else (2 * s - k) / s
            return base * (1 - t) + peak * t, t  # this form is exact at both ends
        frac = min(1.0, (k - 2 * s) / (self.total_steps - 1 - 2 * s))
        return base * (1 - frac) + base / self.final_div * frac, 0.0

    def get_lr(self) -> list[float]:
        lr, t = self.point(self.last_epoch)
        if self.momentum_range is not None:
            low, high = self.momentum_range
            _set_momentum(self.optimizer, high * (1 - t) + low * t)
        return [lr for _ in self.optimizer.param_groups]


class CaffeOneCycle(lr_scheduler.LRScheduler):
    """The DA author's Caffe `lr_policy: "1cycle"` (Smith, arXiv 1803.09820), step k = Caffe's iteration k:

        k <  s:       lr = base + (max - base) k / s      (max exactly at k = s)
        s <= k < 2s:  lr = max (2s - k) / s               (down to about 0, not to base)
        k >= 2s:      lr = base / final_div               (his Caffe: base_lr / 1000, no solver field)

    With momentum=(min_m, max_m) (his `momentum` is max_m, the first `cyclical_momentum` min_m) the momentum is
    a triangular2 wave of period 2s, cycle c = floor(1 + k / 2s), x = |k / s - 2c + 1|:

        momentum = max_m - (max_m - min_m) max(0, 1 - x) / 2^(c - 1)

    max_m -> min_m over the rise, back to max_m at 2s, then a triangle of half the depth. Read off every display
    line of the 7 logs in da-logs/ (tests/test_reference_runs.py): the C100 ResNet-56 log prints 0.850498 at 3400
    and 0.852429 at 3500 with s = 3417, and 0.949034, 0.947571 at 6900, 7000 (2s = 6834): the half slope. The logs
    end before 3s, so past it (the half triangle's way back up) is the formula's, not a log's. The logs'
    momentum stepsize (the second `cyclical_momentum`) always equals the LR's `stepsize`, which this uses.

    Why not torch: OneCycleLR (and our OneCycle) fall back to base and anneal below it; CyclicLR cannot fall to 0
    nor hold a floor; a SequentialLR of LinearLRs would compute each lr from the previous one (rounding drifts,
    and LinearLR cannot end at exactly 0). Each value here is a closed form of k, so a state_dict (last_epoch)
    resumes it exactly.
    """

    def __init__(self, optimizer, base_lr: float, max_lr: float, stepsize: int, final_div: float,
                 momentum: tuple[float, float] | None = None):
        self.lr_range, self.stepsize, self.final_div = (base_lr, max_lr), stepsize, final_div
        self.momentum_range = momentum
        super().__init__(optimizer)

    def lr_at(self, k: int) -> float:
        base, peak = self.lr_range
        s = self.stepsize
        if k < s:
            t = k / s
            return base * (1 - t) + peak * t
        return peak * (2 * s - k) / s if k < 2 * s else base / self.final_div

    def depth_at(self, k: int) -> float:
        """How far the momentum is from max_m towards min_m at step k, in [0, 1] (triangular2)."""
        s = self.stepsize
        cycle = math.floor(1 + k / (2 * s))
        return max(0.0, 1 - abs(k / s - 2 * cycle + 1)) / 2 ** (cycle - 1)

    def get_lr(self) -> list[float]:
        k = self.last_epoch
        if self.momentum_range is not None:
            low, high = self.momentum_range
            t = self.depth_at(k)
            _set_momentum(self.optimizer, high * (1 - t) + low * t)
        return [self.lr_at(k) for _ in self.optimizer.param_groups]


def curve(cfg: TrialConfig, steps: int | None = None) -> pd.DataFrame:
    """Columns step, lr, momentum: the values in effect at optimizer steps 0 .. steps-1 (default cfg.steps).

    Runs build_scheduler on a one-parameter optimizer of cfg.optimizer's type; momentum is NaN for
    optimizers without one. The schedule is cfg's; `steps` only sets how many steps are recorded
    (one_cycle_cos cannot go past cfg.steps).
    """
    n = cfg.steps if steps is None else steps
    cfg = cfg.scaled()  # the LRs the trainer runs (the study's lr_scale applied)
    optimizer = _dummy_optimizer(cfg)
    scheduler = build_scheduler(optimizer, cfg)
    optimizer.step()  # no gradients, so a no-op; keeps torch from warning about the step order
    rows = []
    for k in range(n):
        rows.append((k, *lr_momentum(optimizer)))
        if k < n - 1:
            scheduler.step()
    return pd.DataFrame(rows, columns=["step", "lr", "momentum"])


def lr_momentum(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(lr, momentum) of the first param group; momentum is Adam's beta1, NaN where there is none."""
    group = optimizer.param_groups[0]
    if "betas" in group:
        return float(group["lr"]), float(group["betas"][0])
    return float(group["lr"]), float(group.get("momentum", math.nan))


def _has_momentum(optimizer: torch.optim.Optimizer) -> bool:
    return "momentum" in optimizer.defaults or "betas" in optimizer.defaults


def _set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (momentum, *group["betas"][1:])
        else:
            group["momentum"] = momentum


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Start every group at max_lr, whatever the optimizer was built with (schedules scale from it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _dummy_optimizer(cfg: TrialConfig) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(1))]
    if cfg.optimizer == "sgd":  # nesterov only changes the update, not the param group keys
        return torch.optim.SGD(params, lr=cfg.max_lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.max_lr, betas=(cfg.momentum, 0.999))
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.max_lr)
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=cfg.max_lr)
    if cfg.optimizer == "caffe_sgd":  # Caffe's SGD: its param groups hold lr and momentum as torch's SGD does
        from harness.trial.optim import CaffeSGD
        return CaffeSGD(params, lr=cfg.max_lr, momentum=cfg.momentum)
    raise ValueError(f"optimizer '{cfg.optimizer}' is not known; allowed: sgd, adam, adagrad, adadelta, "
                     f"caffe_sgd")
