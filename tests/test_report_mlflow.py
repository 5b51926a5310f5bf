"""`python -m harness.report` puts its verdicts where people browse: the PDF, the Markdown and the verdicts CSV as
artifacts of the study's parent run and one harness.verdict.* tag per planned comparison, replaced (never
duplicated) by the next report; --no-mlflow writes nothing; a store that refuses writes costs one warning line.

Against a real `mlflow server` (proxied artifacts, as on the cluster's head) whose store the harness's own writers
filled through the server's URI (tests/synthetic_store.py's Builder)."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness import names
from harness.report import build as report

try:
    from tests.servers import MlflowServer
    from tests.synthetic_store import CIFAR, PC, TRI, Builder
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from servers import MlflowServer
    from synthetic_store import CIFAR, PC, TRI, Builder

STUDY = "verdict_tags"
PLAN = [{"claim": "SC1", "kind": "two_arm", "field": "schedule", "a": "triangular", "b": "multistep"},
        {"claim": "question", "kind": "two_arm", "field": "schedule", "a": "triangular", "b": "multistep",
         "metric": "steps_to_target"}]
ARTIFACTS = {f"{names.REPORT_ARTIFACT_DIR}/{STUDY}{ext}" for ext in (".pdf", ".md", ".verdicts.csv")}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(server URI, parent run id): one study with two planned comparisons, 3 seeds per arm, written through a
    real server."""
    folder = tmp_path_factory.mktemp("report-mlflow")
    server = MlflowServer(folder / "server").start()
    try:
        b = Builder(folder)
        b.uri = server.uri             # through the server: artifacts go to its proxied store
        exp, parent, trials = b.study(STUDY, "quick", ["SC1"], "Does one CLR cycle beat PC-LR?",
                                      {**CIFAR, "target_acc": 0.9}, paired={"schedule": [TRI, PC]},
                                      grid={"seed": [0, 1, 2]}, analysis=PLAN)
        with ThreadPoolExecutor(len(trials)) as pool:    # ~1.5 s of requests per trial, written side by side
            list(pool.map(lambda t: b.trial(exp, parent, t, final=(0.92 if t.config.schedule == "triangular" else
                                                                  0.85) + [-0.005, 0.0, 0.005][t.config.seed]),
                          trials))
        yield server.uri, parent
    finally:
        server.stop()


def snapshot(client: MlflowClient, run_id: str) -> tuple[dict, dict, list[str]]:
    """(verdict tags, every other tag, artifact paths under report/) of a run."""
    tags = client.get_run(run_id).data.tags
    verdicts = {k: v for k, v in tags.items() if k.startswith(names.VERDICT_TAG_PREFIX)}
    others = {k: v for k, v in tags.items() if k not in verdicts}
    return verdicts, others, sorted(a.path for a in client.list_artifacts(run_id, names.REPORT_ARTIFACT_DIR))


def logged_verdicts(client: MlflowClient, run_id: str, tmp: Path) -> pd.DataFrame:
    path = client.download_artifacts(run_id, f"{names.REPORT_ARTIFACT_DIR}/{STUDY}.verdicts.csv", str(tmp))
    return pd.read_csv(path)


def check_tags_match_csv(tags: dict, csv: pd.DataFrame) -> None:
    """Exactly one tag per comparison of the verdicts CSV, each with that comparison's verdict."""
    assert len(tags) == len(csv)
    for row in csv.to_dict("records"):
        hits = [k for k in tags if k.startswith(f"{names.VERDICT_TAG_PREFIX}{row['claim_id']}.")]
        assert len(hits) == 1, (row["claim_id"], tags)
        assert tags[hits[0]].split(":")[0] == row["verdict"], (tags[hits[0]], row["verdict"])


def run_report(uri: str, out: Path, *extra: str) -> int:
    return report.main([STUDY, "--tracking-uri", uri, "--out", str(out), *extra])


def test_report_logs_to_the_parent_run_and_replaces_itself(store, tmp_path, capsys):
    uri, parent = store
    client = MlflowClient(uri)
    _, tags_before, _ = snapshot(client, parent)

    assert run_report(uri, tmp_path / "first" / f"{STUDY}.pdf") == 0
    assert f"logged to parent run {parent}" in capsys.readouterr().out
    tags1, others1, files1 = snapshot(client, parent)
    assert set(files1) == ARTIFACTS
    csv1 = logged_verdicts(client, parent, tmp_path / "dl1")
    local = pd.read_csv(tmp_path / "first" / f"{STUDY}.verdicts.csv")
    assert csv1[["claim_id", "comparison", "verdict"]].equals(local[["claim_id", "comparison", "verdict"]])
    assert sorted(csv1["claim_id"]) == ["SC1", "question"]
    check_tags_match_csv(tags1, csv1)
    assert tags1[f"{names.VERDICT_TAG_PREFIX}SC1.schedule-triangular-vs-schedule-multistep"].endswith(": +7.00 pp")
    assert others1 == tags_before                                  # nothing else on the run changed
    md = client.download_artifacts(parent, f"{names.REPORT_ARTIFACT_DIR}/{STUDY}.md", str(tmp_path / "md"))
    assert f"Parent run {parent}" in Path(md).read_text()

    # the same report again, under another --out name: the same artifacts, overwritten; the same tags
    assert run_report(uri, tmp_path / "second" / "renamed.pdf") == 0
    tags2, others2, files2 = snapshot(client, parent)
    assert (tags2, others2, files2) == (tags1, others1, files1)
    md = client.download_artifacts(parent, f"{names.REPORT_ARTIFACT_DIR}/{STUDY}.md", str(tmp_path / "md2"))
    assert f"[{STUDY}.pdf]({STUDY}.pdf)" in Path(md).read_text()   # its links name the files as logged

    # the plan loses its second comparison (the logged spec is what the report follows): its tag goes
    spec_path = client.download_artifacts(parent, names.SPEC_ARTIFACT, str(tmp_path / "spec"))
    spec = yaml.safe_load(Path(spec_path).read_text())
    spec["analysis"]["comparisons"] = spec["analysis"]["comparisons"][:1]
    client.log_text(parent, yaml.safe_dump(spec, sort_keys=False), names.SPEC_ARTIFACT)
    capsys.readouterr()
    assert run_report(uri, tmp_path / "third" / f"{STUDY}.pdf") == 0
    assert "removed 1 tag(s) of comparisons no longer in the plan" in capsys.readouterr().out
    tags3, others3, files3 = snapshot(client, parent)
    csv3 = logged_verdicts(client, parent, tmp_path / "dl3")
    assert csv3["claim_id"].tolist() == ["SC1"]
    check_tags_match_csv(tags3, csv3)
    assert tags3 == {k: v for k, v in tags1.items() if ".SC1." in k}
    assert files3 == files1 and others3 == others1


