"""MLflow tracking: one experiment per study, one parent run per invocation, one child run per trial.

Where:  --tracking-uri > $MLFLOW_TRACKING_URI > sqlite:///<abs cwd>/mlflow.db (artifacts in ./mlruns beside
it). The URI is made absolute before any trial starts, because Ray workers change directory.

The schema (what `harness.results` reads):
  parent run  tags harness.role=study, harness.study, harness.scale, harness.claims, harness.question,
              harness.git_commit, harness.git_dirty, harness.version, harness.command, harness.ray_resources,
              harness.hardware, harness.tune_path; artifact study_spec.yaml; description = how to build the report.
  child run   tags mlflow.parentRunId, harness.role=trial, harness.study, harness.scale, harness.trial_key,
              harness.cell, harness.status (completed|diverged|error), harness.error, sys.*;
              params = the flattened trial config + workers; metrics per evaluation with step = optimizer step;
              summary metrics; artifacts trial_config.json and history.csv.

Idempotent under retries: a child run is found by (parent run, trial key) before one is created, and a
restarted trial skips evaluation records whose step is already logged. So a worker restarted from a
checkpoint, or a study resumed with --resume, writes into the same runs and never duplicates one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import harness

EVAL_METRICS = ("epoch", "lr", "momentum", "train_loss", "test_loss", "test_acc", "val_loss", "val_acc", "images_per_s",
                "train_seconds")
SUMMARY_METRICS = ("final_acc", "final_val_acc", "best_acc", "reached_target", "steps_to_target", "seconds_to_target",
                   "target_acc",
                   "diverged_at_step", "world_size", "bn_batch", "accum_steps", "steps_run", "startup_seconds")
# logged when a record has them: MLPs' dead output units; an LR finder's sweep (kind lr_finder) and suggestions
EXTRA_EVAL_METRICS = ("dead_output_frac", "smoothed_loss", "batch_val_loss", "batch_val_acc")
FINDER_SUMMARY_METRICS = ("lr_steepest", "lr_valley", "lr_smith", "lr_smith_base", "lr_smith_base_min",
                          "finder_stopped_early")


class TrackingError(RuntimeError):
    """The tracking store cannot be used. The message is one line."""


def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif uri.startswith("file:") or "://" not in uri:
        path = uri[len("file:"):] if uri.startswith("file:") else uri
        uri = Path(path.removeprefix("//")).resolve().as_uri()
    return uri


def check_store(uri: str, timeout_s: float = 10.0) -> None:
    """Raise TrackingError (one line) unless the store answers. Nothing is created on a remote server."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow server at {uri} answered /health with HTTP {resp.status}")
        except TrackingError:
            raise
        except Exception as e:
            raise TrackingError(
                f"MLflow tracking server at {uri} does not answer ({type(e).__name__}: {e}); start it "
                f"(mlflow server --host 127.0.0.1 --port 5000) or pass another --tracking-uri") from None
        return
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"cannot write the MLflow sqlite store in {folder} (no such writable folder); "
                                f"pass --tracking-uri sqlite:///<writable path>/mlflow.db")
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as e:
        raise TrackingError(f"MLflow store {uri} does not answer: {type(e).__name__}: {str(e).splitlines()[0]}") \
            from None


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str, study: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns" / study).as_uri()
    return None  # a server decides where artifacts go


