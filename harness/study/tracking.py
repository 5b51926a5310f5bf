"""MLflow tracking: one experiment per study, one parent run per invocation, one child run per trial.

Where:  --tracking-uri > $MLFLOW_TRACKING_URI > sqlite:///<abs cwd>/mlflow.db (artifacts in ./mlruns beside
it). The URI is made absolute before any trial starts, because Ray workers change directory.

The schema (what `harness.analysis.results` reads) is named in harness/names.py:
  experiment  tag mlflow.experimentKind=custom_model_development (MLflow 3's UI opens the runs table).
  parent run  tags harness.role=study, harness.study, harness.scale, harness.analysis.claims, harness.question,
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

Outages: a trial's logging goes through a local buffer (TrialLogger) retried with backoff, so training never
waits on the store; past HARNESS_TRACKING_GRACE_S the trial completes without it and `harness.study.backfill`
fills MLflow in from Ray's storage later. Calls that end runs (end_study_run, mark_trial_error) never raise:
a store failure there is a warning line, so the error the user sees is the first one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import harness
from harness import names
from harness.config import TrialConfig
from harness.names import SHORT_HTTP_RETRIES, resolve_tracking_uri, short_http_retries  # noqa: F401
from harness.spec import Trial

EVAL_METRICS = names.EVAL_METRICS
SUMMARY_METRICS = names.SUMMARY_METRICS
EXTRA_EVAL_METRICS = names.EXTRA_EVAL_METRICS
FINDER_SUMMARY_METRICS = names.FINDER_SUMMARY_METRICS
TRACKING_GRACE_ENV = "HARNESS_TRACKING_GRACE_S"  # how long a trial waits at its end for a tracking outage
DEFAULT_GRACE_S = 300.0
BACKOFF_START_S, BACKOFF_MAX_S = 1.0, 30.0


class TrackingError(RuntimeError):
    """The tracking store cannot be used. The message is one line."""


def check_writable(uri: str, timeout_s: float = 10.0) -> None:
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
        mlflow_client(uri).search_experiments(max_results=1)
    except Exception as e:
        raise TrackingError(f"MLflow store {uri} does not answer: {type(e).__name__}: {str(e).splitlines()[0]}") \
            from None


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def latest_study_run(uri: str, study: str, scale: str | None = None, finished: bool = False) -> str:
    """The newest study (parent) run of `study` (at `scale`; FINISHED only if asked): its run id, or
    TrackingError (one line) when there is none."""
    c = mlflow_client(uri)
    exp = c.get_experiment_by_name(study)
    if exp is None:
        raise TrackingError(f"no study '{study}' in the MLflow store {uri}")
    where = [f"tags.`{names.ROLE}` = '{names.ROLE_STUDY}'"]
    if scale:
        where.append(f"tags.`{names.SCALE}` = '{scale}'")
    if finished:
        where.append("attributes.status = 'FINISHED'")
    found = c.search_runs([exp.experiment_id], filter_string=" and ".join(where),
                          order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        what = " finished" if finished else ""
        raise TrackingError(f"study '{study}' has no{what} run{f' at scale {scale}' if scale else ''} in {uri}")
    return found[0].info.run_id


def trial_runs(uri: str, parent_id: str, status: str | None = None) -> list:
    """The trial (child) runs of one study run, every page of them (harness.status = `status` if given)."""
    c = mlflow_client(uri)
    exp_id = c.get_run(parent_id).info.experiment_id
    where = f"tags.`{names.PARENT_RUN_ID}` = '{parent_id}' and tags.`{names.ROLE}` = '{names.ROLE_TRIAL}'"
    if status:
        where += f" and tags.`{names.STATUS}` = '{status}'"
    out, token = [], None
    while True:
        page = c.search_runs([exp_id], filter_string=where, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def run_config(run) -> TrialConfig | None:
    """A trial run's typed config, from its `harness.trial_config` tag (None when the run has none)."""
    text = run.data.tags.get(names.TRIAL_CONFIG)
    return TrialConfig.from_json(text) if text else None


