"""The LR finder (trial kind `lr_finder`): the fastai / pytorch-lr-finder variant of Smith's LR range test.

    run_finder(cfg, reporter)   # what run_trial does for kind lr_finder, on 1 process or as one DDP rank

One optimizer step per LR of a sweep from `base_lr` to `max_lr` over `steps` steps, exponential (fastai,
pytorch-lr-finder: lr_k = base * (max/base)^(k/(steps-1))) or linear (`finder_mode: linear`, Smith's test:
lr_k = base + (max-base) k/(steps-1)); both hit both endpoints. After each step the training loss (the
mean over all ranks) enters a bias-corrected exponential moving average (fastai: avg = b avg + (1-b) loss,
smoothed = avg / (1 - b^(k+1))); the sweep stops once the smoothed loss exceeds `finder_stop_factor` x its
best so far (or is not finite). With `finder_val` (which needs `val_size`) the next batch of the held-out
training images is scored after each training batch (pytorch-lr-finder's val_loader: one batch per step, in eval
mode). Afterwards the model and the optimizer
are restored bit for bit (their state_dicts), as both libraries do: a finder leaves no trace.

All ranks stay in lockstep: each step's loss (and batch score) is all-reduced, and so is the stop flag,
so every rank runs exactly as many steps; `reporter` is called on every rank with each sweep record (the
Ray worker logs rank 0's to MLflow: lr, train_loss, smoothed_loss, batch_val_* per step), then once more
the summary holds the suggestions (logged as metrics):

- lr_steepest:  the most negative slope of the smoothed loss against log10(lr) (np.gradient on log10 lr),
                over the sweep without its first tenth and last 5 points (fastai's trim);
- lr_valley:    fastai's `valley`, on the same trimmed curve: the longest decreasing subsequence of the smoothed
                loss, and the point halfway along it in sweep steps (fastai's index arithmetic; on an
                exponential sweep, halfway in log10(lr));
- lr_smith:     Smith's rule: the LR where the (smoothed) batch accuracy peaks when `finder_val`, else where
                the smoothed loss is lowest; lr_smith_base = lr_smith / 10 and lr_smith_base_min = / 20 are
                his one-cycle base LR range.
Why our own: torch has no LR finder; fastai's needs its Learner, pytorch-lr-finder its own training loop,
and neither runs DDP ranks in lockstep nor honours the trial's micro-batch BN semantics.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness.config import TrialConfig
from harness.trial.data import test_batches
from harness.trial.step import prepare, train_step

SUGGESTIONS = ("lr_steepest", "lr_valley", "lr_smith", "lr_smith_base", "lr_smith_base_min")


def sweep_lrs(start: float, end: float, steps: int, mode: str = "exp") -> np.ndarray:
    """The LR of each sweep step, start at step 0 and end at step steps-1."""
    if steps < 2:
        return np.array([start], dtype=float)
    frac = np.arange(steps) / (steps - 1)
    if mode == "exp":
        lrs = start * (end / start) ** frac
    elif mode == "linear":
        lrs = start + (end - start) * frac
    else:
        raise ValueError(f"finder mode '{mode}' is not known; allowed: exp, linear")
    lrs[-1] = end  # exact, whatever the rounding of the power
    return lrs


def smoothed(values, beta: float) -> np.ndarray:
    """fastai's bias-corrected exponential moving average."""
    out, avg = [], 0.0
    for k, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (k + 1)))
    return np.array(out, dtype=float)


