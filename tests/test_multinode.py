"""Multi-node on one machine: a `ray.cluster_utils.Cluster` (a head with no CPU + two 1-CPU worker nodes), an S3
endpoint (moto's ThreadedMotoServer) as the shared --storage, and an `mlflow server` that every trial logs to
over HTTP. A smoke study's 2-worker DDP trials land on both nodes; then a worker node is removed mid-trial and a
fresh one added, and the trial resumes from its checkpoint in the bucket.

Nothing here ends a Ray process it did not start: the Cluster removes its own nodes (never `ray stop`), and it
keeps its session files in its own temp dir and does not write /tmp/ray/ray_current_cluster (where another
process's plain `ray.init()` would find it and connect)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import pytest
from mlflow.tracking import MlflowClient
from mlflow_checks import check_study_runs
from servers import MlflowServer, free_port
from test_study import TINY, write_study

from harness.study.cli import main
from harness.study.cluster import DRIVER_RESOURCE

pytestmark = pytest.mark.slow  # Ray, an MLflow server or spawned processes: the full suite, not the fast tier

REPO = Path(__file__).resolve().parent.parent
BUCKET = "harness-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
STUDY = {**TINY, "name": "multinode",  # STRICT_SPREAD: each trial's two ranks on two different nodes
         "resources": {**TINY["resources"], "placement": "STRICT_SPREAD"}}


@pytest.fixture(scope="module")
def credentials():
    """Dummy AWS credentials in this process's environment: the Cluster's raylets inherit them, and the study
    passes them on to its trials in Ray's runtime_env."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    yield CREDENTIALS
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def s3(credentials):
    """An S3 endpoint on loopback with one bucket; yields (boto3 client, endpoint host:port)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield client, f"{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with proxied artifacts, as on the cluster's head; yields its http:// tracking URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server.uri
    server.stop()


@pytest.fixture(scope="module")
def cluster(credentials):
    """Head (no CPU, the trial_driver resource, the dashboard for the state API) + two 1-CPU worker nodes."""
    import ray
    import ray._private.utils
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rmn-", dir="/tmp")  # short: unix socket paths max out at ~107 chars
    with mock.patch.object(ray._private.utils, "write_ray_address", lambda *a, **k: None):
        c = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
            "num_cpus": 0, "resources": {DRIVER_RESOURCE: 4}, "temp_dir": temp_dir,
            "include_dashboard": True, "dashboard_port": free_port()})
    workers = [c.add_node(num_cpus=1, temp_dir=temp_dir) for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers, temp_dir
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()  # removes the nodes it started, one by one (never `ray stop`)
    shutil.rmtree(temp_dir, ignore_errors=True)


def bucket_keys(client, prefix: str) -> list[str]:
    keys, token = [], {}
    while True:
        page = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **token)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = {"ContinuationToken": page["NextContinuationToken"]}


def train_worker_nodes(address: str) -> dict[str, set[str]]:
    """Ray Train worker actors (alive or dead) by node ID, from Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    nodes: dict[str, set[str]] = {}
    for a in actors:
        nodes.setdefault(a.node_id, set()).add(a.actor_id)
    return nodes


# --------------------------------------------------------------------------------------------------------------
def test_multinode_study_spreads_ranks_logs_over_http_and_stores_in_s3(cluster, s3, mlflow_server, tmp_path,
                                                                       monkeypatch, capsys):
    c, workers, _ = cluster
    client, endpoint = s3
    monkeypatch.chdir(tmp_path)
    storage = f"s3://{BUCKET}/runs?endpoint_override={endpoint}&scheme=http"
    rc = main([write_study(tmp_path, STUDY), "--address", c.address, "--storage", storage,
               "--tracking-uri", mlflow_server])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert not (tmp_path / "ray_results").exists()  # nothing went to a local folder

    keys = bucket_keys(client, "runs/multinode-smoke/")
    assert any(k.endswith("experiment_state.json") or "experiment_state" in k for k in keys), keys[:20]
    runs = {k.split("/train_runs/")[1].split("/")[0] for k in keys if "/train_runs/" in k} - {""}  # "": the folder
    assert len(runs) == 2  # both trials' Train runs
    assert any("/train_runs/" in k and k.endswith("/trial_state.pt") for k in keys)  # checkpoints in the bucket
    assert any(k.endswith("result.json") for k in keys)

    check_study_runs(mlflow_server, "multinode", n_trials=2)
    # the back-fill a tracking outage would print reads the same bucket: both trials found there, already complete
    from harness.study import backfill
    assert backfill.main(["multinode", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "from s3://harness-test/runs/multinode-smoke?endpoint_override=" in out and ": 2 trials" in out, out
    assert "0 trials back-filled, 2 already complete, 0 failed" in out, out
    nodes = train_worker_nodes(c.address)
    assert set(nodes) == {w.node_id for w in workers}  # the ranks ran on both worker nodes, none on the head
    for node in nodes.values():
        assert len(node) == 2  # two trials, one rank of each per node: DDP spanned the two nodes


def test_multinode_lost_node_mid_trial_resumes_from_the_s3_checkpoint(cluster, s3, mlflow_server, tmp_path):
    c, workers, temp_dir = cluster
    client, endpoint = s3
    study = {**STUDY, "name": "multinode_loss", "base": {**STUDY["base"], "steps": 400, "eval_every": 20},
             "paired": {"schedule": [{"schedule": "one_cycle", "max_lr": 0.8}]}}
    storage = f"s3://{BUCKET}/loss?endpoint_override={endpoint}&scheme=http"
    env = {**os.environ, "PYTHONPATH": str(REPO), **CREDENTIALS}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.study", write_study(tmp_path, study), "--address", c.address,
         "--storage", storage, "--tracking-uri", mlflow_server, "--max-failures", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        mlflow = MlflowClient(mlflow_server)
        deadline, checkpointed = time.time() + 240, None
        while time.time() < deadline and checkpointed is None and proc.poll() is None:
            time.sleep(1)
            exp = mlflow.get_experiment_by_name("multinode_loss")
            runs = mlflow.search_runs([exp.experiment_id], "tags.`harness.role` = 'trial'") if exp else []
            if runs and any(k.endswith("trial_state.pt") for k in bucket_keys(client, "loss/")):
                history = mlflow.get_metric_history(runs[0].info.run_id, "test_acc")
                checkpointed = max((h.step for h in history), default=None)
        assert checkpointed is not None and proc.poll() is None, "no checkpoint before the trial ended"
        c.remove_node(workers[0], allow_graceful=False)  # a GPU node lost mid-trial
        workers[0] = c.add_node(num_cpus=1, temp_dir=temp_dir)  # the autoscaler's replacement
        out = proc.communicate(timeout=360)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("multinode_loss").experiment_id],
                                "tags.`harness.role` = 'trial'")
    assert run.data.tags["harness.status"] == "completed"
    resumed = int(run.data.tags["harness.resumed_from_step"])
    # from a checkpoint in the bucket (the newest, or the one before if the node went while uploading one)
    assert max(20, checkpointed - 20) <= resumed < 400
    steps = [h.step for h in mlflow.get_metric_history(run.info.run_id, "test_acc")]
    assert steps == list(range(20, 401, 20))  # no step lost or repeated across the restart
