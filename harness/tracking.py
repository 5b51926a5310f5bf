"""MLflow tracking: one experiment per study, one parent run per invocation, one child run per trial.

Where:  --tracking-uri > $MLFLOW_TRACKING_URI > sqlite:///<abs cwd>/mlflow.db (artifacts in ./mlruns beside
it). The URI is made absolute before any trial starts, because Ray workers change directory.

The schema (what `harness.results` reads) is named in harness/names.py:
  experiment  tag mlflow.experimentKind=custom_model_development (MLflow 3's UI opens the runs table).
  parent run  tags harness.role=study, harness.study, harness.scale, harness.claims, harness.question,
              harness.git_commit, harness.git_dirty, harness.git_dirty_files, harness.version, harness.command,
              harness.ray_resources, harness.hardware, harness.tune_path; artifact study_spec.yaml;
              description = how to build the report.
  child run   named in words (the trial's title); tags mlflow.parentRunId, harness.role=trial, harness.study,
              harness.scale, harness.trial_key, harness.cell, harness.trial_config (the typed config as JSON),
              harness.status (completed|diverged|error), harness.error, sys.*;
              params = the flattened trial config + workers (for the UI's columns; the report reads the JSON tag);
              metrics per evaluation with step = optimizer step; summary metrics; artifacts trial_config.json
              and history.csv.

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
from harness import names

EVAL_METRICS = names.EVAL_METRICS
SUMMARY_METRICS = names.SUMMARY_METRICS


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
    """The study's experiment, created in MLflow's model-training view (an older one is switched to it)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(study)
    if exp is not None:
        if exp.tags.get(names.EXPERIMENT_KIND) != names.KIND_TRAINING:
            client.set_experiment_tag(exp.experiment_id, names.EXPERIMENT_KIND, names.KIND_TRAINING)
        return exp.experiment_id
    return client.create_experiment(study, artifact_location=_artifact_location(uri, study),
                                    tags={names.EXPERIMENT_KIND: names.KIND_TRAINING})


