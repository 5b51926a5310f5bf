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

import contextlib
import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from harness.config import TrialConfig
from harness.data import RawData, TrainBatches, load_dataset, test_batches
from harness.models import build_model, caffe_param_multipliers
from harness.optim import CaffeSGD
from harness.schedules import build_scheduler, lr_momentum

Reporter = Callable[[dict[str, Any], "dict[str, Any] | None"], None]
DIVERGENCE_CHECK_EVERY = 10   # steps between loss checks (each check is a device->host sync)
EVAL_BATCH = 1000


def workload(cfg: TrialConfig, device: torch.device, raw=None):
    """The trial's data (on `device`) and freshly initialised model, seeded by cfg.seed: what a training trial and an
    LR finder trial share."""
    torch.manual_seed(cfg.seed)
    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, train_size=cfg.train_size, val_size=cfg.val_size,
                      seed=cfg.seed, preprocess=cfg.preprocess, device=device, raw=raw,
                      invert=cfg.invert_images)
    model = build_model(cfg, ds.in_channels, ds.num_classes, ds.image_size).to(device)
    return ds, model


def run_trial(config: TrialConfig | dict, reporter: Reporter | None = None,
              resume: dict[str, Any] | None = None, device: torch.device | str | None = None,
              raw: RawData | None = None) -> dict[str, Any]:
    """Train one trial; call `reporter(metrics, checkpoint_state)` at every evaluation; return the summary
    (with `history`, every evaluation record since step 0, and `first_step_at`, the wall clock of this
    process's first step).

    `checkpoint_state` is a dict (model, optimizer, scheduler, progress) on rank 0 and None elsewhere;
    passing it back as `resume` continues the trial exactly where it was. `raw`: the dataset's files already read
    (`harness.data.load_raw`, shared by the trials of a node), else they are read here.
    """
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    if cfg.kind == "lr_finder":  # another trial kind: an LR sweep that restores the model (never resumed)
        from harness.lr_finder import run_finder
        return run_finder(cfg, reporter, device, raw)
    rank, world = _rank_and_world()
    cfg.validate(world_size=world)
    local_batch, accum = cfg.micro_batches(world)
    micro = local_batch // accum
    device = torch.device(device) if device is not None else _pick_device(cfg.device)

    # --- workload: data and model ---
    ds, model = workload(cfg, device, raw)
    fast = FastPath.of(cfg, device)
    if fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
    net = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    batches = TrainBatches(ds, cfg.batch_size, rank=rank, world_size=world, seed=cfg.seed)

    # --- training algorithm: optimizer and schedule ---
    optimizer = build_optimizer(model, cfg.scaled())  # the study's lr_scale applied to base_lr and max_lr
    scheduler = build_scheduler(optimizer, cfg.scaled())

    p = {"step": 0, "train_seconds": 0.0, "first_loss": None, "history": [], "best_acc": 0.0,
         "steps_to_target": None, "seconds_to_target": None}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        p.update(resume["progress"])

    status, diverged_at, first_step_at = "completed", None, None
    loss_sum = torch.zeros((), device=device)   # summed on-device between evaluations: no per-step sync
    loss_steps, window_images = 0, 0
    # this process's first steps (allocator, oneDNN/cuDNN set-up, compilation) are left out of the first window's
    # images/s; at most eval_every - 1 of them, so that window still counts at least one step
    warm_until = p["step"] + min(cfg.warmup_steps, cfg.eval_every - 1)
    net.train()
    tick = window_tick = time.perf_counter()
    while p["step"] < cfg.steps:
        step = p["step"]
        lr, momentum = lr_momentum(optimizer)
        x, y = batches.get(step)
        x = fast.layout(x)
        step_loss = torch.zeros((), device=device)
        for i in range(accum):
            sync = world == 1 or i == accum - 1
            if i == 1:
                _track_bn_stats(model, False)
            with contextlib.nullcontext() if sync else net.no_sync():
                with fast.autocast():  # the forward only; backward runs in the forward's dtypes
                    loss = F.cross_entropy(net(x[i * micro:(i + 1) * micro]), y[i * micro:(i + 1) * micro])
                (loss / accum).backward()
            step_loss += loss.detach() / accum
        if accum > 1:
            _track_bn_stats(model, True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss_sum += step_loss
        loss_steps += 1
        p["step"] = step = step + 1
        window_images += cfg.batch_size
        if first_step_at is None:
            first_step_at = time.time()  # wall clock: the orchestration overhead ends here
        if step == warm_until and step % cfg.eval_every:
            # warm-up over before this window's evaluation: its images/s counts only the steps from here
            _sync(device)
            window_tick, window_images = time.perf_counter(), 0

        is_eval = step % cfg.eval_every == 0 or step == cfg.steps
        if is_eval or step % DIVERGENCE_CHECK_EVERY == 0 or step == 1:
            mean_loss = _global_mean(step_loss, world)
            if p["first_loss"] is None:
                p["first_loss"] = mean_loss
            if not math.isfinite(mean_loss) or mean_loss > cfg.divergence_factor * p["first_loss"]:
                status, diverged_at, is_eval = "diverged", step, True
        if not is_eval:
            continue

        # --- evaluation (not counted as training time) ---
        _sync(device)
        now = time.perf_counter()
        p["train_seconds"] += now - tick
        window_seconds = now - window_tick
        test_loss, test_acc = evaluate(model, ds, device, rank, world, fast)
        val = {}
        if ds.val_y is not None:
            val["val_loss"], val["val_acc"] = evaluate(model, ds, device, rank, world, fast, split="val")
        record = {
            "step": step,
            "epoch": step * cfg.batch_size / len(ds.train_y),
            "lr": lr,
            "momentum": momentum,
            "train_loss": _global_mean(loss_sum / max(loss_steps, 1), world),
            "test_loss": test_loss,
            "test_acc": test_acc,
            **val,
            "images_per_s": window_images / window_seconds if window_seconds > 0 else 0.0,
            "train_seconds": p["train_seconds"],
        }
        if cfg.model == "mlp":  # negative_mnist: output units that never fire (dead behind a final ReLU)
            record["dead_output_frac"] = dead_output_fraction(model, ds, device, rank, world)
        p["history"].append(record)
        p["best_acc"] = max(p["best_acc"], test_acc if math.isfinite(test_acc) else 0.0)
        if p["steps_to_target"] is None and test_acc >= cfg.target_acc:
            p["steps_to_target"], p["seconds_to_target"] = step, p["train_seconds"]
        loss_sum.zero_()
        loss_steps, window_images = 0, 0
        if reporter is not None:
            state = None
            if rank == 0:
                state = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "progress": p})  # a snapshot
            reporter(dict(record), state)
        if status == "diverged":
            break
        net.train()
        tick = window_tick = time.perf_counter()

    return {**summarize(cfg, p, status, diverged_at, world, accum), "first_step_at": first_step_at,
            "history": p["history"]}