def _artifact_location(uri: str, study: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns" / study).as_uri()
    return None  # a server decides where artifacts go


def experiment_id(uri: str, study: str) -> str:
    """The study's experiment, created in MLflow's model-training view (an older one is switched to it)."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(study)
    if exp is not None:
        if exp.tags.get(names.EXPERIMENT_KIND) != names.KIND_TRAINING:
            client.set_experiment_tag(exp.experiment_id, names.EXPERIMENT_KIND, names.KIND_TRAINING)
        return exp.experiment_id
    return client.create_experiment(study, artifact_location=_artifact_location(uri, study),
                                    tags={names.EXPERIMENT_KIND: names.KIND_TRAINING})


def set_runs_view(uri: str, exp_id: str, param_columns: list[str]) -> None:
    """The experiment's shared runs-table view: the summary metrics and the given params as columns."""
    metrics = ("final_acc", "final_val_acc", "best_acc", "steps_to_target", "seconds_to_target", "steps_run",
               "startup_seconds")
    columns = [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in param_columns]
    state = {"selectedColumns": ["attributes.`Duration`", *columns]}
    mlflow_client(uri).set_experiment_tag(exp_id, names.VIEW_TAG_PREFIX + names.VIEW_KEY, json.dumps(state))


def runs_view_url(exp_id: str, ui: str = "http://127.0.0.1:5000/") -> str:
    """Where `mlflow ui` shows the study's runs table with set_runs_view's columns."""
    return ui + names.RUNS_VIEW_URL.format(experiment_id=exp_id)


# ---------------------------------------------------------------------------------------------------- parent
def start_study_run(uri: str, spec: dict, scale: str, tune_path: str, command: str,
                    resources: dict, hardware: str, resume: bool) -> str:
    """Create the parent run of this invocation, or (resume) reuse the one that owns `tune_path`."""
    client = mlflow_client(uri)
    exp_id = experiment_id(uri, spec["name"])
    if resume:
        found = client.search_runs([exp_id], filter_string=f"tags.`{names.TUNE_PATH}` = '{tune_path}' "
                                   f"and tags.`{names.ROLE}` = '{names.ROLE_STUDY}'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id
    commit, dirty_files = git_state()
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


def end_study_run(uri: str, run_id: str, status: str) -> bool:
    """Set the parent run's final status. Never raises (the study's own outcome must stay what the user
    sees): a failure is one warning line and False."""
    try:
        with short_http_retries():
            mlflow_client(uri).set_terminated(run_id, status=status)
        return True
    except Exception as e:
        _warn(f"could not mark the study run {run_id} {status} ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]})")
        return False


# ---------------------------------------------------------------------------------------------------- child
def find_or_create_trial_run(uri: str, exp_id: str, parent_id: str, trial: Trial) -> str:
    """The trial's child run: found by (parent, trial key), else created, named by the trial's title, with its
    typed config as a JSON tag (TrialConfig.to_json) and the fields that name its cell."""
    client = mlflow_client(uri)
    found = client.search_runs([exp_id], filter_string=(f"tags.`{names.TRIAL_KEY}` = '{trial.key}' and "
                                                        f"tags.`{names.PARENT_RUN_ID}` = '{parent_id}'"),
                               max_results=2)
    if found:
        return found[0].info.run_id
    config = trial.config.to_json()
    if len(config) > names.MAX_TAG_CHARS:   # never for a TrialConfig (~1,500 chars); the artifact has it anyway
        raise TrackingError(f"trial {trial.name}: config is {len(config)} characters as JSON, more than an "
                            f"MLflow tag holds ({names.MAX_TAG_CHARS})")
    tags = {names.PARENT_RUN_ID: parent_id, names.ROLE: names.ROLE_TRIAL, names.STUDY: trial.study,
            names.SCALE: trial.scale, names.TRIAL_KEY: trial.key, names.CELL: trial.cell,
            names.CELL_FIELDS: json.dumps(list(trial.cell_fields)), names.TRIAL_CONFIG: config}
    run_id = client.create_run(exp_id, run_name=trial.title, tags=tags).info.run_id
    client.log_text(run_id, json.dumps(trial.config.to_dict(), indent=2, sort_keys=True), names.CONFIG_ARTIFACT)
    return run_id


class TrialLogger:
    """Rank 0's MLflow writer for one trial, built to outlive a tracking outage.

    Everything goes into a local buffer first (the run's params and tags, one record per evaluation, the
    summary) and is delivered in that order by `flush()`: one batched call per evaluation while the server
    answers; while it does not, training goes on and the buffer is retried with exponential backoff
    (`flush` never raises). `finish` waits for the buffer up to HARNESS_TRACKING_GRACE_S seconds after the
    outage began, then gives up: the trial still completes, its records stay in Ray's storage (Tune's
    result.json) and `python -m harness.study.backfill` delivers them later.

    Exactly once: records carry an explicit step; before the first delivery, and again after any failed call
    (its answer may have been lost after the server applied it), the logger asks the server for the last
    logged step and drops what the server already has. A restarted worker passes the checkpoint's history:
    the buffer is rebuilt from it. MLflow's own HTTP retries are cut short (SHORT_HTTP_RETRIES) so that the
    buffer, not the client, does the waiting.
    """

    def __init__(self, uri: str, run_id: str | None = None, *, experiment_id: str | None = None,
                 parent_run_id: str | None = None, trial: Trial | None = None, history: list[dict] = (),
                 grace_s: float | None = None, mark_running: bool = True):
        from mlflow.entities import Metric, Param, RunTag
        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.uri, self.client = uri, mlflow_client(uri)
        self.run_id = run_id  # None: found or created (by trial key) at the first delivery
        self._where = (experiment_id, parent_run_id, trial)
        self.grace_s = tracking_grace_s() if grace_s is None else grace_s
        self._ops: list[tuple] = []          # ("params", [...]) / ("tags", {...}) / ("text", text, path)
        self._records: list[dict] = []       # evaluation records not yet known to be on the server
        self._final: tuple | None = None     # ("finish", summary, history)
        self._logged_step: int | None = None  # highest step on the server; None: ask before logging
        self._backoff, self._next_try, self.down_since = BACKOFF_START_S, 0.0, None
        for record in history:
            self._buffer_record(record)
        if mark_running:
            self._ops.append(("running",))
        self.flush()

    # ------------------------------------------------------------------ what callers buffer
    def start(self, workers: int, system_tags: dict[str, str]) -> None:
        """Params (the config's fields, for the UI's columns, and `workers`) and system tags; idempotent, so a
        restarted worker sends them again."""
        params = {k: _param_str(v) for k, v in self._where[2].config.to_dict().items()}
        params[names.WORKERS_PARAM] = str(workers)
        self._ops += [("params", params), ("tags", dict(system_tags))]
        self.flush()

    def set_tag(self, key: str, value: str) -> None:
        self._ops.append(("tags", {key: str(value)}))
        self.flush()

    def log_eval(self, record: dict) -> None:
        self._buffer_record(record)
        if time.monotonic() >= self._next_try:
            self.flush()

    def finish(self, summary: dict, history: list[dict]) -> bool:
        """Buffer the summary, history.csv and the FINISHED status, then wait (with backoff, up to the grace
        bound) until everything is delivered. False when the server stayed down: nothing raises."""
        self._final = ("finish", dict(summary), [dict(r) for r in history])
        return self.drain()

    @property
    def pending(self) -> int:
        """Buffered items not yet delivered: records, run updates and the summary."""
        return len(self._records) + len(self._ops) + (self._final is not None)

    # ------------------------------------------------------------------ delivery
    def flush(self) -> bool:
        """One delivery attempt of the whole buffer; True when it is empty. Never raises."""
        if not self.pending:
            return True
        buffered = self.pending  # for the line that says tracking is back
        try:
            with short_http_retries():
                self._deliver()
        except Exception as e:  # any failure of the store: keep the buffer, back off, try again later
            self._failed(e)
            return False
        if self.down_since is not None:
            through = "" if self._logged_step is None else f", evaluations through step {self._logged_step}"
            _warn(f"MLflow {self.uri} answers again after {time.monotonic() - self.down_since:.0f} s; run "
                  f"{self.run_id}: the {buffered} items buffered meanwhile are delivered{through}")
        self._backoff, self._next_try, self.down_since = BACKOFF_START_S, 0.0, None
        return True

    def drain(self) -> bool:
        """Flush until the buffer is empty or the outage has lasted `grace_s`."""
        while not self.flush():
            now = time.monotonic()
            deadline = self.down_since + self.grace_s
            if now >= deadline:
                _warn(f"MLflow {self.uri} still unreachable after {self.grace_s:g} s ({TRACKING_GRACE_ENV}); "
                      f"{self.pending} items of run {self.run_id or getattr(self._where[2], 'name', '?')} not "
                      "logged; they are kept in Ray's storage: python -m harness.study.backfill fills them in")
                return False
            time.sleep(max(0.0, min(self._next_try, deadline) - now))
        return True

    def _buffer_record(self, record: dict) -> None:
        self._records.append({**record, "_ts": int(time.time() * 1000)})

    def _deliver(self) -> None:
        client = self.client
        if self.run_id is None:
            experiment, parent, trial = self._where
            self.run_id = find_or_create_trial_run(self.uri, experiment, parent, trial)
        while self._ops:
            op = self._ops[0]
            if op[0] == "running":
                client.update_run(self.run_id, status="RUNNING")
            elif op[0] == "params":
                items = [self._Param(k, v) for k, v in op[1].items()]
                for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                    client.log_batch(self.run_id, params=items[i:i + 100])
            elif op[0] == "tags":
                client.log_batch(self.run_id, tags=[self._RunTag(k, v) for k, v in op[1].items()])
            elif op[0] == "text":
                client.log_text(self.run_id, op[1], op[2])
            self._ops.pop(0)
        if self._records:
            if self._logged_step is None:
                logged = client.get_metric_history(self.run_id, "test_acc")
                self._logged_step = max((m.step for m in logged), default=-1)
            self._records = [r for r in self._records if r["step"] > self._logged_step]
            while self._records:
                chunk = self._records[:60]  # at most 16 x 60 metrics: under MLflow's 1000 per batch
                metrics = [self._Metric(k, float(r[k]), r["_ts"], int(r["step"]))
                           for r in chunk for k in EVAL_METRICS + EXTRA_EVAL_METRICS if k in r]
                client.log_batch(self.run_id, metrics=metrics)
                self._logged_step = chunk[-1]["step"]
                del self._records[:len(chunk)]
        if self._final is not None:
            _, summary, history = self._final
            ts, step = int(time.time() * 1000), int(summary.get("steps_run") or 0)
            run = client.get_run(self.run_id)
            already = run.data.metrics.get("steps_run") == step  # an earlier attempt got through
            metrics = [] if already else [self._Metric(k, float(summary[k]), ts, step)
                                          for k in SUMMARY_METRICS + FINDER_SUMMARY_METRICS
                                          if summary.get(k) is not None]
            client.log_batch(self.run_id, metrics=metrics, tags=[self._RunTag(names.STATUS, summary["status"])])
            client.log_text(self.run_id, history_csv(history), names.HISTORY_ARTIFACT)
            client.set_terminated(self.run_id, status="FINISHED")
            self._final = None

    def _failed(self, error: Exception) -> None:
        now = time.monotonic()
        self._logged_step = None  # the failed call may have been applied: ask again before logging
        if self.down_since is None:
            self.down_since = now
            _warn(f"MLflow {self.uri} unreachable ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                  f"run {self.run_id or getattr(self._where[2], 'name', '?')}: training goes on, {self.pending} "
                  f"items buffered and retried with backoff; one line follows when it is back")
        self._next_try = now + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)


def mark_trial_error(uri: str, exp_id: str, parent_id: str, trial: Trial, error: str) -> None:
    """Record a trial's error in its run. Never raises: a store that fails here must not hide `error`."""
    try:
        with short_http_retries():
            client = mlflow_client(uri)
            run_id = find_or_create_trial_run(uri, exp_id, parent_id, trial)
            client.log_batch(run_id, tags=[_tag(names.STATUS, "error"), _tag(names.ERROR, error[:4000])])
            client.set_terminated(run_id, status="FAILED")
    except Exception as e:
        _warn(f"could not record the error of trial {trial_label(trial)} in MLflow "
              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def mark_unfinished_trials_killed(uri: str, exp_id: str, parent_id: str) -> int:
    """Interrupted study: the parent's child runs still RUNNING become KILLED. Returns how many."""
    client = mlflow_client(uri)
    runs = client.search_runs([exp_id], filter_string=f"tags.`{names.PARENT_RUN_ID}` = '{parent_id}' and "
                                                      "attributes.status = 'RUNNING'")
    for run in runs:
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(runs)


def tracking_grace_s() -> float:
    """Seconds a trial waits at its end for an unreachable tracking store ($HARNESS_TRACKING_GRACE_S)."""
    value = os.environ.get(TRACKING_GRACE_ENV)
    if not value:
        return DEFAULT_GRACE_S
    try:
        grace = float(value)
    except ValueError:
        grace = -1.0
    if not grace >= 0:
        raise TrackingError(f"{TRACKING_GRACE_ENV}={value!r} is not a number of seconds >= 0 (default "
                            f"{DEFAULT_GRACE_S:g})")
    return grace


def trial_label(trial: Trial | None) -> str:
    return trial.name if trial is not None else "?"


def _tag(key: str, value: str):
    from mlflow.entities import RunTag
    return RunTag(key, value)


def _warn(message: str) -> None:
    print(f"warning: tracking: {message}", file=sys.stderr, flush=True)


def history_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    extra = [k for k in EXTRA_EVAL_METRICS if history and k in history[0]]
    writer = csv.DictWriter(buf, fieldnames=["step", *EVAL_METRICS, *extra], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


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


# A Ray job's working dir is uploaded without .git (Ray leaves it out by default), so a study submitted with
# `ray job submit --working-dir .` has no checkout to ask: the submitter passes the state in these variables
# (`--runtime-env-json "$(python -m harness.study --job-env)"`, see job_env()).
GIT_COMMIT_ENV, GIT_DIRTY_FILES_ENV = "HARNESS_GIT_COMMIT", "HARNESS_GIT_DIRTY_FILES"


def git_state() -> tuple[str, list[str]]:
    """(HEAD commit, the tracked files that differ from it: an empty list means a clean tree); outside a git
    checkout, what the submitter passed in HARNESS_GIT_COMMIT / HARNESS_GIT_DIRTY_FILES, else ("unknown", [])."""
    commit, dirty = _git_checkout_state()
    if commit == "unknown" and os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV], json.loads(os.environ.get(GIT_DIRTY_FILES_ENV) or "[]")
    return commit, dirty


def _git_checkout_state() -> tuple[str, list[str]]:
    root = harness.REPO_ROOT
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", []
    return commit, [line[3:] for line in status.splitlines() if line.strip()] if commit != "unknown" else []


def job_env() -> dict:
    """The runtime env that carries this checkout's git state into a Ray job (for `--runtime-env-json`)."""
    commit, dirty = _git_checkout_state()
    if commit == "unknown":
        raise TrackingError("--job-env needs a git checkout (run it in the repository you submit)")
    return {"env_vars": {GIT_COMMIT_ENV: commit, GIT_DIRTY_FILES_ENV: json.dumps(dirty)}}
