"""MLflow tracking: URI resolution, the store check, and the smoke study against a real `mlflow server`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow_checks import check_study_runs

from harness import tracking
from harness.study import main


def test_uri_resolution_order_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/store.db")
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path}/rel/store.db"
    assert tracking.resolve_tracking_uri("http://head:5000") == "http://head:5000"  # the CLI wins


def test_store_check_gives_one_line(tmp_path):
    with pytest.raises(tracking.TrackingError) as e:
        tracking.check_store("http://127.0.0.1:9")
    assert "does not answer" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(tracking.TrackingError, match="no such writable folder"):
        tracking.check_store(f"sqlite:///{tmp_path}/missing/dir/mlflow.db")
    tracking.check_store(f"sqlite:///{tmp_path}/mlflow.db")  # creates and answers


def test_flatten_makes_nested_params_loggable():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--artifacts-destination", str(store / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, 15)
        pytest.fail("mlflow server did not start in 90 s")
    yield uri
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def test_smoke_study_against_a_real_mlflow_server(ray_session, workdir, mlflow_server):
    rc = main(["batch_size_effect", "--scale", "smoke", "--tracking-uri", mlflow_server])
    assert rc == 0
    _, children = check_study_runs(mlflow_server, "batch_size_effect", n_trials=4)
    assert {c.data.tags["harness.cell"] for c in children} == {
        "batch_size=250,schedule=one_cycle", "batch_size=250,schedule=multistep",
        "batch_size=1000,schedule=one_cycle", "batch_size=1000,schedule=multistep"}
    assert not Path(workdir, "mlflow.db").exists()  # nothing went to the default store
