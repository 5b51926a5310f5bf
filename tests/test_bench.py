"""`python -m harness.bench`: the figures' arithmetic (from a synthetic MLflow store), goals, the CSV, the smoke grid
it runs, and that what it cannot measure says so. The speeds themselves are the benchmark's output, not tested."""

from __future__ import annotations

import csv
from pathlib import Path

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


# ----------------------------------------------------------------------------------------- P5's arithmetic (no Ray)
T0 = 1_700_000_000_000  # ms, as MLflow keeps run times


def _span(start_s: float, end_s: float | None, train_s: float | None = None) -> bench.RunSpan:
    return bench.RunSpan(T0 + int(start_s * 1000), None if end_s is None else T0 + int(end_s * 1000), train_s)


def test_p5_is_study_wall_over_the_trials_training_time_from_their_timestamps():
    """This week's -1.32: a trial's run opens when rank 0 reaches MLflow, ~11 s after its Tune trial started, so
    (run end - run start) - startup_seconds went negative. P5 now takes the time the trials spent in optimizer
    steps (train_seconds): a 229 s study of 16 one-at-a-time trials, each run open 10 s, 2.5 s of steps."""
    study = _span(0, 229)
    trials = [_span(5 + 14 * i, 15 + 14 * i, 2.5) for i in range(16)]
    o = bench.study_overhead(study, trials)
    assert (o.wall_s, o.compute_s, o.at_once, o.trials) == (229, 40, 1, 16)
    assert o.runs_open_s == pytest.approx(160)
    assert o.ratio == pytest.approx(229 / 40) and o.ratio > 0


def test_p5_counts_the_slots_of_trials_that_run_at_once():
    """Two trials at a time for 100 s, 40 s of steps each: the best the study could do is 80 s, so 100 / 80."""
    trials = [_span(0, 50, 40), _span(0, 50, 40), _span(50, 100, 40), _span(50, 100, 40)]  # end = next start
    o = bench.study_overhead(_span(0, 100), trials)
    assert o.at_once == 2 and o.ratio == pytest.approx(100 / (160 / 2))
    assert bench.most_at_once([]) == 0 and bench.most_at_once([(0, 10), (5, 20), (9, 30), (20, 40)]) == 3


def test_p5_leaves_out_what_is_no_duration_and_never_goes_negative():
    """A trial that errored before its first evaluation (no train_seconds, no end) counts nothing; a clock that
    went backwards in a trial run (end before start) counts in no overlap; neither makes the figure negative."""
    trials = [_span(0, 30, 20), _span(30, None), _span(40, 35, 5)]
    o = bench.study_overhead(_span(0, 50), trials)
    assert (o.compute_s, o.at_once, o.runs_open_s, o.trials) == (25, 1, 30, 3) and o.ratio == pytest.approx(2)
    for study, trials, why in [(_span(0, None), [_span(0, 1, 1)], "has not finished"),
                               (_span(10, 10), [_span(0, 1, 1)], "lasted 0 s"),
                               (_span(0, 10), [_span(0, 1), _span(1, 2, 0.0)], "logged any training time"),
                               (_span(0, 10), [], "logged any training time"),
                               (_span(0, 10), [_span(0, 1, -3.0)], "not a duration"),
                               (_span(0, 10), [_span(0, 1, float("nan"))], "not a duration")]:
        with pytest.raises(ValueError, match=why):
            bench.study_overhead(study, trials)


def test_p3_is_the_harness_median_start_over_the_bare_trials():
    assert bench.startup_ratio([14.0, 13.0, 30.0], [10.0, 9.0, 11.0, 12.0]) == pytest.approx(14 / 10.5)
    f = bench.p3_figure([14.0, 13.0, 30.0], {"startups": [10.0, 9.0, 11.0], "error": None, "at_once": 1})
    assert f.value == pytest.approx(1.4) and f.met == "NO" and f.unit == "x"
    assert "harness 14.0 s" in f.detail and "bare" in f.detail and "10.0 s" in f.detail
    f = bench.p3_figure([14.0], {"startups": [], "error": "RuntimeError: 1 of 1 bare trials failed", "at_once": 0})
    assert f.value is None and "bare trials failed" in f.detail and "harness median 14.0 s" in f.detail
    for harness, bare in (([], [1.0]), ([1.0], [0.0]), ([1.0], [float("inf")])):
        with pytest.raises(ValueError):
            bench.startup_ratio(harness, bare)


def test_p3w_leaves_out_each_actors_first_trial_and_names_the_bare_function_trial():
    bare = {"function_startups": [0.002, 0.003, 0.001]}
    f = bench.p3w_figure([13.0, 12.5, 0.4, 0.3, 0.5, 0.2], at_once=2, bare=bare)
    assert f.value == pytest.approx(0.35) and f.met == "yes" and f.unit == "s"  # median of 0.2-0.5, not of all six
    assert "median of 4 trials" in f.detail and "first trial 12.8 s" in f.detail and "2 ms" in f.detail
    f = bench.p3w_figure([13.0, 3.0, 2.5], at_once=1, bare={"function_error": "RuntimeError: boom"})
    assert f.value == pytest.approx(2.75) and f.met == "NO" and "RuntimeError: boom" in f.detail
    assert bench.p3w_figure([13.0, 12.0], at_once=2, bare=bare).value is None  # only first trials: no figure


