"""The trial's fast path on CPU: bf16 autocast and channels_last follow the fp32/NCHW loss curve within a stated
tolerance, the switches are typed fields, and throughput windows leave out the warm-up steps."""

from __future__ import annotations

import time

import pytest
import torch

from harness.config import ConfigError, TrialConfig
from harness.trial import step as step_module
from harness.trial.data import TrainBatches
from harness.trial.loop import run_trial
from harness.trial.step import FastPath

# ResNet-20 on digits at a gentle constant LR: the curve falls from ~2.8 to ~0.3 in 20 steps without the chaotic
# jumps of a large LR (which would amplify any rounding difference into a different trajectory).
RESNET = {"dataset": "digits", "model": "resnet20", "preprocess": "paper", "batch_size": 125, "steps": 20,
          "eval_every": 5, "schedule": "constant", "base_lr": 0.05, "max_lr": 0.05, "bn_momentum": 0.3,
          "device": "cpu", "warmup_steps": 0}
# Stated tolerances, absolute, on each 5-step window's mean train loss (measured: channels_last 0.002, bf16 0.034)
CHANNELS_LAST_TOL = 0.02
BF16_TOL = 0.1


def _curve(**changes) -> tuple[list[float], list[float]]:
    records: list[dict] = []
    run_trial(TrialConfig.from_dict({**RESNET, **changes}), lambda m, s: records.append(m))
    return [r["train_loss"] for r in records], [r["test_acc"] for r in records]


@pytest.fixture(scope="module")
def fp32_nchw():
    return _curve(precision="fp32", channels_last=False)


@pytest.mark.slow  # trains or builds every study's report: seconds, the full suite's
def test_channels_last_follows_the_nchw_curve(fp32_nchw):
    loss, acc = _curve(precision="fp32", channels_last=True)
    assert len(loss) == len(fp32_nchw[0]) == 4
    assert loss == pytest.approx(fp32_nchw[0], abs=CHANNELS_LAST_TOL)
    assert acc == pytest.approx(fp32_nchw[1], abs=0.05)


@pytest.mark.slow  # trains or builds every study's report: seconds, the full suite's
def test_bf16_autocast_on_cpu_follows_the_fp32_curve(fp32_nchw):
    loss, acc = _curve(precision="bf16", channels_last=True)
    assert loss == pytest.approx(fp32_nchw[0], abs=BF16_TOL)
    assert loss[-1] < 0.5 * loss[0]  # it learns
    assert loss != fp32_nchw[0]  # and bf16 was really on: rounding moves the curve a little


def test_precision_auto_is_fp32_on_cpu_and_bf16_on_cuda():
    cfg = TrialConfig.from_dict(RESNET)
    assert cfg.precision == "auto" and cfg.channels_last and not cfg.compile
    assert not FastPath.of(cfg, torch.device("cpu")).bf16
    assert FastPath.of(cfg, torch.device("cuda", 0)).bf16  # only decides; nothing runs on the GPU
    assert FastPath.of(cfg.replace(precision="bf16"), torch.device("cpu")).bf16
    x = FastPath.of(cfg, torch.device("cpu")).layout(torch.zeros(4, 3, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert not FastPath.of(cfg.replace(model="mlp"), torch.device("cpu")).channels_last


@pytest.mark.parametrize("changes, message", [
    ({"precision": "fp16"}, "precision 'fp16' is not known"),
    ({"channels_last": "yes"}, "channels_last must be true or false"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
])
def test_bad_fast_path_fields_get_one_clear_line(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrialConfig.from_dict({**RESNET, **changes})


class _SlowFirstBatch(TrainBatches):
    """The first batch of a process takes 0.6 s: a warm-up (allocator, autotuning, compilation) made visible."""

    def get(self, step):
        if step == 0:
            time.sleep(0.6)
        return super().get(step)


@pytest.mark.slow  # trains or builds every study's report: seconds, the full suite's
def test_throughput_window_leaves_out_the_warm_up(monkeypatch):
    monkeypatch.setattr(step_module, "TrainBatches", _SlowFirstBatch)
    small = {"dataset": "digits", "model": "small_cnn", "batch_size": 250, "steps": 20, "eval_every": 10,
             "schedule": "constant", "max_lr": 0.05, "device": "cpu"}

    def first_window(warmup: int) -> dict:
        records: list[dict] = []
        run_trial(TrialConfig.from_dict({**small, "warmup_steps": warmup}), lambda m, s: records.append(m))
        return records

    with_warmup = first_window(0)
    # the 0.6 s of step 1 caps the first window at 10 x 250 / 0.6 images/s; the second window never saw it
    assert with_warmup[0]["images_per_s"] < 10 * 250 / 0.6
    without = first_window(2)
    # without the 0.6 s the window of (at most 10) steps is faster; as a ratio, so a busy machine cannot fail it:
    # (T + 0.6) / T > 1.5 for the steps' own T < 1.2 s (0.3 s on an idle 2-core machine, 0.8 s under load)
    assert without[0]["images_per_s"] > 1.5 * with_warmup[0]["images_per_s"]
    # training time still counts every step: the warm-up is excluded from the rate, not from the trial's time
    assert without[0]["train_seconds"] > 0.6 and without[-1]["train_seconds"] > 0.6


def test_a_shared_raw_dataset_gives_the_same_trial_and_stays_unchanged(monkeypatch):
    """The trial driver reads a dataset once per node and shares it (a Ray object); a trial given it must not touch
    the files, must train exactly as if it had read them, and must not change the shared copy."""
    from harness.trial import data
    raw = data.load_raw("digits")
    before = raw.train_x.clone()
    config = {"dataset": "digits", "model": "small_cnn", "batch_size": 250, "steps": 4, "eval_every": 2,
              "device": "cpu", "preprocess": "standard"}
    own = run_trial(TrialConfig.from_dict(config))

    def no_files(*a, **k):
        raise AssertionError("files read although the raw data was given")
    monkeypatch.setattr(data, "_load_digits", no_files)
    shared = run_trial(TrialConfig.from_dict(config), raw=raw)
    assert [h["test_loss"] for h in shared["history"]] == [h["test_loss"] for h in own["history"]]
    assert torch.equal(raw.train_x, before)
    with pytest.raises(ValueError, match="raw data of 'digits' given for dataset 'mnist'"):
        data.load_dataset("mnist", raw=raw)
