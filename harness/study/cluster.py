"""Where a study's trials run: the Ray connection, admission against what the cluster can launch, and the
storage that every node sees.

    connection   init_ray joins --address / RAY_ADDRESS or starts a local Ray with the trial_driver resource;
                 the study ends only a connection it made (OUR_RAY_JOB); a local Ray's trials are told its
                 dashboard (RAY_API_SERVER_ADDRESS), so Ray's state API finds it beside other Rays on the machine
    admission    admit(): how many trials run at once from the node types the autoscaler can launch (a fresh
                 `ray up` cluster has only its head up) and what is up now; a trial no node type holds is refused
    storage      --storage is a folder or a pyarrow URI (s3://bucket/path?endpoint_override=...); unwritable_storage
                 checks, before Ray or MLflow is touched, that the driver can write it; preflight_storage, once
                 Ray is up, that every node sees it; experiment_path numbers a study's runs
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from harness.study import ray_internals

DRIVER_RESOURCE = "trial_driver"  # a custom resource for the Tune trial's own actor: it must not hold a CPU
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API (and `ray job`) looks first for the dashboard
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # the Train controller polls reports every 2 s by default
    "RAY_AIR_NEW_OUTPUT": "0",                   # Tune's classic live table with our columns
    "RAY_TRAIN_V2_ENABLED": "1",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # MLflow's "View run ... at" line per run end (HTTP stores)
}


class ClusterError(RuntimeError):
    """The cluster cannot be used as asked: one line for the user (what was wrong, how to fix it)."""


# ---------------------------------------------------------------------------------------------------- connection
# (job ID, node ID) of the connection this module made, so main ends it and only it. Job IDs restart at 01000000 in
# every new Ray, so the ID alone would take a later Ray started by someone else (a test fixture) for ours.
OUR_RAY_JOB: list = []


def connection_id() -> tuple[str, str]:
    import ray
    context = ray.get_runtime_context()
    return context.get_job_id(), context.get_node_id()


def init_ray(address: str | None) -> bool:
    """Connect (or start a local Ray); True when the connection is ours to shut down, even if an earlier call
    (cluster_gpus, picking the default scale) made it."""
    import ray
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return OUR_RAY_JOB == [connection_id()]
    env = {**RAY_ENV, **storage_credentials()}
    if address:
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ClusterError(f"cannot join the Ray cluster at {address}: {' '.join(str(e).split())[:300]}; "
                               f"start one (ray start --head, ray up cluster.yaml) or drop --address and "
                               f"RAY_ADDRESS to run on a local Ray") from None
    else:
        ray.init(resources={DRIVER_RESOURCE: 64}, runtime_env={"env_vars": env}, **own_dashboard(env))
    OUR_RAY_JOB[:] = [connection_id()]
    return True


def own_dashboard(env_vars: dict[str, str]) -> dict:
    """ray.init keyword arguments for a local Ray whose processes find it beside other Rays on this machine; adds
    RAY_API_SERVER_ADDRESS to `env_vars` (the runtime_env's, passed to the same ray.init).

    Ray Train's PlacementGroupCleaner (a detached actor per trial) asks Ray's state API whether the trial's
    controller is alive, without an address: beside a second Ray (another study, the test suite) the API cannot
    tell which one is ours ("Found multiple active Ray instances"), the actor dies with its traceback on the
    console, and the clean-up it exists for is gone. The state API takes its server from RAY_API_SERVER_ADDRESS
    first (ray.dashboard.utils.get_address_for_submission_client), so the trials' processes are given our
    dashboard's address, on a port picked here: a Ray's addresses are known only after ray.init, its runtime_env
    before."""
    port = free_port()
    env_vars[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_our_ray() -> None:
    """Shut down the Ray connection init_ray made, if it is still the current one; leave any other alone."""
    ray = sys.modules.get("ray")  # not imported: nothing to end (and no import cost for --list, --dry-run)
    if ray is not None and ray.is_initialized() and OUR_RAY_JOB == [connection_id()]:
        ray.shutdown()
    OUR_RAY_JOB.clear()


def unreachable_address(address: str) -> str | None:
    """Pre-flight for --address / RAY_ADDRESS host:port: one line when nothing listens there (ray.init would
    retry for a minute and end in a traceback). 'auto' and 'local' are left to ray.init (see init_ray)."""
    import socket
    import urllib.parse

    if address in ("auto", "local"):
        return None
    split = urllib.parse.urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = split.hostname, split.port
    except ValueError:
        host = port = None
    if not host or not port:
        return f"--address {address!r} is not host:port; allowed: auto, host:port, ray://host:port (also RAY_ADDRESS)"
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        return (f"no Ray cluster answers at {address} ({type(e).__name__}: {e.strerror or e}); start one (ray start "
                f"--head, ray up cluster.yaml) or drop --address and RAY_ADDRESS to run on a local Ray")
    return None


def cluster_gpus(address: str | None) -> float:
    """GPUs up now, or else those the autoscaler can launch (a fresh `ray up` cluster has none up)."""
    if address:
        import ray
        init_ray(address)
        gpus = ray.cluster_resources().get("GPU", 0)
        types = launchable_node_types(address)
        launchable = capacity(types).get("GPU", 0) if types else 0
        if not gpus and launchable:
            print(f"no GPU up yet; the autoscaler can launch {launchable:g} ({describe_types(types)})", flush=True)
            return launchable
        return gpus
    import torch
    return torch.cuda.device_count()


def hardware(cluster: dict) -> str:
    import torch
    if cluster.get("GPU"):
        model = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"
        return f"{cluster['GPU']:g}x {model}"
    return f"{cluster.get('CPU', 0):g}x CPU ({os.cpu_count()} cores on the driver host)"


# ---------------------------------------------------------------------------------------------------- admission
# What the cluster can launch, not only what is up: a fresh `ray up` cluster is a head and node *types*; Tune's
# pending placement groups make the autoscaler launch the GPU nodes, so a study that fits a node type waits for
# them instead of being refused. The arithmetic is a pure function of (node types, resources now, trial needs).
@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]  # one node's resources, e.g. {"CPU": 96, "GPU": 8}
    max_count: int               # how many the autoscaler may run at once; -1 = no limit


@dataclass(frozen=True)
class Admission:
    concurrent: int = 0                                     # trials at once, once their nodes are up
    waiting: dict[str, float] = field(default_factory=dict)  # beyond what is up now, for `concurrent` trials
    error: str | None = None                                 # the study can never fit: the one-line refusal


def admit(node_types: list[NodeType] | None, now: dict, per_worker: dict[str, float], workers: int,
          limit: int) -> Admission:
    """How many trials of `workers` x `per_worker` run at once (at most `limit`) on a cluster with `now`
    resources up and `node_types` launchable (None: a fixed cluster, only `now` counts)."""
    fits_now = _slots(now, per_worker) // workers
    fits_later = 0
    if node_types:
        slots = [(t.max_count, _slots(t.resources, per_worker)) for t in node_types]
        fits_later = math.inf if any(n < 0 and k for n, k in slots) else sum(n * k for n, k in slots) // workers
    concurrent = min(max(fits_now, fits_later), limit)
    if concurrent < 1:
        need = describe({k: v * workers for k, v in per_worker.items()})
        where = (f"no node type can hold one worker ({describe_types(node_types)})"
                 if node_types and not any(k for _, k in slots) else
                 f"the cluster can launch at most {describe(capacity(node_types))} ({describe_types(node_types)})"
                 if node_types else f"the cluster has {describe({k: now.get(k, 0) for k in per_worker})}")
        return Admission(error=f"one trial needs {need} ({workers} workers); {where}: lower --workers-per-trial "
                               f"or resources in the study file, or add a larger node type")
    waiting = {k: v * workers * concurrent - now.get(k, 0) for k, v in per_worker.items()}
    return Admission(int(concurrent), {k: v for k, v in waiting.items() if v > 0})


def _slots(resources: dict, per_worker: dict[str, float]) -> int:
    """How many workers of shape `per_worker` `resources` hold."""
    return int(min(resources.get(k, 0) // v for k, v in per_worker.items() if v > 0))


def per_worker(res: dict) -> dict[str, float]:
    return {"GPU": res["gpus_per_worker"], "CPU": res["cpus_per_worker"]} if res["gpus_per_worker"] else \
        {"CPU": res["cpus_per_worker"]}


def capacity(node_types: list[NodeType]) -> dict[str, float]:
    total: dict[str, float] = {}
    for t in node_types:
        for k, v in t.resources.items():
            total[k] = math.inf if t.max_count < 0 else total.get(k, 0) + v * t.max_count
    return total


def describe(resources: dict[str, float]) -> str:
    order = sorted(resources, key=lambda k: (k != "GPU", k != "CPU", k))
    return ", ".join(f"{resources[k]:g} {k}{'s' if k in ('CPU', 'GPU') else ''}" for k in order)


def describe_types(node_types: list[NodeType] | None) -> str:
    if not node_types:
        return "no node types"
    return "; ".join(f"{t.name}: up to {'any number' if t.max_count < 0 else t.max_count} x "
                     f"{describe({k: v for k, v in t.resources.items() if k in ('CPU', 'GPU')}) or 'nothing'}"
                     for t in node_types)


def node_types_from_autoscaler_config(config: dict) -> list[NodeType]:
    """Node types of an autoscaler (`ray up`) config: its available_node_types, the head counted once."""
    cap = config.get("max_workers", 0)
    return [NodeType(name, {k: float(v) for k, v in (t.get("resources") or {}).items()},
                     1 if name == config.get("head_node_type") else min(t.get("max_workers", cap), cap))
            for name, t in config.get("available_node_types", {}).items()]


def launchable_node_types(address: str | None) -> list[NodeType] | None:
    """The connected cluster's node types: Ray's own cluster config in the GCS (set by KubeRay and autoscaler v2),
    else, on the head of a `ray up` cluster, the autoscaling config `ray up` wrote there; None for a fixed cluster."""
    groups = ray_internals.gcs_node_groups()
    if groups is not None:
        return [NodeType(name, resources, max_count) for name, resources, max_count in groups]
    bootstrap = Path.home() / "ray_bootstrap_config.yaml"  # `ray up` --autoscaling-config, on the head only
    if address and bootstrap.is_file():
        import yaml
        return node_types_from_autoscaler_config(yaml.safe_load(bootstrap.read_text()))
    return None


# ---------------------------------------------------------------------------------------------------- storage
# --storage is a local/shared folder or a pyarrow URI (s3://bucket/path?endpoint_override=host:port&scheme=http,
# gs://bucket/path). Ray Train needs every node to see it; a preflight checks that before anything starts.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                  "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "ceph", "gpfs", "glusterfs", "beegfs", "cifs", "smb3")


def is_uri(storage: str) -> bool:
    return "://" in storage


def resolve_storage(storage: str) -> str:
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def storage_join(storage: str, *parts: str) -> str:
    """storage/part/...; for a URI the query (endpoint options) stays at the end."""
    if not is_uri(storage):
        return str(Path(storage, *parts))
    base, _, query = storage.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + (f"?{query}" if query else "")


def storage_name(storage: str) -> str:
    return storage.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def storage_fs(storage: str):
    import pyarrow.fs
    if is_uri(storage):
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), storage


def storage_list(storage: str) -> list[str]:
    import pyarrow.fs
    fs, path = storage_fs(storage)
    return [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))]


def storage_exists(storage: str) -> bool:
    import pyarrow.fs
    fs, path = storage_fs(storage)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def storage_mtime(storage: str) -> float:
    fs, path = storage_fs(storage)
    mtime = fs.get_file_info(path).mtime
    return mtime.timestamp() if mtime else 0.0


def storage_read(storage: str) -> str:
    fs, path = storage_fs(storage)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def storage_touch(storage: str) -> None:
    fs, path = storage_fs(storage)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(b"")


def storage_credentials() -> dict[str, str]:
    """Cloud credentials set in the driver's environment, for the trials' processes on every node (a cluster's
    nodes normally have their own, from an IAM instance profile; then none are set and none are passed)."""
    return {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}


def network_mount(path: str) -> bool:
    """Whether `path` lies on a network filesystem per this machine's mount table (the deepest mount wins)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best is not None and (best[1] in NETWORK_FILESYSTEMS or best[1].startswith("fuse."))


def unwritable_storage(storage: str) -> str | None:
    """Pre-flight before Ray or MLflow is touched: None when the driver can write `storage` (a missing folder can
    be created), else the one-line refusal. Leaves nothing behind: the probe it writes is removed again."""
    allowed = ("allowed: a folder this user can write (missing folders are created), s3://BUCKET/PATH or "
               "gs://BUCKET/PATH")
    if is_uri(storage):
        marker = storage_join(storage, f".harness-preflight-{uuid.uuid4().hex}")
        try:
            storage_touch(marker)
        except Exception as e:
            return f"--storage {storage} cannot be written ({type(e).__name__}: {' '.join(str(e).split())[:200]}); " \
                   f"{allowed}"
        try:
            fs, path = storage_fs(marker)
            fs.delete_file(path)
        except Exception:
            pass
        return None
    existing = Path(storage)
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent  # the folders that would be created hang off the deepest existing one
    if not existing.is_dir():
        return f"--storage {storage}: {existing} is a file, not a folder; {allowed}"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".harness-preflight-", dir=existing))
    except OSError as e:
        where = "" if existing == Path(storage) else f" (nothing can be created in {existing})"
        return f"--storage {storage} cannot be written{where}: {type(e).__name__}: {e.strerror or e}; {allowed}"
    return None


