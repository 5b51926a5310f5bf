"""The LR finder's figure, fastai style: smoothed training loss against the LR (log axis), one line per finder
run, with the suggestions marked (steepest descent, valley, Smith's max LR); beside it the batch accuracy
against the LR where the finder scored validation batches.

    runs, sweeps = load_finder(uri, "activation_mystery_finder")   # rows of MLflow finder runs, their sweeps
    draw_finder(fig, rect, runs, sweeps)                              # into a page of the report
    python -m harness.report_finder STUDY [--tracking-uri URI] [--out PDF]   # the figure on its own
"""

from __future__ import annotations

import argparse
import json
import sys

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from harness import names

MARKERS = {"lr_steepest": ("v", "steepest"), "lr_valley": ("o", "valley"), "lr_smith": ("*", "Smith max")}
SWEEP = ("lr", "train_loss", "smoothed_loss", "batch_val_acc")


def load_finder(uri: str, study: str, scale: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, sweeps) of the lr_finder runs of the study's latest invocation (at `scale` if given).
    runs: run_id, cell, run_name, params..., the suggestion metrics; sweeps: run_id, step, lr, train_loss, ..."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        raise LookupError(f"no study '{study}' in the MLflow store {uri}")
    where = "tags.`harness.role` = 'study'" + (f" and tags.`harness.scale` = '{scale}'" if scale else "")
    parents = client.search_runs([exp.experiment_id], filter_string=where, order_by=["attributes.start_time DESC"],
                                 max_results=1)
    if not parents:
        raise LookupError(f"study '{study}' has no run{' at scale ' + scale if scale else ''} in {uri}")
    found = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}' and params.kind = 'lr_finder'"), max_results=10000)
    rows, points = [], []
    for r in found:
        config = json.loads(r.data.tags.get(names.TRIAL_CONFIG) or "{}")  # typed; absent on runs of old versions
        rows.append({"run_id": r.info.run_id, "run_name": r.info.run_name, "cell": r.data.tags.get(names.CELL),
                     "config": config or dict(r.data.params), **r.data.params,
                     **{k: r.data.metrics.get(k) for k in MARKERS}})
        for key in SWEEP:
            points += [{"run_id": r.info.run_id, "step": m.step, "key": key, "value": m.value}
                       for m in client.get_metric_history(r.info.run_id, key)]
    _label_in_words(rows)
    sweeps = pd.DataFrame(points, columns=["run_id", "step", "key", "value"])
    if len(sweeps):
        sweeps = sweeps.pivot_table(index=["run_id", "step"], columns="key", values="value").reset_index()
    return pd.DataFrame(rows), sweeps


def _label_in_words(rows: list[dict]) -> None:
    """Each run's `label`: the fields that differ between the finder's cells, in words ('x*x*400 activation')."""
    fields = sorted({k for r in rows for k in r["config"]} - {"seed", "data_seed"})
    varying = [f for f in fields if len({json.dumps(r["config"].get(f), sort_keys=True) for r in rows}) > 1]
    for r in rows:
        r["label"] = names.title(r["config"], varying) if varying else "all runs"


def draw_finder(fig: Figure, rect, runs: pd.DataFrame, sweeps: pd.DataFrame) -> None:
    """Loss (and, if scored, batch accuracy) against the LR on a log axis, suggestions marked per run."""
    left, bottom, width, height = rect
    with_acc = "batch_val_acc" in sweeps and sweeps["batch_val_acc"].notna().any()
    gs = fig.add_gridspec(1, 2 if with_acc else 1, left=left + 0.06, right=left + width - 0.02,
                          bottom=bottom + 0.12, top=bottom + height - 0.08, wspace=0.3)
    ax = fig.add_subplot(gs[0, 0])
    cells = sorted(runs["label"].unique()) if len(runs) else []
    colors = dict(zip(cells, sns.color_palette("colorblind", max(len(cells), 1)), strict=False))
    for _, run in runs.iterrows():
        s = sweeps[sweeps["run_id"] == run["run_id"]].sort_values("step")
        if s.empty:
            continue
        color = colors[run["label"]]
        ax.plot(s["lr"], s["smoothed_loss"], color=color, lw=1.2,
                label=run["label"] if run["run_id"] == runs[runs["label"] == run["label"]]["run_id"].iloc[0] else None)
        for key, (marker, _) in MARKERS.items():
            lr = run.get(key)
            if lr is not None and pd.notna(lr):
                y = s.iloc[(s["lr"] - lr).abs().argmin()]["smoothed_loss"]
                ax.plot([lr], [y], marker=marker, color=color, ms=8, mec="black", ls="none")
    for key, (marker, name) in MARKERS.items():
        ax.plot([], [], marker=marker, color="grey", mec="black", ls="none", label=name)
    ax.set_xscale("log")
    if len(sweeps) and sweeps["smoothed_loss"].notna().any():  # fastai's view: up to the start, not the blow-up
        first = sweeps.sort_values("step").groupby("run_id")["smoothed_loss"].first().max()
        ax.set_ylim(0.9 * sweeps["smoothed_loss"].min(), 1.3 * first)
    ax.set_xlabel("learning rate (log)")
    ax.set_ylabel("smoothed training loss")
    ax.set_title("LR finder: loss vs LR", fontsize=10)
    ax.legend(fontsize=8)
    if with_acc:
        ax2 = fig.add_subplot(gs[0, 1])
        for _, run in runs.iterrows():
            s = sweeps[sweeps["run_id"] == run["run_id"]].sort_values("step")
            ax2.plot(s["lr"], s["batch_val_acc"], color=colors[run["label"]], lw=0.8, alpha=0.8)
        ax2.set_xscale("log")
        ax2.set_xlabel("learning rate (log)")
        ax2.set_ylabel("accuracy on the next test batch")
        ax2.set_title("Smith's reading: where accuracy peaks", fontsize=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.report_finder",
                                description="Draw an LR finder study's sweeps and suggestions (PDF).")
    p.add_argument("study")
    p.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--scale", help="the scale's latest invocation (default: the latest of any scale)")
    p.add_argument("--out", help="PDF path (default reports/STUDY-finder.pdf)")
    args = p.parse_args(argv)
    from harness.study.tracking import resolve_tracking_uri
    try:
        runs, sweeps = load_finder(resolve_tracking_uri(args.tracking_uri), args.study, args.scale)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fig = Figure(figsize=(11, 4.5))
    draw_finder(fig, (0, 0, 1, 1), runs, sweeps)
    out = args.out or f"reports/{args.study}-finder.pdf"
    fig.savefig(out)
    cols = ["label", *[k for k in MARKERS], "steps_run"]
    print(runs.reindex(columns=[c for c in cols if c in runs or c in MARKERS]).to_string(index=False))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
