"""Caffe's layers and fillers that every Caffe net of the harness is built from (models.py: the super-convergence
authors' ResNets, cifar10_full, LeNet; da_models.py: the disciplined-approach author's nets).

- `CaffeBatchNorm2d`: Caffe's BatchNorm + Scale(bias_term: true) pair, with Caffe's running statistics;
- the weight fillers `msra_filler`, `xavier_filler`, `gaussian_filler` (each with Caffe's default bias filler,
  "constant" 0), written out where torch.nn.init has no exact twin (Caffe's fan_in is count / num);
- `caffe_params`: a layer's prototxt `param` blocks as (lr_mult, decay_mult) per blob, which
  models.caffe_param_multipliers reads and the optimizer builder (trial/step.py) applies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CaffeBatchNorm2d(nn.BatchNorm2d):
    """Caffe's BatchNorm + Scale(bias_term: true) layer pair, including Caffe's running statistics.

    Caffe keeps sum_i f^(t-i) x_i / sum_i f^(t-i) with f = moving_average_fraction = 1 - momentum:
    the first training batch sets the statistics outright and the weight of each new batch then falls
    to `momentum`. nn.BatchNorm2d instead starts from mean 0 / variance 1 and mixes in `momentum`
    from the first step, which leaves test-time statistics off for ~1/momentum steps (1000 at f = 0.999).
    Steady state, parameters, buffers and state_dict are those of nn.BatchNorm2d.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self._steps: int | None = None  # host-side copy of num_batches_tracked (no GPU sync per step)

    def _load_from_state_dict(self, *args, **kwargs):
        self._steps = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(x)
        self._check_input_dim(x)
        if self._steps is None:
            self._steps = int(self.num_batches_tracked)
        self._steps += 1
        self.num_batches_tracked.add_(1)
        weight_of_batch = self.momentum / (1.0 - (1.0 - self.momentum) ** self._steps)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            True, weight_of_batch, self.eps)


def caffe_params(layer: nn.Module, weight: tuple[float, float] = (1.0, 1.0),
                 bias: tuple[float, float] = (1.0, 1.0)) -> nn.Module:
    """Record the layer's prototxt `param` blocks as (lr_mult, decay_mult) per blob (Caffe's default 1/1 where
    the prototxt gives none) for `caffe_param_multipliers`."""
    layer.caffe_mults = {"weight": weight, "bias": bias}
    return layer


def _zero_bias(layer: nn.Module) -> nn.Module:
    if layer.bias is not None:  # Caffe's default bias filler: "constant", value 0
        nn.init.zeros_(layer.bias)
    return layer


def msra_filler(layer: nn.Module) -> nn.Module:
    """Caffe's "msra" weight filler (variance_norm FAN_IN: normal, std sqrt(2 / fan_in), fan_in = count / num):
    torch's kaiming_normal_ in fan_in mode, for a convolution (in x k x k) and an InnerProduct (in) alike."""
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    return _zero_bias(layer)


def gaussian_filler(layer: nn.Module, std: float) -> nn.Module:
    """Caffe's "gaussian" weight filler (mean 0) and "constant" bias filler (value 0)."""
    nn.init.normal_(layer.weight, 0.0, std)
    return _zero_bias(layer)


def xavier_filler(layer: nn.Module) -> nn.Module:
    """Caffe's "xavier" weight filler (variance_norm FAN_IN: uniform +-sqrt(3 / fan_in), fan_in = count / num),
    "constant" bias filler (0). Not torch's xavier_uniform_, which averages fan_in and fan_out."""
    bound = math.sqrt(3.0 / (layer.weight.numel() // layer.weight.shape[0]))
    nn.init.uniform_(layer.weight, -bound, bound)
    return _zero_bias(layer)
