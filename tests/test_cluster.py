"""cluster.yaml passes Ray's own cluster-config validation offline, and gives the head the driver resource."""

import sys
from pathlib import Path

import pytest
import yaml
from servers import free_port

from harness.study.cluster import DRIVER_RESOURCE

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"
RAY_CLI = str(Path(sys.executable).parent / "ray")


def test_cluster_yaml_is_valid_for_the_ray_autoscaler():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(config)  # raises on misspelled or missing keys
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"][DRIVER_RESOURCE] >= 1
    mlflow = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(mlflow) == 1 and "--port 5000" in mlflow[0] and "--serve-artifacts" in mlflow[0]
    assert "--artifacts-destination ${HARNESS_STORAGE%/*}/mlartifacts" in mlflow[0]
    assert any('"ray[default,tune,train]==2.60.0"' in c for c in config["setup_commands"])
    assert "HARNESS_STORAGE=s3://" in " ".join(config["setup_commands"])


def test_a_misspelled_key_is_caught():
    from ray.autoscaler._private.util import prepare_config, validate_config
    bad = yaml.safe_load(CLUSTER.read_text())
    bad["head_node_typ"] = bad.pop("head_node_type")
    with pytest.raises(Exception):  # noqa: B017 - Ray raises jsonschema's or its own error
        validate_config(prepare_config(bad))


# ------------------------------------------------------------------------------------------ admission
def test_cluster_yaml_node_types_are_what_the_autoscaler_can_launch():
    from ray.autoscaler._private.util import prepare_config

    from harness.study.cluster import node_types_from_autoscaler_config
    types = {t.name: t for t in node_types_from_autoscaler_config(prepare_config(yaml.safe_load(CLUSTER.read_text())))}
    assert types["head"].max_count == 1 and types["head"].resources.get("GPU", 0) == 0
    assert types["gpu_8x"].resources["GPU"] == 8 and types["gpu_8x"].max_count == 2


def test_a_gpu_study_on_a_fresh_ray_up_cluster_waits_for_the_autoscaler():
    from harness.study.cluster import NodeType, admit
    types = [NodeType("head", {"CPU": 8, DRIVER_RESOURCE: 100}, 1), NodeType("gpu_8x", {"CPU": 96, "GPU": 8}, 2)]
    now = {"CPU": 8, DRIVER_RESOURCE: 100}  # only the head is up
    plan = admit(types, now, {"GPU": 1, "CPU": 8}, workers=1, limit=72)
    assert plan.error is None and plan.concurrent == 16  # 2 nodes x 8 GPUs, one GPU per trial
    assert plan.waiting == {"GPU": 16, "CPU": 120}
    plan = admit(types, now, {"GPU": 1, "CPU": 8}, workers=1, limit=3)  # --max-concurrent 3
    assert (plan.concurrent, plan.waiting["GPU"]) == (3, 3)
    # a 4-worker trial of 2 GPUs each fits two nodes, only one at a time
    assert admit(types, now, {"GPU": 2, "CPU": 8}, workers=4, limit=10).concurrent == 2
    # with the GPU nodes up, nothing is waited for
    up = {"CPU": 200, "GPU": 16, DRIVER_RESOURCE: 100}
    assert admit(types, up, {"GPU": 1, "CPU": 8}, workers=1, limit=72).waiting == {}


def test_a_study_that_can_never_fit_is_refused_in_one_line():
    from harness.study.cluster import NodeType, admit
    types = [NodeType("head", {"CPU": 8}, 1), NodeType("gpu_8x", {"CPU": 96, "GPU": 8}, 2)]
    plan = admit(types, {"CPU": 8}, {"GPU": 16, "CPU": 1}, workers=1, limit=4)  # 16 GPUs per worker
    assert plan.concurrent == 0 and "no node type can hold one worker" in plan.error
    assert "gpu_8x: up to 2 x 8 GPUs, 96 CPUs" in plan.error and "\n" not in plan.error
    plan = admit(types, {"CPU": 8}, {"GPU": 8, "CPU": 1}, workers=3, limit=4)  # 24 GPUs, 16 launchable
    assert "needs 24 GPUs, 3 CPUs (3 workers)" in plan.error and "can launch at most 16 GPUs" in plan.error
    # a fixed cluster (no node types): only what is up counts, as before
    plan = admit(None, {"CPU": 2}, {"CPU": 2}, workers=2, limit=4)
    assert "needs 4 CPUs" in plan.error and "cluster has 2 CPUs" in plan.error
    assert admit(None, {"CPU": 4}, {"CPU": 1}, workers=2, limit=4).concurrent == 2
    # unlimited node types (max_count -1): as many as the other limits allow
    assert admit([NodeType("gpu", {"GPU": 1, "CPU": 4}, -1)], {}, {"GPU": 1, "CPU": 4}, 1, limit=9).concurrent == 9


