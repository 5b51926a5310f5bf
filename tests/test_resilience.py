"""Reliability under the failures a long study meets, each against real runs of a tiny 2-worker study:

- Ctrl-C (SIGINT to the study's process group) and SIGKILL of the driver, then --resume;
- the MLflow server stopped mid-study and restarted 30 s later, or down past the grace bound (then
  `harness.study.backfill`);
- a Train worker lost between evaluations, during an evaluation, on rank 1, and right after a report.

The subprocess tests start their own Ray in a new session and clean up only that process group. The
in-process tests share one Ray whose worker processes run tests/crash_hooks.py (a Ray setup hook), so the
crash moments live here, not in harness/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow_checks import EVAL, check_study_runs
from servers import MlflowServer, kill_group

from harness.config import TrialConfig
from harness.spec import Trial
from harness.study import backfill, tracking
from harness.study.cli import main
from harness.study.cluster import DRIVER_RESOURCE, RAY_ENV

pytestmark = pytest.mark.slow  # Ray, an MLflow server or spawned processes: the full suite, not the fast tier

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
BASE = {"dataset": "digits", "model": "small_cnn", "preprocess": "paper", "batch_size": 250, "bn_batch": 125,
        "steps": 20, "eval_every": 5, "base_lr": 0.08, "bn_momentum": 0.5, "device": "cpu"}
ONE_CYCLE = {"schedule": "one_cycle", "max_lr": 0.8}


def study(*paired: dict, workers: int = 2) -> dict:
    return {"name": "tiny", "question": "Does the pipeline run?", "claims": ["SC1"], "target_acc": 0.5,
            "resources": {"workers": workers, "gpus_per_worker": 0, "cpus_per_worker": 1}, "base": BASE,
            "paired": {"schedule": list(paired)}}


# a short trial, then a long one (30 checkpoints) to interrupt in its middle
LONG = {"schedule": "cosine", "max_lr": 0.4, "steps": 300, "eval_every": 10}
TWO_TRIALS = study(ONE_CYCLE, LONG)
# The tracking outages are the trial's MLflow writer's (TrialLogger), the same on both paths: they run as one-worker
# trials (in their Tune actor), the cheaper path; Ctrl-C, SIGKILL of the driver and the lost workers of rank 1 are
# Ray Train's too and keep their 2 workers.
TWO_TRIALS_ONE_WORKER = study(ONE_CYCLE, LONG, workers=1)


def write_study(folder: Path, spec: dict) -> str:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def runs(uri: str, role: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`harness.role` = '{role}'")


def by_name(uri: str) -> dict:
    """The study's trial runs by schedule (each tiny study here has one trial per schedule)."""
    return {r.data.params["schedule"]: r for r in runs(uri, "trial")}


