"""The trial config: every knob of one training run, in one flat, validated pydantic model.

A study's YAML, Ray Tune's search space and MLflow's params all speak these field names. Each field declares
its type and range; `validate` holds the rules between fields. `TrialConfig.from_dict` rejects unknown keys
(with a did-you-mean), wrong types and impossible values with one clear `ConfigError` line, written by
`one_line`, which also words the study file's and the analysis plan's errors (harness.spec, harness.plan).
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictStr,
    ValidationError,
    model_validator,
)

DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "digits")
PREPROCESS = ("paper", "mean", "standard", "pixel_standard", "none")  # pixel_standard: per-pixel mean/std (data.py)
MODELS = (
    "resnet20", "resnet56", "resnet110",                    # the authors' Caffe ResNets (post-activation)
    "preact_resnet20", "preact_resnet56", "preact_resnet110",  # pre-activation, projection shortcuts
    "mlp", "small_cnn",
    "caffe_cifar10_full", "caffe_lenet",                    # BVLC Caffe's example nets (CLR paper; MNIST LeNet)
    "gresnet56", "c100resnet56", "wide32", "densenet40",    # the DA author's Caffe nets (trial/da_models.py)
)
MLP_ACTIVATIONS = ("relu", "tanh", "sigmoid", "square400", "square1", "square20")  # squareC: x * x * C
TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "mnist": 60000, "fashion_mnist": 60000,  # full training sets
                "digits": 1437}                                                              # (digits: our split)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10, "digits": 10}  # chance: 1 / this
OPTIMIZERS = ("sgd", "adam", "adagrad", "adadelta", "caffe_sgd")  # caffe_sgd: harness.trial.optim; Nesterov: nesterov
SCHEDULES = ("constant", "multistep", "triangular", "triangular2",  # triangular2: CLR, amplitude halved each cycle
             "one_cycle", "one_cycle_cos", "cosine", "range_test", "caffe_1cycle")  # caffe_1cycle: DA's Caffe
DEVICES = ("auto", "cpu", "cuda")
KINDS = ("train", "lr_finder")              # lr_finder: harness.trial.finder
FINDER_MODES = ("exp", "linear")
LR_SUGGESTIONS = ("steepest", "valley", "smith")
PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A config that cannot run. The message is one line: what was wrong and what is allowed."""


def _yaml_float(v):
    """YAML 1.1 reads 1e-4 (no dot) as a string: take the number it spells."""
    try:
        return float(v) if isinstance(v, str) else v
    except ValueError:
        return v


def _lists(v):
    return [_lists(x) for x in v] if isinstance(v, tuple) else v


def _four_per_stage(v):
    """clr_stages: a stage of another length is told as such (pydantic would say "missing required key '3'")."""
    for stage in v if isinstance(v, (list, tuple)) else ():
        if isinstance(stage, (list, tuple)) and len(stage) != 4:
            raise ValueError(f"each stage must be [start step, base_lr, max_lr, stepsize], got {list(stage)}")
    return v


def _integral(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


# Field types. Strict: true/false is never a number, "yes" never a bool, 3 never a string.
Float = Annotated[float, Strict(), BeforeValidator(_yaml_float)]  # ints too, and YAML's "1e-4"
Int = Annotated[int, Strict(), BeforeValidator(_integral)]        # 2.0 too, never "2"
PosInt = Annotated[Int, Field(gt=0)]
NonNegative = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(gt=0, le=1, description="is a fraction in (0, 1]")]