def preflight_storage(storage: str, node_types: list[NodeType] | None) -> str | None:
    """None when every node sees `storage`, else the one-line refusal (with the fix).

    The driver writes a marker file; a zero-CPU task pinned to each alive node looks for it. Nodes the autoscaler
    has not launched yet cannot be asked: a local path then passes only on a network filesystem."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    fix = ("pass --storage s3://BUCKET/PATH (or gs://BUCKET/PATH) or a folder on a filesystem mounted on every "
           "node (NFS/EFS; see cluster.yaml)")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    can_grow = bool(node_types) and sum(math.inf if t.max_count < 0 else t.max_count for t in node_types) > len(nodes)
    if not is_uri(storage) and len(nodes) < 2:
        if can_grow and not network_mount(storage):
            return f"--storage {storage} is a folder on the head only, and trials run on nodes the autoscaler " \
                   f"launches: {fix}"
        return None
    marker = storage_join(storage, f".harness-preflight-{uuid.uuid4().hex}")
    try:
        storage_touch(marker)
    except Exception as e:
        return f"--storage {storage} cannot be written from the driver ({type(e).__name__}: " \
               f"{' '.join(str(e).split())[:200]}): {fix}"
    try:
        sees = ray.remote(num_cpus=0, max_retries=0)(storage_exists)
        refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker)
            for n in nodes}
        blind = []
        for node, ref in refs.items():
            try:
                if not ray.get(ref, timeout=180):
                    blind.append(node)
            except Exception as e:
                blind.append(f"{node} ({type(e).__name__})")
    finally:
        try:
            fs, path = storage_fs(marker)
            fs.delete_file(path)
        except Exception:
            pass
    if blind:
        return f"--storage {storage} is not shared: {len(blind)} of {len(nodes)} nodes do not see it " \
               f"({', '.join(blind)}); Ray Train needs storage every node sees: {fix}"
    return None


def experiment_path(storage: str, name: str, resume: bool) -> str:
    """storage/NAME for the first run; NAME-2, NAME-3... for later ones; --resume picks the latest.
    `storage` is a local folder or a pyarrow URI (s3://bucket/path?endpoint_override=...); so is the result."""
    existing = sorted((n for n in storage_list(storage) if n == name or run_number(n, name)),
                      key=lambda n: run_number(n, name))
    if resume:
        return storage_join(storage, existing[-1] if existing else name)
    if not existing:
        return storage_join(storage, name)
    return storage_join(storage, f"{name}-{run_number(existing[-1], name) + 1 if existing[-1] != name else 2}")


def run_number(entry: str, name: str) -> int:
    """N for an entry NAME-N, 0 for NAME itself or anything else."""
    suffix = entry[len(name) + 1:] if entry.startswith(name + "-") else ""
    return int(suffix) if suffix.isdigit() else 0