def eval_steps(uri: str, run_id: str, key: str = "test_acc") -> list[int]:
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def wait_for(condition, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            value = condition()
        except Exception:  # the store may still be being created
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the study ended (rc {proc.returncode}) before {what}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def start_cli(workdir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "harness.study", *args], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def long_trial_reported(uri: str) -> bool:
    run = by_name(uri).get("cosine")
    return run is not None and bool(eval_steps(uri, run.info.run_id))


def tune_terminated(workdir: Path) -> set[str]:
    """Trials that Tune's saved experiment state records as TERMINATED."""
    done = set()
    for state_file in (workdir / "ray_results" / "tiny-smoke").glob("experiment_state-*.json"):
        for trial_json, _ in json.loads(state_file.read_text())["trial_data"]:
            trial = json.loads(trial_json)
            if trial["status"] == "TERMINATED":
                done.add(trial["config"]["trial"]["name"])
    return done


def check_resumed(uri: str, first_end_time: int) -> None:
    """After --resume: one parent and two children, FINISHED; the short trial untouched; the long one continued
    from a checkpoint with every evaluation step logged once."""
    (parent,) = runs(uri, "study")
    assert parent.info.status == "FINISHED"
    trials = by_name(uri)
    assert set(trials) == {"one_cycle", "cosine"}
    assert {r.info.status for r in trials.values()} == {"FINISHED"}
    assert {r.data.tags["harness.status"] for r in trials.values()} == {"completed"}
    short, long = trials["one_cycle"], trials["cosine"]
    assert short.info.end_time == first_end_time and "harness.resumed_from_step" not in short.data.tags
    assert int(long.data.tags["harness.resumed_from_step"]) >= 10  # a checkpoint, not a restart from 0
    assert eval_steps(uri, long.info.run_id) == list(range(10, 301, 10))
    assert eval_steps(uri, short.info.run_id) == [5, 10, 15, 20]
    check_study_runs(uri, "tiny", n_trials=2)


# ------------------------------------------------------------------------------------------------- interrupts
def resume_and_check(workdir: Path, path: str, uri: str, short_trial_end: int) -> None:
    """`--resume` the study in a new process; it must exit 0 and leave what check_resumed asserts."""
    resumed = start_cli(workdir, path, "--resume")
    try:
        out = resumed.communicate(timeout=300)[0]
    finally:
        kill_group(resumed)
    assert resumed.returncode == 0, out[-3000:]
    check_resumed(uri, short_trial_end)


def test_ctrl_c_stops_at_a_checkpoint_marks_runs_killed_exits_130_and_resumes(workdir):
    path = write_study(workdir, TWO_TRIALS)
    uri = f"sqlite:///{workdir}/mlflow.db"
    proc = start_cli(workdir, path)
    try:
        wait_for(lambda: long_trial_reported(uri), 240, "the long trial's first evaluation", proc)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
        out = proc.communicate(timeout=180)[0]
    finally:
        kill_group(proc)
    assert proc.returncode == 130, out[-3000:]
    assert f"Continue with: python -m harness.study {path} --resume" in out
    (parent,) = runs(uri, "study")
    assert parent.info.status == "KILLED"
    trials = by_name(uri)
    assert trials["one_cycle"].info.status == "FINISHED" and trials["cosine"].info.status == "KILLED"
    assert eval_steps(uri, trials["cosine"].info.run_id)[-1] < 300  # stopped before its end

    resume_and_check(workdir, path, uri, trials["one_cycle"].info.end_time)


def test_sigkill_of_the_driver_then_resume_finishes_without_rerun_or_duplicates(workdir):
    path = write_study(workdir, TWO_TRIALS)
    uri = f"sqlite:///{workdir}/mlflow.db"
    proc = start_cli(workdir, path)
    try:
        wait_for(lambda: "one_cycle" in tune_terminated(workdir) and long_trial_reported(uri), 240,
                 "the short trial recorded as finished and the long one's first evaluation", proc)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only; its Ray processes are then cleaned up below
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    (parent,) = runs(uri, "study")
    assert parent.info.status == "RUNNING"  # nobody was left to end it
    first_end = by_name(uri)["one_cycle"].info.end_time

    resume_and_check(workdir, path, uri, first_end)


# ------------------------------------------------------------------------------------------------- in-process Ray
@pytest.fixture(scope="module")
def hooked_ray(tmp_path_factory):
    """A 2-CPU local Ray whose worker processes install tests/crash_hooks.py; yields the crash plan's path."""
    import ray
    plan = tmp_path_factory.mktemp("crash") / "plan.json"
    env = {**RAY_ENV, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "HARNESS_TEST_CRASH_PLAN": str(plan)}
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    ray.init(num_cpus=2, resources={DRIVER_RESOURCE: 8}, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "crash_hooks.install"})
    yield plan
    ray.shutdown()


@pytest.fixture
def crash_plan(hooked_ray):
    """Write a plan for this test; none is left for the next."""
    def plan(moment: str, rank: int, step: int) -> None:
        hooked_ray.write_text(json.dumps({"moment": moment, "rank": rank, "step": step}))
    yield plan
    hooked_ray.unlink(missing_ok=True)
    Path(f"{hooked_ray}.fired").unlink(missing_ok=True)


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "server").start()
    yield srv
    srv.stop()


def first_metric(store: str) -> bool:
    return any(eval_steps(store, r.info.run_id) for r in runs(store, "trial"))


def stop_server_when(srv: MlflowServer, condition, down_s: float | None) -> dict:
    """In a thread: stop the server as soon as `condition(its sqlite store)` holds; start it again after
    `down_s` seconds (None: leave it down). Returns the times, filled in as it happens."""
    times: dict = {}

    def run():
        wait_for(lambda: condition(srv.store), 240, "the moment to stop the MLflow server")
        srv.stop()
        times["down"] = time.time()
        if down_s is not None:
            time.sleep(down_s)
            srv.start()
            times["up"] = time.time()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    times["thread"] = thread
    return times


# ------------------------------------------------------------------------------------------------- tracking outage
def test_mlflow_down_30_s_mid_study_loses_and_duplicates_nothing(hooked_ray, workdir, server, monkeypatch):
    monkeypatch.setenv(tracking.TRACKING_GRACE_ENV, "240")
    outage = stop_server_when(server, long_trial_reported, down_s=30)  # the long trial trains through it
    rc = main([write_study(workdir, TWO_TRIALS_ONE_WORKER), "--tracking-uri", server.uri])
    outage["thread"].join(timeout=120)
    assert rc == 0
    assert "up" in outage, "the server was never stopped and restarted"
    _, children = check_study_runs(server.uri, "tiny", n_trials=2)  # every step once, full schema
    trials = {c.data.params["schedule"]: c for c in children}
    assert eval_steps(server.uri, trials["one_cycle"].info.run_id) == [5, 10, 15, 20]
    history = MlflowClient(server.uri).get_metric_history(trials["cosine"].info.run_id, "test_acc")
    assert [m.step for m in history] == list(range(10, 301, 10))
    buffered = [m for m in history if outage["down"] * 1000 < m.timestamp < outage["up"] * 1000]
    assert buffered, "no evaluation happened while the server was down: the trial did not keep training"
    assert {c.info.status for c in children} == {"FINISHED"}
    (parent,) = runs(server.uri, "study")
    assert parent.info.status == "FINISHED"


