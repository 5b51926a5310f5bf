"""cluster.yaml passes Ray's own cluster-config validation offline, and gives the head the driver resource."""

from pathlib import Path

import yaml

from harness.study import DRIVER_RESOURCE

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_is_valid_for_the_ray_autoscaler():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(config)  # raises on misspelled or missing keys
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"][DRIVER_RESOURCE] >= 1
    assert any("mlflow server" in c and "--port 5000" in c for c in config["head_start_ray_commands"])


def test_a_misspelled_key_is_caught():
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config
    bad = yaml.safe_load(CLUSTER.read_text())
    bad["head_node_typ"] = bad.pop("head_node_type")
    with pytest.raises(Exception):  # noqa: B017 - Ray raises jsonschema's or its own error
        validate_config(prepare_config(bad))


# ------------------------------------------------------------------------------------------ admission
def test_cluster_yaml_node_types_are_what_the_autoscaler_can_launch():
    from ray.autoscaler._private.util import prepare_config

    from harness.study import node_types_from_autoscaler_config
    types = {t.name: t for t in node_types_from_autoscaler_config(prepare_config(yaml.safe_load(CLUSTER.read_text())))}
    assert types["head"].max_count == 1 and types["head"].resources.get("GPU", 0) == 0
    assert types["gpu_8x"].resources["GPU"] == 8 and types["gpu_8x"].max_count == 2


def test_a_gpu_study_on_a_fresh_ray_up_cluster_waits_for_the_autoscaler():
    from harness.study import NodeType, admit
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
    from harness.study import NodeType, admit
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
    from harness.study import _experiment_path, _storage_join, _storage_name
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert _storage_join(uri, "tiny-smoke", "train_runs") == \
        "s3://bucket/runs/tiny-smoke/train_runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert _storage_name(_storage_join(uri, "tiny-smoke")) == "tiny-smoke"
    assert _experiment_path(str(tmp_path), "tiny-smoke", resume=False) == str(tmp_path / "tiny-smoke")
    for name in ("tiny-smoke", "tiny-smoke-2", "tiny-smoke-10", "tiny-smoke-x", "tiny-smoker"):
        (tmp_path / name).mkdir()
    assert _experiment_path(str(tmp_path), "tiny-smoke", resume=False) == str(tmp_path / "tiny-smoke-11")
    assert _experiment_path(str(tmp_path), "tiny-smoke", resume=True) == str(tmp_path / "tiny-smoke-10")


def test_a_head_local_folder_is_refused_when_trials_will_run_on_launched_nodes(tmp_path, monkeypatch):
    import ray

    from harness import study
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1"}])
    types = [study.NodeType("head", {"CPU": 8}, 1), study.NodeType("gpu_8x", {"CPU": 96, "GPU": 8}, 2)]
    problem = study.preflight_storage(str(tmp_path), types)
    assert "folder on the head only" in problem and "--storage s3://BUCKET/PATH" in problem and "\n" not in problem
    assert study.preflight_storage(str(tmp_path), None) is None  # one fixed node: a local folder is shared
    monkeypatch.setattr(study, "_network_mount", lambda path: True)  # an NFS/EFS mount on every node
    assert study.preflight_storage(str(tmp_path), types) is None
