"""The best-LR section of a report: for a study whose plan declares `analysis.best_lr: {field: F, where: {...}}`,
the best constant max LR of each level of F over the study's max_lr grid, and, where a level is an activation
x*x*c, how far that best LR is from the prediction "c is an LR multiplier" (best LR proportional to 1/c).

    section = best_lr_section(res, analysis, scale)   # None when the plan asks for nothing
    section.table          one row per level: best max_lr (the LR with the highest median final test accuracy over
                           seeds), that median, the LRs tried, diverged runs, the 1/c prediction and the ratio
    section.seed_table     the seed's settings (trials beside a zero_grad false arm): loop x metric per level,
                           the train-batch accuracy read from each run's last `train_batch_acc`
    section.finders        the finder studies named by the trials' lr_from_finder, with their runs and caption
    draw_accuracy_vs_lr(fig, rect, section)          final accuracy vs LR (log x): a line (median) per level, colour
                                                     and line style per level, seeds as points

Every number comes from the study's MLflow runs (and the finder studies' runs).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from harness import names
from harness.analysis.results import StudyError, load_curves, mlflow_client
from harness.plan import key

SQUARE = re.compile(r"^square(\d+(?:\.\d+)?)$")   # activation x*x*c
STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 2)))
MARKERS = ("o", "s", "^", "D", "v", "P")
TABLE_COLUMNS = ["level", "best LR", "final acc % at best (median)", "n", "LRs tried (median acc %)", "diverged",
                 "1/c prediction", "best / predicted"]
SEED_COLUMNS = ["level", "loop", "LR", "n", "train-batch acc % (median, last step)", "test acc % (median)"]


def square_factor(level) -> float | None:
    """c of an activation x*x*c ('square400' -> 400.0), else None."""
    m = SQUARE.match(str(level))
    return float(m.group(1)) if m else None


@dataclass
class FinderPanel:
    study: str
    runs: pd.DataFrame
    sweeps: pd.DataFrame
    caption: str


@dataclass
class BestLrSection:
    field: str
    points: pd.DataFrame            # one row per trial of the grid: level, max_lr, seed, outcome_acc, status, run_id
    table: pd.DataFrame             # one row per level (see the module docstring)
    exponent: float = math.nan      # the slope of log10(best LR) against log10(c) over the x*x*c levels (1/c: -1)
    seed_table: pd.DataFrame = field(default_factory=pd.DataFrame)
    finders: list[FinderPanel] = field(default_factory=list)

    def rows(self) -> list[list[str]]:
        return [[r["words"], f"{r['best_lr']:g}", _pct(r["best_acc"]), str(r["n"]), r["tried"], str(r["diverged"]),
                 "-" if np.isnan(r["predicted"]) else f"{r['predicted']:.3g}",
                 "-" if np.isnan(r["ratio"]) else f"{r['ratio']:.2f}"] for r in self.table.to_dict("records")]

    def seed_rows(self) -> list[list[str]]:
        return [[r["words"], r["loop"], f"{r['max_lr']:g}", str(r["n"]), _pct(r["train_batch_acc"]),
                 _pct(r["test_acc"])] for r in self.seed_table.to_dict("records")]

    @property
    def text(self) -> str:
        """The reading of the table in one paragraph."""
        squares = self.table[self.table["factor"].notna()]
        out = (f"Best LR per {self.field.replace('_', ' ')}: the max_lr of the grid whose median final test accuracy "
               f"over seeds is highest, chosen on the same test accuracy that is reported (no held-out selection). "
               f"The grid steps half a decade, so a best LR is known to a factor of about 3.")
        if len(squares) >= 2:
            anchor = squares.iloc[0]
            out += (f" Prediction 'c is an LR multiplier': best LR = {anchor['best_lr']:g} x "
                    f"{anchor['factor']:g}/c (anchored at x*x*{anchor['factor']:g}); fitted exponent of c: "
                    f"{self.exponent:.2f} (prediction -1; 0 would mean c does not move the best LR).")
        return out


def _pct(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.2f}"


def _match(df: pd.DataFrame, where: dict) -> pd.DataFrame:
    for f, v in (where or {}).items():
        vals = v if isinstance(v, list) else [v]
        if f not in df:
            return df.iloc[0:0]
        df = df[df[f].map(key).isin({key(x) for x in vals})]
    return df


def best_lr_section(res, analysis: dict | None, scale: str) -> BestLrSection | None:
    """The section the plan's `best_lr` asks for, from the study's trials at `scale`; None when not asked or
    when the trials hold no grid of max_lr."""
    ask = (analysis or {}).get("best_lr")
    if not ask:
        return None
    f = ask["field"]
    t = res.trials
    t = t[(t["scale"] == scale) & t["status"].isin(["completed", "diverged"])] if "scale" in t else t
    grid = _match(t, ask.get("where") or {})
    if grid.empty or f not in grid or "max_lr" not in grid:
        return None
    points = grid[[f, "max_lr", "seed", "outcome_acc", "status", "run_id"]].rename(columns={f: "level"}).copy()
    points["max_lr"] = points["max_lr"].astype(float)
    points["outcome_acc"] = points["outcome_acc"].astype(float)
    table = best_lr_table(points, f)
    squares = table[table["factor"].notna()]
    exponent = float(np.polyfit(np.log10(squares["factor"]), np.log10(squares["best_lr"]), 1)[0]) \
        if squares["factor"].nunique() >= 2 else math.nan
    return BestLrSection(f, points, table, exponent, seed_settings(res, t, f, ask.get("where") or {}),
                         finder_panels(res, t, scale))


def best_lr_table(points: pd.DataFrame, f: str) -> pd.DataFrame:
    """One row per level: the best LR (highest median final accuracy over seeds; ties: the smaller LR), with the
    1/c prediction anchored at the smallest c among the x*x*c levels."""
    rows = []
    for level, g in points.groupby(points["level"].map(key), sort=False):
        med = g.groupby("max_lr")["outcome_acc"].median().sort_index()
        best = float(med.idxmax())
        value = g["level"].iloc[0]
        rows.append({"level": value, "words": names.value_words(f, value), "factor": square_factor(value),
                     "best_lr": best, "best_acc": float(med.max()), "n": int((g["max_lr"] == best).sum()),
                     "tried": ", ".join(f"{lr:g} ({_pct(a)})" for lr, a in med.items()),
                     "diverged": int((g["status"] == "diverged").sum())})
    table = pd.DataFrame(rows)
    table["factor"] = table["factor"].astype(float)
    squares = table[table["factor"].notna()].sort_values("factor")
    if len(squares) >= 2:
        anchor = squares.iloc[0]
        table["predicted"] = anchor["best_lr"] * anchor["factor"] / table["factor"]
    else:
        table["predicted"] = np.nan
    table["ratio"] = table["best_lr"] / table["predicted"]
    return table.sort_values("factor", na_position="last", kind="stable").reset_index(drop=True)


def seed_settings(res, t: pd.DataFrame, f: str, where: dict) -> pd.DataFrame:
    """The seed's settings: every (level, max_lr) that has a zero_grad false arm, beside the same cell with the
    usual loop; per loop, the median over seeds of the last train_batch_acc and of the final test accuracy."""
    if "zero_grad" not in t or not (t["zero_grad"] == False).any():  # noqa: E712 - a typed bool column
        return pd.DataFrame()
    keep = {g: v for g, v in where.items() if g != "zero_grad"}
    pool = _match(t, keep)
    seeds = pool[pool["zero_grad"] == False][[f, "max_lr"]].drop_duplicates()  # noqa: E712
    rows = pool.merge(seeds, on=[f, "max_lr"])
    if rows.empty:
        return pd.DataFrame()
    curves = load_curves(mlflow_client(res.tracking_uri), list(rows["run_id"]), ("train_batch_acc",))
    last = curves.sort_values("step").groupby("run_id")["train_batch_acc"].last() if len(curves) else pd.Series()
    rows = rows.assign(train_batch_acc=rows["run_id"].map(last).astype(float))
    out = []
    for (level, lr, zero), g in rows.groupby([rows[f].map(key), "max_lr", "zero_grad"], sort=True):
        value = g[f].iloc[0]
        out.append({"level": value, "words": names.value_words(f, value), "max_lr": float(lr),
                    "loop": "zeroed each step" if zero else "never zeroed (the seed's listing)", "n": len(g),
                    "train_batch_acc": float(g["train_batch_acc"].median()),
                    "test_acc": float(g["outcome_acc"].astype(float).median())})
    return pd.DataFrame(out)


def finder_panels(res, t: pd.DataFrame, scale: str) -> list[FinderPanel]:
    """The finder studies the trials took a max LR from, each with its runs, sweeps and caption (suggested LRs in
    numbers, seeds, run ids, the commit it ran at); a finder study with no runs in the store is skipped."""
    from harness.report.finder import load_finder_study
    from harness.report.setup import provenance

    out = []
    for study in sorted({s for s in t.get("lr_from_finder", pd.Series(dtype=object)).dropna()}):
        try:
            fres, runs, sweeps = load_finder_study(res.tracking_uri, study, scale)
        except StudyError:
            continue
        per = []
        for label, g in runs.groupby("label", sort=True):
            vals = ", ".join(f"{float(v):.3g}" for v in g["lr_valley"])
            per.append(f"{label}: valley {float(g['lr_valley'].median()):.3g} (median of {vals}), steepest "
                       f"{float(g['lr_steepest'].median()):.3g}, Smith {float(g['lr_smith'].median()):.3g}")
        seeds = sorted({int(s) for s in runs["seed"]})
        caption = (f"LR finder study {study} ({scale} scale; exponential sweep, fastai's smoothing; accuracy panel on "
                   f"the next batch of held-out training images): suggested LRs (medians over seeds) - "
                   f"{'; '.join(per)}. Seeds {', '.join(map(str, seeds))}; runs {', '.join(runs['run_id'])}; commit "
                   f"{'; '.join(sorted({provenance(p) for p in fres.parents}))}. The finder arms ran at the median "
                   f"valley of their activation; the fair comparison is each activation at its best grid LR.")
        out.append(FinderPanel(study, runs, sweeps, caption))
    return out


def draw_accuracy_vs_lr(fig: Figure, rect, section: BestLrSection) -> None:
    """Final test accuracy against the constant LR (log x): per level a line through the medians over seeds, each
    seed a point (diverged seeds as x), colour and line style per level; the best LR of each level circled."""
    left, bottom, width, height = rect
    ax = fig.add_axes((left + 0.07, bottom + 0.14, width * 0.68, height - 0.22))
    levels = list(section.table["level"])
    colors = sns.color_palette("colorblind", max(len(levels), 1))
    p = section.points
    for i, level in enumerate(levels):
        g = p[p["level"].map(key) == key(level)]
        med = g.groupby("max_lr")["outcome_acc"].median().sort_index()
        words = names.value_words(section.field, level)
        style = dict(color=colors[i], ls=STYLES[i % len(STYLES)], marker=MARKERS[i % len(MARKERS)])
        ax.plot(med.index, 100 * med.to_numpy(), lw=1.6, ms=5, label=f"{words} (median)", **style)
        for status, marker in (("completed", "."), ("diverged", "x")):
            s = g[g["status"] == status]
            ax.plot(s["max_lr"], 100 * s["outcome_acc"], ls="none", marker=marker, color=colors[i], ms=6, alpha=0.8)
        row = section.table[section.table["level"].map(key) == key(level)].iloc[0]
        ax.plot([row["best_lr"]], [100 * row["best_acc"]], marker="o", ms=12, mfc="none", mec=colors[i], mew=1.5)
    ax.plot([], [], ls="none", marker=".", color="grey", label="a seed")
    ax.plot([], [], ls="none", marker="x", color="grey", label="a seed that diverged")
    ax.plot([], [], ls="none", marker="o", ms=10, mfc="none", mec="grey", label="its best LR")
    ax.set_xscale("log")
    ax.set_xlabel("constant learning rate (log)")
    ax.set_ylabel("final test accuracy %")
    ax.set_title(f"Final accuracy vs LR per {section.field.replace('_', ' ')}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))


# ------------------------------------------------------------------------------------------------ report pieces
def pdf_section(pdf, section: BestLrSection, font: float) -> None:
    """The section in the PDF: the table, the figure, the seed's settings, the finder figure with its caption."""
    from harness.report.finder import draw_finder

    pdf.section(min_room=4.0)
    pdf.heading(f"Best LR per {section.field.replace('_', ' ')}: is c an LR multiplier?", size=12)
    pdf.paragraph(section.text, size=font)
    pdf.table(TABLE_COLUMNS, section.rows(), widths=[1.0, 0.7, 1.0, 0.4, 4.0, 0.7, 0.9, 0.9], size=font)
    pdf.figure(lambda fig, rect: draw_accuracy_vs_lr(fig, rect, section), height=3.4)
    if len(section.seed_table):
        pdf.heading("The seed's settings: which loop and which metric give 94% / 71%", size=11, keep_with=1.5)
        pdf.paragraph(SEED_TEXT, size=font)
        pdf.table(SEED_COLUMNS, section.seed_rows(), widths=[1.2, 2.4, 0.7, 0.4, 2.2, 1.6], size=font)
    for panel in section.finders:
        pdf.heading(f"LR finder ({panel.study}), a secondary line", size=11, keep_with=3.5)
        pdf.figure(lambda fig, rect, panel=panel: draw_finder(fig, rect, panel.runs, panel.sweeps), height=3.2)
        pdf.paragraph(panel.caption, size=font)


def markdown_section(section: BestLrSection, md_table) -> list[str]:
    out = [f"## Best LR per {section.field.replace('_', ' ')}: is c an LR multiplier?", "", section.text, "",
           md_table(TABLE_COLUMNS, section.rows()), ""]
    if len(section.seed_table):
        out += ["### The seed's settings: which loop and which metric give 94% / 71%", "", SEED_TEXT, "",
                md_table(SEED_COLUMNS, section.seed_rows()), ""]
    for panel in section.finders:
        out += [f"### LR finder ({panel.study}), a secondary line", "", f"(figure in the PDF) {panel.caption}", ""]
    return out


SEED_TEXT = ("Train-batch accuracy: the accuracy on the batch the last step trained on, from that step's own forward "
             "pass (the seed's printed metric); test accuracy: the full test set after the last step. Never zeroed: "
             "the seed's loop as listed (backward and step with no zero_grad, so every step applies the sum of all "
             "gradients so far). The seed reported 94% (x*x*400) and 71% (ReLU) at LR 0.001.")
