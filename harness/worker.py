"""Ray's side of one trial: the Tune function that builds a TorchTrainer, and the per-worker train loop.

    Tune trial (trial_driver)  ->  TorchTrainer(train_loop_per_worker, N workers, gloo/NCCL)
                                     rank r: run_trial(config) with a reporter that
                                       - ray.train.report()s every evaluation (rank 0 attaches a checkpoint)
                                       - returns the trial's summary, which trial_driver ray.tune.report()s
                                       - logs to the trial's MLflow run (rank 0, one batched call per evaluation)

The Train run of a trial has a stable name (its trial key) under the study's storage folder, so a worker lost
mid-trial (FailureConfig) and a study resumed with --resume both continue from the trial's last checkpoint.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import tempfile
import threading
import time
import traceback
from pathlib import Path

import ray
import ray.train
import ray.tune
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig, TorchTrainer

from harness import tracking
from harness.data import RawData, load_raw
from harness.study import quiet_console
from harness.trial import run_trial

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
    phases = {"driver_started": loop_config["driver_started_at"], "loop_entered": time.time()}
    # torch imports torch._dynamo (seconds) inside the DDP wrap and the first optimizer step; import it now, beside
    # the rendezvous and the MLflow set-up below, where this process mostly waits on the other ranks and sqlite
    dynamo = threading.Thread(target=importlib.import_module, args=("torch._dynamo",), daemon=True)
    dynamo.start()
    trial, track = loop_config["trial"], loop_config["tracking"]
    # Ray Train V2 logs "Reporting training result ..." at INFO to a logger named by its file path, which the
    # RunConfig's LoggingConfig level (it filters "ray.train.*") does not reach: send it to the study's log.
    from ray.train.v2._internal.execution import context as train_context
    quiet_console(loop_config.get("harness_log"), train_context.__file__)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)

    hostnames = [socket.gethostname()]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, socket.gethostname())
        hostnames = gathered
    phases["hostnames_gathered"] = time.time()

    system = tracking.system_tags(hostnames)
    logger = None
    if rank == 0 and track["uri"]:  # buffered: a tracking outage never stops training (see TrialLogger)
        history = resume["progress"]["history"] if resume is not None else []
        logger = tracking.TrialLogger(track["uri"], experiment_id=track["experiment_id"],
                                      parent_run_id=track["parent_run_id"], trial=trial, history=history,
                                      grace_s=track.get("grace_s"))
        logger.start(trial["config"], world, system)
        if resume is not None:
            logger.set_tag("harness.resumed_from_step", str(resume["progress"]["step"]))
    phases["mlflow_started"] = time.time()

    def reporter(metrics: dict, state: dict | None) -> None:
        if logger is not None:
            logger.log_eval(metrics)
        report = {**metrics, "trial_status": "running"}
        if state is None:
            ray.train.report(report)
        else:
            with tempfile.TemporaryDirectory() as d:
                torch.save(state, Path(d) / CHECKPOINT_FILE)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))

    device = ray.train.torch.get_device()
    raw = ray.get(loop_config["raw_data"]) if loop_config.get("raw_data") is not None else None
    dynamo.join()
    summary = run_trial(trial["config"], reporter, resume=resume, device=device, raw=raw)
    history, first_step_at = summary.pop("history"), summary.pop("first_step_at")
    _profile({**phases, "first_step": first_step_at}, rank=rank, trial=trial["name"])
    if first_step_at and resume is None:  # Tune trial start -> first optimizer step: the orchestration overhead
        summary["startup_seconds"] = first_step_at - loop_config["driver_started_at"]
    untracked = 0
    if logger is not None and not logger.finish(summary, history):
        untracked = logger.pending  # the study's summary says so; harness.backfill delivers them from Tune's results
    final = {k: (-1 if v is None else v) for k, v in summary.items() if k != "status"}
    # The trial's last result goes back as the train function's return value (Train's Result.return_value, rank
    # 0's), and trial_driver hands it to Tune itself: a last ray.train.report, relayed controller -> Tune, was
    # sometimes lost when the workers exited right after it (Ray 2.60, seen on 2 busy cores).
    return {**final, "step": summary["steps_run"], "test_acc": summary["final_acc"],
            "trial_status": summary["status"], "finished": True, "untracked": untracked,
            "system_tags": system}  # Tune's result.json keeps it for harness.backfill


_RAW: dict[tuple, RawData] = {}  # per trial-driver process (reused across trials): each dataset read once


def shared_raw_data(trial_config: dict):
    """The trial's dataset files, read once by this (reused) trial driver and put in Ray's object store, so the
    trial's workers neither read nor parse them (digits: no scikit-learn import; Fashion-MNIST: no gunzip)."""
    key = (trial_config.get("dataset", "digits"), trial_config.get("data_dir"))
    if key not in _RAW:
        try:
            _RAW[key] = load_raw(key[0], data_dir=key[1])
        except Exception:  # noqa: BLE001 - not here: the workers read it themselves and report what is wrong
            return None
    return ray.put(_RAW[key])


def trial_driver(config: dict) -> None:
    """Tune's function trainable: one Tune trial = one TorchTrainer run of N DDP workers."""
    from ray.tune.integration.ray_train import TuneReportCallback

    started = time.time()
    quiet_console(config.get("harness_log"))
    trial, track, res = config["trial"], config["tracking"], config["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    worker_resources = {"CPU": res["cpus_per_worker"]}
    if use_gpu:
        worker_resources["GPU"] = res["gpus_per_worker"]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**config, "tracking": track, "driver_started_at": started,
                           "raw_data": shared_raw_data(trial["config"])},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=res["workers"], use_gpu=use_gpu,
                                               resources_per_worker=worker_resources,
                                               placement_strategy=res.get("placement", "PACK")),
        run_config=ray.train.RunConfig(
            name=f"train-{trial['key']}",
            storage_path=config["train_storage"],
            failure_config=ray.train.FailureConfig(max_failures=config.get("max_failures", 1)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.LoggingConfig(log_level="WARNING"),  # Tune's table is the progress display
            callbacks=[TuneReportCallback()],
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # record it in the trial's run (never raises), then let Tune see the original error
        if track["uri"]:
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            tracking.mark_trial_error(track["uri"], track["experiment_id"], track["parent_run_id"], trial, detail)
        raise
    _wait_for_relayed_reports()
    ray.tune.report(result.return_value)  # the trial's final result: straight to Tune, from the Tune function


def _wait_for_relayed_reports(timeout_s: float = 30.0) -> None:
    """Let Tune take the evaluations Train's TuneReportCallback relayed before the final result goes in.

    The callback relays each report through a one-item queue actor that the trial's Tune session drains on its
    own thread; the last relay can still sit there when trainer.fit() returns. Reported on top of it, the final
    result overtook it (the last evaluation was missing from Tune's results) and, now and then, the session's
    thread blocked for good on its full result queue: the trial stayed RUNNING with no workers (Ray 2.60)."""
    from ray.train._internal.session import get_session
    try:
        relay = get_session()._inter_actor_queue  # Ray's own queue, created by TuneReportCallback
    except Exception:
        return
    deadline = time.time() + timeout_s
    while relay is not None and time.time() < deadline:
        try:
            if relay.empty():
                break
        except Exception:
            return
        time.sleep(0.05)
    time.sleep(0.3)  # the session's thread hands the item it took to Tune (its fetch timeout is 0.2 s)
