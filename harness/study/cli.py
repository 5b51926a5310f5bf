"""`python -m harness.study NAME`: run a study's grid of trials with Ray Tune, each trial a DDP TorchTrainer.

    studies/NAME.yaml --(harness.spec)--> trials --(Ray Tune, one TorchTrainer per trial)--> MLflow runs

Exit codes: 0 when every trial completed or diverged (a divergence is a result), 1 when a trial errored
(listed at the end with its error), 2 for bad input (nothing started, nothing logged), 3 when every trial
ended but MLflow stayed unreachable past HARNESS_TRACKING_GRACE_S (the results are in Ray's storage; the
printed `python -m harness.study.backfill` command fills MLflow in), 130 when interrupted (Ctrl-C: the trials stop
at their last checkpoint, the study run and unfinished trial runs are marked KILLED, `--resume` continues).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import deviations
from harness import spec as specs
from harness.config import ConfigError, TrialConfig
from harness.study import cluster, lr_from_finder, throughput, tracking
from harness.study.console import quiet_console

EXIT_UNTRACKED = 3  # every trial ended, but MLflow misses some of it: run harness.study.backfill


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _OneLineErrors(
        prog="python -m harness.study",
        description="Run a study (studies/NAME.yaml): a grid of DDP training trials scheduled by Ray Tune, "
                    "each trial logged as an MLflow run.")
    p.add_argument("name", nargs="?", help="study name (a file in studies/) or a path to a study YAML")
    p.add_argument("--list", action="store_true", help="list the studies and their questions")
    p.add_argument("--job-env", action="store_true",
                   help="print the runtime env (JSON) that carries this checkout's git commit and dirty files into "
                        "a Ray job: ray job submit --working-dir . --runtime-env-json \"$(python -m harness.study "
                        "--job-env)\" -- python -m harness.study NAME (Ray uploads the working dir without .git)")
    p.add_argument("--scale", choices=specs.SCALES,
                   help="smoke (CPU, offline, ~minutes), quick (CPU, tens of minutes), paper (the authors' "
                        "setup on GPUs); default: paper when the cluster has GPUs, else smoke")
    p.add_argument("--address", help="join an existing Ray cluster ('auto' or host:port; also RAY_ADDRESS)")
    p.add_argument("--storage", default=os.environ.get("HARNESS_STORAGE") or "ray_results",
                   help="Tune/Train state and checkpoints: a folder every node sees, or s3://BUCKET/PATH, "
                        "gs://BUCKET/PATH (pyarrow options as a query, e.g. ?endpoint_override=HOST:PORT&scheme=http); "
                        "default $HARNESS_STORAGE, else ./ray_results")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                                          "sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--resume", action="store_true", help="continue the last interrupted run of this study/scale")
    p.add_argument("--dry-run", action="store_true", help="print the trials and the cost estimate; run nothing")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once (default: what fits)")
    p.add_argument("--workers-per-trial", type=int, help="DDP workers per trial (default: the study's)")
    p.add_argument("--max-failures", type=int, default=1, help="worker failures a trial recovers from (default 1)")
    p.add_argument("--preflight", action="store_true",
                   help="run each distinct trial config of the scale for --steps optimizer steps (no Tune, no MLflow) "
                        "and print s/step, images/s and peak memory; the --dry-run cost estimate then uses them")
    p.add_argument("--steps", type=int, help="with --preflight: optimizer steps per config (default 3)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except cluster.ClusterError as e:
        return _fail(str(e))
    finally:
        cluster.end_our_ray()  # the connection this study made (to pick the scale or to run), never anyone else's


def _main(args: argparse.Namespace) -> int:
    if args.list:
        for name, question in specs.list_studies():
            print(f"{name:24s} {question}")
        return 0
    if args.job_env:
        try:
            print(json.dumps(tracking.job_env()))
        except tracking.TrackingError as e:
            return _fail(str(e))
        return 0
    if not args.name:
        return _fail("no study named; pass a NAME (python -m harness.study --list shows them)")
    if args.workers_per_trial is not None and args.workers_per_trial < 1:
        return _fail(f"--workers-per-trial must be >= 1, got {args.workers_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        return _fail(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if args.preflight and args.dry_run:
        return _fail("--preflight runs configs and --dry-run runs nothing: give one of them")
    if args.steps is not None and (not args.preflight or args.steps < 1):
        return _fail(f"--steps goes with --preflight and must be >= 1, got --steps {args.steps}"
                     f"{'' if args.preflight else ' without --preflight'}")
    try:
        spec = specs.load_spec(args.name)
    except specs.SpecError as e:
        return _fail(str(e))

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address and (problem := cluster.unreachable_address(address)):
        return _fail(problem)
    scale = _pick_scale(args.scale, address)
    try:
        resolved = specs.at_scale(spec, scale)
        if args.workers_per_trial:
            resolved["resources"]["workers"] = args.workers_per_trial
        trials = specs.trials(spec, scale, where=args.name, workers=resolved["resources"]["workers"])
    except (specs.SpecError, ConfigError) as e:
        return _fail(str(e))

    if args.dry_run:
        dry_run(resolved, trials)
        print_deviations(spec, resolved)
        print_plan(resolved, trials)
        return 0
    if not address and (problem := _missing_data(trials)):  # on a cluster the workers' disks count, not ours
        return _fail(problem)
    if args.preflight:
        from harness.study import preflight
        return preflight.run(resolved, trials, args.steps or 3, address)
    try:
        place = _place(args, resolved)  # the storage before the tracking store or Ray: nothing written yet
        uri, trials = _tracking_store(args, resolved, trials)
    except BadInput as e:
        return _fail(str(e))

    if tracking.git_state()[0] == "unknown":
        print("warning: no git checkout here and no HARNESS_GIT_COMMIT, so the runs record commit 'unknown'; a Ray "
              "job's working dir has no .git: submit with --runtime-env-json \"$(python -m harness.study --job-env)\"",
              file=sys.stderr, flush=True)
    import ray
    cluster.init_ray(address)
    return run_study(args, resolved, trials, uri, place, ray.cluster_resources(), study_file=spec)


def _pick_scale(scale: str | None, address: str | None) -> str:
    """--scale, else paper when the cluster has (or can launch) GPUs, else smoke; said in the first line."""
    if scale is not None:
        print(f"scale: {scale}", flush=True)
        return scale
    gpus = cluster.cluster_gpus(address)
    scale = "paper" if gpus else "smoke"
    why = f"{gpus:g} GPUs found" if gpus else "no GPU found"
    print(f"scale: {scale} ({why}); pick another with --scale smoke|quick|paper", flush=True)
    return scale


class BadInput(ValueError):
    """One line for the user: what was wrong and what is allowed (exit code 2, nothing started)."""


@dataclass(frozen=True)
class Place:
    """Where a study's Ray state goes: --storage, resolved, and this run's experiment folder in it."""
    storage: str
    exp_path: str


def _place(args, resolved: dict) -> Place:
    """The storage the driver can write and this run's experiment folder in it (with --resume, the last run's,
    which must exist); BadInput otherwise. Reads only: nothing is created before the study starts."""
    storage = cluster.resolve_storage(args.storage)
    if problem := cluster.unwritable_storage(storage):
        raise BadInput(problem)
    exp_path = cluster.experiment_path(storage, f"{resolved['name']}-{resolved['scale']}", args.resume)
    if args.resume and not cluster.storage_exists(exp_path):
        raise BadInput(f"nothing to resume: no earlier run of {resolved['name']} at scale {resolved['scale']} in "
                       f"{storage}; run it without --resume")
    return Place(storage, exp_path)


def _tracking_store(args, resolved: dict, trials: list[specs.Trial]) -> tuple[str, list[specs.Trial]]:
    """(the tracking URI, the trials with max LRs taken from finder runs) once the store answers; BadInput
    otherwise. From here on library warnings are held for the study's log file."""
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    quiet_console()  # from the first store access on (SQLAlchemy's warnings), held until the log file exists
    try:
        tracking.tracking_grace_s()
        tracking.check_writable(uri)
        return uri, lr_from_finder.with_finder_lrs(trials, uri, resolved["scale"])
    except tracking.TrackingError as e:
        raise BadInput(str(e)) from None


