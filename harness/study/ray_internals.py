"""The one private Ray API the harness uses, kept here alone: the cluster config in Ray's GCS.

Admission (harness.study.cluster) must know the node types an autoscaler can launch, not only the nodes that are
up, or a study on a fresh cluster would be refused before its GPU nodes exist. KubeRay and autoscaler v2 publish
those node types as the cluster config in the GCS; Ray 2.60 offers no public call that reads it (its
`ray.autoscaler.v2.sdk` reports node status, not node groups). So this module reads
`ray._private.state.state.get_cluster_config()` and fails loudly, naming the Ray version, if that call is gone or
answers in another shape: `tests/test_ray_connection.py` checks it against the installed Ray on every run.
"""

from __future__ import annotations


class RayInternalsChanged(RuntimeError):
    """The installed Ray no longer has the private call this module relies on. One line: what to update."""


def gcs_node_groups() -> list[tuple[str, dict[str, float], int]] | None:
    """(name, resources, max count) of each node group in the connected cluster's GCS config, or None when the
    cluster publishes none (a local Ray, a fixed cluster, a `ray up` cluster with autoscaler v1)."""
    import ray
    try:
        from ray._private.state import state
        config = state.get_cluster_config()
    except (ImportError, AttributeError) as e:
        raise RayInternalsChanged(f"Ray {ray.__version__} has no ray._private.state.state.get_cluster_config "
                                  f"({e}); update harness/study/ray_internals.py") from None
    if config is None or not config.node_group_configs:
        return None
    try:
        return [(g.name, dict(g.resources), int(g.max_count)) for g in config.node_group_configs]
    except AttributeError as e:
        raise RayInternalsChanged(f"Ray {ray.__version__}'s cluster config has another shape ({e}); update "
                                  "harness/study/ray_internals.py") from None
