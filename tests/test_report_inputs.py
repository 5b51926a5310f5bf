"""What the report reads, for every kind of run a shipped study makes (issue 25): the reader's curve frame is typed
(a metric a kind of run does not log is a NaN float column, never text), and a panel with many authors' logs
draws them all. Both crashed a shipped study's report at smoke scale: activation_mystery_finder (its runs log no
test accuracy) and less_data (five authors' logs per schedule). No Ray, no MLflow server: frames, or a sqlite store."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from real_path_store import write  # noqa: E402

from harness.analysis.results import CURVE_METRICS, CURVE_OUTCOMES, curve_outcomes, load_study, typed_curves  # noqa: E402
from harness.report import shape  # noqa: E402


def _trials(*runs: tuple[str, str]) -> pd.DataFrame:
    """Rows as load_study makes them (text columns of pandas' default string dtype): run id and kind."""
    return pd.DataFrame({"run_id": pd.Series([r for r, _ in runs], dtype="str"),
                         "kind": pd.Series([k for _, k in runs], dtype="str"),
                         "dataset": "digits", "status": "completed", "steps": 30, "eval_every": 10})


def _finder_curve(run_id: str) -> pd.DataFrame:
    """A finder's history: LR and loss at each step, no evaluation metrics at all."""
    return pd.DataFrame({"run_id": run_id, "step": [1, 2, 3], "lr": [1e-4, 1e-3, 1e-2],
                         "train_loss": [2.3, 2.0, 1.7]})


def test_a_metric_no_run_logs_is_a_nan_float_column():
    """The finder study alone: no run has a test accuracy. Every curve outcome is NaN, of dtype float64."""
    trials = _trials(("f1", "lr_finder"), ("f2", "lr_finder"))
    curves = typed_curves(pd.concat([_finder_curve("f1"), _finder_curve("f2")]), CURVE_METRICS)
    assert {curves[k].dtype for k in CURVE_METRICS} == {np.dtype("float64")}
    assert curves["test_acc"].isna().all() and curves["step"].dtype == np.dtype("int64")
    out = curve_outcomes(trials, curves)
    for col in CURVE_OUTCOMES:
        assert out[col].dtype == np.dtype("float64") and out[col].isna().all(), col


def test_runs_with_and_without_a_metric_in_one_frame():
    """A finder beside a training run: the training run's outcomes are computed, the finder's stay NaN."""
    train = pd.DataFrame({"run_id": "t1", "step": [10, 20, 30], "test_acc": [0.5, 0.15, 0.8],
                          "min_class_recall": [0.1, 0.2, 0.3]})
    curves = typed_curves(pd.concat([_finder_curve("f1"), train]), CURVE_METRICS)
    out = curve_outcomes(_trials(("f1", "lr_finder"), ("t1", "train")), curves).set_index("run_id")
    assert out.loc["t1", "max_acc_drop"] == pytest.approx(0.35)
    assert out.loc["t1", "evals_below_chance"] == 1                      # 0.15 < 1/10 + 0.10
    assert out.loc["t1", "final_min_class_recall"] == pytest.approx(0.3)
    assert out.loc["f1", list(CURVE_OUTCOMES)].isna().all()
    assert all(out[c].dtype == np.dtype("float64") for c in CURVE_OUTCOMES)


def test_an_empty_or_text_typed_curve_frame_is_typed():
    """No runs left, or values that came back as text (a CSV column of empty cells): the schema still holds."""
    empty = typed_curves(pd.DataFrame(columns=["run_id", "step", *CURVE_METRICS]), CURVE_METRICS)
    assert empty.empty and {empty[k].dtype for k in CURVE_METRICS} == {np.dtype("float64")}
    texty = typed_curves(pd.DataFrame({"run_id": ["a", "a"], "step": ["1", "2"], "test_acc": ["", "0.5"]}),
                         CURVE_METRICS)
    assert texty["test_acc"].tolist()[1] == 0.5 and np.isnan(texty["test_acc"].iloc[0])
    assert texty["step"].tolist() == [1, 2]
    assert curve_outcomes(_trials(("a", "train")), empty)["max_acc_drop"].isna().all()


@pytest.mark.parametrize("n", [1, 2, 4, 5, 9])
def test_every_authors_log_gets_an_opacity_in_range(n):
    alphas = [shape.log_alpha(j, n) for j in range(n)]
    assert alphas[0] == pytest.approx(0.35) and all(0.1 < a <= 0.35 for a in alphas)
    assert alphas == sorted(alphas, reverse=True) and len(set(alphas)) == n


def test_less_data_draws_its_five_authors_logs_per_schedule(tmp_path):
    """less_data's smoke runs (written by the harness's writers) beside its paper scale's logs: five per schedule."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    written = write(uri, "less_data", "smoke", "claimed")
    res = load_study("less_data", uri, run=written.parent)
    logs = shape.authors_logs_by_schedule("less_data")
    assert {s: len(v) for s, v in logs.items()} == {"triangular": 5, "multistep": 5}
    fig = plt.figure(figsize=(8, 3.3))
    shape.draw_shapes(fig, [0, 0, 1, 1], res.trials, res.curves, logs)
    for ax in [ax for ax in fig.axes if ax.get_lines()]:
        theirs = [ln for ln in ax.get_lines() if ln.get_label().startswith("authors' log")]
        assert len(theirs) == 5 and all(0 < ln.get_alpha() <= 1 for ln in theirs)
    plt.close(fig)
