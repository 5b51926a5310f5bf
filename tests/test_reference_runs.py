"""The authors' runs as typed references (harness.references): every committed run is a valid TrialConfig whose
schedule reproduces every LR (and momentum) its log printed, and the committed files are what the parser derives
from the logs now."""

from __future__ import annotations

import numpy as np
import pytest

from harness import references
from harness.analysis import caffe_logs
from harness.config import TRAIN_IMAGES, TrialConfig
from harness.trial.schedules import curve

try:
    from tests.paper_material import FIXTURES, LOG_EXCERPTS, caffe_logs_dir, shared_path
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from paper_material import FIXTURES, LOG_EXCERPTS, caffe_logs_dir, shared_path

NAMES = references.log_names()
SC_LOGS, DA_LOGS = 43, 7
# Caffe prints 6 significant digits (a rounding of at most 5e-6 relative) of values it computed in float32
REL = 1e-5


def test_every_log_has_a_reference_run():
    assert len(NAMES) == SC_LOGS + DA_LOGS
    logs = [references.load(n).log for n in NAMES]
    assert sum(log.startswith("caffe-logs/") for log in logs) == SC_LOGS
    assert sum(log.startswith("da-logs/") for log in logs) == DA_LOGS


@pytest.mark.parametrize("name", NAMES)
def test_config_validates_and_its_schedule_reproduces_every_display_line(name):
    ref = references.load(name)
    cfg = ref.trial_config()
    assert cfg.to_dict() == TrialConfig.from_dict({**ref.config}).to_dict()
    assert set(ref.config) <= set(cfg.to_dict())
    trace = ref.trace
    assert len(trace) > 20 and trace.iteration.is_monotonic_increasing and trace.iteration.max() < cfg.steps
    values = curve(cfg, int(trace.iteration.max()) + 1)
    lr = values.lr.to_numpy()[trace.iteration]
    np.testing.assert_allclose(lr, trace.lr, rtol=REL, atol=1e-7 * cfg.max_lr, err_msg=name)
    printed = trace.momentum.notna()
    if ref.log.startswith("da-logs/"):
        assert printed.all()
    momentum = values.momentum.to_numpy()[trace.iteration[printed]]
    np.testing.assert_allclose(momentum, trace.momentum[printed], rtol=REL, err_msg=name)


@pytest.mark.parametrize("name", NAMES)
def test_config_says_the_total_batch_and_per_gpu_bn(name):
    ref = references.load(name)
    cfg = ref.config
    assert cfg["batch_size"] == ref.gpus * cfg["bn_batch"]
    assert cfg["eval_every"] == ref.unmapped["display"]  # every log tests where it displays
    assert cfg.get("train_size", TRAIN_IMAGES[cfg["dataset"]]) <= TRAIN_IMAGES[cfg["dataset"]]
    assert not set(ref.unmapped) & set(cfg)


def test_the_runs_the_brief_names():
    tbs512 = references.load("gResnet56_ResTBS512LR.0800.8M.95WD1e-4Epoch95BS128b_1")
    assert tbs512.claims == ("DA1", "DA2") and tbs512.gpus == 4
    assert {k: tbs512.config[k] for k in ("model", "schedule", "base_lr", "max_lr", "stepsize", "steps",
                                          "batch_size", "bn_batch", "bn_momentum", "optimizer", "nesterov")} == {
        "model": "gresnet56", "schedule": "caffe_1cycle", "base_lr": 0.08, "max_lr": 0.8, "stepsize": 4003,
        "steps": 9277, "batch_size": 512, "bn_batch": 128, "bn_momentum": 0.1, "optimizer": "caffe_sgd",
        "nesterov": True}
    assert tbs512.config["cycle_momentum"] is False and tbs512.config["momentum"] == 0.95  # DA1's constant 0.95
    lr = dict(zip(tbs512.trace.iteration, tbs512.trace.lr))
    assert lr[8000] == 0.00119905 and lr[8200] == 8e-05
    dense = references.load("genDensenet40_DenOrigLR0.10.1M0.9WD1e-4Epoch400BS128c_1")
    assert dense.config["milestones"] == [19531, 29296, 34178, 36619, 36620] and dense.config["gamma"] == 0.316
    assert dense.unmapped["stepvalue"] == [19531, 29296, 34178, 36619, 35398] and "stepvalue_note" in dense.unmapped
    c100 = references.load("c100Resnet56_C100Res1CycLR.1001.2CM0.95.85WD1e-4Epoch145BS256g_1")
    assert (c100.config["max_momentum"], c100.config["min_momentum"], c100.config["model"]) == \
        (0.95, 0.85, "c100resnet56")
    three_layer = references.load("cifar100_C100CycLR.0020.02CM0.95.8WD6e-4Epoch50BS128l_1")
    assert (three_layer.config["model"], three_layer.config["preprocess"]) == ("caffe_cifar10_full", "mean")
    assert "bn_momentum" not in three_layer.config  # no BatchNorm in cifar10_full
    clr = references.load("clr3SS5kFig1a")
    assert (clr.config["schedule"], clr.config["bn_momentum"], clr.config["cycle_momentum"], clr.gpus) == \
        ("triangular", 0.05, False, 8)
    assert clr.trace.momentum.isna().all()
    bottleneck = references.load("lrRange3SS520kClip2Fig12a")
    assert "model" not in bottleneck.config and "preact_bottleneck_resnet56" in bottleneck.unmapped["model"]
    assert bottleneck.unmapped["clip_gradients"] == 2


def test_an_unknown_name_is_one_line_with_the_closest():
    with pytest.raises(ValueError) as err:
        references.load("clr3SS5kFig1")
    assert "\n" not in str(err.value) and "did you mean 'clr3SS5kFig1a'" in str(err.value)


def test_committed_runs_and_traces_are_what_the_parser_derives_now(tmp_path):
    """From ../shared (both folders) when it is there, else from the committed excerpts of 4 caffe-logs."""
    folders = [caffe_logs_dir()]
    da = shared_path("paper/da-logs")
    full = folders[0] != FIXTURES / "caffe-logs"
    if full:
        assert da is not None
        folders.append(da)
    logs = caffe_logs.write_reference(folders, tmp_path)
    fresh = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(fresh) == 2 * (SC_LOGS + DA_LOGS if full else len(LOG_EXCERPTS)) == 2 * len(logs)
    if full:
        assert fresh == sorted(p.name for p in caffe_logs.RUNS_DIR.iterdir())
    for name in fresh:
        assert (tmp_path / "runs" / name).read_text() == (caffe_logs.RUNS_DIR / name).read_text(), name


def test_effective_milestones_follow_caffes_one_step_per_iteration():
    from harness.analysis.caffe_runs import effective_milestones
    assert effective_milestones([50000, 70000]) == [50000, 70000]
    assert effective_milestones([19531, 29296, 34178, 36619, 35398]) == [19531, 29296, 34178, 36619, 36620]
    assert effective_milestones([10, 5, 5, 3]) == [10, 11, 12, 13]
    assert effective_milestones([]) == []
