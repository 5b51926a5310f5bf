"""`python -m harness.bench`: the harness's performance figures, each beside its goal, as a table (and a CSV with
--csv PATH).

    P1  harness trial throughput / a bare PyTorch loop (same model, batch, data, device, fast path; no Ray, no
        MLflow, no reporter): ResNet-20 at batch 125, warm-up and evaluation left out            goal >= 0.97
    P2  device-resident batch augmentation (harness.trial.data.TrainBatches) / a torchvision DataLoader with
        per-sample transforms.v2 of the same augmentation (pad-4 crop + mirror), images/s on CPU    goal >= 10
    P3  what the harness adds to Ray's own start-up: Tune trial start -> first optimizer step of the harness's
        smoke-grid trials (2 gloo CPU workers, dashboard on) / the same of bare Tune trials that each run a bare
        Ray Train TorchTrainer (same workers and resources, an nn.Linear under DDP, one ray.train.report), both
        in one Ray session, the same number of trials, medians                                     goal <= 1.25
    P3w a one-worker trial (it trains in its reused Tune actor, issue 26): Tune trial start -> first optimizer step,
        the median over the trials after each actor's first, in seconds, measured in the same Ray session beside
        bare Tune function trials (an nn.Linear, one step, one tune.report) whose figure the detail gives  goal <= 2
    P5  study wall time / the trials' own compute (see study_overhead: the trials' optimizer steps, per slot of
        trials that run at once), for that smoke grid and for a quick batch_size_effect run that --quick-run
        names (few long trials, too long to run here)                                              goal <= 1.25
    P5m the same for many small trials: activation_mystery's quick grid (one-worker MLP trials of 600 steps on
        MNIST) cut to its first --trials constant-LR arms at one seed, run in the same session     goal <= 1.5
    P4  (GPU only) ResNet-56 paper trial (batch 1000, BN over 125) images/s, fast path / fp32, and the projected
        time of the SC1 CLR trial (10,000 iterations of 1000 = 10M images) on this GPU               goal <= 5 min

Figures are ratios measured in one run on one machine; a figure that was not measured says so, never a guess.
`python -m harness.bench logging` is the older MLflow-logging on/off throughput comparison.

The harness's own modules (harness.trial, harness.study) are imported where they are used: the bare trial of P3
runs this module's functions in Ray's processes, which must import no more than torch and Ray to stay bare.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import REPO_ROOT
from harness.config import TrialConfig

REPO = REPO_ROOT
SC1_IMAGES = 10_000 * 1000  # the SC1 CLR trial: 10k iterations at batch 1000
SMOKE_STUDY = "bench_smoke_grid"
MANY_STUDY = "bench_many_small"


@dataclass
class Figure:
    name: str
    what: str
    value: float | None       # None: not measured
    unit: str
    goal: str                 # e.g. ">= 0.97"
    detail: str               # how it was measured, or why it was not

    @property
    def met(self) -> str:
        if self.value is None:
            return "-"
        op, bound = self.goal.split()[:2]
        bound_f = float(bound)
        return "yes" if (self.value >= bound_f if op == ">=" else self.value <= bound_f) else "NO"

    def shown(self) -> str:
        return "not measured" if self.value is None else f"{self.value:.3g} {self.unit}".strip()


# ----------------------------------------------------------------------------------------------- data
def bench_dataset() -> tuple[str, int | None]:
    """Fashion-MNIST (28x28, a 5k subset) when it is on this machine, else scikit-learn's digits (8x8, bundled)."""
    from harness.trial.data import DataNotFoundError, load_dataset
    try:
        load_dataset("fashion_mnist", train_size=5000, download=False)
        return "fashion_mnist", 5000
    except DataNotFoundError:
        return "digits", None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- P1
def p1_trial_vs_bare(device: torch.device, steps: int = 20, warmup: int = 3, repeats: int = 3) -> Figure:
    from harness.trial.loop import run_trial
    dataset, size = bench_dataset()
    config = TrialConfig.from_dict({
        "dataset": dataset, "train_size": size, "model": "resnet20", "preprocess": "paper", "batch_size": 125,
        "steps": warmup + steps, "eval_every": warmup + steps, "warmup_steps": warmup, "schedule": "constant",
        "max_lr": 0.05, "momentum": 0.9, "device": device.type})
    harness_ips, bare_ips = [], []
    for _ in range(repeats):  # interleaved, so that load from elsewhere hits both alike
        records: list[dict] = []
        run_trial(config, lambda m, s: records.append(m), device=device)
        harness_ips.append(records[-1]["images_per_s"])
        bare_ips.append(bare_loop(config, device, steps, warmup))
    ratios = [h / b for h, b in zip(harness_ips, bare_ips, strict=True)]
    return Figure("P1", "harness trial / bare PyTorch loop, images/s", statistics.median(ratios), "", ">= 0.97",
                  f"ResNet-20, batch 125, {dataset}, {device.type}, {steps} steps after {warmup} warm-up, "
                  f"median of {repeats}: harness {statistics.median(harness_ips):.0f}, "
                  f"bare {statistics.median(bare_ips):.0f} images/s")


