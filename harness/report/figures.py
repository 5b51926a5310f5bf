"""The report's figures. Each function draws into a rectangle of a page (figure fractions) and reads only
the frames of harness.analysis.results (trials, curves) and the authors' reference curves (harness.reference)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from harness import names
from harness.analysis import caffe_logs
from harness.analysis.claims import sorted_levels
from harness.config import TrialConfig
from harness.report.pdf import text_width

# Okabe-Ito, ordered so that any first k colours stay far apart (CIE76 distance; tests/test_pages.py checks it)
PALETTE = sns.color_palette(["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#000000", "#D55E00", "#999999",
                             "#882255"])
STYLES = ("-", "--", ":", "-.")   # line styles of the second factor (`encode`)
MAX_LINES = 10   # curves per panel; more cells are summarised in the legend
LEGEND_W = 0.2   # fraction of a figure block's width kept for a shared legend at its right
ALWAYS_SAME = ("seed", "lr_scale", "config")   # differ between a cell's trials, not between cells


def cell_words(trials: pd.DataFrame, cell: str) -> str:
    """A cell in words for legends and tick labels: the trials' `cell_title` (from the typed config)."""
    if "cell_title" in trials.columns:
        found = trials.loc[trials["cell"] == cell, "cell_title"]
        if len(found):
            return str(found.iloc[0])
    return "all trials" if cell in ("all", "") else cell


def field_words(field: str) -> str:
    return {"batch_size": "total batch size", "lr": "learning rate", "cell": "cell"}.get(field, field.replace("_", " "))


def _legend_right(fig: Figure, rect, axes, title: str = "") -> None:
    """One legend for a row of panels, in the strip at the right of the rectangle (see axes_in legend_w)."""
    handles, labels = {}, []
    for ax in axes:
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            if lbl not in handles:
                handles[lbl] = h
                labels.append(lbl)
    if not labels:
        return
    left, bottom, width, height = rect
    fig.legend([handles[lbl] for lbl in labels], labels, loc="upper left", frameon=False, title=title or None,
               bbox_to_anchor=(left + width * (1 - LEGEND_W) + 0.005, bottom + height - 0.03))


def axes_in(fig: Figure, rect, ncols: int = 1, nrows: int = 1, wspace: float = 0.25, hspace: float = 0.45,
          legend_w: float = 0.0):
    left, bottom, width, height = rect
    gs = fig.add_gridspec(nrows, ncols, left=left + 0.045, right=left + width * (1 - legend_w) - 0.01,
                          bottom=bottom + 0.06, top=bottom + height - 0.03, wspace=wspace, hspace=hspace)
    return [fig.add_subplot(gs[i, j]) for i in range(nrows) for j in range(ncols)]


def _colors(keys) -> dict:
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}


# ------------------------------------------------------------------------------------------------ what varies
def _key(v) -> str:
    return repr(v.tolist() if hasattr(v, "tolist") else v)


def varied_fields(trials: pd.DataFrame) -> list[str]:
    """The config fields whose value differs between the cells (and is one value within each cell): one field per
    group of fields that vary together (batch size with its paired LR and steps: the first in names.TITLE_ORDER)."""
    fields = [f for f in TrialConfig.model_fields if f in trials.columns and f not in ALWAYS_SAME]
    per_cell = trials.groupby("cell", sort=False)
    found: dict[tuple, str] = {}
    for f in sorted(fields, key=lambda f: names.TITLE_ORDER.index(f) if f in names.TITLE_ORDER else 99):
        keys = per_cell[f].agg(lambda s: tuple(dict.fromkeys(map(_key, s))))
        if keys.map(len).max() != 1 or keys.nunique() < 2:
            continue
        partition = tuple(pd.factorize(keys.map(lambda k: k[0]))[0])
        found.setdefault(partition, f)
    return list(found.values())


