"""The authors' Caffe logs -> harness/analysis/reference/*.csv (parser, committed CSVs, setup matching)."""

from __future__ import annotations

import gzip

import pytest

from harness.analysis import caffe_logs

try:
    from tests.paper_material import FIXTURES, LOG_EXCERPTS, caffe_logs_dir, shared_path
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from paper_material import FIXTURES, LOG_EXCERPTS, caffe_logs_dir, shared_path

LOGS = caffe_logs_dir()  # all 43 logs in ../shared when it is there, else the committed excerpts of 4
FULL = LOGS != FIXTURES / "caffe-logs"


def present(names) -> list[str]:
    """The named logs that LOGS holds; every excerpt is one of them."""
    found = [n for n in names if (LOGS / f"{n}.log.gz").is_file()]
    assert set(found) == set(names) if FULL else set(found) == set(names) & set(LOG_EXCERPTS), found
    assert found
    return found


def test_parse_real_log_fig1a():
    log = caffe_logs.parse_log(LOGS / "clr3SS5kFig1a.log.gz")
    rows = {r["iteration"]: r for r in log.curve}
    assert rows[0]["lr"] == 0.1 and rows[100]["lr"] == 0.158
    assert rows[10000]["test_acc"] == 0.9244                      # claims.md: CLR 92.44
    assert len(log.curve) == 101                                  # one row per test interval (every 100 it)
    s = log.setup
    assert (s["dataset"], s["model"], s["schedule"], s["batch"], s["max_lr"], s["steps"]) == \
        ("cifar10", "resnet56", "triangular", 1000, 3.0, 10000)
    assert s["final_acc"] == 0.9244 and "SC1" in s["claims"]


def test_parse_real_logs_match_claims_table_numbers():
    expect = {"lr35Fig1a": 0.9032, "clr3SS5kTr10kTab1": 0.80592, "lr35Tr20kTab1": 0.62328,
              "clr3SS5kRes110Tab1": 0.9237, "lr35AdaDeltaFig9": 0.70968}
    for name in present(expect):
        setup = caffe_logs.parse_log(LOGS / f"{name}.log.gz").setup
        assert setup["final_acc"] == expect[name], name
    multistep = {"lr35Res110Fig6b": ("multistep", "resnet110", 800, 0.35, 80000),
                 "lr35Fig1a": ("multistep", "resnet56", 1000, 0.35, 80000)}
    for name in present(multistep):
        pc = caffe_logs.parse_log(LOGS / f"{name}.log.gz").setup
        assert (pc["schedule"], pc["model"], pc["batch"], pc["max_lr"], pc["steps"]) == multistep[name]
    rt = caffe_logs.parse_log(LOGS / "range3Iter20kFig2b.log.gz").setup
    assert (rt["schedule"], rt["base_lr"], rt["max_lr"], rt["steps"]) == ("range_test", 0.0, 3.0, 20000)


def test_committed_reference_csvs_match_a_reparse(tmp_path):
    logs = caffe_logs.write_reference([LOGS, shared_path("paper/da-logs")] if FULL else LOGS, tmp_path)
    committed = sorted(p.name for p in caffe_logs.REFERENCE_DIR.glob("*.csv"))
    fresh = sorted(p.name for p in tmp_path.glob("*.csv") if p.name != "index.csv")
    if FULL:
        assert committed == sorted(fresh + ["index.csv"])
        assert (tmp_path / "index.csv").read_text() == (caffe_logs.REFERENCE_DIR / "index.csv").read_text()
    else:  # the excerpts: their curves and their rows of the committed index
        assert len(fresh) == len(LOG_EXCERPTS) and set(fresh) <= set(committed)
        rows = caffe_logs.index_csv(logs).splitlines()
        committed_rows = (caffe_logs.REFERENCE_DIR / "index.csv").read_text().splitlines()
        assert rows[0] == committed_rows[0] and set(rows[1:]) <= set(committed_rows[1:])
    for name in fresh:
        assert (tmp_path / name).read_text() == (caffe_logs.REFERENCE_DIR / name).read_text(), name


