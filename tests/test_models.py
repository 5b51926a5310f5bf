"""harness.trial.models: the Caffe ResNets are pinned layer by layer against the authors' prototxt files."""

from __future__ import annotations

import math
import time
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import MODELS, TrialConfig
from harness.trial.models import (
    CAFFE_MULTIPLIER_MODELS,
    CaffeBatchNorm2d,
    CaffeBlock,
    CaffeCifar10Full,
    CaffeLeNet,
    CaffeResNet,
    PreActResNet,
    Square400,
    WithinChannelLRN,
    build_model,
    caffe_param_multipliers,
    caffe_pool_size,
    mlp,
    preact_resnet_cifar,
    resnet_cifar,
    small_cnn,
)

try:
    from tests.paper_material import caffe_layers
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from paper_material import caffe_layers

# Written down once from the prototxt files (see test_param_count_matches_prototxt): conv weights + biases,
# Scale gamma + beta, FC weight + bias. Less than the usual "0.85M" ResNet-56 because the downsampling
# blocks keep 16 / 32 channels and double the width only by concatenating zeros after the block.
CAFFE_PARAMS = {20: 224_042, 56: 808_682, 110: 1_685_642}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core box: a second intra-op thread mostly waits for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def caffe_net(depth: int, image: int = 32) -> tuple[list[dict], int]:
    """The TRAIN net's layers, each with `in_shape` / `out_shape` (C, H, W) and `blobs` (numel per learnable
    blob), and its learnable parameter count."""
    layers = caffe_layers(depth)
    shapes: dict[str, tuple[int, int, int]] = {}
    params = 0
    for L in layers:
        ins = [shapes[b] for b in L["bottom"] if b in shapes]
        t = L["type"]
        if t == "Data":
            out = (3, image, image)
        elif t == "Convolution":
            c, h, w = ins[0]
            k, s, p = L["kernel_size"], L["stride"], L["pad"]
            out = (L["num_output"], (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
            L["blobs"] = [c * k * k * L["num_output"]] + ([L["num_output"]] if L["bias_term"] else [])
        elif t == "Pooling":
            c, h, w = ins[0]
            k, s, p = L["kernel_size"], L["stride"], L["pad"]
            out = (c, math.ceil((h + 2 * p - k) / s) + 1, math.ceil((w + 2 * p - k) / s) + 1)
        elif t in ("BatchNorm", "ReLU"):
            out = ins[0]  # BatchNorm: mean, variance, scale factor are statistics, not learnable
        elif t == "Scale":
            out = ins[0]
            L["blobs"] = [ins[0][0]] * (2 if L["bias_term"] else 1)
        elif t == "Eltwise":
            assert len(set(ins)) == 1, f"{L['name']}: summing shapes {ins}"
            out = ins[0]
        elif t == "DummyData":
            out = tuple(L["dims"][1:])
        elif t == "Concat":
            assert len({s[1:] for s in ins}) == 1
            out = (sum(s[0] for s in ins), *ins[0][1:])
        elif t == "InnerProduct":
            fan_in = math.prod(ins[0])
            out = (L["num_output"], 1, 1)
            L["blobs"] = [fan_in * L["num_output"]] + ([L["num_output"]] if L["bias_term"] else [])
        elif t in ("Accuracy", "SoftmaxWithLoss"):
            continue
        else:
            raise AssertionError(f"unexpected layer type {t}")
        L["in_shape"], L["out_shape"] = (ins[0] if ins else None), out
        params += sum(L.setdefault("blobs", []))
        for top in L["top"]:
            shapes[top] = out
    return layers, params


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


# ------------------------------------------------------------------------------------------------
# The Caffe ResNet against the prototxt
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [20, 56, 110])
def test_param_count_matches_prototxt(depth):
    _, caffe_params = caffe_net(depth)
    model = resnet_cifar(depth)
    print(f"ResNet-{depth}: prototxt {caffe_params} params, ours {n_params(model)}")
    assert n_params(model) == caffe_params == CAFFE_PARAMS[depth]
    # BN running statistics are buffers, not parameters
    assert all("running" not in name and "num_batches" not in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_conv_layers_and_shapes_match_prototxt(depth):
    layers, _ = caffe_net(depth)
    proto = [(L["in_shape"][0], L["num_output"], L["kernel_size"], L["stride"], L["pad"], L["bias_term"],
              L["out_shape"])
             for L in layers if L["type"] == "Convolution"]
    assert len(proto) == depth - 1  # + the FC layer = depth
    model = resnet_cifar(depth)
    out_shapes = []
    hooks = [c.register_forward_hook(lambda m, i, o: out_shapes.append(tuple(o.shape[1:]))) for c in convs(model)]
    model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    ours = [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0], c.bias is not None, s)
            for c, s in zip(convs(model), out_shapes)]
    assert ours == proto


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_prototxt_structure_is_what_the_model_assumes(depth):
    layers, _ = caffe_net(depth)
    by_type = {}
    for L in layers:
        by_type.setdefault(L["type"], []).append(L)
    model = resnet_cifar(depth)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(by_type["BatchNorm"]) == len(by_type["Scale"]) == len(bns) == depth - 1
    assert all(L["bias_term"] for L in by_type["Scale"])  # Scale has a bias: BN affine=True
    assert all(L["weight_filler"] == "msra" for L in by_type["Convolution"])
    assert [L["weight_filler"] for L in by_type["InnerProduct"]] == ["xavier"]
    assert len(by_type["InnerProduct"]) == 1 and by_type["InnerProduct"][0]["num_output"] == 10
    # the 2 downsampling shortcuts: AVE 3x3 / 2 without pad (ceil rounding gives 16 and 8), then zeros concat
    pools = [(L["pool"], L["kernel_size"], L["stride"], L["pad"], L["out_shape"]) for L in by_type["Pooling"]]
    assert pools == [("AVE", 3, 2, 0, (16, 16, 16)), ("AVE", 3, 2, 0, (32, 8, 8)), ("AVE", 8, 1, 0, (64, 1, 1))]
    assert [L["out_shape"] for L in by_type["Concat"]] == [(32, 16, 16), (64, 8, 8)]
    assert sum(isinstance(m, CaffeBlock) and m.downsample for m in model.modules()) == 2
    assert len(by_type["Eltwise"]) == 3 * (depth - 2) // 6


