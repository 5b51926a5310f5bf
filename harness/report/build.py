"""`python -m harness.report NAME`: a study's MLflow runs -> a PDF with one verdict per claim of the paper.

    python -m harness.report batch_size_effect                       # latest parent run, ./mlflow.db
    python -m harness.report batch_size_effect --run all             # every invocation of the study
    python -m harness.report batch_size_effect --run <parent run id> --tracking-uri sqlite:///abs/mlflow.db
    python -m harness.report batch_size_effect --out reports/batch_size_effect.pdf
    python -m harness.report batch_size_effect --no-mlflow                # write nothing to the store

Writes NAME.pdf, its Markdown twin NAME.md, and the tables as NAME.verdicts.csv, NAME.cells.csv and
NAME.trials.csv next to it (default folder: reports/). On bad input (unknown study, no runs, unreachable
store, unknown run id) it prints one line on stderr, writes nothing and exits with code 2.

Then, unless --no-mlflow, it puts the verdicts where people browse the runs (`log_to_mlflow`): the study's parent
run (the newest one under --run all) gets the PDF, the Markdown and the verdicts CSV as artifacts under report/
(named after the study, overwritten in place by the next report) and one tag per planned comparison,
harness.verdict.<claim>.<comparison slug> = "<verdict>: <observed difference>"; verdict tags of comparisons no
longer in the plan are deleted. A store that refuses the writes costs one warning line, not the report.

PDF layout: page 1 = the study's question, the verdict table (claim, paper says, we measured, verdict,
evidence), claims not tested, what the runs say (the verdicts sorted by how firmly their runs point one way:
report/summary.py), the decision rule and the setup; then one section per tested claim (its
verdicts, a figure of the comparison next to the accuracy curves of its cells, the table of its cells);
then the study's figures (test accuracy vs iteration per schedule with seed bands and the authors' matching
curves, final accuracy vs total batch size, steps to target per cell, learning rate and momentum vs
iteration, LR range tests); the table of all cells; an appendix with every trial and its MLflow run id.
Every number comes from the MLflow runs or from the claims table in harness/claims.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness import REPO_ROOT, names
from harness.analysis import claims as claims_mod
from harness.analysis.results import RUN_CHOICES, StudyError, StudyResults, load_study, log_report, schedule_curves
from harness.report import setup as rsetup
from harness.report import shape, summary
from harness.report.best_lr import BestLrSection, best_lr_section, markdown_section, pdf_section

DECISION_RULE = claims_mod.DECISION_RULE  # one statement of the rule: the verdicts' own module
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
    min_font: float = math.nan    # the smallest text on any page, in points
    mlflow_note: str = ""         # what was logged to the parent run ("" with --no-mlflow)
    mlflow_warning: str = ""      # why nothing (or not everything) was logged: the store refused


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
    ap.add_argument("--no-mlflow", action="store_true",
                    help="write nothing to the MLflow store (default: the PDF, Markdown and verdicts CSV become "
                         f"artifacts under {names.REPORT_ARTIFACT_DIR}/ of the study's parent run, each verdict a "
                         f"{names.VERDICT_TAG_PREFIX}* tag on it)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        files = build_report(args.study, args.tracking_uri, args.run, args.out, mlflow=not args.no_mlflow)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    others = ", ".join(p.name for p in [files.markdown, *files.csvs])
    print(f"report: {files.pages} pages -> {files.pdf} (+ {others}) in {files.seconds:.1f} s "
          f"(loading {files.n_trials} trials from MLflow: {files.load_seconds:.1f} s)")
    if files.mlflow_note:
        print(f"mlflow: {files.mlflow_note}")
    if files.mlflow_warning:
        print(f"warning: {files.mlflow_warning}", file=sys.stderr)
    return 0


def build_report(study: str, tracking_uri: str | None = None, run: str = "latest", out: Path | None = None,
                 mlflow: bool = True) -> ReportFiles:
    t0 = time.perf_counter()
    if not study.strip():
        raise StudyError(f"empty study name; use {RUN_CHOICES} with a study name")
    res = load_study(study, tracking_uri, run)
    logged = res.logged_spec()      # the resolved spec the parent run logged (None for old runs)
    evaluation = claims_mod.verdicts(res, spec=logged)
    tables = Tables.build(res, evaluation, logged)

    out = Path(out) if out else Path("reports") / f"{study}.pdf"
    stem = out.name.removesuffix(".pdf")
    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=folder))
    try:
        file_names = {"pdf": f"{stem}.pdf", "md": f"{stem}.md", "verdicts": f"{stem}.verdicts.csv",
                 "cells": f"{stem}.cells.csv", "trials": f"{stem}.trials.csv", "curves": f"{stem}.curves.csv"}
        pages, min_font = write_pdf(tmp / file_names["pdf"], res, evaluation, tables)
        (tmp / file_names["md"]).write_text(markdown(res, evaluation, tables, file_names))
        tables.verdicts_csv.to_csv(tmp / file_names["verdicts"], index=False)
        tables.cells.to_csv(tmp / file_names["cells"], index=False)
        tables.trials_csv.to_csv(tmp / file_names["trials"], index=False)
        tables.curves_csv.to_csv(tmp / file_names["curves"], index=False)
        for name in file_names.values():
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    note, warning = log_to_mlflow(res, evaluation, tables, {k: folder / v for k, v in file_names.items()}) \
        if mlflow else ("", "")
    return ReportFiles(pdf=folder / file_names["pdf"], markdown=folder / file_names["md"],
                       csvs=[folder / file_names[k] for k in ("verdicts", "cells", "trials", "curves")], pages=pages,
                       seconds=time.perf_counter() - t0, load_seconds=res.timings.get("total_s", 0.0),
                       n_trials=len(res.trials), min_font=min_font, mlflow_note=note, mlflow_warning=warning)


# ------------------------------------------------------------------------------------------------ MLflow
TAG_SLUG_CHARS = 60     # a comparison's slug in its tag key; a longer one is cut and ends in a hash of the whole


def _slug(text: str, limit: int = TAG_SLUG_CHARS) -> str:
    """`batch_size=1000 vs batch_size=250 [schedule=one_cycle]` -> `batch_size-1000-vs-batch_size-250-schedule-
    one_cycle`: letters, digits, `_`, `-` and single dots only (MLflow's tag key rules, no path-like names)."""
    slug = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.]+", "-", text)).strip("-.") or "comparison"
    if len(slug) > limit:
        slug = f"{slug[:limit - 9].rstrip('-.')}-{zlib.crc32(text.encode()):08x}"
    return slug


