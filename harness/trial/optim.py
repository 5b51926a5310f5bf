"""Caffe's SGD, as the authors' solver ran it (`optimizer: caffe_sgd`).

Caffe's SGDSolver (sgd_solver.cpp: Regularize, ComputeUpdateValue, then Blob::Update) does, per parameter:

    g' = g + weight_decay * decay_mult * w              # L2 regularization into the gradient
    v  = momentum * v + lr * lr_mult * g'               # the LR is applied INSIDE the momentum update
    w  = w - v

With `nesterov=True` it is Caffe's NesterovSolver (nesterov_solver.cpp), whose step is

    v' = momentum * v + lr * lr_mult * g';   w = w - ((1 + momentum) * v' - momentum * v)

torch.optim.SGD applies the LR after the momentum buffer (`b = m b + g'; w -= lr b`). The two agree while
the LR is constant, and differ whenever it changes, i.e. at every step of a cyclical or one-cycle schedule:
Caffe's history carries the old step sizes, torch's rescales all of it by the new LR. torch's SGD has no
option for the Caffe form (and no per-group lr multiplier that survives an LR scheduler, which overwrites
each group's `lr`), hence this small Optimizer.

Param groups carry `lr_mult` and `decay_mult` (Caffe's per-blob multipliers, default 1), besides `lr`,
`momentum` and `weight_decay`. LR schedulers set `lr` (and `momentum`) per group as usual; `lr_mult` scales
it here, so a bias with `lr_mult: 2` follows the schedule at twice its LR, as in the prototxt.
"""

from __future__ import annotations

import torch


class CaffeSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "lr_mult": 1.0,
                    "decay_mult": 1.0, "nesterov": nesterov}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            rate = group["lr"] * group["lr_mult"]
            decay = group["weight_decay"] * group["decay_mult"]
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if decay == 0 else p.grad.add(p, alpha=decay)
                state = self.state[p]
                if "history" not in state:
                    state["history"] = torch.zeros_like(p)  # Caffe's history_ blobs start at zero
                v = state["history"]
                if group["nesterov"]:
                    previous = v.clone()
                    v.mul_(momentum).add_(grad, alpha=rate)
                    p.sub_(v * (1 + momentum) - previous * momentum)
                else:
                    v.mul_(momentum).add_(grad, alpha=rate)
                    p.sub_(v)
        return loss
