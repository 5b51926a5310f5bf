"""What every study must leave in MLflow (the schema in harness/study/tracking.py), checked through MlflowClient."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from harness import names
from harness.config import FIELDS

REPO = Path(__file__).resolve().parent.parent
EVAL = ("lr", "momentum", "train_loss", "test_loss", "test_acc", "images_per_s", "train_seconds", "epoch")
SUMMARY = ("final_acc", "best_acc", "reached_target", "target_acc", "world_size", "bn_batch", "accum_steps",
           "steps_run")
assert set(EVAL) <= set(names.EVAL_METRICS) and set(SUMMARY) <= set(names.SUMMARY_METRICS)


def check_study_runs(uri: str, study: str, n_trials: int, scale: str = "smoke") -> tuple:
    """Assert one parent and one child per trial with the full schema; return (parent, children)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    assert exp is not None, f"no experiment {study} in {uri}"
    assert exp.tags.get(names.EXPERIMENT_KIND) == names.KIND_TRAINING     # the UI opens the runs table
    view = json.loads(exp.tags[names.VIEW_TAG_PREFIX + names.VIEW_KEY])  # the shared view: summary columns
    assert {"metrics.`final_acc`", "metrics.`steps_to_target`", "params.`seed`"} <= set(view["selectedColumns"])
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`harness.role` = 'study'")
    assert len(parents) == 1
    parent = parents[0]
    tags = parent.data.tags
    assert tags["harness.study"] == study and tags["harness.scale"] == scale
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["harness.git_commit"] == (head or "unknown")  # the checkout's commit; "unknown" outside git
    assert tags["harness.git_dirty"] in ("true", "false")
    assert (json.loads(tags[names.GIT_DIRTY_FILES]) != []) == (tags["harness.git_dirty"] == "true")
    assert tags["harness.version"] and "harness.study" in tags["harness.command"]
    assert json.loads(tags["harness.ray_resources"])["CPU"] >= 1
    assert "python -m harness.report" in tags["mlflow.note.content"]
    with open(client.download_artifacts(parent.info.run_id, "study_spec.yaml")) as f:
        spec = yaml.safe_load(f)
    assert spec["name"] == study and spec["scale"] == scale

    children = client.search_runs([exp.experiment_id], filter_string="tags.`harness.role` = 'trial'")
    assert len(children) == n_trials
    assert len({c.data.tags["harness.trial_key"] for c in children}) == n_trials
    for child in children:
        t, p, m = child.data.tags, child.data.params, child.data.metrics
        assert t["mlflow.parentRunId"] == parent.info.run_id
        assert t["harness.status"] in ("completed", "diverged")
        assert {"sys.torch", "sys.cuda", "sys.gpu_model", "sys.gpu_count", "sys.hostnames"} <= set(t)
        assert set(FIELDS) <= set(p) and p["workers"]
        config = json.loads(t[names.TRIAL_CONFIG])                  # the typed config the report reads
        assert set(config) == set(FIELDS) and config["steps"] == int(p["steps"])
        assert child.info.run_name != t[names.CELL] and "=" not in child.info.run_name  # named in words
        assert set(SUMMARY) <= set(m)
        if t["harness.status"] == "diverged":
            assert "diverged_at_step" in m
        history = client.get_metric_history(child.info.run_id, "test_acc")
        steps = [h.step for h in history]
        assert steps == sorted(set(steps)) and len(steps) >= 1  # per-step, no duplicates
        for key in EVAL:
            assert [h.step for h in client.get_metric_history(child.info.run_id, key)] == steps, key
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"trial_config.json", "history.csv"} <= artifacts
        with open(client.download_artifacts(child.info.run_id, "history.csv")) as f:
            rows = list(csv.DictReader(io.StringIO(f.read())))
        assert [int(float(r["step"])) for r in rows] == steps
    return parent, children