@pytest.mark.parametrize("depth", [20, 56])
def test_lr_and_decay_multipliers_match_prototxt(depth):
    layers, _ = caffe_net(depth)
    proto: dict[tuple[float, float], int] = {}
    for L in layers:
        if L["type"] == "BatchNorm":
            continue  # its 3 blobs are statistics (lr_mult 0), buffers in PyTorch
        for i, numel in enumerate(L.get("blobs", [])):
            mult = tuple(L["mults"][i]) if i < len(L["mults"]) else (1.0, 1.0)
            proto[mult] = proto.get(mult, 0) + numel
    model = resnet_cifar(depth)
    mults = caffe_param_multipliers(model)
    ours: dict[tuple[float, float], int] = {}
    for name, p in model.named_parameters():
        ours[mults[name]] = ours.get(mults[name], 0) + p.numel()
    assert ours == proto
    assert mults["fc.bias"] == (2.0, 1.0) and mults["bn.weight"] == mults["bn.bias"] == (1.0, 1.0)
    assert mults["conv.bias"] == (2.0, 0.0)


def caffe_ave_pool(x: torch.Tensor, k: int = 3, s: int = 2, pad: int = 0) -> torch.Tensor:
    """Caffe PoolingLayer AVE, written out: ceil output size, divisor = window clipped to the padded image."""
    n, c, h, w = x.shape
    oh, ow = math.ceil((h + 2 * pad - k) / s) + 1, math.ceil((w + 2 * pad - k) / s) + 1
    out = torch.zeros(n, c, oh, ow, dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * s - pad, j * s - pad
            h1, w1 = min(h0 + k, h + pad), min(w0 + k, w + pad)
            size = (h1 - h0) * (w1 - w0)
            h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, h), min(w1, w)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].sum(dim=(2, 3)) / size
    return out


