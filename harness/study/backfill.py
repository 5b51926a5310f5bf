"""`python -m harness.study.backfill NAME`: fill MLflow in from Ray's storage after a long tracking outage.

A trial whose tracking store stayed unreachable past HARNESS_TRACKING_GRACE_S still completes; what it
could not log stays in Tune's results of the study (`<storage>/<NAME>-<scale>[-n]/<trial>/result.json`: one
row per evaluation, then the trial's final row with its summary and system tags; `params.json`: the trial's
config and its MLflow parent run). This command replays those rows through the same buffered TrialLogger
the workers use, so it is idempotent: runs are found by trial key, steps already logged are skipped, and a
trial whose run is complete is left untouched. The study run gets its final status when every trial ended.

    python -m harness.study.backfill NAME [--scale smoke] [--storage ray_results] [--tracking-uri URI]

Exit codes: 0 when MLflow now holds every trial's results, 1 when the store is still unreachable or some
trial could not be filled in, 2 for bad input (no such study results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from harness import names
from harness.spec import Trial
from harness.study import cluster, tracking

NONE_AS = -1  # the worker's final report writes None (steps_to_target never reached...) as -1; no summary
              # metric can be negative otherwise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.study.backfill",
                                description="Log to MLflow what a study's trials kept in Ray's storage while "
                                            "the tracking store was unreachable.")
    p.add_argument("name", help="study name (as given to harness.study)")
    p.add_argument("--scale", help="the study's scale (default: the most recent run of NAME in --storage)")
    p.add_argument("--storage", default=os.environ.get("HARNESS_STORAGE") or "ray_results",
                   help="the study's --storage: a folder or s3://, gs:// URI (default $HARNESS_STORAGE, else "
                        "./ray_results)")
    p.add_argument("--tracking-uri", help="MLflow store (default: the one the study logged to)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    storage = cluster.resolve_storage(args.storage)
    name = Path(args.name).stem  # a study path works too
    prefix = f"{name}-{args.scale}" if args.scale else f"{name}-"
    runs = [cluster.storage_join(storage, e) for e in cluster.storage_list(storage)
            if e.startswith(prefix) and cluster.storage_exists(cluster.storage_join(storage, e, "tuner.pkl"))]
    if not runs:
        print(f"error: no Ray results of study {name}{' at scale ' + args.scale if args.scale else ''} in "
              f"{storage}; pass the study's --storage and --scale", file=sys.stderr)
        return 2
    exp_path = max(runs, key=lambda r: cluster.storage_mtime(cluster.storage_join(r, "tuner.pkl")))
    trials = [cluster.storage_join(exp_path, e) for e in sorted(cluster.storage_list(exp_path))
              if cluster.storage_exists(cluster.storage_join(exp_path, e, "params.json"))]
    print(f"back-filling MLflow from {exp_path}: {len(trials)} trials", flush=True)
    filled = complete = failed = 0
    parents: dict[tuple[str, str], bool] = {}
    for folder in trials:
        config = json.loads(cluster.storage_read(cluster.storage_join(folder, "params.json")))
        track = config["tracking"]
        uri = tracking.resolve_tracking_uri(args.tracking_uri or track["uri"])
        rows = _rows(cluster.storage_join(folder, "result.json"))
        final = next((r for r in rows if r.get("finished")), None)
        parents[(uri, track["parent_run_id"])] = parents.get((uri, track["parent_run_id"]), True) and bool(final)
        state = backfill_trial(uri, track, config, rows, final)
        filled += state == "filled"
        complete += state == "complete"
        failed += state == "failed"
    for (uri, parent), all_ended in parents.items():
        if all_ended and not failed:
            tracking.end_study_run(uri, parent, "FINISHED")
    print(f"{filled} trials back-filled, {complete} already complete, {failed} failed")
    return 1 if failed else 0


def backfill_trial(uri: str, track: dict, config: dict, rows: list[dict], final: dict | None) -> str:
    """Deliver one trial's rows; 'complete' (nothing to do), 'filled' or 'failed'."""
    trial = Trial.from_tune(config["trial"])
    records, seen = [], set()
    for r in rows:
        if not r.get("finished") and "test_acc" in r and r["step"] not in seen:  # a restarted worker repeats steps
            seen.add(r["step"])
            records.append({k: r[k] for k in ("step", *tracking.EVAL_METRICS) if k in r})
    if _is_complete(uri, track, trial, records, final):
        return "complete"
    logger = tracking.TrialLogger(uri, experiment_id=track["experiment_id"], parent_run_id=track["parent_run_id"],
                                  trial=trial, history=records, grace_s=0, mark_running=False)
    logger.start(config["resources"]["workers"], (final or {}).get("system_tags", {}))
    if final is None:  # an unfinished or errored trial: its curves, not a status
        return "filled" if logger.drain() else "failed"
    summary = {k: (None if v == NONE_AS else v) for k, v in final.items()
               if k in tracking.SUMMARY_METRICS}
    summary["status"] = final["trial_status"]
    return "filled" if logger.finish(summary, records) else "failed"


def _is_complete(uri: str, track: dict, trial: Trial, records: list[dict], final: dict | None) -> bool:
    try:
        with tracking.short_http_retries():
            client = tracking.mlflow_client(uri)
            found = client.search_runs([track["experiment_id"]], filter_string=(
                f"tags.`{names.TRIAL_KEY}` = '{trial.key}' and "
                f"tags.`{names.PARENT_RUN_ID}` = '{track['parent_run_id']}'"), max_results=1)
            if not found:
                return False
            run = found[0]
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")]
    except Exception:
        return False  # TrialLogger reports the store's state
    done = final is None or (run.info.status == "FINISHED" and "steps_run" in run.data.metrics)
    return done and steps == [r["step"] for r in records]


def _rows(path: str) -> list[dict]:
    if not cluster.storage_exists(path):
        return []
    return [json.loads(line) for line in cluster.storage_read(path).splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
