"""The study ends only the Ray connection it made itself (its own module: no Ray fixture is alive here)."""

from __future__ import annotations


def test_a_ray_that_someone_else_started_after_ours_is_not_ours_to_shut_down():
    """Job IDs restart at 01000000 in every Ray: after a study started (and ended) its own Ray, a Ray started by
    the caller (here a test fixture) must not be taken for the study's own and shut down at the study's end."""
    import ray

    from harness.study import cluster
    assert not ray.is_initialized()
    assert cluster.init_ray(None) is True          # the study starts its own local Ray: its to end
    first = cluster.connection_id()
    ray.shutdown()                                     # ended without main's bookkeeping, as after a crash
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert cluster.connection_id()[0] == first[0]   # the same job ID in the new Ray
        assert cluster.init_ray(None) is False          # but not the study's connection
    finally:
        ray.shutdown()
        cluster.OUR_RAY_JOB.clear()