def test_downsampling_shortcut_is_caffe_avgpool_plus_zero_channels():
    torch.manual_seed(0)
    model = resnet_cifar(20)
    block = model.blocks[3]  # stage 2, block 1
    assert isinstance(block, CaffeBlock) and block.downsample and block.conv1.in_channels == 16
    x = torch.randn(2, 16, 32, 32)
    out = block(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.count_nonzero(out[:, 16:]) == 0  # concatenated zeros
    with torch.no_grad():  # silence the residual branch: what is left is the shortcut
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    out = block(x)
    torch.testing.assert_close(out[:, :16], F.relu(caffe_ave_pool(x)))
    assert torch.count_nonzero(out[:, 16:]) == 0
    # edge windows average over the 6 (or 4) in-image pixels, not 9: the last row/col differs from /9
    assert not torch.allclose(caffe_ave_pool(x)[..., -1, :], F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 3, 2)[..., -1, :])


def test_output_shapes_and_odd_sizes():
    model = resnet_cifar(20)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert resnet_cifar(20, num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert resnet_cifar(20, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="even feature-map sizes"):
        model(torch.randn(1, 3, 7, 7))


def test_caffe_init_msra_fan_in_zero_biases_xavier_fc():
    torch.manual_seed(0)
    model = resnet_cifar(56)
    cs = convs(model)
    assert all(torch.count_nonzero(c.bias) == 0 for c in cs)
    z = torch.cat([(c.weight / math.sqrt(2.0 / (c.in_channels * 9))).flatten() for c in cs])
    assert abs(z.std().item() - 1.0) < 0.02 and abs(z.mean().item()) < 0.01
    stem = cs[0].weight  # 3 -> 16: fan_in 27 (std 0.272) vs fan_out 144 (std 0.118)
    assert abs(stem.std().item() / math.sqrt(2 / 27) - 1) < 0.15
    bound = math.sqrt(3 / 64)
    assert model.fc.weight.abs().max() <= bound and abs(model.fc.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
    assert torch.count_nonzero(model.fc.bias) == 0
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.affine and m.eps == 1e-5 and bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in bns)


def test_caffe_batchnorm_running_stats_are_caffes_normalised_average():
    torch.manual_seed(0)
    bn = CaffeBatchNorm2d(3, momentum=0.05)
    x1, x2 = torch.randn(8, 3, 4, 4) + 2, torch.randn(8, 3, 4, 4) - 1
    bn(x1)  # the first batch sets the statistics (PyTorch would give 0.05 * mean)
    torch.testing.assert_close(bn.running_mean, x1.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, x1.var(dim=(0, 2, 3), unbiased=True))
    bn(x2)
    torch.testing.assert_close(bn.running_mean, (0.95 * x1.mean(dim=(0, 2, 3)) + x2.mean(dim=(0, 2, 3))) / 1.95)
    assert int(bn.num_batches_tracked) == 2
    # training output = plain batch norm; eval uses the running statistics
    torch.testing.assert_close(bn(x1), F.batch_norm(x1, None, None, bn.weight, bn.bias, True, 0.0, 1e-5))
    bn.eval()
    torch.testing.assert_close(bn(x2), F.batch_norm(x2, bn.running_mean, bn.running_var, bn.weight, bn.bias))
    # after loading a long-trained state the batch weight is the steady-state momentum
    bn.train()
    state = {**bn.state_dict(), "num_batches_tracked": torch.tensor(10_000)}
    bn.load_state_dict(state)
    before = bn.running_mean.clone()
    bn(x1)
    torch.testing.assert_close(bn.running_mean, 0.95 * before + 0.05 * x1.mean(dim=(0, 2, 3)))


@pytest.mark.parametrize("model", ["resnet20", "preact_resnet20", "small_cnn"])
def test_bn_momentum_reaches_every_bn(model):
    net = build_model(TrialConfig(model=model, bn_momentum=0.05), 3, 10, 32)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.05 for m in bns)


