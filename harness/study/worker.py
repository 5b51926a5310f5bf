"""One worker of a trial: `train_loop_per_worker`, which harness.study.driver's TorchTrainer runs on every DDP
rank of a trial of several workers, and `run_in_trial`, a one-worker trial run in Tune's trainable itself.

    rank r: run_trial(config) with a reporter that
      - ray.train.report()s every evaluation (rank 0 attaches a checkpoint: a lost worker resumes from it);
        one worker: ray.tune.report()s it, with the checkpoint, straight from the Tune trial
      - logs to the trial's MLflow run (rank 0, one batched call per evaluation, buffered through outages)
    and returns the trial's summary (Train's Result.return_value), which the driver hands to Tune.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import ray.tune
import torch
import torch.distributed as dist

from harness import names
from harness.spec import Trial
from harness.study import tracking
from harness.study.console import quiet_worker
from harness.trial.loop import run_trial

CHECKPOINT_FILE = "trial_state.pt"
PROFILE_ENV = "HARNESS_STARTUP_PROFILE"  # a file: each rank appends its start-up phases (wall clock) as a JSON line
IMPORTED = time.time()  # this module imported (torch and ray.train.torch with it)


def _profile(phases: dict, **extra) -> None:
    path = os.environ.get(PROFILE_ENV)
    if path:
        import psutil
        with open(path, "a") as f:
            record = {"process_created": psutil.Process().create_time(), "imported": IMPORTED, **phases, **extra}
            f.write(json.dumps(record) + "\n")


def train_loop_per_worker(loop_config: dict) -> dict:
    """One Ray Train rank of a trial of several workers (the TorchTrainer that harness.study.driver builds)."""
    phases = {"driver_started": loop_config["driver_started_at"], "loop_entered": time.time()}
    dynamo = _import_dynamo()
    # Ray Train V2 logs "Reporting training result ..." at INFO to a logger named by its source file, which the
    # RunConfig's LoggingConfig level (it filters "ray.train.*") does not reach: INFO lines go to the study's log.
    quiet_worker(loop_config.get("harness_log"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    hostnames = [socket.gethostname()]
    if world > 1:
        hostnames = [None] * world
        dist.all_gather_object(hostnames, socket.gethostname())
    raw = ray.get(loop_config["raw_data"]) if loop_config.get("raw_data") is not None else None
    return run_rank(loop_config, phases, dynamo, rank=rank, world=world, hostnames=hostnames,
                    device=ray.train.torch.get_device(), raw=raw,
                    resume=_load(ray.train.get_checkpoint()), report=(ray.train.report, ray.train.Checkpoint))


def run_in_trial(loop_config: dict, raw) -> dict:
    """A trial of one worker, in Tune's function trainable itself (issue 26): no process group and no Train
    controller, so a reused trial actor starts its next trial with torch imported and the dataset read. Tune
    keeps its checkpoints (tune.report) and restarts it from the last one (Tune's FailureConfig)."""
    phases = {"driver_started": loop_config["driver_started_at"], "loop_entered": time.time()}
    dynamo = _import_dynamo()
    quiet_worker(loop_config.get("harness_log"))  # Tune's "Checkpoint successfully created" INFO lines: the log
    gpu = loop_config["resources"]["gpus_per_worker"] > 0
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")  # Ray set CUDA_VISIBLE_DEVICES to its GPU
    return run_rank(loop_config, phases, dynamo, rank=0, world=1, hostnames=[socket.gethostname()],
                    device=device, raw=raw, resume=_load(ray.tune.get_checkpoint()),
                    report=(ray.tune.report, ray.tune.Checkpoint))


def _import_dynamo() -> threading.Thread:
    # torch imports torch._dynamo (seconds) inside the DDP wrap and the first optimizer step; import it now, beside
    # the rendezvous and the MLflow set-up, where this process mostly waits on the other ranks and sqlite
    dynamo = threading.Thread(target=importlib.import_module, args=("torch._dynamo",), daemon=True)
    dynamo.start()
    return dynamo


def run_rank(loop_config: dict, phases: dict, dynamo: threading.Thread, *, rank: int, world: int,
             hostnames: list[str], device, raw, resume: dict | None, report) -> dict:
    """run_trial on this rank with the trial's MLflow writer (rank 0) and `report` (ray.train.report on a Train
    rank, ray.tune.report in a one-worker trial); the trial's summary, as Tune's last result of the trial."""
    trial = Trial.from_tune(loop_config["trial"])
    phases["hostnames_gathered"] = time.time()
    system = tracking.system_tags(hostnames)
    logger = _trial_logger(loop_config["tracking"], trial, world, system, resume) if rank == 0 else None
    phases["mlflow_started"] = time.time()
    dynamo.join()
    summary = run_trial(trial.config, _reporter(logger, report), resume=resume, device=device, raw=raw)
    history, first_step_at = summary.pop("history"), summary.pop("first_step_at")
    _profile({**phases, "first_step": first_step_at}, rank=rank, trial=trial.name)
    if first_step_at and resume is None:  # Tune trial start -> first optimizer step: the orchestration overhead
        summary["startup_seconds"] = first_step_at - loop_config["driver_started_at"]
    untracked = 0
    if logger is not None and not logger.finish(summary, history):
        untracked = logger.pending  # the study's summary says so; the back-fill delivers them from Tune's results
    final = {k: (-1 if v is None else v) for k, v in summary.items() if k != "status"}
    # The trial's last result goes back as the train function's return value (Train's Result.return_value, rank
    # 0's), and the driver hands it to Tune after every relayed evaluation (harness.study.driver).
    return {**final, "step": summary["steps_run"], "test_acc": summary["final_acc"],
            "trial_status": summary["status"], "finished": True, "untracked": untracked,
            "system_tags": system}  # Tune's result.json keeps it for the back-fill


def _load(checkpoint) -> dict | None:
    """The trial state in a Train or Tune checkpoint (the same format on both paths)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def _trial_logger(track: dict, trial: Trial, world: int, system: dict, resume: dict | None):
    """Rank 0's MLflow writer for the trial's run; buffered, so a tracking outage never stops training."""
    if not track["uri"]:
        return None
    history = resume["progress"]["history"] if resume is not None else []
    logger = tracking.TrialLogger(track["uri"], experiment_id=track["experiment_id"],
                                  parent_run_id=track["parent_run_id"], trial=trial, history=history,
                                  grace_s=track.get("grace_s"))
    logger.start(world, system)
    if resume is not None:
        logger.set_tag(names.RESUMED_FROM_STEP, str(resume["progress"]["step"]))
    return logger


def _reporter(logger, report: tuple):
    """What run_trial calls at every evaluation: MLflow (rank 0), then `report` (every rank; rank 0 with the
    checkpoint, which Train or Tune stores and hands back to a restarted worker). report: (report, Checkpoint)."""
    send, checkpoint_cls = report

    def each_eval(metrics: dict, state: dict | None) -> None:
        if logger is not None:
            logger.log_eval(metrics)
        row = {**metrics, "trial_status": "running"}
        if state is None:
            send(row)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / CHECKPOINT_FILE)
            send(row, checkpoint=checkpoint_cls.from_directory(d))
    return each_eval
