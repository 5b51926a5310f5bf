"""`python -m harness.bench`: the figures' arithmetic (from a synthetic MLflow store), goals, the CSV, the smoke grid
it runs, and that what it cannot measure says so. The speeds themselves are the benchmark's output, not tested."""

from __future__ import annotations

import csv

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness import bench
from harness import spec as specs


def test_goals_and_the_not_measured_row(tmp_path, capsys):
    figs = [bench.Figure("P1", "ratio", 0.98, "", ">= 0.97", "d1"),
            bench.Figure("P3", "start", 9.5, "s", "<= 8", "d3"),
            bench.Figure("P4", "gpu", None, "x", ">= 1", "not measured (no GPU)")]
    assert [f.met for f in figs] == ["yes", "NO", "-"]
    bench.print_table(figs)
    out = capsys.readouterr().out
    assert "not measured" in out and "9.5 s" in out and "P4: not measured (no GPU)" in out
    bench.write_csv(figs, tmp_path / "b.csv", "a machine")
    rows = list(csv.DictReader(open(tmp_path / "b.csv")))
    assert [(r["figure"], r["value"], r["met"]) for r in rows] == [("P1", "0.98", "yes"), ("P3", "9.5", "NO"),
                                                                  ("P4", "", "-")]
    assert rows[0]["machine"] == "a machine"