# ------------------------------------------------------------------------------------------------
# BVLC Caffe's example nets against their prototxt layer tables
# ------------------------------------------------------------------------------------------------
# examples/cifar10/cifar10_full_train_test.prototxt (BVLC Caffe), the TRAIN net after its Data layer, written down
# from the file: (name, type, settings). Convolution/InnerProduct: num_output, kernel, pad, stride, the `param`
# blocks as (lr_mult, decay_mult) per blob (missing fields: Caffe's default 1), the gaussian filler's std.
CIFAR10_FULL = [
    ("conv1", "Convolution", dict(num_output=32, kernel_size=5, pad=2, stride=1, mults=[(1, 1), (2, 1)], std=1e-4)),
    ("pool1", "Pooling", dict(pool="MAX", kernel_size=3, stride=2)),
    ("relu1", "ReLU", {}),
    ("norm1", "LRN", dict(local_size=3, alpha=5e-5, beta=0.75, norm_region="WITHIN_CHANNEL")),
    ("conv2", "Convolution", dict(num_output=32, kernel_size=5, pad=2, stride=1, mults=[(1, 1), (2, 1)], std=0.01)),
    ("relu2", "ReLU", {}),
    ("pool2", "Pooling", dict(pool="AVE", kernel_size=3, stride=2)),
    ("norm2", "LRN", dict(local_size=3, alpha=5e-5, beta=0.75, norm_region="WITHIN_CHANNEL")),
    ("conv3", "Convolution", dict(num_output=64, kernel_size=5, pad=2, stride=1, mults=[], std=0.01)),
    ("relu3", "ReLU", {}),
    ("pool3", "Pooling", dict(pool="AVE", kernel_size=3, stride=2)),
    ("ip1", "InnerProduct", dict(num_output=10, mults=[(1, 250), (2, 0)], std=0.01)),
]
# examples/mnist/lenet_train_test.prototxt: every weight filler "xavier", every layer {lr_mult 1}, {lr_mult 2}.
LENET = [
    ("conv1", "Convolution", dict(num_output=20, kernel_size=5, pad=0, stride=1, mults=[(1, 1), (2, 1)])),
    ("pool1", "Pooling", dict(pool="MAX", kernel_size=2, stride=2)),
    ("conv2", "Convolution", dict(num_output=50, kernel_size=5, pad=0, stride=1, mults=[(1, 1), (2, 1)])),
    ("pool2", "Pooling", dict(pool="MAX", kernel_size=2, stride=2)),
    ("ip1", "InnerProduct", dict(num_output=500, mults=[(1, 1), (2, 1)])),
    ("relu1", "ReLU", {}),
    ("ip2", "InnerProduct", dict(num_output=10, mults=[(1, 1), (2, 1)])),
]
# By hand from the tables, 32x32x3 CIFAR-10: conv1 3*32*25+32 = 2,432; conv2 32*32*25+32 = 25,632;
# conv3 32*64*25+64 = 51,264; pools 32 -> 16 -> 8 -> 4 (rounded up; floor would give 15, 7, 3), so ip1
# 64*4*4*10+10 = 10,250. LeNet, 28x28x1 MNIST: conv1 1*20*25+20 = 520; conv2 20*50*25+50 = 25,050;
# 28 -> 24 -> 12 -> 8 -> 4, ip1 50*4*4*500+500 = 400,500; ip2 500*10+10 = 5,010.
CIFAR10_FULL_PARAMS = 2_432 + 25_632 + 51_264 + 10_250   # 89,578
LENET_PARAMS = 520 + 25_050 + 400_500 + 5_010            # 431,080


