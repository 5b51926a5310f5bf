"""The trial config: every knob of one training run, in one flat, validated dataclass.

A study's YAML, Ray Tune's search space and MLflow's params all speak these field names.
`TrialConfig.from_dict` rejects unknown keys (with a did-you-mean), wrong types and impossible
values with one clear `ConfigError` line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass

DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "digits")
PREPROCESS = ("paper", "standard", "none")
MODELS = (
    "resnet20", "resnet56", "resnet110",                    # the authors' Caffe ResNets (post-activation)
    "preact_resnet20", "preact_resnet56", "preact_resnet110",  # pre-activation, projection shortcuts
    "mlp", "small_cnn",
)
MLP_ACTIVATIONS = ("relu", "tanh", "sigmoid", "square400")
OPTIMIZERS = ("sgd", "nesterov", "adam", "adagrad", "adadelta", "caffe_sgd")  # caffe_sgd: harness.optim
SCHEDULES = ("constant", "multistep", "triangular", "one_cycle", "one_cycle_cos", "cosine", "range_test")
DEVICES = ("auto", "cpu", "cuda")
KINDS = ("train", "lr_finder")              # lr_finder: harness.lr_finder
FINDER_MODES = ("exp", "linear")
LR_SUGGESTIONS = ("steepest", "valley", "smith")
PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A config that cannot run. The message is one line: what was wrong and what is allowed."""