def test_reference_index_and_curve_load():
    index = caffe_logs.load_index()
    assert len(index) == 50 and set(caffe_logs.INDEX_COLUMNS) <= set(index.columns)   # 43 SC logs + 7 DA logs
    curve = caffe_logs.load_curve("clr3SS5kFig1a")
    assert list(curve.columns) == list(caffe_logs.CURVE_COLUMNS)
    assert curve["test_acc"].iloc[-1] == pytest.approx(0.9244)


def test_match_reference_by_setup():
    clr = {"dataset": "cifar10", "model": "resnet56", "schedule": "triangular", "batch_size": 1000, "base_lr": 0.1,
           "max_lr": 3.0, "steps": 10000, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4,
           "train_size": None}
    assert caffe_logs.match_reference(clr) == ["clr3SS5kFig1a"]
    assert caffe_logs.match_reference({**clr, "weight_decay": 1e-5}) == ["clr3SS5kWD-5Fig11"]
    assert caffe_logs.match_reference({**clr, "train_size": 10000}) == ["clr3SS5kTr10kTab1"]
    assert caffe_logs.match_reference({**clr, "steps": 2000}) == []
    assert caffe_logs.match_reference({**clr, "schedule": "one_cycle"}) == []
    pc = {**clr, "schedule": "multistep", "base_lr": 0.1, "max_lr": 0.35, "steps": 80000}   # base_lr unused
    assert caffe_logs.match_reference(pc) == ["lr35Fig1a"]
    assert caffe_logs.match_reference({**pc, "max_lr": 0.7, "lr_scale": 0.5}) == ["lr35Fig1a"]   # peak 0.35
    assert caffe_logs.match_reference({**pc, "lr_scale": 2.0}) == []
    assert caffe_logs.match_reference({**pc, "base_lr": 0.35, "max_lr": 1.0}) == []   # the old base_lr convention


def test_super_convergence_paper_cells_match_their_authors_logs():
    """The study file's paper-scale trials, as the harness expands them, find clr3SS5kFig1a and lr35Fig1a.

    The authors shared logs for stepsize 5k and the multistep baseline only: SC2's other stepsizes find none.
    The paper scale uses Caffe's SGD (caffe_sgd), which the logs' solver type `SGD` names."""
    import pandas as pd

    from harness import spec
    from harness.report.figures import reference_for_cells
    trials = spec.trials(spec.load_spec("super_convergence"), "paper")
    assert {t.config.optimizer for t in trials} == {"caffe_sgd"}
    found = {(t.config.schedule, t.config.stepsize): caffe_logs.match_reference(t.config.to_dict()) for t in trials}
    assert found == {("triangular", 1000): [], ("triangular", 3000): [], ("triangular", 5000): ["clr3SS5kFig1a"],
                     ("triangular", 10000): [], ("multistep", None): ["lr35Fig1a"]}
    frame = pd.DataFrame([{**t.config.to_dict(), "cell": t.cell} for t in trials])
    refs = reference_for_cells(frame)
    assert sorted(refs.values()) == [["clr3SS5kFig1a"], ["lr35Fig1a"]]
    stepsize = {c: frame.loc[frame.cell == c, "stepsize"].iloc[0] for c in refs}
    assert sorted(str(v) for v in stepsize.values()) == ["5000.0", "nan"]


