"""The paper scale before a cluster: `harness.study NAME --preflight` runs each distinct config for K real steps and
the dry-run's cost estimate then reads what it measured; `harness.trial --steps K` runs one config short; every
shipped study's paper configs are built and checked for what would fail later. No Ray, no MLflow server.

The data: CIFAR-10, CIFAR-100 and MNIST written here in their real file formats (tests/dataset_files.py), small
(random pixels), read by the trial's own loader. Cost on the shared 2-core machine (load average 6): about 70 s
outside the slow tier (the clr1 paper preflight 11 s: one spawned process, torch's import, the data, one step of
Caffe's cifar10_full at batch 100; building every shipped study's paper configs ~50 s, ResNet-56/110 included),
and 70 s more in it (a local Ray for the Ray-task path, torchrun's two ranks, the 2-worker smoke preflight).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import spec as specs
from harness.config import TrialConfig
from harness.study import cli, throughput
from harness.trial import checks, data
from harness.trial import cli as trial_cli
from harness.trial.short_run import run_steps

try:
    from tests.dataset_files import write_cifar10, write_cifar100, write_mnist
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from dataset_files import write_cifar10, write_cifar100, write_mnist

REPO = Path(__file__).resolve().parent.parent
PAPER_STUDIES = [name for name, _ in specs.list_studies() if "paper" in (specs.load_spec(name).get("scales") or {})]
ROW = re.compile(r"^(?P<label>\S.*?)\s+(?P<s>[\d.e+-]+)\s+(?P<ips>[\d,]+)\s+(?P<peak>[\d.]+) GiB (peak RSS|CUDA max "
                 r"allocated)\s+(?P<cell>\S+)")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Small CIFAR-10 (2,000 + 400 images), CIFAR-100 (2,000 + 200) and MNIST (2,000 + 100) in their real formats:
    enough training images for every paper batch (up to 1,536)."""
    root = tmp_path_factory.mktemp("datasets")
    write_cifar10(root / "cifar-10-batches-py", per_batch=400)
    write_cifar100(root / "cifar-100-python", n_train=2000, n_test=200)
    write_mnist(root / "MNIST" / "raw", n_train=2000, n_test=100)
    return root


@pytest.fixture
def with_data(data_root, workdir, monkeypatch):
    """The generated sets as the user's HARNESS_DATA_DIR; no download; a throughput store of this test's own."""
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_root))
    monkeypatch.setenv("HARNESS_NO_DOWNLOAD", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(workdir / "xdg"))
    monkeypatch.setattr(data, "DEBIAN_DATA_ROOT", workdir / "no-debian")
    return data_root


def rows(out: str) -> list[re.Match]:
    return [m for line in out.splitlines() if (m := ROW.match(line))]


