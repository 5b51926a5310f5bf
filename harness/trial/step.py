"""The seam between a trial's workload and its training algorithm: what a training trial and an LR finder share.

    setup = prepare(cfg, device, raw)       # rank and world, device, data, model (DDP-wrapped), batches, optimizer
    loss = train_step(setup, x, y)          # one optimizer step over the global batch's micro-batches

`prepare` builds the workload (data and a freshly seeded model) and the optimizer; `train_step` runs one step
(gradients zeroed after it unless `zero_grad` is false; `setup.batch_acc` = the stepped batch's accuracy)
with the trial's batch semantics (micro-batches of `bn_batch`, DDP `no_sync` for all but the last, BN running
statistics from the first micro-batch only) and its fast path (bf16 autocast, channels_last). The trial loop
(`harness.trial.loop`) and the LR finder (`harness.trial.finder`) both call these, so they cannot drift apart.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from harness.config import TrialConfig
from harness.trial.data import Dataset, RawData, TrainBatches, load_dataset, test_batches
from harness.trial.models import CAFFE_MULTIPLIER_MODELS, build_model, caffe_param_multipliers
from harness.trial.optim import CaffeSGD

EVAL_BATCH = 1000


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


@dataclass
class Setup:
    """One process's share of a trial, ready to step."""
    cfg: TrialConfig              # as the trainer runs it: lr_scale already applied to base_lr and max_lr
    rank: int
    world: int
    device: torch.device
    ds: Dataset
    model: torch.nn.Module        # the bare model (state_dict, evaluation, BN buffers)
    net: torch.nn.Module          # what the step calls: the model, DDP-wrapped when world > 1, compiled if asked
    fast: FastPath
    batches: TrainBatches
    optimizer: torch.optim.Optimizer
    accum: int                    # micro-batches per rank per step
    batch_acc: torch.Tensor | None = None  # this rank's accuracy on the batch train_step last stepped on (0-d,
                                           # on the device), from the step's own forward pass, before the update


def prepare(cfg: TrialConfig, device: torch.device | str | None = None, raw: RawData | None = None) -> Setup:
    """Everything a step needs, for this process's rank: the config validated for the world size, the data on the
    device, the seeded model in the trial's memory format, the per-rank batches and the optimizer."""
    rank, world = rank_and_world()
    cfg.validate(world_size=world)
    cfg = cfg.scaled()  # the study's lr_scale applied to base_lr and max_lr
    _, accum = cfg.micro_batches(world)
    device = torch.device(device) if device is not None else pick_device(cfg.device)
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
    return Setup(cfg, rank, world, device, ds, model, net, fast, batches, build_optimizer(model, cfg), accum)


def train_step(s: Setup, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on this rank's slice (x, y) of the global batch, at the LR already set; returns this
    rank's mean loss (0-d, on the device: no host sync)."""
    s.net.train()
    micro = len(x) // s.accum
    x = s.fast.layout(x)
    step_loss = torch.zeros((), device=s.device)
    correct = torch.zeros((), device=s.device)
    for i in range(s.accum):
        sync = s.world == 1 or i == s.accum - 1
        if i == 1:
            track_bn_stats(s.model, False)
        with contextlib.nullcontext() if sync else s.net.no_sync():
            with s.fast.autocast():  # the forward only; backward runs in the forward's dtypes
                out = s.net(x[i * micro:(i + 1) * micro])
                loss = F.cross_entropy(out, y[i * micro:(i + 1) * micro])
            (loss / s.accum).backward()
        step_loss += loss.detach() / s.accum
        correct += (out.detach().argmax(1) == y[i * micro:(i + 1) * micro]).sum()
    if s.accum > 1:
        track_bn_stats(s.model, True)
    s.optimizer.step()
    if s.cfg.zero_grad:  # zero_grad false: never zeroed, so the next backward adds to every gradient so far
        s.optimizer.zero_grad(set_to_none=True)
    s.batch_acc = correct / (micro * s.accum)
    return step_loss


def workload(cfg: TrialConfig, device: torch.device, raw: RawData | None = None) -> tuple[Dataset, torch.nn.Module]:
    """The trial's data (on `device`) and freshly initialised model, seeded by cfg.seed."""
    torch.manual_seed(cfg.seed)
    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, train_size=cfg.train_size, val_size=cfg.val_size,
                      seed=cfg.seed, preprocess=cfg.preprocess, device=device, raw=raw,
                      invert=cfg.invert_images)
    model = build_model(cfg, ds.in_channels, ds.num_classes, ds.image_size).to(device)
    return ds, model