@dataclass(frozen=True)
class StudyRun:
    """The study's MLflow side, once its parent run exists."""
    uri: str
    exp_id: str
    parent: str
    command: str  # how it was started, for the --resume line


def run_study(args, resolved: dict, trials: list[specs.Trial], uri: str, place: Place, up: dict,
              study_file: dict | None = None) -> int:
    """On a connected Ray: admission, the storage every node sees, the study's MLflow run, the Tuner, the outcome."""
    node_types = cluster.launchable_node_types(args.address or os.environ.get("RAY_ADDRESS"))
    plan = _admit(args, resolved["resources"], len(trials), up, node_types)
    if plan.error:
        return _fail(plan.error)
    if (problem := cluster.preflight_storage(place.storage, node_types)) is not None:
        return _fail(problem)
    log_file = _log_file(place.exp_path)
    quiet_console(log_file)
    print(f"Ray Train's per-report lines, Ray's and libraries' warnings: {log_file}", flush=True)
    run = _start_tracking(args, resolved, trials, uri, place, up, study_file)
    print(f"study {resolved['name']} ({resolved['scale']}): {len(trials)} trials, {resolved['resources']['workers']} "
          f"workers each, {plan.concurrent} at a time; MLflow {uri} run {run.parent}; Ray state {place.exp_path}",
          flush=True)
    t0, status = time.time(), "FAILED"
    try:
        results = _tuner(args, resolved, trials, place, run, log_file, plan.concurrent).fit()
        outcome = print_outcome(results, resolved, time.time() - t0)
        if resolved["resources"]["workers"] == 1:  # a trial whose actor died could not record its own error
            by_name = {t.name: t for t in trials}
            for name, err in outcome.errors:
                if name in by_name:
                    tracking.mark_trial_error(uri, run.exp_id, run.parent, by_name[name], err)
        if outcome.unfinished:  # Tune's first Ctrl-C handler stopped the trials at a checkpoint and returned
            raise KeyboardInterrupt
        status = "FAILED" if outcome.errors else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        return _interrupted(args, run)
    finally:
        tracking.end_study_run(uri, run.parent, status)  # never raises: a warning line if the store is down
    return _finished(resolved, place, run, outcome)