def verdict_tags(ev: claims_mod.Evaluation) -> dict[str, str]:
    """One tag per planned comparison that has a verdict: key = prefix + claim ID + "." + slug of the comparison
    (its arms and stratum), the same for the same comparison in every report; value = the verdict word and the
    observed difference (arm A - arm B), e.g. `supported: +7.00 pp`. Two comparisons with the same title (they
    differ only in a `where` filter, which the title does not show) are told apart by -2, -3 in plan order."""
    tags: dict[str, str] = {}
    for v in ev.verdicts:
        base = f"{names.VERDICT_TAG_PREFIX}{_slug(v.claim_id, 20)}.{_slug(v.comparison)}"
        key, i = base, 2
        while key in tags:
            key, i = f"{base}-{i}", i + 1
        diff = "n/a" if v.diff is None or np.isnan(v.diff) else _diff_text(v, v.diff)
        if v.metric == "steps_to_target" and "argmax" not in v.test and diff != "n/a":
            diff += " steps"
        value = f"{v.verdict}: {diff}"
        if v.would_be and v.would_be != v.verdict:
            value += f" (would be {v.would_be})"
        tags[key] = value[:names.MAX_TAG_CHARS]
    return tags


def log_to_mlflow(res: StudyResults, ev: claims_mod.Evaluation, tables: Tables, written: dict[str, Path]
                  ) -> tuple[str, str]:
    """The report on its study's parent run (the newest one when several are reported together): the PDF, the
    Markdown and the verdicts CSV under report/, named after the study whatever --out said (so the next report
    overwrites them), and `verdict_tags` (stale ones deleted). Returns (what was logged, a warning): the local
    report stands whether or not the store takes the writes."""
    run_id = res.parent["run_id"]
    names_in_run = {"pdf": f"{res.study}.pdf", "md": f"{res.study}.md", "verdicts": f"{res.study}.verdicts.csv",
                    "cells": f"{res.study}.cells.csv", "trials": f"{res.study}.trials.csv",
                    "curves": f"{res.study}.curves.csv"}
    tags = verdict_tags(ev)
    try:
        with tempfile.TemporaryDirectory(prefix="harness-report-") as d:
            staged = []
            for k in ("pdf", "md", "verdicts"):
                staged.append(Path(d) / names_in_run[k])
                if k == "md" and written[k].name != names_in_run[k]:   # its links name the files as logged
                    staged[-1].write_text(markdown(res, ev, tables, names_in_run))
                else:
                    shutil.copyfile(written[k], staged[-1])
            stale = log_report(res.tracking_uri, run_id, staged, names.REPORT_ARTIFACT_DIR, tags,
                               names.VERDICT_TAG_PREFIX)
    except Exception as e:  # noqa: BLE001 - a read-only or unreachable store: the report itself is done
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return "", (f"the report was not logged to MLflow run {run_id} in {res.tracking_uri} ({type(e).__name__}: "
                    f"{first}); pass --no-mlflow to skip this step")
    which = f"parent run {run_id}"
    if len(res.parents) > 1:
        which += f" (the newest of the {len(res.parents)} parent runs whose trials these verdicts read)"
    note = (f"{', '.join(p.name for p in staged)} under {names.REPORT_ARTIFACT_DIR}/ and {len(tags)} verdict "
            f"tag(s) {names.VERDICT_TAG_PREFIX}* logged to {which}")
    if stale:
        note += f"; removed {len(stale)} tag(s) of comparisons no longer in the plan"
    return note, ""


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
            "scale": scale, "cell": cell, "cell_title": g["cell_title"].iloc[0] if "cell_title" in g else cell,
            "n": len(use), "diverged": int((g["status"] == "diverged").sum()),
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
        out.append([(f"[{r['scale']}] " if "scale" in r else "") + r["cell_title"], str(r["n"]),
                    ", ".join(f for f in flags if f) or "-", _pct(r["final_acc_median"]),
                    f"{_pct(r['final_acc_q25'])} - {_pct(r['final_acc_q75'])}", _pct(r["best_acc_median"]),
                    f"{r['reached_target']}/{r['n']}", _steps(r["steps_to_target_median"]),
                    "n/a" if np.isnan(r["train_seconds_median"]) else f"{r['train_seconds_median']:,.0f}"])
    return out