def test_p4_without_a_gpu_is_not_measured(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    figs = bench.p4_gpu()
    assert [f.value for f in figs] == [None, None] and all("no GPU" in f.detail for f in figs)


def test_p5_quick_needs_a_run_and_never_invents_one(tmp_path):
    f = bench.p5_quick(None, None)
    assert f.value is None and f.detail.startswith("not measured: run the quick study first")
    f = bench.p5_quick(f"sqlite:///{tmp_path}/m.db", "0123456789abcdef")
    assert f.value is None and "0123456789abcdef" in f.detail


def _synthetic_study(uri: str) -> str:
    """A finished study run of 100 s with 3 trials: start-ups 10/12/14 s, runs of 30/32/34 s (own compute 20 each),
    and one errored trial without startup_seconds (left out)."""
    client = MlflowClient(uri)
    exp = client.create_experiment("batch_size_effect")
    t0 = 1_700_000_000_000
    parent = client.create_run(exp, start_time=t0, tags={"harness.role": "study", "harness.study": "batch_size_effect",
                                                        "harness.scale": "quick"}).info.run_id
    for i, start in enumerate((10, 12, 14)):
        run = client.create_run(exp, start_time=t0 + i * 1000, tags={"mlflow.parentRunId": parent,
                                                                    "harness.role": "trial"}).info.run_id
        client.log_metric(run, "startup_seconds", start)
        client.set_terminated(run, end_time=t0 + i * 1000 + (start + 20) * 1000)
    bad = client.create_run(exp, start_time=t0, tags={"mlflow.parentRunId": parent, "harness.role": "trial"})
    client.set_terminated(bad.info.run_id, status="FAILED", end_time=t0 + 5000)
    client.set_terminated(parent, end_time=t0 + 100_000)
    return parent


def test_study_timing_from_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = _synthetic_study(uri)
    t = bench.study_timing(uri, parent)
    assert t["wall_s"] == pytest.approx(100) and t["compute_s"] == pytest.approx(60) and t["trials"] == 4
    assert sorted(t["startups"]) == [10, 12, 14]
    f = bench.p5_quick(uri, parent)
    assert f.value == pytest.approx(100 / 60) and f.met == "NO" and "median start-up 12.0 s" in f.detail
    assert bench.study_parent_run(uri, "batch_size_effect") == parent


def test_the_smoke_grid_is_16_two_worker_trials(tmp_path):
    path = bench.smoke_grid_study(tmp_path, 16)
    spec = specs.load_spec(str(path))
    trials = specs.trials(spec, "smoke")
    assert len(trials) == 16 and specs.resolve(spec, "smoke")["resources"]["workers"] == 2
    assert len({t.cell for t in trials}) == 4


def test_p1_and_p2_measure_positive_rates(monkeypatch):
    monkeypatch.setattr(bench, "bench_dataset", lambda: ("digits", None))  # the bundled one: seconds, not tens
    p1 = bench.p1_trial_vs_bare(torch.device("cpu"), steps=2, warmup=1, repeats=1)
    assert p1.value > 0 and "harness" in p1.detail and "bare" in p1.detail
    p2 = bench.p2_augmentation(batches=2, loader_images=250)
    assert p2.value > 0 and "DataLoader" in p2.detail


def test_unknown_figure_is_one_line_and_exit_2(capsys):
    assert bench.main(["--only", "P1,P9"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: unknown figure P9; figures: P1, P2, P3, P4, P5"


# ----------------------------------------------------------------------------------------- measured costs (--dry-run)
def test_dry_run_without_the_studys_gpus_labels_the_files_figure_assumed(workdir, capsys, monkeypatch):
    from harness.study.cli import main as study_main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert study_main(["batch_size_effect", "--scale", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "at 12,000 images/s per trial (ASSUMED: configured in the study file (images_per_s), not measured" in out
    assert "measured on this machine" not in out


def test_dry_run_on_the_studys_hardware_measures_after_warm_up(workdir, capsys, monkeypatch):
    from harness.study.cli import main as study_main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert study_main(["batch_size_effect", "--scale", "smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "measured on this machine (CPU" in out and "4 steps of the first trial after 2 warm-up" in out
    assert "ASSUMED" not in out


def test_dry_run_without_the_studys_data_falls_back_to_the_files_figure(workdir, capsys, monkeypatch):
    """A CPU study could be measured here, but its dataset is not on this machine: the study file's figure,
    labelled with why (this used to end in a DataNotFoundError traceback)."""
    from harness.study import cli as study
    from harness.trial import data

    def no_data(*a, **k):
        raise data.DataNotFoundError("dataset 'mnist' not found")
    monkeypatch.setattr(study, "measure_images_per_s", no_data)
    assert study.main(["negative_mnist", "--scale", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "at 50,000 images/s per trial (ASSUMED: configured in the study file (images_per_s), not measured here " \
           "(dataset mnist is not on this machine))" in out
    assert "4.8 trial-minutes = 4.8 CPU-minutes" in out


def test_dry_run_with_no_way_to_know_gives_no_estimate(workdir, capsys, monkeypatch):
    import yaml

    from harness.study.cli import main as study_main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = yaml.safe_load((bench.REPO / "studies" / "batch_size_effect.yaml").read_text())
    del spec["scales"]["paper"]["images_per_s"]
    path = workdir / "gpu_only.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert study_main([str(path), "--scale", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "no cost estimate: the study runs on GPUs, this machine has none" in out and "GPU-hours" not in out


def test_startup_profile_gives_each_ranks_median_phase(tmp_path):
    import json
    rows = []
    for trial, shift in (("a", 0.0), ("b", 2.0), ("c", 4.0)):
        for rank in (0, 1):
            t0 = 1000.0
            rows.append({"trial": trial, "rank": rank, "driver_started": t0, "process_created": t0 + 5 + shift,
                         "imported": t0 + 8 + shift, "loop_entered": t0 + 9 + shift, "hostnames_gathered": t0 + 9.5,
                         "mlflow_started": t0 + 10 + rank, "first_step": t0 + 12 + shift})
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = bench.startup_profile(path)
    assert "median of 3" in lines[0] and "rank 0" in lines[0] and "rank 1" in lines[0]
    first_step = next(line for line in lines if line.startswith("data, model"))
    assert first_step.split()[-2:] == ["14.0", "14.0"]
    mlflow = next(line for line in lines if line.startswith("rank 0's MLflow"))
    assert mlflow.split()[-2:] == ["10.0", "11.0"]
    assert bench.startup_profile(tmp_path / "none.jsonl") == []
