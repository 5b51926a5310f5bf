"""The LR finder's figure, fastai style: smoothed training loss against the LR (log axis), one line per finder
run, with the suggestions marked (steepest descent, valley, Smith's max LR); beside it the batch accuracy
against the LR where the finder scored validation batches.

    runs, sweeps = load_finder(uri, "activation_mystery_finder")   # rows of MLflow finder runs, their sweeps
    draw_finder(fig, rect, runs, sweeps)                              # into a page of the report
    python -m harness.report.finder STUDY [--tracking-uri URI] [--out PDF]   # the figure on its own
"""

from __future__ import annotations

import argparse
import json
import sys

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from harness import names
from harness.analysis.results import StudyError, load_study
from harness.config import FIELDS, TrialConfig

MARKERS = {"lr_steepest": ("v", "steepest"), "lr_valley": ("o", "valley"), "lr_smith": ("*", "Smith max")}
SWEEP = ("lr", "train_loss", "smoothed_loss", "batch_val_acc")


def load_finder(uri: str, study: str, scale: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, sweeps) of the lr_finder runs of the study's latest invocation (at `scale` if given), through the
    analysis side's MLflow gateway. runs: run_id, run_name, cell, config, label, the suggestion metrics; sweeps:
    run_id, step, lr, train_loss, smoothed_loss, batch_val_acc."""
    _, runs, sweeps = load_finder_study(uri, study, scale)
    return runs, sweeps


def load_finder_study(uri: str, study: str, scale: str | None = None):
    """(the StudyResults, runs, sweeps) as `load_finder`, with the results' parent runs (commit, provenance)."""
    res = load_study(study, uri, scale=scale, metrics=SWEEP)
    trials = res.trials[res.trials["kind"] == "lr_finder"].reset_index(drop=True)
    if trials.empty:
        raise StudyError(f"study '{study}' has no lr_finder runs in {uri}")
    runs = trials.copy()
    runs["label"] = labels(list(runs["config"]))
    return res, runs, res.curves[res.curves["run_id"].isin(set(runs["run_id"]))]


def labels(configs: list[TrialConfig]) -> list[str]:
    """Each run's label: the fields that differ between the finder's cells, in words ('x*x*400 activation')."""
    dicts = [c.to_dict() for c in configs]
    fields = [f for f in FIELDS if f != "seed"]
    varying = [f for f in fields if len({json.dumps(d[f], sort_keys=True) for d in dicts}) > 1]
    return [names.title(c, varying) if varying else "all runs" for c in configs]


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
        ax2.set_ylabel("accuracy, next held-out\ntraining batch (val_size)")
        ax2.set_title("Smith's reading: where accuracy peaks", fontsize=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.report.finder",
                                description="Draw an LR finder study's sweeps and suggestions (PDF).")
    p.add_argument("study")
    p.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--scale", help="the scale's latest invocation (default: the latest of any scale)")
    p.add_argument("--out", help="PDF path (default reports/STUDY-finder.pdf)")
    args = p.parse_args(argv)
    try:
        runs, sweeps = load_finder(args.tracking_uri, args.study, args.scale)
    except StudyError as e:
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
