"""The networks: the authors' Caffe ResNets, Caffe's cifar10_full and LeNet, a pre-activation ResNet, MLPs
and a tiny CNN.

`build_model(cfg, in_channels, num_classes, image_size)` is the one entry point the trainer uses; it also builds
the disciplined-approach author's nets (da_models.py). Caffe's BatchNorm and fillers, which both files' Caffe nets
use, are in caffe_layers.py.
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

`caffe_cifar10_full` and `caffe_lenet` are BVLC Caffe's example nets, layer for layer as
examples/cifar10/cifar10_full_train_test.prototxt (the net of the CLR paper, arXiv 1506.01186, Section 4.1.1)
and examples/mnist/lenet_train_test.prototxt: pooling rounds its output size UP as Caffe does, LRN is Caffe's
WITHIN_CHANNEL LRN, fillers and the per-blob lr_mult / decay_mult (`caffe_param_multipliers`) are the
prototxt's. The harness feeds pixels scaled to [0, 1]; each net multiplies its input back to the scale its
Caffe data layer produced (`input_scale`: cifar10_full has no `scale`, so 255; LeNet has 0.00390625 = 1/256).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from harness.trial.caffe_layers import CaffeBatchNorm2d, caffe_params, gaussian_filler, msra_filler, xavier_filler
from harness.trial.da_models import DA_MODEL_NAMES, build_da_model

MLP_ACTIVATIONS = ("relu", "tanh", "sigmoid", "square400", "square1", "square20")  # squareC: x * x * C


# --------------------------------------------------------------------------------------------
# The authors' Caffe ResNet (post-activation, conv biases, avg-pool + zero-concat shortcuts)
# --------------------------------------------------------------------------------------------
def _caffe_conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return msra_filler(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=True))


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
    """(lr_mult, decay_mult) of every parameter of a Caffe model, as its prototxt sets them.

    A layer that carries its prototxt's `param` blocks (`caffe_mults`: parameter name -> (lr_mult, decay_mult),
    set by `caffe_params`; the cifar10_full and LeNet nets) gets those. Otherwise the `resnet_cifar` rules:
    conv weight 1/1, conv bias 2/0; Scale (BN gamma, beta) has no `param` block, so Caffe's defaults 1/1
    apply (they ARE weight-decayed); FC weight 1/1, FC bias 2/1 (lr_mult only, decay_mult defaults to 1)."""
    mults = {}
    for mod_name, module in model.named_modules():
        declared = getattr(module, "caffe_mults", None)
        for p_name, _ in module.named_parameters(recurse=False):
            if declared is not None:
                mult = declared[p_name]
            elif isinstance(module, nn.Conv2d):
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
# BVLC Caffe's example nets: cifar10_full (the CLR paper's CIFAR-10 net) and LeNet
# --------------------------------------------------------------------------------------------
CAFFE_MULTIPLIER_MODELS = ("resnet20", "resnet56", "resnet110", "caffe_cifar10_full", "caffe_lenet", *DA_MODEL_NAMES)
"""The models whose per-parameter (lr_mult, decay_mult) `caffe_param_multipliers` gives as their prototxt sets them."""


def caffe_pool_size(size: int, kernel: int, stride: int, pad: int = 0) -> int:
    """Caffe PoolingLayer's output size: rounded UP (PyTorch's ceil_mode), and with padding the last window must
    start inside the image (pooling_layer.cpp, Reshape)."""
    out = math.ceil((size + 2 * pad - kernel) / stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


class WithinChannelLRN(nn.Module):
    """Caffe's LRN layer with `norm_region: WITHIN_CHANNEL` (lrn_layer.cpp): y = x * (1 + alpha * m)^-beta, m the
    mean of x^2 over a local_size x local_size window (Caffe's AVE pooling, pad (local_size - 1) / 2, stride 1,
    whose divisor counts the padded zeros: always local_size^2 here). Not torch's LocalResponseNorm, which
    normalises ACROSS_CHANNELS."""

    def __init__(self, local_size: int = 3, alpha: float = 5e-5, beta: float = 0.75):
        super().__init__()
        if local_size % 2 != 1:
            raise ValueError(f"LRN only supports odd values for local_size, got {local_size}")
        self.local_size, self.alpha, self.beta = local_size, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_sq = F.avg_pool2d(x * x, self.local_size, stride=1, padding=self.local_size // 2,
                               count_include_pad=True)
        return x * (1.0 + self.alpha * mean_sq).pow(-self.beta)

    def extra_repr(self) -> str:
        return f"local_size={self.local_size}, alpha={self.alpha}, beta={self.beta}, WITHIN_CHANNEL"


class CaffeCifar10Full(nn.Module):
    """Caffe's `cifar10_full` (examples/cifar10/cifar10_full_train_test.prototxt), the net of the CLR paper's
    CIFAR-10 runs (arXiv 1506.01186, Section 4.1.1):

        conv1 32 5x5 pad 2 -> MAX pool 3/2 -> ReLU -> LRN -> conv2 32 5x5 pad 2 -> ReLU -> AVE pool 3/2 -> LRN
        -> conv3 64 5x5 pad 2 -> ReLU -> AVE pool 3/2 -> ip1 (num_classes)

    LRN: local_size 3, alpha 5e-5, beta 0.75, WITHIN_CHANNEL. Pools round up: 32 -> 16 -> 8 -> 4, so ip1 sees
    64 x 4 x 4 (with floor it would be 15 -> 7 -> 3); 28 -> 14 -> 7 -> 3; 8 -> 4 -> 2 -> 1. Fillers: gaussian std 1e-4
    (conv1), 0.01 (conv2, conv3, ip1), biases 0. `param` blocks: conv1 and conv2 {lr_mult 1}, {lr_mult 2}
    (decay_mult defaults to 1: their biases ARE decayed); conv3 none (1/1 for both blobs); ip1
    {lr_mult 1, decay_mult 250}, {lr_mult 2, decay_mult 0}. No BatchNorm, no dropout.

    The data layer subtracts the mean image and does not scale (pixels in 0..255): `input_scale` 255 turns the
    harness's [0, 1] pixels back into Caffe's, so the fillers and LRN's alpha see the magnitudes they were set for.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 input_scale: float = 255.0):
        super().__init__()
        self.input_scale = input_scale
        side = image_size
        for _ in range(3):  # the convs keep the size (5x5, pad 2); each pool is 3/2, rounded up
            side = caffe_pool_size(side, 3, 2)
        if side < 1:
            raise ValueError(f"caffe_cifar10_full needs inputs of at least 3x3 pixels, got {image_size}x{image_size}")
        self.conv1 = caffe_params(gaussian_filler(nn.Conv2d(in_channels, 32, 5, padding=2), 1e-4), bias=(2.0, 1.0))
        self.norm1 = WithinChannelLRN(3, 5e-5, 0.75)
        self.conv2 = caffe_params(gaussian_filler(nn.Conv2d(32, 32, 5, padding=2), 0.01), bias=(2.0, 1.0))
        self.norm2 = WithinChannelLRN(3, 5e-5, 0.75)
        self.conv3 = caffe_params(gaussian_filler(nn.Conv2d(32, 64, 5, padding=2), 0.01))
        self.ip1 = caffe_params(gaussian_filler(nn.Linear(64 * side * side, num_classes), 0.01),
                                weight=(1.0, 250.0), bias=(2.0, 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x * self.input_scale)
        x = self.norm1(F.relu(F.max_pool2d(x, 3, 2, ceil_mode=True)))
        x = self.norm2(F.avg_pool2d(F.relu(self.conv2(x)), 3, 2, ceil_mode=True))
        x = F.avg_pool2d(F.relu(self.conv3(x)), 3, 2, ceil_mode=True)  # pad 0: the edge divides by in-image pixels
        return self.ip1(torch.flatten(x, 1))


class CaffeLeNet(nn.Module):
    """Caffe's LeNet (examples/mnist/lenet_train_test.prototxt):

        conv1 20 5x5 -> MAX pool 2/2 -> conv2 50 5x5 -> MAX pool 2/2 -> ip1 500 -> ReLU -> ip2 (num_classes)

    No nonlinearity between the convolutions (as the prototxt). 28x28 inputs: 24 -> 12 -> 8 -> 4, ip1 sees
    50 x 4 x 4 = 800; 431,080 parameters. Fillers: xavier weights, constant 0 biases. Every layer has
    {lr_mult 1}, {lr_mult 2} (decay_mult defaults to 1: biases ARE decayed). The data layer scales pixels by
    0.00390625 = 1/256 (no mean): `input_scale` 255/256 turns the harness's x/255 into Caffe's x/256.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 input_scale: float = 255.0 / 256.0):
        super().__init__()
        self.input_scale = input_scale
        side = caffe_pool_size(image_size - 4, 2, 2) - 4
        side = caffe_pool_size(side, 2, 2) if side >= 1 else 0
        if side < 1:
            raise ValueError(f"caffe_lenet needs inputs of at least 13x13 pixels (Caffe's LeNet: 28x28 MNIST), "
                             f"got {image_size}x{image_size}")
        self.conv1 = caffe_params(xavier_filler(nn.Conv2d(in_channels, 20, 5)), bias=(2.0, 1.0))
        self.conv2 = caffe_params(xavier_filler(nn.Conv2d(20, 50, 5)), bias=(2.0, 1.0))
        self.ip1 = caffe_params(xavier_filler(nn.Linear(50 * side * side, 500)), bias=(2.0, 1.0))
        self.ip2 = caffe_params(xavier_filler(nn.Linear(500, num_classes)), bias=(2.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x * self.input_scale), 2, 2, ceil_mode=True)
        x = F.max_pool2d(self.conv2(x), 2, 2, ceil_mode=True)
        return self.ip2(F.relu(self.ip1(torch.flatten(x, 1))))


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
class Square(nn.Module):
    """x * x * c (activation `squareC`). Its derivative 2cx carries c into every gradient that passes through it,
    which is why activation_mystery asks whether c acts as an LR multiplier."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


class Square400(Square):
    """x * x * 400: the seed experiment's activation (784-300-10 MLP, 94% on MNIST after one epoch)."""

    def __init__(self):
        super().__init__(400.0)


def _activation(name: str) -> nn.Module:
    makers = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "square400": Square400,
              "square1": lambda: Square(1.0), "square20": lambda: Square(20.0)}
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
               "mlp", "small_cnn", "caffe_cifar10_full", "caffe_lenet", *DA_MODEL_NAMES)


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
    if name == "caffe_cifar10_full":
        return CaffeCifar10Full(in_channels, num_classes, image_size)
    if name == "caffe_lenet":
        return CaffeLeNet(in_channels, num_classes, image_size)
    if name in DA_MODEL_NAMES:  # the disciplined-approach author's nets (da_models.py)
        return build_da_model(name, in_channels, num_classes, image_size, cfg.bn_momentum)
    raise ValueError(f"unknown model '{name}'; allowed: {', '.join(MODEL_NAMES)}")