CELL_COLUMNS = ["cell", "n", "diverged / errors", "final acc % (median)", "IQR %", "best acc % (median)",
                "reached target", "steps to target (median)", "train s (median)"]
CELL_WIDTHS = [2.6, 0.4, 1.1, 0.9, 1.1, 0.9, 0.8, 1.1, 0.8]
TRIAL_COLUMNS = ["trial (run name)", "MLflow run id", "cell", "seed", "status", "final acc %", "best acc %",
                 "steps to target", "steps run", "train s"]
TRIAL_WIDTHS = [1.5, 2.5, 2.0, 0.45, 1.2, 0.65, 0.65, 0.75, 0.65, 0.65]
FONT = 8.0      # the smallest text anywhere in the PDF (tests/test_report.py checks every page)


@dataclass
class Tables:
    verdicts_csv: pd.DataFrame
    cells: pd.DataFrame
    trials_csv: pd.DataFrame
    curves_csv: pd.DataFrame
    setup: list[tuple[str, str]]
    paper_vs_run: list[list[str]]
    paper_source: str
    deviations: list[str]
    deviations_source: str
    this_run: str
    best_lr: BestLrSection | None = None   # the plan's analysis.best_lr (harness.report.best_lr)

    @classmethod
    def build(cls, res: StudyResults, ev: claims_mod.Evaluation, logged: dict | None = None) -> Tables:
        vcsv = pd.DataFrame([v.row() for v in ev.verdicts])
        if vcsv.empty:
            vcsv = pd.DataFrame(columns=list(claims_mod.Verdict.__dataclass_fields__))
        front = ["run_name", "run_id", "parent_run_id", "cell", "cell_title", "scale", "status", "error", "seed",
                 "outcome_acc", "final_acc", "best_acc", "steps_to_target_eff", "steps_to_target", "steps_done",
                 "train_seconds", "images"]
        t = res.trials
        tcsv = t[[c for c in front if c in t] + [c for c in t.columns if c not in front and c != "superseded"]]
        at_scale = t[t["scale"] == ev.scale] if t["scale"].nunique() > 1 else t
        run = rsetup.run_configs(at_scale)
        paper = rsetup.paper_side(res.study, logged)
        workers = pd.to_numeric(at_scale.get("workers", pd.Series(dtype=float)), errors="coerce").dropna()
        paper_workers = ((paper.spec or {}).get("resources") or {}).get("workers") if paper.spec else None
        paper_workers = (((paper.spec or {}).get("scales") or {}).get("paper") or {}).get("resources", {}).get(
            "workers", paper_workers)
        devs, dev_source = rsetup.deviations(logged, paper.spec, ev.scale)
        return cls(verdicts_csv=vcsv, cells=_cells_frame(t), trials_csv=tcsv, curves_csv=curves_frame(res),
                   setup=setup_rows(res, ev),
                   paper_vs_run=rsetup.paper_vs_run(paper.configs, run, logged, paper.spec,
                                                    int(workers.iloc[0]) if len(workers) else None, paper_workers),
                   paper_source=paper.source, deviations=devs, deviations_source=dev_source,
                   this_run=rsetup.this_run(t, ev.scale, run),
                   best_lr=best_lr_section(res, (logged or _study_file(res.study)).get("analysis"), ev.scale))


