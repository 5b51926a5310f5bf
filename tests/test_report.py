"""`python -m harness.report`: the PDF, its Markdown and CSV twins, and the bad-input paths (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pypdf import PdfReader

from harness.analysis.results import load_study
from harness.report import build as report

try:
    from tests.synthetic_store import synthetic_uri
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from synthetic_store import synthetic_uri

ROOT = Path(__file__).resolve().parent.parent
HEAD = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() \
    or "unknown"


@pytest.fixture(scope="module")
def uri():
    return synthetic_uri()


def run_report(uri, study, out_dir, *extra) -> tuple[int, Path]:
    out = Path(out_dir) / f"{study}.pdf"
    code = report.main([study, "--tracking-uri", uri, "--out", str(out), *extra])
    return code, out


def pdf_text(path: Path) -> list[str]:
    return [page.extract_text() for page in PdfReader(path).pages]


def test_report_supported_study(uri, tmp_path, capsys):
    code, pdf = run_report(uri, "super_convergence", tmp_path)
    assert code == 0
    printed = capsys.readouterr().out
    pages = pdf_text(pdf)
    assert f"{len(pages)} pages" in printed and str(pdf) in printed and " s (loading" in printed
    assert 4 <= len(pages) <= 7
    first = " ".join(" ".join(pages[:3]).split())      # page 1 and its continuation (what the runs say, setup)
    for text in ("Does one cycle of a large cyclical learning rate", "SC1", "supported", "CLR 92.4 vs PC 91.2",
                 "92.44 vs 90.32", "CLR triangular 92.12% vs multistep 85.12%", "Welch t",
                 "quick scale", "2x CPU", HEAD[:16], "Setup", "Decision rule"):
        assert text in first, text
    assert "authors' log clr3SS5kFig1a" not in first
    trials = pd.read_csv(tmp_path / "super_convergence.trials.csv")
    assert len(trials) == 8 and set(trials["status"]) == {"completed"}
    appendix = " ".join(" ".join(pages[-1].split()).split())
    assert all(rid in appendix for rid in trials["run_id"])            # every trial with its MLflow run id
    verdicts = pd.read_csv(tmp_path / "super_convergence.verdicts.csv")
    assert verdicts[["claim_id", "verdict"]].values.tolist() == [["SC1", "supported"]]
    cells = pd.read_csv(tmp_path / "super_convergence.cells.csv")
    assert cells["cell"].tolist() == ["schedule=multistep", "schedule=triangular"] and cells["n"].tolist() == [4, 4]
    assert cells["cell_title"].tolist() == ["multistep", "CLR triangular"]
    md = (tmp_path / "super_convergence.md").read_text()
    assert "| SC1: Super-convergence" in md and "supported" in md and trials["run_id"][0] in md
    curves = pd.read_csv(tmp_path / "super_convergence.curves.csv")
    assert list(curves.columns[:7]) == ["trial", "cell", "seed", "run_id", "step", "epoch", "train_seconds"]
    assert {"train_loss", "test_acc", "lr", "momentum"} <= set(curves.columns)
    assert set(curves["cell"]) == {"multistep", "CLR triangular"} and curves["run_id"].nunique() == 8
    assert len(curves) == 8 * 6 and curves["epoch"].notna().all()


def test_report_diverged_study(uri, tmp_path):
    code, pdf = run_report(uri, "weight_decay", tmp_path)
    assert code == 0
    text = " ".join(" ".join(pdf_text(pdf)).split())
    assert "3 diverged" in text and "Excluded from the verdicts: 1 error trial(s)" in text
    assert "error: RuntimeError: CUDA out of memory" in text
    cells = pd.read_csv(tmp_path / "weight_decay.cells.csv")
    assert cells.set_index("cell").loc["weight_decay=0.001", "diverged"] == 3


@pytest.mark.slow
def test_smoke_study_is_a_pipeline_check_via_the_real_cli(uri, tmp_path):
    out = tmp_path / "smoke" / "smoke_check.pdf"
    proc = subprocess.run([sys.executable, "-m", "harness.report", "smoke_check", "--tracking-uri", uri,
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "report:" in proc.stdout and str(out) in proc.stdout
    first = " ".join(pdf_text(out)[0].split())
    assert "pipeline check (smoke scale): would be inconclusive" in first
    assert set(pd.read_csv(tmp_path / "smoke" / "smoke_check.verdicts.csv")["verdict"]) == {"pipeline check"}
    assert "LR range tests" in " ".join(pdf_text(out))


def test_study_in_progress_still_reports(uri, tmp_path):
    code, pdf = run_report(uri, "in_progress", tmp_path)
    assert code == 0
    text = " ".join(" ".join(pdf_text(pdf)).split())
    assert "Claims not tested, and why: SC1" in text and "1 running trial(s)" in text
    assert "error: ValueError: worker could not start" in text
    trials = pd.read_csv(tmp_path / "in_progress.trials.csv")
    assert sorted(trials["status"]) == ["completed", "error", "running"]


def test_run_selection(uri):
    latest = load_study("super_convergence", uri, curves=False)
    both = load_study("super_convergence", uri, run="all", curves=False)
    assert latest.parent["tags"]["harness.scale"] == "quick" and len(latest.trials) == 8
    assert len(both.parents) == 2 and len(both.trials) == 10 and both.scale == "quick"
    old = both.parents[1]["run_id"]
    assert set(load_study("super_convergence", uri, run=old, curves=False).trials["scale"]) == {"smoke"}


def test_run_all_logs_to_the_newest_parent_run_and_says_so(uri, tmp_path, capsys):
    """The sqlite store (file artifacts): --run all puts the report and the verdict tags on the newest parent run
    only (tests/test_report_mlflow.py checks the rest against a real server)."""
    from mlflow.tracking import MlflowClient

    from harness import names
    both = load_study("super_convergence", uri, run="all", curves=False)
    newest, old = (p["run_id"] for p in both.parents)
    code, _ = run_report(uri, "super_convergence", tmp_path, "--run", "all")
    assert code == 0
    printed = capsys.readouterr().out
    assert f"logged to parent run {newest} (the newest of the 2 parent runs" in printed, printed
    client = MlflowClient(uri)
    verdicts = pd.read_csv(tmp_path / "super_convergence.verdicts.csv")
    tags = {k: v for k, v in client.get_run(newest).data.tags.items() if k.startswith(names.VERDICT_TAG_PREFIX)}
    assert [v.split(":")[0] for v in tags.values()] == verdicts["verdict"].tolist() and len(tags) == 1
    assert {a.path for a in client.list_artifacts(newest, names.REPORT_ARTIFACT_DIR)} == {
        f"report/super_convergence{ext}" for ext in (".pdf", ".md", ".verdicts.csv")}
    assert not any(k.startswith(names.VERDICT_TAG_PREFIX) for k in client.get_run(old).data.tags)
    assert client.list_artifacts(old, names.REPORT_ARTIFACT_DIR) == []


def test_curves_loaded_in_bulk_match_the_per_run_history(uri):
    from mlflow.tracking import MlflowClient
    res = load_study("batch_size_effect", uri)
    assert set(res.curves.columns) >= {"run_id", "step", "lr", "momentum", "test_acc", "train_seconds"}
    rid = res.trials["run_id"].iloc[0]
    hist = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(rid, "test_acc"))
    mine = res.curves[res.curves["run_id"] == rid][["step", "test_acc"]]
    assert [tuple(r) for r in mine.itertuples(index=False)] == hist


@pytest.mark.parametrize("case", ["unknown_study", "no_runs", "missing_store", "not_a_store", "unreachable_server",
                                  "unknown_run"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(uri, tmp_path, capsys, case):
    study, extra, store = "super_convergence", [], uri
    expect = ""
    if case == "unknown_study":
        study, expect = "no_such_study", "studies there: batch_size_effect, empty_study, in_progress, momentum"
    elif case == "no_runs":
        study, expect = "empty_study", "no trial runs"
    elif case == "missing_store":
        store, expect = f"sqlite:///{tmp_path}/nothing/mlflow.db", "no MLflow store"
    elif case == "not_a_store":
        (tmp_path / "empty.db").write_bytes(b"")
        store, expect = f"sqlite:///{tmp_path}/empty.db", "is not an MLflow store"
    elif case == "unreachable_server":
        store, expect = "http://127.0.0.1:9", "does not answer"
    elif case == "unknown_run":
        extra, expect = ["--run", "0" * 32], "is not a parent run"
    out_dir = tmp_path / "out"
    code = report.main([study, "--tracking-uri", store, "--out", str(out_dir / "x.pdf"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err
    assert not out_dir.exists() and not (tmp_path / "nothing").exists()
    if case == "not_a_store":
        assert (tmp_path / "empty.db").stat().st_size == 0          # untouched


def test_help_and_default_uri(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.parse_args(["--help"])
    assert e.value.code == 0 and "--tracking-uri" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert report.main(["x"]) == 2                         # default store: ./mlflow.db, which does not exist
    assert f"{tmp_path}/mlflow.db" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_first_page_compares_the_papers_setup_with_this_run(uri, tmp_path):
    code, pdf = run_report(uri, "super_convergence", tmp_path)
    assert code == 0
    first = " ".join(" ".join(pdf_text(pdf)[:2]).split())
    assert "This run: quick scale, 8 trials in 2 cells, 4 trials per cell (seeds 0, 1, 2, 3; LR scales x1)" in first
    assert "The paper's setup vs this run" in first and "studies/super_convergence.yaml" in first
    # paper column: the study file's paper scale (caffe_sgd, CLR 0.1-3 over 10k steps vs PC 80k steps);
    # this run: the synthetic trials' typed configs
    for text in ("data and training images", "BN statistics over", "steps (epochs) per cell", "LR tuning",
                 "BN momentum", "augmentation", "target accuracy", "caffe_sgd", "80,000 steps",
                 "per-pixel mean subtraction"):
        assert text in first, text
    whole = " ".join(" ".join(pdf_text(pdf)).split())
    assert "synthetic numbers: accuracy rises as sqrt(progress)" in whole     # the logged scale's declared words
    assert "model: [resnet20] here, [resnet56] in the paper scale" in whole  # and the computed ones
    md = (tmp_path / "super_convergence.md").read_text()
    assert "## The paper's setup vs this run" in md and "| steps (epochs) per cell |" in md


def test_paper_side_and_provenance_units():
    from harness.report import setup as rs
    side = rs.paper_side("batch_size_effect", {"name": "batch_size_effect", "scale": "quick"})
    assert "studies/batch_size_effect.yaml" in side.source and len(side.configs) == 8 * 3 * 3
    assert rs.paper_side("no_such_study", None).configs == []
    from harness import spec as specs
    study_file = specs.load_spec("batch_size_effect")   # what harness.study logs beside the resolved scale
    study_file["grid"] = {"seed": [0]}   # one seed instead of three
    logged = rs.paper_side("batch_size_effect",
                           {"name": "batch_size_effect", "scale": "quick", "study_file": study_file})
    assert "logged with this run" in logged.source and len(logged.configs) == 8 * 3  # the logged file, not today's
    dirty = {"tags": {"harness.git_commit": "abc", "harness.git_dirty": "true",
                      "harness.git_dirty_files": '["harness/a.py", "studies/b.yaml"]'}}
    assert rs.provenance(dirty) == "abc (dirty working tree: harness/a.py, studies/b.yaml)"
    assert rs.provenance({"tags": {"harness.git_commit": "abc", "harness.git_dirty": "false"}}) == \
        "abc (clean working tree)"
    assert "not recorded" in rs.provenance({"tags": {}})


def test_verdict_details_are_rendered_and_merged_sections(uri, tmp_path):
    code, pdf = run_report(uri, "batch_size_effect", tmp_path)
    assert code == 0
    text = " ".join(" ".join(pdf_text(pdf)).split())
    # SC4 and DA2 read the same trials: one section, one figure
    assert "SC4 and DA2: Larger total batch sizes" in text and text.count("SC4 paper setup") == 1
    for t in ("pre-registered", "SC4: batch_size=1024 vs batch_size=256, n=3 per arm", "observed direction",
              "opposite to the claim", "interval and test", "no interval: fewer than 5 units in an arm (n = 3 vs 3)",
              "exact permutation test on the difference of means (all 20 splits of the units): p = 0.1", "LR tuning",
              "arms also differ in", "batch 1024 vs batch 256"):
        assert t in text, t
    md = (tmp_path / "batch_size_effect.md").read_text()
    assert "| observed direction | opposite to the claim |" in md and "all 20 splits of the units" in md
    assert "| pre-registered |" in md
    # below 2 units per arm: no interval, no range, no test; the per-seed values and the direction instead
    code, smoke = run_report(uri, "smoke_check", tmp_path)
    smoke_text = " ".join(" ".join(pdf_text(smoke)).split())
    assert "none: fewer than 2 units in an arm (n = 1 vs 1), so no interval, no range and no test" in smoke_text
    assert "per seed one-cycle: s0 60.00%; multistep: s0 40.00%" in smoke_text


@pytest.mark.parametrize("study", ["super_convergence", "batch_size_effect", "weight_decay", "smoke_check"])
def test_no_text_under_8_points_and_cells_in_words(uri, tmp_path, study):
    import re
    files = report.build_report(study, uri, out=tmp_path / f"{study}.pdf")
    assert files.min_font >= 8.0, files.min_font
    text = " ".join(pdf_text(files.pdf))
    assert not re.search(r"\w+=[^,\s]+,\w+=", text), re.search(r"\w+=[^,\s]+,\w+=", text)  # no cell strings
    assert files.pages >= 3


def test_the_font_check_catches_small_text(tmp_path):
    from harness.report.pdf import FlowPdf
    with FlowPdf(tmp_path / "x.pdf") as pdf:
        pdf.new_page()
        pdf.paragraph("legible", size=8)
        pdf.figure(lambda fig, rect: fig.add_axes(rect).set_title("tiny", fontsize=6), height=2)
    assert pdf.min_font == 6 and pdf.small_texts == [(1, 6.0, "tiny")]
