"""What would fail, or silently go wrong, in a trial config long after it started, found before it starts.

    problems(config, workers)              # arithmetic: batch split, milestones, stepsize, data sizes
    built_problems(config, workers, raw)   # built: data, model, optimizer, scheduler, one micro-batch forward

`TrialConfig.validate` already refuses what cannot run at all (a batch that does not split into `bn_batch`
micro-batches, one_cycle's 2 x stepsize > steps). These add what runs but is not the trial the study meant,
which a paper-scale run would show only hours in, on rented GPUs: a multistep milestone at or past the last step
(the LR never drops), a cyclical stage shorter than its half-cycle (the LR never reaches the stage's max_lr), a
range test whose stepsize ends before its steps (the LR runs past max_lr), and a batch larger than the training
set left after `val_size` and `train_size` (the batch sampler refuses it at the first step). `built_problems`
builds the config as the trial does (`prepare` with the per-worker batch) and pushes two images of the dataset
through the model: the data's shape is the model's.
"""

from __future__ import annotations

import torch

from harness.config import NUM_CLASSES, TRAIN_IMAGES, ConfigError, TrialConfig
from harness.trial.data import RawData
from harness.trial.schedules import build_scheduler, curve
from harness.trial.short_run import per_worker
from harness.trial.step import prepare


def problems(cfg: TrialConfig, workers: int) -> list[str]:
    """Each thing wrong with `cfg` run on `workers` DDP ranks, one line each; [] when none."""
    try:
        cfg.validate(world_size=workers)
    except ConfigError as e:
        return [str(e)]
    try:
        curve(cfg, steps=1)  # the trial's scheduler, built on an optimizer of its kind
    except (ValueError, ZeroDivisionError) as e:
        return [f"its {cfg.schedule} schedule cannot be built: {e}"]
    return [*_milestone_problems(cfg), *_stepsize_problems(cfg), *_size_problems(cfg)]


def _milestone_problems(cfg: TrialConfig) -> list[str]:
    late = [m for m in cfg.milestones if m >= cfg.steps]
    if cfg.schedule != "multistep" or not late:
        return []
    return [f"milestones {late} are not before the last step ({cfg.steps} steps): the LR never drops there"]


def _stepsize_problems(cfg: TrialConfig) -> list[str]:
    if cfg.schedule in ("triangular", "triangular2"):
        stages = [(0, cfg.stepsize or max(1, cfg.steps // 2)), *((s[0], s[3]) for s in cfg.clr_stages)]
        ends = [start for start, _ in stages[1:]] + [cfg.steps]
        return [f"the cyclical stage from step {start} lasts {end - start} steps, less than its stepsize "
                f"{stepsize}: its LR never reaches that stage's max_lr"
                for (start, stepsize), end in zip(stages, ends, strict=True) if stepsize > end - start]
    if cfg.schedule == "range_test" and cfg.stepsize is not None and cfg.stepsize < cfg.steps:
        return [f"range_test's stepsize {cfg.stepsize} is less than its {cfg.steps} steps: the LR passes max_lr "
                f"after step {cfg.stepsize}"]
    return []


def _size_problems(cfg: TrialConfig) -> list[str]:
    total, held = TRAIN_IMAGES[cfg.dataset], cfg.val_size or 0
    if held >= total:
        return [f"val_size {held} leaves nothing of {cfg.dataset}'s {total:,} training images"]
    left = total - held
    if cfg.train_size is not None and cfg.train_size > left:
        return [f"train_size {cfg.train_size} is more than the {left:,} training images of {cfg.dataset} "
                f"left after val_size {held}"]
    train = cfg.train_size or left
    if cfg.batch_size > train:
        return [f"batch_size {cfg.batch_size} is larger than the {train:,} training images the trial keeps"]
    return []


def built_problems(cfg: TrialConfig, workers: int, raw: RawData | None = None,
                   device: torch.device | str = "cpu") -> list[str]:
    """Build `cfg` as one of its `workers` ranks builds it (data from `raw` or its files, model, optimizer,
    scheduler, this rank's first batch in micro-batches of bn_batch) and run two of its images through the model
    (no gradient, nothing trained); each mismatch found, one line each."""
    try:
        s = prepare(per_worker(cfg, workers), device, raw)
        build_scheduler(s.optimizer, s.cfg)
        x, y = s.batches.get(0)
    except (ConfigError, ValueError, RuntimeError) as e:
        return [" ".join(f"building it failed: {type(e).__name__}: {e}".split())]
    found = []
    bn = cfg.bn_batch or cfg.batch_size // workers
    if len(x) // s.accum != bn or len(x) % s.accum:
        found.append(f"a rank's batch of {len(x)} splits into {s.accum} micro-batches, not of bn_batch {bn}")
    if s.ds.num_classes != NUM_CLASSES[cfg.dataset] or int(y.max()) >= s.ds.num_classes:
        found.append(f"{cfg.dataset} came with {s.ds.num_classes} classes and labels up to {int(y.max())}, not "
                     f"the {NUM_CLASSES[cfg.dataset]} classes it has")
    s.model.eval()
    with torch.no_grad(), s.fast.autocast():
        out = s.model(s.fast.layout(x[:2]))
    if tuple(out.shape) != (len(x[:2]), s.ds.num_classes):
        found.append(f"{cfg.model} maps {tuple(x.shape[1:])} images to outputs {tuple(out.shape[1:])}, not "
                     f"{s.ds.num_classes} class scores")
    return found
