"""A study's MLflow runs -> pandas frames (what `harness.analysis.claims` and `harness.report` read): the
analysis side's one gateway to MLflow, on the public `MlflowClient` API only.

    res = load_study("batch_size_effect")                 # the latest parent run of the study
    res = load_study("batch_size_effect", run="all")      # every invocation (parent run) of the study
    res.parent      # dict: run_id, run_name, start_time, status, tags (harness.*), ... of the newest parent
    res.parents     # list of such dicts (one unless run="all")
    res.trials      # one row per child run: run_id, run_name, cell, cell_title, status, every TrialConfig field,
                    #   summary metrics, `config` (the TrialConfig itself) and `workers`
    res.curves      # long frame: run_id, step, lr, momentum, train_loss, test_loss, test_acc, val_acc, ...

Schema read: the names in harness/names.py. A trial's design is its `harness.trial_config` tag, decoded by
`TrialConfig.from_json` alone: each field's column holds the value as the config held it (an int column stays
int, a field that is None in some trial is an object column holding None, never NaN), and the `config` column
holds the TrialConfig. A run without that tag is left out (with a note): no string is parsed back into a config.
The cell's words (`cell_title`) come from the config and the fields that name the cell (`harness.cell_fields`),
through `names.title`, as the run's name in MLflow does. A summary metric whose name is also a config field
(bn_batch, target_acc) becomes column `<name>_metric`.

Derived columns of `trials`: `outcome_acc` (final_acc; for a diverged run without final_acc its last
test_acc), `steps_to_target_eff` (steps_to_target, or +inf when the target was missed or the run diverged:
AlgoPerf's convention), `train_seconds` (cumulative training time at the end), `images` (steps_run x
batch_size), `scale`, `trial_key`, `parent_run_id`, `error`, `superseded` (False: duplicates are dropped), and
from each run's curve (`curve_outcomes`; NaN without curves): `max_acc_drop`, `evals_below_chance`,
`final_dead_output_frac`, `final_min_class_recall` (the plan's metrics of the same names, harness/plan.py).

The one writer, `log_report`, attaches a finished report to its study (parent) run: files under one artifact
folder, the verdicts as tags (`harness.report` decides what; this module only talks to MLflow).

Curves come from each finished trial's `history.csv` artifact (one download per run, every evaluation metric at
once); a run without it (still running, or errored) gives its metric histories (`get_metric_history`), 16
requests at a time.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import sqlite3
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness import names
from harness.config import FIELDS, TrialConfig
from harness.names import resolve_tracking_uri

CURVE_METRICS = (*names.EVAL_METRICS, "dead_output_frac", "min_class_recall")  # the last two: MLPs (negative_mnist)
CURVE_OUTCOMES = ("max_acc_drop", "evals_below_chance", "final_dead_output_frac", "final_min_class_recall")
ABOVE_CHANCE = 0.10     # evals_below_chance counts evaluations below chance (1 / classes) + this
SUMMARY_METRICS = names.SUMMARY_METRICS
STATUSES = (*names.TRIAL_STATUSES, "running")
SCALES = ("smoke", "quick", "paper")
RUN_CHOICES = "latest, all, or a parent run id"
PARALLEL_REQUESTS = 16


class StudyError(ValueError):
    """The study cannot be loaded. The message is one line: what was wrong and what is allowed."""


@dataclass
class StudyResults:
    study: str
    tracking_uri: str
    parents: list[dict]
    trials: pd.DataFrame
    curves: pd.DataFrame
    experiment_id: str = ""
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def parent(self) -> dict:
        """The newest selected parent run."""
        return self.parents[0]

    def logged_spec(self) -> dict | None:
        """The resolved study spec the newest parent run logged (its `study_spec.yaml` artifact): the
        pre-registered plan the verdicts follow; None for a run without it."""
        import yaml
        try:
            with tempfile.TemporaryDirectory() as d:
                path = mlflow_client(self.tracking_uri).download_artifacts(self.parent["run_id"],
                                                                            names.SPEC_ARTIFACT, d)
                return yaml.safe_load(Path(path).read_text())
        except Exception:  # noqa: BLE001 - a run without the artifact: the study file is the fallback
            return None

    @property
    def scale(self) -> str:
        """The largest scale among the trials (the scale verdicts are computed at)."""
        scales = [s for s in SCALES if s in set(self.trials.get("scale", pd.Series(dtype=str)))]
        return scales[-1] if scales else str(self.parent["tags"].get(names.SCALE, "unknown"))


# ------------------------------------------------------------------------------------------------ store
def check_readable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise StudyError unless the store exists and answers. Never creates a store (reading only)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise StudyError(f"no MLflow store at {path} (file not found); run a study first or pass "
                             f"--tracking-uri sqlite:///<path>/mlflow.db (or set MLFLOW_TRACKING_URI)")
        try:  # read-only look first: MLflow would create its tables in any sqlite file it is given
            with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as con:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as e:
            raise StudyError(f"{path} is not a readable sqlite database ({e}); pass another --tracking-uri") from None
        if not {"experiments", "runs", "metrics"} <= tables:
            raise StudyError(f"{path} is not an MLflow store (no experiments/runs tables); pass another --tracking-uri")
    elif uri.startswith("file:"):
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):])
        if not path.is_dir():
            raise StudyError(f"no MLflow file store at {path} (folder not found); pass --tracking-uri")
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                ok = resp.status == 200
        except Exception as e:
            raise StudyError(f"MLflow server at {uri} does not answer ({type(e).__name__}); start it or pass "
                             f"another --tracking-uri") from None
        if not ok:
            raise StudyError(f"MLflow server at {uri} answered /health with HTTP {resp.status}")


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _search_all(client, exp_ids: list[str], filter_string: str, order_by=None) -> list:
    out, token = [], None
    while True:
        page = client.search_runs(exp_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def list_studies(uri: str) -> list[str]:
    """Names of the experiments in the store that have at least one study (parent) run."""
    client = mlflow_client(uri)
    studies = []
    for exp in client.search_experiments():
        found = client.search_runs([exp.experiment_id], f"tags.`{names.ROLE}` = '{names.ROLE_STUDY}'", max_results=1)
        if found:
            studies.append(exp.name)
    return sorted(studies)


def log_report(uri: str, run_id: str, files: list[Path], folder: str, tags: dict[str, str], prefix: str) -> list[str]:
    """Attach a report to a run, replacing the previous one: `files` under the artifact folder `folder` (a file of
    the same name is overwritten in place), `tags` set, and every other tag of the run whose key starts with
    `prefix` deleted (a comparison that is no longer in the plan). Returns the deleted keys. Public MlflowClient
    calls only, failing fast over HTTP; raises what MLflow raises (a store that refuses writes): the caller
    decides what a refused write means."""

    client = mlflow_client(uri)
    with names.short_http_retries():
        for path in files:
            client.log_artifact(run_id, str(path), folder)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        stale = sorted(k for k in client.get_run(run_id).data.tags if k.startswith(prefix) and k not in tags)
        for key in stale:
            client.delete_tag(run_id, key)
    return stale


# ------------------------------------------------------------------------------------------------ loading
def load_study(study: str, tracking_uri: str | None = None, run: str = "latest", curves: bool = True,
               check: bool = True, metrics=CURVE_METRICS, scale: str | None = None) -> StudyResults:
    """Load one study's parent run(s) and trial runs. Raises StudyError (one line) on bad input."""
    t0 = time.perf_counter()
    uri = resolve_tracking_uri(tracking_uri)
    if check:
        check_readable(uri)
    client = mlflow_client(uri)
    exp = _experiment(client, uri, study)
    selected = study_runs(client, exp.experiment_id, study, uri, run, scale)
    parent_ids = {p.info.run_id for p in selected}
    children = [r for r in _search_all(client, [exp.experiment_id], f"tags.`{names.ROLE}` = '{names.ROLE_TRIAL}'")
                if r.data.tags.get(names.PARENT_RUN_ID) in parent_ids]
    t_search = time.perf_counter()
    if not children:
        which = "its latest parent run" if run == "latest" else f"run {run}" if run != "all" else "any parent run"
        raise StudyError(f"study '{study}' has no trial runs under {which} "
                         f"({', '.join(sorted(parent_ids))}); nothing to report")
    trials, notes = _trials_frame(children)
    t_trials = time.perf_counter()
    curve_frame = load_curves(client, list(trials["run_id"]), metrics) if curves else _empty_curves(metrics)
    t_curves = time.perf_counter()
    trials = _add_curve_fallbacks(trials, curve_frame)
    return StudyResults(
        study=study, tracking_uri=uri, parents=[_parent_dict(p) for p in selected], trials=trials,
        curves=curve_frame, experiment_id=exp.experiment_id, notes=notes,
        timings={"search_s": t_search - t0, "trials_s": t_trials - t_search, "curves_s": t_curves - t_trials,
                 "total_s": t_curves - t0, "runs": len(trials)})