def _study_file(study: str) -> dict:
    """The study file, for runs whose parent logged no spec; {} when there is none."""
    from harness import spec as specs
    try:
        return specs.load_spec(study)
    except specs.SpecError:
        return {}


def curves_frame(res: StudyResults) -> pd.DataFrame:
    """The curves CSV: one row per trial and evaluation step; the cell in words."""
    info = res.trials[["run_id", "run_name", "cell_title", "seed"] if "seed" in res.trials else
                      ["run_id", "run_name", "cell_title"]]
    c = res.curves.merge(info, on="run_id", how="inner").rename(columns={"run_name": "trial", "cell_title": "cell"})
    front = ["trial", "cell", "seed", "run_id", "step", "epoch", "train_seconds"]
    front = [f for f in front if f in c.columns]
    return c[front + [m for m in c.columns if m not in front]].sort_values(["cell", "trial", "step"], kind="stable")


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
    commits = sorted({rsetup.provenance(p) for p in res.parents})
    starts = [p["start_time"] for p in res.parents if p["start_time"] is not None]
    ends = [p["end_time"] for p in res.parents if p["end_time"] is not None]
    when = f"{min(starts):%Y-%m-%d %H:%M} UTC" if starts else "unknown"
    if ends:
        when += f" to {max(ends):%Y-%m-%d %H:%M} UTC"
    parents = ", ".join(f"{p['run_id']} ({p['run_name']}, {p['tags'].get(names.SCALE, '?')})" for p in res.parents)
    rows = [
        ("scale", f"{ev.scale} (verdicts use the {ev.n_trials} completed or diverged trials at this scale)"
         + (f"; parent runs at scales {_uniq(t, 'scale')}" if t["scale"].nunique() > 1 else "")),
        ("dataset / model", f"{_uniq(t, 'dataset')} / {_uniq(t, 'model')}"),
        ("trials", f"{len(t)} in {len(seeds)} cells, {seeds_text} seeds per cell; "
                   + ", ".join(f"{k} {v}" for k, v in sorted(status.items()))),
        ("hardware", f"{tags.get(names.HARDWARE, 'unknown')}; "
                     f"Ray resources {tags.get(names.RAY_RESOURCES, '?')}"
                     + (f"; GPUs {', '.join(gpus)}" if gpus else "")),
        ("total compute", (f"{secs / 3600:.2f} h" if secs >= 360 else f"{secs:,.0f} s") +
                          (" of training (sum of train_seconds, evaluation excluded), "
                           f"{steps:,.0f} optimizer steps, {images:,.0f} training images")),
        ("git commit of the run", "; ".join(commits)),
        ("harness version", f"{tags.get(names.VERSION, '?')}; torch {_uniq(t, 'sys.torch')}"),
        ("command", tags.get(names.COMMAND, "?")),
        ("date", when),
        ("MLflow", f"{res.tracking_uri}, experiment {res.experiment_id}, parent run(s) {parents}"),
        ("report generated", f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by harness.report at commit "
                             f"{report_commit()}"),
    ]
    if res.notes:
        rows.append(("notes", "; ".join(res.notes)))
    return rows


def report_commit() -> str:
    """The commit and working-tree state of the code that builds this report."""
    import subprocess
    root = REPO_ROOT
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        # the code's state: reports/ (this report's own outputs among them) does not count
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!reports"],
                               cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if head.returncode:
        return "unknown (not a git checkout)"
    files = [ln[3:] for ln in dirty.stdout.splitlines() if ln.strip()]
    return head.stdout.strip() + (f" (dirty working tree: {', '.join(files)})" if files else " (clean working tree)")


