"""One Tune trial: `trial_driver`, Tune's function trainable, runs one Ray Train TorchTrainer of N DDP workers,
or a trial of one worker in itself.

    one worker                  ->  harness.study.worker.run_in_trial in this process (no process group, no Train
                                    controller; issue 26): ray.tune.report with the checkpoint at every evaluation,
                                    the summary last. A reused trial actor keeps torch imported and the dataset
                                    read, never a model, optimizer or RNG state (run_trial seeds and builds those).

    Tune trial (trial_driver)  ->  TorchTrainer(harness.study.worker.train_loop_per_worker, N ranks, gloo/NCCL)
      every evaluation: rank 0's ray.train.report -> Train's controller -> RelayToDriver -> a ray.util.queue.Queue
                        this driver owns -> ray.tune.report, from the Tune function's own thread, in order
      the end:          the Train function's return value (Result.return_value) -> ray.tune.report, after the
                        queue is drained: one reporting path, so the final result can never overtake an evaluation

The Train run of a trial has a stable name (its trial key) under the study's storage folder, so a worker lost
mid-trial (FailureConfig) and a study resumed with --resume both continue from the trial's last checkpoint.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback

import ray
import ray.train
import ray.tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Empty, Queue

from harness.config import TrialConfig
from harness.spec import Trial
from harness.study import tracking
from harness.study.console import quiet_console
from harness.study.worker import run_in_trial, train_loop_per_worker
from harness.trial.data import RawData, load_raw

CHECKPOINT_PATH_KEY = "checkpoint_path"  # the checkpoint a relayed evaluation came with, as Tune's results name it
_RAW: dict[tuple, RawData] = {}  # per trial-driver process (reused across trials): each dataset read once


class RelayToDriver(ray.train.UserCallback):
    """Runs in Train's controller: every report of the workers (rank 0's metrics) goes into the driver's queue."""

    def __init__(self, relay: Queue):
        self.relay = relay

    def after_report(self, run_context, metrics, checkpoint) -> None:
        item = dict(metrics[0])
        if checkpoint is not None:
            item[CHECKPOINT_PATH_KEY] = checkpoint.path
        self.relay.put(item)  # blocks until the queue actor holds it: fit() returns only after the last put


def trial_driver(params: dict) -> None:
    """Tune's function trainable: one Tune trial = one TorchTrainer run of N DDP workers. `params` is the trial's
    point of Tune's param_space: the Trial (Trial.to_tune), tracking, resources, storage."""
    started = time.time()
    quiet_console(params.get("harness_log"))
    trial = Trial.from_tune(params["trial"])
    if params["resources"]["workers"] == 1:
        _record_errors(params, trial, lambda: ray.tune.report(
            run_in_trial({**params, "driver_started_at": started}, raw_data(trial.config))))
        return
    relay = Queue(actor_options={"num_cpus": 0})
    trainer = _trainer(params, trial, relay, started)
    outcome: dict = {}
    fitting = threading.Thread(target=_fit, args=(trainer, outcome), daemon=True)
    fitting.start()
    while fitting.is_alive():
        _relay(relay, timeout_s=0.5)
    _relay(relay, timeout_s=0)  # what the controller put before fit() returned
    relay.shutdown()
    if "error" in outcome:
        _record_errors(params, trial, lambda: _raise(outcome["error"]))
    ray.tune.report(outcome["result"].return_value)  # the trial's final result: straight to Tune, last


def _raise(e: BaseException) -> None:
    raise e


def _record_errors(params: dict, trial: Trial, run) -> None:
    """run(); an error it raises is recorded in the trial's run (never raises), then Tune sees the original."""
    try:
        run()
    except Exception as e:
        track = params["tracking"]
        if track["uri"]:
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            tracking.mark_trial_error(track["uri"], track["experiment_id"], track["parent_run_id"], trial, detail)
        raise


def _fit(trainer: TorchTrainer, outcome: dict) -> None:
    try:
        outcome["result"] = trainer.fit()
    except BaseException as e:  # noqa: BLE001 - handed to the Tune function's thread, which raises it
        outcome["error"] = e


def _relay(relay: Queue, timeout_s: float) -> None:
    """Hand every queued evaluation to Tune, in order; wait at most timeout_s for the first."""
    try:
        items = [relay.get(timeout=timeout_s)] if timeout_s else []
    except (Empty, queue.Empty):
        items = []
    while True:
        try:
            items.append(relay.get_nowait())
        except (Empty, queue.Empty):
            break
    for item in items:
        ray.tune.report(item)


def _trainer(params: dict, trial: Trial, relay: Queue, started: float) -> TorchTrainer:
    res = params["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    worker_resources = {"CPU": res["cpus_per_worker"], **({"GPU": res["gpus_per_worker"]} if use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**params, "driver_started_at": started, "raw_data": shared_raw_data(trial.config)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=res["workers"], use_gpu=use_gpu,
                                               resources_per_worker=worker_resources,
                                               placement_strategy=res.get("placement", "PACK")),
        run_config=ray.train.RunConfig(
            name=f"train-{trial.key}",
            storage_path=params["train_storage"],
            failure_config=ray.train.FailureConfig(max_failures=params.get("max_failures", 1)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.LoggingConfig(log_level="WARNING"),  # Tune's table is the progress display
            callbacks=[RelayToDriver(relay)],
        ),
    )


def raw_data(cfg: TrialConfig) -> RawData | None:
    """The trial's dataset files, read once by this (reused) trial driver (digits: no scikit-learn import;
    Fashion-MNIST: no gunzip); None where they cannot be read here: run_trial reads them and says what is wrong."""
    key = (cfg.dataset, cfg.data_dir)
    if key not in _RAW:
        try:
            _RAW[key] = load_raw(cfg.dataset, data_dir=cfg.data_dir)
        except Exception:  # noqa: BLE001 - not here: the trial reads them itself and reports what is wrong
            return None
    return _RAW[key]


def shared_raw_data(cfg: TrialConfig):
    """raw_data in Ray's object store, so the trial's workers neither read nor parse the files."""
    raw = raw_data(cfg)
    return None if raw is None else ray.put(raw)