# ---------------------------------------------------------------------------------------------------- parent
def start_study_run(uri: str, spec: dict, scale: str, tune_path: str, command: str,
                    resources: dict, hardware: str, resume: bool) -> str:
    """Create the parent run of this invocation, or (resume) reuse the one that owns `tune_path`."""
    client = _client(uri)
    exp_id = experiment_id(uri, spec["name"])
    if resume:
        found = client.search_runs([exp_id], filter_string=f"tags.`{names.TUNE_PATH}` = '{tune_path}' "
                                   f"and tags.`{names.ROLE}` = '{names.ROLE_STUDY}'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id
    commit, dirty_files = _git_state()
    tags = {
        names.ROLE: names.ROLE_STUDY, names.STUDY: spec["name"], names.SCALE: scale,
        names.CLAIMS: ",".join(spec.get("claims", [])), names.QUESTION: spec.get("question", ""),
        names.GIT_COMMIT: commit, names.GIT_DIRTY: str(bool(dirty_files)).lower(),
        names.GIT_DIRTY_FILES: _json_tag(dirty_files),
        names.VERSION: harness.__version__, names.COMMAND: command,
        names.RAY_RESOURCES: json.dumps(resources, sort_keys=True), names.HARDWARE: hardware,
        names.TUNE_PATH: tune_path,
        names.NOTE: (f"Study `{spec['name']}` at scale `{scale}`. Build its report with:\n\n"
                     f"    python -m harness.report {spec['name']} --tracking-uri {uri} --run <this run id>"),
    }
    run = client.create_run(exp_id, run_name=f"{spec['name']}-{scale}", tags=tags)
    import yaml
    client.log_text(run.info.run_id, yaml.safe_dump(spec, sort_keys=False), names.SPEC_ARTIFACT)
    return run.info.run_id


def _json_tag(files: list[str]) -> str:
    """A JSON list that fits one tag: files beyond the limit are counted, not listed."""
    shown = list(files)
    while len(json.dumps(shown)) > names.MAX_TAG_CHARS - 40:
        shown = shown[: len(shown) // 2]
    return json.dumps(shown + ([f"... and {len(files) - len(shown)} more"] if len(shown) < len(files) else []))


def end_study_run(uri: str, run_id: str, status: str) -> None:
    _client(uri).set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------------------------------- child
def find_or_create_trial_run(uri: str, exp_id: str, parent_id: str, trial: dict) -> str:
    """The trial's child run: found by (parent, trial key), else created with its typed config as a JSON tag."""
    client = _client(uri)
    found = client.search_runs([exp_id], filter_string=(f"tags.`{names.TRIAL_KEY}` = '{trial['key']}' and "
                                                        f"tags.`{names.PARENT_RUN_ID}` = '{parent_id}'"),
                               max_results=2)
    if found:
        return found[0].info.run_id
    config = json.dumps(trial["config"], sort_keys=True)
    if len(config) > names.MAX_TAG_CHARS:   # never for a TrialConfig (~1,500 chars); the artifact has it anyway
        raise TrackingError(f"trial {trial['name']}: config is {len(config)} characters as JSON, more than an "
                            f"MLflow tag holds ({names.MAX_TAG_CHARS})")
    tags = {names.PARENT_RUN_ID: parent_id, names.ROLE: names.ROLE_TRIAL, names.STUDY: trial["study"],
            names.SCALE: trial["scale"], names.TRIAL_KEY: trial["key"], names.CELL: trial["cell"],
            names.TRIAL_CONFIG: config}
    run_id = client.create_run(exp_id, run_name=run_title(trial), tags=tags).info.run_id
    client.log_text(run_id, json.dumps(trial["config"], indent=2, sort_keys=True), names.CONFIG_ARTIFACT)
    return run_id


def run_title(trial: dict) -> str:
    """The run's name in the UI: the trial's title in words, else the cell's fields, seed and LR scale in words."""
    if trial.get("title"):
        return trial["title"]
    fields = [part.partition("=")[0].strip() for part in str(trial.get("cell", "")).split(",") if "=" in part]
    config = dict(trial["config"])
    if "lr_scale=" in str(trial.get("cell", "")) and "lr_scale" not in config:   # before lr_scale was a field
        config["lr_scale"] = float(str(trial["cell"]).split("lr_scale=")[1].split(",")[0])
    return names.title(config, [*fields, "seed"])


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
        metrics = [self._Metric(k, float(record[k]), ts, int(record["step"])) for k in EVAL_METRICS if k in record]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.last_logged_step = record["step"]

    def finish(self, summary: dict, history: list[dict]) -> None:
        ts = int(time.time() * 1000)
        step = int(summary.get("steps_run") or 0)
        metrics = [self._Metric(k, float(summary[k]), ts, step) for k in SUMMARY_METRICS
                   if summary.get(k) is not None]
        self.client.log_batch(self.run_id, metrics=metrics,
                              tags=[self._RunTag("harness.status", summary["status"])])
        self.client.log_text(self.run_id, history_csv(history), "history.csv")
        self.client.set_terminated(self.run_id, status="FINISHED")


def mark_trial_error(uri: str, exp_id: str, parent_id: str, trial: dict, error: str) -> None:
    client = _client(uri)
    run_id = find_or_create_trial_run(uri, exp_id, parent_id, trial)
    client.set_tag(run_id, names.STATUS, "error")
    client.set_tag(run_id, names.ERROR, error[:4000])
    client.set_terminated(run_id, status="FAILED")


def history_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", *EVAL_METRICS], extrasaction="ignore")
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


def _git_state() -> tuple[str, list[str]]:
    """(HEAD commit, the tracked files that differ from it: an empty list means a clean tree)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", []
    return commit, [line[3:] for line in status.splitlines() if line.strip()]
