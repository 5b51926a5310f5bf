"""`python -m harness.bench`: the harness's performance figures, each beside its goal, as a table and a CSV.

    P1  harness trial throughput / a bare PyTorch loop (same model, batch, data, device, fast path; no Ray, no
        MLflow, no reporter): ResNet-20 at batch 125, warm-up and evaluation left out            goal >= 0.97
    P2  device-resident batch augmentation (harness.data.TrainBatches) / a torchvision DataLoader with per-sample
        transforms.v2 of the same augmentation (pad-4 crop + mirror), images/s on CPU               goal >= 10
    P3  orchestration overhead per trial: Tune trial start -> first optimizer step (`startup_seconds`), median
        over the trials of a smoke grid of 2-worker CPU trials, Ray dashboard on                    goal <= 8 s
    P5  study wall time / the sum of its trials' own compute (a trial's MLflow run from its first step to its
        end: training, evaluation, logging), for that smoke grid and for a quick batch_size_effect run that
        --quick-run names (too long to run here)                                                      goal <= 1.25
    P4  (GPU only) ResNet-56 paper trial (batch 1000, BN over 125) images/s, fast path / fp32, and the projected
        time of the SC1 CLR trial (10,000 iterations of 1000 = 10M images) on this GPU               goal <= 5 min

Figures are ratios measured in one run on one machine; a figure that was not measured says so, never a guess.
`python -m harness.bench logging` is the older MLflow-logging on/off throughput comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
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
from harness.trial.data import DataNotFoundError, TrainBatches, load_dataset
from harness.trial.loop import run_trial
from harness.trial.models import build_model
from harness.trial.step import FastPath

REPO = REPO_ROOT
SC1_IMAGES = 10_000 * 1000  # the SC1 CLR trial: 10k iterations at batch 1000


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
    dataset, size = bench_dataset()
    config = {"dataset": dataset, "train_size": size, "model": "resnet20", "preprocess": "paper", "batch_size": 125,
              "steps": warmup + steps, "eval_every": warmup + steps, "warmup_steps": warmup, "schedule": "constant",
              "max_lr": 0.05, "momentum": 0.9, "device": device.type}
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


def bare_loop(config: dict, device: torch.device, steps: int, warmup: int) -> float:
    """The loop anyone would write: random batches from the on-device tensors, a random mirror, forward, backward,
    SGD step. Same model, batch, data, device, precision and memory format as the trial; images/s after warm-up."""
    cfg = TrialConfig.from_dict(config)
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
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    dataset, size = bench_dataset()
    ds = load_dataset(dataset, train_size=size, preprocess="standard", device="cpu")  # pad-4 crop + mirror
    tb = TrainBatches(ds, 125, seed=0)
    tb.get(0)
    t0 = time.perf_counter()
    for step in range(1, batches + 1):
        x, y = tb.get(step)
    ours = batches * 125 / (time.perf_counter() - t0)

    hw = ds.image_size
    transform = v2.Compose([v2.RandomCrop(hw, padding=4), v2.RandomHorizontalFlip()])

    class Augmented(Dataset):
        def __len__(self):
            return len(ds.train_y)

        def __getitem__(self, i):
            return transform(ds.train_x[i]), ds.train_y[i]

    loader = DataLoader(Augmented(), batch_size=125, shuffle=True, num_workers=0, drop_last=True)
    it = iter(loader)
    next(it)
    seen, t0 = 0, time.perf_counter()
    while seen < loader_images:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        seen += len(y)
    theirs = seen / (time.perf_counter() - t0)
    return Figure("P2", "device-resident batch augmentation / DataLoader + per-sample v2, images/s", ours / theirs,
                  "x", ">= 10", f"pad-4 crop + mirror of {dataset} {hw}x{hw}, batch 125, CPU: harness {ours:.0f}, "
                  f"torchvision DataLoader (num_workers=0) {theirs:.0f} images/s")


# ----------------------------------------------------------------------------------------------- P3, P5
def smoke_grid_study(folder: Path, trials: int) -> Path:
    """batch_size_effect's smoke scale (4 cells of 2-worker CPU trials) with enough seeds for `trials` trials."""
    import yaml
    spec = yaml.safe_load((REPO / "studies" / "batch_size_effect.yaml").read_text())
    cells = len(spec["scales"]["smoke"]["paired"]["cell"])
    spec["name"] = "bench_smoke_grid"
    spec["scales"]["smoke"]["grid"] = {"seed": list(range(max(1, trials // cells)))}
    path = folder / "bench_smoke_grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


PHASES = ("process_created", "imported", "loop_entered", "hostnames_gathered", "mlflow_started", "first_step")
PHASE_TEXT = {"process_created": "Train worker process exists (Train controller started it)",
              "imported": "torch, ray.train.torch and the harness imported in it",
              "loop_entered": "train loop entered (gloo process group set up)",
              "hostnames_gathered": "checkpoint looked up, host names gathered over gloo",
              "mlflow_started": "rank 0's MLflow run opened and its params logged",
              "first_step": "data, model, DDP, optimizer built; first step done"}


def run_smoke_grid(trials: int, timeout_s: float) -> tuple[str | None, str, str, Path]:
    """Run the smoke grid through `python -m harness.study` (Ray Tune, Train, MLflow, dashboard on) in a fresh
    folder, each Train worker logging its start-up phases; return (parent run id or None, tracking uri, why-not,
    the phase log)."""
    folder = Path(tempfile.mkdtemp(prefix="harness-bench-"))
    uri = f"sqlite:///{folder}/mlflow.db"
    study = smoke_grid_study(folder, trials)
    cmd = [sys.executable, "-m", "harness.study", str(study), "--scale", "smoke", "--tracking-uri", uri,
           "--storage", str(folder / "ray_results")]
    profile = folder / "startup_phases.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HARNESS_STARTUP_PROFILE": str(profile)}
    try:
        done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, uri, f"the study ran past {timeout_s:.0f} s", profile
    if done.returncode != 0:
        return None, uri, f"the study exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", profile
    return study_parent_run(uri, "bench_smoke_grid"), uri, "", profile


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


def study_parent_run(uri: str, study: str) -> str | None:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`harness.role` = 'study'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def study_timing(uri: str, parent_run_id: str) -> dict:
    """From MLflow: the study's wall time (its parent run), each trial's startup_seconds and own compute (its run
    from the first optimizer step to its end: the run opens at the Tune trial's start, startup_seconds later the
    first step happens)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    if parent.info.end_time is None:
        raise ValueError(f"study run {parent_run_id} has not finished")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=5000)
    startups, compute = [], []
    for run in children:
        start = run.data.metrics.get("startup_seconds")
        if start is None or run.info.end_time is None:
            continue  # resumed or errored: no clean start-up figure
        startups.append(start)
        compute.append((run.info.end_time - run.info.start_time) / 1000 - start)
    if not compute:
        raise ValueError(f"study run {parent_run_id} has no finished trial with startup_seconds")
    return {"study": parent.data.tags.get("harness.study", "?"), "scale": parent.data.tags.get("harness.scale", "?"),
            "wall_s": (parent.info.end_time - parent.info.start_time) / 1000, "trials": len(children),
            "startups": startups, "compute_s": sum(compute)}


def p3_p5_smoke(trials: int, timeout_s: float) -> list[Figure]:
    t0 = time.time()
    parent, uri, why, profile = run_smoke_grid(trials, timeout_s)
    for line in startup_profile(profile):
        print(f"P3 profile | {line}", flush=True)
    if parent is None:
        return [Figure("P3", "Tune trial start -> first step, median", None, "s", "<= 8", why),
                Figure("P5", "smoke grid: study wall / trials' own compute", None, "", "<= 1.25", why)]
    t = study_timing(uri, parent)
    s = sorted(t["startups"])
    return [
        Figure("P3", "Tune trial start -> first step, median", statistics.median(s), "s", "<= 8",
               f"{len(s)} trials of 2 gloo CPU workers, dashboard on; min {s[0]:.1f}, max {s[-1]:.1f} s"),
        Figure("P5", "smoke grid: study wall / trials' own compute", t["wall_s"] / t["compute_s"], "", "<= 1.25",
               f"{t['trials']} trials: study {t['wall_s']:.0f} s, trials' own compute {t['compute_s']:.1f} s "
               f"(bench wall {time.time() - t0:.0f} s)"),
    ]


def p5_quick(uri: str | None, run_id: str | None) -> Figure:
    what = "quick batch_size_effect: study wall / trials' own compute"
    if not run_id:
        return Figure("P5q", what, None, "", "<= 1.25", "not measured: run the quick study first "
                      "(python -m harness.study batch_size_effect --scale quick), then pass --quick-run RUN_ID")
    from harness.study import tracking
    uri = tracking.resolve_tracking_uri(uri)
    try:
        t = study_timing(uri, run_id)
    except Exception as e:  # an unknown run id, an unfinished run: say so, no figure
        return Figure("P5q", what, None, "", "<= 1.25", f"run {run_id} in {uri}: {' '.join(str(e).split())[:200]}")
    median_start = statistics.median(t["startups"])
    return Figure("P5q", what, t["wall_s"] / t["compute_s"], "", "<= 1.25",
                  f"MLflow run {run_id} ({t['study']}, {t['scale']}): {t['trials']} trials, study {t['wall_s']:.0f} s,"
                  f" trials' own compute {t['compute_s']:.0f} s, median start-up {median_start:.1f} s")


# ----------------------------------------------------------------------------------------------- P4
def p4_gpu(steps: int = 30, warmup: int = 5) -> list[Figure]:
    what_speed, what_time = "ResNet-56 paper trial: fast path / fp32 images/s", "SC1 CLR trial (10M images), projected"
    if not torch.cuda.is_available():
        return [Figure("P4", what_speed, None, "x", ">= 1", "not measured (no GPU)"),
                Figure("P4t", what_time, None, "min", "<= 5", "not measured (no GPU)")]
    try:
        load_dataset("cifar10", download=False)
    except DataNotFoundError:
        why = "not measured (CIFAR-10 not found; see README 'Data offline')"
        return [Figure("P4", what_speed, None, "x", ">= 1", why), Figure("P4t", what_time, None, "min", "<= 5", why)]
    base = {"dataset": "cifar10", "model": "resnet56", "preprocess": "paper", "batch_size": 1000, "bn_batch": 125,
            "steps": warmup + steps, "eval_every": warmup + steps, "warmup_steps": warmup, "schedule": "constant",
            "max_lr": 0.1, "device": "cuda"}
    ips = {}
    for name, fast in (("fp32", {"precision": "fp32", "channels_last": False}), ("fast", {})):
        records: list[dict] = []
        run_trial({**base, **fast}, lambda m, s: records.append(m))
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
    from harness.study import tracking
    config = {"dataset": "digits", "model": "resnet20", "preprocess": "paper", "batch_size": 125, "bn_batch": 125,
              "steps": steps, "eval_every": eval_every, "schedule": "one_cycle", "max_lr": 0.5, "base_lr": 0.05,
              "device": "cpu"}
    run_trial({**config, "steps": 2, "eval_every": 2})  # warm-up: imports, allocator
    trains: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(repeats):
        for mode in ("off", "on"):
            reporter = None
            if mode == "on":
                d = tempfile.mkdtemp()
                uri = f"sqlite:///{d}/mlflow.db"
                exp = tracking.experiment_id(uri, "bench")
                parent = tracking.mlflow_client(uri).create_run(exp).info.run_id
                run_id = tracking.find_or_create_trial_run(uri, exp, parent, {"key": "k", "name": "bench",
                                                                                "study": "bench", "scale": "smoke",
                                                                                "cell": "all"})
                logger = tracking.TrialLogger(uri, run_id)
                logger.start(config, 1, tracking.system_tags(["localhost"]))

                def reporter(metrics, state, logger=logger):
                    logger.log_eval(metrics)
            trains[mode].append(run_trial(config, reporter)["train_seconds"])
    t_off, t_on = statistics.median(trains["off"]), statistics.median(trains["on"])
    print(f"resnet20 on digits, {steps} steps of 125, evaluation every {eval_every} steps, median of {repeats}: "
          f"training throughput with MLflow logging / without: {t_off / t_on:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=("all", "logging"))
    p.add_argument("--only", help="comma-separated figures to measure, e.g. P1,P2 (default: all)")
    p.add_argument("--csv", default="bench.csv", help="where the table goes as CSV (default ./bench.csv)")
    p.add_argument("--trials", type=int, default=16, help="trials in the smoke grid of P3/P5 (default 16)")
    p.add_argument("--quick-run", help="MLflow parent run id of a finished quick batch_size_effect study (P5)")
    p.add_argument("--tracking-uri", help="MLflow store of --quick-run (default as harness.study)")
    p.add_argument("--timeout", type=float, default=900, help="seconds the smoke grid may take (default 900)")
    args = p.parse_args(argv)
    if args.what == "logging":
        bench_logging(60, 5, 3)
        return 0
    known = ("P1", "P2", "P3", "P4", "P5")
    only = [s.strip().upper() for s in args.only.split(",")] if args.only else list(known)
    if bad := [s for s in only if s not in known]:
        print(f"error: unknown figure {', '.join(bad)}; figures: {', '.join(known)}", file=sys.stderr)
        return 2
    if args.trials < 1:
        print(f"error: --trials must be >= 1, got {args.trials}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine_line = machine()
    print(f"machine: {machine_line}", flush=True)
    figures: list[Figure] = []
    if "P1" in only:
        figures.append(p1_trial_vs_bare(device))
    if "P2" in only:
        figures.append(p2_augmentation())
    if "P3" in only or "P5" in only:
        figures += [f for f in p3_p5_smoke(args.trials, args.timeout) if f.name in only]
    if "P5" in only:
        figures.append(p5_quick(args.tracking_uri, args.quick_run))
    if "P4" in only:
        figures += p4_gpu()
    print()
    print_table(figures)
    write_csv(figures, Path(args.csv), machine_line)
    print(f"\nCSV: {args.csv}; figures as JSON: {json.dumps({f.name: f.value for f in figures})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
