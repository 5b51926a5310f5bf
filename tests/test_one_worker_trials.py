"""One-worker trials train in their Tune actor (harness.study.driver, issue 26): Tune packs them two at a time on
two cores and reuses each actor for the next trial. A reused actor keeps torch imported and the dataset read, never
a trial's model, optimizer or RNG state: the same trial gives the same metrics, step for step, whether it ran first
in a fresh actor or after another trial in the same one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow_checks import check_study_runs
from test_study import TINY, write_study

from harness.study.cli import STARTUP_S, main, packing

X = {"schedule": "one_cycle", "max_lr": 0.8}  # the trial compared
Y = {"schedule": "cosine", "max_lr": 0.4}     # the one that runs before it on the same actor
ONE_WORKER = {**TINY["resources"], "workers": 1}


def run(folder: Path, name: str, arms: list[dict], *argv: str) -> str:
    folder.mkdir()
    study = {**TINY, "name": name, "resources": ONE_WORKER, "paired": {"schedule": arms}}
    assert main([write_study(folder, study), "--tracking-uri", f"sqlite:///{folder}/mlflow.db",
                 "--storage", str(folder / "ray_results"), *argv]) == 0
    return f"sqlite:///{folder}/mlflow.db"


def curves(uri: str, study: str) -> dict[str, dict[str, list]]:
    """schedule -> metric -> [(step, value)] of the study's trial runs."""
    client = MlflowClient(uri)
    _, children = check_study_runs(uri, study, n_trials=len(client.search_runs(
        [client.get_experiment_by_name(study).experiment_id], "tags.`harness.role` = 'trial'")))
    return {c.data.params["schedule"]: {k: [(h.step, h.value) for h in client.get_metric_history(c.info.run_id, k)]
                                        for k in ("train_loss", "test_loss", "test_acc", "lr")}
            for c in children}


def pids(folder: Path) -> dict[str, set[int]]:
    """trial folder -> the pids its Tune results came from (Tune's own result.json)."""
    found = {}
    for result in folder.glob("ray_results/*/*/result.json"):
        found[result.parent.name] = {json.loads(line)["pid"] for line in result.read_text().splitlines() if line}
    return found


def test_a_trial_after_another_on_the_same_actor_is_the_same_trial(ray_session, workdir):
    alone = curves(run(workdir / "alone", "alone", [X]), "alone")["one_cycle"]
    after = run(workdir / "after", "after", [Y, X], "--max-concurrent", "1")
    reused = curves(after, "after")
    by_trial = pids(workdir / "after")
    assert len(by_trial) == 2 and len(set.union(*by_trial.values())) == 1, by_trial  # one actor ran both trials
    for key, points in alone.items():
        assert [s for s, _ in reused["one_cycle"][key]] == [s for s, _ in points] == [5, 10, 15, 20], key
        assert [v for _, v in reused["one_cycle"][key]] == pytest.approx([v for _, v in points], rel=1e-6), key
    assert reused["cosine"]["lr"] != reused["one_cycle"]["lr"]  # two different trials did run


def test_one_worker_trials_run_two_at_once_on_two_cores(ray_session, workdir, capsys):
    run(workdir / "packed", "packed", [X, Y])
    out = capsys.readouterr().out
    assert "2 trials, 1 workers each, 2 at a time" in out
    assert len(set.union(*pids(workdir / "packed").values())) == 2  # two actors, side by side


def test_the_dry_run_packs_one_worker_trials_and_counts_their_start_up_once_per_actor(workdir, capsys):
    one, two = {**ONE_WORKER}, {**ONE_WORKER, "workers": 2}
    assert packing(one, 10, cpus=2, gpus=0) == (2, 2 * STARTUP_S["actor_first"] + 8 * STARTUP_S["actor_reused"])
    assert packing(two, 10, cpus=2, gpus=0) == (1, 10 * STARTUP_S["trainer"])
    assert packing({**one, "gpus_per_worker": 1}, 10, cpus=16, gpus=0)[0] == 0  # a GPU trial never fits a CPU box
    assert packing({**one, "gpus_per_worker": 1}, 3, cpus=16, gpus=8)[0] == 3
    assert main(["clr1", "--scale", "smoke", "--dry-run", "--workers-per-trial", "1"]) == 0  # measures: ~10 s
    out = capsys.readouterr().out
    assert f"here ({os.cpu_count()} CPUs" in out and "one-worker trials train in their reused Tune actor" in out, out