def layer_table(table, channels: int, image: int) -> tuple[list[dict], int]:
    """Caffe's shape arithmetic over a layer table: each layer with `out_shape` (C, H, W) and `blobs` (numel and
    (lr_mult, decay_mult) per learnable blob); and the learnable parameter count."""
    shape, params, layers = (channels, image, image), 0, []
    for name, kind, p in table:
        c, h, w = shape
        blobs = []
        if kind == "Convolution":
            k, pad, s = p["kernel_size"], p["pad"], p["stride"]
            shape = (p["num_output"], (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1)
            blobs = [c * k * k * p["num_output"], p["num_output"]]
        elif kind == "Pooling":  # Caffe rounds up
            shape = (c, math.ceil((h - p["kernel_size"]) / p["stride"]) + 1,
                     math.ceil((w - p["kernel_size"]) / p["stride"]) + 1)
        elif kind == "InnerProduct":
            blobs = [c * h * w * p["num_output"], p["num_output"]]
            shape = (p["num_output"], 1, 1)
        mults = [tuple(map(float, m)) for m in p.get("mults", [])]
        mults += [(1.0, 1.0)] * (len(blobs) - len(mults))
        layers.append({"name": name, "type": kind, "out_shape": shape, "blobs": list(zip(blobs, mults)), **p})
        params += sum(blobs)
    return layers, params


@pytest.mark.parametrize("name,table,channels,image,expected", [
    ("caffe_cifar10_full", CIFAR10_FULL, 3, 32, CIFAR10_FULL_PARAMS),
    ("caffe_lenet", LENET, 1, 28, LENET_PARAMS),
])
def test_caffe_example_nets_param_count_and_shapes_match_prototxt(name, table, channels, image, expected):
    layers, proto_params = layer_table(table, channels, image)
    assert proto_params == expected
    model = build_model(TrialConfig(model=name), channels, 10, image)
    print(f"{name}: prototxt {proto_params} params, ours {n_params(model)}")
    assert n_params(model) == expected
    # every learnable layer, in order, with the prototxt's output shape; the FC layers see the pooled maps
    shapes = {}

    def record(name):
        def hook(module, inputs, output):
            shapes[name] = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]))
        return hook

    learnable = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if m in learnable]
    out = model(torch.randn(2, channels, image, image))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 10)
    proto = [L for L in layers if L["type"] in ("Convolution", "InnerProduct")]
    assert [n for n, m in model.named_modules() if m in learnable] == [L["name"] for L in proto]
    for L in proto:
        ours_in, ours_out = shapes[L["name"]]
        if L["type"] == "Convolution":
            assert ours_out == L["out_shape"], L["name"]
        else:
            assert ours_out == (L["num_output"],)
            before = layers[layers.index(L) - 1]["out_shape"]
            assert ours_in == (math.prod(before),), L["name"]  # e.g. cifar10_full's ip1: 64 x 4 x 4 = 1024


def test_cifar10_full_structure_rounding_and_sizes():
    layers, _ = layer_table(CIFAR10_FULL, 3, 32)
    pools = [(L["pool"], L["out_shape"]) for L in layers if L["type"] == "Pooling"]
    assert pools == [("MAX", (32, 16, 16)), ("AVE", (32, 8, 8)), ("AVE", (64, 4, 4))]
    assert [caffe_pool_size(n, 3, 2) for n in (32, 16, 8, 28, 14, 7, 2)] == [16, 8, 4, 14, 7, 3, 1]
    model = CaffeCifar10Full()
    assert model.ip1.in_features == 1024 and model.ip1.out_features == 10
    assert [type(m) for m in model.children()] == [nn.Conv2d, WithinChannelLRN, nn.Conv2d, WithinChannelLRN,
                                                   nn.Conv2d, nn.Linear]
    assert [(m.local_size, m.alpha, m.beta) for m in model.modules() if isinstance(m, WithinChannelLRN)] == [
        (3, 5e-5, 0.75)] * 2
    # one-channel 28x28 (Fashion-MNIST) and 8x8 (digits) inputs: 28 -> 14 -> 7 -> 3, 8 -> 4 -> 2 -> 1
    assert CaffeCifar10Full(1, 10, 28).ip1.in_features == 64 * 3 * 3
    assert CaffeCifar10Full(1, 10, 8)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert CaffeCifar10Full(3, 100, 32)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="at least 3x3"):
        CaffeCifar10Full(3, 10, 1)


