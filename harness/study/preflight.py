"""`python -m harness.study NAME --scale paper --preflight [--steps K]`: every distinct config of a scale, for real
and short, before a cluster is rented for the grid.

One trial of each cost key (`throughput.distinct`: model, dataset, batch, BN batch, optimizer, precision, memory
format, compilation, workers) runs K optimizer steps of its real config (`harness.trial.short_run.run_steps`: the
trial's data loading, `prepare`, model, optimizer, schedule and `train_step`), outside the Tune grid, after
`harness.trial.checks.problems` found nothing in any trial of the scale that would fail later (each trial is
checked: schedules differ within a config; one line per trial that would). One line per config: seconds per step after
the first, images/s of the trial, peak memory. The figures go to `harness.study.throughput`'s store, so the
next `--dry-run` of any study with those configs estimates its cost from them.

Where it runs. Without a Ray address: on this machine, each config in a fresh process (so that the CPU's peak
RSS is that config's, and each starts cold as a trial does), on CPU with the threads of one worker
(`cpus_per_worker`, at most the cores here). With --address / RAY_ADDRESS: each config is a Ray task with one
worker's resources (`num_gpus`/`num_cpus` per worker; `max_calls=1`, a fresh worker process), so it lands on
the node type the trial's workers would get, the autoscaler launching it if need be; the configs run one after
the other, never side by side, so no measurement shares a node with another.

A trial of W > 1 workers is measured as one of its ranks: one process with the per-worker batch in the trial's
BN micro-batches, and the trial's rate taken as W times that process's. The gradient all-reduce between ranks is
not in it, and the output says so; `torchrun --nproc-per-node W -m harness.trial NAME --scale S --cell C
--steps K` times the real DDP step on one machine.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from concurrent.futures import ProcessPoolExecutor

from harness import spec as specs
from harness.config import TrialConfig
from harness.study import cluster, throughput, tracking
from harness.trial import checks


def run(resolved: dict, trials: list[specs.Trial], steps: int, address: str | None) -> int:
    """Measure each distinct config of `trials`; 0 when all ran, 1 when one failed, 2 for bad input."""
    configs = throughput.distinct(trials)
    res, workers = resolved["resources"], trials[0].workers
    if too_long := [t for t in configs if steps > t.config.steps]:
        print(f"error: --steps {steps} is more than trial {too_long[0].name}'s {too_long[0].config.steps} steps; "
              f"use --steps 1 to {min(t.config.steps for t in configs)}", file=sys.stderr)
        return 2
    print(f"preflight of {resolved['name']} ({resolved['scale']}): {len(configs)} distinct configs of {len(trials)} "
          f"trials, {steps} optimizer steps each, {_where(res, address)}", flush=True)
    if workers > 1:
        print(f"each trial has {workers} DDP workers: measured as one process with the per-worker batch, the "
              f"trial's images/s = {workers} x that process's; the gradient all-reduce is not measured (torchrun "
              f"--nproc-per-node {workers} -m harness.trial ... --steps {steps} times it on one machine)", flush=True)
    print(f"{'config':52s} {'s/step':>8s} {'images/s':>9s} {'peak memory':>24s}  cell", flush=True)
    commit, dirty = tracking.git_state()
    commit = commit[:10] + (" (dirty)" if dirty else "")
    broken = {t.name: found for t in trials if (found := checks.problems(t.config, t.workers))}
    for name, found in broken.items():  # every trial: schedules differ within a config
        print(f"trial {name} would fail later: {'; '.join(found)}", flush=True)
    failed = 0
    for t in configs:
        outcome = "its trial would fail later (above)" if t.name in broken else _measure(t, steps, res, address)
        if isinstance(outcome, str):
            failed += 1
            print(f"{label(t.config, workers):52s} FAILED: {outcome}", flush=True)
            continue
        rate = outcome["images_per_s"] * workers  # one rank's images/s, times the ranks stepping together
        throughput.record(t, rate, outcome["device"], outcome["device_kind"], commit, steps=steps,
                          s_per_step=outcome["s_per_step"], peak_bytes=outcome["peak_bytes"],
                          peak_what=outcome["peak_what"], host=outcome["host"], ray_node=outcome["ray_node"],
                          method="one process, per-worker batch" if workers > 1 else "one process")
        first = " (1st step)" if steps == 1 else ""
        peak = f"{outcome['peak_bytes'] / 2 ** 30:.2f} GiB {outcome['peak_what']}"
        node = f" (Ray node {outcome['ray_node'][:8]})" if outcome["ray_node"] else ""
        print(f"{label(t.config, workers):52s} {outcome['s_per_step']:8.3g} {rate:9,.0f} {peak:>24s}  {t.cell}"
              f"{first} on {outcome['device']} @ {outcome['host']}{node}", flush=True)
    what = "s/step: mean of steps 2-K (K=1: the first step, warm-up included); peak memory: CUDA max allocated or " \
           "the process's peak RSS"
    print(f"{what}\nstored in {throughput.store_path()}: `python -m harness.study {resolved['name']} --scale "
          f"{resolved['scale']} --dry-run` estimates the cost from these" if len(configs) > failed else what)
    if failed or broken:
        print(f"error: {len(broken)} of {len(trials)} trials would fail later, {failed} of {len(configs)} configs "
              f"did not run (above)", file=sys.stderr)
    return 1 if failed or broken else 0


def label(cfg: TrialConfig, workers: int) -> str:
    """A config in the fields that set its cost: 'resnet56 cifar10 batch 1000 bn 125 sgd fp32'."""
    extra = [*(["NCHW"] if not cfg.channels_last else []), *(["compiled"] if cfg.compile else []),
             *([f"x{workers} workers"] if workers > 1 else [])]
    bn = f" bn {cfg.bn_batch}" if cfg.bn_batch else ""
    return " ".join([cfg.model, cfg.dataset, f"batch {cfg.batch_size}{bn}", cfg.optimizer, cfg.precision, *extra])


def _where(res: dict, address: str | None) -> str:
    if address:
        return (f"one at a time as Ray tasks on {address} with one worker's resources "
                f"({cluster.describe(cluster.per_worker(res))})")
    return f"here, each in a fresh process ({_threads(res)} CPU threads when on the CPU)"


def _threads(res: dict) -> int:
    return max(1, min(int(res["cpus_per_worker"]), os.cpu_count() or 1))


def _measure(t: specs.Trial, steps: int, res: dict, address: str | None) -> dict | str:
    """The measurement of `t` (measure()'s dict), or the one-line reason it failed."""
    args = (t.config.to_json(), t.workers, steps)
    try:
        if address:
            import ray
            cluster.init_ray(address)
            task = ray.remote(max_calls=1)(measure).options(num_cpus=res["cpus_per_worker"],
                                                            num_gpus=res["gpus_per_worker"])
            return ray.get(task.remote(*args))
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
            return pool.submit(measure, *args, _threads(res)).result()
    except Exception as e:  # the config's own failure (data, memory, a model error), told in one line
        return " ".join(f"{type(e).__name__}: {e}".split())[:400]


def measure(config_json: str, workers: int, steps: int, threads: int | None = None) -> dict:
    """In the measuring process: `steps` steps of one rank of the trial, as a plain dict (it crosses processes)."""
    import torch

    from harness.trial.short_run import per_worker, run_steps
    if threads:
        torch.set_num_threads(threads)
    m = run_steps(per_worker(TrialConfig.from_json(config_json), workers), steps)
    return {**m.to_dict(), "host": socket.gethostname(), "ray_node": _ray_node()}


def _ray_node() -> str | None:
    """The Ray node this process runs on as a Ray worker; None in a plain process."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