def pooled(trials: pd.DataFrame, fields) -> bool:
    """True when a group of trials with the same values of `fields` holds more than one cell: a median over it
    would pool cells that differ in some other varied field."""
    fields = [f for f in fields if f and f in trials.columns]
    if trials.empty:
        return False
    keys = trials[fields].map(_key) if fields else pd.DataFrame(index=trials.index)
    groups = trials.groupby([keys[f] for f in fields], sort=False) if fields else [(None, trials)]
    return any(g["cell"].nunique() > 1 for _, g in groups)


def carries(values) -> bool:
    """A curve panel carries something unless its values are one constant in every cell (a constant LR, a
    momentum of zero)."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    return len(v) > 0 and not np.isclose(v.min(), v.max(), rtol=1e-9, atol=1e-12)


@dataclass
class Encoding:
    """Colour and line style per cell: colour on one varied field (or the combination of several), line style on
    another, or on the same one when only one field varies, so that every factor has two cues."""
    color: dict
    style: dict
    hue: str
    dash: str


def encode(trials: pd.DataFrame, cells: list[str]) -> Encoding:
    rows = trials[trials["cell"].isin(cells)]
    first = rows.groupby("cell", sort=False).first()
    varied = varied_fields(rows)
    levels = {f: list(dict.fromkeys(_key(first.loc[c, f]) for c in cells if c in first.index)) for f in varied}
    few = [f for f in varied if len(levels[f]) <= len(STYLES)]
    dash = min(few, key=lambda f: len(levels[f])) if len(varied) > 1 and few else (varied[0] if varied else "")
    hues = [f for f in varied if f != dash] or ([dash] if dash else [])

    def hue_key(c):
        return tuple(_key(first.loc[c, f]) for f in hues) if hues and c in first.index else c

    color = _colors(list(dict.fromkeys(hue_key(c) for c in cells)))
    style = {c: STYLES[levels[dash].index(_key(first.loc[c, dash])) % len(STYLES)] if dash and c in first.index
             else STYLES[0] for c in cells}
    return Encoding({c: color[hue_key(c)] for c in cells}, style, " + ".join(hues), dash)


def _label(v) -> str:
    if v is None:
        return "full" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _level_words(field: str, v) -> str:
    """A level on an axis or in a legend: booleans and schedules in words, numbers as they are."""
    if isinstance(v, bool) or field == "schedule":
        return names.value_words(field, v)
    return _label(v)


def empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="0.4", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------------------ references
def reference_for_cells(trials: pd.DataFrame) -> dict[str, list[str]]:
    """cell -> names of the authors' logs with the same setup (see caffe_logs.match_reference)."""
    index = caffe_logs.load_index()
    out = {}
    keys = ("dataset", "model", "schedule", "batch_size", "base_lr", "max_lr", "lr_scale", "steps", "optimizer",
            "nesterov", "momentum", "weight_decay", "train_size")
    for cell, rows in trials.groupby("cell", sort=False):
        first = rows.iloc[0]
        setup = {k: first[k] for k in keys if k in rows.columns}
        found = caffe_logs.match_reference(setup, index)
        if found:
            out[cell] = found
    return out


# ------------------------------------------------------------------------------------------------ curves
def _band(curves: pd.DataFrame, run_ids, x: str, y: str) -> pd.DataFrame:
    c = curves[curves["run_id"].isin(run_ids)].dropna(subset=[y])
    if c.empty:
        return c
    g = c.groupby(x)[y]
    return pd.DataFrame({"median": g.median(), "lo": g.min(), "hi": g.max(), "n": g.count()}).reset_index()