def test_lenet_structure_and_small_inputs():
    model = CaffeLeNet()
    assert [type(m) for m in model.children()] == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]
    assert model.ip1.in_features == 800 and all(c.padding == (0, 0) for c in convs(model))
    assert CaffeLeNet(1, 10, 13)(torch.randn(2, 1, 13, 13)).shape == (2, 10)
    with pytest.raises(ValueError, match="at least 13x13"):
        CaffeLeNet(1, 10, 12)
    with pytest.raises(ValueError, match="at least 13x13"):
        build_model(TrialConfig(model="caffe_lenet"), 1, 10, 8)  # digits are too small for LeNet


@pytest.mark.parametrize("name,table,channels,image", [
    ("caffe_cifar10_full", CIFAR10_FULL, 3, 32), ("caffe_lenet", LENET, 1, 28)])
def test_caffe_example_nets_lr_and_decay_multipliers_match_prototxt(name, table, channels, image):
    layers, _ = layer_table(table, channels, image)
    proto = {f"{L['name']}.{blob}": mult for L in layers for blob, (_, mult) in zip(("weight", "bias"), L["blobs"])}
    model = build_model(TrialConfig(model=name), channels, 10, image)
    assert caffe_param_multipliers(model) == proto
    assert name in CAFFE_MULTIPLIER_MODELS
    if name == "caffe_cifar10_full":  # spelled out: the surprises of cifar10_full's prototxt
        assert proto["ip1.weight"] == (1.0, 250.0) and proto["ip1.bias"] == (2.0, 0.0)
        assert proto["conv1.bias"] == proto["conv2.bias"] == (2.0, 1.0)  # lr_mult only: decay_mult stays 1
        assert proto["conv3.weight"] == proto["conv3.bias"] == (1.0, 1.0)  # no param block at all


def test_caffe_example_nets_fillers():
    torch.manual_seed(0)
    full = CaffeCifar10Full()
    for layer, std in ((full.conv1, 1e-4), (full.conv2, 0.01), (full.conv3, 0.01), (full.ip1, 0.01)):
        assert abs(layer.weight.std().item() / std - 1) < 0.1 and abs(layer.weight.mean().item()) < 0.1 * std
        assert torch.count_nonzero(layer.bias) == 0
    lenet = CaffeLeNet()
    for layer in (lenet.conv1, lenet.conv2, lenet.ip1, lenet.ip2):  # xavier: uniform +-sqrt(3 / fan_in)
        fan_in = layer.weight.numel() // layer.weight.shape[0]
        bound = math.sqrt(3 / fan_in)
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(layer.bias) == 0
    assert fan_in == 500