def test_no_mlflow_writes_nothing(store, tmp_path, capsys):
    uri, parent = store
    client = MlflowClient(uri)
    before = snapshot(client, parent)
    assert run_report(uri, tmp_path / f"{STUDY}.pdf", "--no-mlflow") == 0
    out = capsys.readouterr()
    assert "mlflow:" not in out.out and out.err == ""
    assert (tmp_path / f"{STUDY}.pdf").is_file()
    assert snapshot(client, parent) == before


class _ReadOnly(http.server.BaseHTTPRequestHandler):
    """In front of the real server: reads pass, writes (anything but GET and the POST searches) get HTTP 403."""
    upstream = ""

    def _relay(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command != "GET" and not self.path.split("?")[0].endswith("/search"):
            status, ctype = 403, "application/json"
            data = json.dumps({"error_code": "PERMISSION_DENIED", "message": "this store is read-only"}).encode()
        else:
            req = urllib.request.Request(self.upstream + self.path, data=body or None, method=self.command,
                                         headers={"Content-Type": self.headers.get("Content-Type", "")})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    status, ctype, data = resp.status, resp.headers.get("Content-Type"), resp.read()
            except urllib.error.HTTPError as e:
                status, ctype, data = e.code, e.headers.get("Content-Type"), e.read()
        self.send_response(status)
        self.send_header("Content-Type", ctype or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

    def log_message(self, *args):
        pass


def test_a_store_that_refuses_writes_costs_one_warning_line(store, tmp_path, capsys):
    uri, parent = store
    handler = type("Handler", (_ReadOnly,), {"upstream": uri})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        client = MlflowClient(uri)
        before = snapshot(client, parent)
        assert run_report(f"http://127.0.0.1:{proxy.server_address[1]}", tmp_path / f"{STUDY}.pdf") == 0
        out = capsys.readouterr()
        assert out.err.count("\n") == 1 and out.err.startswith("warning: the report was not logged to MLflow run")
        assert "PERMISSION_DENIED" in out.err and "--no-mlflow" in out.err, out.err
        assert "report:" in out.out and (tmp_path / f"{STUDY}.verdicts.csv").is_file()
        assert snapshot(client, parent) == before
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_tag_keys_follow_mlflows_rules():
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, _validate_tag_name  # MLflow's own check

    from harness.analysis import claims as claims_mod

    def verdict(claim, comparison, diff=0.0123, metric="final_acc", verdict="supported", would_be=None):
        fields = {f: "" for f in claims_mod.Verdict.__dataclass_fields__}
        fields.update(claim_id=claim, comparison=comparison, metric=metric, verdict=verdict,
                      would_be=would_be or verdict, direction=1, n_a=3, n_b=3, median_a=0.0, median_b=0.0,
                      diff=diff, cells=[], run_ids=[])
        for f in ("ci_low", "ci_high", "p", "rho", "rho_p"):
            fields[f] = float("nan")
        return claims_mod.Verdict(**fields)

    long = "(batch_size=1000 - batch_size=250) under schedule=one_cycle/cosine minus under schedule=multistep " * 3
    ev = claims_mod.Evaluation(verdicts=[
        verdict("SC4", "batch_size=1000 vs batch_size=250 [schedule=one_cycle]"),
        verdict("question", "invert_images=False vs invert_images=True"),     # twice: only `where` differs
        verdict("question", "invert_images=False vs invert_images=True", diff=-0.02, verdict="contradicted"),
        verdict("question", long, diff=float("nan"), verdict="inconclusive"),
        verdict("SC1", "one_cycle vs multistep ../..", diff=1200.0, metric="steps_to_target",
                verdict="pipeline check", would_be="inconclusive"),
    ], not_tested=[], scale="quick", requested=[], excluded={}, n_trials=0)
    tags = report.verdict_tags(ev)
    assert len(tags) == 5
    for key in tags:
        _validate_tag_name(key)
        assert len(key) <= MAX_ENTITY_KEY_LENGTH and len(key) <= 100, key
    assert list(tags.items())[:3] == [
        ("harness.verdict.SC4.batch_size-1000-vs-batch_size-250-schedule-one_cycle", "supported: +1.23 pp"),
        ("harness.verdict.question.invert_images-False-vs-invert_images-True", "supported: +1.23 pp"),
        ("harness.verdict.question.invert_images-False-vs-invert_images-True-2", "contradicted: -2.00 pp")]
    assert list(tags.values())[3:] == ["inconclusive: n/a", "pipeline check: +1,200 steps (would be inconclusive)"]
    assert report.verdict_tags(ev) == tags                               # stable: the same keys every report