def _admit(args, res: dict, n_trials: int, up: dict, node_types) -> cluster.Admission:
    """How many trials run at once; Admission.error when the cluster can never hold one."""
    if up.get(cluster.DRIVER_RESOURCE, 0) < 1:
        return cluster.Admission(error=f"the Ray cluster has no '{cluster.DRIVER_RESOURCE}' resource for the trial "
                                       f"drivers; start Ray with --resources '{{\"{cluster.DRIVER_RESOURCE}\": 100}}' "
                                       f"(cluster.yaml does)")
    limit = min(int(up[cluster.DRIVER_RESOURCE]), args.max_concurrent or n_trials, n_trials)
    plan = cluster.admit(node_types, up, cluster.per_worker(res), res["workers"], limit)
    if plan.waiting and not plan.error:
        print(f"waiting for {cluster.describe(plan.waiting)} from the autoscaler "
              f"({cluster.describe_types(node_types)}); trials stay pending until their nodes are up", flush=True)
    return plan


def _start_tracking(args, resolved: dict, trials: list[specs.Trial], uri: str, place: Place, up: dict,
                    study_file: dict | None) -> StudyRun:
    """The study's parent run (a new one, or with --resume the one that owns the experiment folder) and the
    experiment's runs-table view."""
    command = "python -m harness.study " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    # the resolved scale the trials ran, and the whole study file (every scale: the report's paper-vs-this-run column)
    study_spec = {**resolved, "study_file": study_file}
    resources = {k: v for k, v in up.items() if k in ("CPU", "GPU", "memory", cluster.DRIVER_RESOURCE)}
    parent = tracking.start_study_run(uri, study_spec, resolved["scale"], str(place.exp_path), command,
                                      resources, cluster.hardware(up), resume=args.resume)
    exp_id = tracking.experiment_id(uri, resolved["name"])
    tracking.set_runs_view(uri, exp_id, [*trials[0].naming, *(["seed"] if "seed" not in trials[0].naming else [])])
    return StudyRun(uri, exp_id, parent, command)