def test_caffe_example_nets_see_caffes_pixel_scale():
    """The harness's pixels are x/255; cifar10_full's data layer gives x (mean-subtracted, not scaled), LeNet's
    x * 0.00390625. The same weights fed Caffe's pixels with input_scale 1 give the same outputs."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32) - 0.5
    full = CaffeCifar10Full()
    assert full.input_scale == 255.0
    ref = CaffeCifar10Full(input_scale=1.0)
    ref.load_state_dict(full.state_dict())
    torch.testing.assert_close(full(x), ref(x * 255.0))
    lenet = CaffeLeNet()
    assert lenet.input_scale == 255.0 / 256.0
    pixels = torch.randint(0, 256, (4, 1, 28, 28)).float()
    ref = CaffeLeNet(input_scale=1.0)
    ref.load_state_dict(lenet.state_dict())
    torch.testing.assert_close(lenet(pixels / 255.0), ref(pixels * 0.00390625))


def caffe_lrn_within_channel(x: torch.Tensor, size: int, alpha: float, beta: float) -> torch.Tensor:
    """lrn_layer.cpp's WITHIN_CHANNEL path written out: square, AVE pool (pad (size-1)/2, stride 1; Caffe's divisor
    is the window clipped to the PADDED image, i.e. size^2 here), power(shift 1, scale alpha, power -beta), product."""
    n, c, h, w = x.shape
    pad = (size - 1) // 2
    sq = x * x
    scale = torch.empty_like(x)
    for i in range(h):
        for j in range(w):
            h0, w0 = i - pad, j - pad
            h1, w1 = min(h0 + size, h + pad), min(w0 + size, w + pad)
            count = (h1 - h0) * (w1 - w0)
            window = sq[:, :, max(h0, 0):min(h1, h), max(w0, 0):min(w1, w)]
            scale[:, :, i, j] = 1 + alpha * window.sum(dim=(2, 3)) / count
    return x * scale.pow(-beta)


def test_within_channel_lrn_is_caffes():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64) * 100  # pixel-scale activations: the alpha term matters
    lrn = WithinChannelLRN(3, 5e-5, 0.75)
    torch.testing.assert_close(lrn(x), caffe_lrn_within_channel(x, 3, 5e-5, 0.75))
    torch.testing.assert_close(WithinChannelLRN(5, 1e-3, 0.5)(x), caffe_lrn_within_channel(x, 5, 1e-3, 0.5))
    assert not torch.allclose(lrn(x), x)  # it does something at this scale ...
    # ... and each output depends on its own channel only (torch's LocalResponseNorm mixes channels)
    y = x.clone()
    y[:, 1] *= 3
    torch.testing.assert_close(lrn(y)[:, [0, 2]], lrn(x)[:, [0, 2]])
    with pytest.raises(ValueError, match="odd"):
        WithinChannelLRN(4)


def test_cifar10_full_pools_are_caffes():
    """MAX pool then two AVE pools, all 3/2 rounded up; AVE at the edge divides by the in-image pixels only."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(F.avg_pool2d(x, 3, 2, ceil_mode=True), caffe_ave_pool(x))
    assert F.max_pool2d(x, 3, 2, ceil_mode=True).shape[-2:] == (8, 8)
    assert F.max_pool2d(x, 3, 2).shape[-2:] == (7, 7)  # what floor rounding would give


# ------------------------------------------------------------------------------------------------
# Every model: deterministic, DDP-ready, depth validation
# ------------------------------------------------------------------------------------------------
ALL = [("resnet20", 3, 32), ("preact_resnet20", 3, 32), ("mlp", 1, 28), ("small_cnn", 1, 8),
       ("caffe_cifar10_full", 3, 32), ("caffe_cifar10_full", 1, 8), ("caffe_lenet", 1, 28)]


@pytest.mark.parametrize("name,channels,size", ALL)
def test_deterministic_and_every_parameter_gets_a_gradient(name, channels, size):
    cfg = TrialConfig(model=name)
    torch.manual_seed(3)
    a = build_model(cfg, channels, 10, size)
    torch.manual_seed(3)
    b = build_model(cfg, channels, 10, size)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(4, channels, size, size)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    a(x).square().sum().backward()  # no unused parameters: DDP needs no find_unused_parameters
    assert all(p.grad is not None for p in a.parameters())


@pytest.mark.parametrize("bad", [2, 21, 45, 0, -4])
def test_depth_validation(bad):
    for build in (resnet_cifar, preact_resnet_cifar):
        with pytest.raises(ValueError, match="6n\\+2"):
            build(bad)


def test_other_6n_plus_2_depths_work():
    assert len(resnet_cifar(8).blocks) == 3 and len(resnet_cifar(32).blocks) == 15


