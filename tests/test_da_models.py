"""harness.trial.da_models against the disciplined-approach author's prototxts (da-config/architectures/, or the
committed tables tests/fixtures/da_NAME.csv in a clone without ../shared).

Everything expected is counted from the parsed prototxt here: parameters, convolutions, ReLUs and what each reads,
the layer order, fillers, dropout, BN fractions, lr_mult / decay_mult per blob. A small interpreter runs the
prototxt's graph (bottoms and tops, Eltwise, Concat in bottom order) with the torch model's weights, so a shortcut
read from the wrong blob, a ReLU after a sum or a swapped Concat cannot pass. No Ray, no MLflow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import TrialConfig
from harness.trial.caffe_layers import CaffeBatchNorm2d
from harness.trial.da_models import BUILDERS, DA_MODEL_NAMES, DenseLayer, ProjectionBlock, build_da_model
from harness.trial.models import (
    CAFFE_MULTIPLIER_MODELS,
    CaffeCifar10Full,
    WithinChannelLRN,
    build_model,
    caffe_param_multipliers,
)
from harness.trial.step import build_optimizer

try:
    from tests.paper_material import da_layers
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from paper_material import da_layers

NETS = {"gresnet56": "gResnet56", "c100resnet56": "c100Resnet56", "wide32": "wide32cifar",
        "densenet40": "genDensenet40"}
# Written down once from the prototxts (test_param_count_matches_prototxt counts them), 3 x 32 x 32 inputs
DA_PARAMS = {"gresnet56": 860_874, "c100resnet56": 866_724, "wide32": 5_903_626, "densenet40": 1_019_722}
SIZES = [(3, 32), (1, 28)]  # CIFAR; Fashion-MNIST at quick scale
TRACED = {nn.Conv2d: "Convolution", CaffeBatchNorm2d: "BatchNorm", nn.ReLU: "ReLU", nn.Dropout: "Dropout",
          nn.AvgPool2d: "Pooling", nn.AdaptiveAvgPool2d: "Pooling", nn.Linear: "InnerProduct"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models on a shared 2-core box: a second intra-op thread mostly waits for a busy core (measured here:
    the module takes several times longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ the prototxt
def caffe_graph(proto: str, channels: int = 3, image: int = 32) -> tuple[list[dict], int]:
    """The TRAIN net's layers with Caffe's shape arithmetic: `in_shapes`, `out_shape` (C, H, W), `blobs` ((numel,
    (lr_mult, decay_mult)) per learnable blob), `producers` (the layer that last wrote each bottom blob); and the
    learnable parameter count (BatchNorm's three blobs are statistics: buffers in torch)."""
    shapes: dict[str, tuple[int, ...]] = {}
    writer: dict[str, dict] = {}
    layers, params = [], 0
    for L in da_layers(proto):
        t = L["type"]
        if t in ("Softmax", "SoftmaxWithLoss", "Accuracy"):
            continue
        ins = [shapes[b] for b in L["bottom"]]
        L["in_shapes"], L["producers"] = ins, [writer[b] for b in L["bottom"]]
        sizes = []
        if t == "Data":
            out = (channels, image, image)
        elif t == "Convolution":
            (c, h, w), k, s, p = ins[0], L["kernel_size"], L["stride"], L["pad"]
            out = (L["num_output"], (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
            sizes = [c * k * k * L["num_output"]] + ([L["num_output"]] if L["bias_term"] else [])
        elif t == "Pooling":
            (c, h, w), k, s = ins[0], L["kernel_size"], L["stride"]
            out = (c, 1, 1) if L["global_pooling"] else (c, math.ceil((h - k) / s) + 1, math.ceil((w - k) / s) + 1)
        elif t in ("BatchNorm", "ReLU", "Dropout", "LRN"):
            out = ins[0]
        elif t == "Scale":
            out, sizes = ins[0], [ins[0][0]] * (2 if L["bias_term"] else 1)
        elif t == "Eltwise":
            assert len(set(ins)) == 1, f"{L['name']} sums shapes {ins}"
            out = ins[0]
        elif t == "Concat":
            assert len({s[1:] for s in ins}) == 1, f"{L['name']} concatenates shapes {ins}"
            out = (sum(s[0] for s in ins), *ins[0][1:])
        elif t == "InnerProduct":
            out = (L["num_output"], 1, 1)
            sizes = [math.prod(ins[0]) * L["num_output"]] + ([L["num_output"]] if L["bias_term"] else [])
        else:
            raise AssertionError(f"unexpected layer type {t}")
        mults = [tuple(m) for m in L["mults"]] + [(1.0, 1.0)] * len(sizes)  # Caffe's default: 1 and 1
        L["out_shape"], L["blobs"] = out, list(zip(sizes, mults))
        params += sum(sizes)
        for top in L["top"]:
            shapes[top], writer[top] = out, L
        layers.append(L)
    return layers, params


def of_type(layers: list[dict], kind: str) -> list[dict]:
    return [L for L in layers if L["type"] == kind]


def torch_name(L: dict) -> str:
    """The torch module a Caffe layer is: itself, or for a Scale the BatchNorm it follows (one CaffeBatchNorm2d)."""
    if L["type"] == "Scale":
        assert L["producers"][0]["type"] == "BatchNorm", f"{L['name']} does not follow a BatchNorm"
        return L["producers"][0]["name"]
    return L["name"]


# ------------------------------------------------------------------------------------------------ the torch model
def build(name: str, channels: int = 3, image: int = 32) -> nn.Module:
    """Through the trainer's own entry point, with the prototxt's BN fraction as bn_momentum."""
    layers, _ = caffe_graph(NETS[name], channels, image)
    fraction = float(of_type(layers, "BatchNorm")[0]["moving_average_fraction"][0])
    classes = of_type(layers, "InnerProduct")[-1]["num_output"]
    return build_model(TrialConfig(model=name, bn_momentum=1 - fraction), channels, classes, image)


def modules_by_caffe_name(model: nn.Module) -> dict[str, nn.Module]:
    named = {n.replace(".", "_"): m for n, m in model.named_modules() if n}
    assert len(named) == len([n for n, _ in model.named_modules() if n]), "two modules map to one Caffe name"
    return named


def trace(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, tuple[int, ...]]]:
    """(Caffe name, Caffe type, output shape per image) of every traced module, in the order a forward pass runs."""
    names = {m: n for n, m in modules_by_caffe_name(model).items()}
    seen: list[tuple[str, str, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((names[m], TRACED[type(m)], tuple(o.shape[1:]))))
             for m in names if type(m) in TRACED]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def interpret(layers: list[dict], model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The prototxt's TRAIN graph run blob by blob with the model's weights (looked up by layer name); BatchNorm with
    batch statistics (Caffe's TRAIN phase), Dropout off. Only torch.nn.functional and the prototxt's own settings."""
    mods = modules_by_caffe_name(model)
    blobs: dict[str, torch.Tensor] = {}
    for L in layers:
        t, ins = L["type"], [blobs[b] for b in L["bottom"]]
        m = mods.get(torch_name(L)) if t != "Data" else None
        if t == "Data":
            out = x
        elif t == "Convolution":
            out = F.conv2d(ins[0], m.weight, m.bias, stride=L["stride"], padding=L["pad"])
        elif t == "BatchNorm":
            out = F.batch_norm(ins[0], None, None, training=True, eps=1e-5)  # Caffe's BatchNorm: no affine
        elif t == "Scale":
            out = ins[0] * m.weight[:, None, None] + m.bias[:, None, None]
        elif t == "ReLU":
            out = F.relu(ins[0])
        elif t == "Dropout":
            out = ins[0]
        elif t == "Pooling" and L["global_pooling"]:
            out = ins[0].mean(dim=(2, 3), keepdim=True)
        elif t == "Pooling":
            pool = F.max_pool2d if L["pool"] == "MAX" else F.avg_pool2d
            out = pool(ins[0], L["kernel_size"], L["stride"], ceil_mode=True)  # Caffe rounds up; pad 0 throughout
        elif t == "LRN":
            local_size, alpha, beta, region = L["lrn"]
            assert region == "WITHIN_CHANNEL"
            out = WithinChannelLRN(local_size, alpha, beta)(ins[0])
        elif t == "Eltwise":
            out = ins[0] + ins[1]
        elif t == "Concat":
            out = torch.cat(ins, dim=1)
        elif t == "InnerProduct":
            out = F.linear(torch.flatten(ins[0], 1), m.weight, m.bias)
        for top in L["top"]:
            blobs[top] = out
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("name", DA_MODEL_NAMES)
@pytest.mark.parametrize("channels,image", SIZES)
def test_param_count_matches_prototxt(name, channels, image):
    _, proto_params = caffe_graph(NETS[name], channels, image)
    model = build(name, channels, image)
    print(f"{name} at {channels}x{image}x{image}: prototxt {proto_params} params, ours {n_params(model)}")
    assert n_params(model) == proto_params
    if (channels, image) == (3, 32):
        assert proto_params == DA_PARAMS[name]
    assert all("running" not in n and "num_batches" not in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", DA_MODEL_NAMES)
def test_layers_run_in_prototxt_order_with_its_shapes_and_settings(name):
    """Every convolution, BatchNorm(+Scale), ReLU, Dropout, pooling and InnerProduct, in the prototxt's order, with
    its output shape; each conv's kernel, stride, pad, width and bias; each pooling's kind."""
    layers, _ = caffe_graph(NETS[name])
    proto = [(L["name"], L["type"], L["out_shape"]) for L in layers if L["type"] in TRACED.values()]
    model = build(name)
    ours = [(n, t, s if t != "InnerProduct" else (*s, 1, 1)) for n, t, s in trace(model, torch.randn(2, 3, 32, 32))]
    assert ours == proto
    mods = modules_by_caffe_name(model)
    for L in of_type(layers, "Convolution"):
        c = mods[L["name"]]
        k, s, p = L["kernel_size"], L["stride"], L["pad"]
        assert (c.kernel_size, c.stride, c.padding) == ((k, k), (s, s), (p, p)), L["name"]
        assert (c.in_channels, c.out_channels, c.bias is not None) == (L["in_shapes"][0][0], L["num_output"],
                                                                     L["bias_term"]), L["name"]
    for L in of_type(layers, "Pooling"):
        assert L["pool"] == "AVE"
        pool = mods[L["name"]]
        if L["global_pooling"]:
            assert isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size == 1
        else:
            assert isinstance(pool, nn.AvgPool2d) and (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == \
                (L["kernel_size"], L["stride"], L["pad"], True)
    for L in of_type(layers, "BatchNorm"):  # each BatchNorm is followed by its Scale with a bias: one affine BN
        scale = layers[layers.index(L) + 1]
        assert scale["type"] == "Scale" and scale["bias_term"] and scale["bottom"] == L["top"]
    counts = {t: sum(isinstance(m, k) for m in model.modules()) for k, t in TRACED.items() if k is not nn.AvgPool2d}
    assert counts["Convolution"] == len(of_type(layers, "Convolution"))
    assert counts["ReLU"] == len(of_type(layers, "ReLU"))
    assert counts["BatchNorm"] == len(of_type(layers, "BatchNorm")) == len(of_type(layers, "Scale"))


@pytest.mark.parametrize("name", DA_MODEL_NAMES)
@pytest.mark.parametrize("channels,image", SIZES)
def test_forward_is_the_prototxts_graph(name, channels, image):
    """The model's output equals the prototxt's graph run blob by blob with the same weights."""
    torch.manual_seed(0)
    layers, _ = caffe_graph(NETS[name], channels, image)
    model = build(name, channels, image)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()  # the rest stays in training mode: BN with batch statistics, as the interpreter
    x = torch.randn(2, channels, image, image)
    with torch.no_grad():
        expected = interpret(layers, model, x)
        out = model(x)
    assert out.shape == (2, of_type(layers, "InnerProduct")[-1]["num_output"])
    torch.testing.assert_close(out, expected.reshape(out.shape), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gresnet56", "c100resnet56", "wide32"])
def test_resnets_no_relu_after_the_sum_and_2x2_projection_shortcuts(name):
    layers, _ = caffe_graph(NETS[name])
    convs, relus, sums = of_type(layers, "Convolution"), of_type(layers, "ReLU"), of_type(layers, "Eltwise")
    # every ReLU reads a BatchNorm+Scale output, never a sum: one per block (on conv0) plus the stem's
    assert {L["producers"][0]["type"] for L in relus} == {"Scale"}
    projections = [c for c in convs if c["kernel_size"] == 2]
    assert len(relus) == len(sums) + 1 and len(convs) == 1 + 2 * len(sums) + len(projections)
    assert len(projections) == 2 and all((c["stride"], c["pad"]) == (2, 0) for c in projections)
    model = build(name)
    blocks = [m for m in model.modules() if isinstance(m, ProjectionBlock)]
    assert len(blocks) == len(sums) and sum(b.downsample for b in blocks) == len(projections)
    torch.manual_seed(0)
    out = blocks[0](torch.randn(2, 16, 8, 8))
    assert (out < 0).any()  # a block's output is the bare sum
    if name != "wide32":  # gResnet56: the LAST block of groups 0 and 1 downsamples
        assert [c["name"] for c in projections] == ["group0_block8_proj", "group1_block8_proj"]
        assert (len(convs), len(relus)) == (55, 27)


def test_densenet_concat_puts_the_new_features_first_and_transitions_keep_the_width():
    layers, _ = caffe_graph("genDensenet40")
    concats = of_type(layers, "Concat")
    assert len(concats) == 36 and all(L["producers"][0]["type"] == "Dropout" for L in concats)
    transitions = [L for L in of_type(layers, "Convolution") if L["kernel_size"] == 1]
    assert [(L["in_shapes"][0][0], L["num_output"]) for L in transitions] == [(160, 160), (304, 304)]
    model = build("densenet40").eval()
    layer = model.group0.b0
    assert isinstance(layer, DenseLayer)
    x = torch.randn(2, 16, 8, 8)
    out = layer(x)
    assert out.shape == (2, 28, 8, 8) and torch.equal(out[:, 12:], x)


@pytest.mark.parametrize("name", DA_MODEL_NAMES)
def test_lr_and_decay_multipliers_match_prototxt(name):
    """Per blob: (numel, (lr_mult, decay_mult)) as the prototxt's `param` blocks (Caffe's 1/1 where it has none);
    the Scale's blobs are the BN module's weight and bias. The optimizer builder groups by exactly these."""
    layers, _ = caffe_graph(NETS[name])
    proto = {f"{torch_name(L)}.{blob}": b for L in layers for blob, b in zip(("weight", "bias"), L["blobs"])}
    model = build(name)
    mults = caffe_param_multipliers(model)
    ours = {}
    for n, p in model.named_parameters():
        module, _, blob = n.rpartition(".")
        ours[f"{module.replace('.', '_')}.{blob}"] = (p.numel(), mults[n])
    assert ours == proto
    assert name in CAFFE_MULTIPLIER_MODELS
    cfg = TrialConfig(model=name, optimizer="caffe_sgd", weight_decay=1e-4)
    groups = {(g["lr_mult"], g["decay_mult"]): sum(p.numel() for p in g["params"])
              for g in build_optimizer(model, cfg).param_groups}
    expected: dict[tuple[float, float], int] = {}
    for numel, mult in proto.values():
        expected[mult] = expected.get(mult, 0) + numel
    assert groups == expected
    fc = of_type(layers, "InnerProduct")[0]
    assert [m for _, m in fc["blobs"]] == ([(1.0, 1.0), (2.0, 1.0)] if name == "densenet40" else
                                           [(1.0, 1.0), (2.0, 0.0)])


def _check_filler(kind: str, w: torch.Tensor, what: str) -> None:
    """Caffe's msra (normal, std sqrt(2 / fan_in)) or xavier (uniform +-sqrt(3 / fan_in)), fan_in = count / num."""
    fan_in = w[0].numel()
    tol = 6 / math.sqrt(2 * w.numel())  # six standard errors of a sample std
    if kind == "msra":
        std = math.sqrt(2 / fan_in)
        assert abs(w.std().item() / std - 1) < tol and abs(w.mean().item()) < 6 * std / math.sqrt(w.numel()), what
        if w.numel() >= 1000:  # normal, not uniform: a uniform never reaches 1.8 standard deviations
            assert w.abs().max().item() > 2.5 * std, what
    else:
        assert kind == "xavier", f"{what}: filler {kind}"
        bound = math.sqrt(3 / fan_in)
        assert w.abs().max().item() <= bound and abs(w.std().item() / (bound / math.sqrt(3)) - 1) < tol, what


@pytest.mark.parametrize("name", DA_MODEL_NAMES)
def test_fillers_match_prototxt(name):
    torch.manual_seed(0)
    layers, _ = caffe_graph(NETS[name])
    mods = modules_by_caffe_name(build(name))
    learnable = of_type(layers, "Convolution") + of_type(layers, "InnerProduct")
    for L in learnable:
        m = mods[L["name"]]
        _check_filler(L["weight_filler"], m.weight.detach(), L["name"])
        assert m.bias is None or torch.count_nonzero(m.bias) == 0, L["name"]  # bias filler: constant 0
    convs = torch.cat([(mods[L["name"]].weight / math.sqrt(2 / mods[L["name"]].weight[0].numel())).flatten()
                       for L in of_type(layers, "Convolution")])
    assert abs(convs.std().item() - 1) < 0.01 and abs(convs.mean().item()) < 0.01  # every conv: msra, pooled
    bns = [m for m in mods.values() if isinstance(m, CaffeBatchNorm2d)]
    assert all(m.affine and m.eps == 1e-5 and bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in bns)


@pytest.mark.parametrize("name", DA_MODEL_NAMES)
def test_bn_fraction_and_dropout_match_prototxt(name):
    """The builder's default bn_momentum is 1 - the prototxt's moving_average_fraction (0.9 ResNets and wide net,
    0.999 DenseNet); build_model passes the trial's bn_momentum to every BN; Dropout modules carry the ratio."""
    layers, _ = caffe_graph(NETS[name])
    fractions = {float(f) for L in of_type(layers, "BatchNorm") for f in L["moving_average_fraction"]}
    assert fractions == ({0.999} if name == "densenet40" else {0.9})
    default = BUILDERS[name]()
    momenta = [m.momentum for m in default.modules() if isinstance(m, CaffeBatchNorm2d)]
    assert momenta == pytest.approx([1 - fractions.pop()] * len(of_type(layers, "BatchNorm")))
    model = build_model(TrialConfig(model=name, bn_momentum=0.05), 3, 10, 32)
    assert {m.momentum for m in model.modules() if isinstance(m, CaffeBatchNorm2d)} == {0.05}
    mods = modules_by_caffe_name(model)
    dropouts = of_type(layers, "Dropout")
    assert [(L["name"], mods[L["name"]].p) for L in dropouts] == [(L["name"], L["dropout_ratio"]) for L in dropouts]
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == len(dropouts) == (38 if name == "densenet40"
                                                                                        else 0)


@pytest.mark.parametrize("name", DA_MODEL_NAMES)
@pytest.mark.parametrize("channels,image", SIZES)
def test_forward_backward_in_both_memory_formats(name, channels, image):
    torch.manual_seed(0)
    model = build(name, channels, image)
    x, y = torch.randn(2, channels, image, image), torch.tensor([0, 1])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()  # the fast path's channels_last (trial/step.py): the same function of the input
    with torch.no_grad():
        nchw = model(x)
        last = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(last, nchw, rtol=1e-4, atol=1e-5)


def test_cifar100_prototxt_is_cifar10_full_with_100_outputs():
    """cifar100.prototxt (DA4's 3-layer net) is caffe_cifar10_full: same graph, fillers, LRNs and multipliers."""
    torch.manual_seed(0)
    layers, proto_params = caffe_graph("cifar100")
    model = CaffeCifar10Full(3, 100, 32)
    assert n_params(model) == proto_params
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), interpret(layers, model, x * model.input_scale).reshape(2, 100))
    assert [L["lrn"] for L in of_type(layers, "LRN")] == [[3, 5e-5, 0.75, "WITHIN_CHANNEL"]] * 2
    assert [(m.local_size, m.alpha, m.beta) for m in model.modules() if isinstance(m, WithinChannelLRN)] == \
        [(3, 5e-5, 0.75)] * 2
    proto = {f"{L['name']}.{blob}": mult for L in layers for blob, (_, mult) in zip(("weight", "bias"), L["blobs"])}
    assert caffe_param_multipliers(model) == proto
    for L in of_type(layers, "Convolution") + of_type(layers, "InnerProduct"):
        assert L["weight_filler"] == "gaussian"
        w = getattr(model, L["name"]).weight
        assert abs(w.std().item() / L["std"] - 1) < 0.1, L["name"]


@pytest.mark.parametrize("name,image,message", [
    ("gresnet56", 30, "gresnet56 halves the image twice and needs sizes divisible by 4, got 30x30"),
    ("wide32", 14, "wide32 halves the image twice and needs sizes divisible by 4, got 14x14"),
    ("densenet40", 3, "densenet40 pools 2x2 2 times and needs images of at least 4x4 pixels, got 3x3"),
])
def test_image_sizes_the_nets_cannot_take_are_one_clear_error(name, image, message):
    with pytest.raises(ValueError, match=message):
        build_model(TrialConfig(model=name), 3, 10, image)
    assert build_model(TrialConfig(model=name), 1, 10, 8)(torch.randn(2, 1, 8, 8)).shape == (2, 10)  # digits


def test_unknown_da_model_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown disciplined-approach model 'resnet56'; allowed: gresnet56, "):
        build_da_model("resnet56", 3, 10, 32, 0.1)
