"""Real servers the tests start and stop: a free loopback port, a process group killed to the last process, and
`mlflow server` (sqlite store, proxied artifacts, as on the cluster's head) that a test can stop and restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group of `proc`, which a test started in a new session (a driver and
    its Ray, or an MLflow server), and wait until the group is gone."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=30)  # reap the leader: a zombie still counts as a member of its group
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


class MlflowServer:
    """A real `mlflow server` on a fixed free port and a sqlite store, that a test can stop and start again."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.folder, self.uri, self.proc = folder, f"http://127.0.0.1:{self.port}", None
        self.store = f"sqlite:///{folder}/mlflow.db"  # read directly by a test while the server is down

    def start(self) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.store, "--artifacts-destination", str(self.folder / "artifacts"),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not answer in 120 s: {(self.folder / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None
