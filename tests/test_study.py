"""The study runner: YAML schema and errors, grid expansion, resource arithmetic, and real Ray Tune runs
(2-worker gloo TorchTrainers on the session's 2-CPU local Ray): end to end with a divergence, and --dry-run.
Lost workers, errored trials, interrupts and tracking outages: tests/test_resilience.py."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow_checks import check_study_runs

from harness import spec as specs
from harness.study.cli import main, parse_args

REPO = Path(__file__).resolve().parent.parent
TINY = {
    "name": "tiny",
    "question": "Does the pipeline run?",
    "claims": ["SC1"],
    "target_acc": 0.5,
    "resources": {"workers": 2, "gpus_per_worker": 0, "cpus_per_worker": 1},
    "base": {"dataset": "digits", "model": "small_cnn", "preprocess": "paper", "batch_size": 250, "bn_batch": 125,
             "steps": 20, "eval_every": 5, "base_lr": 0.08, "bn_momentum": 0.5, "device": "cpu"},
    "paired": {"schedule": [{"schedule": "one_cycle", "max_lr": 0.8},
                            {"schedule": "constant", "max_lr": 5000.0}]},
}


def write_study(folder: Path, study: dict) -> str:
    path = folder / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return str(path)


def child_runs(uri: str, study: str = "tiny") -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], filter_string="tags.`harness.role` = 'trial'")


def parent_runs(uri: str, study: str = "tiny") -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], filter_string="tags.`harness.role` = 'study'")


# ------------------------------------------------------------------------------------------------- schema
@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.update(resoures={}), "unknown key 'resoures' (did you mean 'resources'?)"),
    (lambda s: s["base"].update(batchsize=3), "unknown key 'batchsize' (did you mean 'batch_size'?)"),
    (lambda s: s["base"].update(max_lr="big"), "max_lr must be a number"),
    (lambda s: s["base"].update(batch_size=300), "multiple of workers x bn_batch = 250"),
    (lambda s: s.update(grid={"seed": 3}), "grid.seed must be a non-empty list"),
    (lambda s: s.update(claims=["SC99"]), "claims must be a list of claim IDs"),
    (lambda s: s["resources"].update(workers=0), "resources.workers must be an integer >= 1"),
    (lambda s: s.update(scales={"huge": {}}), "unknown key 'huge'"),
    (lambda s: s.update(scales={"quick": {"base": {"modle": "mlp"}}}), "did you mean 'model'?"),
    (lambda s: s["paired"]["schedule"].append({"schedule": "one_cycle", "max_lr": 0.8}), "same config"),
])
def test_bad_study_files_exit_2_with_one_line_and_start_nothing(workdir, capsys, mutate, message):
    study = yaml.safe_load(yaml.safe_dump(TINY))
    mutate(study)
    rc = main([write_study(workdir, study)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1
    assert not (workdir / "mlflow.db").exists() and not (workdir / "ray_results").exists()


def test_unknown_study_name_suggests_the_closest(workdir, capsys):
    assert main(["batch_size_efect"]) == 2
    assert "did you mean 'batch_size_effect'" in capsys.readouterr().err


def test_shipped_studies_are_valid_at_every_scale():
    for name, question in specs.list_studies():
        spec = specs.load_spec(name)
        # a paper study names its claims; a practitioner's question (activation_mystery, ...) has none but a plan
        assert question and (spec["claims"] or spec.get("analysis") or spec["base"].get("kind") == "lr_finder")
        for scale in spec.get("scales", {}):
            assert specs.trials(spec, scale)


def test_grid_expansion_pairs_lr_scales_and_names():
    study = {**TINY, "grid": {"seed": [0, 1, 2]}, "lr_scales": [0.5, 1.0]}
    trials = specs.trials(study, "smoke")
    assert len(trials) == 2 * 3 * 2
    assert len({t.name for t in trials}) == len({t.key for t in trials}) == 12
    one_cycle = [t for t in trials if t.config.schedule == "one_cycle"]
    # the tuning budget is the typed field lr_scale; max_lr stays the cell's nominal value, the trainer scales it
    assert sorted({t.config.lr_scale for t in one_cycle}) == [0.5, 1.0]
    assert {t.config.max_lr for t in one_cycle} == {0.8} and {t.config.base_lr for t in one_cycle} == {0.08}
    scaled = next(t.config for t in one_cycle if t.config.lr_scale == 0.5).scaled()
    assert (scaled.max_lr, scaled.base_lr, scaled.lr_scale) == (0.4, 0.04, 1.0)
    assert {t.cell for t in one_cycle} == {"schedule=one_cycle,lr_scale=0.5", "schedule=one_cycle,lr_scale=1.0"}
    assert "one_cycle-x0.5-s2" in {t.name for t in trials}
    assert "one-cycle, LR x0.5, seed 2" in {t.title for t in trials}
    assert specs.trials(study, "smoke")[0].key == trials[0].key  # deterministic


def test_scales_override_base_grid_and_resources():
    study = {**TINY, "scales": {"quick": {"base": {"steps": 40}, "grid": {"seed": [7]},
                                          "resources": {"workers": 1}}}}
    resolved = specs.at_scale(study, "quick")
    assert resolved["resources"] == {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1}
    assert {t.config.steps for t in specs.trials(study, "quick")} == {40}
    with pytest.raises(specs.SpecError, match="has no scale 'paper'"):
        specs.at_scale(study, "paper")


def test_dry_run_prints_trials_and_cost_and_runs_nothing(workdir, capsys):
    rc = main(["batch_size_effect", "--scale", "paper", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "72 trials" in out and "GPU-hours" in out and "bs1024-multistep-x2-s2" in out
    assert not (workdir / "mlflow.db").exists() and not (workdir / "ray_results").exists()


def test_list_shows_studies_and_questions(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "batch_size_effect" in out and "super_convergence" in out and "batch size" in out


# ------------------------------------------------------------------------------------------------- resources
def test_a_trial_that_cannot_fit_the_cluster_is_refused(ray_session, workdir, capsys):
    study = {**TINY, "resources": {"workers": 2, "cpus_per_worker": 2}}
    rc = main([write_study(workdir, study)])
    err = capsys.readouterr().err
    assert rc == 2 and "needs 4 CPUs" in err and "cluster has 2 CPUs" in err
    assert not (workdir / "ray_results").exists()


def test_unreachable_tracking_server_fails_before_any_trial(workdir, capsys):
    rc = main([write_study(workdir, TINY), "--tracking-uri", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not answer" in err and len(err.splitlines()) == 1
    assert not (workdir / "ray_results").exists()


# ------------------------------------------------------------------------------------------------- Ray runs
def test_two_trial_study_end_to_end_with_a_divergence(ray_session, workdir, capsys):
    rc = main([write_study(workdir, TINY)])
    out = capsys.readouterr().out
    assert rc == 0, out
    uri = f"sqlite:///{workdir}/mlflow.db"
    runs = {r.data.tags["harness.cell"]: r for r in child_runs(uri)}
    assert set(runs) == {"schedule=one_cycle", "schedule=constant"}
    ok, bad = runs["schedule=one_cycle"], runs["schedule=constant"]
    assert ok.data.tags["harness.status"] == "completed" and ok.data.metrics["final_acc"] > 0.5
    assert bad.data.tags["harness.status"] == "diverged" and bad.data.metrics["diverged_at_step"] < 20
    assert ok.data.params["workers"] == "2" and ok.data.metrics["world_size"] == 2
    assert "\none-cycle " in out and "\nconstant LR " in out and "diverged" in out  # the summary, cells in words
    check_study_runs(uri, "tiny", n_trials=2)
    # one reporting path (harness.study.driver): in Tune's own results every evaluation, in step order, then the end
    results = sorted((workdir / "ray_results" / "tiny-smoke").glob("*/result.json"))
    assert len(results) == 2
    for path in results:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        assert rows[-1].get("finished") is True and not any(r.get("finished") for r in rows[:-1])
        steps = [r["step"] for r in rows[:-1]]
        assert steps == sorted(steps) and steps[-1] == rows[-1]["step"], (path, steps, rows[-1]["step"])
        assert steps[0] == 5 and all("checkpoint_path" in r for r in rows[:-1])  # rank 0's, with its checkpoint


def test_resume_without_an_earlier_run_is_refused(ray_session, workdir, capsys):
    assert main([write_study(workdir, TINY), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def readme_study_commands() -> list[list[str]]:
    """The argument lists of every `python -m harness.study ...` command in the README's code blocks, also
    those inside a quoted command (`ray exec cluster.yaml "cd ~/harness && python -m harness.study ..."`)."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", readme, flags=re.MULTILINE | re.DOTALL)
    commands = []

    def scan(words: list[str]) -> None:
        for i, word in enumerate(words):
            if " " in word and "harness.study" in word:
                scan(shlex.split(word, comments=True))
            if words[i:i + 3] == ["python", "-m", "harness.study"]:
                rest = words[i + 3:]
                ends = [j for j, w in enumerate(rest) if w in ("&&", ";", "|", "||")]
                commands.append(rest[:ends[0]] if ends else rest)

    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():   # join shell line continuations
            scan(shlex.split(line, comments=True))
    return commands