def suggestions(lrs, losses, accs=None, planned: int | None = None) -> dict[str, float]:
    """Suggested LRs from a sweep (`losses` already smoothed; `accs` the smoothed batch accuracies or None) of
    `planned` steps (default: as many as given), read on fastai's trimmed curve: without the first planned // 10
    points and the last 5 (where enough are left); slopes taken against log10(lr)."""
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    finite = np.isfinite(losses)
    lrs, losses = lrs[finite], losses[finite]
    accs = None if accs is None else np.asarray(accs, dtype=float)[finite]
    if len(lrs) == 0:
        return {k: math.nan for k in SUGGESTIONS}
    x = np.log10(lrs)
    lo = min((planned or len(lrs)) // 10, max(len(lrs) - 3, 0))
    hi = len(lrs) - 5 if len(lrs) - 5 - lo >= 3 else len(lrs)  # fastai's trim, where enough points are left
    if hi - lo >= 2:
        grad = np.gradient(losses[lo:hi], x[lo:hi])
        steepest = lrs[lo + int(np.argmin(grad))]
    else:
        steepest = lrs[int(np.argmin(losses))]
    valley = lrs[lo + _valley_index(losses[lo:hi])]
    peak = int(np.nanargmax(accs)) if accs is not None and np.isfinite(accs).any() else int(np.argmin(losses))
    smith = lrs[peak]
    return {"lr_steepest": float(steepest), "lr_valley": float(valley), "lr_smith": float(smith),
            "lr_smith_base": float(smith / 10), "lr_smith_base_min": float(smith / 20)}


def _valley_index(losses: np.ndarray) -> int:
    """fastai's `valley` (fastai.callback.schedule): the longest strictly decreasing subsequence of the loss ends
    at `end` with length L; start = end - L (fastai's own arithmetic), and the suggestion is the point
    int(s) + int(s / 2) after start, s = (end - start) / 3: about halfway along the valley, which on an
    exponential sweep is halfway in log10(lr). O(n^2), as fastai's."""
    n = len(losses)
    length, end = [1] * n, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and length[i] < length[j] + 1:
                length[i] = length[j] + 1
            if length[end] < length[i]:
                end = i
    start = end - length[end]
    sections = (end - start) / 3
    return max(0, min(n - 1, start + int(sections) + int(sections / 2)))


# ----------------------------------------------------------------------------------------------------
def sweep(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_step: Callable[[int], torch.Tensor],
          lrs, *, beta: float = 0.98, stop_factor: float = 4.0,
          val_step: Callable[[int], torch.Tensor] | None = None, world: int = 1) -> list[dict]:
    """Run the sweep; restore model and optimizer; return one record per step taken.

    train_step(k) trains on batch k at the LR already set and returns this rank's mean loss (0-d tensor);
    val_step(k) returns this rank's [loss sum, correct, count] on its next validation batch.
    """
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    records, avg, best = [], 0.0, math.inf
    device = next(model.parameters()).device
    try:
        for k, lr in enumerate(lrs):
            for group in optimizer.param_groups:
                group["lr"] = float(lr)
            loss = train_step(k).detach().double().reshape(1)
            score = val_step(k).double() if val_step is not None else torch.zeros(3, dtype=torch.float64,
                                                                                    device=device)
            totals = torch.cat([loss.to(score.device), score])
            if world > 1:
                dist.all_reduce(totals)
            raw, val_loss, correct, count = totals.tolist()
            raw /= world
            avg = beta * avg + (1 - beta) * raw
            smooth = avg / (1 - beta ** (k + 1))
            record = {"step": k + 1, "lr": float(lr), "train_loss": raw, "smoothed_loss": smooth}
            if val_step is not None:
                record["batch_val_loss"], record["batch_val_acc"] = val_loss / count, correct / count
            records.append(record)
            best = min(best, smooth)
            stop = torch.tensor([float(not math.isfinite(smooth) or smooth > stop_factor * best)])
            if world > 1:
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # one decision for all ranks
            if stop.item() > 0:
                break
    finally:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    return records


def run_finder(cfg: TrialConfig, reporter=None, device: torch.device | str | None = None, raw=None) -> dict:
    """The finder as a trial: the same data, model, optimizer, batch and BN semantics, precision and memory format
    as `run_trial` (harness.trial.step); momentum constant at cfg.momentum, no scheduler: the sweep sets the LR."""
    s = prepare(cfg, device, raw)
    cfg = s.cfg  # lr_scale applied to the sweep's ends
    local_batch = cfg.batch_size // s.world
    val_shard = list(test_batches(s.ds, local_batch, rank=s.rank, world_size=s.world, split="val")) \
        if cfg.finder_val else []   # held-out training images (TrialConfig: finder_val needs val_size)

    @torch.no_grad()
    def val_step(k: int) -> torch.Tensor:
        s.model.eval()
        x, y = val_shard[k % len(val_shard)]
        with s.fast.autocast():
            out = s.model(s.fast.layout(x)).float()
        return torch.stack([F.cross_entropy(out, y, reduction="sum").double(), (out.argmax(1) == y).sum().double(),
                            torch.tensor(float(len(y)), device=s.device, dtype=torch.float64)])

    lrs = sweep_lrs(cfg.base_lr, cfg.max_lr, cfg.steps, cfg.finder_mode)
    tick, first_step_at = time.perf_counter(), time.time()
    records = sweep(s.model, s.optimizer, lambda k: train_step(s, *s.batches.get(k)), lrs,
                    beta=cfg.finder_smoothing, stop_factor=cfg.finder_stop_factor,
                    val_step=val_step if cfg.finder_val else None, world=s.world)
    seconds = time.perf_counter() - tick
    for r in records:
        r.update(epoch=r["step"] * cfg.batch_size / len(s.ds.train_y), train_seconds=seconds * r["step"] / len(records),
                 images_per_s=cfg.batch_size * len(records) / max(seconds, 1e-9))
        if reporter is not None:
            reporter(dict(r), None)  # no checkpoint: a finder restarts from scratch (it leaves no state)
    return {**_finder_summary(s, records, len(lrs), seconds), "first_step_at": first_step_at, "history": records}


def _finder_summary(s, records: list[dict], planned: int, seconds: float) -> dict:
    cfg = s.cfg
    accs = smoothed([r["batch_val_acc"] for r in records], cfg.finder_smoothing) if cfg.finder_val else None
    suggested = suggestions([r["lr"] for r in records], [r["smoothed_loss"] for r in records], accs, planned)
    stopped = len(records) < planned
    return {
        "status": "completed", "final_acc": records[-1].get("batch_val_acc", math.nan),
        "best_acc": max((r.get("batch_val_acc", 0.0) for r in records), default=0.0),
        "reached_target": 0, "steps_to_target": None, "seconds_to_target": None, "target_acc": cfg.target_acc,
        "diverged_at_step": records[-1]["step"] if stopped else None, "steps_run": len(records),
        "train_seconds": seconds, "world_size": s.world, "bn_batch": cfg.batch_size // s.world // s.accum,
        "accum_steps": s.accum, "finder_stopped_early": int(stopped), **suggested,
    }
