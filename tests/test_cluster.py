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