def test_readme_study_commands_name_real_studies_scales_and_options():
    commands = readme_study_commands()
    assert ["batch_size_effect", "--scale", "smoke"] in commands  # the quick start's main job
    assert len(commands) >= 6
    for argv in commands:
        args = parse_args(argv)  # an unknown option or scale would exit 2 here
        if args.list:
            continue
        spec = specs.load_spec(args.name)
        assert specs.trials(spec, args.scale or "smoke"), argv


@pytest.mark.parametrize("gpus, line", [
    (0, "scale: smoke (no GPU found); pick another with --scale smoke|quick|paper"),
    (8, "scale: paper (8 GPUs found); pick another with --scale smoke|quick|paper"),
])
def test_default_scale_follows_the_hardware(workdir, capsys, monkeypatch, gpus, line):
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)  # this host's GPUs do not decide the test
    rc = main(["batch_size_effect", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and out.splitlines()[0] == line
    if gpus:  # the paper scale's throughput is configured: nothing is measured
        assert "72 trials" in out and "ASSUMED: configured in the study file" in out and "GPU-hours" in out


def test_dry_run_measures_throughput_when_the_study_has_none(workdir, capsys):
    rc = main(["batch_size_effect", "--scale", "smoke", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "4 trials" in out and "measured on this machine" in out and ("CPU-hours" in out or "CPU-minutes" in out)