# ------------------------------------------------------------------------------------------ the paper preflight
def test_paper_preflight_measures_each_distinct_config_and_the_dry_run_estimates_from_it(with_data, capsys):
    """clr1's paper scale (Caffe's cifar10_full on CIFAR-10, batch 100: the cheapest paper config on a CPU) for one
    real step; then its dry-run says 'measured on ... at COMMIT' with that figure instead of ASSUMED."""
    assert cli.main(["clr1", "--scale", "paper", "--preflight", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 distinct configs of 6 trials, 1 optimizer steps each, here, each in a fresh process" in out
    [row] = rows(out)
    assert row["label"] == "caffe_cifar10_full cifar10 batch 100 caffe_sgd fp32"
    seconds, ips, peak = float(row["s"]), float(row["ips"].replace(",", "")), float(row["peak"])
    assert seconds > 0 and ips == pytest.approx(100 / seconds, rel=0.02) and peak > 0.1  # torch + data alone
    assert "(1st step) on CPU (" in out
    [rec] = json.loads(throughput.store_path().read_text())["records"]
    assert (rec["study"], rec["scale"], rec["steps"], rec["device_kind"]) == ("clr1", "paper", 1, "cpu")

    assert cli.main(["clr1", "--scale", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"at {rec['images_per_s']:,.0f} images/s per trial (measured on {rec['device']} at {rec['commit']}" in out
    assert "not on the GPUs the study asks for" in out and "ASSUMED" not in out


def test_without_cifar10_the_preflight_says_where_to_put_it(workdir, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(workdir))  # empty
    monkeypatch.setenv("HARNESS_NO_DOWNLOAD", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(workdir / "xdg"))
    monkeypatch.setattr(data, "DEBIAN_DATA_ROOT", workdir / "no-debian")
    assert cli.main(["batch_size_effect", "--scale", "paper", "--preflight"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dataset 'cifar10' not found" in err and "HARNESS_DATA_DIR" in err
    assert not throughput.store_path().exists()


@pytest.mark.parametrize("argv, says", [
    (["--scale", "paper", "--steps", "2"], "--steps goes with --preflight"),
    (["--scale", "paper", "--preflight", "--steps", "0"], "must be >= 1, got --steps 0"),
    (["--scale", "paper", "--preflight", "--dry-run"], "give one of them"),
])
def test_bad_preflight_options_are_one_line_and_exit_2(argv, says, workdir, capsys):
    assert cli.main(["clr1", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err


def test_more_steps_than_a_trial_has_is_refused_before_anything_runs(with_data, capsys):
    assert cli.main(["batch_size_effect", "--scale", "smoke", "--preflight", "--steps", "31"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--steps 31 is more than trial" in err and "use --steps 1 to 30" in err


@pytest.mark.slow  # two spawned processes, each importing torch: ~25 s on 2 cores
def test_a_multi_worker_trial_is_measured_as_one_rank_and_said_so(with_data, capsys):
    """batch_size_effect's smoke scale has 2 workers per trial: each config runs as one process with the
    per-worker batch, the trial's rate is 2 x that process's, and the output says the all-reduce is left out."""
    assert cli.main(["batch_size_effect", "--scale", "smoke", "--preflight", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "measured as one process with the per-worker batch" in out and "all-reduce is not measured" in out
    found = rows(out)
    assert [r["label"] for r in found] == ["small_cnn digits batch 250 caffe_sgd auto x2 workers",  # BN over each
                                          "small_cnn digits batch 1000 caffe_sgd auto x2 workers"]  # rank's batch
    for r in found:  # the trial's images/s: its global batch over one rank's step time
        batch = int(re.search(r"batch (\d+)", r["label"])[1])
        assert float(r["ips"].replace(",", "")) == pytest.approx(batch / float(r["s"]), rel=0.02)
    stored = json.loads(throughput.store_path().read_text())["records"]
    assert {r["method"] for r in stored} == {"one process, per-worker batch"}


# ------------------------------------------------------------------------------------------ one config, K steps
def test_the_one_trial_command_runs_the_real_config_for_k_steps(with_data, capsys):
    assert trial_cli.main(["clr1", "--scale", "paper", "--cell", "schedule=triangular2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    steps = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [int(s[0]) for s in steps] == [1, 2]
    assert float(steps[0][1]) == pytest.approx(0.001)  # triangular2's base_lr at step 0 (the real schedule)
    assert "the first 2 of 25000 steps" in out
    assert re.search(r"s/step \(mean of steps 2-2\), [\d,]+ images/s, peak RSS [\d.]+ GiB on CPU", out)
    assert trial_cli.main(["clr1", "--scale", "paper", "--cell", "schedule=triangular2", "--steps", "25001"]) == 2
    assert "--steps must be between 1 and the trial's 25000 steps" in capsys.readouterr().err


@pytest.mark.slow  # torchrun and two gloo ranks: ~20 s
def test_under_torchrun_the_k_steps_are_the_real_ddp_steps(with_data, tmp_path):
    """Two gloo ranks step the smoke config together: the same losses as one process stepping the whole batch
    (the trial's trajectory does not depend on its world size), and the rate is the global batch's."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cell = "batch_size=250,schedule=caffe_1cycle"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "harness.trial", "batch_size_effect", "--scale", "smoke", "--cell", cell, "--steps", "3"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.split() for line in done.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [int(s[0]) for s in lines] == [1, 2, 3] and "2 rank(s)" in done.stdout
    alone = run_steps(trial_cli.pick_trial(specs.load_spec("batch_size_effect"), "smoke", cell, None, 1), 3)
    assert [float(s[2]) for s in lines] == pytest.approx(alone.losses, abs=1e-3)  # 4 places; gloo
    # sums the two ranks' gradients in another order than one process does: 3e-4 apart by step 3, measured


# ------------------------------------------------------------------------------------------ configs kept working
@pytest.fixture(scope="module")
def raw_sets(data_root) -> dict[str, data.RawData]:
    return {name: data.load_raw(name, data_dir=data_root, download=False) for name in ("cifar10", "cifar100", "mnist")}


@pytest.mark.parametrize("name", PAPER_STUDIES)
def test_every_paper_config_builds_and_nothing_would_fail_later(name, raw_sets):
    """Each trial of the paper scale passes the checks (BN batch splits the per-worker batch, milestones and
    stepsizes inside the budget, the batch inside the training set); each distinct config builds as the trial
    builds it (generated data, model, optimizer, scheduler, micro-batches) and maps its images to class scores.
    The generated sets are small, so the build leaves out train_size and holds out 100 images where the
    trial holds out val_size (the checks count the real sizes)."""
    spec = specs.load_spec(name)
    workers = specs.at_scale(spec, "paper")["resources"]["workers"]
    trials = specs.trials(spec, "paper", where=name, workers=workers)
    assert {t.name: checks.problems(t.config, workers) for t in trials} == {t.name: [] for t in trials}
    for t in throughput.distinct(trials):
        cfg = t.config.replace(train_size=None, val_size=t.config.val_size and 100)  # a split all the same
        assert checks.built_problems(cfg, workers, raw=raw_sets[cfg.dataset]) == [], t.name


def paper_like(**fields) -> TrialConfig:
    base = {"dataset": "cifar10", "model": "resnet20", "batch_size": 1000, "bn_batch": 125, "steps": 10000}
    return TrialConfig(**{**base, **fields})


@pytest.mark.parametrize("fields, says", [
    ({"schedule": "multistep", "milestones": [5000, 10000]}, "milestones [10000] are not before the last step"),
    ({"schedule": "triangular", "stepsize": 12000}, "lasts 10000 steps, less than its stepsize 12000"),
    ({"schedule": "triangular2", "stepsize": 2000, "clr_stages": [[9000, 0.01, 0.1, 2000]]},
     "stage from step 9000 lasts 1000 steps, less than its stepsize 2000"),
    ({"schedule": "range_test", "stepsize": 5000}, "the LR passes max_lr after step 5000"),
    ({"val_size": 49500}, "batch_size 1000 is larger than the 500 training images"),
    ({"train_size": 48000, "val_size": 5000}, "train_size 48000 is more than the 45,000 training images"),
])
def test_checks_find_what_would_fail_later(fields, says):
    [problem] = checks.problems(paper_like(**fields), workers=1)
    assert says in problem


def test_checks_find_a_bn_batch_that_does_not_split_the_per_worker_batch():
    [problem] = checks.problems(paper_like(batch_size=1000, bn_batch=125), workers=8 * 2)  # 62.5 per worker
    assert "not divisible by 16 workers" in problem
    [problem] = checks.problems(paper_like(batch_size=1000, bn_batch=200), workers=2)  # 500 per worker
    assert "not a multiple of bn_batch 200" in problem
    assert checks.problems(paper_like(schedule="triangular", stepsize=5000), workers=8) == []


def test_a_config_that_cannot_be_built_is_one_line_not_a_traceback(raw_sets):
    cfg = TrialConfig(dataset="cifar10", model="resnet20", batch_size=100, bn_batch=50, steps=10)
    assert checks.built_problems(cfg, 2, raw=raw_sets["cifar10"]) == []
    [problem] = checks.built_problems(cfg.replace(batch_size=4000, bn_batch=None), 1, raw=raw_sets["cifar10"])
    assert problem.startswith("building it failed: ValueError: batch_size 4000 is larger than the training set")


# ------------------------------------------------------------------------------------------ the store
def _trial(study: str, batch: int, steps: int) -> specs.Trial:
    return specs.Trial(study, "paper", 1, paper_like(batch_size=batch, steps=steps, schedule="constant"))


def test_the_estimate_weighs_each_configs_rate_by_its_images_and_prefers_the_studys_device(workdir):
    resolved = {"resources": {"gpus_per_worker": 1}}
    small, large = _trial("s", 250, 4000), _trial("s", 1000, 1000)  # 1M images each
    assert throughput.measured(resolved, [small, large]) is None  # nothing measured yet
    throughput.record(small, 1000.0, "CPU (x, 2 threads)", "cpu", "abc")
    assert throughput.measured(resolved, [small, large]) is None  # one config of two: no figure
    throughput.record(large, 4000.0, "CPU (x, 2 threads)", "cpu", "abc")
    ips, source = throughput.measured(resolved, [small, large])
    assert ips == pytest.approx(2e6 / (1e6 / 1000 + 1e6 / 4000))  # 1,600: the images over the seconds they take
    assert "measured on CPU (x, 2 threads) at abc" in source and "2 of them not on the GPUs" in source
    throughput.record(small, 20000.0, "NVIDIA H100", "cuda", "def")  # a GPU figure wins for a GPU study
    throughput.record(large, 30000.0, "NVIDIA H100", "cuda", "def")
    ips, source = throughput.measured(resolved, [small, large])
    assert ips == pytest.approx(2e6 / (1e6 / 20000 + 1e6 / 30000))
    assert source.startswith("measured on NVIDIA H100 at def") and "not on the" not in source
    throughput.record(small, 25000.0, "NVIDIA H100", "cuda", "ghi")  # a newer figure replaces the older one
    assert len(json.loads(throughput.store_path().read_text())["records"]) == 4
    assert throughput.lookup(throughput.cost_key(small.config, 1), "cuda")["commit"] == "ghi"
    other_study = _trial("another", 250, 10)  # same cost key: the figure serves it too
    assert throughput.measured(resolved, [other_study])[0] == pytest.approx(25000.0)


# ------------------------------------------------------------------------------------------ on a Ray cluster
@pytest.mark.slow
def test_on_a_ray_cluster_each_config_is_a_ray_task_with_one_workers_resources(ray_session, with_data, capsys):
    """With an address, each config runs as a Ray task (one worker's resources, a fresh worker process): the
    figure it stores names the Ray node it ran on. Here a local Ray of 2 CPUs stands in for the cluster."""
    from harness.study import preflight
    spec = specs.load_spec("batch_size_effect")
    resolved = specs.at_scale(spec, "smoke")
    trials = specs.trials(spec, "smoke", where="batch_size_effect", workers=2)
    assert preflight.run(resolved, trials[:1], 1, address="auto") == 0
    out = capsys.readouterr().out
    assert "one at a time as Ray tasks on auto with one worker's resources (1 CPUs)" in out
    [rec] = json.loads(throughput.store_path().read_text())["records"]
    assert rec["ray_node"] == ray_session.get_runtime_context().get_node_id()
    assert f"(Ray node {rec['ray_node'][:8]})" in out