def _experiment(client, uri: str, study: str):
    try:
        exp = client.get_experiment_by_name(study)
    except Exception as e:
        raise StudyError(f"MLflow store {uri} cannot be read: {type(e).__name__}: {str(e).splitlines()[0]}") \
            from None
    if exp is None:
        known = list_studies(uri)
        raise StudyError(f"no study '{study}' in {uri}; studies there: {', '.join(known) or 'none'}")
    return exp


def study_runs(client, exp_id: str, study: str, uri: str, run: str = "latest", scale: str | None = None) -> list:
    """The study's parent runs that `run` selects (latest, all, or one run id), newest first; at `scale` if given."""
    where = f"tags.`{names.ROLE}` = '{names.ROLE_STUDY}'" + (f" and tags.`{names.SCALE}` = '{scale}'" if scale else "")
    parents = _search_all(client, [exp_id], where, order_by=["attributes.start_time DESC"])
    if not parents:
        at = f" at scale {scale}" if scale else ""
        raise StudyError(f"study '{study}' in {uri} has no study (parent) runs{at}; run the study first")
    if run == "latest":
        return parents[:1]
    if run == "all":
        return parents
    selected = [p for p in parents if p.info.run_id == run]
    if not selected:
        ids = ", ".join(f"{p.info.run_id} ({p.info.run_name})" for p in parents[:10])
        raise StudyError(f"run '{run}' is not a parent run of study '{study}'; use {RUN_CHOICES} "
                         f"(parent runs: {ids})")
    return selected


