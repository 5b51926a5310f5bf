"""One trial: the unit a study schedules.

`run_trial(config, reporter)` trains one model with one schedule and reports metrics at every evaluation.
It runs in a single process, or unchanged as one rank of a DDP group when the caller (Ray Train, a test)
has initialised `torch.distributed` first. It knows nothing of Ray or MLflow: metrics go to `reporter`.

Batch semantics. `batch_size` is the global batch of one optimizer step; `bn_batch` is how many images one
BatchNorm statistic sees (the paper: 125 per GPU). Each rank takes its slice of the global batch, splits
it into micro-batches of `bn_batch`, accumulates their gradients (DDP `no_sync` for all but the last) and
steps once. BN running statistics (used at test time) follow the first micro-batch of each step, as Caffe's
test net follows GPU 0. So a batch-1000 step has the paper's BN semantics on 1, 2 or 8 devices, and the same
config and seed give the same trajectory whatever the world size (up to float summation order).

Fast path (TrialConfig fields, so a study's `base` switches them): `precision` (auto = bf16 autocast on CUDA,
fp32 on CPU), `channels_last` (convolutional models), `compile` (torch.compile), cudnn.benchmark on CUDA.
Losses stay on the device between checks; throughput windows leave out the first `warmup_steps` steps.

Divergence (a non-finite loss, or a loss above `divergence_factor` x the first step's) ends the trial with
status `diverged`: a result, not an exception.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from harness.config import TrialConfig
from harness.trial.data import RawData
from harness.trial.schedules import build_scheduler, lr_momentum
from harness.trial.step import Setup, evaluate, global_mean, output_health, prepare, sync, train_step

Reporter = Callable[[dict[str, Any], "dict[str, Any] | None"], None]
DIVERGENCE_CHECK_EVERY = 10   # steps between loss checks (each check is a device->host sync)


def run_trial(config: TrialConfig, reporter: Reporter | None = None,
              resume: dict[str, Any] | None = None, device: torch.device | str | None = None,
              raw: RawData | None = None) -> dict[str, Any]:
    """Train one trial; call `reporter(metrics, checkpoint_state)` at every evaluation; return the summary
    (with `history`, every evaluation record since step 0, and `first_step_at`, the wall clock of this
    process's first step).

    `checkpoint_state` is a dict (model, optimizer, scheduler, progress) on rank 0 and None elsewhere;
    passing it back as `resume` continues the trial exactly where it was. `raw`: the dataset's files already read
    (`harness.trial.data.load_raw`, shared by the trials of a node), else they are read here.
    """
    if config.kind == "lr_finder":  # another trial kind: an LR sweep that restores the model (never resumed)
        from harness.trial.finder import run_finder
        return run_finder(config, reporter, device, raw)
    s = prepare(config, device, raw)
    scheduler = build_scheduler(s.optimizer, s.cfg)
    p = {"step": 0, "train_seconds": 0.0, "first_loss": None, "history": [], "best_acc": 0.0,
         "steps_to_target": None, "seconds_to_target": None}
    if resume is not None:
        s.model.load_state_dict(resume["model"])
        s.optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        p.update(resume["progress"])
        for q, g in zip(s.model.parameters(), resume.get("grads") or (), strict=False):  # zero_grad false: the
            q.grad = None if g is None else g.to(q.device)                                  # sum carried on
    status, diverged_at, first_step_at = _train(s, scheduler, p, reporter)
    return {**trial_summary(s, p, status, diverged_at), "first_step_at": first_step_at, "history": p["history"]}


def _train(s: Setup, scheduler, p: dict, reporter: Reporter | None) -> tuple[str, int | None, float | None]:
    """The loop from p["step"] to the trial's last step (or its divergence); returns (status, diverged at, the wall
    clock of this process's first step)."""
    cfg = s.cfg
    status, diverged_at, first_step_at = "completed", None, None
    loss_sum = torch.zeros((), device=s.device)   # summed on-device between evaluations: no per-step sync
    window = {"steps": 0, "images": 0}
    # this process's first steps (allocator, oneDNN/cuDNN set-up, compilation) are left out of the first window's
    # images/s; at most eval_every - 1 of them, so that window still counts at least one step
    warm_until = p["step"] + min(cfg.warmup_steps, cfg.eval_every - 1)
    tick = window_tick = time.perf_counter()
    while p["step"] < cfg.steps:
        lr, momentum = lr_momentum(s.optimizer)
        step_loss = train_step(s, *s.batches.get(p["step"]))
        scheduler.step()
        loss_sum += step_loss
        p["step"] = step = p["step"] + 1
        window["steps"] += 1
        window["images"] += cfg.batch_size
        if first_step_at is None:
            first_step_at = time.time()  # wall clock: the orchestration overhead ends here
        if step == warm_until and step % cfg.eval_every:
            # warm-up over before this window's evaluation: its images/s counts only the steps from here
            sync(s.device)
            window_tick, window["images"] = time.perf_counter(), 0
        is_eval = step % cfg.eval_every == 0 or step == cfg.steps
        if is_eval or step % DIVERGENCE_CHECK_EVERY == 0 or step == 1:
            mean_loss = global_mean(step_loss, s.world)
            if p["first_loss"] is None:
                p["first_loss"] = mean_loss
            if not math.isfinite(mean_loss) or mean_loss > cfg.divergence_factor * p["first_loss"]:
                status, diverged_at, is_eval = "diverged", step, True
        if not is_eval:
            continue
        sync(s.device)  # evaluation is not training time
        now = time.perf_counter()
        p["train_seconds"] += now - tick
        record = _evaluation(s, p, lr, momentum, loss_sum, window, now - window_tick)
        loss_sum.zero_()
        window.update(steps=0, images=0)
        if reporter is not None:
            state = None
            if s.rank == 0:
                state = copy.deepcopy({"model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "progress": p,  # a snapshot
                                       "grads": None if cfg.zero_grad else [q.grad for q in s.model.parameters()]})
            reporter(dict(record), state)
        if status == "diverged":
            break
        tick = window_tick = time.perf_counter()
    return status, diverged_at, first_step_at


def _evaluation(s: Setup, p: dict, lr: float, momentum: float, loss_sum: torch.Tensor, window: dict,
                window_seconds: float) -> dict:
    """One evaluation record (test, validation when held out, the window's train loss and images/s), added to
    the trial's history and its best and time-to-target figures."""
    cfg, step = s.cfg, p["step"]
    test_loss, test_acc = evaluate(s.model, s.ds, s.device, s.rank, s.world, s.fast)
    val = {}
    if s.ds.val_y is not None:
        val["val_loss"], val["val_acc"] = evaluate(s.model, s.ds, s.device, s.rank, s.world, s.fast, split="val")
    record = {
        "step": step,
        "epoch": step * cfg.batch_size / len(s.ds.train_y),
        "lr": lr,
        "momentum": momentum,
        "train_loss": global_mean(loss_sum / max(window["steps"], 1), s.world),
        # the accuracy on the batch the last step trained on, from that step's forward pass (before its update)
        "train_batch_acc": global_mean(s.batch_acc, s.world),
        "test_loss": test_loss,
        "test_acc": test_acc,
        **val,
        "images_per_s": window["images"] / window_seconds if window_seconds > 0 else 0.0,
        "train_seconds": p["train_seconds"],
    }
    if cfg.model == "mlp":  # negative_mnist: output units that never fire (dead behind a final ReLU), worst class
        record["dead_output_frac"], record["min_class_recall"] = output_health(s.model, s.ds, s.device, s.rank,
                                                                               s.world)
    p["history"].append(record)
    p["best_acc"] = max(p["best_acc"], test_acc if math.isfinite(test_acc) else 0.0)
    if p["steps_to_target"] is None and test_acc >= cfg.target_acc:
        p["steps_to_target"], p["seconds_to_target"] = step, p["train_seconds"]
    return record


def trial_summary(s: Setup, p: dict, status: str, diverged_at: int | None) -> dict:
    """The trial's summary metrics from its progress `p`."""
    last = p["history"][-1] if p["history"] else {}
    return {
        "status": status,
        "final_acc": last.get("test_acc", float("nan")),
        "final_val_acc": last.get("val_acc"),
        "best_acc": p["best_acc"],
        "reached_target": int(p["steps_to_target"] is not None),
        "steps_to_target": p["steps_to_target"],
        "seconds_to_target": p["seconds_to_target"],
        "target_acc": s.cfg.target_acc,
        "diverged_at_step": diverged_at,
        "steps_run": p["step"],
        "train_seconds": p["train_seconds"],
        "world_size": s.world,
        "bn_batch": s.cfg.batch_size // s.world // s.accum,
        "accum_steps": s.accum,
    }