def summarize(cfg: TrialConfig, p: dict, status: str, diverged_at: int | None, world: int, accum: int) -> dict:
    last = p["history"][-1] if p["history"] else {}
    summary = {
        "status": status,
        "final_acc": last.get("test_acc", float("nan")),
        "final_val_acc": last.get("val_acc"),
        "best_acc": p["best_acc"],
        "reached_target": int(p["steps_to_target"] is not None),
        "steps_to_target": p["steps_to_target"],
        "seconds_to_target": p["seconds_to_target"],
        "target_acc": cfg.target_acc,
        "diverged_at_step": diverged_at,
        "steps_run": p["step"],
        "train_seconds": p["train_seconds"],
        "world_size": world,
        "bn_batch": cfg.batch_size // world // accum,
        "accum_steps": accum,
    }
    return summary


# ----------------------------------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    """SGD/Nesterov/Adam/AdaGrad/AdaDelta/Caffe SGD with the paper's weight-decay exemptions.

    The authors' Caffe ResNets decay what their prototxt decays (decay_mult): conv biases are exempt, BN scale
    and shift and the FC bias are not. Other models exempt every bias and BN parameter (the common convention).
    Caffe's lr_mult 2 on biases is reproduced by `caffe_sgd` only (harness.optim.CaffeSGD, groups by
    (lr_mult, decay_mult); other models: lr_mult 1); every other optimizer follows the schedule's lr.
    """
    if cfg.model in ("resnet20", "resnet56", "resnet110"):
        mults = caffe_param_multipliers(model)
        decayed = {n for n, (_, decay_mult) in mults.items() if decay_mult > 0}
    else:
        decayed = {n for n, p in model.named_parameters() if p.ndim > 1}
        mults = {n: (1.0, 1.0 if n in decayed else 0.0) for n, _ in model.named_parameters()}
    if cfg.optimizer == "caffe_sgd":
        by_mult: dict[tuple[float, float], list] = {}
        for n, p in model.named_parameters():
            by_mult.setdefault(mults[n], []).append(p)
        return CaffeSGD([{"params": ps, "lr_mult": lm, "decay_mult": dm} for (lm, dm), ps in by_mult.items()],
                        lr=cfg.max_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    decay = [p for n, p in model.named_parameters() if n in decayed]
    no_decay = [p for n, p in model.named_parameters() if n not in decayed]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = cfg.max_lr
    if cfg.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.optimizer == "nesterov")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(cfg.momentum, 0.999))
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr)
    return torch.optim.Adadelta(groups, lr=lr)


class FastPath:
    """How a trial's tensors are laid out and computed: bf16 autocast or fp32, NHWC or NCHW."""

    def __init__(self, bf16: bool, channels_last: bool, device_type: str):
        self.bf16, self.channels_last, self.device_type = bf16, channels_last, device_type

    @classmethod
    def of(cls, cfg: TrialConfig, device: torch.device) -> FastPath:
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        return cls(bf16, cfg.channels_last and cfg.model != "mlp", device.type)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x


