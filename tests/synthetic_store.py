"""A small synthetic MLflow sqlite store with known outcomes, written by the harness's own writers.

Every study here is a study spec expanded by `harness.spec.trials` (so cells, names, keys and typed configs are
the harness's), its parent run comes from `tracking.start_study_run`, each trial's run from
`tracking.find_or_create_trial_run` and a `tracking.TrialLogger` (start / log_eval / finish), errors from
`tracking.mark_trial_error`. Only the numbers are made up: accuracy rises as sqrt(progress) to a chosen final
value; learning rate and momentum at each evaluation are the trial's schedule (`harness.trial.schedules.curve`).

Studies (experiment name = study name):
  super_convergence  quick  SC1   triangular 0.92 +- 0.005 vs multistep 0.85 +- 0.005, 4 seeds; CIFAR-10 ResNet-56
                                  batch 1000, the authors' setup (multistep max_lr 0.35: both reference logs
                                  overlay); plus an older smoke-scale parent run with 2 trials (for --run)
  batch_size_effect  quick  SC4,DA2  one_cycle at batch 256/512/1024 (paired max_lr, steps), 3 seeds: accuracy
                                  FALLS with batch (contradicted)
  momentum_effect    quick  SC9   triangular, constant momentum 0.8/0.9/0.95, 3 seeds, overlapping (inconclusive)
  weight_decay       quick  SC6   triangular, WD 1e-3 diverges (chance accuracy, no steps_to_target), 1e-4 0.92,
                                  1e-5 0.88, 3 seeds; plus one trial (WD 1e-6) that errored
  smoke_check        smoke  SC1,SC3  1 seed per schedule + one range test (pipeline check)
  in_progress        quick  SC1   one finished trial, one still running, one errored before it started
  empty_study        quick  -     a parent run without trials
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from harness import spec
from harness.config import TrialConfig
from harness.study import tracking
from harness.trial import schedules

EVAL_POINTS = 6
IMAGES_PER_S = 5000.0
SYSTEM_TAGS = {"sys.torch": "2.13.0", "sys.cuda": "none", "sys.gpu_model": "none", "sys.gpu_count": "0",
               "sys.hostnames": "synthetic", "sys.python": "3.11"}


@functools.lru_cache(maxsize=64)
def _schedule(config_json: str):
    cfg = TrialConfig.from_dict(json.loads(config_json))
    return schedules.curve(cfg).set_index("step")


def _lr_momentum(config: dict, step: int) -> tuple[float, float]:
    keep = {k: v for k, v in config.items() if k != "seed"}
    sched = _schedule(json.dumps(keep, sort_keys=True))
    row = sched.loc[min(step, len(sched) - 1)]
    return float(row["lr"]), float(row["momentum"])


def history(config: dict, final: float, status: str) -> list[dict]:
    """Evaluation records as harness.trial makes them; a diverged run stops at 60% with chance accuracy."""
    steps = config["steps"]
    last = int(steps * 0.6) if status == "diverged" else steps
    records = []
    for i in range(EVAL_POINTS):
        frac = i / (EVAL_POINTS - 1)
        step = round(last * frac)
        if status == "diverged":
            acc = 0.1 if i == EVAL_POINTS - 1 else 0.1 + 0.5 * frac
        else:
            acc = 0.1 + (final - 0.1) * frac ** 0.5
        loss = 87.3 if status == "diverged" and i == EVAL_POINTS - 1 else 2.3 * (1 - 0.8 * frac)
        lr, momentum = _lr_momentum(config, step)
        train_images = config["train_size"] or 50000
        records.append({"step": step, "epoch": step * config["batch_size"] / train_images, "lr": lr,
                        "momentum": momentum, "train_loss": loss, "test_loss": loss * 1.1, "test_acc": acc,
                        "images_per_s": IMAGES_PER_S, "train_seconds": step * config["batch_size"] / IMAGES_PER_S})
    return records


def summary(config: dict, records: list[dict], status: str) -> dict:
    """The summary harness.trial.loop.trial_summary computes from the same records."""
    reach = next((r for r in records if r["test_acc"] >= config["target_acc"]), None) \
        if status == "completed" else None
    last = records[-1]
    return {"status": status, "final_acc": last["test_acc"], "best_acc": max(r["test_acc"] for r in records),
            "reached_target": int(reach is not None), "steps_to_target": reach["step"] if reach else None,
            "seconds_to_target": reach["train_seconds"] if reach else None, "target_acc": config["target_acc"],
            "diverged_at_step": last["step"] if status == "diverged" else None, "steps_run": last["step"],
            "train_seconds": last["train_seconds"], "world_size": 1,
            "bn_batch": config["bn_batch"] or config["batch_size"], "accum_steps": 1}


class Builder:
    def __init__(self, folder: Path):
        self.folder = Path(folder).resolve()
        self.uri = f"sqlite:///{self.folder}/mlflow.db"

    def study(self, name: str, scale: str, claims: list[str], question: str, base: dict,
              paired: dict | None = None, grid: dict | None = None, analysis: list[dict] | None = None,
              deviations: list[str] | None = None) -> tuple[str, str, list[spec.Trial]]:
        """A parent run as `python -m harness.study` starts it; returns (experiment id, parent id, trials)."""
        body = {"name": name, "question": question, "claims": claims, "base": base, "paired": paired or {},
                "grid": grid or {}, "scales": {scale: {"deviations": deviations or []}},
                "analysis": {"comparisons": analysis or []}}
        resolved = spec.at_scale(body, scale)
        trials = spec.trials(body, scale)
        parent = tracking.start_study_run(
            self.uri, resolved, scale, f"/synthetic/ray_results/{name}-{scale}",
            f"python -m harness.study {name} --scale {scale}", {"CPU": 2.0}, "2x CPU", resume=False)
        time.sleep(0.002)  # start times order the parent runs ("latest")
        return tracking.experiment_id(self.uri, name), parent, trials

    def trial(self, exp_id: str, parent_id: str, trial: spec.Trial, final: float, status: str = "completed",
              error: str = "") -> str:
        run_id = tracking.find_or_create_trial_run(self.uri, exp_id, parent_id, trial)
        if status == "error" and not error.startswith("ValueError"):   # crashed while training
            tracking.TrialLogger(self.uri, run_id, trial=trial).start(1, SYSTEM_TAGS)
        if status == "error":
            tracking.mark_trial_error(self.uri, exp_id, parent_id, trial, error)
            return run_id
        logger = tracking.TrialLogger(self.uri, run_id, trial=trial)
        logger.start(1, SYSTEM_TAGS)
        config = trial.config.to_dict()
        records = history(config, final, "diverged" if status == "diverged" else "completed")
        if status == "running":
            records = records[:2]
        for r in records:
            logger.log_eval(r)
        if status != "running":
            logger.finish(summary(config, records, status), records)
        return run_id


SC1 = [{"claim": "SC1", "kind": "two_arm", "field": "schedule", "a": "triangular", "b": "multistep"}]
CIFAR = {"dataset": "cifar10", "model": "resnet56", "batch_size": 1000, "weight_decay": 1e-4, "momentum": 0.9,
         "eval_every": 100}
TRI = {"schedule": "triangular", "base_lr": 0.1, "max_lr": 3.0, "steps": 10000, "stepsize": 5000,
       "cycle_momentum": False}
PC = {"schedule": "multistep", "max_lr": 0.35, "steps": 80000, "milestones": [50000, 70000]}
JITTER = (-0.005, 0.0, 0.005, 0.0025)


def build(folder: Path) -> str:
    """Create the store in `folder`; returns its tracking URI."""
    folder.mkdir(parents=True, exist_ok=True)
    b = Builder(folder)

    # super_convergence: an older smoke parent, then the quick one (latest)
    exp, old, trials = b.study("super_convergence", "smoke", ["SC1"], "Does one CLR cycle beat PC-LR? (smoke)",
                               {**CIFAR, "target_acc": 0.9},
                               paired={"schedule": [{**TRI, "steps": 200, "stepsize": 100},
                                                    {**PC, "steps": 200, "milestones": [100, 150]}]}, analysis=SC1)
    for t in trials:
        b.trial(exp, old, t, final=0.3)
    exp, pid, trials = b.study(
        "super_convergence", "quick", ["SC1"],
        "Does one cycle of a large cyclical learning rate (0.1-3, 10k iterations) reach a higher test accuracy "
        "than the piecewise-constant schedule in 1/8 of its iterations?", {**CIFAR, "target_acc": 0.9},
        paired={"schedule": [TRI, PC]}, grid={"seed": [0, 1, 2, 3]}, analysis=SC1,
        deviations=["synthetic numbers: accuracy rises as sqrt(progress) to a chosen final value"])
    for t in trials:
        mean = 0.92 if t.config.schedule == "triangular" else 0.85
        b.trial(exp, pid, t, final=mean + JITTER[t.config.seed])

    # batch_size_effect: contradicted (accuracy falls with batch)
    exp, pid, trials = b.study(
        "batch_size_effect", "quick", ["SC4", "DA2"], "Under 1cycle, does a larger total batch give a higher final "
        "accuracy?", {"dataset": "digits", "model": "small_cnn", "schedule": "one_cycle", "eval_every": 50,
                      "target_acc": 0.85},
        paired={"cell": [{"batch_size": 256, "max_lr": 0.4, "base_lr": 0.04, "steps": 400},
                         {"batch_size": 512, "max_lr": 0.6, "base_lr": 0.06, "steps": 300},
                         {"batch_size": 1024, "max_lr": 1.0, "base_lr": 0.1, "steps": 200}]},
        grid={"seed": [0, 1, 2]},
        analysis=[{"claim": "SC4", "kind": "trend", "field": "batch_size", "a": "max", "b": "min"},
                  {"claim": "DA2", "kind": "two_arm", "field": "batch_size", "a": "max", "b": "min",
                   "equal_time": True}])
    for t in trials:
        acc = {256: 0.90, 512: 0.88, 1024: 0.86}[t.config.batch_size]
        b.trial(exp, pid, t, final=acc + JITTER[t.config.seed] / 2)

    # momentum_effect: overlapping -> inconclusive
    exp, pid, trials = b.study("momentum_effect", "quick", ["SC9"], "Is constant momentum 0.85-0.9 best with CLR?",
                               {**CIFAR, **TRI, "steps": 1000, "stepsize": 500, "target_acc": 0.9},
                               grid={"momentum": [0.8, 0.9, 0.95], "seed": [0, 1, 2]},
                               analysis=[{"claim": "SC9", "kind": "best_level", "field": "momentum", "a": 0.9}])
    accs = {0.8: (0.901, 0.909, 0.893), 0.9: (0.905, 0.895, 0.912), 0.95: (0.898, 0.907, 0.902)}
    for t in trials:
        b.trial(exp, pid, t, final=accs[t.config.momentum][t.config.seed])

    # weight_decay: 1e-3 diverges; WD 1e-6 errored on its first seed (its other seeds never ran)
    exp, pid, trials = b.study("weight_decay", "quick", ["SC6"], "Is WD 1e-4 best under CLR 0.1-3?",
                               {**CIFAR, **TRI, "steps": 1000, "stepsize": 500, "target_acc": 0.9},
                               grid={"weight_decay": [1e-3, 1e-4, 1e-5, 1e-6], "seed": [0, 1, 2]},
                               analysis=[{"claim": "SC6", "kind": "best_level", "field": "weight_decay", "a": 1e-4}])
    for t in trials:
        wd, seed = t.config.weight_decay, t.config.seed
        if wd == 1e-6:
            if seed == 0:
                b.trial(exp, pid, t, final=0.0, status="error", error="RuntimeError: CUDA out of memory (synthetic)")
            continue
        acc = {1e-3: 0.1, 1e-4: 0.92, 1e-5: 0.88}[wd]
        b.trial(exp, pid, t, final=acc + JITTER[seed] / 2, status="diverged" if wd == 1e-3 else "completed")

    # smoke_check: pipeline check only
    small = {"dataset": "digits", "model": "small_cnn", "batch_size": 64, "eval_every": 20, "target_acc": 0.5,
             "steps": 40}
    exp, pid, trials = b.study("smoke_check", "smoke", ["SC1", "SC3"], "Does the pipeline run end to end?", small,
                               paired={"schedule": [{"schedule": "one_cycle", "max_lr": 1.0},
                                                    {"schedule": "multistep", "max_lr": 0.1, "milestones": [30]},
                                                    {"schedule": "range_test", "base_lr": 0.0, "max_lr": 3.0}]},
                               analysis=[{"claim": "SC1", "kind": "two_arm", "field": "schedule", "a": "one_cycle",
                                          "b": "multistep"},
                                         {"claim": "SC3", "kind": "range_test", "field": "schedule",
                                          "where": {"schedule": "range_test"}}])
    for t in trials:
        b.trial(exp, pid, t, final={"one_cycle": 0.6, "multistep": 0.4, "range_test": 0.55}[t.config.schedule])

    # in_progress: one finished trial, one still running (no harness.status yet), one that failed to start
    exp, pid, trials = b.study("in_progress", "quick", ["SC1"], "A study still running.",
                               {**small, "schedule": "one_cycle", "max_lr": 1.0}, grid={"seed": [0, 1, 2]})
    b.trial(exp, pid, trials[0], final=0.6)
    b.trial(exp, pid, trials[1], final=0.5, status="running")
    b.trial(exp, pid, trials[2], final=0.0, status="error", error="ValueError: worker could not start")

    b.study("empty_study", "quick", ["SC1"], "A study whose trials never started.", small)
    return b.uri


@functools.lru_cache(maxsize=1)
def synthetic_uri() -> str:
    """Build the store once per test process (5-10 s) in a temporary folder (in memory where possible)."""
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="harness-synthetic-", dir=shm if os.access(shm, os.W_OK) else None))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    t0 = time.perf_counter()
    uri = build(folder)
    synthetic_uri.build_seconds = time.perf_counter() - t0
    return uri


if __name__ == "__main__":
    import sys
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "synthetic-store")))