def draw_curves(ax, trials: pd.DataFrame, curves: pd.DataFrame, cells: list[str], refs: dict, y: str = "test_acc",
                title: str = "") -> None:
    """Median over seeds (line) and min-max band per cell (colour and line style: `encode`); the authors' matching
    curves as thick pale lines in the cell's colour."""
    enc = encode(trials, cells[:MAX_LINES])
    colors = enc.color
    drawn = 0
    for cell in cells[:MAX_LINES]:
        ids = trials.loc[trials["cell"] == cell, "run_id"]
        b = _band(curves, ids, "step", y)
        if b.empty:
            continue
        scale = 100 if y == "test_acc" else 1
        n = trials.loc[trials["cell"] == cell, "run_id"].nunique()
        ax.plot(b["step"], b["median"] * scale, color=colors[cell], lw=1.2, ls=enc.style[cell],
                label=f"{cell_words(trials, cell)} (n={n})")
        if n > 1:
            ax.fill_between(b["step"], b["lo"] * scale, b["hi"] * scale, color=colors[cell], alpha=0.2, lw=0)
        drawn += 1
        for name in refs.get(cell, []) if y == "test_acc" else []:
            ref = caffe_logs.load_curve(name)
            ax.plot(ref["iteration"], ref["test_acc"] * 100, color=colors[cell], lw=3, alpha=0.3,
                    label=f"authors' log {name}")
    if not drawn:
        empty(ax, "no curves logged")
        return
    if len(cells) > MAX_LINES:
        ax.plot([], [], " ", label=f"+{len(cells) - MAX_LINES} more cells (see tables)")
    ax.set_xlabel("iteration (optimizer step)")
    ax.set_ylabel("test accuracy (%)" if y == "test_acc" else y)
    ax.set_title(title)
    ax.grid(alpha=0.3, lw=0.4)
    ax.legend(loc="best", frameon=False)


def draw_accuracy_by_schedule(fig: Figure, rect, trials: pd.DataFrame, curves: pd.DataFrame, refs: dict) -> None:
    """Test accuracy vs iteration, one panel per schedule, one line (+ seed band) per cell."""
    schedules = [s for s in sorted_levels(trials["schedule"]) if s != "range_test"] if "schedule" in trials else ["all"]
    if not schedules:
        ax = axes_in(fig, rect)[0]
        empty(ax, "only LR range tests in this study (see the range test figure)")
        return
    ncols = min(2, len(schedules))
    nrows = math.ceil(len(schedules) / ncols)
    axes = axes_in(fig, rect, ncols=ncols, nrows=nrows)
    for ax, sched in zip(axes, schedules):
        rows = trials[trials["schedule"] == sched] if "schedule" in trials else trials
        draw_curves(ax, rows, curves, list(dict.fromkeys(rows["cell"])), refs, title=f"schedule: {sched}")


def draw_training_curves(fig: Figure, rect, trials: pd.DataFrame, curves: pd.DataFrame) -> None:
    """Training loss (top) and test accuracy (bottom) against step, epoch and training seconds: per cell the
    median over seeds at each evaluation step (x too: a cell's seeds share steps, not seconds), min-max band."""
    axes = axes_in(fig, rect, ncols=3, nrows=2, wspace=0.3, hspace=0.5, legend_w=LEGEND_W)
    cells = [c for c in dict.fromkeys(trials["cell"]) if (trials["cell"] == c).any()][:MAX_LINES]
    enc = encode(trials, cells)
    colors = enc.color
    xs = (("step", "optimizer step"), ("epoch", "epoch"), ("train_seconds", "training seconds"))
    ys = (("train_loss", "training loss", 1), ("test_acc", "test accuracy (%)", 100))
    for row, (y, ylabel, scale) in enumerate(ys):
        for col, (x, xlabel) in enumerate(xs):
            ax = axes[row * 3 + col]
            drawn = 0
            for cell in cells:
                ids = trials.loc[trials["cell"] == cell, "run_id"]
                c = curves[curves["run_id"].isin(ids)].dropna(subset=[y, x])
                if c.empty:
                    continue
                g = c.groupby("step")
                b = pd.DataFrame({"x": g[x].median(), "med": g[y].median(), "lo": g[y].min(), "hi": g[y].max()})
                ax.plot(b["x"], b["med"] * scale, color=colors[cell], lw=1.1, ls=enc.style[cell],
                        label=cell_words(trials, cell))
                if ids.nunique() > 1:
                    ax.fill_between(b["x"], b["lo"] * scale, b["hi"] * scale, color=colors[cell], alpha=0.18, lw=0)
                drawn += 1
            if not drawn:
                empty(ax, f"no {ylabel} logged")
                continue
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, lw=0.4)
    _legend_right(fig, rect, axes, title="cell (median, min-max band)")