FP32 = FastPath(False, False, "cpu")


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds, device: torch.device, rank: int, world: int,
             fast: FastPath = FP32, split: str = "test") -> tuple[float, float]:
    """Loss and accuracy on the full test (or validation) set; each rank scores its shard, with rank 0's BN
    statistics."""
    if world > 1 and split == "test":  # the validation pass follows the test pass: buffers are already rank 0's
        for buf in model.buffers():
            dist.broadcast(buf, src=0)
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
    for x, y in test_batches(ds, EVAL_BATCH, rank=rank, world_size=world, split=split):
        with fast.autocast():
            out = model(fast.layout(x)).float()
        totals[0] += F.cross_entropy(out, y, reduction="sum").double()
        totals[1] += (out.argmax(1) == y).sum()
        totals[2] += len(y)
    if world > 1:
        dist.all_reduce(totals)
    loss, correct, count = totals.tolist()
    return loss / count, correct / count


@torch.no_grad()
def dead_output_fraction(model: torch.nn.Module, ds, device: torch.device, rank: int, world: int) -> float:
    """The fraction of output units that are <= 0 on every test image: behind a final ReLU, dead units
    (zero output and zero gradient for every input); without one, units that never give a positive logit."""
    model.eval()
    peak = torch.full((ds.num_classes,), -math.inf, device=device)
    for x, _ in test_batches(ds, EVAL_BATCH, rank=rank, world_size=world):
        peak = torch.maximum(peak, model(x).amax(0))
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float((peak <= 0).float().mean())


def _track_bn_stats(model: torch.nn.Module, on: bool) -> None:
    """BN running statistics follow the first micro-batch of each step only (on rank 0, whose buffers DDP
    broadcasts): as in Caffe, where the test net uses GPU 0's statistics of its 125 images per iteration.
    So the statistics, like the gradients, are the same on 1, 2 or 8 workers."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = on


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _global_mean(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pick_device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is visible; use device: auto or cpu")
    return torch.device("cuda", torch.cuda.current_device())


if __name__ == "__main__":  # python -m harness.trial STUDY --cell CELL (or under torchrun): see harness/trial_cli.py
    import sys

    from harness.trial_cli import main
    sys.exit(main())