def bare_loop(cfg: TrialConfig, device: torch.device, steps: int, warmup: int) -> float:
    """The loop anyone would write: random batches from the on-device tensors, a random mirror, forward, backward,
    SGD step. Same model, batch, data, device, precision and memory format as the trial; images/s after warm-up."""
    from harness.trial.data import load_dataset
    from harness.trial.models import build_model
    from harness.trial.step import FastPath
    ds = load_dataset(cfg.dataset, train_size=cfg.train_size, preprocess=cfg.preprocess, device=device)
    fast = FastPath.of(cfg, device)
    torch.manual_seed(0)
    model = build_model(cfg, ds.in_channels, ds.num_classes, ds.image_size).to(device)
    if fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.max_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.train()
    n, b = len(ds.train_y), cfg.batch_size
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        idx = torch.randint(0, n, (b,), device=device)
        x, y = ds.train_x[idx], ds.train_y[idx]
        x = fast.layout(torch.where(torch.rand(b, device=device)[:, None, None, None] < 0.5, x.flip(3), x))
        with fast.autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return steps * b / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- P2
def p2_augmentation(batches: int = 40, loader_images: int = 3000) -> Figure:
    from harness.trial.data import TrainBatches, load_dataset
    dataset, size = bench_dataset()
    ds = load_dataset(dataset, train_size=size, preprocess="standard", device="cpu")  # pad-4 crop + mirror
    tb = TrainBatches(ds, 125, seed=0)
    tb.get(0)
    t0 = time.perf_counter()
    for step in range(1, batches + 1):
        tb.get(step)
    ours = batches * 125 / (time.perf_counter() - t0)
    theirs = dataloader_images_per_s(ds, loader_images)
    hw = ds.image_size
    return Figure("P2", "device-resident batch augmentation / DataLoader + per-sample v2, images/s", ours / theirs,
                  "x", ">= 10", f"pad-4 crop + mirror of {dataset} {hw}x{hw}, batch 125, CPU: harness {ours:.0f}, "
                  f"torchvision DataLoader (num_workers=0) {theirs:.0f} images/s")