def test_mlflow_down_past_the_grace_bound_then_backfill_fills_it_once(hooked_ray, workdir, server, monkeypatch,
                                                                     capsys):
    monkeypatch.setenv(tracking.TRACKING_GRACE_ENV, "5")
    path = write_study(workdir, study(ONE_CYCLE, {"schedule": "cosine", "max_lr": 0.4}, workers=1))
    outage = stop_server_when(server, first_metric, down_s=None)
    rc = main([path, "--tracking-uri", server.uri])
    outage["thread"].join(timeout=60)
    err = capsys.readouterr().err
    assert rc == 3, err[-3000:]  # every trial ended; MLflow misses some of it
    command = f"python -m harness.study.backfill tiny --scale smoke --storage {workdir / 'ray_results'} " \
              f"--tracking-uri {server.uri}"
    assert command in err
    assert "could not mark the study run" in err  # end_study_run failed: a warning, not a traceback
    assert "Traceback" not in err

    server.start()
    assert backfill.main(command.split()[3:]) == 0
    _, children = check_study_runs(server.uri, "tiny", n_trials=2)
    assert {c.info.status for c in children} == {"FINISHED"}
    (parent,) = runs(server.uri, "study")
    assert parent.info.status == "FINISHED"
    client = MlflowClient(server.uri)
    counts = {c.info.run_id: {k: len(client.get_metric_history(c.info.run_id, k)) for k in c.data.metrics}
              for c in children}
    assert all(n == 1 for c in counts.values() for k, n in c.items() if k in tracking.SUMMARY_METRICS)
    assert all(c["test_acc"] == 4 for c in counts.values())
    capsys.readouterr()
    assert backfill.main(command.split()[3:]) == 0  # again: adds nothing
    assert "0 trials back-filled, 2 already complete" in capsys.readouterr().out
    again = {c.info.run_id: {k: len(client.get_metric_history(c.info.run_id, k)) for k in c.data.metrics}
             for c in runs(server.uri, "trial")}
    assert again == counts


def test_store_failures_are_warnings_that_never_mask_the_first_error(capsys):
    down = "http://127.0.0.1:9"  # nothing listens: refused at once
    trial = Trial("s", "smoke", 1, TrialConfig(), ())
    tracking.mark_trial_error(down, "0", "p", trial, "RuntimeError: the real problem")
    assert tracking.end_study_run(down, "p", "FAILED") is False
    logger = tracking.TrialLogger(down, experiment_id="0", parent_run_id="p", trial=trial, grace_s=0)
    logger.log_eval({"step": 5, "test_acc": 0.5})
    assert logger.pending == 2  # the run's status update and the record wait in the buffer
    assert logger.finish({"status": "completed", "steps_run": 5, "final_acc": 0.5}, []) is False
    err = capsys.readouterr().err
    assert f"could not record the error of trial {trial.name}" in err and "could not mark the study run p FAILED" in err
    assert "still unreachable after 0 s" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------- lost workers
@pytest.mark.parametrize("moment, rank, step, resumed_from, workers", [
    ("window", 0, 12, {"10"}, 2),        # between the evaluations of steps 10 and 15
    ("window", 1, 12, {"10"}, 2),        # rank 1: rank 0 sees its peer vanish in the next collective
    ("window", 0, 12, {"10"}, 1),        # one worker: the Tune actor the trial trains in is lost; Tune restarts it
    ("eval", 0, 15, {"10"}, 1),          # entering the evaluation of step 15 (one worker: the cheaper path)
])
def test_lost_worker_resumes_from_its_last_checkpoint_with_every_step_once(crash_plan, hooked_ray, workdir, moment,
                                                                          rank, step, resumed_from, workers):
    crash_plan(moment, rank, step)
    rc = main([write_study(workdir, study(ONE_CYCLE, workers=workers))])
    assert rc == 0
    assert Path(f"{hooked_ray}.fired").exists(), "the planned crash did not happen"
    uri = f"sqlite:///{workdir}/mlflow.db"
    (run,) = runs(uri, "trial")  # one run, though its workers started twice
    assert run.info.status == "FINISHED" and run.data.tags["harness.status"] == "completed"
    assert run.data.tags["harness.resumed_from_step"] in resumed_from
    for key in EVAL:
        assert eval_steps(uri, run.info.run_id, key) == [5, 10, 15, 20], key
    check_study_runs(uri, "tiny", n_trials=1)


@pytest.mark.parametrize("workers", [2, 1])
def test_a_lost_worker_with_no_failures_allowed_errors_the_trial_with_exit_1(crash_plan, workdir, capsys, workers):
    crash_plan("window", 0, 7)
    rc = main([write_study(workdir, study(ONE_CYCLE, workers=workers)), "--max-failures", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "ERROR trial:" in err
    uri = f"sqlite:///{workdir}/mlflow.db"
    (run,) = runs(uri, "trial")
    assert run.data.tags["harness.status"] == "error" and run.data.tags["harness.error"]
    assert run.info.status == "FAILED"
    (parent,) = runs(uri, "study")
    assert parent.info.status == "FAILED"