@dataclass(frozen=True)
class TrialConfig:
    # --- workload: data ---
    dataset: str = "digits"
    data_dir: str | None = None        # explicit data location (searched first)
    train_size: int | None = None      # class-balanced, seeded subset of the training set
    val_size: int | None = None        # held out of the training set (same split for every seed): val_acc, val_loss
    preprocess: str = "paper"          # paper: per-pixel mean, mirror; standard: standardize, pad-4 crop, mirror
    # --- workload: model ---
    model: str = "small_cnn"
    bn_momentum: float = 0.1           # PyTorch convention; Caffe moving_average_fraction 0.95 == 0.05
    mlp_hidden: tuple[int, ...] = (300,)
    mlp_activation: str = "relu"
    mlp_final_relu: bool = False
    # --- training algorithm: optimizer ---
    optimizer: str = "sgd"
    momentum: float = 0.9              # SGD momentum (Adam: beta1) when the schedule does not cycle it
    weight_decay: float = 1e-4         # exemptions as the paper's prototxt (conv biases); see trial.build_optimizer
    # --- training algorithm: schedule (per optimizer step) ---
    schedule: str = "one_cycle"
    base_lr: float = 0.1
    max_lr: float = 1.0
    steps: int = 200                   # optimizer steps in the trial
    stepsize: int | None = None        # half-cycle; default 45% of steps (one_cycle), 25% (one_cycle_cos), steps/2
    milestones: tuple[int, ...] = ()   # multistep: steps where lr *= gamma
    gamma: float = 0.1
    cycle_momentum: bool = True        # one_cycle*, triangular: momentum max -> min -> max
    max_momentum: float = 0.95
    min_momentum: float = 0.85
    final_div: float = 1000.0          # one_cycle annihilation: lr ends at base_lr / final_div
    lr_scale: float = 1.0              # the study's LR tuning budget: the trainer runs base_lr and max_lr x lr_scale
    # --- batch semantics ---
    batch_size: int = 125              # global batch per optimizer step, over all workers
    bn_batch: int | None = None        # images per BatchNorm statistic (micro-batch); default: per-worker batch
    # --- evaluation and stopping ---
    eval_every: int = 50
    target_acc: float = 0.9            # fraction; for steps- and seconds-to-target
    divergence_factor: float = 10.0    # train loss above factor x its first value (or non-finite) = diverged
    # --- run ---
    seed: int = 0
    device: str = "auto"
    # --- data: negative images (negative_mnist) ---
    invert_images: bool = False        # every pixel x in [0, 1] becomes 1 - x, before preprocess
    # --- LR finder (kind lr_finder: sweep base_lr -> max_lr over `steps`; see harness.lr_finder) ---
    kind: str = "train"                # train | lr_finder
    finder_mode: str = "exp"           # exp (fastai / pytorch-lr-finder) | linear (Smith's range test)
    finder_smoothing: float = 0.98     # beta of the bias-corrected exponential moving average of the loss
    finder_stop_factor: float = 4.0    # stop once the smoothed loss exceeds this x its best
    finder_val: bool = False           # score the next validation (val_size, else test) batch after each step
    # --- a max LR taken from a finder study's runs in MLflow (harness.lr_from_finder, resolved by the runner) ---
    lr_from_finder: str | None = None  # the finder study; its runs of this trial's cell give max_lr
    lr_suggestion: str = "valley"      # steepest | valley | smith
    lr_base_div: float = 10.0          # then base_lr = max_lr / lr_base_div (Smith: 10..20 for one cycle)
    # --- fast path (how fast, never what is computed: the same curve within bf16's tolerance) ---
    precision: str = "auto"            # auto: bf16 autocast on CUDA, fp32 elsewhere; fp32; bf16 (autocast anywhere)
    channels_last: bool = True         # NHWC memory format for the convolutional models (MLPs stay as they are)
    compile: bool = False              # torch.compile the model (minutes of compilation before the first step)
    warmup_steps: int = 2              # a process's first steps, left out of its first images_per_s (< eval_every)

    # ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, typing.Any]) -> TrialConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                did = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(f"unknown trial field '{key}'{did}; allowed: {', '.join(names)}")
        hints = typing.get_type_hints(cls)
        values = {k: coerce(k, v, hints[k]) for k, v in d.items()}
        cfg = cls(**values)
        cfg.validate(world_size=None)  # the batch split is checked where the world size is known
        return cfg

    def to_dict(self) -> dict[str, typing.Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

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
    def validate(self, world_size: int | None = 1) -> None:
        _choice("dataset", self.dataset, DATASETS)
        _choice("preprocess", self.preprocess, PREPROCESS)
        _choice("model", self.model, MODELS)
        _choice("mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("kind", self.kind, KINDS)
        _choice("finder_mode", self.finder_mode, FINDER_MODES)
        _choice("lr_suggestion", self.lr_suggestion, LR_SUGGESTIONS)
        if self.kind == "lr_finder":
            if not 0 < self.base_lr < self.max_lr:
                raise ConfigError(f"an lr_finder sweeps base_lr -> max_lr: need 0 < base_lr < max_lr, got "
                                  f"{self.base_lr} and {self.max_lr}")
            if not 0 <= self.finder_smoothing < 1 or self.finder_stop_factor <= 1:
                raise ConfigError(f"finder_smoothing must be in [0, 1) and finder_stop_factor > 1, got "
                                  f"{self.finder_smoothing} and {self.finder_stop_factor}")
        if self.lr_base_div < 1:
            raise ConfigError(f"lr_base_div must be >= 1, got {self.lr_base_div}")
        _choice("precision", self.precision, PRECISIONS)
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _positive("steps", self.steps)
        _positive("batch_size", self.batch_size)
        _positive("eval_every", self.eval_every)
        if self.train_size is not None:
            _positive("train_size", self.train_size)
        if self.val_size is not None:
            _positive("val_size", self.val_size)
        if not self.lr_scale > 0:
            raise ConfigError(f"lr_scale must be > 0, got {self.lr_scale}")
        if self.bn_batch is not None:
            _positive("bn_batch", self.bn_batch)
        if any(h <= 0 for h in self.mlp_hidden):
            raise ConfigError(f"mlp_hidden must be positive layer widths, got {list(self.mlp_hidden)}")
        for name in ("base_lr", "max_lr", "weight_decay", "momentum", "max_momentum", "min_momentum"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.max_lr > 0:  # a peak LR of 0 trains nothing (base_lr may be 0: a cycle can start there)
            raise ConfigError(f"max_lr must be > 0 (the schedule's peak LR), got {self.max_lr}")
        if self.schedule in ("triangular", "one_cycle", "one_cycle_cos", "range_test") and self.max_lr < self.base_lr:
            raise ConfigError(f"max_lr ({self.max_lr}) must be >= base_lr ({self.base_lr}) "
                              f"for schedule '{self.schedule}'")
        if self.min_momentum > self.max_momentum:
            raise ConfigError(f"min_momentum ({self.min_momentum}) must be <= max_momentum ({self.max_momentum})")
        if not 0 < self.bn_momentum <= 1:
            raise ConfigError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if not 0 < self.target_acc <= 1:
            raise ConfigError(f"target_acc is a fraction in (0, 1], got {self.target_acc}")
        if self.divergence_factor <= 1:
            raise ConfigError(f"divergence_factor must be > 1, got {self.divergence_factor}")
        if self.final_div < 1:
            raise ConfigError(f"final_div must be >= 1, got {self.final_div}")
        if self.stepsize is not None:
            _positive("stepsize", self.stepsize)
            if self.schedule in ("one_cycle", "one_cycle_cos") and 2 * self.stepsize > self.steps:
                raise ConfigError(f"one_cycle needs 2 x stepsize <= steps, got stepsize {self.stepsize}, "
                                  f"steps {self.steps}")
        if self.schedule == "multistep" and not self.milestones:
            raise ConfigError("schedule 'multistep' needs milestones, e.g. [50000, 70000]")
        if list(self.milestones) != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ConfigError(f"milestones must be increasing positive steps, got {list(self.milestones)}")
        if world_size is not None:
            self.micro_batches(world_size)  # raises on an impossible batch split

    def scaled(self) -> TrialConfig:
        """The config the trainer runs: base_lr and max_lr multiplied by lr_scale (which becomes 1)."""
        if self.lr_scale == 1:
            return self
        return dataclasses.replace(self, base_lr=self.base_lr * self.lr_scale, max_lr=self.max_lr * self.lr_scale,
                                   lr_scale=1.0)

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


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{name} '{value}' is not known{did}; allowed: {', '.join(allowed)}")


def _positive(name: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value}")


def coerce(name: str, value, hint):
    """Check a YAML/JSON value against a field's type hint; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = next(a for a in args if a is not type(None))
        return coerce(name, value, inner)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list of {args[0].__name__}, got {value!r}")
        return tuple(coerce(name, v, args[0]) for v in value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads 1e-4 as a string
                except ValueError:
                    pass
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


FIELDS = tuple(f.name for f in dataclasses.fields(TrialConfig))
