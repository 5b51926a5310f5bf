"""The disciplined-approach author's Caffe nets (Smith, arXiv 1803.09820), layer for layer as his prototxts in
shared/paper/da-config/architectures/, built from the same Caffe pieces as models.py (harness/trial/caffe_layers.py).

Each torch module is named after its prototxt layer, with "." where the layer name joins group, block and layer
(group0_block8_proj is `group0.block8.proj`); one `CaffeBatchNorm2d` stands for a BatchNorm + Scale(bias_term: true)
pair and takes the BatchNorm's name. Pooling, ReLU and Dropout are modules too, so a forward pass can be traced
layer by layer against the prototxt (tests/test_da_models.py). Eltwise (a sum) and Concat are written in forward().

- `gresnet56` (gResnet56.prototxt: the CIFAR-10 ResNet-56 of DA1-DA3) and `c100resnet56` (c100Resnet56.prototxt:
  the same file with 100 outputs, CIFAR-100's data; DA4): stem `first` conv 3x3/16 - BN - ReLU; groups of 9, 9
  and 8 blocks (16, 32, 64 channels), each block conv0 3x3 - BN - ReLU - conv1 3x3 - BN plus its shortcut and NO
  ReLU after the sum. The LAST block of groups 0 and 1 (block8) downsamples: conv0 has stride 2 and doubles the
  width, the shortcut is a projection `proj`, a 2x2 stride-2 conv (pad 0) - BN. 55 convolutions (1 + 26 x 2 + 2),
  27 ReLUs (the stem's and one per block); global AVE pool; FC `post_FC` with the msra filler.
- `wide32` (wide32cifar.prototxt, "widenet32 with k=4", DA4's wide ResNet): the same block, 5 per group (the
  prototxt names them block0-3 and block8), 16, 64 and 256 channels; the FIRST block of groups 1 and 2 downsamples
  (stride-2 conv0, 2x2/2 projection). 33 convolutions, 16 ReLUs; FC `fc`, msra.
- `densenet40` (genDensenet40.prototxt, DA4's DenseNet-40, growth rate 12): `pre_conv` 3x3/16; three groups of 12
  layers BN - ReLU - conv 3x3/12 - Dropout(0.2), each layer's output concatenated IN FRONT of its input (the
  Concat's bottoms: the new features, then the old); after groups 0 and 1 a transition BN - ReLU - conv 1x1 (as
  many channels as come in: 160, 304) - Dropout(0.2) - AVE pool 2/2; after group 2 BN - ReLU - global AVE pool
  (448 channels) and FC `post_FC` with the xavier filler. No conv has a bias (bias_term: false). 39 convolutions,
  39 ReLUs, 38 Dropouts.
- cifar100.prototxt, DA4's 3-layer CIFAR-100 net, is Caffe's cifar10_full (examples/cifar10) with ip1's
  num_output 100 (and CIFAR-100's data and mean file): `caffe_cifar10_full` in models.py with 100 classes, nothing
  new here. (cifar3.prototxt is the same net with 10 outputs; genResnet56.prototxt is not built.)

Fillers, as the prototxts: every conv "msra" (normal, std sqrt(2 / fan_in)); biases "constant" 0; Scale 1 and 0.
lr_mult / decay_mult per blob (read by models.caffe_param_multipliers, so the optimizer builder in step.py and
`caffe_sgd` apply them): gresnet56's convs have no `param` block and wide32's only {lr_mult 1, decay_mult 1} for
the weight, so every conv weight AND bias is 1/1 (decayed); wide32's convs set no bias_term, so Caffe's default
(true) gives each a bias. Scale: 1/1. FC: gresnet56 and wide32 {1, 1}, {2, 0}; densenet40 {lr_mult 1}, {lr_mult 2}
(decay_mult 1 both).

Where gresnet56 differs from the super-convergence authors' `resnet56` (models.resnet_cifar(56)): 26 blocks
(9/9/8) instead of 27 (9/9/9); the LAST block of a group downsamples, not the first of the next; the shortcut is
a learned 2x2/2 projection with BN instead of a 3x3/2 AVE pool plus zero channels; no ReLU after the sum (resnet56
has one per block: 55 ReLUs); FC msra instead of xavier, FC bias decay_mult 0 instead of 1; conv biases lr_mult 1
and decayed instead of lr_mult 2 and not decayed; 860,874 parameters instead of 808,682.

BatchNorm moving_average_fraction, the same in the prototxts and in the nets the logs (da-logs/*.log.gz) print:
0.9 in gResnet56, c100Resnet56 and wide32cifar (`bn_momentum` 0.1, TrialConfig's default), 0.999 in
genDensenet40 (`bn_momentum` 0.001): a study sets it through `bn_momentum` = 1 - fraction. The logs ran 4 GPUs,
with 128 images per GPU (gResnet56, wide32cifar), 131 (genDensenet40), 259 (c100Resnet56), each GPU its own BN
statistics. The data layers subtract the mean image without scaling (pixels 0..255); as in resnet_cifar there is no
`input_scale`: every net's first conv feeds BatchNorms only, so the harness's [0, 1] pixels change nothing but eps.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from harness.trial.caffe_layers import CaffeBatchNorm2d, caffe_params, msra_filler, xavier_filler

DA_MODEL_NAMES = ("gresnet56", "c100resnet56", "wide32", "densenet40")


def _conv(cin: int, cout: int, kernel: int, stride: int, pad: int, bias: bool) -> nn.Conv2d:
    """A Convolution with the msra filler and Caffe's default multipliers, 1/1 for both blobs (no DA prototxt gives
    its convolutions anything else)."""
    return caffe_params(msra_filler(nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=bias)))


# --------------------------------------------------------------------------------------------
# The ResNets: gResnet56 / c100Resnet56 and wide32cifar
# --------------------------------------------------------------------------------------------
class ProjectionBlock(nn.Module):
    """conv0 3x3 - BN - ReLU - conv1 3x3 - BN, plus the shortcut; no ReLU after the sum. A block that widens
    (cin != cout) downsamples: conv0 has stride 2 and the shortcut is `proj`, a 2x2 stride-2 conv (pad 0) - BN."""

    def __init__(self, cin: int, cout: int, bn_momentum: float):
        super().__init__()
        self.downsample = cin != cout
        self.conv0 = _conv(cin, cout, 3, 2 if self.downsample else 1, 1, bias=True)
        self.conv0_bn = CaffeBatchNorm2d(cout, bn_momentum)
        self.conv0_relu = nn.ReLU(inplace=True)
        self.conv1 = _conv(cout, cout, 3, 1, 1, bias=True)
        self.conv1_bn = CaffeBatchNorm2d(cout, bn_momentum)
        if self.downsample:
            self.proj = _conv(cin, cout, 2, 2, 0, bias=True)
            self.proj_bn = CaffeBatchNorm2d(cout, bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1_bn(self.conv1(self.conv0_relu(self.conv0_bn(self.conv0(x)))))
        return out + (self.proj_bn(self.proj(x)) if self.downsample else x)


class DAResNet(nn.Module):
    """stem conv 3x3/16 - BN - ReLU, groups of `ProjectionBlock`s, global AVE pool, FC (msra; {1, 1}, {2, 0}).

    `groups`: per group its blocks as (name, output channels); a block whose width differs from its input's
    downsamples. `stem`, `pool`, `fc`: the prototxt's names of those layers."""

    def __init__(self, groups: tuple[list[tuple[str, int]], ...], stem: str, pool: str, fc: str, name: str,
                 num_classes: int, in_channels: int, image_size: int, bn_momentum: float):
        super().__init__()
        self.names = (stem, pool, fc)
        self.add_module(stem, _conv(in_channels, 16, 3, 1, 1, bias=True))
        self.add_module(f"{stem}_bn", CaffeBatchNorm2d(16, bn_momentum))
        self.add_module(f"{stem}_relu", nn.ReLU(inplace=True))
        width, side = 16, image_size
        for g, blocks in enumerate(groups):
            group = OrderedDict()
            for block, out in blocks:
                if out != width and side % 2:  # the 2x2/2 projection would give floor(side / 2), conv0 ceil
                    raise ValueError(f"{name} halves the image twice and needs sizes divisible by 4, "
                                     f"got {image_size}x{image_size}")
                side = side // 2 if out != width else side
                group[block], width = ProjectionBlock(width, out, bn_momentum), out
            self.add_module(f"group{g}", nn.Sequential(group))
        self.add_module(pool, nn.AdaptiveAvgPool2d(1))  # Caffe's global_pooling AVE
        self.add_module(fc, caffe_params(msra_filler(nn.Linear(width, num_classes)), bias=(2.0, 0.0)))
        self.n_groups = len(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem, pool, fc = self.names
        x = getattr(self, f"{stem}_relu")(getattr(self, f"{stem}_bn")(getattr(self, stem)(x)))
        for g in range(self.n_groups):
            x = getattr(self, f"group{g}")(x)
        return getattr(self, fc)(torch.flatten(getattr(self, pool)(x), 1))


# gResnet56: 9 blocks at 16 and 32 channels whose last widens, then 8 at 64. wide32cifar: 5 per group.
GRESNET56_GROUPS = (
    [(f"block{b}", 16) for b in range(8)] + [("block8", 32)],
    [(f"block{b}", 32) for b in range(8)] + [("block8", 64)],
    [(f"block{b}", 64) for b in range(8)],
)
WIDE32_GROUPS = tuple([(f"block{b}", width) for b in (0, 1, 2, 3, 8)] for width in (16, 64, 256))


def gresnet56(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, bn_momentum: float = 0.1) -> nn.Module:
    """gResnet56.prototxt (see the module docstring); bn_momentum = 1 - moving_average_fraction (0.9)."""
    return DAResNet(GRESNET56_GROUPS, "first", "post_pool", "post_FC", "gresnet56",
                    num_classes, in_channels, image_size, bn_momentum)


def c100resnet56(num_classes: int = 100, in_channels: int = 3, image_size: int = 32,
                 bn_momentum: float = 0.1) -> nn.Module:
    """c100Resnet56.prototxt: gResnet56.prototxt with 100 outputs."""
    return DAResNet(GRESNET56_GROUPS, "first", "post_pool", "post_FC", "c100resnet56",
                    num_classes, in_channels, image_size, bn_momentum)


def wide32(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, bn_momentum: float = 0.1) -> nn.Module:
    """wide32cifar.prototxt (see the module docstring); bn_momentum = 1 - moving_average_fraction (0.9)."""
    return DAResNet(WIDE32_GROUPS, "first_conv", "global_avg_pool", "fc", "wide32",
                    num_classes, in_channels, image_size, bn_momentum)


# --------------------------------------------------------------------------------------------
# DenseNet-40: genDensenet40
# --------------------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    """BN - ReLU - conv 3x3 (growth channels, no bias) - Dropout, concatenated in front of the layer's input."""

    def __init__(self, cin: int, growth: int, dropout: float, bn_momentum: float):
        super().__init__()
        self.bn = CaffeBatchNorm2d(cin, bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.conv = _conv(cin, growth, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.dropout(self.conv(self.relu(self.bn(x)))), x], dim=1)


class DADenseNet(nn.Module):
    """pre_conv 3x3/16, then per group `layers` DenseLayers and its last layer `b{layers}`: a transition (BN - ReLU -
    conv 1x1 - Dropout - AVE pool 2/2, rounded up as Caffe does) or, after the last group, BN - ReLU - global AVE
    pool; FC post_FC (xavier; {lr_mult 1}, {lr_mult 2})."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, bn_momentum: float,
                 layers: int = 12, growth: int = 12, dropout: float = 0.2, groups: int = 3):
        super().__init__()
        if image_size < 2 ** (groups - 1):
            raise ValueError(f"densenet40 pools 2x2 {groups - 1} times and needs images of at least "
                             f"{2 ** (groups - 1)}x{2 ** (groups - 1)} pixels, got {image_size}x{image_size}")
        self.pre_conv = _conv(in_channels, 16, 3, 1, 1, bias=False)
        width = 16
        for g in range(groups):
            group = OrderedDict()
            for i in range(layers):
                group[f"b{i}"], width = DenseLayer(width, growth, dropout, bn_momentum), width + growth
            last = [("bn", CaffeBatchNorm2d(width, bn_momentum)), ("relu", nn.ReLU(inplace=True))]
            if g < groups - 1:
                last += [("conv", _conv(width, width, 1, 1, 0, bias=False)), ("dropout", nn.Dropout(dropout)),
                         ("pool", nn.AvgPool2d(2, 2, ceil_mode=True))]  # pad 0: an edge window divides by its pixels
            else:
                last.append(("pool", nn.AdaptiveAvgPool2d(1)))
            group[f"b{layers}"] = nn.Sequential(OrderedDict(last))
            self.add_module(f"group{g}", nn.Sequential(group))
        self.post_FC = caffe_params(xavier_filler(nn.Linear(width, num_classes)), bias=(2.0, 1.0))
        self.n_groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_conv(x)
        for g in range(self.n_groups):
            x = getattr(self, f"group{g}")(x)
        return self.post_FC(torch.flatten(x, 1))


def densenet40(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
               bn_momentum: float = 0.001) -> nn.Module:
    """genDensenet40.prototxt (see the module docstring); bn_momentum = 1 - moving_average_fraction (0.999)."""
    return DADenseNet(num_classes, in_channels, image_size, bn_momentum)


BUILDERS = {"gresnet56": gresnet56, "c100resnet56": c100resnet56, "wide32": wide32, "densenet40": densenet40}


def build_da_model(name: str, in_channels: int, num_classes: int, image_size: int, bn_momentum: float) -> nn.Module:
    """The DA net `name` (one of DA_MODEL_NAMES) for in_channels x image_size x image_size inputs."""
    if name not in BUILDERS:
        raise ValueError(f"unknown disciplined-approach model '{name}'; allowed: {', '.join(DA_MODEL_NAMES)}")
    return BUILDERS[name](num_classes, in_channels, image_size, bn_momentum)
