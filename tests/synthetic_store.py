"""A small synthetic MLflow sqlite store with known outcomes, in the exact schema of harness/tracking.py.

Studies (experiment name = study name):
  super_convergence  quick  SC1   triangular 0.92 +- 0.005 (reaches 0.9) vs multistep 0.85 +- 0.005 (misses),
                                  4 seeds; CIFAR-10 ResNet-56 batch 1000, the authors' setup (reference overlay);
                                  plus an older smoke-scale parent run with 2 trials (for --run)
  batch_size_effect  quick  SC4,DA2  one_cycle at batch 256/512/1024 (paired max_lr, steps), 3 seeds: accuracy
                                  FALLS with batch (contradicted)
  momentum_effect    quick  SC9   triangular, constant momentum 0.8/0.9/0.95, 3 seeds, overlapping (inconclusive)
  weight_decay       quick  SC6   triangular, WD 1e-3 diverges (chance accuracy, no steps_to_target), 1e-4 0.92,
                                  1e-5 0.88, 3 seeds; plus one errored trial
  smoke_check        smoke  SC1,SC3  1 seed per schedule + one range test (pipeline check)
  in_progress        quick  SC1   one finished trial, one still running, one errored before logging any param
  empty_study        quick  -     a parent run without trials
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from harness.config import TrialConfig

T0 = 1_760_000_000_000  # ms; fixed start times make "latest" deterministic
EVAL_POINTS = 5


def _params(cfg: dict) -> dict[str, str]:
    out = {k: (json.dumps(v) if isinstance(v, (list, tuple)) else str(v)) for k, v in cfg.items()}
    out["workers"] = "1"
    return out


def _lr(cfg: dict, step: int) -> float:
    s, base, peak, total = cfg["schedule"], cfg["base_lr"], cfg["max_lr"], cfg["steps"]
    ss = cfg["stepsize"] or total // 2
    if s == "multistep":
        return base * cfg["gamma"] ** sum(step >= m for m in cfg["milestones"])
    if s == "range_test":
        return base + (peak - base) * step / total
    if step <= ss:
        return base + (peak - base) * step / ss
    if step <= 2 * ss:
        return peak - (peak - base) * (step - ss) / ss
    return base / (cfg["final_div"] if s.startswith("one_cycle") else 1)


def _momentum(cfg: dict, step: int) -> float:
    if not cfg["cycle_momentum"] or cfg["schedule"] in ("multistep", "constant", "range_test"):
        return cfg["momentum"]
    ss = cfg["stepsize"] or cfg["steps"] // 2
    hi, lo = cfg["max_momentum"], cfg["min_momentum"]
    if step <= ss:
        return hi - (hi - lo) * step / ss
    if step <= 2 * ss:
        return lo + (hi - lo) * (step - ss) / ss
    return hi


class Builder:
    def __init__(self, folder: Path):
        from mlflow.tracking import MlflowClient
        self.folder = Path(folder).resolve()
        self.uri = f"sqlite:///{self.folder}/mlflow.db"
        self.client = MlflowClient(self.uri)
        self.clock = T0

    def _tick(self) -> int:
        self.clock += 1000
        return self.clock

    def parent(self, study: str, scale: str, claims: str, question: str) -> tuple[str, str]:
        exp = self.client.get_experiment_by_name(study)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            study, artifact_location=(self.folder / "mlruns" / study).as_uri())   # artifacts beside the store
        tags = {"harness.role": "study", "harness.study": study, "harness.scale": scale, "harness.claims": claims,
                "harness.question": question, "harness.git_commit": "0123456789abcdef0123456789abcdef01234567",
                "harness.git_dirty": "false", "harness.version": "0.1.0",
                "harness.command": f"python -m harness.study {study} --scale {scale}",
                "harness.ray_resources": json.dumps({"CPU": 2.0}), "harness.hardware": "2x CPU"}
        run = self.client.create_run(exp_id, run_name=f"{study}-{scale}", tags=tags, start_time=self._tick())
        self.client.log_text(run.info.run_id, f"name: {study}\n", "study_spec.yaml")
        return exp_id, run.info.run_id

    def trial(self, exp_id: str, parent_id: str, study: str, scale: str, varying: dict, config: dict,
              final: float, status: str = "completed", reach_at: float | None = None, error: str = "") -> str:
        from mlflow.entities import Metric, Param, RunTag
        cfg = TrialConfig.from_dict(config).to_dict()
        cell = ",".join(f"{k}={cfg[k]}" for k in varying if k != "seed") or "all"
        name = "-".join(f"{k}{cfg[k]}" for k in varying) or "trial"
        key = hashlib.sha1(json.dumps([study, scale, cfg], sort_keys=True).encode()).hexdigest()[:16]
        tags = {"mlflow.parentRunId": parent_id, "harness.role": "trial", "harness.study": study,
                "harness.scale": scale, "harness.trial_key": key, "harness.cell": cell}
        run_id = self.client.create_run(exp_id, run_name=name, tags=tags, start_time=self._tick()).info.run_id
        sys_tags = [RunTag("sys.torch", "2.13.0"), RunTag("sys.cuda", "none"), RunTag("sys.gpu_model", "none"),
                    RunTag("sys.gpu_count", "0"), RunTag("sys.hostnames", "synthetic")]
        params = [Param(k, v) for k, v in _params(cfg).items()]
        if status == "error":
            self.client.log_batch(run_id, params=params, tags=[*sys_tags, RunTag("harness.status", "error"),
                                                               RunTag("harness.error", error)])
            self.client.set_terminated(run_id, "FAILED", end_time=self._tick())
            return run_id
        steps = cfg["steps"]
        last = int(steps * 0.6) if status == "diverged" else steps
        points = [round(last * i / (EVAL_POINTS - 1)) for i in range(EVAL_POINTS)]
        ts = self._tick()
        metrics, best = [], 0.0
        for i, step in enumerate(points):
            frac = i / (EVAL_POINTS - 1)
            if status == "diverged":
                acc = 0.1 if i == EVAL_POINTS - 1 else 0.1 + 0.5 * frac
            else:
                acc = 0.1 + (final - 0.1) * frac ** 0.5
            best = max(best, acc)
            loss = 2.3 * (1 - 0.8 * frac) if status != "diverged" or i < EVAL_POINTS - 1 else 87.3
            vals = {"epoch": step * cfg["batch_size"] / 50000, "lr": _lr(cfg, step), "momentum": _momentum(cfg, step),
                    "train_loss": loss, "test_loss": loss * 1.1, "test_acc": acc, "images_per_s": 5000.0,
                    "train_seconds": step * cfg["batch_size"] / 5000.0}
            metrics += [Metric(k, float(v), ts, step) for k, v in vals.items()]
        summary = {"final_acc": acc, "best_acc": best, "reached_target": 0.0, "target_acc": cfg["target_acc"],
                   "world_size": 1.0, "bn_batch": float(cfg["bn_batch"] or cfg["batch_size"]), "accum_steps": 1.0,
                   "steps_run": float(last)}
        if reach_at is not None and status == "completed":
            summary.update(reached_target=1.0, steps_to_target=float(round(reach_at)),
                           seconds_to_target=reach_at * cfg["batch_size"] / 5000.0)
        if status == "diverged":
            summary["diverged_at_step"] = float(last)
        metrics += [Metric(k, float(v), ts, last) for k, v in summary.items()]
        self.client.log_batch(run_id, metrics=metrics, params=params,
                              tags=[*sys_tags, RunTag("harness.status", status)])
        self.client.set_terminated(run_id, "FINISHED", end_time=self._tick())
        return run_id


CIFAR = {"dataset": "cifar10", "model": "resnet56", "batch_size": 1000, "weight_decay": 1e-4, "momentum": 0.9,
         "eval_every": 100, "target_acc": 0.9}
TRI = {"schedule": "triangular", "base_lr": 0.1, "max_lr": 3.0, "steps": 10000, "stepsize": 5000,
       "cycle_momentum": False}
PC = {"schedule": "multistep", "base_lr": 0.35, "steps": 80000, "milestones": [50000, 70000]}
JITTER = (-0.005, 0.0, 0.005, 0.0025)


def build(folder: Path) -> str:
    """Create the store in `folder`; returns its tracking URI."""
    folder.mkdir(parents=True, exist_ok=True)
    b = Builder(folder)

    # super_convergence: an older smoke parent, then the quick one (latest)
    exp, old = b.parent("super_convergence", "smoke", "SC1", "Does one CLR cycle beat PC-LR? (smoke)")
    for sched in (TRI, PC):
        b.trial(exp, old, "super_convergence", "smoke", ["schedule", "seed"],
                {**CIFAR, **sched, "steps": 200, "stepsize": 100 if sched is TRI else None,
                 "milestones": [100, 150] if sched is PC else [], "seed": 0}, final=0.3)
    exp, pid = b.parent("super_convergence", "quick", "SC1",
                        "Does one cycle of a large cyclical learning rate (0.1-3, 10k iterations) reach a higher "
                        "test accuracy than the piecewise-constant schedule in 1/8 of its iterations?")
    for seed in range(4):
        b.trial(exp, pid, "super_convergence", "quick", ["schedule", "seed"], {**CIFAR, **TRI, "seed": seed},
                final=0.92 + JITTER[seed], reach_at=9500 + 100 * seed)
        b.trial(exp, pid, "super_convergence", "quick", ["schedule", "seed"], {**CIFAR, **PC, "seed": seed},
                final=0.85 + JITTER[seed])

    # batch_size_effect: contradicted (accuracy falls with batch)
    exp, pid = b.parent("batch_size_effect", "quick", "SC4,DA2",
                        "Under 1cycle, does a larger total batch give a higher final accuracy?")
    for bs, lr, steps, acc in ((256, 0.4, 400, 0.90), (512, 0.6, 300, 0.88), (1024, 1.0, 200, 0.86)):
        for seed in range(3):
            b.trial(exp, pid, "batch_size_effect", "quick", ["batch_size", "max_lr", "steps", "seed"],
                    {"dataset": "digits", "model": "small_cnn", "schedule": "one_cycle", "batch_size": bs,
                     "max_lr": lr, "base_lr": lr / 10, "steps": steps, "seed": seed, "eval_every": 50,
                     "target_acc": 0.85}, final=acc + JITTER[seed] / 2, reach_at=steps * 0.7)

    # momentum_effect: overlapping -> inconclusive
    exp, pid = b.parent("momentum_effect", "quick", "SC9", "Is constant momentum 0.85-0.9 best with CLR?")
    accs = {0.8: (0.901, 0.909, 0.893), 0.9: (0.905, 0.895, 0.912), 0.95: (0.898, 0.907, 0.902)}
    for mom, values in accs.items():
        for seed, acc in enumerate(values):
            b.trial(exp, pid, "momentum_effect", "quick", ["momentum", "seed"],
                    {**CIFAR, **TRI, "steps": 1000, "stepsize": 500, "momentum": mom, "seed": seed}, final=acc)

    # weight_decay: 1e-3 diverges; one errored trial
    exp, pid = b.parent("weight_decay", "quick", "SC6", "Is WD 1e-4 best under CLR 0.1-3?")
    for wd, acc in ((1e-3, 0.1), (1e-4, 0.92), (1e-5, 0.88)):
        for seed in range(3):
            b.trial(exp, pid, "weight_decay", "quick", ["weight_decay", "seed"],
                    {**CIFAR, **TRI, "steps": 1000, "stepsize": 500, "weight_decay": wd, "seed": seed},
                    final=acc + JITTER[seed] / 2, status="diverged" if wd == 1e-3 else "completed",
                    reach_at=800 if wd == 1e-4 else None)
    b.trial(exp, pid, "weight_decay", "quick", ["weight_decay", "seed"],
            {**CIFAR, **TRI, "steps": 1000, "stepsize": 500, "weight_decay": 1e-6, "seed": 0}, final=0.0,
            status="error", error="RuntimeError: CUDA out of memory (synthetic)")

    # smoke_check: pipeline check only
    exp, pid = b.parent("smoke_check", "smoke", "SC1,SC3", "Does the pipeline run end to end?")
    small = {"dataset": "digits", "model": "small_cnn", "batch_size": 64, "eval_every": 20, "target_acc": 0.5}
    b.trial(exp, pid, "smoke_check", "smoke", ["schedule", "seed"],
            {**small, "schedule": "one_cycle", "max_lr": 1.0, "steps": 40, "seed": 0}, final=0.6, reach_at=30)
    b.trial(exp, pid, "smoke_check", "smoke", ["schedule", "seed"],
            {**small, "schedule": "multistep", "base_lr": 0.1, "steps": 40, "milestones": [30], "seed": 0},
            final=0.4)
    b.trial(exp, pid, "smoke_check", "smoke", ["schedule", "seed"],
            {**small, "schedule": "range_test", "base_lr": 0.0, "max_lr": 3.0, "steps": 40, "seed": 0}, final=0.55)

    # in_progress: one finished trial, one still running (no harness.status yet), one that failed to start
    exp, pid = b.parent("in_progress", "quick", "SC1", "A study still running.")
    cfg = {**small, "schedule": "one_cycle", "max_lr": 1.0, "steps": 40}
    b.trial(exp, pid, "in_progress", "quick", ["schedule", "seed"], {**cfg, "seed": 0}, final=0.6, reach_at=30)
    running = b.trial(exp, pid, "in_progress", "quick", ["schedule", "seed"], {**cfg, "seed": 1}, final=0.5)
    b.client.delete_tag(running, "harness.status")
    b.client.update_run(running, status="RUNNING")
    failed = b.client.create_run(exp, run_name="never-started", start_time=b._tick(), tags={
        "mlflow.parentRunId": pid, "harness.role": "trial", "harness.study": "in_progress", "harness.scale": "quick",
        "harness.trial_key": "deadbeef", "harness.cell": "schedule=one_cycle"}).info.run_id
    b.client.set_tag(failed, "harness.status", "error")
    b.client.set_tag(failed, "harness.error", "ValueError: worker could not start")
    b.client.set_terminated(failed, "FAILED")

    b.parent("empty_study", "quick", "SC1", "A study whose trials never started.")
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