# ------------------------------------------------------------------------------------------ storage
def test_storage_uris_keep_their_query_and_runs_are_numbered(tmp_path):
    from harness.study.cluster import experiment_path, storage_join, storage_name
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage_join(uri, "tiny-smoke", "train_runs") == \
        "s3://bucket/runs/tiny-smoke/train_runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage_name(storage_join(uri, "tiny-smoke")) == "tiny-smoke"
    assert experiment_path(str(tmp_path), "tiny-smoke", resume=False) == str(tmp_path / "tiny-smoke")
    for name in ("tiny-smoke", "tiny-smoke-2", "tiny-smoke-10", "tiny-smoke-x", "tiny-smoker"):
        (tmp_path / name).mkdir()
    assert experiment_path(str(tmp_path), "tiny-smoke", resume=False) == str(tmp_path / "tiny-smoke-11")
    assert experiment_path(str(tmp_path), "tiny-smoke", resume=True) == str(tmp_path / "tiny-smoke-10")


def test_a_head_local_folder_is_refused_when_trials_will_run_on_launched_nodes(tmp_path, monkeypatch):
    import ray

    from harness.study import cluster
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1"}])
    types = [cluster.NodeType("head", {"CPU": 8}, 1), cluster.NodeType("gpu_8x", {"CPU": 96, "GPU": 8}, 2)]
    problem = cluster.preflight_storage(str(tmp_path), types)
    assert "folder on the head only" in problem and "--storage s3://BUCKET/PATH" in problem and "\n" not in problem
    assert cluster.preflight_storage(str(tmp_path), None) is None  # one fixed node: a local folder is shared
    monkeypatch.setattr(cluster, "network_mount", lambda path: True)  # an NFS/EFS mount on every node
    assert cluster.preflight_storage(str(tmp_path), types) is None


