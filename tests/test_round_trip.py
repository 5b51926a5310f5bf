"""The typed round trip: every shipped study's trials at every scale, written to a real MLflow store by the
harness's own writers (tracking.start_study_run, TrialLogger), loaded back by the report's reader
(analysis.results.load_study), give configs equal to the ones the spec expanded, field for field (None stays
None, ints stay ints), and the same words in MLflow (the run name) and in the report (title and cell title)."""

from __future__ import annotations

import numbers

import numpy as np
import pytest

from harness import spec as specs
from harness.analysis.results import load_study
from harness.config import FIELDS
from harness.study import tracking

SYSTEM = {"sys.torch": "2", "sys.cuda": "none", "sys.gpu_model": "none", "sys.gpu_count": "0",
          "sys.hostnames": "h", "sys.python": "3.11"}


def kind(v) -> str:
    """A value's kind as a config holds it; numpy's scalars (a pandas column of ints) count as their Python kind."""
    if v is None or isinstance(v, (bool, np.bool_)):
        return "none" if v is None else "bool"
    if isinstance(v, numbers.Integral):
        return "int"
    return "float" if isinstance(v, numbers.Real) else type(v).__name__


def shipped() -> list:
    """(study, scale) of every shipped study and scale; the larger grids (hundreds of trials written to sqlite,
    ~70 s in all) belong to the full suite, smoke to the fast tier too."""
    out = []
    for name, _ in specs.list_studies():
        spec = specs.load_spec(name)
        out += [pytest.param(name, s, marks=() if s == "smoke" else pytest.mark.slow)
                for s in specs.SCALES if s == "smoke" or s in (spec.get("scales") or {})]
    return out


def write(uri: str, trials: list[specs.Trial], resolved: dict) -> str:
    """A study run as harness.study writes it: the parent, then each trial's run through a TrialLogger."""
    parent = tracking.start_study_run(uri, resolved, resolved["scale"], f"/rt/{resolved['name']}",
                                      "python -m harness.study", {"CPU": 2.0}, "test", resume=False)
    exp = tracking.experiment_id(uri, resolved["name"])
    for t in trials:
        logger = tracking.TrialLogger(uri, experiment_id=exp, parent_run_id=parent, trial=t, grace_s=5)
        logger.start(t.workers, SYSTEM)
        record = {"step": 1, "epoch": 0.1, "lr": 0.1, "momentum": 0.9, "train_loss": 2.0, "test_loss": 2.0,
                  "test_acc": 0.5, "images_per_s": 10.0, "train_seconds": 1.0}
        logger.log_eval(record)
        assert logger.finish({"status": "completed", "final_acc": 0.5, "steps_run": 1, "steps_to_target": None},
                             [record])
    return parent


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('rt')}/mlflow.db"


@pytest.mark.parametrize("study, scale", shipped())
def test_every_shipped_trial_comes_back_typed_with_the_same_words(uri, study, scale):
    spec = specs.load_spec(study)
    trials = specs.trials(spec, scale, where=study)
    parent = write(uri, trials, specs.at_scale(spec, scale))
    res = load_study(study, uri, run=parent, curves=False)
    assert len(res.trials) == len(trials)
    rows = {r["trial_key"]: r for _, r in res.trials.iterrows()}
    for t in trials:
        row = rows[t.key]
        assert row["config"] == t.config                       # the TrialConfig itself
        expected = t.config.to_dict()
        for f in FIELDS:                                        # each design column, as the config held it
            got = row[f]
            assert got == expected[f] or (got is None and expected[f] is None), (t.name, f, got, expected[f])
            assert kind(got) == kind(expected[f]), (t.name, f, type(got), type(expected[f]))
        assert row["run_name"] == t.title                       # MLflow's run name
        assert row["cell_title"] == t.cell_title                # the report's words for the cell
        assert row["cell"] == t.cell


def test_a_null_design_value_matches_a_plan_that_says_null(uri):
    """What review found: a plan's `null` never matched real runs (None came back as NaN). Through the store,
    super_convergence's SC1 arms with stepsize null find their trials at every scale it has."""
    from harness.analysis import claims
    spec = specs.load_spec("super_convergence")
    for scale in [s for s in specs.SCALES if s == "smoke" or s in spec["scales"]]:
        trials = specs.trials(spec, scale)
        if not any(t.config.stepsize is None for t in trials):
            continue
        parent = write(uri, trials, specs.at_scale(spec, scale))
        res = load_study("super_convergence", uri, run=parent, curves=False)
        assert res.trials["stepsize"].map(lambda v: v is None).any()
        matched = claims._match(res.trials, {"stepsize": (None,)})
        assert len(matched) == sum(t.config.stepsize is None for t in trials)