def dataloader_images_per_s(ds, images: int) -> float:
    """The same augmentation as anyone would write it: a Dataset with per-sample transforms.v2, a DataLoader."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomCrop(ds.image_size, padding=4), v2.RandomHorizontalFlip()])

    class Augmented(Dataset):
        def __len__(self):
            return len(ds.train_y)

        def __getitem__(self, i):
            return transform(ds.train_x[i]), ds.train_y[i]

    loader = DataLoader(Augmented(), batch_size=125, shuffle=True, num_workers=0, drop_last=True)
    it = iter(loader)
    next(it)
    seen, t0 = 0, time.perf_counter()
    while seen < images:
        try:
            _, y = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        seen += len(y)
    return seen / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- P3, P5: the run
# One child process, one Ray session (a study's settings, harness.study.cluster.init_ray): first the bare trials
# (P3's floor), then the harness's smoke grid through harness.study's own CLI, each Train worker logging its
# start-up phases (HARNESS_STARTUP_PROFILE). A child, so that --timeout can end it, and Ray ends with it.
def smoke_grid_study(folder: Path, trials: int) -> Path:
    """batch_size_effect's smoke scale (4 cells of 2-worker CPU trials) with enough seeds for `trials` trials."""
    import yaml
    spec = yaml.safe_load((REPO / "studies" / "batch_size_effect.yaml").read_text())
    cells = len(spec["scales"]["smoke"]["paired"]["cell"])
    spec["name"] = SMOKE_STUDY
    spec["scales"]["smoke"]["grid"] = {"seed": list(range(max(1, trials // cells)))}
    path = folder / f"{SMOKE_STUDY}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def many_small_study(folder: Path, trials: int) -> Path:
    """activation_mystery's quick grid cut to its first `trials` constant-LR arms (no finder LR) at seed 0: one-worker
    MLP trials of one MNIST epoch each, the kind of study an LR sweep is."""
    import yaml
    spec = yaml.safe_load((REPO / "studies" / "activation_mystery.yaml").read_text())
    arms = [a for a in spec["paired"]["arm"] if "lr_from_finder" not in a][:trials]
    spec = {**{k: v for k, v in spec.items() if k not in ("analysis", "scales")}, "name": MANY_STUDY,
            "paired": {"arm": arms}, "grid": {"seed": [0]}, "scales": {"quick": {}}}
    path = folder / f"{MANY_STUDY}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@dataclass
class SmokeRun:
    """What the child left behind: the MLflow store and the study's parent run, the phase log, the bare trials."""
    folder: Path
    why_not: str = ""                       # the child failed or ran out of time: why, in one line
    parent_run_id: str | None = None
    many_run_id: str | None = None          # the many-small-trials study's parent run (P5m), if it ran

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.folder}/mlflow.db"

    @property
    def profile(self) -> Path:
        return self.folder / "startup_phases.jsonl"

    @property
    def bare_file(self) -> Path:
        return self.folder / "bare_trials.json"

    def bare(self) -> dict:
        """{"startups": [s, ...], "error": str | None, "at_once": n}; the error when the child never wrote it."""
        if not self.bare_file.is_file():
            return {"startups": [], "error": self.why_not or "the bare trials left no result", "at_once": 0}
        return json.loads(self.bare_file.read_text())


def run_smoke_grid(trials: int, timeout_s: float) -> SmokeRun:
    """Run `smoke_session` in a child process in a fresh folder; what it left there, or why it left nothing."""
    run = SmokeRun(Path(tempfile.mkdtemp(prefix="harness-bench-")))
    from harness.study.worker import PROFILE_ENV
    cmd = [sys.executable, "-c", "import sys; from harness.bench import smoke_session; "
                                 "sys.exit(smoke_session(sys.argv[1], int(sys.argv[2])))", str(run.folder), str(trials)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           PROFILE_ENV: str(run.profile)}
    child = subprocess.Popen(cmd, cwd=run.folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)  # its own process group: Ray's processes with it
    try:
        stdout, stderr = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        end_process_group(child)
        run.why_not = f"the bare trials and the study ran past {timeout_s:.0f} s (--timeout)"
        return run
    if child.returncode != 0:
        last = (stderr.strip() or stdout.strip()).splitlines()[-1:]
        run.why_not = f"the smoke session exited {child.returncode}: {last}"
        return run
    run.parent_run_id = study_parent_run(run.uri, SMOKE_STUDY)
    run.many_run_id = study_parent_run(run.uri, MANY_STUDY)
    if run.parent_run_id is None:
        run.why_not = f"the study left no run of {SMOKE_STUDY} in {run.uri}"
    return run


def end_process_group(child: subprocess.Popen) -> None:
    """SIGTERM to the child's own process group (it and what it started there), SIGKILL after 15 s."""
    import signal
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
            child.communicate(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def smoke_session(folder: str, trials: int) -> int:
    """In the child: one Ray session with a study's settings; the bare trials (as many as the study has), written
    to bare_trials.json, then the smoke grid through `python -m harness.study`'s main; its exit code."""
    from harness import spec as specs
    from harness.study import cli, cluster
    here = Path(folder)
    study = smoke_grid_study(here, trials)
    spec = specs.load_spec(str(study))
    n = len(specs.trials(spec, "smoke"))
    resources = specs.at_scale(spec, "smoke")["resources"]
    cluster.init_ray(None)
    try:
        try:
            bare = {**bare_trials(n, resources, here / "ray_results"), "error": None}
        except Exception as e:  # noqa: BLE001 - P3 says why it has no floor; the study still runs for P5
            bare = {"startups": [], "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", "at_once": 0}
        try:
            bare["function_startups"] = bare_function_trials(n, here / "ray_results")
        except Exception as e:  # noqa: BLE001 - P3w says why it has no bare figure
            bare["function_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        (here / "bare_trials.json").write_text(json.dumps(bare))
        where = ["--tracking-uri", f"sqlite:///{here}/mlflow.db", "--storage", str(here / "ray_results")]
        argv = [str(study), "--scale", "smoke", *where]
        sys.argv = ["harness.study", *argv]  # the study run's command tag reads it
        rc = cli.main(argv)
        many = [str(many_small_study(here, trials)), "--scale", "quick", *where]
        sys.argv = ["harness.study", *many]
        if (rc_many := cli.main(many)) != 0:  # P5m says why from the missing run; e.g. MNIST not on this machine
            print(f"the many-small-trials study exited {rc_many}", file=sys.stderr)
        return rc
    finally:
        cluster.end_our_ray()


# ----------------------------------------------------------------------------------------------- P3: the bare trial
# Only public Ray APIs, and only torch and Ray imported in Ray's processes: the engine's own floor for a Tune trial
# that runs a 2-worker DDP TorchTrainer, with the harness's resource pattern (the Tune trial holds a `trial_driver`
# unit, not a CPU; each Train worker holds cpus_per_worker CPUs) and its TuneConfig (reused trial actors).
def bare_trials(n: int, resources: dict, storage: Path) -> dict:
    """Run `n` bare Tune trials in the connected Ray session, as many at once as the study would; their Tune trial
    start -> rank 0's first optimizer step, in seconds."""
    from harness.study import cluster
    space = {"workers": resources["workers"], "cpus_per_worker": resources["cpus_per_worker"], "storage": str(storage)}
    startups, at_once = _fit_bare(bare_trial_driver, {cluster.DRIVER_RESOURCE: 1}, cluster.per_worker(resources),
                                  resources["workers"], n, space, storage, "bare trials")
    return {"startups": startups, "at_once": at_once}


def bare_function_trials(n: int, storage: Path) -> list[float]:
    """`n` bare Tune function trials, one CPU each, as many at once as fit, reused actors (the one-worker path's
    floor): each trial's start -> its first optimizer step, in seconds, in the order they ended."""
    from harness.study import cluster
    return _fit_bare(bare_function_trial, {cluster.DRIVER_RESOURCE: 1, "CPU": 1}, {"CPU": 1}, 1, n, {}, storage,
                     "bare function trials")[0]


def _fit_bare(trainable, resources: dict, per_worker: dict, workers: int, n: int, space: dict, storage: Path,
              what: str) -> tuple[list[float], int]:
    """`n` trials of a bare trainable (seeds 0..n-1), as many at once as fit, reused actors: their startup_seconds
    and how many ran at once; RuntimeError naming the first failure."""
    import ray
    from ray import tune

    from harness.study import cluster
    at_once = cluster.admit(None, ray.cluster_resources(), per_worker, workers, n).concurrent or 1
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"seed": tune.grid_search(list(range(n))), **space},
        tune_config=tune.TuneConfig(max_concurrent_trials=at_once, reuse_actors=True),
        run_config=tune.RunConfig(name=what.replace(" ", "_"), storage_path=str(storage), verbose=0))
    results = tuner.fit()
    errors = [str(r.error).splitlines()[0][:200] for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} {what} failed: {errors[0]}")
    return [r.metrics["startup_seconds"] for r in results], at_once


def bare_function_trial(config: dict) -> None:
    """A bare Tune function trainable: an nn.Linear, SGD, one step, one tune.report of its start -> first step."""
    import ray.tune
    started = time.time()
    torch.manual_seed(config["seed"])
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(16, 8)).square().mean().backward()
    opt.step()
    ray.tune.report({"startup_seconds": time.time() - started})


def bare_trial_driver(config: dict) -> None:
    """The Tune function trainable: one bare TorchTrainer; reports when rank 0's first step came after its start."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchConfig, TorchTrainer
    started = time.time()  # imports above: as the harness's driver module, loaded before its trial starts
    trainer = TorchTrainer(
        bare_train_loop,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=config["workers"], use_gpu=False,
                                               resources_per_worker={"CPU": config["cpus_per_worker"]}),
        run_config=ray.train.RunConfig(name=f"bare-{config['seed']}-{time.time_ns()}",
                                       storage_path=config["storage"]))
    first_step_at = trainer.fit().return_value  # rank 0's
    ray.tune.report({"startup_seconds": first_step_at - started})


def bare_train_loop() -> float:
    """One Train worker: an nn.Linear under DDP, SGD, one step, one ray.train.report; the first step's wall clock."""
    import ray.train
    import ray.train.torch
    model = ray.train.torch.prepare_model(torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(16, 8)).square().mean()
    loss.backward()
    opt.step()
    first_step_at = time.time()
    ray.train.report({"loss": loss.item()})
    return first_step_at


# ----------------------------------------------------------------------------------------------- P3: figures
PHASES = ("process_created", "imported", "loop_entered", "hostnames_gathered", "mlflow_started", "first_step")
PHASE_TEXT = {"process_created": "Train worker process exists (Train controller started it)",
              "imported": "torch, ray.train.torch and the harness imported in it",
              "loop_entered": "train loop entered (gloo process group set up)",
              "hostnames_gathered": "checkpoint looked up, host names gathered over gloo",
              "mlflow_started": "rank 0's MLflow run opened and its params logged",
              "first_step": "data, model, DDP, optimizer built; first step done"}


def startup_profile(path: Path) -> list[str]:
    """Where a trial's start-up goes: per rank, the median wall clock from the Tune trial's start to each phase."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ranks = sorted({r["rank"] for r in rows})
    lines = [f"{'seconds after the Tune trial started (median of ' + str(len(rows) // max(len(ranks), 1)) + ')':58s}"
             + "".join(f"{'rank ' + str(k):>9s}" for k in ranks)]
    for phase in PHASES:
        cells = []
        for k in ranks:
            offsets = [r[phase] - r["driver_started"] for r in rows if r["rank"] == k and r.get(phase)]
            cells.append(f"{statistics.median(offsets):9.1f}" if offsets else f"{'-':>9s}")
        lines.append(f"{PHASE_TEXT[phase]:58s}" + "".join(cells))
    return lines


def startup_ratio(harness: list[float], bare: list[float]) -> float:
    """P3: the median start-up (Tune trial start -> first optimizer step) of the harness's trials over that of the
    bare trials; ValueError when either side has none or a start-up that is not a positive number of seconds."""
    for side, values in (("harness", harness), ("bare", bare)):
        if not values:
            raise ValueError(f"no {side} trial reported its start-up")
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"a {side} start-up is not a positive number of seconds: {values}")
    return statistics.median(harness) / statistics.median(bare)


def p3_figure(harness: list[float], bare: dict, why_not: str = "") -> Figure:
    what = "harness / bare TorchTrainer: trial start -> first step"
    if why_not:
        return Figure("P3", what, None, "x", "<= 1.25", why_not)
    h = sorted(harness)
    try:
        ratio = startup_ratio(h, bare["startups"])
    except ValueError as e:
        why = bare["error"] or str(e)
        return Figure("P3", what, None, "x", "<= 1.25", f"not measured: {why}" +
                      (f" (harness median {statistics.median(h):.1f} s of {len(h)} trials)" if h else ""))
    b = sorted(bare["startups"])
    return Figure("P3", what, ratio, "x", "<= 1.25",
                  f"medians of {len(h)} trials each, one Ray session, {bare['at_once']} at a time, dashboard on: "
                  f"harness {statistics.median(h):.1f} s (min {h[0]:.1f}, max {h[-1]:.1f}); bare Tune trial + "
                  f"TorchTrainer of 2 gloo workers with an nn.Linear {statistics.median(b):.1f} s (min {b[0]:.1f}, "
                  f"max {b[-1]:.1f}), run first")


# ----------------------------------------------------------------------------------------------- P5
@dataclass(frozen=True)
class RunSpan:
    """One MLflow run's own timestamps (ms since the epoch, as MLflow keeps them; end None while it runs) and, for
    a trial, the `train_seconds` it last logged (None: it logged none)."""
    start_ms: int
    end_ms: int | None
    train_seconds: float | None = None


@dataclass(frozen=True)
class StudyOverhead:
    wall_s: float       # the study's parent run, start to end
    compute_s: float    # the trials' own compute, summed
    at_once: int        # the most trial runs open at one moment
    runs_open_s: float  # the trial runs' spans, summed (training, evaluation, checkpoints, logging)
    trials: int

    @property
    def ratio(self) -> float:
        return self.wall_s / (self.compute_s / self.at_once)


def study_overhead(study: RunSpan, trials: list[RunSpan]) -> StudyOverhead:
    """P5's arithmetic, from the runs' own timestamps. P5 = study wall / (own compute / trials at once).

    study wall     the study's MLflow parent run from its start to its end (after Ray is up, until the last trial
                   has ended)
    own compute    of a trial: its `train_seconds`, the wall time of its optimizer steps (forward, backward, the
                   gradient all-reduce, the update) on run_trial's own device-synchronised clock, the last value
                   it logged (a trial resumed from a checkpoint carries its earlier steps along; steps redone after
                   a restart are not counted twice). Everything else is what the figure weighs: Ray's and Train's
                   start-up, data and model set-up, evaluation, checkpoints, reports, MLflow logging, scheduling.
    at once        the most trial runs open (MLflow start -> end) at the same moment, at least 1: with k trials at a
                   time the best a study can do is own compute / k. One at a time (the smoke grid on 2 CPUs), the
                   figure is study wall / the sum of the trials' own compute.
    Durations are non-negative by construction (negative or non-finite train_seconds raise); a study that has not
    finished, has no wall time, or whose trials logged no training time gives ValueError, never a figure.
    """
    if study.end_ms is None:
        raise ValueError("the study run has not finished")
    wall_s = (study.end_ms - study.start_ms) / 1000
    if wall_s <= 0:
        raise ValueError(f"the study run lasted {wall_s:g} s")
    compute = [t.train_seconds for t in trials if t.train_seconds is not None]
    if bad := [c for c in compute if not (math.isfinite(c) and c >= 0)]:
        raise ValueError(f"a trial logged train_seconds {bad[0]!r}: not a duration")
    if sum(compute) <= 0:
        raise ValueError(f"none of the study's {len(trials)} trial runs logged any training time (train_seconds)")
    spans = [(t.start_ms, t.end_ms) for t in trials if t.end_ms is not None and t.end_ms > t.start_ms]
    return StudyOverhead(wall_s=wall_s, compute_s=sum(compute), at_once=max(1, most_at_once(spans)),
                         runs_open_s=sum(end - start for start, end in spans) / 1000, trials=len(trials))


def most_at_once(spans: list[tuple[int, int]]) -> int:
    """The most [start, end) intervals that overlap at one moment (an end and a start at the same instant: none)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # -1 sorts first
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@dataclass(frozen=True)
class StudyTiming:
    """What MLflow holds of a study run's timing: the parent's and the trials' spans, the trials' start-ups."""
    study: str
    scale: str
    parent: RunSpan
    trials: list[RunSpan]
    startups: list[float]  # startup_seconds of the trials that logged one (not resumed): P3's harness side

    def overhead(self) -> StudyOverhead:
        return study_overhead(self.parent, self.trials)


def study_parent_run(uri: str, study: str) -> str | None:
    """The newest study (parent) run of `study` in the store, or None."""
    from harness.study import tracking
    try:
        return tracking.latest_study_run(uri, study)
    except tracking.TrackingError:
        return None


def study_timing(uri: str, parent_run_id: str) -> StudyTiming:
    """Read a study's parent run and its trial runs from MLflow: P5's timestamps and P3's start-ups."""
    from harness import names
    from harness.study import tracking
    parent = tracking.mlflow_client(uri).get_run(parent_run_id)
    runs = tracking.trial_runs(uri, parent_run_id)
    return StudyTiming(
        parent.data.tags.get(names.STUDY, "?"), parent.data.tags.get(names.SCALE, "?"),
        RunSpan(parent.info.start_time, parent.info.end_time),
        [RunSpan(r.info.start_time, r.info.end_time, r.data.metrics.get("train_seconds")) for r in runs],
        [r.data.metrics["startup_seconds"] for r in runs if "startup_seconds" in r.data.metrics])


def p5_detail(o: StudyOverhead) -> str:
    slots = "one at a time" if o.at_once == 1 else f"up to {o.at_once} at a time"
    return (f"{o.trials} trials, {slots}: study {o.wall_s:.0f} s, trials' own compute (optimizer steps, "
            f"train_seconds) {o.compute_s:.1f} s; their MLflow runs were open {o.runs_open_s:.0f} s in all")


def p3_p5_smoke(trials: int, timeout_s: float) -> list[Figure]:
    t0 = time.time()
    run = run_smoke_grid(trials, timeout_s)
    for line in startup_profile(run.profile):
        print(f"P3 profile | {line}", flush=True)
    bare = run.bare()
    if bare["startups"]:
        print(f"P3 profile | {'bare TorchTrainer (nn.Linear): first step done, rank 0':58s}"
              f"{statistics.median(bare['startups']):9.1f}", flush=True)
    what5 = "smoke grid: study wall / trials' own compute"
    if run.parent_run_id is None:
        return [p3_figure([], bare, run.why_not), Figure("P5", what5, None, "", "<= 1.25", run.why_not),
                *p3w_p5m(run)]
    t = study_timing(run.uri, run.parent_run_id)
    try:
        o = t.overhead()
    except ValueError as e:
        return [p3_figure(t.startups, bare), Figure("P5", what5, None, "", "<= 1.25", f"not measured: {e}"),
                *p3w_p5m(run)]
    return [p3_figure(t.startups, bare),
            Figure("P5", what5, o.ratio, "", "<= 1.25", f"{p5_detail(o)} (bench wall {time.time() - t0:.0f} s)"),
            *p3w_p5m(run)]


def p3w_figure(startups: list[float], at_once: int, bare: dict, why_not: str = "") -> Figure:
    """P3w: the one-worker trials' start -> first step, leaving out each actor's first trial (the `at_once` longest:
    a new actor imports torch and the harness once)."""
    what = "one-worker trial start -> first step, after each actor's first"
    if why_not or len(startups) <= at_once:
        return Figure("P3w", what, None, "s", "<= 2", why_not or
                      f"not measured: {len(startups)} one-worker trials logged a start-up, {at_once} at a time")
    later = sorted(startups)[:len(startups) - at_once]
    floor = bare.get("function_startups") or []
    beside = (f"; beside it, in the same Ray session, a bare Tune function trial (nn.Linear, one step, median of "
              f"{len(floor)}) {statistics.median(floor) * 1000:.0f} ms" if floor else
              f"; no bare function trial figure: {bare.get('function_error') or 'none ran'}")
    return Figure("P3w", what, statistics.median(later), "s", "<= 2",
                  f"median of {len(later)} trials (max {later[-1]:.2f} s); each actor's first trial "
                  f"{statistics.median(sorted(startups)[-at_once:]):.1f} s{beside}")


def p3w_p5m(run: SmokeRun) -> list[Figure]:
    what = "many small trials: study wall / trials' own compute"
    if run.many_run_id is None:
        why = run.why_not or (f"not measured: the many-small-trials study left no run in {run.uri} (its data, "
                              f"MNIST, on this machine? see README 'Data offline')")
        return [p3w_figure([], 1, {}, why), Figure("P5m", what, None, "", "<= 1.5", why)]
    t = study_timing(run.uri, run.many_run_id)
    try:
        o = t.overhead()
    except ValueError as e:
        return [p3w_figure(t.startups, 1, run.bare()), Figure("P5m", what, None, "", "<= 1.5", f"not measured: {e}")]
    return [p3w_figure(t.startups, o.at_once, run.bare()), Figure("P5m", what, o.ratio, "", "<= 1.5", p5_detail(o))]


def p5_quick(uri: str | None, run_id: str | None) -> Figure:
    what = "quick batch_size_effect: study wall / trials' own compute"
    if not run_id:
        return Figure("P5q", what, None, "", "<= 1.25", "not measured: run the quick study first "
                      "(python -m harness.study batch_size_effect --scale quick), then pass --quick-run RUN_ID")
    from harness.study import tracking
    uri = tracking.resolve_tracking_uri(uri)
    try:
        t = study_timing(uri, run_id)
        o = t.overhead()
    except Exception as e:  # an unknown run id, an unfinished run: say so, no figure
        return Figure("P5q", what, None, "", "<= 1.25", f"run {run_id} in {uri}: {' '.join(str(e).split())[:200]}")
    startup = f", median start-up {statistics.median(t.startups):.1f} s" if t.startups else ""
    return Figure("P5q", what, o.ratio, "", "<= 1.25", f"MLflow run {run_id} ({t.study}, {t.scale}): {p5_detail(o)}"
                                                      f"{startup}")


# ----------------------------------------------------------------------------------------------- P4
def p4_gpu(steps: int = 30, warmup: int = 5) -> list[Figure]:
    what_speed, what_time = "ResNet-56 paper trial: fast path / fp32 images/s", "SC1 CLR trial (10M images), projected"
    from harness.trial.data import DataNotFoundError, load_dataset
    from harness.trial.loop import run_trial
    if not torch.cuda.is_available():
        return [Figure("P4", what_speed, None, "x", ">= 1", "not measured (no GPU)"),
                Figure("P4t", what_time, None, "min", "<= 5", "not measured (no GPU)")]
    try:
        load_dataset("cifar10", download=False)
    except DataNotFoundError:
        why = "not measured (CIFAR-10 not found; see README 'Data offline')"
        return [Figure("P4", what_speed, None, "x", ">= 1", why), Figure("P4t", what_time, None, "min", "<= 5", why)]
    base = TrialConfig.from_dict({
        "dataset": "cifar10", "model": "resnet56", "preprocess": "paper", "batch_size": 1000, "bn_batch": 125,
        "steps": warmup + steps, "eval_every": warmup + steps, "warmup_steps": warmup, "schedule": "constant",
        "max_lr": 0.1, "device": "cuda"})
    ips = {}
    for name, fast in (("fp32", {"precision": "fp32", "channels_last": False}), ("fast", {})):
        records: list[dict] = []
        run_trial(base.replace(**fast), lambda m, s: records.append(m))
        ips[name] = records[-1]["images_per_s"]
    gpu = torch.cuda.get_device_name(0)
    return [Figure("P4", what_speed, ips["fast"] / ips["fp32"], "x", ">= 1",
                   f"{gpu}: fp32 {ips['fp32']:.0f}, fast path (bf16 autocast, channels_last) {ips['fast']:.0f} "
                   f"images/s, batch 1000 as 8 micro-batches of 125"),
            Figure("P4t", what_time, SC1_IMAGES / ips["fast"] / 60, "min", "<= 5",
                   f"10,000 iterations x 1000 images at {ips['fast']:.0f} images/s on one {gpu}, evaluation excluded "
                   f"(the authors: about 6 hours on 8 GPUs)")]


# ----------------------------------------------------------------------------------------------- output
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def print_table(figures: list[Figure], out=None) -> None:
    out = out or sys.stdout
    print(f"{'figure':6s} {'what':62s} {'value':>12s} {'goal':>8s} {'met':>4s}", file=out)
    for f in figures:
        print(f"{f.name:6s} {f.what[:62]:62s} {f.shown():>12s} {f.goal:>8s} {f.met:>4s}", file=out)
    print(file=out)
    for f in figures:
        print(f"{f.name}: {f.detail}", file=out)


def write_csv(figures: list[Figure], path: Path, machine_line: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["figure", "what", "value", "unit", "goal", "met", "detail", "machine"])
        for f in figures:
            w.writerow([f.name, f.what, "" if f.value is None else f"{f.value:.6g}", f.unit, f.goal, f.met,
                        f.detail, machine_line])


# ----------------------------------------------------------------------------------------------- logging (older)
def bench_logging(steps: int, eval_every: int, repeats: int) -> None:
    """Training throughput of one trial with MLflow logging (a TrialLogger on a fresh sqlite store) vs none."""
    from harness.trial.loop import run_trial
    config = TrialConfig.from_dict({
        "dataset": "digits", "model": "resnet20", "preprocess": "paper", "batch_size": 125, "bn_batch": 125,
        "steps": steps, "eval_every": eval_every, "schedule": "one_cycle", "max_lr": 0.5, "base_lr": 0.05,
        "device": "cpu"})
    run_trial(config.replace(steps=2, eval_every=2, warmup_steps=1))  # warm-up: imports, allocator
    trains: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(repeats):
        for mode in ("off", "on"):
            reporter = mlflow_reporter(config) if mode == "on" else None
            trains[mode].append(run_trial(config, reporter)["train_seconds"])
    t_off, t_on = statistics.median(trains["off"]), statistics.median(trains["on"])
    print(f"resnet20 on digits, {steps} steps of 125, evaluation every {eval_every} steps, median of {repeats}: "
          f"training throughput with MLflow logging / without: {t_off / t_on:.3f}")


def mlflow_reporter(config: TrialConfig):
    """A reporter that logs every evaluation to a trial run of a fresh sqlite store, as rank 0 of a study does."""
    from harness.spec import Trial
    from harness.study import tracking
    uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
    exp = tracking.experiment_id(uri, "bench")
    parent = tracking.mlflow_client(uri).create_run(exp).info.run_id
    trial = Trial(study="bench", scale="smoke", workers=1, config=config)
    logger = tracking.TrialLogger(uri, tracking.find_or_create_trial_run(uri, exp, parent, trial), trial=trial)
    logger.start(1, tracking.system_tags(["localhost"]))
    return lambda metrics, state: logger.log_eval(metrics)


# ----------------------------------------------------------------------------------------------- main
FIGURES = ("P1", "P2", "P3", "P4", "P5")  # P3 brings P3w, P5 brings P5m and P5q: one Ray session measures them


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=("all", "logging"))
    p.add_argument("--only", help="comma-separated figures to measure, e.g. P1,P2 (default: all)")
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV to PATH (default: no CSV)")
    p.add_argument("--trials", type=int, default=16, help="trials in the smoke grid of P3/P5, and bare trials of "
                                                          "P3 (default 16)")
    p.add_argument("--quick-run", help="MLflow parent run id of a finished quick batch_size_effect study (P5)")
    p.add_argument("--tracking-uri", help="MLflow store of --quick-run (default as harness.study)")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds P3/P5's bare trials and smoke grid may take together (default 1800)")
    return p.parse_args(argv)


