"""A tracking outage on the console: TrialLogger says once that MLflow is down and once that it is back (with what
it delivered), or once that it gave up; the per-call retry lines of urllib3 (and MLflow's HTTP client) go to the
study's log file. No server: the store is an address nothing listens on, and "back" is the logger pointed at a
sqlite store."""

from __future__ import annotations

import logging
import sys
import time

import pytest

from harness.study import console, tracking

DOWN = "http://127.0.0.1:9"  # nothing listens: refused at once, after urllib3's retry


@pytest.fixture
def worker_console(tmp_path, capfd):
    """The logging a trial's worker has (quiet_worker: quiet_console(log); a console handler on the root logger,
    as Ray's worker has), with the NOISY_LOGGERS as they were restored afterwards. Yields the log file."""
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate,
                    logging.getLogger(name).level) for name in console.NOISY_LOGGERS}
    root_console = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(root_console)
    log = tmp_path / "harness.log"
    console.quiet_console(str(log))
    yield log
    logging.getLogger().removeHandler(root_console)
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)


def tracking_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: tracking:")]


def a_run(tmp_path) -> tuple[str, str]:
    """(sqlite store, a run in it): where the logger delivers once MLflow is "back"."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    exp_id = tracking.experiment_id(store, "outage")  # artifacts beside the store, not in the working directory
    return store, tracking.mlflow_client(store).create_run(exp_id).info.run_id


def test_an_outage_is_one_line_down_and_one_line_back_and_the_retries_go_to_the_log(worker_console, capfd,
                                                                                    tmp_path):
    store, run_id = a_run(tmp_path)
    capfd.readouterr()  # the store's own creation lines
    t0 = time.monotonic()
    logger = tracking.TrialLogger(DOWN, run_id, grace_s=60)  # its first delivery (the RUNNING status) fails
    steps = []
    while time.monotonic() - t0 < 4:  # training goes on through the outage: a flush per evaluation, each failing
        steps.append(5 * (len(steps) + 1))
        logger.log_eval({"step": steps[-1], "test_acc": 0.5, "test_loss": 1.0})
        assert logger.flush() is False
        time.sleep(0.3)
    buffered = logger.pending
    logger.uri, logger.client = store, tracking.mlflow_client(store)  # MLflow is back
    assert logger.finish({"status": "completed", "steps_run": steps[-1], "final_acc": 0.5}, []) is True

    captured = capfd.readouterr()
    lines = tracking_lines(captured.err)
    assert len(lines) == 2, captured.err
    down, back = lines
    assert f"MLflow {DOWN} unreachable" in down and "training goes on" in down and f"run {run_id}" in down
    assert f"MLflow {store} answers again after" in back and f"run {run_id}: the {buffered + 1} items" in back
    assert f"evaluations through step {steps[-1]}" in back
    assert "Retrying" not in captured.err + captured.out, captured.err
    assert "Retrying (" in worker_console.read_text()  # urllib3 did retry each call: into the log file
    history = tracking.mlflow_client(store).get_metric_history(run_id, "test_acc")
    assert sorted(m.step for m in history) == steps  # every evaluation buffered through the outage, once


def test_an_outage_past_the_grace_period_is_one_line_down_and_one_line_given_up(worker_console, capfd):
    logger = tracking.TrialLogger(DOWN, "run0", grace_s=2)
    for step in (5, 10, 15):
        logger.log_eval({"step": step, "test_acc": 0.5})
    assert logger.finish({"status": "completed", "steps_run": 15, "final_acc": 0.5}, []) is False

    captured = capfd.readouterr()
    lines = tracking_lines(captured.err)
    assert len(lines) == 2, captured.err
    assert "unreachable" in lines[0] and "still unreachable after 2 s" in lines[1]
    assert "5 items of run run0 not logged" in lines[1] and "python -m harness.study.backfill" in lines[1]
    assert "Retrying" not in captured.err + captured.out, captured.err
    assert "Retrying (" in worker_console.read_text()
