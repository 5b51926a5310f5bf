"""`python -m harness.report NAME`: a study's MLflow runs -> a PDF with one verdict per claim of the paper.

    python -m harness.report batch_size_effect                       # latest parent run, ./mlflow.db
    python -m harness.report batch_size_effect --run all             # every invocation of the study
    python -m harness.report batch_size_effect --run <parent run id> --tracking-uri sqlite:///abs/mlflow.db
    python -m harness.report batch_size_effect --out reports/batch_size_effect.pdf

Writes NAME.pdf, its Markdown twin NAME.md, and the tables as NAME.verdicts.csv, NAME.cells.csv and
NAME.trials.csv next to it (default folder: reports/). On bad input (unknown study, no runs, unreachable
store, unknown run id) it prints one line on stderr, writes nothing and exits with code 2.

PDF layout: page 1 = the study's question, the verdict table (claim, paper says, we measured, verdict,
evidence), claims not tested, the decision rule and the setup; then one section per tested claim (its
verdicts, a figure of the comparison next to the accuracy curves of its cells, the table of its cells);
then the study's figures (test accuracy vs iteration per schedule with seed bands and the authors' matching
curves, final accuracy vs total batch size, steps to target per cell, learning rate and momentum vs
iteration, LR range tests); the table of all cells; an appendix with every trial and its MLflow run id.
Every number comes from the MLflow runs or from the claims table in harness/claims.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness import claims as claims_mod
from harness.results import RUN_CHOICES, StudyError, StudyResults, load_study

DECISION_RULE = (
    f"Decision rule: for each comparison, the difference of medians (arm A - arm B) with a 95% bootstrap interval "
    f"({claims_mod.BOOTSTRAP} resamples of the trials in each arm, seeded) and a test (Welch t for accuracy, "
    f"Mann-Whitney U for steps-to-target, where a miss counts as infinitely many steps). Supported: at least "
    f"{claims_mod.MIN_N} trials per arm, the interval excludes 0 in the claimed direction and p < {claims_mod.ALPHA}. "
    f"Contradicted: the same in the opposite direction. Otherwise inconclusive. Diverged trials count with "
    f"their real final accuracy; errored trials are excluded and listed. Trends also need Spearman's rho in the "
    f"claimed direction. A smoke-scale study only checks the pipeline.")
VERDICT_COLORS = {"supported": "#1a7f37", "contradicted": "#b42318", "inconclusive": "#8a6d00",
                  "pipeline check": "#555555"}


@dataclass
class ReportFiles:
    pdf: Path
    markdown: Path
    csvs: list[Path]
    pages: int
    seconds: float
    load_seconds: float
    n_trials: int


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m harness.report",
        description="Build the PDF report (plus Markdown and CSV twins) of a study from its MLflow runs: one "
                    "verdict per claim of the paper, figures, per-cell tables and every trial's run id.")
    ap.add_argument("study", metavar="NAME", help="study name (= MLflow experiment name), e.g. batch_size_effect")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    ap.add_argument("--run", default="latest", metavar="PARENT_RUN_ID|latest|all",
                    help="which invocation of the study: latest (default), all, or a parent run id")
    ap.add_argument("--out", type=Path, default=None, help="PDF path (default: reports/NAME.pdf); the .md and "
                    ".csv twins go next to it")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        files = build_report(args.study, args.tracking_uri, args.run, args.out)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    others = ", ".join(p.name for p in [files.markdown, *files.csvs])
    print(f"report: {files.pages} pages -> {files.pdf} (+ {others}) in {files.seconds:.1f} s "
          f"(loading {files.n_trials} trials from MLflow: {files.load_seconds:.1f} s)")
    return 0


def build_report(study: str, tracking_uri: str | None = None, run: str = "latest", out: Path | None = None
                 ) -> ReportFiles:
    t0 = time.perf_counter()
    if not study.strip():
        raise StudyError(f"empty study name; use {RUN_CHOICES} with a study name")
    res = load_study(study, tracking_uri, run)
    evaluation = claims_mod.evaluate(res)
    tables = Tables.build(res, evaluation)

    out = Path(out) if out else Path("reports") / f"{study}.pdf"
    stem = out.name.removesuffix(".pdf")
    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=folder))
    try:
        names = {"pdf": f"{stem}.pdf", "md": f"{stem}.md", "verdicts": f"{stem}.verdicts.csv",
                 "cells": f"{stem}.cells.csv", "trials": f"{stem}.trials.csv"}
        pages = write_pdf(tmp / names["pdf"], res, evaluation, tables)
        (tmp / names["md"]).write_text(markdown(res, evaluation, tables, names["pdf"]))
        tables.verdicts_csv.to_csv(tmp / names["verdicts"], index=False)
        tables.cells.to_csv(tmp / names["cells"], index=False)
        tables.trials_csv.to_csv(tmp / names["trials"], index=False)
        for name in names.values():
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ReportFiles(pdf=folder / names["pdf"], markdown=folder / names["md"],
                       csvs=[folder / names[k] for k in ("verdicts", "cells", "trials")], pages=pages,
                       seconds=time.perf_counter() - t0, load_seconds=res.timings.get("total_s", 0.0),
                       n_trials=len(res.trials))


# ------------------------------------------------------------------------------------------------ tables
def _pct(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.2f}"


def _steps(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return "never" if v == np.inf else f"{v:,.0f}"


def _cells_frame(trials: pd.DataFrame) -> pd.DataFrame:
    rows = []
    multi_scale = trials["scale"].nunique() > 1
    for (scale, cell), g in trials.groupby(["scale", "cell"], sort=False):
        use = g[g["status"].isin(["completed", "diverged"]) & g["outcome_acc"].notna()]
        acc = use["outcome_acc"].astype(float)
        stt = use["steps_to_target_eff"].astype(float)
        reached = int(np.isfinite(stt).sum())
        rows.append({
            "scale": scale, "cell": cell, "n": len(use), "diverged": int((g["status"] == "diverged").sum()),
            "errors": int((g["status"] == "error").sum()), "running": int((g["status"] == "running").sum()),
            "final_acc_median": acc.median() if len(acc) else np.nan,
            "final_acc_q25": acc.quantile(0.25) if len(acc) else np.nan,
            "final_acc_q75": acc.quantile(0.75) if len(acc) else np.nan,
            "best_acc_median": use["best_acc"].astype(float).median() if len(use) else np.nan,
            "reached_target": reached, "steps_to_target_median": stt.median() if len(stt) else np.nan,
            "train_seconds_median": use["train_seconds"].astype(float).median() if len(use) else np.nan,
            "run_ids": " ".join(g["run_id"]),
        })
    df = pd.DataFrame(rows)
    return df if multi_scale else df.drop(columns="scale")


def _cell_rows(cells: pd.DataFrame) -> list[list[str]]:
    out = []
    for r in cells.to_dict("records"):
        flags = [f"{r['diverged']} diverged" if r["diverged"] else "", f"{r['errors']} error" if r["errors"] else "",
                 f"{r['running']} running" if r["running"] else ""]
        out.append([(f"[{r['scale']}] " if "scale" in r else "") + r["cell"], str(r["n"]),
                    ", ".join(f for f in flags if f) or "-", _pct(r["final_acc_median"]),
                    f"{_pct(r['final_acc_q25'])} - {_pct(r['final_acc_q75'])}", _pct(r["best_acc_median"]),
                    f"{r['reached_target']}/{r['n']}", _steps(r["steps_to_target_median"]),
                    "n/a" if np.isnan(r["train_seconds_median"]) else f"{r['train_seconds_median']:,.0f}"])
    return out


CELL_COLUMNS = ["cell", "n", "diverged / errors", "final acc % (median)", "IQR %", "best acc % (median)",
                "reached target", "steps to target (median)", "train s (median)"]
CELL_WIDTHS = [3.2, 0.4, 1.1, 0.9, 1.0, 0.9, 0.8, 1.1, 0.8]
TRIAL_COLUMNS = ["trial (run name)", "MLflow run id", "cell", "seed", "status", "final acc %", "best acc %",
                 "steps to target", "steps run", "train s"]
TRIAL_WIDTHS = [1.9, 2.1, 2.5, 0.4, 1.3, 0.7, 0.7, 0.8, 0.7, 0.6]


@dataclass
class Tables:
    verdicts_csv: pd.DataFrame
    cells: pd.DataFrame
    trials_csv: pd.DataFrame
    setup: list[tuple[str, str]]

    @classmethod
    def build(cls, res: StudyResults, ev: claims_mod.Evaluation) -> Tables:
        vcsv = pd.DataFrame([v.row() for v in ev.verdicts])
        if vcsv.empty:
            vcsv = pd.DataFrame(columns=list(claims_mod.Verdict.__dataclass_fields__))
        front = ["run_name", "run_id", "parent_run_id", "cell", "scale", "status", "error", "seed", "outcome_acc",
                 "final_acc", "best_acc", "steps_to_target_eff", "steps_to_target", "steps_done", "train_seconds",
                 "images"]
        t = res.trials
        tcsv = t[[c for c in front if c in t] + [c for c in t.columns if c not in front and c != "superseded"]]
        return cls(verdicts_csv=vcsv, cells=_cells_frame(t), trials_csv=tcsv, setup=setup_rows(res, ev))


def _uniq(df: pd.DataFrame, col: str) -> str:
    if col not in df:
        return "n/a"
    vals = [str(v) for v in dict.fromkeys(df[col].tolist())]
    return ", ".join(vals)


def setup_rows(res: StudyResults, ev: claims_mod.Evaluation) -> list[tuple[str, str]]:
    t = res.trials
    tags = res.parent["tags"]
    status = t["status"].value_counts().to_dict()
    seeds = t.groupby(["scale", "cell"])["run_id"].count()
    seeds_text = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    secs = float(np.nansum(t["train_seconds"].astype(float)))
    steps = float(np.nansum(t["steps_done"].astype(float)))
    images = float(np.nansum(t["images"].astype(float))) if "images" in t else float("nan")
    gpus = sorted({str(v) for v in t.get("sys.gpu_model", pd.Series(dtype=str)).dropna() if v and v != "none"})
    commits = sorted({f"{p['tags'].get('harness.git_commit', 'unknown')}"
                      f"{' (dirty working tree)' if p['tags'].get('harness.git_dirty') == 'true' else ''}"
                      for p in res.parents})
    starts = [p["start_time"] for p in res.parents if p["start_time"] is not None]
    ends = [p["end_time"] for p in res.parents if p["end_time"] is not None]
    when = f"{min(starts):%Y-%m-%d %H:%M} UTC" if starts else "unknown"
    if ends:
        when += f" to {max(ends):%Y-%m-%d %H:%M} UTC"
    parents = ", ".join(f"{p['run_id']} ({p['run_name']}, {p['tags'].get('harness.scale', '?')})" for p in res.parents)
    rows = [
        ("scale", f"{ev.scale} (verdicts use the {ev.n_trials} completed or diverged trials at this scale)"
         + (f"; parent runs at scales {_uniq(t, 'scale')}" if t["scale"].nunique() > 1 else "")),
        ("dataset / model", f"{_uniq(t, 'dataset')} / {_uniq(t, 'model')}"),
        ("trials", f"{len(t)} in {len(seeds)} cells, {seeds_text} seeds per cell; "
                   + ", ".join(f"{k} {v}" for k, v in sorted(status.items()))),
        ("hardware", f"{tags.get('harness.hardware', 'unknown')}; "
                     f"Ray resources {tags.get('harness.ray_resources', '?')}"
                     + (f"; GPUs {', '.join(gpus)}" if gpus else "")),
        ("total compute", (f"{secs / 3600:.2f} h" if secs >= 360 else f"{secs:,.0f} s") +
                          (" of training (sum of train_seconds, evaluation excluded), "
                           f"{steps:,.0f} optimizer steps, {images:,.0f} training images")),
        ("git commit", "; ".join(commits)),
        ("harness version", f"{tags.get('harness.version', '?')}; torch {_uniq(t, 'sys.torch')}"),
        ("command", tags.get("harness.command", "?")),
        ("date", when),
        ("MLflow", f"{res.tracking_uri}, experiment {res.experiment_id}, parent run(s) {parents}"),
        ("report generated", f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by harness.report"),
    ]
    if res.notes:
        rows.append(("notes", "; ".join(res.notes)))
    return rows


def _claim_cells(cells: pd.DataFrame, verdicts: list) -> pd.DataFrame:
    """The rows of the cells table that hold a trial used by these verdicts."""
    ids = {r for v in verdicts for r in v.run_ids}
    return cells[cells["run_ids"].map(lambda s: bool(ids & set(s.split())))]


def _verdict_rows(ev: claims_mod.Evaluation):
    rows, styles = [], []
    for v in ev.verdicts:
        rows.append([f"{v.claim_id}: {v.statement}\n[{v.comparison}]", f"paper: {v.paper}\nauthors' log: {v.log}",
                     v.measured, v.verdict_text, f"{v.evidence}\n({v.reason})"])
        styles.append({3: {"color": VERDICT_COLORS.get(v.verdict, "black"), "weight": "bold"}})
    return rows, styles


def _not_tested_text(ev: claims_mod.Evaluation) -> str:
    if not ev.not_tested:
        return ""
    return "Not tested by this study's runs: " + "; ".join(f"{c} ({why})" for c, why in ev.not_tested) + "."


def _excluded_text(ev: claims_mod.Evaluation) -> str:
    if not ev.excluded:
        return ""
    return "Excluded from the verdicts: " + ", ".join(f"{n} {s} trial(s)" for s, n in ev.excluded.items()) + \
        " (listed in the appendix)."


# ------------------------------------------------------------------------------------------------ PDF
def write_pdf(path: Path, res: StudyResults, ev: claims_mod.Evaluation, tables: Tables) -> int:
    from harness import report_figures as figs
    from harness.report_pdf import FlowPdf

    t = res.trials
    if t["scale"].nunique() > 1:      # --run all over several scales: figures show the scale of the verdicts
        t = t[t["scale"] == ev.scale]
    curves = res.curves
    refs = figs.reference_for_cells(t)
    with FlowPdf(path, footer=f"harness.report · study {res.study} · {ev.scale} scale",
                 metadata={"Title": f"Study {res.study}: verdicts on the super-convergence claims"}) as pdf:
        # ---- page 1: question, verdicts, setup
        pdf.new_page()
        pdf.heading(f"Study {res.study}: {ev.scale} scale", size=16, keep_with=0)
        pdf.paragraph(f"Claims: {', '.join(ev.requested)} · parent run(s) {', '.join(p['run_id'] for p in res.parents)}"
                      f" · {len(res.trials)} trials · report of {dt.date.today():%Y-%m-%d}", size=8, color="0.35")
        pdf.heading("Question", size=11)
        pdf.paragraph(res.parent["tags"].get("harness.question", "") or "(the study states no question)", size=9)
        pdf.heading("Verdicts", size=11)
        rows, styles = _verdict_rows(ev)
        if rows:
            pdf.table(["claim [comparison]", "paper says", "we measured", "verdict", "evidence"], rows,
                      widths=[2.0, 1.6, 3.4, 1.1, 2.6], size=6.8, styles=styles)
        else:
            pdf.paragraph("No claim could be tested with this study's runs.", size=9)
        for text in (_not_tested_text(ev), _excluded_text(ev)):
            if text:
                pdf.paragraph(text, size=7.5)
        pdf.paragraph(DECISION_RULE, size=6.8, color="0.3")
        pdf.heading("Setup", size=11)
        pdf.table(["", ""], [[k, v] for k, v in tables.setup], widths=[1.3, 8.7], size=7, header=False)

        # ---- one section per tested claim
        by_claim: dict[str, list] = {}
        for v in ev.verdicts:
            by_claim.setdefault(v.claim_id, []).append(v)
        for cid, vs in by_claim.items():
            claim = claims_mod.CLAIMS.get(cid, claims_mod.QUESTION)
            pdf.new_page()
            pdf.heading(f"{cid}: {claim.statement}", size=12)
            pdf.paragraph(f"Paper setup: {claim.setup}. Paper: {claim.paper}. Authors' log: {claim.log}.", size=8)
            pdf.table(["comparison", "we measured", "verdict", "why"],
                      [[v.comparison, v.measured, v.verdict_text, v.reason] for v in vs],
                      widths=[2.2, 5.0, 1.3, 2.2], size=6.8,
                      styles=[{2: {"color": VERDICT_COLORS.get(v.verdict, "black"), "weight": "bold"}} for v in vs])
            pdf.figure(lambda fig, rect, vs=vs: figs.draw_claim(fig, rect, vs, t, curves, refs), height=3.1)
            cells = _claim_cells(tables.cells, vs)
            pdf.table(CELL_COLUMNS, _cell_rows(cells), widths=CELL_WIDTHS, size=6.8)

        # ---- the study's figures
        pdf.new_page()
        pdf.heading("Test accuracy vs iteration, per schedule", size=12)
        n_sched = max(1, len([s for s in t.get("schedule", pd.Series(["all"])).unique() if s != "range_test"]))
        pdf.paragraph("Line: median over seeds of each cell; band: min to max over seeds. Dashed: the authors' "
                      "Caffe log with the same setup (dataset, model, schedule, total batch, peak LR, steps), "
                      "when there is one.", size=7.5)
        pdf.figure(lambda fig, rect: figs.draw_accuracy_by_schedule(fig, rect, t, curves, refs),
                   height=min(6.6, 3.3 * ((n_sched + 1) // 2)))
        pdf.new_page()
        pdf.heading("Final accuracy vs total batch size; steps to target", size=12)

        def outcome_panels(fig, rect):
            ax1, ax2 = figs._axes(fig, rect, ncols=2, wspace=0.55)
            figs.draw_final_vs_batch(ax1, t[t["status"].isin(["completed", "diverged"])])
            figs.draw_steps_to_target(ax2, t[t["status"].isin(["completed", "diverged"])])

        pdf.figure(outcome_panels, height=3.4)
        pdf.heading("Learning rate and momentum vs iteration (as logged)", size=12)
        pdf.figure(lambda fig, rect: figs.draw_schedules(fig, rect, t, curves), height=3.0)
        if "schedule" in t and (t["schedule"] == "range_test").any():
            pdf.new_page()
            pdf.heading("LR range tests", size=12)
            pdf.figure(lambda fig, rect: figs.draw_range_tests(figs._axes(fig, rect)[0], t, curves), height=4.5)

        # ---- tables
        pdf.new_page()
        pdf.heading("All cells", size=12)
        pdf.table(CELL_COLUMNS, _cell_rows(tables.cells), widths=CELL_WIDTHS, size=6.8)
        pdf.new_page()
        pdf.heading("Appendix: every trial", size=12)
        pdf.paragraph("Final accuracy of a diverged trial is its last measured test accuracy; steps to target "
                      "'never' = missed or diverged. Open a run in MLflow by its run id.", size=7.5)
        pdf.table(TRIAL_COLUMNS, _trial_rows(res.trials), widths=TRIAL_WIDTHS, size=6.5)
        return pdf.pages


def _trial_rows(t: pd.DataFrame) -> list[list[str]]:
    rows = []
    multi = t["scale"].nunique() > 1
    for r in t.to_dict("records"):
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        seed = r.get("seed")
        seed = "" if seed is None or pd.isna(seed) else f"{seed:g}" if isinstance(seed, float) else str(seed)
        rows.append([str(r["run_name"]), r["run_id"], (f"[{r['scale']}] " if multi else "") + r["cell"], seed, status,
                     _pct(r["outcome_acc"]), _pct(r["best_acc"]), _steps(r["steps_to_target_eff"]),
                     _steps(r["steps_done"]), "n/a" if np.isnan(r["train_seconds"]) else f"{r['train_seconds']:,.0f}"])
    return rows


# ------------------------------------------------------------------------------------------------ Markdown
def _md_table(columns, rows) -> str:
    def esc(s):
        return str(s).replace("|", "\\|").replace("\n", "<br>")
    lines = ["| " + " | ".join(esc(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(res: StudyResults, ev: claims_mod.Evaluation, tables: Tables, pdf_name: str) -> str:
    out = [f"# Study {res.study}: {ev.scale} scale", "",
           (f"Figures: [{pdf_name}]({pdf_name}). Claims: {', '.join(ev.requested)}. "
            f"Parent run {res.parent['run_id']}."), "", "## Question", "",
           res.parent["tags"].get("harness.question", "") or "(the study states no question)", "", "## Verdicts", ""]
    rows, _ = _verdict_rows(ev)
    out += [_md_table(["claim [comparison]", "paper says", "we measured", "verdict", "evidence"], rows)
            if rows else "No claim could be tested with this study's runs.", ""]
    for text in (_not_tested_text(ev), _excluded_text(ev), DECISION_RULE):
        if text:
            out += [text, ""]
    out += ["## Setup", "", _md_table(["", ""], tables.setup), ""]
    by_claim: dict[str, list] = {}
    for v in ev.verdicts:
        by_claim.setdefault(v.claim_id, []).append(v)
    for cid, vs in by_claim.items():
        claim = claims_mod.CLAIMS.get(cid, claims_mod.QUESTION)
        out += [f"## {cid}: {claim.statement}", "",
                f"Paper setup: {claim.setup}. Paper: {claim.paper}. Authors' log: {claim.log}."
                , "",
                _md_table(["comparison", "we measured", "verdict", "why"],
                          [[v.comparison, v.measured, v.verdict_text, v.reason] for v in vs]), ""]
        cells = _claim_cells(tables.cells, vs)
        out += [_md_table(CELL_COLUMNS, _cell_rows(cells)), ""]
    out += ["## All cells", "", _md_table(CELL_COLUMNS, _cell_rows(tables.cells)), "",
            "## Appendix: every trial", "", _md_table(TRIAL_COLUMNS, _trial_rows(res.trials)), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