def _claim_cells(cells: pd.DataFrame, verdicts: list) -> pd.DataFrame:
    """The rows of the cells table that hold a trial used by these verdicts."""
    ids = {r for v in verdicts for r in v.run_ids}
    return cells[cells["run_ids"].map(lambda s: bool(ids & set(s.split())))]


def _verdict_rows(ev: claims_mod.Evaluation):
    rows, styles = [], []
    for v in ev.verdicts:
        rows.append([f"{v.claim_id}: {v.statement}", v.comparison_words or v.comparison,
                     f"paper: {v.paper}\nauthors' log: {v.log}", v.measured,
                     f"{v.verdict_text}\nobserved: {v.observed or 'n/a'}"])
        styles.append({4: {"color": VERDICT_COLORS.get(v.verdict, "black"), "weight": "bold"}})
    return rows, styles


VERDICT_COLUMNS = ["claim", "comparison", "paper says", "we measured", "verdict"]
VERDICT_WIDTHS = [2.0, 1.7, 1.6, 4.0, 1.4]


def _diff_text(v, x: float) -> str:
    if "argmax" in v.test:
        return f"{x:+.0f} grid positions"
    if v.metric == "range_drop" or v.claim_id == "SC3":
        return f"{100 * x:+.1f} points"
    return claims_mod._fmt_diff(v.metric, x)


def interval_text(v) -> str:
    """The interval and test of a verdict, labelled for what it is (harness.analysis.claims decides which)."""
    return v.interval_and_test


def verdict_details(vs: list) -> tuple[list[str], list[list[str]], list[dict]]:
    """One column per verdict, one row per aspect: what was planned, measured, and how it was decided."""
    aspects = [
        ("comparison", lambda v: v.comparison_words or v.comparison),
        ("pre-registered", lambda v: v.planned or "-"),
        ("paper / authors' log", lambda v: f"paper: {v.paper}; authors' log: {v.log}"),
        ("we measured", lambda v: v.measured),
        ("observed direction", lambda v: v.observed or "n/a"),
        ("per seed", lambda v: v.per_seed or "-"),
        ("interval and test", interval_text),
        ("LR tuning", lambda v: v.tuning or "-"),
        ("arms also differ in", lambda v: v.confounds or "nothing else (per the plan)"),
        ("evidence", lambda v: v.evidence),
        ("verdict", lambda v: f"{v.verdict_text}: {v.reason}"),
    ]
    columns = [""] + [f"{v.claim_id}" for v in vs]
    rows = [[name] + [fn(v) for v in vs] for name, fn in aspects]
    styles = [{}] * (len(rows) - 1) + [{j + 1: {"color": VERDICT_COLORS.get(v.verdict, "black"), "weight": "bold"}
                                        for j, v in enumerate(vs)}]
    return columns, rows, styles


def verdict_groups(ev: claims_mod.Evaluation) -> list[list]:
    """Verdicts that read exactly the same trials share one section (one figure), in the plan's order."""
    groups: list[list] = []
    for v in ev.verdicts:
        for g in groups:
            if set(g[0].run_ids) == set(v.run_ids) and len(g) < 3:
                g.append(v)
                break
        else:
            groups.append([v])
    return groups


def section_title(vs: list) -> str:
    """A claim section's heading: its claims, their statements, and the comparisons it holds in words (a study
    with many comparisons of one claim gets headings that tell its sections apart)."""
    ids = list(dict.fromkeys(v.claim_id for v in vs))
    words = list(dict.fromkeys(v.comparison_words or v.comparison for v in vs))
    return (" and ".join(ids) + ": " + "; ".join(claims_mod.CLAIMS.get(c, claims_mod.QUESTION).statement for c in ids)
            + " - " + "; ".join(words))


def section_titles(groups: list[list]) -> list[tuple[list, str]]:
    """(verdicts, heading) per section; a heading that repeats an earlier one says which part it is."""
    seen: dict[str, int] = {}
    out = []
    for vs in groups:
        title = section_title(vs)
        seen[title] = seen.get(title, 0) + 1
        out.append((vs, title if seen[title] == 1 else f"{title} (part {seen[title]})"))
    return out