def _parent_dict(run) -> dict:
    return {
        "run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
        "start_time": _ts(run.info.start_time), "end_time": _ts(run.info.end_time),
        "tags": {k: v for k, v in run.data.tags.items() if k.startswith(("harness.", "sys."))},
        "params": dict(run.data.params), "metrics": dict(run.data.metrics),
    }


def _ts(ms) -> pd.Timestamp | None:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def _trial_row(r, config: TrialConfig) -> dict[str, Any]:
    tags, m = r.data.tags, r.data.metrics
    status = tags.get(names.STATUS)
    if status not in STATUSES:
        status = "running" if r.info.status in ("RUNNING", "SCHEDULED") else "error"
    cell_fields = json.loads(tags.get(names.CELL_FIELDS) or "[]")
    row: dict[str, Any] = {
        "run_id": r.info.run_id, "run_name": r.info.run_name, "parent_run_id": tags.get(names.PARENT_RUN_ID),
        "trial_key": tags.get(names.TRIAL_KEY, r.info.run_id), "cell": tags.get(names.CELL, "all"),
        "cell_title": names.title(config, cell_fields), "_cell_order": _order_key(config, cell_fields),
        "status": status, "error": tags.get(names.ERROR, ""), "scale": tags.get(names.SCALE, ""),
        "mlflow_status": r.info.status, "start_time": _ts(r.info.start_time), "end_time": _ts(r.info.end_time),
        **config.to_dict(), "config": config,
    }
    workers = r.data.params.get(names.WORKERS_PARAM)
    row["workers"] = int(workers) if workers and workers.isdigit() else None
    for k in SUMMARY_METRICS:
        row[f"{k}_metric" if k in FIELDS else k] = m.get(k, math.nan)
    if config.kind == "lr_finder":
        row.update({k: m.get(k, math.nan) for k in names.FINDER_SUMMARY_METRICS})
    for k in ("train_seconds", "epoch", "images_per_s", "test_acc", "val_acc", "lr"):
        row[f"last_{k}"] = m.get(k, math.nan)
    row.update({k: v for k, v in tags.items() if k.startswith(names.SYS_PREFIX)})
    return row