def _tuner(args, resolved: dict, trials: list[specs.Trial], place: Place, run: StudyRun, log_file: str,
           concurrent: int):
    """The Tuner of the study's grid (one trial_driver per trial), or with --resume the restored one."""
    from ray import tune

    from harness.study.driver import trial_driver
    base = {
        "tracking": {"uri": run.uri, "experiment_id": run.exp_id, "parent_run_id": run.parent,
                     "grace_s": tracking.tracking_grace_s()},
        "resources": resolved["resources"],
        "train_storage": cluster.storage_join(place.exp_path, "train_runs"),
        "max_failures": args.max_failures,
        "harness_log": log_file,
    }
    param_space = {**base, "trial": tune.grid_search([t.to_tune() for t in trials])}
    res = resolved["resources"]
    # One worker: the trial trains in its Tune actor (harness.study.driver), which then holds the worker's CPUs and
    # GPU, and Tune restarts it from its last checkpoint. Several: the actor holds only the driver resource, the
    # TorchTrainer's workers hold the rest, and Ray Train restarts lost workers.
    solo = res["workers"] == 1
    trainable = tune.with_resources(trial_driver, {cluster.DRIVER_RESOURCE: 1,
                                                   **(cluster.per_worker(res) if solo else {})})
    if args.resume:
        return tune.Tuner.restore(place.exp_path, trainable=trainable, param_space=param_space, resume_errored=True)
    reporter = tune.CLIReporter(
        parameter_columns={"trial/title": "trial"},
        metric_columns={"step": "step", "test_acc": "test acc", "trial_status": "result"},
        max_report_frequency=10, sort_by_metric=False)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=cluster.storage_name(place.exp_path), storage_path=place.storage,
                                  progress_reporter=reporter, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=args.max_failures if solo else 0),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))


def _interrupted(args, run: StudyRun) -> int:
    """Ctrl-C: the unfinished trial runs become KILLED; one line says how to continue. Exit code 130."""
    try:
        killed = tracking.mark_unfinished_trials_killed(run.uri, run.exp_id, run.parent)
    except Exception as e:  # the store may be what failed; the interrupt is what the user must see
        killed = f"? (MLflow: {type(e).__name__})"
    resume = run.command if args.resume else f"{run.command} --resume"
    print(f"interrupted: the study run and {killed} unfinished trial runs are marked KILLED; every trial "
          f"keeps its last checkpoint. Continue with: {resume}", file=sys.stderr, flush=True)
    return 130


def _finished(resolved: dict, place: Place, run: StudyRun, outcome: Outcome) -> int:
    """Where to browse and report the study, what MLflow misses; the exit code."""
    uri = run.uri
    browse = "" if uri.startswith("http") else f"`mlflow ui --backend-store-uri {uri}`, then "
    print(f"MLflow: {uri} (experiment '{resolved['name']}', parent run {run.parent}); browse with {browse}"
          f"{tracking.runs_view_url(run.exp_id, uri + '/' if uri.startswith('http') else 'http://127.0.0.1:5000/')} "
          f"(the runs table with the summary metrics as columns; expand the study's run to see its trials)")
    print(f"report: python -m harness.report {resolved['name']} --tracking-uri {uri} --run {run.parent}")
    if outcome.untracked:
        print(f"warning: MLflow was unreachable past the grace period ({tracking.TRACKING_GRACE_ENV}); trials "
              f"{', '.join(outcome.untracked)} are complete in {place.exp_path} but not fully logged. Fill MLflow "
              f"in with: python -m harness.study.backfill {resolved['name']} --scale {resolved['scale']} --storage "
              f"{shlex.quote(str(place.storage))} --tracking-uri {uri}", file=sys.stderr)
    if outcome.errors:
        return 1
    return EXIT_UNTRACKED if outcome.untracked else 0


@dataclasses.dataclass
class Outcome:
    errors: list[tuple[str, str]]  # (trial, last line of its error)
    unfinished: list[str]          # trials Tune stopped before their end (an interrupt)
    untracked: list[str]           # completed trials whose MLflow run misses items (a tracking outage)