# ------------------------------------------------------------------------------------------------
# Pre-activation ResNet
# ------------------------------------------------------------------------------------------------
def test_preact_resnet_shapes_and_params():
    model = preact_resnet_cifar(20)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert all(c.bias is None for c in convs(model))
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs(model) if c.kernel_size == (1, 1)] == [
        (16, 32, 2), (32, 64, 2)]
    for depth in (20, 56):
        # projection shortcuts and full-width downsampling blocks outweigh the Caffe net's conv biases
        assert n_params(preact_resnet_cifar(depth)) > CAFFE_PARAMS[depth]
    assert n_params(preact_resnet_cifar(56)) == 855_578
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * 9 + 1  # two per block + the final BN


# ------------------------------------------------------------------------------------------------
# MLP and small CNN
# ------------------------------------------------------------------------------------------------
def test_square400():
    torch.testing.assert_close(Square400()(torch.tensor([-1.0, 0.5, 2.0])), torch.tensor([400.0, 100.0, 1600.0]))
    net = mlp(784, (300,), activation="square400")
    assert [type(m) for m in net] == [nn.Flatten, nn.Linear, Square400, nn.Linear]


def test_mlp_sizes_and_final_relu():
    net = mlp(784, (200, 100), activation="relu")
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [(784, 200), (200, 100),
                                                                                         (100, 10)]
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    assert (net(x) < 0).any()
    relu_net = mlp(784, (200, 100), final_relu=True)
    out = relu_net(x)
    assert out.shape == (64, 10) and (out >= 0).all() and (out == 0).any()
    assert isinstance(mlp(784, (300,), activation="tanh")[2], nn.Tanh)
    with pytest.raises(ValueError, match="square400"):
        mlp(784, activation="gelu")


def test_small_cnn_shapes():
    assert small_cnn(1)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert small_cnn(1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert small_cnn(3, 100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_small_cnn_learns_digits_in_three_epochs():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images[:1437], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[:1437])
    torch.manual_seed(0)
    net = small_cnn(1, 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    start = time.perf_counter()
    for _ in range(3):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            F.cross_entropy(net(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    elapsed = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    print(f"small_cnn: 3 epochs on 1437 digits in {elapsed:.2f}s, train acc {acc:.3f}")
    assert acc > 0.8  # speed is the benchmark's business (harness.bench), not a test's


# ------------------------------------------------------------------------------------------------
# build_model
# ------------------------------------------------------------------------------------------------
def test_build_model_dispatch():
    def build(model, **kw):
        return build_model(TrialConfig(model=model, **kw), 3, 10, 32)

    r56 = build("resnet56")
    assert isinstance(r56, CaffeResNet) and len(r56.blocks) == 27
    assert isinstance(build("resnet110"), CaffeResNet) and n_params(build("resnet20")) == CAFFE_PARAMS[20]
    p20 = build("preact_resnet20")
    assert isinstance(p20, PreActResNet) and len(p20.blocks) == 9
    m = build_model(TrialConfig(model="mlp", mlp_hidden=(200, 100), mlp_activation="square400",
                                mlp_final_relu=True), 1, 10, 28)
    assert m[1].in_features == 784 and isinstance(m[2], Square400) and isinstance(m[-1], nn.ReLU)
    assert build_model(TrialConfig(model="mlp"), 3, 100, 32)[1].in_features == 3 * 32 * 32
    sc = build_model(TrialConfig(model="small_cnn"), 1, 10, 8)
    assert sc(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert isinstance(build("caffe_cifar10_full"), CaffeCifar10Full)
    assert isinstance(build_model(TrialConfig(model="caffe_lenet"), 1, 10, 28), CaffeLeNet)
    for name in MODELS:  # every name config.py allows is buildable (LeNet's two 5x5 convs need >= 13 pixels)
        size = 28 if name == "caffe_lenet" else 8
        assert isinstance(build_model(TrialConfig(model=name), 1, 10, size), nn.Module)


def test_build_model_unknown_name():
    with pytest.raises(ValueError) as err:
        build_model(types.SimpleNamespace(model="vgg16", bn_momentum=0.1), 3, 10, 32)
    msg = str(err.value)
    assert "\n" not in msg and "vgg16" in msg and all(name in msg for name in MODELS)