def schedule_panels(trials: pd.DataFrame, sched: pd.DataFrame) -> list[tuple[str, str]]:
    """The (column, name) of the schedule panels that carry something: learning rate and momentum, each unless it is
    one constant in every cell (`carries`). Empty: the report leaves the schedules out."""
    cells = set(trials["cell"]) & set(sched.get("cell", []))
    rows = sched[sched["cell"].isin(cells)] if cells else sched.iloc[0:0]
    return [(y, name) for y, name in (("lr", "learning rate"), ("momentum", "momentum"))
            if y in rows and carries(rows[y])]


def draw_schedules(fig: Figure, rect, trials: pd.DataFrame, sched: pd.DataFrame) -> None:
    """Learning rate and momentum at every optimizer step of each cell, computed from its typed config by
    harness.trial.schedules (results.schedule_curves), not sampled at evaluations; a panel that would show one
    constant in every cell is left out (`schedule_panels`)."""
    panels = schedule_panels(trials, sched)
    cells = list(dict.fromkeys(c for c in trials["cell"] if c in set(sched.get("cell", []))))[:MAX_LINES]
    if not panels or not cells:
        return
    axes = axes_in(fig, rect, ncols=len(panels), wspace=0.3, legend_w=LEGEND_W)
    enc = encode(trials, cells)
    for cell in cells:
        c = sched[sched["cell"] == cell]
        for ax, (y, _) in zip(axes, panels):
            ax.plot(c["step"], c[y], color=enc.color[cell], lw=1.1, ls=enc.style[cell],
                    label=cell_words(trials, cell))
    for ax, (_, name) in zip(axes, panels):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, lw=0.4)
    _legend_right(fig, rect, axes[:1], title="cell")


# ------------------------------------------------------------------------------------------------ outcomes
def draw_levels(ax, trials: pd.DataFrame, x: str, hue: str = "", y: str = "outcome_acc", title: str = "") -> None:
    """One point per trial at its level of x (dodged by hue), median tick per group; diverged trials as 'x'. A
    median never pools unlike cells: if (x, hue) leave cells together, hue becomes another varied field, else x
    the cell itself."""
    if x not in trials.columns or trials.empty:
        empty(ax, f"no {x}")
        return
    if pooled(trials, [x, hue]):
        others = [f for f in varied_fields(trials) if f not in (x, hue) and not pooled(trials, [x, f])]
        x, hue, title = (x, others[0], "") if not hue and others else ("cell", "", "")
    levels = sorted_levels(trials[x])
    hues = sorted_levels(trials[hue]) if hue and hue in trials.columns else [None]
    colors = _colors([str(h) for h in hues])
    width = 0.7 / len(hues)
    scale = 100 if y in ("outcome_acc", "final_acc", "best_acc") else 1
    for j, h in enumerate(hues):
        rows = trials if h is None else trials[trials[hue].astype(str) == str(h)]
        for i, lv in enumerate(levels):
            pts = rows[rows[x].astype(str) == str(lv)]
            if pts.empty:
                continue
            pos = i - 0.35 + width * (j + 0.5)
            vals = pts[y].astype(float).to_numpy() * scale
            jitter = np.linspace(-width * 0.25, width * 0.25, len(vals)) if len(vals) > 1 else np.zeros(1)
            div = (pts["status"] == "diverged").to_numpy()
            ax.scatter(pos + jitter[~div], vals[~div], s=10, color=colors[str(h)], zorder=3,
                       label=(_level_words(hue, h) if h is not None else None)
                       if i == 0 or not ax.get_legend_handles_labels()[1] else None)
            if div.any():
                ax.scatter(pos + jitter[div], vals[div], s=16, marker="x", color="crimson", zorder=3,
                           label="diverged" if "diverged" not in ax.get_legend_handles_labels()[1] else None)
            ax.hlines(np.median(vals), pos - width * 0.4, pos + width * 0.4, color="black", lw=1.2, zorder=4)
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels([_level_words(x, v) if x != "cell" else cell_words(trials, v) for v in levels])
    ax.set_xlim(-0.6, len(levels) - 0.4)
    ax.set_xlabel(field_words(x))
    ax.set_ylabel("final test accuracy (%)" if scale == 100 else y)
    ax.set_title(title or f"final accuracy by {field_words(x)} (bar = median)")
    ax.grid(axis="y", alpha=0.3, lw=0.4)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="best", frameon=False, title=None if not hue or trials[hue].map(type).eq(bool).all()
                  else field_words(hue))


