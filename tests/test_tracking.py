"""MLflow tracking: URI resolution, the store check, and the smoke study against a real `mlflow server`."""

from __future__ import annotations

import json

import pytest

from harness import names
from harness.analysis.results import load_study
from harness.config import TrialConfig
from harness.spec import Trial
from harness.study import tracking


def test_uri_resolution_order_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/store.db")
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path}/rel/store.db"
    assert tracking.resolve_tracking_uri("http://head:5000") == "http://head:5000"  # the CLI wins


def test_store_check_gives_one_line(tmp_path):
    with pytest.raises(tracking.TrackingError) as e:
        tracking.check_writable("http://127.0.0.1:9")
    assert "does not answer" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(tracking.TrackingError, match="no such writable folder"):
        tracking.check_writable(f"sqlite:///{tmp_path}/missing/dir/mlflow.db")
    tracking.check_writable(f"sqlite:///{tmp_path}/mlflow.db")  # creates and answers


def test_trial_run_carries_its_typed_config_and_a_title_in_words(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = {"name": "typed", "question": "q?", "claims": ["SC1"]}
    parent = tracking.start_study_run(uri, spec, "quick", "/tmp/typed-quick", "python -m harness.study typed",
                                      {"CPU": 2.0}, "2x CPU", resume=False)
    exp_id = tracking.experiment_id(uri, "typed")
    client = MlflowClient(uri)
    assert client.get_experiment(exp_id).tags[names.EXPERIMENT_KIND] == "custom_model_development"
    tags = client.get_run(parent).data.tags
    assert tags[names.GIT_DIRTY] in ("true", "false")
    assert (json.loads(tags[names.GIT_DIRTY_FILES]) != []) == (tags[names.GIT_DIRTY] == "true")
    config = TrialConfig(schedule="multistep", max_lr=0.35, milestones=(50, 70), steps=80, bn_batch=None,
                         cycle_momentum=False, batch_size=1000, seed=2)
    trial = Trial("typed", "quick", 2, config, ("batch_size", "schedule", "seed"))
    run_id = tracking.find_or_create_trial_run(uri, exp_id, parent, trial)
    assert tracking.find_or_create_trial_run(uri, exp_id, parent, trial) == run_id      # found again, not twice
    run = client.get_run(run_id)
    assert run.info.run_name == trial.title == "batch 1000, multistep, seed 2"
    assert TrialConfig.from_json(run.data.tags[names.TRIAL_CONFIG]) == config
    logger = tracking.TrialLogger(uri, run_id, trial=trial)
    logger.start(2, {"sys.torch": "x"})       # params are strings: "None", "False", "[50, 70]"
    frame = load_study("typed", uri, curves=False).trials
    row = frame.iloc[0]
    assert frame["cycle_momentum"].dtype == bool and not row["cycle_momentum"]
    assert row["milestones"] == [50, 70] and row["bn_batch"] is None
    assert row["max_lr"] == 0.35 and row["workers"] == 2 and row["config"].schedule == "multistep"
    assert row["cell_title"] == trial.cell_title == "batch 1000, multistep"




def test_outside_a_checkout_the_git_state_comes_from_the_job_env(monkeypatch, tmp_path):
    """A Ray job's working dir has no .git: the commit and dirty files the submitter put in the job's runtime env
    (python -m harness.study --job-env) are recorded instead of 'unknown'."""
    import json

    from harness.study import tracking
    commit, dirty = tracking._git_checkout_state()
    env = tracking.job_env()["env_vars"]
    assert env[tracking.GIT_COMMIT_ENV] == commit != "unknown"
    assert json.loads(env[tracking.GIT_DIRTY_FILES_ENV]) == dirty
    monkeypatch.setattr(tracking, "_git_checkout_state", lambda: ("unknown", []))
    monkeypatch.delenv(tracking.GIT_COMMIT_ENV, raising=False)
    assert tracking.git_state() == ("unknown", [])
    monkeypatch.setenv(tracking.GIT_COMMIT_ENV, "abc123")
    monkeypatch.setenv(tracking.GIT_DIRTY_FILES_ENV, json.dumps(["harness/study/cli.py"]))
    assert tracking.git_state() == ("abc123", ["harness/study/cli.py"])
    with pytest.raises(tracking.TrackingError, match="needs a git checkout"):
        tracking.job_env()