def _not_tested_text(ev: claims_mod.Evaluation) -> str:
    if not ev.not_tested:
        return ""
    return "Claims not tested, and why: " + "; ".join(f"{c} ({why})" for c, why in ev.not_tested) + "."


def _excluded_text(ev: claims_mod.Evaluation) -> str:
    if not ev.excluded:
        return ""
    return "Excluded from the verdicts: " + ", ".join(f"{n} {s} trial(s)" for s, n in ev.excluded.items()) + \
        " (listed in the appendix)."


def _question(res: StudyResults) -> str:
    return " ".join(str(res.parent["tags"].get(names.QUESTION, "")).split()) or "(the study states no question)"


# ------------------------------------------------------------------------------------------------ PDF
def write_pdf(path: Path, res: StudyResults, ev: claims_mod.Evaluation, tables: Tables) -> tuple[int, float]:
    """Returns (pages, the smallest font size on any page)."""
    from harness.report import figures as figs
    from harness.report.pdf import FlowPdf

    t = res.trials
    if t["scale"].nunique() > 1:      # --run all over several scales: figures show the scale of the verdicts
        t = t[t["scale"] == ev.scale]
    refs = figs.reference_for_cells(t)
    with FlowPdf(path, footer=f"harness.report · study {res.study} · {ev.scale} scale",
                 metadata={"Title": f"Study {res.study}: verdicts on the super-convergence claims"}) as pdf:
        _pdf_front_page(pdf, res, ev, tables)
        shown_cells = _pdf_claim_sections(pdf, ev, tables, t, res.curves, refs)
        if tables.best_lr is not None:
            pdf_section(pdf, tables.best_lr, FONT)
        _pdf_training_curves(pdf, t, res.curves)
        _pdf_outcomes(pdf, t, res.curves, refs, res.study)
        _pdf_tables(pdf, res, tables, shown_cells)
    return pdf.pages, pdf.min_font


def _pdf_front_page(pdf, res: StudyResults, ev: claims_mod.Evaluation, tables: Tables) -> None:
    """Page 1: question, what this run did, verdicts, paper vs this run, setup."""
    pdf.new_page()
    pdf.heading(f"Study {res.study}: {ev.scale} scale", size=16, keep_with=0)
    pdf.paragraph(f"Claims: {', '.join(ev.requested)} · parent run(s) {', '.join(p['run_id'] for p in res.parents)}"
                  f" · {len(res.trials)} trials · report of {dt.date.today():%Y-%m-%d}", size=FONT, color="0.35")
    pdf.heading("Question", size=11)
    pdf.paragraph(_question(res), size=9)
    pdf.paragraph(tables.this_run, size=9)
    pdf.heading("Verdicts", size=11)
    rows, styles = _verdict_rows(ev)
    if rows:
        pdf.table(VERDICT_COLUMNS, rows, widths=VERDICT_WIDTHS, size=FONT, styles=styles)
    else:
        pdf.paragraph("No claim could be tested with this study's runs.", size=9)
    for text in (_not_tested_text(ev), _excluded_text(ev)):
        if text:
            pdf.paragraph(text, size=FONT)
    if ev.verdicts:
        pdf.heading("What the runs say", size=11)
        pdf.paragraph(summary.INTRO, size=FONT, color="0.3")
        for title, vs in summary.summary_groups(ev.verdicts):
            pdf.heading(f"{title} ({len(vs)})", size=9.5, keep_with=0.5)
            for v in vs:
                pdf.paragraph(f"- {summary.summary_line(v)}", size=FONT, indent=0.15)
    pdf.heading("The paper's setup vs this run", size=11)
    pdf.paragraph(f"Paper-scale column: {tables.paper_source}. {rsetup.PAPER_SOURCE} This run: the trials' typed "
                  "configs.", size=FONT, color="0.3")
    pdf.table(rsetup.columns(ev.scale), tables.paper_vs_run, widths=rsetup.WIDTHS,
              size=FONT)
    pdf.paragraph(f"Deviations of the {ev.scale} scale from the authors' setup ({tables.deviations_source}):",
                  size=FONT, color="0.2")
    for d in tables.deviations or ["none declared"]:
        pdf.paragraph(f"- {d}", size=FONT, indent=0.15)
    pdf.paragraph(DECISION_RULE, size=FONT, color="0.3")
    pdf.heading("Setup and provenance", size=11)
    pdf.table(["", ""], [[k, v] for k, v in tables.setup], widths=[1.5, 8.5], size=FONT, header=False)