def draw_outcomes(fig: Figure, rect, trials: pd.DataFrame) -> None:
    """Final accuracy vs total batch size (only when the batch varies and no batch-and-schedule median pools unlike
    cells) beside the steps to target of every cell."""
    show_batch = "batch_size" in trials and trials["batch_size"].nunique() > 1 and \
        not pooled(trials, ["batch_size", "schedule"])
    left, bottom, width, height = rect
    cells = list(dict.fromkeys(trials["cell"]))[:25]
    label_w = max((text_width(cell_words(trials, c), 8) for c in cells), default=0) / fig.get_figwidth()
    steps_left = left + (width / 2 if show_batch else 0) + label_w + 0.02
    if show_batch:
        draw_final_vs_batch(axes_in(fig, (left, bottom, width / 2 - 0.02, height))[0], trials)
    draw_steps_to_target(fig.add_axes((steps_left, bottom + 0.06, left + width - 0.02 - steps_left, height - 0.09)),
                         trials)


def draw_final_vs_batch(ax, trials: pd.DataFrame) -> None:
    """Final accuracy vs total batch size, one line (median) per schedule; diverged trials as 'x'."""
    scheds = sorted_levels(trials["schedule"]) if "schedule" in trials else [None]
    colors = _colors([str(s) for s in scheds])
    for i, s in enumerate(scheds):
        rows = trials if s is None else trials[trials["schedule"] == s]
        bs = rows["batch_size"].astype(float)
        acc = rows["outcome_acc"].astype(float) * 100
        div = (rows["status"] == "diverged").to_numpy()
        ax.scatter(bs[~div], acc[~div], s=9, color=colors[str(s)], alpha=0.7)
        if div.any():
            ax.scatter(bs[div], acc[div], s=14, marker="x", color="crimson")
        med = rows.assign(acc=acc).groupby("batch_size")["acc"].median()
        ax.plot(med.index.astype(float), med.values, color=colors[str(s)], lw=1.2, marker="o", ms=3,
                ls=STYLES[i % len(STYLES)],
                label=names.SCHEDULE_WORDS.get(str(s), str(s)))
    ax.set_xscale("log", base=2)
    ticks = sorted(trials["batch_size"].astype(float).unique())
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("total batch size (images per optimizer step)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("final accuracy vs total batch (line = median)")
    ax.grid(alpha=0.3, lw=0.4)
    ax.legend(loc="best", frameon=False, title="schedule")


def draw_steps_to_target(ax, trials: pd.DataFrame) -> None:
    """Steps to the target accuracy per trial, one row per cell; misses (and divergences) at the right edge."""
    cells = list(dict.fromkeys(trials["cell"]))[:25]
    if not cells:
        empty(ax, "no trials")
        return
    finite = trials["steps_to_target_eff"].replace(np.inf, np.nan).dropna()
    right = max(float(trials["steps_done"].max() or 1), float(finite.max()) if len(finite) else 1.0) * 1.08
    for i, cell in enumerate(cells):
        rows = trials[trials["cell"] == cell]
        s = rows["steps_to_target_eff"].astype(float).to_numpy()
        hit = np.isfinite(s)
        ax.scatter(s[hit], np.full(hit.sum(), i), s=12, color=PALETTE[0], zorder=3)
        if (~hit).any():
            ax.scatter(np.full((~hit).sum(), right), np.full((~hit).sum(), i), s=16, marker=">", color="crimson",
                       zorder=3)
        if hit.any():
            ax.vlines(np.median(s[hit]), i - 0.3, i + 0.3, color="black", lw=1)
        ax.text(right * 1.02, i, f"{hit.sum()}/{len(s)}", va="center", fontsize=8)
    ax.set_yticks(range(len(cells)))
    ax.set_yticklabels([cell_words(trials, c) for c in cells])
    ax.set_ylim(len(cells) - 0.5, -0.5)
    ax.set_xlim(0, right * 1.1)
    target = trials["target_acc"].dropna().unique() if "target_acc" in trials else []
    tgt = ", ".join(f"{100 * float(t):g}%" for t in target)
    ax.set_xlabel(f"steps to {tgt} test accuracy (red >: missed or diverged)")
    ax.set_title("steps to target (bar = median of those reaching it; k/n reached)")
    ax.grid(axis="x", alpha=0.3, lw=0.4)


def draw_range_tests(ax, trials: pd.DataFrame, curves: pd.DataFrame) -> None:
    """LR range tests: test accuracy vs learning rate, ours (thin) and the authors' matching logs (thick, pale)."""
    rows = trials[trials["schedule"] == "range_test"] if "schedule" in trials else trials.iloc[0:0]
    if rows.empty:
        empty(ax, "no range test trials")
        return
    cells = list(dict.fromkeys(rows["cell"]))[:MAX_LINES]
    enc = encode(rows, cells)
    colors = enc.color
    for cell in cells:
        for k, rid in enumerate(rows.loc[rows["cell"] == cell, "run_id"]):
            c = curves[curves["run_id"] == rid].dropna(subset=["test_acc"]).sort_values("step")
            ax.plot(c["lr"], c["test_acc"] * 100, color=colors[cell], lw=1, alpha=0.8, ls=enc.style[cell],
                    label=cell_words(rows, cell) if k == 0 else None)
    refs = reference_for_cells(rows)
    for cell, logs in refs.items():
        for name in logs:
            ref = caffe_logs.load_curve(name).dropna(subset=["lr"])
            ax.plot(ref["lr"], ref["test_acc"] * 100, color=colors.get(cell, "0.3"), lw=3, alpha=0.3,
                    label=f"authors' log {name}")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("LR range test: test accuracy as the LR rises linearly")
    ax.grid(alpha=0.3, lw=0.4)
    ax.legend(loc="best", frameon=False)


# ------------------------------------------------------------------------------------------------ claim pages
def draw_claim(fig: Figure, rect, verdicts: list, trials: pd.DataFrame, curves: pd.DataFrame, refs: dict) -> None:
    """Left: the claim's comparison (per-trial outcomes by level); right: accuracy curves of its cells."""
    v = verdicts[0]
    rows = trials[trials["run_id"].isin({r for vv in verdicts for r in vv.run_ids})]
    left, right = axes_in(fig, rect, ncols=2, wspace=0.22)
    if v.claim_id == "SC3":
        draw_range_tests(left, rows, curves)
    else:
        x = v.plot_x if v.plot_x in rows.columns else "cell"
        hue = v.plot_hue if v.plot_hue in rows.columns and v.plot_hue != x else ""
        draw_levels(left, rows, x, hue)
    cells = list(dict.fromkeys(rows["cell"]))
    draw_curves(right, rows, curves, cells, refs, title="test accuracy vs step (median, min-max band)")
