"""Every MLflow name the harness writes (harness.study.tracking) and reads (harness.analysis.results, claims, report).

One place, so a writer and a reader cannot drift apart: a tag renamed here is renamed for both.

    parent run (one per `python -m harness.study` invocation)     child run (one per trial)
      tags   ROLE=study, STUDY, SCALE, CLAIMS, QUESTION,            tags   PARENT_RUN_ID, ROLE=trial, STUDY, SCALE,
             GIT_COMMIT, GIT_DIRTY, GIT_DIRTY_FILES, VERSION,              TRIAL_KEY, CELL, TRIAL_CONFIG (the typed
             COMMAND, RAY_RESOURCES, HARDWARE, TUNE_PATH, NOTE              config as JSON), STATUS, ERROR,
      artifact SPEC_ARTIFACT                                               RESUMED_FROM_STEP, sys.* (SYSTEM_TAGS)
    experiment tag EXPERIMENT_KIND = KIND_TRAINING                  params the flattened config + WORKERS_PARAM
                                                                    metrics EVAL_METRICS (step = optimizer step),
                                                                            SUMMARY_METRICS (at the last step)
                                                                    artifacts CONFIG_ARTIFACT, HISTORY_ARTIFACT
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# ---- MLflow's own tags
PARENT_RUN_ID = "mlflow.parentRunId"      # nests a trial under its study run in the UI
NOTE = "mlflow.note.content"              # the run's description (Markdown) in the UI
EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3 UI: which view an experiment opens in
KIND_TRAINING = "custom_model_development"  # the model-training view (runs table), not the GenAI overview
# MLflow 3.17's UI ignores EXPERIMENT_KIND when its global GenAI/Model-training switch (browser storage, GenAI by
# default) is on, and keeps the runs table's columns in browser storage. What it does read from the server: a
# shared view, an experiment tag VIEW_TAG_PREFIX + key holding the table's state as JSON, opened by the URL below.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "harness"
RUNS_VIEW_URL = "#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=" + VIEW_KEY

# ---- tags on both kinds of run
ROLE = "harness.role"
ROLE_STUDY, ROLE_TRIAL = "study", "trial"
STUDY = "harness.study"
SCALE = "harness.scale"

# ---- tags of the study (parent) run
CLAIMS = "harness.analysis.claims"                 # comma-separated claim IDs
QUESTION = "harness.question"
GIT_COMMIT = "harness.git_commit"
GIT_DIRTY = "harness.git_dirty"           # "true" / "false"
GIT_DIRTY_FILES = "harness.git_dirty_files"  # JSON list of the modified tracked files (empty when clean)
VERSION = "harness.version"
COMMAND = "harness.command"
RAY_RESOURCES = "harness.ray_resources"   # JSON
HARDWARE = "harness.hardware"
TUNE_PATH = "harness.tune_path"           # Ray's experiment folder: finds the parent again on --resume

# ---- tags of a trial (child) run
TRIAL_KEY = "harness.trial_key"           # finds the run again after a restart
CELL = "harness.cell"                     # the cell as field=value,...: a grouping key, never parsed
CELL_FIELDS = "harness.cell_fields"       # JSON list: the config fields that name the trial's cell (its words)
TRIAL_CONFIG = "harness.trial_config"     # json.dumps(TrialConfig.to_dict()): the typed config the report reads
STATUS = "harness.status"                 # one of TRIAL_STATUSES
ERROR = "harness.error"
RESUMED_FROM_STEP = "harness.resumed_from_step"
SYS_PREFIX = "sys."
SYSTEM_TAGS = ("sys.torch", "sys.cuda", "sys.gpu_model", "sys.gpu_count", "sys.hostnames", "sys.python")
TRIAL_STATUSES = ("completed", "diverged", "error")

# ---- params, metrics, artifacts
WORKERS_PARAM = "workers"
EVAL_METRICS = ("epoch", "lr", "momentum", "train_loss", "test_loss", "test_acc", "val_loss", "val_acc",
                "images_per_s", "train_seconds")
SUMMARY_METRICS = ("final_acc", "final_val_acc", "best_acc", "reached_target", "steps_to_target", "seconds_to_target",
                   "target_acc",
                   "diverged_at_step", "world_size", "bn_batch", "accum_steps", "steps_run", "startup_seconds")
# logged when a record has them: MLPs' dead output units; an LR finder's sweep (kind lr_finder) and suggestions
EXTRA_EVAL_METRICS = ("dead_output_frac", "smoothed_loss", "batch_val_loss", "batch_val_acc", "train_batch_acc",
                      "min_class_recall")  # negative_mnist: the worst class's test recall (harness.analysis.results)
FINDER_SUMMARY_METRICS = ("lr_steepest", "lr_valley", "lr_smith", "lr_smith_base", "lr_smith_base_min",
                          "finder_stopped_early")
SPEC_ARTIFACT = "study_spec.yaml"
REPORT_ARTIFACT_DIR = "report"            # harness.report: the PDF, its Markdown twin and the verdicts CSV on the
                                          # study (parent) run, overwritten in place by the next report
VERDICT_TAG_PREFIX = "harness.verdict."   # + claim ID + "." + slug of the comparison: one tag per planned comparison
                                          # on the parent run, value "<verdict word>: <observed difference>"
CONFIG_ARTIFACT = "trial_config.json"
HISTORY_ARTIFACT = "history.csv"

MAX_TAG_CHARS = 8000   # mlflow.utils.validation.MAX_TAG_VAL_LENGTH in MLflow 3.17

# ---- words for people (run names in the MLflow UI, cell labels in the report)
SCHEDULE_WORDS = {"one_cycle": "one-cycle", "one_cycle_cos": "one-cycle (cosine)", "multistep": "multistep",
                  "triangular": "CLR triangular", "triangular2": "CLR triangular2", "constant": "constant LR",
                  "cosine": "cosine", "range_test": "LR range test"}
FIELD_WORDS = {"batch_size": "batch {}", "bn_batch": "BN batch {}", "max_lr": "max LR {}", "base_lr": "base LR {}",
               "lr_scale": "LR x{}", "seed": "seed {}", "weight_decay": "WD {}", "momentum": "momentum {}",
               "train_size": "{} train images", "steps": "{} steps", "stepsize": "stepsize {}",
               "cycle_momentum": "cyclic momentum {}", "val_size": "{} held out", "bn_momentum": "BN momentum {}",
               "milestones": "drops at {}", "workers": "{} workers", "mlp_activation": "{} activation",
               "invert_images": "inverted images {}", "optimizer": "{}"}
ACTIVATION_WORDS = {"relu": "ReLU", "tanh": "tanh", "sigmoid": "sigmoid", "square400": "x*x*400",
                    "square1": "x*x", "square20": "x*x*20"}
BOOL_WORDS = {"invert_images": ("inverted images", "plain images"), "mlp_final_relu": ("final ReLU", "no final ReLU"),
              "cycle_momentum": ("cyclical momentum", "constant momentum"),
              "nesterov": ("Nesterov", "no Nesterov"),
              "zero_grad": ("gradients zeroed", "gradients never zeroed")}    # (True, False) in words
TITLE_ORDER = ("dataset", "model", "optimizer", "nesterov", "batch_size", "bn_batch", "schedule", "train_size",
               "weight_decay", "momentum", "cycle_momentum", "stepsize", "steps", "max_lr", "base_lr", "lr_scale",
               "seed")


def value_words(field: str, value) -> str:
    """One field's value in words: ('schedule', 'one_cycle') -> 'one-cycle', ('batch_size', 1000) -> 'batch 1000'."""
    if field == "schedule":
        return SCHEDULE_WORDS.get(str(value), str(value))
    if isinstance(value, bool):
        on, off = BOOL_WORDS.get(field, (f"{field.replace('_', ' ')} on", f"{field.replace('_', ' ')} off"))
        return on if value else off
    if field == "mlp_activation":
        value = ACTIVATION_WORDS.get(str(value), str(value))
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    elif value is None:
        text = "all" if field == "train_size" else "none"
    else:
        text = str(value)
    return FIELD_WORDS.get(field, f"{field.replace('_', ' ')} {{}}").format(text)


