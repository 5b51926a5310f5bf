"""The real trial, short: K optimizer steps of a config, timed, with the peak memory they took.

    m = run_steps(config, steps=3)            # prepare + K x (batch, train_step, scheduler.step)
    print(m.describe())                       # "0.42 s/step, 2,381 images/s, CUDA max allocated 1.9 GiB"

The steps are the trial's own: `prepare` (the data read and put on the device, the seeded model in its memory
format, DDP when torch.distributed is initialised, the optimizer), the scheduler the trial builds from the full
config (its real `steps`, `stepsize` and milestones: step k has the LR the trial's step k has), and `train_step`
(micro-batches of `bn_batch`, `no_sync`, bf16 autocast where the config asks). Nothing is evaluated. Each step is
timed between device syncs; the first step pays the allocator, oneDNN/cuDNN set-up and any compilation, so the
rate is taken over the steps after it (with one step, from that first step, and `describe` says so).

Peak memory: on CUDA torch's max allocated bytes since the start of `run_steps` (the resident dataset included,
as the trial holds it); on the CPU the process's peak resident set (getrusage), which covers the whole process,
so a caller that wants one config's peak runs it in a fresh process (harness.study.preflight does).

The study's `harness.study.preflight` and `python -m harness.trial STUDY --steps K` both call this; a workload
wider than one process is replayed here with its per-worker batch (`per_worker`) or run for real under torchrun.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from harness.config import ConfigError, TrialConfig
from harness.trial.data import RawData
from harness.trial.schedules import build_scheduler, lr_momentum
from harness.trial.step import global_mean, prepare, sync, train_step

GiB = 2 ** 30


@dataclass(frozen=True)
class Measurement:
    """K timed steps of one config: seconds of each step, the global batch each step trained, peak memory."""
    seconds: tuple[float, ...]  # per optimizer step, between device syncs
    images_per_step: int        # the global batch of what ran (every rank steps together)
    peak_bytes: int
    peak_what: str              # "CUDA max allocated" or "peak RSS"
    device: str                 # the device in words ("NVIDIA H100 80GB HBM3", "CPU (x86_64, 2 threads)")
    device_kind: str            # "cuda" or "cpu"
    losses: tuple[float, ...]
    world: int = 1              # processes that stepped (a torchrun DDP run: its world size)

    @property
    def timed(self) -> tuple[float, ...]:
        """The steps the rate comes from: all but the first, or the first alone when there is one."""
        return self.seconds[1:] or self.seconds[:1]

    @property
    def s_per_step(self) -> float:
        return sum(self.timed) / len(self.timed)

    @property
    def images_per_s(self) -> float:
        return self.images_per_step / self.s_per_step

    def describe(self) -> str:
        which = f"mean of steps 2-{len(self.seconds)}" if len(self.seconds) > 1 else \
            "the first step alone: warm-up included"
        return (f"{self.s_per_step:.3g} s/step ({which}), {self.images_per_s:,.0f} images/s, "
                f"{self.peak_what} {self.peak_bytes / GiB:.2f} GiB")

    def to_dict(self) -> dict:
        return {**asdict(self), "s_per_step": self.s_per_step, "images_per_s": self.images_per_s}


def per_worker(cfg: TrialConfig, workers: int) -> TrialConfig:
    """The config one of `workers` DDP ranks computes, as one process: its share of the global batch in the same
    BN micro-batches (the gradient all-reduce between ranks is the part this leaves out)."""
    local, _ = cfg.micro_batches(workers)  # ConfigError on a batch that cannot be split
    if workers == 1:
        return cfg
    return cfg.replace(batch_size=local, bn_batch=cfg.bn_batch or local)


def run_steps(cfg: TrialConfig, steps: int, device: torch.device | str | None = None, raw: RawData | None = None,
              on_step: Callable[[int, float, float, float], None] | None = None) -> Measurement:
    """`steps` optimizer steps of the trial `cfg`, from its step 0; `on_step(step, lr, loss, seconds)` after each
    (step counted from 1). ConfigError when `steps` is not in 1..cfg.steps."""
    if not 1 <= steps <= cfg.steps:
        raise ConfigError(f"--steps must be between 1 and the trial's {cfg.steps} steps, got {steps}")
    if torch.cuda.is_available() and cfg.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    s = prepare(cfg, device, raw)
    scheduler = build_scheduler(s.optimizer, s.cfg)
    seconds, losses = [], []
    for k in range(steps):
        lr, _ = lr_momentum(s.optimizer)
        sync(s.device)
        tick = time.perf_counter()
        loss = train_step(s, *s.batches.get(k))
        scheduler.step()
        sync(s.device)
        seconds.append(time.perf_counter() - tick)
        losses.append(global_mean(loss, s.world))
        if on_step is not None:
            on_step(k + 1, lr, losses[-1], seconds[-1])
    peak, what = peak_memory(s.device)
    return Measurement(tuple(seconds), s.cfg.batch_size, peak, what, device_words(s.device),
                       s.device.type, tuple(losses), s.world)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): CUDA's max allocated on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"  # Linux: KiB


def device_words(device: torch.device) -> str:
    """The device a measurement ran on, as the cost estimate names it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({_cpu_model()}, {torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or f"{os.cpu_count()} cores"