def _pdf_claim_sections(pdf, ev: claims_mod.Evaluation, tables: Tables, t: pd.DataFrame, curves: pd.DataFrame,
                        refs) -> set[str]:
    """One section per group of verdicts that read the same trials: the claims, their verdicts in detail, their
    cells and a figure. Returns the cells shown."""
    from harness.report import figures as figs

    shown_cells: set[str] = set()
    for vs, title in section_titles(verdict_groups(ev)):
        pdf.section(min_room=3.0)
        ids = list(dict.fromkeys(v.claim_id for v in vs))
        pdf.heading(title, size=12)
        for cid in ids:
            claim = claims_mod.CLAIMS.get(cid, claims_mod.QUESTION)
            pdf.paragraph(f"{cid} paper setup: {claim.setup}.", size=FONT)
        columns, rows, styles = verdict_details(vs)
        pdf.table(columns, rows, widths=[1.3] + [9.4 / len(vs)] * len(vs), size=FONT, styles=styles)
        cells = _claim_cells(tables.cells, vs)
        shown_cells |= set(cells["cell"])
        pdf.table(CELL_COLUMNS, _cell_rows(cells), widths=CELL_WIDTHS, size=FONT)
        # the figure takes what is left of the page (2.4-3.4 in), else a full-height one on the next page
        pdf.figure(lambda fig, rect, vs=vs: figs.draw_claim(fig, rect, vs, t, curves, refs),
                   height=min(3.4, pdf.room - 0.1) if pdf.room >= 2.3 else 3.4)
    return shown_cells


def _pdf_training_curves(pdf, t: pd.DataFrame, curves: pd.DataFrame) -> None:
    """Training curves and schedules (one page)."""
    from harness.report import figures as figs

    pdf.section(min_room=5.6)
    pdf.heading("Training curves: loss and test accuracy against step, epoch and training seconds", size=12)
    pdf.paragraph("Line: median over the seeds of each cell; band: min to max over seeds. The same points "
                  "on three x-axes (epochs = images seen / training images; seconds = cumulative training time "
                  "without evaluation). Every point is in the curves CSV beside this PDF.", size=FONT)
    pdf.figure(lambda fig, rect: figs.draw_training_curves(fig, rect, t, curves), height=4.5)
    sched = schedule_curves(t)
    if figs.schedule_panels(t, sched):   # no panel that shows one constant in every cell
        pdf.heading("Learning rate and momentum at every step (from the trial config)", size=11, keep_with=2.0)
        pdf.figure(lambda fig, rect: figs.draw_schedules(fig, rect, t, sched), height=2.5)


