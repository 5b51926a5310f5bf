"""Shared fixtures (and the fast tier's guard, below): one local Ray per test module that needs it (starting Ray
costs ~10 s), sized like CI: 2 CPUs.
Module scope, not session: Ray's processes are gone again before the gloo tests of test_trial.py spawn theirs."""

from __future__ import annotations

import os

import pytest

from harness.study.cluster import DRIVER_RESOURCE, RAY_ENV, own_dashboard


@pytest.fixture(scope="module")
def ray_session():
    import ray
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    env = dict(RAY_ENV)  # with own_dashboard: the trials' processes find this Ray beside a study's own
    ray.init(num_cpus=2, resources={DRIVER_RESOURCE: 8}, runtime_env={"env_vars": env}, log_to_driver=False,
             **own_dashboard(env))
    yield ray
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory with its own sqlite MLflow store and Ray storage."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("HARNESS_THROUGHPUT_FILE", str(tmp_path / "throughput.json"))  # no user's --preflight figures
    return tmp_path


# ------------------------------------------------------------------------------------------------ the fast tier
# `pytest -m "not slow"` is the edit loop's tier (README): no Ray, no MLflow server. A test that uses one of these
# fixtures is slow by that alone; any other test that starts Ray or an MLflow server in this process fails, here and
# in the full run, with a line saying to mark it, so the fast tier cannot quietly grow one.
SLOW_FIXTURES = {"ray_session", "ray_head", "hooked_ray", "server", "store"}


@pytest.fixture(autouse=True)
def _fast_tier_has_no_servers(request, monkeypatch):
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(*_args, **_kwargs):
        pytest.fail(f"{request.node.nodeid} starts Ray or an MLflow server: mark it @pytest.mark.slow", pytrace=False)

    monkeypatch.setattr("ray.init", refuse)
    monkeypatch.setattr("servers.MlflowServer.start", refuse)


def pytest_itemcollected(item):  # a test that uses a Ray or server fixture is slow by that alone
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.slow)