# ------------------------------------------------------------------------------------------ --address
# A head of our own: `ray start --head --block` in its own process group, on free ports, with its own temp dir
# (so its address goes to TEMP/ray_current_cluster, where a plain `ray.init()` elsewhere does not look), stopped
# by signalling that process group (never `ray stop`: it ends every Ray process on the machine).
class RayHead:
    def __init__(self, resources: dict | None = None, num_cpus: int = 2):
        import json
        import subprocess
        import tempfile
        import time

        self.temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: unix sockets max out at ~107 chars
        port = free_port()
        self.dashboard = f"http://127.0.0.1:{free_port()}"  # the job API (`ray job submit --address`)
        cmd = [RAY_CLI, "start", "--head", "--block", f"--port={port}",
               f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               "--include-dashboard=true", f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--ray-client-server-port={free_port()}", f"--object-manager-port={free_port()}"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        self.log = open(Path(self.temp_dir) / "start.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        address_file = Path(self.temp_dir) / "ray_current_cluster"
        deadline = time.time() + 120
        while not address_file.exists() and self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert address_file.exists(), (Path(self.temp_dir) / "start.log").read_text()[-3000:]
        self.address = address_file.read_text().strip()
        assert self.address.endswith(f":{port}")

    @staticmethod
    def env() -> dict[str, str]:
        """The environment of the head and of the `ray` commands that talk to it."""
        import os
        env = {**os.environ, "PYTHONPATH": str(CLUSTER.parent)}
        env.pop("RAY_ADDRESS", None)
        # `ray start --head` turns token authentication on when ~/.ray/auth_token exists, but a driver connecting
        # to an explicit address only uses it with RAY_AUTH_MODE=token: give the head this process's mode
        env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE") or "disabled"
        return env

    def processes(self) -> list[int]:
        """PIDs of the processes of this head (their command lines name its temp dir or its `ray start`)."""
        import subprocess
        out = subprocess.run(["pgrep", "-f", self.temp_dir], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        import os
        import shutil
        import signal
        import subprocess
        import time

        os.killpg(self.proc.pid, signal.SIGTERM)  # ray start --block and its children: the GCS, raylet, ...
        try:  # they drain for about 30 s before exiting; nothing of this throw-away head is worth the wait
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        deadline = time.time() + 30
        while self.processes() and time.time() < deadline:
            time.sleep(1)
        left = self.processes()
        for pid in left:  # ours by their command line; should not happen
            os.kill(pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not left, f"processes of the head outlived it: {left}"


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead(resources={DRIVER_RESOURCE: 8})
    yield head
    head.stop()


def tiny_study(folder: Path, scales: dict | None = None, **resources) -> str:
    from test_study import TINY, write_study
    study = {**TINY, "resources": {**TINY["resources"], **resources}}
    return write_study(folder, {**study, "scales": scales} if scales else study)


@pytest.mark.slow
def test_address_a_cluster_without_the_driver_resource_is_refused(tmp_path, monkeypatch, capsys):
    from harness.study.cli import main
    monkeypatch.chdir(tmp_path)
    head = RayHead()
    try:
        rc = main([tiny_study(tmp_path), "--address", head.address])
    finally:
        import ray
        ray.shutdown()
        head.stop()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"no '{DRIVER_RESOURCE}' resource" in err and "--resources" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1  # Ray logs its connect there
    assert not (tmp_path / "ray_results").exists()


def test_address_runs_a_study_on_a_separately_started_head(ray_head, tmp_path, monkeypatch, capsys):
    import ray

    from harness.study.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", ray_head.address)  # the environment variable form of --address
    rc = main([tiny_study(tmp_path)])
    out = capsys.readouterr().out
    assert not ray.is_initialized()  # the study disconnected; the head is still up
    assert rc == 0, out[-3000:]
    assert "scale: smoke (no GPU found)" in out
    from mlflow_checks import check_study_runs
    _, children = check_study_runs(f"sqlite:///{tmp_path}/mlflow.db", "tiny", n_trials=2)
    assert all(c.data.metrics["world_size"] == 2 for c in children)
    assert ray_head.proc.poll() is None


def test_ray_job_submit_runs_a_study_as_the_readme_says(ray_head, tmp_path):
    """The README's way onto a cluster: `ray job submit --working-dir . -- python -m harness.study ...` against
    the head's job API. The job uploads the repository (what .gitignore leaves), its driver joins the cluster
    through the RAY_ADDRESS that Ray sets for it, and the study's own runtime_env (environment variables) is merged
    with the job's (the working dir), so the trials import the uploaded harness."""
    import subprocess

    from mlflow_checks import check_study_runs
    uri = f"sqlite:///{tmp_path}/mlflow.db"  # not the default ./mlflow.db: a job's cwd is its unpacked working dir
    # Ray uploads the working dir without .git: the checkout's commit travels in the job's runtime env
    job_env = subprocess.run([sys.executable, "-m", "harness.study", "--job-env"], cwd=CLUSTER.parent, check=True,
                             capture_output=True, text=True).stdout.strip()
    cmd = [RAY_CLI, "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(CLUSTER.parent),
           "--runtime-env-json", job_env, "--",
           sys.executable, "-m", "harness.study", tiny_study(tmp_path, workers=1), "--tracking-uri", uri,
           "--storage", str(tmp_path / "ray_results")]
    done = subprocess.run(cmd, env=ray_head.env(), cwd=tmp_path, capture_output=True, text=True, timeout=480)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "scale: smoke (no GPU found)" in out and "succeeded" in out, out[-4000:]
    assert "study tiny (smoke): 2 trials, 1 workers each" in out, out[-4000:]  # one-worker trials: the cheaper path
    assert "no git checkout here" not in out
    _, children = check_study_runs(uri, "tiny", n_trials=2)  # incl. the parent's git commit == this checkout's HEAD
    assert all(c.data.metrics["world_size"] == 1 for c in children)
    assert ray_head.proc.poll() is None


@pytest.mark.parametrize("source", ["gcs", "ray_up"])
def test_address_a_gpu_study_is_queued_for_the_autoscalers_gpu_node_type(ray_head, tmp_path, source):
    """The cluster can launch GPU nodes, none is up: the GPU study defaults to scale paper, waits for the GPUs, and
    its trials stay PENDING instead of being refused. The node types come from Ray's own cluster config in the GCS
    (what KubeRay and autoscaler v2 publish; here a 1-GPU type), or from the ~/ray_bootstrap_config.yaml that
    `ray up` writes on the head (here built from this repository's cluster.yaml: up to 2 x 8 GPUs)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray._raylet
    from ray.autoscaler._private.util import prepare_config
    from ray.core.generated import autoscaler_pb2

    home = tmp_path / "home"  # the driver's home in case ray_up: where a `ray up` head has its bootstrap config
    home.mkdir()
    gcs = ray._raylet.GcsClient(address=ray_head.address)
    if source == "gcs":
        config = autoscaler_pb2.ClusterConfig(node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 2, DRIVER_RESOURCE: 8}, min_count=1,
                                           max_count=1),
            autoscaler_pb2.NodeGroupConfig(name="gpu_1x", resources={"CPU": 4, "GPU": 1}, min_count=0,
                                           max_count=2)])
        gcs.internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), config.SerializeToString(),
                            True, ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())
    else:
        (home / "ray_bootstrap_config.yaml").write_text(
            yaml.safe_dump(prepare_config(yaml.safe_load(CLUSTER.read_text()))))
    # the trials will run on nodes not up yet: a folder on the head is refused, so the storage is an S3 endpoint
    import boto3
    from moto.server import ThreadedMotoServer
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    try:
        host, port = s3.get_host_and_port()
        credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=f"http://{host}:{port}", **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"},
        ).create_bucket(Bucket="queued")
        study = tiny_study(tmp_path, scales={"paper": {"references": [{"where": {}, "run": "clr3SS5kFig1a"}]}},
                           gpus_per_worker=1, workers=1)
        env = {**ray_head.env(), **credentials, "RAY_ADDRESS": ray_head.address, "PYTHONUNBUFFERED": "1"}
        if source == "ray_up":
            env["HOME"] = str(home)
            token = Path.home() / ".ray" / "auth_token"  # a head with token authentication: the driver's token
            if token.exists():
                env["RAY_AUTH_TOKEN_PATH"] = str(token)
        storage = f"s3://queued/runs?endpoint_override={host}:{port}&scheme=http"
        proc = subprocess.Popen([sys.executable, "-m", "harness.study", study, "--storage", storage], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines, deadline = [], time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "PENDING" in line:  # Tune's table: the trials are queued on the autoscaler
                break
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
        out = "".join(lines) + rest
    finally:
        if "proc" in locals() and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        s3.stop()
        gcs.internal_kv_del(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), False,
                            ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())
    launchable, types = (("2", "gpu_1x: up to 2 x 1 GPUs, 4 CPUs") if source == "gcs" else
                         ("16", "gpu_8x: up to 2 x 8 GPUs, 96 CPUs"))  # cluster.yaml's GPU node type
    assert f"no GPU up yet; the autoscaler can launch {launchable} (" in out and types in out, out[-3000:]
    assert "scale: paper" in out and "waiting for 2 GPUs from the autoscaler" in out, out[-3000:]
    assert "PENDING" in out and "error:" not in out


# ------------------------------------------------------------------------------------------ README's cost table
def cost_table() -> list[str]:
    """The README's paper-scale cost rows, from the code --dry-run uses, at the study files' images_per_s."""
    from harness import spec as specs
    from harness.study.cli import _hours, cost
    config = yaml.safe_load(CLUSTER.read_text())
    gpus_per_node = config["available_node_types"]["gpu_8x"]["resources"]["GPU"]
    rows = []
    for name, _ in specs.list_studies():
        spec = specs.load_spec(name)
        resolved = specs.at_scale(spec, "paper")
        c = cost(resolved, specs.trials(spec, "paper", where=name, workers=resolved["resources"]["workers"]),
                 measure=False)
        nodes = f"{c.node_hours(gpus_per_node):.2f}" if c.kind == "GPU" else "- (CPU only)"
        rows.append(f"| `{name}` | {c.trials} | {c.images:,} | {c.images_per_s:,.0f} | "
                    f"{_hours(c.device_hours, c.kind)} | {nodes} |")
    return rows


def test_readme_cost_table_is_what_dry_run_computes_for_every_study():
    readme = (CLUSTER.parent / "README.md").read_text()
    section = readme[readme.index("## Running on a cluster"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    expected = cost_table()
    assert rows == expected, "README's cost table is stale; replace its rows with:\n" + "\n".join(expected)