def _pdf_outcomes(pdf, t: pd.DataFrame, curves: pd.DataFrame, refs, study: str) -> None:
    """Outcomes (final accuracy vs batch, steps to target), accuracy per schedule with the authors' logs, and the
    LR range tests if any."""
    from harness.report import figures as figs

    pdf.section(min_room=4.0)
    pdf.heading("Final accuracy vs total batch size; steps to target", size=12)

    done = t[t["status"].isin(["completed", "diverged"])]
    pdf.figure(lambda fig, rect: figs.draw_outcomes(fig, rect, done), height=3.0)
    n_sched = max(1, len([s for s in t.get("schedule", pd.Series(["all"])).unique() if s != "range_test"]))
    pdf.heading("Test accuracy vs iteration, per schedule, with the authors' logs", size=12, keep_with=3.0)
    pdf.paragraph("Thick pale line: the authors' Caffe log with the same setup (dataset, model, schedule, total batch, "
                  "peak LR, steps), when there is one.", size=FONT)
    pdf.figure(lambda fig, rect: figs.draw_accuracy_by_schedule(fig, rect, t, curves, refs),
               height=min(6.6, 3.3 * ((n_sched + 1) // 2)))
    logs = {} if refs else shape.authors_logs_by_schedule(study)
    if logs and "schedule" in t and t["schedule"].isin(list(logs)).any():
        pdf.heading("The schedules' shape beside the authors' logs", size=12, keep_with=3.0)
        pdf.paragraph("No authors' log has this scale's setup, so the curves are drawn on each run's own clock: "
                      "test accuracy against the fraction of the run's iterations. Ours: median over seeds, "
                      "band min-max; thick pale lines: the authors' Caffe logs that this study's paper scale "
                      "matches.", size=FONT)
        pdf.figure(lambda fig, rect: shape.draw_shapes(fig, rect, t, curves, logs), height=3.3)
    if "schedule" in t and (t["schedule"] == "range_test").any():
        pdf.heading("LR range tests", size=12, keep_with=4.0)
        pdf.figure(lambda fig, rect: figs.draw_range_tests(figs.axes_in(fig, rect)[0], t, curves), height=4.0)


def _pdf_tables(pdf, res: StudyResults, tables: Tables, shown_cells: set[str]) -> None:
    """The cells no claim section showed (all of them, if any is missing), then the appendix: every trial."""
    if set(tables.cells["cell"]) - shown_cells:
        pdf.section(min_room=2.5)
        pdf.heading("All cells", size=12)
        pdf.table(CELL_COLUMNS, _cell_rows(tables.cells), widths=CELL_WIDTHS, size=FONT)
    pdf.section(min_room=2.5)
    pdf.heading("Appendix: every trial", size=12)
    pdf.paragraph("Final accuracy of a diverged trial is its last measured test accuracy; steps to target "
                  "'never' = missed or diverged. Open a run in MLflow by its run id.", size=FONT)
    pdf.table(TRIAL_COLUMNS, _trial_rows(res.trials), widths=TRIAL_WIDTHS, size=FONT)


def _trial_rows(t: pd.DataFrame) -> list[list[str]]:
    rows = []
    multi = t["scale"].nunique() > 1
    for r in t.to_dict("records"):
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        seed = r.get("seed")
        seed = "" if seed is None or pd.isna(seed) else f"{seed:g}" if isinstance(seed, float) else str(seed)
        rows.append([str(r["run_name"]), r["run_id"], (f"[{r['scale']}] " if multi else "") + r["cell_title"], seed,
                     status,
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


def markdown(res: StudyResults, ev: claims_mod.Evaluation, tables: Tables, file_names: dict) -> str:
    pdf_name, curves_name = file_names["pdf"], file_names["curves"]
    out = [f"# Study {res.study}: {ev.scale} scale", "",
           (f"Figures: [{pdf_name}]({pdf_name}); curves: [{curves_name}]({curves_name}). "
            f"Claims: {', '.join(ev.requested)}. Parent run {res.parent['run_id']}."), "", "## Question", "",
           _question(res), "", tables.this_run, "", "## Verdicts", ""]
    rows, _ = _verdict_rows(ev)
    out += [_md_table(VERDICT_COLUMNS, rows) if rows else "No claim could be tested with this study's runs.", ""]
    for text in (_not_tested_text(ev), _excluded_text(ev)):
        if text:
            out += [text, ""]
    if ev.verdicts:
        out += ["## What the runs say", "", summary.INTRO, ""]
        for title, vs in summary.summary_groups(ev.verdicts):
            out += [f"### {title} ({len(vs)})", "", *[f"- {summary.summary_line(v)}" for v in vs], ""]
    out += ["## The paper's setup vs this run", "",
            f"Paper-scale column: {tables.paper_source}. {rsetup.PAPER_SOURCE}", "",
            _md_table(rsetup.columns(ev.scale), tables.paper_vs_run), "",
            f"Deviations of the {ev.scale} scale from the authors' setup ({tables.deviations_source}):", ""]
    out += [f"- {d}" for d in tables.deviations or ["none declared"]] + ["", DECISION_RULE, ""]
    out += ["## Setup and provenance", "", _md_table(["", ""], tables.setup), ""]
    shown: set[str] = set()
    for vs, title in section_titles(verdict_groups(ev)):
        ids = list(dict.fromkeys(v.claim_id for v in vs))
        out += [f"## {title}", ""]
        for cid in ids:
            out += [f"{cid} paper setup: {claims_mod.CLAIMS.get(cid, claims_mod.QUESTION).setup}.", ""]
        columns, rows, _ = verdict_details(vs)
        out += [_md_table(columns, rows), ""]
        cells = _claim_cells(tables.cells, vs)
        shown |= set(cells["cell"])
        out += [_md_table(CELL_COLUMNS, _cell_rows(cells)), ""]
    if tables.best_lr is not None:
        out += markdown_section(tables.best_lr, _md_table)
    if set(tables.cells["cell"]) - shown:
        out += ["## All cells", "", _md_table(CELL_COLUMNS, _cell_rows(tables.cells)), ""]
    out += ["## Appendix: every trial", "", _md_table(TRIAL_COLUMNS, _trial_rows(res.trials)), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
