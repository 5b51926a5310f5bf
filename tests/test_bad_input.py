"""Bad input, one table: every row is one line on stderr naming the problem and what is allowed, exit code 2,
and nothing left behind (no MLflow store or run, no Ray results folder). Runs `harness.study.main` in a
fresh working directory; no row starts Ray."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
import yaml

from harness.study import cluster
from harness.study.cli import main
from harness.trial import data

try:
    from tests.test_study import TINY
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from test_study import TINY


def base(**changes) -> dict:
    study = yaml.safe_load(yaml.safe_dump(TINY))
    study["base"].update(changes)
    return study


MALFORMED = "name: tiny\nquestion: q\nbase: {dataset: digits\nsteps: 3\n"

# id, study (a dict, YAML text, or a study name), extra arguments, what stderr must say (every part)
ROWS = [
    ("unknown study", "batch_size_efect", [],
     ["no study 'batch_size_efect'", "did you mean 'batch_size_effect'",
      "studies: " + ", ".join(n for n, _ in __import__("harness.spec").spec.list_studies())]),
    ("malformed YAML", MALFORMED, [],
     ["line 4, column 6", "not valid YAML", "expected ',' or '}'", "from line 3, column 7", "a study file is"]),
    ("unknown top key", {**TINY, "resoures": {}}, [], ["unknown key 'resoures' (did you mean 'resources'?)",
                                                       "allowed: name, question"]),
    ("unknown trial field", base(batchsize=3), [], ["'batchsize'", "did you mean 'batch_size'", "allowed:"]),
    ("wrong type", base(max_lr="big"), [], ["max_lr must be a number", "'big'"]),
    ("wrong type, list", {**TINY, "grid": {"seed": 3}}, [], ["grid.seed must be a non-empty list"]),
    ("negative LR", base(base_lr=-0.1), [], ["base_lr must be >= 0, got -0.1"]),
    ("zero LR", {**TINY, "paired": {"schedule": [{"schedule": "constant", "max_lr": 0}]}}, [],
     ["max_lr must be > 0 (the schedule's peak LR), got 0"]),
    ("zero batch", base(batch_size=0), [], ["batch_size must be a positive integer, got 0"]),
    ("zero steps", base(steps=0), [], ["steps must be a positive integer, got 0"]),
    ("negative steps", base(steps=-5), [], ["steps must be a positive integer, got -5"]),
    ("batch not split into BN micro-batches", base(batch_size=300), [],
     ["batch_size 300", "not a multiple of bn_batch 125", "multiple of workers x bn_batch = 250"]),
    ("unknown schedule", {**TINY, "paired": {"schedule": [{"schedule": "onecycle", "max_lr": 0.8}]}}, [],
     ["schedule 'onecycle' is not known", "did you mean 'one_cycle'", "allowed: constant"]),
    ("unknown model", base(model="vgg16"), [], ["model 'vgg16' is not known", "allowed:", "resnet56"]),
    ("unknown dataset", base(dataset="imagenet"), [], ["dataset 'imagenet' is not known", "allowed:", "cifar10"]),
    ("unknown scale", TINY, ["--scale", "huge"], ["invalid choice: 'huge'", "'smoke', 'quick', 'paper'"]),
    ("scale the study lacks", {**TINY, "scales": {"quick": {"base": {"steps": 40}}}}, ["--scale", "paper"],
     ["has no scale 'paper'", "it has: quick"]),
    ("dataset missing offline", base(dataset="cifar10", model="resnet20"), [],
     ["dataset 'cifar10' not found", "HARNESS_DATA_DIR", "download (disabled)", "data_batch_1"]),
    ("unreachable --address", TINY, ["--address", "127.0.0.1:1"],
     ["no Ray cluster answers at 127.0.0.1:1", "ray start --head", "drop --address"]),
    ("malformed --address", TINY, ["--address", "nonsense"], ["not host:port", "allowed: auto, host:port"]),
    ("unreachable tracking server", TINY, ["--tracking-uri", "http://127.0.0.1:9"],
     ["MLflow tracking server at http://127.0.0.1:9 does not answer", "mlflow server", "--tracking-uri"]),
    ("tracking URI not an MLflow server", TINY, ["--tracking-uri", "{not_mlflow}"],
     ["does not answer", "HTTP Error 404", "mlflow server"]),
    ("tracking URI scheme unknown", TINY, ["--tracking-uri", "foo://bar"],
     ["MLflow store foo://bar does not answer", "Supported URI schemes are", "sqlite"]),
    ("tracking store folder missing", TINY, ["--tracking-uri", "sqlite:////nonexistent/x/mlflow.db"],
     ["cannot write the MLflow sqlite store in /nonexistent/x", "sqlite:///<writable path>"]),
    ("storage that cannot be created", TINY, ["--storage", "/proc/forbidden"],
     ["--storage /proc/forbidden cannot be written", "nothing can be created in /proc", "allowed: a folder",
      "s3://BUCKET/PATH"]),
    ("storage that is a file", TINY, ["--storage", "{workdir}/study.yaml/sub"],
     ["study.yaml is a file, not a folder", "allowed: a folder"]),
    ("nothing to resume", TINY, ["--resume"],
     ["nothing to resume: no earlier run of tiny at scale smoke in ", "run it without --resume"]),
]


@pytest.fixture(scope="module")
def not_mlflow():
    """An HTTP server that is not MLflow: every path is 404."""
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):  # quiet: the row checks stderr
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def offline(workdir, monkeypatch):
    """No dataset files anywhere and no download: only `digits` (bundled with scikit-learn) exists."""
    for name in ("empty", "xdg"):
        (workdir / name).mkdir()
    monkeypatch.setenv("HARNESS_DATA_DIR", str(workdir / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(workdir / "xdg"))
    monkeypatch.setenv("HARNESS_NO_DOWNLOAD", "1")
    monkeypatch.setattr(data, "DEBIAN_DATA_ROOT", workdir / "no-debian")
    return workdir


@pytest.mark.parametrize("study, extra, expected", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(offline, capsys, monkeypatch, not_mlflow, study, extra,
                                                         expected):
    workdir: Path = offline
    if isinstance(study, dict):
        (workdir / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
        target = str(workdir / "study.yaml")
    elif "\n" in study:
        (workdir / "study.yaml").write_text(study)
        target = str(workdir / "study.yaml")
    else:
        target = study
    storage = workdir / "storage"

    def no_ray(address):
        raise AssertionError("bad input reached Ray")

    monkeypatch.setattr(cluster, "init_ray", no_ray)
    extra = [a.format(not_mlflow=not_mlflow, workdir=workdir) for a in extra]
    try:
        rc = main([target, "--storage", str(storage), *extra])
    except SystemExit as e:  # argparse's errors and ray.init's end as SystemExit(2) after their one line
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for part in expected:
        assert part in err, (part, err)
    assert not storage.exists() and not (workdir / "ray_results").exists()
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlruns").exists()


def test_locate_reports_an_unreachable_download_host(offline, monkeypatch):
    """Without HARNESS_NO_DOWNLOAD the pre-flight asks the download host; offline it is one line, no download."""
    import socket

    monkeypatch.delenv("HARNESS_NO_DOWNLOAD")

    def refuse(address, timeout=None):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(data.DataNotFoundError) as err:
        data.locate("cifar10")
    msg = str(err.value)
    assert "\n" not in msg and "www.cs.toronto.edu (unreachable: OSError)" in msg
    assert not any((offline / "xdg").iterdir())  # nothing was downloaded
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: socket.socket())
    assert data.locate("cifar10") is None  # reachable: load_dataset will download it
    assert data.locate("digits") is None
