"""Every shipped study runs at smoke scale through the real pipeline (Ray Tune, one real `mlflow server` over HTTP for
all of them) and leaves the runs its analysis needs. Every study runs with --workers-per-trial 1, the one-worker trials
that train in their reused Tune actor (issue 26: ~0.3 s from trial start to first step instead of ~15 s; the 66 smoke
trials took 1,179 s as 2-worker TorchTrainers, 263 s so, batch_size_effect's 4 at 2 workers 63 s of it); the
TorchTrainer path end to end is tests/test_study.py's, tests/test_report.py's and tests/test_resilience.py's.
The finder study runs before
the study that takes its max LRs from it (activation_mystery: lr_from_finder). Then every study's report is built
from those runs, as a user would after `python -m harness.study NAME --scale smoke` (issue 25: two shipped studies'
reports crashed at smoke scale while every unit test passed)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from mlflow_checks import check_study_runs
from pypdf import PdfReader
from servers import MlflowServer

from harness import spec as specs
from harness.analysis import claims
from harness.analysis.results import load_study
from harness.report.build import main as report_main
from harness.study.cli import main

FINDERS = ("activation_mystery_finder",)
STUDIES = [*FINDERS, *(n for n, _ in specs.list_studies() if n not in FINDERS)]
REPORT_FILES = (".pdf", ".md", ".verdicts.csv", ".cells.csv", ".trials.csv", ".curves.csv")
# a planned comparison without a verdict at smoke scale must say which property of the scale it lacks
SCALE_PROPERTIES = ("seed", "LR scale", "levels of", "units")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("all_studies")
    server = MlflowServer(folder / "server").start()
    yield folder, server.uri
    server.stop()


@pytest.mark.parametrize("name", STUDIES)
def test_study_runs_at_smoke_scale(ray_session, store, name, monkeypatch, capsys):
    folder, uri = store
    monkeypatch.chdir(folder)
    rc = main([name, "--scale", "smoke", "--tracking-uri", uri, "--storage", str(folder / "ray_results"),
               "--workers-per-trial", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    trials = specs.trials(specs.load_spec(name), "smoke")
    if name in FINDERS:
        check_finder_runs(uri, name, len(trials))
        return
    _, children = check_study_runs(uri, name, n_trials=len(trials))
    assert {c.data.params["workers"] for c in children} == {"1"}
    assert {c.data.tags["harness.cell"] for c in children} == {t.cell for t in trials}
    assert not (folder / "mlflow.db").exists() and not (folder / "mlruns").exists()  # all went to the server
    if name == "activation_mystery":  # the finder's suggestion became the second arm's max LR, per activation
        finder = {r.data.params["mlp_activation"]: r.data.metrics for r in _children(uri, "activation_mystery_finder")}
        for child in children:
            p = child.data.params
            if p["lr_from_finder"] == "activation_mystery_finder":
                suggested = finder[p["mlp_activation"]][f"lr_{p['lr_suggestion']}"]
                assert float(p["max_lr"]) == pytest.approx(suggested)
            else:
                assert {t.config.max_lr for t in trials if t.cell == child.data.tags["harness.cell"]} == \
                    {float(p["max_lr"])}   # a grid LR, as planned
    if name == "negative_mnist":
        for child in children:
            history = MlflowClient(uri).get_metric_history(child.info.run_id, "dead_output_frac")
            assert history and all(0 <= h.value <= 1 for h in history)


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_reports_from_its_smoke_runs(store, name, capsys):
    """The runs above -> `python -m harness.report NAME`: exit 0, the PDF, Markdown and CSVs, the verdicts on the
    parent run, and every planned comparison a verdict or a reason that names what the smoke scale lacks."""
    folder, uri = store
    out = folder / "reports" / f"{name}.pdf"
    rc = report_main([name, "--tracking-uri", uri, "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    assert "warning:" not in printed.err and "mlflow: " in printed.out
    for suffix in REPORT_FILES:
        assert (folder / "reports" / f"{name}{suffix}").stat().st_size > 0, suffix
    assert len(PdfReader(out).pages) >= 2
    ev = claims.verdicts(load_study(name, uri))
    planned = {v.planned for v in ev.verdicts}
    without = [line for line in ev.plan if line not in planned]
    reasons = [why for _, why in ev.not_tested if "the study's analysis plan has no comparison" not in why]
    assert len(without) == len(reasons), (without, ev.not_tested)
    for why in reasons:
        assert "no usable trial" not in why and any(p in why for p in SCALE_PROPERTIES), why
    assert all(v.verdict == "pipeline check" for v in ev.verdicts)   # smoke scale: never evidence
    verdicts_csv = pd.read_csv(folder / "reports" / f"{name}.verdicts.csv")
    assert len(verdicts_csv) == len(ev.verdicts)
    assert (folder / "reports" / f"{name}.md").read_text().count("pipeline check") >= len(ev.verdicts)


def _children(uri: str, study: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], filter_string="tags.`harness.role` = 'trial'")


def check_finder_runs(uri: str, study: str, n_trials: int) -> None:
    client = MlflowClient(uri)
    children = _children(uri, study)
    assert len(children) == n_trials
    for child in children:
        m = child.data.metrics
        assert child.data.tags["harness.status"] == "completed" and child.data.params["kind"] == "lr_finder"
        assert all(math.isfinite(m[k]) and m[k] > 0 for k in ("lr_steepest", "lr_valley", "lr_smith"))
        lrs = [h.value for h in client.get_metric_history(child.info.run_id, "lr")]
        smooth = client.get_metric_history(child.info.run_id, "smoothed_loss")
        assert len(lrs) == len(smooth) == m["steps_run"] and lrs == sorted(lrs)
        assert float(child.data.params["base_lr"]) == pytest.approx(lrs[0])