def measure(only: list[str], trials: int, timeout_s: float, quick_run: str | None,
            tracking_uri: str | None) -> list[Figure]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures: list[Figure] = []
    if "P1" in only:
        figures.append(p1_trial_vs_bare(device))
    if "P2" in only:
        figures.append(p2_augmentation())
    if "P3" in only or "P5" in only:
        figures += [f for f in p3_p5_smoke(trials, timeout_s) if f.name.rstrip("wm") in only]
    if "P5" in only:
        figures.append(p5_quick(tracking_uri, quick_run))
    if "P4" in only:
        figures += p4_gpu()
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.what == "logging":
        bench_logging(60, 5, 3)
        return 0
    only = [s.strip().upper() for s in args.only.split(",")] if args.only else list(FIGURES)
    if bad := [s for s in only if s not in FIGURES]:
        print(f"error: unknown figure {', '.join(bad)}; figures: {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    if args.trials < 1:
        print(f"error: --trials must be >= 1, got {args.trials}", file=sys.stderr)
        return 2
    machine_line = machine()
    print(f"machine: {machine_line}", flush=True)
    figures = measure(only, args.trials, args.timeout, args.quick_run, args.tracking_uri)
    print()
    print_table(figures)
    if args.csv:
        write_csv(figures, Path(args.csv), machine_line)
        print(f"\nCSV: {args.csv}")
    print(f"\nfigures as JSON: {json.dumps({f.name: f.value for f in figures})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
