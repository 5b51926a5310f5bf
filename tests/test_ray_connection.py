"""The study ends only the Ray connection it made itself (its own module: no Ray fixture is alive here)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_a_ray_that_someone_else_started_after_ours_is_not_ours_to_shut_down():
    """Job IDs restart at 01000000 in every Ray: after a study started (and ended) its own Ray, a Ray started by
    the caller (here a test fixture) must not be taken for the study's own and shut down at the study's end."""
    import ray

    from harness.study import cluster, ray_internals
    assert not ray.is_initialized()
    assert cluster.init_ray(None) is True          # the study starts its own local Ray: its to end
    first = cluster.connection_id()
    ray.shutdown()                                     # ended without main's bookkeeping, as after a crash
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert cluster.connection_id()[0] == first[0]   # the same job ID in the new Ray
        assert cluster.init_ray(None) is False          # but not the study's connection
        # the one private Ray call (harness/study/ray_internals.py) still exists and answers as expected: a local
        # Ray publishes no node groups (RayInternalsChanged here means Ray moved it: update that module)
        assert ray_internals.gcs_node_groups() is None
    finally:
        ray.shutdown()
        cluster.OUR_RAY_JOB.clear()


def test_node_groups_are_read_from_the_gcs_config_shape(monkeypatch):
    """The shape ray_internals expects of Ray's cluster config (what KubeRay publishes), and its loud failure."""
    import types

    import pytest
    from ray._private import state as ray_state

    from harness.study import ray_internals
    group = types.SimpleNamespace(name="gpu_8x", resources={"GPU": 8, "CPU": 96}, max_count=2)
    monkeypatch.setattr(ray_state.state, "get_cluster_config",
                        lambda: types.SimpleNamespace(node_group_configs=[group]))
    assert ray_internals.gcs_node_groups() == [("gpu_8x", {"GPU": 8, "CPU": 96}, 2)]
    monkeypatch.setattr(ray_state.state, "get_cluster_config", lambda: types.SimpleNamespace(node_group_configs=[1]))
    with pytest.raises(ray_internals.RayInternalsChanged, match="another shape"):
        ray_internals.gcs_node_groups()