def print_outcome(results, resolved: dict, wall_s: float) -> Outcome:
    """Print one row per cell of finished trials and the errored ones; return what did not end well."""
    cells: dict[str, list[dict]] = {}
    out = Outcome([], [], [])
    for r in results:
        if r.error is not None:  # a trial whose actor died may come back without its config: name it by its folder
            name = specs.Trial.from_tune(r.config["trial"]).name if r.config else Path(str(r.path)).name
            out.errors.append((name, str(r.error).strip().splitlines()[-1][:300]))
            continue
        trial, metrics = specs.Trial.from_tune(r.config["trial"]), r.metrics or {}
        if not metrics.get("finished"):  # Tune stopped it before trial_driver reported its end (an interrupt)
            out.unfinished.append(trial.name)
            continue
        if metrics.get("untracked"):
            out.untracked.append(trial.name)
        cells.setdefault(trial.cell_title, []).append(metrics)
    ended = f"interrupted after {wall_s:.0f} s" if out.unfinished else f"finished in {wall_s:.0f} s"
    print(f"\nstudy {resolved['name']} ({resolved['scale']}) {ended}")
    print(f"{'cell':60s} {'n':>3s} {'final acc':>10s} {'steps to target':>16s} {'diverged':>9s}")
    for cell, rows in cells.items():
        acc = statistics.median(float(m.get("final_acc", float("nan"))) for m in rows)
        steps = [m.get("steps_to_target", -1) for m in rows]
        steps = [s if s is not None and s >= 0 else math.inf for s in steps]
        diverged = sum(m.get("trial_status") == "diverged" for m in rows)
        print(f"{cell[:60]:60s} {len(rows):3d} {acc:10.4f} {statistics.median(steps):16g} {diverged:9d}")
    for name, err in out.errors:
        print(f"ERROR {name}: {err}", file=sys.stderr)
    return out


@dataclass(frozen=True)
class Cost:
    """What a study's trials cost to train (evaluation not included), from the same numbers --dry-run prints."""
    trials: int
    steps: int
    images: int                 # training images, summed over trials
    longest: int                # training images of the longest trial (a node is up at least that long)
    images_per_s: float | None  # of one trial; None: no way to know here
    source: str                 # where images_per_s comes from ("measured ...", "ASSUMED: ...") or why there is none
    kind: str                   # "GPU" or "CPU"
    devices: float              # per trial: workers x GPUs (or CPUs) per worker

    @property
    def trial_hours(self) -> float | None:
        return None if self.images_per_s is None else self.images / self.images_per_s / 3600

    @property
    def device_hours(self) -> float | None:
        return None if self.trial_hours is None else self.trial_hours * self.devices

    def node_hours(self, devices_per_node: float) -> float | None:
        """At least this many node-hours on nodes of `devices_per_node`: the device-hours packed onto full nodes,
        and never less than the longest trial (ignores start-up and the autoscaler's idle timeout)."""
        if self.images_per_s is None:
            return None
        return max(self.device_hours / devices_per_node, self.longest / self.images_per_s / 3600)


def cost(resolved: dict, trials: list[specs.Trial], measure: bool = True) -> Cost:
    """The training cost of `trials`; `measure=False` takes the study file's images_per_s even where this machine
    could measure (the README's cost table: the same figure on every machine)."""
    res = resolved["resources"]
    ips, source = (measure and throughput.measured(resolved, trials)) or images_per_s(resolved, trials[0].config,
                                                                                       measure)
    kind = "GPU" if res["gpus_per_worker"] else "CPU"
    images = [t.config.steps * t.config.batch_size for t in trials]
    return Cost(len(trials), sum(t.config.steps for t in trials), sum(images), max(images), ips, source, kind,
                res["workers"] * (res["gpus_per_worker"] or res["cpus_per_worker"]))


# Tune trial start -> first optimizer step on the developers' 2-core CPU machine (README, "Where a trial's time goes"):
# a trial of several workers starts a Train controller and its worker processes, each importing torch; a one-worker
# trial trains in its Tune actor, which pays that once and then starts each next trial in well under a second.
STARTUP_S = {"trainer": 15.0, "actor_first": 13.0, "actor_reused": 0.5}


