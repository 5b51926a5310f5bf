"""Our curves beside the authors' where the setups differ: the shape of a schedule, on each run's own clock.

    logs = authors_logs_by_schedule("super_convergence")   # schedule -> the authors' logs of the paper scale
    draw_shapes(fig, rect, trials, curves, logs)             # one panel per schedule; x = step / the run's steps

A reduced scale (Fashion-MNIST on a CPU) matches no authors' log exactly (harness.analysis.caffe_logs matches
dataset, net, batch, peak LR and steps), so its curves cannot be laid over theirs iteration for iteration.
What the axes do allow is the shape: test accuracy against the fraction of each run's own iterations, ours
(median over seeds, min-max band) in colour and line style, the authors' Caffe log of the same study at its
paper scale as a thick pale line (as in the report's other figures).
The authors' logs are the ones the study's own paper-scale cells name as their reference runs (the study file's
`scales.paper.references`; nothing here picks a log by hand), grouped by schedule.
"""

from __future__ import annotations

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from harness import spec as spec_mod
from harness.analysis import caffe_logs

SCHEDULES = ("triangular", "one_cycle", "caffe_1cycle", "multistep", "constant")  # shapes worth a panel
LINE_STYLES = ("-", "-.", ":", (0, (5, 1)))


def authors_logs_by_schedule(study: str) -> dict[str, list[tuple[str, int]]]:
    """schedule -> [(log name, the log's steps)]: the logs that the study's paper-scale cells name as their
    reference runs (`scales.paper.references`; a record derived from a log is not that log's run, so not drawn)."""
    try:
        trials = spec_mod.trials(spec_mod.load_spec(study), "paper")
    except (spec_mod.SpecError, FileNotFoundError):
        return {}
    index = caffe_logs.load_index()
    logged = dict(zip(index["file"], index["last_iteration"])) if not index.empty else {}
    out: dict[str, list[tuple[str, int]]] = {}
    for t in trials:
        if t.reference in logged:
            entry = (t.reference, int(t.config.steps))
            if entry not in out.setdefault(t.config.schedule, []):
                out[t.config.schedule].append(entry)
    return out


def log_alpha(j: int, n: int) -> float:
    """The opacity of the j-th of n authors' logs in one panel: 0.35 for the first, fading to 0.15 for the last
    (a schedule of less_data's paper scale matches four logs; a fixed step per log would go below zero)."""
    return 0.35 if n <= 1 else 0.35 - 0.2 * j / (n - 1)


def draw_shapes(fig: Figure, rect, trials: pd.DataFrame, curves: pd.DataFrame,
                logs: dict[str, list[tuple[str, int]]]) -> None:
    """One panel per schedule that both we and the authors ran: accuracy vs fraction of the run's own steps."""
    from harness.report.figures import axes_in, cell_words

    schedules = [s for s in SCHEDULES if s in logs and (trials["schedule"] == s).any()]
    axes = axes_in(fig, rect, ncols=max(1, len(schedules)), wspace=0.3)
    palette = sns.color_palette("colorblind", 10)
    for ax, sched in zip(axes, schedules, strict=False):
        cells = list(dict.fromkeys(trials.loc[trials["schedule"] == sched, "cell"]))
        for i, cell in enumerate(cells):
            rows = trials[trials["cell"] == cell]
            steps = float(rows["steps"].iloc[0])
            c = curves[curves["run_id"].isin(rows["run_id"])].dropna(subset=["test_acc"])
            if c.empty:
                continue
            g = c.groupby("step")["test_acc"]
            b = pd.DataFrame({"median": g.median(), "lo": g.min(), "hi": g.max()}).reset_index()
            color, ls = palette[i % len(palette)], LINE_STYLES[i % len(LINE_STYLES)]
            ax.plot(b["step"] / steps, b["median"] * 100, color=color, ls=ls, lw=1.3,
                    label=f"ours: {cell_words(trials, cell)}, {steps:,.0f} steps (n={rows['run_id'].nunique()})")
            if rows["run_id"].nunique() > 1:
                ax.fill_between(b["step"] / steps, b["lo"] * 100, b["hi"] * 100, color=color, alpha=0.15, lw=0)
        for j, (name, steps) in enumerate(logs[sched]):
            ref = caffe_logs.load_curve(name).dropna(subset=["test_acc"])
            ax.plot(ref["iteration"] / steps, ref["test_acc"] * 100, color="0.35", lw=3.0,
                    alpha=log_alpha(j, len(logs[sched])),
                    solid_capstyle="butt", label=f"authors' log {name}, {steps:,} steps")
        ax.set_xlim(0, 1.02)
        ax.set_xlabel("fraction of the run's own iterations")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(sched)
        ax.grid(alpha=0.3, lw=0.4)
        ax.legend(loc="lower right", frameon=False, fontsize=8)
