"""`python -m harness.trial`: one trial of a study without Ray or MLflow, alone and as 2 gloo ranks under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.trial.cli import main, pick_trial
from harness.trial.loop import run_trial

REPO = Path(__file__).resolve().parent.parent
TINY = {
    "name": "tiny_cli",
    "question": "Does one trial run alone?",
    "resources": {"workers": 2, "gpus_per_worker": 0, "cpus_per_worker": 1},
    "base": {"dataset": "digits", "model": "small_cnn", "preprocess": "paper", "batch_size": 250, "bn_batch": 125,
             "steps": 10, "eval_every": 5, "base_lr": 0.08, "bn_momentum": 0.5, "device": "cpu"},
    "paired": {"schedule": [{"schedule": "one_cycle", "max_lr": 0.8}, {"schedule": "constant", "max_lr": 0.1}]},
    "grid": {"seed": [0, 1]},
}


@pytest.fixture
def study(tmp_path) -> str:
    path = tmp_path / "tiny_cli.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False))
    return str(path)


def _curve_lines(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]


def test_one_trial_prints_its_curve_from_the_same_run_trial(study, capsys):
    assert main([study, "--cell", "schedule=one_cycle", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    rows = _curve_lines(out)
    assert [int(r[0]) for r in rows] == [5, 10]
    assert "seed 1" in out and out.strip().splitlines()[-1].startswith("completed: final acc")
    # the study's own trial for that cell and seed, through run_trial directly, gives the same test accuracy
    spec = yaml.safe_load(Path(study).read_text())
    direct = run_trial(pick_trial(spec, "smoke", "schedule=one_cycle", 1, world=1))
    assert float(rows[-1][5]) == pytest.approx(direct["final_acc"], abs=5.1e-5)  # printed to 4 places


def test_a_bad_cell_lists_the_cells_and_exits_2(study, capsys):
    assert main([study, "--cell", "schedule=cosine"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "no cell 'schedule=cosine'" in err and "cells: schedule=one_cycle | schedule=constant" in err
    assert main([study]) == 2  # two cells: --cell is needed
    assert "no --cell given" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_runs_the_trial_as_two_gloo_ranks(study, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "harness.trial", study, "--cell", "schedule=one_cycle"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "2 rank(s)" in out and out.count("completed: final acc") == 1  # rank 0 prints, once
    rows = _curve_lines(out)
    assert [int(r[0]) for r in rows] == [5, 10]
    # 2 ranks x 1 micro-batch of 125 is the 1-process trial's 2 micro-batches of 125: the same curve
    alone = run_trial(pick_trial(yaml.safe_load(Path(study).read_text()), "smoke", "schedule=one_cycle", None, 1))
    assert float(rows[-1][5]) == pytest.approx(alone["final_acc"], abs=0.01)