def packing(res: dict, trials: int, cpus: float, gpus: float) -> tuple[int, float]:
    """(trials at once on `cpus` CPUs and `gpus` GPUs, start-up seconds summed over the study's trials)."""
    per = cluster.per_worker(res)
    fits = min(int(cpus // (per["CPU"] * res["workers"])),
               int(gpus // (per["GPU"] * res["workers"])) if "GPU" in per else trials)
    slots = max(0, min(fits, trials))
    if res["workers"] == 1:
        first = min(slots, trials)
        return slots, first * STARTUP_S["actor_first"] + (trials - first) * STARTUP_S["actor_reused"]
    return slots, trials * STARTUP_S["trainer"]


def _hours(h: float, what: str) -> str:
    """'6.85 GPU-hours'; under 0.1 h in minutes ('2.8 CPU-minutes'), not '0.05'."""
    return f"{h:.2f} {what}-hours" if h >= 0.1 else f"{h * 60:.1f} {what}-minutes"


def _local_gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def dry_run(resolved: dict, trials: list[specs.Trial]) -> None:
    res = resolved["resources"]
    print(f"{'trial':40s} {'batch':>6s} {'bn':>5s} {'max_lr':>7s} {'schedule':>14s} {'steps':>7s} {'seed':>5s}")
    for t in trials:
        c = t.config
        print(f"{t.name[:40]:40s} {c.batch_size:6d} {c.bn_batch or c.batch_size // res['workers']:5d} "
              f"{c.max_lr:7g} {c.schedule:>14s} {c.steps:7d} {c.seed:5d}")
    nets = ", ".join(dict.fromkeys(
        f"{t.config.model} with {t.config.optimizer}{' (Nesterov)' if t.config.nesterov else ''}, BN momentum "
        f"{t.config.bn_momentum:g} (Caffe moving_average_fraction {1 - t.config.bn_momentum:g})" for t in trials))
    print(f"setup: {nets}")
    c = cost(resolved, trials)
    print(f"\n{c.trials} trials, {c.steps:,} optimizer steps, {c.images:,} training images", end="")
    if c.trial_hours is None:
        print(f"; no cost estimate: {c.source}")
        return
    print(f"\nat {c.images_per_s:,.0f} images/s per trial ({c.source}): {_hours(c.trial_hours, 'trial')} = "
          f"{_hours(c.device_hours, c.kind)} ({res['workers']} workers x "
          f"{res['gpus_per_worker'] or res['cpus_per_worker']:g} {c.kind} each); evaluation not included")
    cpus, gpus = os.cpu_count() or 1, _local_gpus()
    slots, startup = packing(res, c.trials, cpus, gpus)
    how = ("one-worker trials train in their reused Tune actor" if res["workers"] == 1 else
           f"each trial starts a Train controller and {res['workers']} worker processes")
    if slots == 0:
        print(f"here ({cpus} CPUs, {gpus} GPUs) no trial fits: run it on a cluster (--address)")
        return
    wall_h = (c.trial_hours * 3600 + startup) / slots / 3600
    print(f"here ({cpus} CPUs, {gpus} GPUs): {slots} trial{'s' if slots != 1 else ''} at once, about "
          f"{_hours(wall_h, 'wall')} of which "
          f"{startup / slots / 60:.1f} minutes start-up ({how}; ~{STARTUP_S['trainer']:g} s per trial as a "
          f"TorchTrainer, ~{STARTUP_S['actor_reused']:g} s after each actor's first as one worker)")


def print_deviations(spec: dict, resolved: dict) -> None:
    """The scale's deviations: computed field by field (harness.deviations), then the study file's free text."""
    scale = resolved["scale"]
    against = "each cell's reference run" if scale == "paper" else "the paper scale"
    computed = deviations.for_scale(spec, scale, workers=resolved["resources"]["workers"])
    print(f"\ndeviations from {against} (computed from the configs, field by field):")
    for line in computed or ["none"]:
        print(f"  {line}")
    if resolved["deviations"]:
        print("deviations no trial field can say (the study file's words):")
        for line in resolved["deviations"]:
            print(f"  {' '.join(line.split())}")


def print_plan(resolved: dict, trials: list[specs.Trial]) -> None:
    """The pre-registered analysis: one line per comparison the report will make, from the same code."""
    from harness import plan
    analysis = resolved.get("analysis")
    if not analysis:
        print("\nanalysis plan: none declared (add `analysis:` to the study file); the report will give no verdicts")
        return
    comparisons = plan.expand(analysis, [t.config.to_dict() for t in trials], where=resolved["name"])
    print(f"\nanalysis plan ({len(comparisons)} comparisons; the report evaluates exactly these):")
    for c in comparisons:
        print(f"  {c.line()}")


def images_per_s(resolved: dict, config: TrialConfig, measure: bool = True) -> tuple[float | None, str]:
    """(images/s of one trial process, where the figure comes from): measured here when this machine has the
    study's kind of device and its data, else the study file's `images_per_s` labelled assumed, else (None, why)."""
    import torch

    from harness.trial import data
    wants_gpu = resolved["resources"]["gpus_per_worker"] > 0
    why = ("the study file's figure asked for" if not measure else "no usable GPU" if wants_gpu else
           "the study runs on CPUs, this machine would use its GPU")
    if measure and wants_gpu == torch.cuda.is_available():
        steps, warmup = 4, 2
        try:
            ips = measure_images_per_s(config, steps, warmup)
        except data.DataNotFoundError:
            why = f"dataset {config.dataset} is not on this machine"
        else:
            device = torch.cuda.get_device_name(0) if wants_gpu else f"CPU, {torch.get_num_threads()} threads"
            return ips, (f"measured on this machine ({device}): {steps} steps of the first trial after {warmup} "
                         f"warm-up, one process")
    assumed = resolved.get("images_per_s")
    if assumed:
        return assumed, f"ASSUMED: configured in the study file (images_per_s), not measured here ({why})"
    if why == "no usable GPU":
        return None, "the study runs on GPUs, this machine has none, and the study file gives no images_per_s"
    return None, f"not measured here ({why}) and the study file gives no images_per_s"


def measure_images_per_s(config: TrialConfig, steps: int = 4, warmup: int = 2) -> float:
    """Training images/s of the first `steps` steps after `warmup` of this trial on the device it would use."""
    from harness.trial.loop import run_trial
    probe = config.replace(steps=warmup + steps, eval_every=warmup + steps, warmup_steps=warmup, stepsize=None,
                           clr_stages=[], milestones=[],
                           schedule="constant" if config.schedule == "multistep" else config.schedule)
    rates: list[float] = []
    run_trial(probe, reporter=lambda m, s: rates.append(m["images_per_s"]))
    return rates[-1]


def _missing_data(trials: list[specs.Trial]) -> str | None:
    """Pre-flight: every dataset of the trials is on this machine or can be downloaded (nothing is downloaded
    here); otherwise the first one missing, in one line, instead of every trial failing inside Ray."""
    from harness.trial import data
    for name, data_dir in sorted({(t.config.dataset, t.config.data_dir) for t in trials}, key=str):
        try:
            data.locate(name, data_dir)
        except data.DataNotFoundError as e:
            return str(e)
    return None


class _OneLineErrors(argparse.ArgumentParser):
    """argparse's errors as one line on stderr and exit 2 (not its usage block), like every other bad input."""

    def error(self, message: str):
        raise SystemExit(_fail(f"{message} (python -m harness.study --help lists the options)"))


def _log_file(exp_path: str) -> str:
    """The study's log file: in its experiment folder, or (cloud storage) in a local folder of the same name.
    Each node's processes append to that path on their own node."""
    folder = Path(tempfile.gettempdir()) / "harness-logs" / exp_path.split("?")[0].rstrip("/").rsplit("/", 1)[-1] \
        if cluster.is_uri(exp_path) else Path(exp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / "harness.log")



def _trial_name(trial) -> str:
    return trial.config["trial"]["name"]  # Trial.to_tune() carries it for Tune's folders


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