def test_parser_on_a_small_log_with_a_resume(tmp_path):
    text = """I0817 16:02:51.154722 1 caffe.cpp:217] Using GPUs 0, 1
I0817 16:02:51.582952 1 solver.cpp:48] Initializing solver from parameters:
base_lr: 0.35
max_iter: 200
lr_policy: "multistep"
momentum: 0.9
weight_decay: 0.0001
I0817 16:02:51.587083 1 solver.cpp:91] Creating training net from net file: a.prototxt
    source: "examples/cifar10/cifar10_train20k_lmdb"
    batch_size: 50
I0817 16:02:59.1 1 solver.cpp:337] Iteration 0, Testing net (#0)
I0817 16:04:18.5 1 solver.cpp:404]     Test net output #0: accuracy = 0.1
I0817 16:04:22.5 1 solver.cpp:228] Iteration 0, loss = 2.3
I0817 16:04:22.6 1 sgd_solver.cpp:166] Iteration 0, lr = 0.35
I0817 16:06:38.5 1 solver.cpp:337] Iteration 100, Testing net (#0)
I0817 16:07:57.7 1 solver.cpp:404]     Test net output #0: accuracy = 0.3
I0817 16:07:59.0 1 solver.cpp:228] Iteration 100, loss = 1.9
I0817 16:07:59.1 1 sgd_solver.cpp:166] Iteration 100, lr = 0.35
I0817 16:06:38.5 1 solver.cpp:337] Iteration 100, Testing net (#0)
I0817 16:07:57.7 1 solver.cpp:404]     Test net output #0: accuracy = 0.5
I0817 16:07:59.0 1 solver.cpp:317] Iteration 200, loss = 1.2
I0817 16:07:59.0 1 solver.cpp:337] Iteration 200, Testing net (#0)
I0817 16:07:59.1 1 solver.cpp:404]     Test net output #0: accuracy = 0.6
"""
    path = tmp_path / "tiny.log.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    log = caffe_logs.parse_log(path)
    assert [r["iteration"] for r in log.curve] == [0, 100, 200]
    assert [r["test_acc"] for r in log.curve] == [0.1, 0.5, 0.6]        # a repeated iteration: the last wins
    assert log.setup["batch"] == 100 and log.setup["train_size"] == 20000 and log.setup["schedule"] == "multistep"
    assert "lr,test_acc" in caffe_logs.curve_csv(log)


def test_cli_without_logs_exits_2(tmp_path, capsys):
    assert caffe_logs.main(["--logs", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    assert "no Caffe logs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_parser_reads_the_da_logs_lines(tmp_path):
    """The disciplined-approach logs' newer Caffe: the loss line carries a rate, the lr line the momentum, the
    solver repeats cyclical_momentum, and wide32cifar's accuracy layer is 'Accuracy'."""
    text = """I0314 23:38:33.5 1 caffe.cpp:218] Using GPUs 0, 1, 2, 3
I0314 23:38:33.8 1 solver.cpp:44] Initializing solver from parameters:
test_interval: 200
base_lr: 0.08
max_iter: 400
lr_policy: "1cycle"
momentum: 0.95
stepsize: 150
train_state {
  level: 0
}
type: "Nesterov"
max_lr: 0.8
cyclical_momentum: 0.85
cyclical_momentum: 150
I0314 23:38:33.8 1 solver.cpp:87] Creating training net from net file: arch.prototxt
name: "widenet32 with k=4-cifar10"
    mean_file: "examples/cifar10/mean.binaryproto"
    mirror: true
    source: "examples/cifar10/cifar10_train_lmdb"
    batch_size: 128
  type: "BatchNorm"
    moving_average_fraction: 0.9
I0314 23:38:40.5 1 solver.cpp:218] Iteration 0 (-nan iter/s, 1.4s/200 iters), loss = 2.4
I0314 23:38:40.5 1 sgd_solver.cpp:212] Iteration 0, lr = 0.08, momentum = 0.95, weight decay = 0.0001
I0314 23:39:14.8 1 solver.cpp:330] Iteration 200, Testing net (#0)
I0314 23:39:14.8 1 solver.cpp:397]     Test net output #0: Accuracy = 0.5
I0314 23:39:15.0 1 solver.cpp:218] Iteration 200 (5.9 iter/s, 33.5s/200 iters), loss = 1.3
I0314 23:39:15.0 1 sgd_solver.cpp:212] Iteration 200, lr = 0.533333, momentum = 0.883333, weight decay = 0.0001
"""
    path = tmp_path / "wide32cifar_x.log.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    log = caffe_logs.parse_log(path)
    assert log.curve == [{"iteration": 200, "lr": 0.533333, "test_acc": 0.5, "train_loss": 1.3}]
    assert log.trace == [(0, 0.08, 0.95), (200, 0.533333, 0.883333)]
    assert (log.setup["model"], log.setup["schedule"], log.setup["batch"]) == ("wide32", "caffe_1cycle", 512)
    cfg = log.run["config"]
    assert (cfg["model"], cfg["optimizer"], cfg["nesterov"], cfg["min_momentum"], cfg["bn_momentum"]) == \
        ("wide32", "caffe_sgd", True, 0.85, 0.1)
    assert log.run["unmapped"] == {"cyclical_momentum": [0.85, 150]} and log.run["gpus"] == 4
