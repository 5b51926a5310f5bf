"""`python -m harness.study NAME`: run a study's grid of trials with Ray Tune, each trial a DDP TorchTrainer.

    studies/NAME.yaml --(harness.spec)--> trials --(Ray Tune, one TorchTrainer per trial)--> MLflow runs

Exit codes: 0 when every trial completed or diverged (a divergence is a result), 1 when a trial errored
(listed at the end with its error), 2 for bad input (nothing started, nothing logged).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from harness import lr_from_finder, tracking
from harness import spec as specs
from harness.config import ConfigError

DRIVER_RESOURCE = "trial_driver"  # a custom resource for the Tune trial's own actor: it must not hold a CPU
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # the Train controller polls reports every 2 s by default
    "RAY_AIR_NEW_OUTPUT": "0",                   # Tune's classic live table with our columns
    "RAY_TRAIN_V2_ENABLED": "1",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m harness.study",
        description="Run a study (studies/NAME.yaml): a grid of DDP training trials scheduled by Ray Tune, "
                    "each trial logged as an MLflow run.")
    p.add_argument("name", nargs="?", help="study name (a file in studies/) or a path to a study YAML")
    p.add_argument("--list", action="store_true", help="list the studies and their questions")
    p.add_argument("--scale", choices=specs.SCALES,
                   help="smoke (CPU, offline, ~minutes), quick (CPU, tens of minutes), paper (the authors' "
                        "setup on GPUs); default: paper when the cluster has GPUs, else smoke")
    p.add_argument("--address", help="join an existing Ray cluster ('auto' or host:port; also RAY_ADDRESS)")
    p.add_argument("--storage", default="ray_results", help="folder for Tune/Train state and checkpoints")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                                          "sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--resume", action="store_true", help="continue the last interrupted run of this study/scale")
    p.add_argument("--dry-run", action="store_true", help="print the trials and the cost estimate; run nothing")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once (default: what fits)")
    p.add_argument("--workers-per-trial", type=int, help="DDP workers per trial (default: the study's)")
    p.add_argument("--max-failures", type=int, default=1, help="worker failures a trial recovers from (default 1)")
    p.add_argument("--inject-crash", type=int, metavar="STEP", help=argparse.SUPPRESS)  # tests: lose a worker once
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, question in specs.list_studies():
            print(f"{name:24s} {question}")
        return 0
    if not args.name:
        return _fail("no study named; pass a NAME (python -m harness.study --list shows them)")
    if args.workers_per_trial is not None and args.workers_per_trial < 1:
        return _fail(f"--workers-per-trial must be >= 1, got {args.workers_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        return _fail(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    try:
        spec = specs.load_spec(args.name)
    except specs.SpecError as e:
        return _fail(str(e))

    address = args.address or os.environ.get("RAY_ADDRESS")
    scale = args.scale
    if scale is None:
        gpus = _cluster_gpus(address)
        scale = "paper" if gpus else "smoke"
        why = f"{gpus:g} GPUs found" if gpus else "no GPU found"
        print(f"scale: {scale} ({why}); pick another with --scale smoke|quick|paper", flush=True)
    else:
        print(f"scale: {scale}", flush=True)
    try:
        resolved = specs.resolve(spec, scale)
        if args.workers_per_trial:
            resolved["resources"]["workers"] = args.workers_per_trial
        trials = specs.trials(spec, scale, where=args.name, workers=resolved["resources"]["workers"])
    except (specs.SpecError, ConfigError) as e:
        return _fail(str(e))

    if args.dry_run:
        dry_run(resolved, trials)
        print_plan(resolved, trials)
        return 0

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    try:
        tracking.check_store(uri)
        trials = lr_from_finder.resolve(trials, uri, resolved["scale"])  # max LRs taken from finder runs
    except tracking.TrackingError as e:
        return _fail(str(e))

    import ray
    started_ray = _init_ray(address)
    try:
        return run_study(args, resolved, trials, uri, ray.cluster_resources())
    finally:
        if started_ray:
            ray.shutdown()


def run_study(args, resolved: dict, trials: list[specs.Trial], uri: str, cluster: dict) -> int:
    from ray import tune

    res = resolved["resources"]
    need_cpu = res["workers"] * res["cpus_per_worker"]
    need_gpu = res["workers"] * res["gpus_per_worker"]
    fits = [cluster.get("CPU", 0) // need_cpu]
    if need_gpu:
        fits.append(cluster.get("GPU", 0) // need_gpu)
    if cluster.get(DRIVER_RESOURCE, 0) < 1:
        return _fail(f"the Ray cluster has no '{DRIVER_RESOURCE}' resource for the trial drivers; start Ray "
                     f"with --resources '{{\"{DRIVER_RESOURCE}\": 100}}' (cluster.yaml does)")
    concurrent = int(min(fits))
    if concurrent < 1:
        return _fail(f"one trial needs {need_cpu:g} CPUs and {need_gpu:g} GPUs ({res['workers']} workers); the "
                     f"cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs: lower "
                     f"--workers-per-trial or resources in the study file")
    concurrent = min(concurrent, int(cluster[DRIVER_RESOURCE]), args.max_concurrent or concurrent, len(trials))

    storage = Path(args.storage).resolve()
    exp_path = _experiment_path(storage, f"{resolved['name']}-{resolved['scale']}", args.resume)
    if args.resume and not exp_path.exists():
        return _fail(f"nothing to resume: no earlier run of {resolved['name']} at scale {resolved['scale']} "
                     f"in {storage}; run it without --resume")
    command = "python -m harness.study " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    hardware = _hardware(cluster)
    study_spec = {k: v for k, v in resolved.items()}
    resources = {k: v for k, v in cluster.items() if k in ("CPU", "GPU", "memory", DRIVER_RESOURCE)}
    parent = tracking.start_study_run(uri, study_spec, resolved["scale"], str(exp_path), command,
                                      resources, hardware, resume=args.resume)
    exp_id = tracking.experiment_id(uri, resolved["name"])
    print(f"study {resolved['name']} ({resolved['scale']}): {len(trials)} trials, {res['workers']} workers each, "
          f"{concurrent} at a time; MLflow {uri} run {parent}; Ray state {exp_path}", flush=True)

    base = {
        "tracking": {"uri": uri, "experiment_id": exp_id, "parent_run_id": parent},
        "resources": res,
        "train_storage": str(exp_path / "train_runs"),
        "max_failures": args.max_failures,
    }
    if args.inject_crash:
        base["inject_crash_at_step"] = args.inject_crash
        base["inject_crash_marker"] = str(exp_path / "injected_crash.marker")
    param_space = {**base, "trial": tune.grid_search(
        [{**t.as_dict(), "study": resolved["name"], "scale": resolved["scale"]} for t in trials])}
    from harness.worker import trial_driver
    trainable = tune.with_resources(trial_driver, {DRIVER_RESOURCE: 1})

    reporter = tune.CLIReporter(
        parameter_columns={"trial/config/batch_size": "batch", "trial/config/max_lr": "max LR",
                           "trial/config/schedule": "schedule", "trial/config/seed": "seed"},
        metric_columns={"step": "step", "test_acc": "test acc", "trial_status": "result"},
        max_report_frequency=10, sort_by_metric=False)
    t0 = time.time()
    status = "FAILED"
    try:
        if args.resume:
            tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, param_space=param_space,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True,
                                            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(name=exp_path.name, storage_path=str(storage),
                                          progress_reporter=reporter, verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=0)))
        results = tuner.fit()
        errors = summarize(results, resolved, time.time() - t0)
        status = "FAILED" if errors else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"interrupted; continue with: {command} --resume", file=sys.stderr)
        return 130
    finally:
        tracking.end_study_run(uri, parent, status)
    print(f"MLflow: {uri} (experiment '{resolved['name']}', parent run {parent}); browse with "
          f"`mlflow ui --backend-store-uri {uri}`")
    print(f"report: python -m harness.report {resolved['name']} --tracking-uri {uri} --run {parent}")
    return 1 if errors else 0


def summarize(results, resolved: dict, wall_s: float) -> list[tuple[str, str]]:
    """Print one row per cell and the errored trials; return the errors."""
    cells: dict[str, list[dict]] = {}
    errors = []
    for r in results:
        trial = r.config["trial"]
        if r.error is not None:
            errors.append((trial["name"], str(r.error).strip().splitlines()[-1][:300]))
            continue
        cells.setdefault(trial["cell"], []).append(r.metrics or {})
    print(f"\nstudy {resolved['name']} ({resolved['scale']}) finished in {wall_s:.0f} s")
    print(f"{'cell':60s} {'n':>3s} {'final acc':>10s} {'steps to target':>16s} {'diverged':>9s}")
    for cell, rows in cells.items():
        acc = statistics.median(float(m.get("final_acc", float("nan"))) for m in rows)
        steps = [m.get("steps_to_target", -1) for m in rows]
        steps = [s if s is not None and s >= 0 else math.inf for s in steps]
        diverged = sum(m.get("trial_status") == "diverged" for m in rows)
        print(f"{cell[:60]:60s} {len(rows):3d} {acc:10.4f} {statistics.median(steps):16g} {diverged:9d}")
    for name, err in errors:
        print(f"ERROR {name}: {err}", file=sys.stderr)
    return errors


def dry_run(resolved: dict, trials: list[specs.Trial]) -> None:
    res = resolved["resources"]
    print(f"{'trial':40s} {'batch':>6s} {'bn':>5s} {'max_lr':>7s} {'schedule':>14s} {'steps':>7s} {'seed':>5s}")
    images = steps = 0
    for t in trials:
        c = t.config
        print(f"{t.name[:40]:40s} {c['batch_size']:6d} {c['bn_batch'] or c['batch_size'] // res['workers']:5d} "
              f"{c['max_lr']:7g} {c['schedule']:>14s} {c['steps']:7d} {c['seed']:5d}")
        steps += c["steps"]
        images += c["steps"] * c["batch_size"]
    ips = resolved.get("images_per_s")
    source = "configured in the study file"
    if not ips:
        ips, source = measure_images_per_s(trials[0].config), "measured on this machine: 4 steps of the first trial"
    devices = res["workers"] * (res["gpus_per_worker"] or res["cpus_per_worker"])
    kind = "GPU" if res["gpus_per_worker"] else "CPU"
    hours = images / ips / 3600
    print(f"\n{len(trials)} trials, {steps:,} optimizer steps, {images:,} training images")
    print(f"at {ips:,.0f} images/s per trial ({source}): {hours:.2f} trial-hours = "
          f"{hours * devices:.2f} {kind}-hours ({res['workers']} workers x "
          f"{res['gpus_per_worker'] or res['cpus_per_worker']:g} {kind} each); evaluation not included")


def print_plan(resolved: dict, trials: list[specs.Trial]) -> None:
    """The pre-registered analysis: one line per comparison the report will make, from the same code."""
    from harness import plan
    analysis = resolved.get("analysis")
    if not analysis:
        print("\nanalysis plan: none declared (add `analysis:` to the study file); the report will give no verdicts")
        return
    comparisons = plan.expand(analysis, [t.config for t in trials], where=resolved["name"])
    print(f"\nanalysis plan ({len(comparisons)} comparisons; the report evaluates exactly these):")
    for c in comparisons:
        print(f"  {c.line()}")


def measure_images_per_s(config: dict) -> float:
    from harness.trial import run_trial
    probe = {**config, "steps": 4, "eval_every": 4, "stepsize": None, "milestones": [],
             "schedule": "constant" if config["schedule"] == "multistep" else config["schedule"]}
    times: list[float] = []
    run_trial(probe, reporter=lambda m, s: times.append(m["images_per_s"]))
    return times[-1]


# ----------------------------------------------------------------------------------------------------
def _init_ray(address: str | None) -> bool:
    import ray
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, runtime_env={"env_vars": RAY_ENV}, log_to_driver=True)
    else:
        ray.init(resources={DRIVER_RESOURCE: 64}, runtime_env={"env_vars": RAY_ENV}, include_dashboard=True)
    return True


def _cluster_gpus(address: str | None) -> float:
    if address:
        import ray
        _init_ray(address)
        return ray.cluster_resources().get("GPU", 0)
    import torch
    return torch.cuda.device_count()


def _experiment_path(storage: Path, name: str, resume: bool) -> Path:
    """storage/NAME for the first run; NAME-2, NAME-3... for later ones; --resume picks the latest."""
    candidates = [storage / name] + sorted(storage.glob(f"{name}-[0-9]*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    existing = [p for p in candidates if p.exists()]
    if resume:
        return existing[-1] if existing else storage / name
    if not existing:
        return storage / name
    last = existing[-1]
    n = int(last.name.rsplit("-", 1)[1]) + 1 if last != storage / name else 2
    return storage / f"{name}-{n}"


def _trial_name(trial) -> str:
    return trial.config["trial"]["name"]


def _hardware(cluster: dict) -> str:
    import torch
    if cluster.get("GPU"):
        model = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"
        return f"{cluster['GPU']:g}x {model}"
    return f"{cluster.get('CPU', 0):g}x CPU ({os.cpu_count()} cores on the driver host)"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