class TrialConfig(BaseModel):
    """One trial's config. Build it with `TrialConfig(**fields)` or `from_dict`: every field's type and range
    below, and the rules between fields in `validate`, are checked then; a bad value is one ConfigError line."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- workload: data ---
    dataset: Literal[DATASETS] = "digits"
    data_dir: StrictStr | None = None     # explicit data location (searched first)
    train_size: PosInt | None = None      # class-balanced, seeded subset of the training set
    val_size: PosInt | None = None        # held out of the training set (same split for every seed): val_acc, val_loss
    preprocess: Literal[PREPROCESS] = "paper"  # paper: mean image, mirror; mean: mean image; standard: see data.py
    # --- workload: model ---
    model: Literal[MODELS] = "small_cnn"
    # bn_momentum: PyTorch convention; Caffe moving_average_fraction 0.95 == 0.05
    bn_momentum: Float = Field(0.1, gt=0, le=1, description="must be in (0, 1]")
    mlp_hidden: tuple[PosInt, ...] = Field((300,), description="must be positive layer widths")
    mlp_activation: Literal[MLP_ACTIVATIONS] = "relu"
    mlp_final_relu: StrictBool = False
    # --- training algorithm: optimizer ---
    optimizer: Literal[OPTIMIZERS] = "sgd"
    momentum: NonNegative = 0.9           # SGD momentum (Adam: beta1) when the schedule does not cycle it
    nesterov: StrictBool = False          # sgd / caffe_sgd with Nesterov momentum (Caffe's solver type "Nesterov")
    zero_grad: StrictBool = True          # false: gradients are never zeroed, each step adds to the last (the
                                          # activation_mystery seed's loop: backward + step, no zero_grad)
    weight_decay: NonNegative = 1e-4      # exemptions as the paper's prototxt (conv biases); see trial.build_optimizer
    # --- training algorithm: schedule (per optimizer step) ---
    schedule: Literal[SCHEDULES] = "one_cycle"
    base_lr: NonNegative = 0.1
    max_lr: NonNegative = 1.0             # and > 0: see validate
    steps: PosInt = 200                   # optimizer steps in the trial
    stepsize: PosInt | None = None        # half-cycle; default 45% of steps (one_cycle), 25% (one_cycle_cos), steps/2
    milestones: tuple[Int, ...] = ()      # multistep: steps where lr *= gamma
    # triangular*: restarts after the first stage (base_lr/max_lr/stepsize above, from step 0), each a fresh cycle
    # counted from its start step: Smith 2015's Table 2 (CLR1) runs three stages
    clr_stages: Annotated[tuple[tuple[Int, Float, Float, Int], ...], BeforeValidator(_four_per_stage)] = Field(
        (), description="must be a list of [start step, base_lr, max_lr, stepsize] stages, e.g. "
                        "[[16000, 0.0001, 0.0005, 1000]]")
    gamma: Float = 0.1
    cycle_momentum: StrictBool = True     # one_cycle*, triangular*: momentum max -> min -> max
    max_momentum: NonNegative = 0.95
    min_momentum: NonNegative = 0.85
    final_div: Float = Field(1000.0, ge=1)  # one_cycle annihilation: lr ends at base_lr / final_div
    lr_scale: Float = Field(1.0, gt=0)    # the study's LR tuning budget: the trainer runs base_lr and max_lr x lr_scale
    # --- batch semantics ---
    batch_size: PosInt = 125              # global batch per optimizer step, over all workers
    bn_batch: PosInt | None = None        # images per BatchNorm statistic (micro-batch); default: per-worker batch
    # --- evaluation and stopping ---
    eval_every: PosInt = 50
    target_acc: Fraction = 0.9            # for steps- and seconds-to-target
    divergence_factor: Float = Field(10.0, gt=1)  # train loss above factor x its first value (or non-finite) = diverged
    # --- run ---
    seed: Int = 0
    device: Literal[DEVICES] = "auto"
    # --- data: negative images (negative_mnist) ---
    invert_images: StrictBool = False     # every pixel x in [0, 1] becomes 1 - x, before preprocess
    # --- LR finder (kind lr_finder: sweep base_lr -> max_lr over `steps`; see harness.trial.finder) ---
    kind: Literal[KINDS] = "train"        # train | lr_finder
    finder_mode: Literal[FINDER_MODES] = "exp"  # exp (fastai / pytorch-lr-finder) | linear (Smith's range test)
    finder_smoothing: Float = 0.98        # beta of the bias-corrected exponential moving average of the loss
    finder_stop_factor: Float = 4.0       # stop once the smoothed loss exceeds this x its best
    finder_val: StrictBool = False        # score the next batch of the val_size split (held-out training images)
    # --- a max LR taken from a finder study's runs in MLflow (harness.study.lr_from_finder, resolved by the runner) ---
    lr_from_finder: StrictStr | None = None  # the finder study; its runs of this trial's cell give max_lr
    lr_suggestion: Literal[LR_SUGGESTIONS] = "valley"  # steepest | valley | smith
    lr_base_div: Float = Field(10.0, ge=1)  # then base_lr = max_lr / lr_base_div (Smith: 10..20 for one cycle)
    # --- fast path (how fast, never what is computed: the same curve within bf16's tolerance) ---
    precision: Literal[PRECISIONS] = "auto"  # auto: bf16 autocast on CUDA, else fp32; fp32; bf16 (autocast anywhere)
    channels_last: StrictBool = True      # NHWC memory format for the convolutional models (MLPs stay as they are)
    compile: StrictBool = False           # torch.compile the model (minutes of compilation before the first step)
    warmup_steps: Int = Field(2, ge=0)    # a process's first steps, left out of its first images_per_s (< eval_every)

    # ------------------------------------------------------------------
    def __init__(self, *args: Any, **fields: Any) -> None:
        if len(args) > len(type(self).model_fields):
            raise TypeError(f"TrialConfig takes at most {len(type(self).model_fields)} positional fields")
        fields = {**dict(zip(type(self).model_fields, args)), **fields}
        try:
            super().__init__(**fields)
        except ValidationError as e:
            raise config_error(e, fields) from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialConfig:
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise config_error(e, d) from None

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values: tuples (clr_stages' too) become lists."""
        return {k: _lists(v) for k, v in self.model_dump().items()}

    def to_json(self) -> str:
        """The canonical JSON of the config (sorted keys): what Tune's param_space and MLflow's
        `harness.trial_config` tag carry, and what `from_json` alone decodes."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrialConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> TrialConfig:
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    # ------------------------------------------------------------------
    @model_validator(mode="after")
    def _rules_between_fields(self) -> TrialConfig:
        self.validate(world_size=None)  # the batch split is checked where the world size is known
        return self

    def validate(self, world_size: int | None = 1) -> None:
        """The rules between fields (each field's own type and range are declared above); with a world size,
        also the batch split over that many workers. ConfigError on the first rule broken."""
        if self.kind == "lr_finder":
            if not 0 < self.base_lr < self.max_lr:
                raise ConfigError(f"an lr_finder sweeps base_lr -> max_lr: need 0 < base_lr < max_lr, got "
                                  f"{self.base_lr} and {self.max_lr}")
            if not 0 <= self.finder_smoothing < 1 or self.finder_stop_factor <= 1:
                raise ConfigError(f"finder_smoothing must be in [0, 1) and finder_stop_factor > 1, got "
                                  f"{self.finder_smoothing} and {self.finder_stop_factor}")
        if not self.max_lr > 0:  # a peak LR of 0 trains nothing (base_lr may be 0: a cycle can start there)
            raise ConfigError(f"max_lr must be > 0 (the schedule's peak LR), got {self.max_lr}")
        if self.schedule in ("triangular", "triangular2", "one_cycle", "one_cycle_cos", "range_test") \
                and self.max_lr < self.base_lr:
            raise ConfigError(f"max_lr ({self.max_lr}) must be >= base_lr ({self.base_lr}) "
                              f"for schedule '{self.schedule}'")
        if self.min_momentum > self.max_momentum:
            raise ConfigError(f"min_momentum ({self.min_momentum}) must be <= max_momentum ({self.max_momentum})")
        if (self.stepsize is not None and self.schedule in ("one_cycle", "one_cycle_cos")
                and 2 * self.stepsize > self.steps):
            raise ConfigError(f"one_cycle needs 2 x stepsize <= steps, got stepsize {self.stepsize}, "
                              f"steps {self.steps}")
        if self.schedule == "multistep" and not self.milestones:
            raise ConfigError("schedule 'multistep' needs milestones, e.g. [50000, 70000]")
        if list(self.milestones) != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ConfigError(f"milestones must be increasing positive steps, got {list(self.milestones)}")
        if self.kind == "lr_finder" and self.finder_val and not self.val_size:
            raise ConfigError("finder_val scores held-out training images: set val_size (e.g. 10000), the split it "
                              "scores; the test set is never read by the finder")
        if self.nesterov and self.optimizer not in ("sgd", "caffe_sgd"):
            raise ConfigError(f"nesterov needs optimizer sgd or caffe_sgd (Nesterov momentum), got '{self.optimizer}'")
        self._validate_clr_stages()
        if world_size is not None:
            self.micro_batches(world_size)  # raises on an impossible batch split

    def _validate_clr_stages(self) -> None:
        if not self.clr_stages:
            return
        if self.schedule not in ("triangular", "triangular2"):
            raise ConfigError(f"clr_stages (restarts of a cyclical schedule) need schedule triangular or "
                              f"triangular2, got '{self.schedule}'")
        starts = [stage[0] for stage in self.clr_stages]
        if any(b <= a for a, b in zip(starts, starts[1:])) or starts[0] <= 0 or starts[-1] >= self.steps:
            raise ConfigError(f"clr_stages' start steps must be increasing, > 0 and < steps ({self.steps}), "
                              f"got {starts}")
        for i, (start, base, peak, stepsize) in enumerate(self.clr_stages):
            if not 0 <= base <= peak or not peak > 0:
                raise ConfigError(f"clr_stages[{i}] (from step {start}) needs 0 <= base_lr <= max_lr and max_lr > 0, "
                                  f"got base_lr {base}, max_lr {peak}")
            if stepsize < 1:
                raise ConfigError(f"clr_stages[{i}] (from step {start}) needs stepsize >= 1, got {stepsize}")

    def scaled(self) -> TrialConfig:
        """The config the trainer runs: base_lr and max_lr, and each of clr_stages' bounds, multiplied by lr_scale
        (which becomes 1)."""
        if self.lr_scale == 1:
            return self
        x = self.lr_scale
        return self.model_copy(update={"base_lr": self.base_lr * x, "max_lr": self.max_lr * x, "lr_scale": 1.0,
                                       "clr_stages": tuple((start, base * x, peak * x, stepsize)
                                                           for start, base, peak, stepsize in self.clr_stages)})

    def micro_batches(self, world_size: int) -> tuple[int, int]:
        """(per-worker batch, micro-batches per worker) for this world size, or ConfigError."""
        if self.batch_size % world_size:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by {world_size} workers; "
                f"use a multiple of {world_size}")
        local = self.batch_size // world_size
        bn = self.bn_batch or local
        if local % bn:
            raise ConfigError(
                f"batch_size {self.batch_size} over {world_size} workers gives {local} images per worker, "
                f"not a multiple of bn_batch {bn}; batch_size must be a multiple of workers x bn_batch "
                f"= {world_size * bn}")
        return local, local // bn


FIELDS = tuple(TrialConfig.model_fields)


def config_error(e: ValidationError, data: Any) -> ConfigError:
    """TrialConfig's ValidationError (from validating `data`) as its one-line ConfigError."""
    return ConfigError(one_line(e, TrialConfig, data, unknown="unknown trial field"))


# ------------------------------------------------------------------ one line per validation error
def suggest(value: Any, allowed) -> str:
    """The did-you-mean clause, " (did you mean 'x'?)", for the allowed name closest to `value`; or ""."""
    hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_WORDS = {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "a mapping",
          list: "a list", tuple: "a list"}


def one_line(error: ValidationError, model: type[BaseModel], data: Any, root: str = "",
             unknown: str = "unknown key") -> str:
    """`model`'s ValidationError on `data` as one line: where (the path under `root`), what was wrong, and what
    is allowed. An unknown key is told first, else the first error. A field's `description` words its errors
    and those inside it, down to a nested model; other errors are worded from the type and the bound broken."""
    errors = error.errors()
    err = next((e for e in errors if _is_unknown(e)), errors[0])
    loc, kind = err["loc"], err["type"]
    if _is_unknown(err):
        parent = loc[:-1] if kind == "extra_forbidden" else loc[:-2]
        at = _walk(model, parent)[0]
        allowed = list(at.model_fields) if kind == "extra_forbidden" else typing.get_args(typing.get_args(at)[0])
        key = loc[len(parent)]
        return (f"{_path(root, parent, ': ')}{unknown} '{key}'{suggest(key, allowed)}; "
                f"allowed: {', '.join(map(str, allowed))}")
    if kind == "missing":
        return f"{_path(root, loc[:-1], ': ')}missing required key '{loc[-1]}'"
    if kind == "value_error":  # a rule between fields (a model validator) words its own error
        return f"{_path(root, loc, ': ')}{err['ctx']['error']}"
    t, passed = _walk(model, loc)
    if passed and passed[-1][1].description and (passed[-1][0] == len(loc) - 1 or not _is_model(t)):
        depth, field = passed[-1]
        return f"{_path(root, loc[:depth + 1])} {field.description}, got {_value_at(data, loc[:depth + 1])!r}"
    here = passed[-1][1] if passed and passed[-1][0] == len(loc) - 1 else None  # the field that failed, if one
    return f"{_path(root, loc) or 'the input'} {_expected(err, t, here)}"


def _expected(err: dict, t: Any, field: Any) -> str:
    """What the value at the error should have been, from its type `t` and its field's bounds, and what it was."""
    kind, got = err["type"], err.get("input")
    if kind == "literal_error":
        allowed = typing.get_args(t)
        return f"'{got}' is not known{suggest(got, allowed)}; allowed: {', '.join(map(str, allowed))}"
    if kind in _BOUNDS:
        bound = next(iter(err["ctx"].values()))
        what = "a positive integer" if t is int and bound == 0 and kind == "greater_than" else \
            f"{_BOUNDS[kind]} {int(bound) if float(bound).is_integer() else bound}"
    elif _is_model(t):
        what = f"a mapping of {t.model_config.get('title') or ', '.join(t.model_fields)}"
    elif (typing.get_origin(t) or t) in (list, tuple) and (
            kind == "too_short" or any(getattr(m, "min_length", 0) for m in (field.metadata if field else ()))):
        what = "a non-empty list"
    else:
        what = _WORDS.get(typing.get_origin(t) or t)
    return f"must be {what}, got {got!r}" if what else f"is wrong: {err['msg']}, got {got!r}"


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _is_unknown(err: dict) -> bool:
    """An unknown key: one a model does not have, or one outside a mapping's Literal keys."""
    return err["type"] == "extra_forbidden" or (err["type"] == "literal_error" and err["loc"][-1:] == ("[key]",))


def _walk(model: type[BaseModel], loc: tuple) -> tuple[Any, list[tuple[int, Any]]]:
    """Follow `loc` through the schema: the type there, and (depth, FieldInfo) of each model field passed."""
    t, passed = model, []
    for depth, part in enumerate(loc):
        t = _bare(t)
        if _is_model(t):
            if part not in t.model_fields:
                break
            passed.append((depth, t.model_fields[part]))
            t = t.model_fields[part].annotation
        elif part != "[key]":
            args = typing.get_args(t) or (Any, Any)
            dict_value = typing.get_origin(t) is dict and loc[depth + 1:depth + 2] != ("[key]",)
            t = args[1] if dict_value else args[0]
    return _bare(t), passed


def _bare(t: Any) -> Any:
    """The type under Annotated[...] and `| None`."""
    while True:
        if typing.get_origin(t) is Annotated:
            t = typing.get_args(t)[0]
        elif typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in typing.get_args(t):
            t = next(a for a in typing.get_args(t) if a is not type(None))
        else:
            return t


def _path(root: str, loc: tuple, end: str = "") -> str:
    """`root.key[index].key`, then `end`; "" when both root and loc are empty."""
    text = root
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text + end if text else ""


def _value_at(data: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data
