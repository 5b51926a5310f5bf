"""A quiet console: a real 2-trial study (the CLI starting its own Ray) prints Tune's table and the harness's own
lines; Ray Train's per-report lines, Ray's token-auth warning and library warnings land in harness.log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    from tests.test_study import TINY
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from test_study import TINY

REPO = Path(__file__).resolve().parent.parent
NOISE = ("Reporting training result", "Token authentication is", "Warning:")  # "Warning:": any Python warning


@pytest.mark.slow
def test_study_console_has_the_table_and_our_lines_and_the_log_has_the_rest(tmp_path):
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump(TINY, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "harness.study", str(study), "--storage", str(tmp_path / "rs")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    log = tmp_path / "rs" / "tiny-smoke" / "harness.log"
    assert any(f"libraries' warnings: {log}" in line for line in proc.stdout.splitlines()[:3])  # said up front
    assert "study tiny (smoke): 2 trials" in proc.stdout and "finished in" in proc.stdout  # the harness's lines
    assert "Trial status" in console or "== Status ==" in console  # Tune's table
    for line in NOISE:
        assert line not in console, (line, [c for c in console.splitlines() if line in c][:3])
    text = log.read_text()
    assert "Reporting training result" in text and "from rank 1" in text  # every worker's reports
    assert "Token authentication is" in text


def test_tunes_resume_hint_after_ctrl_c_goes_to_the_log_not_the_console(tmp_path, capfd):
    """After Ctrl-C Tune logs "Resume experiment with: Tuner.restore(...)"; the harness prints its own way to
    continue (--resume), so Tune's logger is one of the study's NOISY_LOGGERS: into harness.log only."""
    import logging

    import ray.tune.tune as tune_run

    from harness.study import console

    assert tune_run.logger.name in console.NOISY_LOGGERS
    saved = tune_run.logger.handlers[:], tune_run.logger.propagate, tune_run.logger.level
    log = tmp_path / "harness.log"
    root_console = logging.StreamHandler()  # stderr, like a terminal's handler on the root logger
    logging.getLogger().addHandler(root_console)
    try:
        console.quiet_console(str(log))
        tune_run.logger.warning('Experiment has been interrupted, but the most recent state was saved.\n'
                                'Resume experiment with: Tuner.restore(path="/x/tiny-smoke", trainable=...)')
    finally:
        logging.getLogger().removeHandler(root_console)
        for handler in tune_run.logger.handlers:
            if handler not in saved[0]:
                handler.close()
        tune_run.logger.handlers, tune_run.logger.propagate = saved[0], saved[1]
        tune_run.logger.setLevel(saved[2])
    captured = capfd.readouterr()
    assert "Tuner.restore" not in captured.out + captured.err
    assert "Resume experiment with: Tuner.restore" in log.read_text()


def test_an_actor_stopped_by_sigterm_leaves_one_log_line_not_a_console_traceback(tmp_path, capfd, monkeypatch):
    """Ray's SIGTERM handler raises SystemExit in a stopped trial driver; inside a weakref callback Python would print
    'Exception ignored in ... Traceback ... SystemExit: 1' on the study's console. After quiet_console it is one line
    in the log; any other unraisable exception still reaches stderr with its traceback."""
    import gc

    from harness.study import console

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    log = tmp_path / "harness.log"
    console.quiet_console(str(log))

    class Raises:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    Raises(SystemExit(1))
    gc.collect()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "SystemExit" not in err, err
    assert "process stopped (SystemExit 1)" in log.read_text()
    Raises(ValueError("a real error"))
    gc.collect()
    err = capfd.readouterr().err
    assert "Traceback" in err and "ValueError: a real error" in err, err