def _trials_frame(runs) -> tuple[pd.DataFrame, list[str]]:
    rows, untyped = [], 0
    for r in runs:
        text = r.data.tags.get(names.TRIAL_CONFIG)
        if not text:
            untyped += 1
            continue
        rows.append(_trial_row(r, TrialConfig.from_json(text)))
    notes = [f"{untyped} trial run(s) without the typed config tag ({names.TRIAL_CONFIG}) were left out"] \
        if untyped else []
    if not rows:
        raise StudyError(f"none of the study's {len(runs)} trial runs has the typed config tag {names.TRIAL_CONFIG} "
                         "(runs written by an older harness); rerun the study")
    df = pd.DataFrame(rows)
    for f in FIELDS:  # None stays None: a column that pandas would fill with NaN holds the configs' own values
        values = [row[f] for row in rows]
        if any(v is None for v in values) or any(isinstance(v, list) for v in values):
            df[f] = pd.Series(values, index=df.index, dtype=object)
    for col in ("final_acc", "best_acc", "steps_to_target", "seconds_to_target", "steps_run", "reached_target",
                "diverged_at_step"):
        if col not in df:
            df[col] = math.nan
    # duplicates of one trial (only possible across parent runs): keep a finished outcome, then the newest
    rank = df["status"].map({"completed": 0, "diverged": 0, "running": 1, "error": 2})
    df = df.assign(_rank=rank).sort_values(["_rank", "start_time"], ascending=[True, False])
    dup = df.duplicated("trial_key", keep="first")
    if dup.any():
        notes.append(f"{int(dup.sum())} older run(s) of the same trial (same trial key) were ignored")
    df = df[~dup].drop(columns="_rank")
    df["superseded"] = False
    order = sorted(df.index, key=lambda i: (df.at[i, "_cell_order"], _value_key(df.at[i, "seed"]),
                                            df.at[i, "run_name"]))
    return df.loc[order].drop(columns="_cell_order").reset_index(drop=True), notes


def _value_key(v) -> tuple:
    """Sorts values of one field: None first, then numbers by value, then text."""
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, numbers.Real):
        return (1, float(v), "")
    return (2, 0.0, json.dumps(v, default=str))


def _order_key(config: TrialConfig, fields: list[str]) -> tuple:
    """Natural order of cells from their typed values (batch 256 before batch 1024)."""
    d = config.to_dict()
    return tuple((f, _value_key(d.get(f))) for f in fields)


def schedule_curves(trials: pd.DataFrame) -> pd.DataFrame:
    """Columns cell, step, lr, momentum: every optimizer step of each cell's schedule, computed by
    harness.trial.schedules from the cell's typed config (the seeds of a cell share it), not sampled at
    evaluations."""
    from harness.trial import schedules

    parts = []
    for cell, rows in trials.groupby("cell", sort=False):
        curve = schedules.curve(rows["config"].iloc[0])
        curve.insert(0, "cell", cell)
        parts.append(curve)
    if not parts:
        return pd.DataFrame(columns=["cell", "step", "lr", "momentum"])
    return pd.concat(parts, ignore_index=True)