def test_the_many_small_trials_study_is_activation_mysterys_quick_grid_cut_down(tmp_path):
    from harness import spec as specs
    spec = specs.load_spec(str(bench.many_small_study(tmp_path, 5)))
    trials = specs.trials(spec, "quick")
    assert len(trials) == 5 and {t.config.dataset for t in trials} == {"mnist"}
    assert {t.config.steps for t in trials} == {600} and specs.at_scale(spec, "quick")["resources"]["workers"] == 1
    assert all(t.config.lr_from_finder is None for t in trials)


def test_without_the_many_small_trials_run_p3w_and_p5m_say_why():
    figures = bench.p3w_p5m(bench.SmokeRun(Path("/nonexistent")))
    assert [f.name for f in figures] == ["P3w", "P5m"] and all(f.value is None for f in figures)
    assert all("MNIST" in f.detail for f in figures)


# ----------------------------------------------------------------------------------------- P5 from an MLflow store
def _synthetic_study(uri: str) -> str:
    """A finished study run of 100 s with 3 trials one after another: start-ups 10/12/14 s, runs of 30 s with 20 s
    of optimizer steps each (train_seconds logged per evaluation, the last one counts), and one errored trial
    without any metric (counts nothing)."""
    client = MlflowClient(uri)
    exp = client.create_experiment("batch_size_effect")
    parent = client.create_run(exp, start_time=T0, tags={"harness.role": "study", "harness.study": "batch_size_effect",
                                                        "harness.scale": "quick"}).info.run_id
    for i, start in enumerate((10, 12, 14)):
        run = client.create_run(exp, start_time=T0 + i * 30_000, tags={"mlflow.parentRunId": parent,
                                                                      "harness.role": "trial"}).info.run_id
        client.log_metric(run, "startup_seconds", start)
        client.log_metric(run, "train_seconds", 9.0, step=10)
        client.log_metric(run, "train_seconds", 20.0, step=20)
        client.set_terminated(run, end_time=T0 + (i + 1) * 30_000)
    bad = client.create_run(exp, start_time=T0 + 90_000, tags={"mlflow.parentRunId": parent, "harness.role": "trial"})
    client.set_terminated(bad.info.run_id, status="FAILED", end_time=T0 + 95_000)
    client.set_terminated(parent, end_time=T0 + 100_000)
    return parent


def test_study_timing_from_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = _synthetic_study(uri)
    t = bench.study_timing(uri, parent)
    o = t.overhead()
    assert (o.wall_s, o.compute_s, o.at_once, o.trials) == (100, 60, 1, 4) and o.runs_open_s == pytest.approx(95)
    assert sorted(t.startups) == [10, 12, 14] and (t.study, t.scale) == ("batch_size_effect", "quick")
    f = bench.p5_quick(uri, parent)
    assert f.value == pytest.approx(100 / 60) and f.met == "NO" and "median start-up 12.0 s" in f.detail
    assert "4 trials, one at a time: study 100 s, trials' own compute (optimizer steps, train_seconds) 60.0 s" \
        in f.detail
    assert bench.study_parent_run(uri, "batch_size_effect") == parent
    assert bench.study_parent_run(uri, "no_such_study") is None


def test_the_smoke_grid_is_16_two_worker_trials(tmp_path):
    path = bench.smoke_grid_study(tmp_path, 16)
    spec = specs.load_spec(str(path))
    trials = specs.trials(spec, "smoke")
    assert len(trials) == 16 and specs.at_scale(spec, "smoke")["resources"]["workers"] == 2
    assert len({t.cell for t in trials}) == 4


@pytest.mark.slow  # trains or builds every study's report: seconds, the full suite's
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


def test_the_csv_is_written_only_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "measure", lambda *a: [bench.Figure("P2", "aug", 12.0, "x", ">= 10", "d")])
    assert bench.main(["--only", "P2"]) == 0
    assert list(tmp_path.iterdir()) == [] and "CSV" not in capsys.readouterr().out
    assert bench.main(["--only", "P2", "--csv", "b.csv"]) == 0
    assert "CSV: b.csv" in capsys.readouterr().out
    assert [r["figure"] for r in csv.DictReader(open(tmp_path / "b.csv"))] == ["P2"]


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
    assert "0.16 trial-hours = 0.16 CPU-hours" in out


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


# ----------------------------------------------------------------------------------------- P3's bare trial
@pytest.mark.slow  # trains or builds every study's report: seconds, the full suite's
def test_the_bare_trial_imports_nothing_of_the_harness_beyond_its_config():
    """Ray's processes of the bare trial import this module to run its functions: no harness.trial/.study, no Ray,
    until a function asks (P3's floor must not carry the harness's imports)."""
    import subprocess
    import sys
    code = ("import sys, harness.bench; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray' or "
            "m.startswith(('harness.trial', 'harness.study', 'mlflow'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_bare_trial_reports_its_start_up(ray_session, tmp_path):
    """A bare Tune trial running a bare 2-worker TorchTrainer, with the harness's resource pattern, in Ray."""
    out = bench.bare_trials(1, {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0}, tmp_path / "ray")
    assert out["at_once"] == 1 and len(out["startups"]) == 1 and 0 < out["startups"][0] < 300