def experiment_id(uri: str, study: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(study)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(study, artifact_location=_artifact_location(uri, study))


# ---------------------------------------------------------------------------------------------------- parent
def start_study_run(uri: str, spec: dict, scale: str, tune_path: str, command: str,
                    resources: dict, hardware: str, resume: bool) -> str:
    """Create the parent run of this invocation, or (resume) reuse the one that owns `tune_path`."""
    client = _client(uri)
    exp_id = experiment_id(uri, spec["name"])
    if resume:
        found = client.search_runs([exp_id], filter_string=f"tags.`harness.tune_path` = '{tune_path}' "
                                   "and tags.`harness.role` = 'study'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id
    commit, dirty = _git_state()
    tags = {
        "harness.role": "study", "harness.study": spec["name"], "harness.scale": scale,
        "harness.claims": ",".join(spec.get("claims", [])), "harness.question": spec.get("question", ""),
        "harness.git_commit": commit, "harness.git_dirty": str(dirty).lower(),
        "harness.version": harness.__version__, "harness.command": command,
        "harness.ray_resources": json.dumps(resources, sort_keys=True), "harness.hardware": hardware,
        "harness.tune_path": tune_path,
        "mlflow.note.content": (f"Study `{spec['name']}` at scale `{scale}`. Build its report with:\n\n"
                                f"    python -m harness.report {spec['name']} --tracking-uri {uri} "
                                "--run <this run id>"),
    }
    run = client.create_run(exp_id, run_name=f"{spec['name']}-{scale}", tags=tags)
    import yaml
    client.log_text(run.info.run_id, yaml.safe_dump(spec, sort_keys=False), "study_spec.yaml")
    return run.info.run_id


def end_study_run(uri: str, run_id: str, status: str) -> None:
    _client(uri).set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------------------------------- child
def find_or_create_trial_run(uri: str, exp_id: str, parent_id: str, trial: dict) -> str:
    client = _client(uri)
    found = client.search_runs([exp_id], filter_string=(f"tags.`harness.trial_key` = '{trial['key']}' and "
                                                        f"tags.`mlflow.parentRunId` = '{parent_id}'"), max_results=2)
    if found:
        return found[0].info.run_id
    tags = {"mlflow.parentRunId": parent_id, "harness.role": "trial", "harness.study": trial["study"],
            "harness.scale": trial["scale"], "harness.trial_key": trial["key"], "harness.cell": trial["cell"]}
    return client.create_run(exp_id, run_name=trial["name"], tags=tags).info.run_id


class TrialLogger:
    """Rank 0's MLflow writer for one trial: one batched call per evaluation, summary and artifacts at the end."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.entities import Metric, Param, RunTag
        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.client = _client(uri)
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        logged = self.client.get_metric_history(run_id, "test_acc")
        self.last_logged_step = max((m.step for m in logged), default=-1)

    def start(self, config: dict, workers: int, system_tags: dict[str, str]) -> None:
        params = [self._Param(k, _param_str(v)) for k, v in flatten(config).items()]
        params.append(self._Param("workers", str(workers)))
        tags = [self._RunTag(k, str(v)) for k, v in system_tags.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100], tags=tags if i == 0 else [])
        self.client.log_text(self.run_id, json.dumps(config, indent=2, sort_keys=True), "trial_config.json")

    def log_eval(self, record: dict) -> None:
        if record["step"] <= self.last_logged_step:
            return  # already logged before a restart
        ts = int(time.time() * 1000)
        metrics = [self._Metric(k, float(record[k]), ts, int(record["step"])) for k in EVAL_METRICS + EXTRA_EVAL_METRICS
                   if k in record]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.last_logged_step = record["step"]

    def finish(self, summary: dict, history: list[dict]) -> None:
        ts = int(time.time() * 1000)
        step = int(summary.get("steps_run") or 0)
        metrics = [self._Metric(k, float(summary[k]), ts, step) for k in SUMMARY_METRICS + FINDER_SUMMARY_METRICS
                   if summary.get(k) is not None]
        self.client.log_batch(self.run_id, metrics=metrics,
                              tags=[self._RunTag("harness.status", summary["status"])])
        self.client.log_text(self.run_id, history_csv(history), "history.csv")
        self.client.set_terminated(self.run_id, status="FINISHED")


def mark_trial_error(uri: str, exp_id: str, parent_id: str, trial: dict, error: str) -> None:
    client = _client(uri)
    run_id = find_or_create_trial_run(uri, exp_id, parent_id, trial)
    client.set_tag(run_id, "harness.status", "error")
    client.set_tag(run_id, "harness.error", error[:4000])
    client.set_terminated(run_id, status="FAILED")


def history_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    extra = [k for k in EXTRA_EVAL_METRICS if history and k in history[0]]
    writer = csv.DictWriter(buf, fieldnames=["step", *EVAL_METRICS, *extra], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys: MLflow's log_params rejects nested values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _param_str(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, tuple)) else str(v)


def system_tags(hostnames: list[str]) -> dict[str, str]:
    import torch
    cuda = torch.cuda.is_available()
    return {
        "sys.torch": torch.__version__,
        "sys.cuda": torch.version.cuda or "none",
        "sys.gpu_model": torch.cuda.get_device_name(0) if cuda else "none",
        "sys.gpu_count": str(torch.cuda.device_count() if cuda else 0),
        "sys.hostnames": ",".join(sorted(set(hostnames))),
        "sys.python": platform.python_version(),
    }


def _git_state() -> tuple[str, bool]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit, dirty
