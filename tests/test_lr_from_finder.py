"""A cell's max LR from the finder runs of another study in MLflow; negative images; dead output units."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from harness import names
from harness.config import TrialConfig
from harness.spec import Trial
from harness.study import lr_from_finder, tracking
from harness.trial import data
from harness.trial.loop import run_trial
from harness.trial.step import dead_output_fraction, output_health


def _finder_store(uri: str, study: str, runs: list[tuple[dict, dict]], scale: str = "quick",
                  status: str = "FINISHED") -> None:
    """A finder study's runs as the harness writes them: a study run, and trial runs with typed configs."""
    client = MlflowClient(uri)
    exp = tracking.experiment_id(uri, study)
    parent = client.create_run(exp, tags={names.ROLE: names.ROLE_STUDY, names.SCALE: scale}).info.run_id
    for fields, metrics in runs:
        config = TrialConfig.from_dict({"base_lr": 1e-4, "max_lr": 10.0, **fields})
        run = client.create_run(exp, tags={names.ROLE: names.ROLE_TRIAL, names.PARENT_RUN_ID: parent,
                                           names.STATUS: "completed", names.TRIAL_CONFIG: config.to_json()}).info.run_id
        for k, v in metrics.items():
            client.log_metric(run, k, v)
    client.set_terminated(parent, status=status)


def _trial(**fields) -> Trial:
    base = {"lr_from_finder": "finder", "lr_suggestion": "valley", "lr_base_div": 10.0, "max_lr": 1.0,
            "base_lr": 0.1, "seed": 0}
    return Trial("study", "quick", 1, TrialConfig.from_dict({**base, **fields}), ("mlp_activation",))


def test_each_cell_takes_the_median_suggestion_of_its_own_finder_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = [({"kind": "lr_finder", "mlp_activation": act, "seed": s}, {"lr_valley": v, "lr_steepest": v / 2})
            for act, values in (("relu", (0.2, 0.3, 0.4)), ("square400", (0.001, 0.002, 0.009))) for s, v in
            enumerate(values)]
    _finder_store(uri, "finder", runs)
    _finder_store(uri, "finder", [({"kind": "lr_finder", "mlp_activation": "relu", "seed": 0}, {"lr_valley": 99.0})],
                  scale="smoke")  # another scale: ignored
    plain = Trial("study", "quick", 1, TrialConfig.from_dict({"max_lr": 0.5}))
    declared = _trial(mlp_activation="relu")
    relu, square, steep = lr_from_finder.with_finder_lrs(
        [declared, _trial(mlp_activation="square400"),
         _trial(mlp_activation="relu", lr_suggestion="steepest", lr_base_div=20.0)], uri, "quick")
    assert relu.config.max_lr == pytest.approx(0.3) and relu.config.base_lr == pytest.approx(0.03)
    assert square.config.max_lr == pytest.approx(0.002)
    assert steep.config.max_lr == pytest.approx(0.15) and steep.config.base_lr == pytest.approx(0.0075)
    assert relu.name == declared.name and relu.key == declared.key  # the study file's config names it
    assert relu.declared == declared.config
    assert lr_from_finder.with_finder_lrs([plain], uri, "quick") == [plain]


def test_a_missing_finder_study_or_cell_is_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()
    with pytest.raises(tracking.TrackingError, match="no study 'finder'.*python -m harness.study finder --scale q"):
        lr_from_finder.with_finder_lrs([_trial(mlp_activation="relu")], uri, "quick")
    _finder_store(uri, "finder", [({"kind": "lr_finder", "mlp_activation": "relu", "seed": s}, {"lr_valley": 0.1})
                                  for s in (0, 1)] +
                  [({"kind": "lr_finder", "mlp_activation": "tanh", "seed": 0}, {"lr_valley": 0.1})])
    with pytest.raises(tracking.TrackingError, match="no completed finder run with mlp_activation=sigmoid"):
        lr_from_finder.with_finder_lrs([_trial(mlp_activation="sigmoid")], uri, "quick")
    with pytest.raises(tracking.TrackingError, match="no finished run at scale paper"):
        lr_from_finder.with_finder_lrs([_trial(mlp_activation="relu")], uri, "paper")


# ------------------------------------------------------------------------------------------------ negative images
def _write_mnist(folder, n_train=200, n_test=50):
    """A small MNIST-format set (IDX files): class c is a bright bar in row band c, on a dark background."""
    import struct
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 30, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 4: 2 * c + 6, 4:24] = 250
        for name, arr in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
            header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            (folder / name).write_bytes(header + arr.astype(np.uint8).tobytes())


def test_inverted_images_are_one_minus_the_scaled_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda *a: (_ for _ in ()).throw(AssertionError("download")))
    _write_mnist(tmp_path)
    normal = data.load_dataset("mnist", data_dir=tmp_path, preprocess="none")
    negative = data.load_dataset("mnist", data_dir=tmp_path, preprocess="none", invert=True)
    torch.testing.assert_close(negative.train_x, 1 - normal.train_x)
    torch.testing.assert_close(negative.test_x, 1 - normal.test_x)
    assert torch.equal(negative.train_y, normal.train_y)
    assert normal.train_x.mean() < 0.2 < 0.8 < negative.train_x.mean()  # dark background became bright


def test_mlp_trials_report_dead_output_units(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda *a: (_ for _ in ()).throw(AssertionError("download")))
    _write_mnist(tmp_path)
    cfg = {"dataset": "mnist", "data_dir": str(tmp_path), "model": "mlp", "mlp_hidden": [20], "preprocess": "none",
           "batch_size": 50, "steps": 8, "eval_every": 4, "schedule": "constant", "max_lr": 0.1, "device": "cpu",
           "mlp_final_relu": True, "invert_images": True}
    out = run_trial(TrialConfig.from_dict(cfg))
    assert [0 <= r["dead_output_frac"] <= 1 for r in out["history"]] == [True, True]
    # the metric itself: a final ReLU behind a bias of -100 kills every output, one of +100 none
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10), torch.nn.ReLU())
    ds = data.load_dataset("mnist", data_dir=tmp_path, preprocess="none")
    with torch.no_grad():
        model[1].bias.fill_(-100.0)
        model[1].bias[3] = 100.0
    assert dead_output_fraction(model, ds, torch.device("cpu"), 0, 1) == pytest.approx(0.9)
    # every image is called a 3: the worst class's recall is 0, and the trial logs the recall at every evaluation
    assert output_health(model, ds, torch.device("cpu"), 0, 1) == (pytest.approx(0.9), 0.0)
    assert [0 <= r["min_class_recall"] <= 1 for r in out["history"]] == [True, True]
    # the lowest per-class recall is sklearn's recall_score(average=None).min() on the same predictions
    from sklearn.metrics import recall_score
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    _, worst = output_health(net, ds, torch.device("cpu"), 0, 1)
    with torch.no_grad():
        pred = torch.cat([net(x).argmax(1) for x, _ in data.test_batches(ds, 100)])
    truth = torch.cat([y for _, y in data.test_batches(ds, 100)])
    assert worst == pytest.approx(recall_score(truth, pred, average=None, labels=range(10), zero_division=0).min())