def build_optimizer(model: torch.nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    """SGD/Nesterov/Adam/AdaGrad/AdaDelta/Caffe SGD with the paper's weight-decay exemptions.

    The authors' Caffe ResNets (and Caffe's cifar10_full and LeNet) decay what their prototxt decays
    (decay_mult): the ResNets' conv biases are exempt, BN scale and shift and the FC bias are not. Other models
    exempt every bias and BN parameter (the common convention).
    Caffe's lr_mult 2 on biases is reproduced by `caffe_sgd` only (harness.trial.optim.CaffeSGD, groups by
    (lr_mult, decay_mult); other models: lr_mult 1); every other optimizer follows the schedule's lr.
    """
    if cfg.model in CAFFE_MULTIPLIER_MODELS:  # the authors' ResNets, Caffe's cifar10_full and LeNet
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
                        lr=cfg.max_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    decay = [p for n, p in model.named_parameters() if n in decayed]
    no_decay = [p for n, p in model.named_parameters() if n not in decayed]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = cfg.max_lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    # The adaptive solvers with the constants of Caffe's (the authors' SC10 logs set none of them): delta 1e-8;
    # Adam's momentum2 0.999; AdaDelta's decay is Caffe's `momentum`, unset in the authors' solver, so 0.
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(cfg.momentum, 0.999), eps=1e-8)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, eps=1e-8)
    return torch.optim.Adadelta(groups, lr=lr, rho=0.0, eps=1e-8)


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: Dataset, device: torch.device, rank: int, world: int,
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
def output_health(model: torch.nn.Module, ds: Dataset, device: torch.device, rank: int,
                  world: int) -> tuple[float, float]:
    """One pass over the test set (sharded over ranks): (dead output fraction, lowest per-class recall).

    Dead: the fraction of output units that are <= 0 on every test image; behind a final ReLU these are dead
    units (zero output and zero gradient for every input), without one units that never give a positive logit.
    Recall of class k: test images of k predicted k / test images of k; the lowest over classes shows a class the
    net has given up on, which the overall accuracy hides (a dead output's class is never predicted)."""
    model.eval()
    peak = torch.full((ds.num_classes,), -math.inf, device=device)
    hits = torch.zeros(ds.num_classes, device=device, dtype=torch.float64)
    seen = torch.zeros_like(hits)
    for x, y in test_batches(ds, EVAL_BATCH, rank=rank, world_size=world):
        out = model(x)
        peak = torch.maximum(peak, out.amax(0))
        seen += torch.bincount(y, minlength=ds.num_classes).double()
        hits += torch.bincount(y[out.argmax(1) == y], minlength=ds.num_classes).double()
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        dist.all_reduce(hits)
        dist.all_reduce(seen)
    recall = hits[seen > 0] / seen[seen > 0]
    return float((peak <= 0).float().mean()), float(recall.min())


def dead_output_fraction(model: torch.nn.Module, ds: Dataset, device: torch.device, rank: int, world: int) -> float:
    """The dead output fraction alone (see output_health)."""
    return output_health(model, ds, device, rank, world)[0]


def track_bn_stats(model: torch.nn.Module, on: bool) -> None:
    """BN running statistics follow the first micro-batch of each step only (on rank 0, whose buffers DDP
    broadcasts): as in Caffe, where the test net uses GPU 0's statistics of its 125 images per iteration.
    So the statistics, like the gradients, are the same on 1, 2 or 8 workers."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = on


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def global_mean(value: torch.Tensor, world: int) -> float:
    """The mean of `value` over all ranks, as a Python float (a host sync)."""
    if world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pick_device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is visible; use device: auto or cpu")
    return torch.device("cuda", torch.cuda.current_device())