def _add_curve_fallbacks(df: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    acc = df["final_acc"].astype(float)
    last = df["last_test_acc"].astype(float)
    df["outcome_acc"] = np.where(acc.notna(), acc, np.where(df["status"] == "diverged", last, np.nan))
    reached = df["steps_to_target"].astype(float)
    df["steps_to_target_eff"] = np.where(reached.notna() & (df["status"] != "diverged"), reached, np.inf)
    df.loc[df["status"].isin(["error", "running"]), "steps_to_target_eff"] = np.nan
    df["train_seconds"] = df["last_train_seconds"].astype(float)
    steps = df["steps_run"].astype(float).fillna(df["steps"].astype(float))
    df["steps_done"] = steps
    df["images"] = steps * df["batch_size"].astype(float)
    return curve_outcomes(df, curves)


def curve_outcomes(trials: pd.DataFrame, curves: pd.DataFrame | None) -> pd.DataFrame:
    """`trials` with the columns CURVE_OUTCOMES, each read from the run's evaluations in `curves` (the logged
    test-accuracy curve as the store returns it; NaN for a run without one):
      max_acc_drop            the largest fall of test accuracy from one evaluation to the next (0: it never fell);
      evals_below_chance      evaluations with test accuracy below 1 / classes + ABOVE_CHANCE, every evaluation
                              counted; a diverged run also counts each planned evaluation after it stopped;
      final_dead_output_frac  the last logged dead_output_frac (output units <= 0 for every test image);
      final_min_class_recall  the last logged min_class_recall (the worst class's test recall)."""
    from harness.config import NUM_CLASSES
    df = trials.copy()
    for col in CURVE_OUTCOMES:
        df[col] = np.nan
    if curves is None or curves.empty or "test_acc" not in curves or df.empty:
        return df
    cv = typed_curves(curves[curves["run_id"].isin(set(df["run_id"]))]).sort_values(["run_id", "step"])
    acc = cv.dropna(subset=["test_acc"])    # a kind of run without test accuracy (a finder) keeps NaN outcomes
    if acc.empty:
        return df
    runs = acc.groupby("run_id")
    info = df.set_index("run_id")
    drops = (-runs["test_acc"].diff()).groupby(acc["run_id"]).max().fillna(0.0)
    df["max_acc_drop"] = df["run_id"].map(drops.clip(lower=0.0) + 0.0)   # + 0.0: no -0.0 in the tables
    chance = 1.0 / info["dataset"].map(NUM_CLASSES).astype(float)
    below = (acc["test_acc"] < acc["run_id"].map(chance + ABOVE_CHANCE).astype(float)).groupby(acc["run_id"]).sum()
    if "status" in info:
        last = runs["step"].max()
        below = below + pd.Series({rid: _evaluations_after(info.loc[rid], int(step)) if info.at[rid, "status"] ==
                                   "diverged" else 0 for rid, step in last.items()}, dtype=float)
    df["evals_below_chance"] = df["run_id"].map(below.astype(float))
    for metric, col in (("dead_output_frac", "final_dead_output_frac"), ("min_class_recall", "final_min_class_recall")):
        if metric in cv:
            values = cv.dropna(subset=[metric])
            df[col] = df["run_id"].map(values.groupby("run_id")[metric].last()).astype(float)
    return df


def _evaluations_after(config: pd.Series, step: int) -> int:
    """How many of the trial's planned evaluations (every eval_every steps, and the last step) come after `step`."""
    steps, every = int(config["steps"]), int(config["eval_every"])
    return max(0, steps // every - step // every) + int(steps % every != 0 and steps > step)


# ------------------------------------------------------------------------------------------------ curves
def _empty_curves(metrics=CURVE_METRICS) -> pd.DataFrame:
    return typed_curves(pd.DataFrame(columns=["run_id", "step", *metrics]), metrics)


def typed_curves(frame: pd.DataFrame, metrics=()) -> pd.DataFrame:
    """The curves frame's one schema: run_id text, step int64, every other column (each of `metrics`, added if
    missing) float64. A metric a kind of run does not log (a finder has no test accuracy) is NaN, never a text or
    object column that a later comparison or mean would trip over, also when no run logged it or no run is left."""
    frame = frame.copy()
    for k in metrics:
        if k not in frame:
            frame[k] = np.nan
    for k in frame.columns:
        if k == "run_id":
            frame[k] = frame[k].astype(str)
        elif k == "step":
            frame[k] = pd.to_numeric(frame[k], errors="coerce").astype("int64")
        else:
            frame[k] = pd.to_numeric(frame[k], errors="coerce").astype("float64")
    return frame


def load_curves(client, run_ids: list[str], metrics=CURVE_METRICS) -> pd.DataFrame:
    """One row per (run, evaluation step), one column per metric: each run's history.csv artifact, else (a run
    that has not finished) its metric histories; PARALLEL_REQUESTS runs at a time."""
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(PARALLEL_REQUESTS) as pool:
        parts = list(pool.map(lambda rid: _run_curve(client, rid, metrics, tmp), run_ids))
    parts = [p for p in parts if len(p)]
    if not parts:
        return _empty_curves(metrics)
    wide = typed_curves(pd.concat(parts, ignore_index=True), metrics)
    return wide[["run_id", "step", *metrics]].sort_values(["run_id", "step"]).reset_index(drop=True)


def _run_curve(client, run_id: str, metrics, tmp: str) -> pd.DataFrame:
    try:
        path = client.download_artifacts(run_id, names.HISTORY_ARTIFACT, os.path.join(tmp, run_id))
        frame = pd.read_csv(path)
    except Exception:  # noqa: BLE001 - no history.csv yet (running, errored): the metric histories instead
        frame = None
    if frame is not None and "step" in frame and len(frame):
        frame.insert(0, "run_id", run_id)
        return frame[["run_id", "step", *[k for k in metrics if k in frame]]]
    points = [(run_id, key, m.step, m.value) for key in metrics for m in client.get_metric_history(run_id, key)]
    if not points:
        return pd.DataFrame()
    long = pd.DataFrame(points, columns=["run_id", "key", "step", "value"])
    long = long.drop_duplicates(["run_id", "key", "step"], keep="last")  # a repeated step: the last value wins
    wide = long.pivot(index=["run_id", "step"], columns="key", values="value").reset_index()
    wide.columns.name = None
    return wide