def title(config, fields, empty: str = "all trials") -> str:
    """The named fields of a config (a TrialConfig, or its dict) in words, in a fixed order: 'batch 1000,
    one-cycle, LR x0.5, seed 0'. The one vocabulary of run names in MLflow, cells in the report and the console."""
    config = config if isinstance(config, dict) else config.to_dict()
    fields = list(dict.fromkeys(fields))
    order = [f for f in TITLE_ORDER if f in fields] + [f for f in fields if f not in TITLE_ORDER]
    order = [f for f in order if f != "seed"] + [f for f in order if f == "seed"]  # the seed last
    return ", ".join(value_words(f, config.get(f)) for f in order if f in config) or empty


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Where the runs are: --tracking-uri > $MLFLOW_TRACKING_URI > sqlite:///<abs cwd>/mlflow.db, relative paths
    made absolute (Ray workers change directory). The writer (harness.study) and the reader (harness.analysis)
    both ask here."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif uri.startswith("file:") or "://" not in uri:
        path = uri.removeprefix("file:")
        uri = Path(path.removeprefix("//")).resolve().as_uri()
    return uri


SHORT_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


@contextlib.contextmanager
def short_http_retries():
    """MLflow's client retries a failed HTTP call 7 times with backoff (~4 minutes) and times out after 120 s;
    the harness's own buffer does the waiting, so its calls fail fast (the variables are read per call)."""
    saved = {k: os.environ.get(k) for k in SHORT_HTTP_RETRIES}
    os.environ.update({k: v for k, v in SHORT_HTTP_RETRIES.items() if saved[k] is None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
