"""The networks: the authors' Caffe ResNets, a pre-activation ResNet, MLPs and a tiny CNN.

`build_model(cfg, in_channels, num_classes, image_size)` is the one entry point the trainer uses.
Every model uses all of its parameters in every forward pass (DDP needs no `find_unused_parameters`)
and is initialised only from torch's global RNG (same `torch.manual_seed` -> same weights).

`resnet_cifar` follows `shared/paper/caffe-config/Resnet{20,56,110}Cifar.prototxt` layer for layer:
- every conv is 3x3 pad 1 WITH a bias (msra = kaiming normal, fan_in; bias constant 0), followed by
  BatchNorm + Scale(bias_term) = one affine BatchNorm (eps 1e-5, Caffe's default);
- stem conv(3->16)-BN-ReLU, then 3 stages of n = (depth - 2) / 6 blocks, conv-BN-ReLU-conv-BN, + shortcut, ReLU;
- the first block of stages 2 and 3 keeps its input width (16 resp. 32 channels): its first conv has
  stride 2 and its shortcut is a 3x3 stride-2 AVE pooling without padding, which Caffe rounds UP
  (32 -> 16 -> 8). Only AFTER the block's ReLU are as many zero channels concatenated (DummyData + Concat),
  so the zeros enter the next block's input and identity shortcut;
- an 8x8 average pool (here: global average pool, the same on 32x32 inputs), FC with Caffe's "xavier"
  filler (uniform +-sqrt(3 / fan_in)), bias 0.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

MLP_ACTIVATIONS = ("relu", "tanh", "sigmoid", "square400")


# --------------------------------------------------------------------------------------------
# The authors' Caffe ResNet (post-activation, conv biases, avg-pool + zero-concat shortcuts)
# --------------------------------------------------------------------------------------------
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


def _caffe_conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=True)
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")  # Caffe "msra": std sqrt(2/fan_in)
    nn.init.zeros_(conv.bias)
    return conv


class CaffeBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, + shortcut, ReLU. With downsample: the first conv has stride 2, the shortcut
    is Caffe's AVE pooling (kernel 3, stride 2, pad 0, ceil rounding) and the output is the ReLU'd sum
    followed by as many all-zero channels (width doubles)."""

    def __init__(self, channels: int, downsample: bool, bn_momentum: float):
        super().__init__()
        self.downsample = downsample
        self.conv1 = _caffe_conv(channels, channels, stride=2 if downsample else 1)
        self.bn1 = CaffeBatchNorm2d(channels, bn_momentum)
        self.conv2 = _caffe_conv(channels, channels)
        self.bn2 = CaffeBatchNorm2d(channels, bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if not self.downsample:
            return F.relu(out + x)
        # pad 0: count_include_pad is moot; ceil_mode counts only in-image pixels at the edge, as Caffe does
        shortcut = F.avg_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        if shortcut.shape[-2:] != out.shape[-2:]:
            raise ValueError(f"Caffe ResNet downsampling needs even feature-map sizes, got {tuple(x.shape[-2:])}")
        out = F.relu(out + shortcut)
        return torch.cat([out, torch.zeros_like(out)], dim=1)


class CaffeResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int, in_channels: int, bn_momentum: float):
        super().__init__()
        self.conv = _caffe_conv(in_channels, 16)
        self.bn = CaffeBatchNorm2d(16, bn_momentum)
        blocks: list[nn.Module] = []
        for stage, width in enumerate((16, 32, 64)):
            for b in range(blocks_per_stage):
                if stage > 0 and b == 0:  # the previous stage's width; this block's zero-concat doubles it
                    blocks.append(CaffeBlock(width // 2, downsample=True, bn_momentum=bn_momentum))
                else:
                    blocks.append(CaffeBlock(width, downsample=False, bn_momentum=bn_momentum))
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        bound = math.sqrt(3.0 / self.fc.in_features)  # Caffe "xavier" (variance_norm FAN_IN)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _blocks_per_stage(depth: int) -> int:
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (e.g. 20, 56, 110), got {depth!r}")
    return (depth - 2) // 6


def resnet_cifar(depth: int, num_classes: int = 10, in_channels: int = 3, bn_momentum: float = 0.1) -> nn.Module:
    """The authors' Caffe ResNet-`depth` (see module docstring). bn_momentum = 1 - moving_average_fraction."""
    return CaffeResNet(_blocks_per_stage(depth), num_classes, in_channels, bn_momentum)


def caffe_param_multipliers(model: nn.Module) -> dict[str, tuple[float, float]]:
    """(lr_mult, decay_mult) of every parameter of a `resnet_cifar` model, as the prototxt sets them:
    conv weight 1/1, conv bias 2/0; Scale (BN gamma, beta) has no `param` block, so Caffe's defaults 1/1
    apply (they ARE weight-decayed); FC weight 1/1, FC bias 2/1 (lr_mult only, decay_mult defaults to 1)."""
    mults = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            if isinstance(module, nn.Conv2d):
                mult = (1.0, 1.0) if p_name == "weight" else (2.0, 0.0)
            elif isinstance(module, nn.BatchNorm2d):
                mult = (1.0, 1.0)
            elif isinstance(module, nn.Linear):
                mult = (1.0, 1.0) if p_name == "weight" else (2.0, 1.0)
            else:
                raise TypeError(f"no Caffe multipliers for {type(module).__name__} parameter {mod_name}.{p_name}")
            mults[f"{mod_name}.{p_name}" if mod_name else p_name] = mult
    return mults


# --------------------------------------------------------------------------------------------
# Pre-activation ResNet (He et al. 2016, "Identity mappings"), as most PyTorch reproductions
# --------------------------------------------------------------------------------------------
class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv + shortcut; a 1x1 stride-s projection (of the pre-activated input)
    where the shape changes. No conv biases."""

    def __init__(self, cin: int, cout: int, stride: int, bn_momentum: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int, in_channels: int, bn_momentum: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks, cin = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(PreActBlock(cin, width, stride, bn_momentum))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(64, momentum=bn_momentum)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # as He et al.'s code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def preact_resnet_cifar(depth: int, num_classes: int = 10, in_channels: int = 3,
                        bn_momentum: float = 0.1) -> nn.Module:
    """Pre-activation ResNet-`depth` (6n+2): stages 16/32/64, projection shortcuts, final BN-ReLU, avgpool, FC."""
    return PreActResNet(_blocks_per_stage(depth), num_classes, in_channels, bn_momentum)


# --------------------------------------------------------------------------------------------
# MLP and a tiny CNN
# --------------------------------------------------------------------------------------------
class Square400(nn.Module):
    """x * x * 400: the seed experiment's activation (784-300-10 MLP, 94% on MNIST after one epoch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x * 400.0


def _activation(name: str) -> nn.Module:
    makers = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "square400": Square400}
    if name not in makers:
        raise ValueError(f"unknown MLP activation '{name}'; allowed: {', '.join(MLP_ACTIVATIONS)}")
    return makers[name]()


def mlp(in_features: int, hidden=(300,), num_classes: int = 10, activation: str = "relu",
        final_relu: bool = False) -> nn.Module:
    """Flatten, then Linear-activation per hidden width, then Linear to the classes (PyTorch default init).
    final_relu=True adds a ReLU after the last Linear (logits >= 0; the seed's unstable variant)."""
    widths = [in_features, *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), _activation(activation)]
    layers.append(nn.Linear(widths[-1], num_classes))
    if final_relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def small_cnn(in_channels: int = 1, num_classes: int = 10, bn_momentum: float = 0.1) -> nn.Module:
    """conv16-BN-ReLU, conv32/stride 2-BN-ReLU, global average pool, FC: any input of 2x2 pixels or more."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, momentum=bn_momentum), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32, momentum=bn_momentum), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


# --------------------------------------------------------------------------------------------
MODEL_NAMES = ("resnet20", "resnet56", "resnet110", "preact_resnet20", "preact_resnet56", "preact_resnet110",
               "mlp", "small_cnn")


def build_model(cfg, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The network named by cfg.model, for in_channels x image_size x image_size inputs."""
    name = cfg.model
    if name in ("resnet20", "resnet56", "resnet110"):
        return resnet_cifar(int(name[len("resnet"):]), num_classes, in_channels, cfg.bn_momentum)
    if name in ("preact_resnet20", "preact_resnet56", "preact_resnet110"):
        return preact_resnet_cifar(int(name[len("preact_resnet"):]), num_classes, in_channels, cfg.bn_momentum)
    if name == "mlp":
        return mlp(in_channels * image_size ** 2, tuple(cfg.mlp_hidden), num_classes, cfg.mlp_activation,
                   cfg.mlp_final_relu)
    if name == "small_cnn":
        return small_cnn(in_channels, num_classes, cfg.bn_momentum)
    raise ValueError(f"unknown model '{name}'; allowed: {', '.join(MODEL_NAMES)}")
