"""Two studies on one machine, each with its own local Ray: Ray Train's PlacementGroupCleaner (one detached actor per
trial, asking Ray's state API whether the trial's controller is alive) must find its own Ray, not die with "Found
multiple active Ray instances" and print its traceback on the study's console."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # Ray, an MLflow server or spawned processes: the full suite, not the fast tier

try:
    from tests.test_study import TINY
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from test_study import TINY

REPO = Path(__file__).resolve().parent.parent
SHORT = {**TINY, "base": {**TINY["base"], "steps": 10, "eval_every": 5}}  # 2 trials of 10 steps each


def start_study(folder: Path) -> tuple[subprocess.Popen, list[tuple[float, str]], threading.Thread]:
    """`python -m harness.study` in `folder` with its own storage and sqlite store; its console lines, timed."""
    folder.mkdir()
    study = folder / "tiny.yaml"
    study.write_text(yaml.safe_dump(SHORT, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "harness.study", str(study), "--storage", str(folder / "rs"),
                             "--tracking-uri", f"sqlite:///{folder}/mlflow.db"],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[tuple[float, str]] = []

    def read():
        for line in proc.stdout:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, reader


def first(lines: list[tuple[float, str]], text: str) -> float:
    return next(t for t, line in lines if text in line)


def test_two_studies_at_once_keep_their_consoles_free_of_the_placement_group_cleaners_tracebacks(tmp_path):
    studies = [start_study(tmp_path / name) for name in ("a", "b")]
    try:
        for proc, _, reader in studies:
            proc.wait(timeout=540)
            reader.join(timeout=30)
    finally:
        for proc, _, _ in studies:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    consoles = ["".join(line for _, line in lines) for _, lines, _ in studies]
    for (proc, _, _), console in zip(studies, consoles):
        assert proc.returncode == 0, console[-3000:]
        assert "finished in" in console
        assert "Found multiple active Ray instances" not in console, console[-3000:]
        assert "Traceback" not in console, console[-3000:]
    # both Rays were up while the other study's trials ran (else the test proves nothing)
    (_, a, _), (_, b, _) = studies
    up = "study tiny (smoke): 2 trials"  # printed once the study's Ray is up, before its first trial
    assert first(a, up) < first(b, "finished in") and first(b, up) < first(a, "finished in"), consoles
