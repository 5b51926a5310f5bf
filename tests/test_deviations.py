"""Deviations computed, never remembered: every paper-scale cell names its reference run, and the printed list
says every field where a cell differs from it (harness.deviations); reduced scales against the paper scale."""

from __future__ import annotations

import copy

import pytest

from harness import deviations, references
from harness import spec as specs
from harness.config import TrialConfig
from harness.study.cli import main as study_main
from harness.study.cli import print_deviations

STUDIES = [name for name, _ in specs.list_studies()]


def printed(spec: dict, scale: str, capsys) -> str:
    capsys.readouterr()
    print_deviations(spec, specs.at_scale(spec, scale))
    return capsys.readouterr().out


@pytest.mark.parametrize("study", STUDIES)
def test_every_paper_field_that_differs_from_its_reference_is_printed(study, capsys):
    spec = specs.load_spec(study)
    out = printed(spec, "paper", capsys)
    checked = 0
    for t in specs.trials(spec, "paper"):
        assert t.reference in references.names(), (study, t.name)
        ref = references.load(t.reference)
        theirs = deviations.reference_config(ref)
        ours = deviations.normalized(t.config.to_dict())
        skip = deviations.inert(ours) & deviations.inert({**deviations.DEFAULTS, **theirs})
        for field, value in theirs.items():
            if field in skip or specs.same(ours[field], value):
                continue
            checked += 1
            assert any(line.strip().startswith(f"{field}: ") and ref.name in line for line in out.splitlines()), \
                (study, t.name, field, ours[field], value, out)
        if t.workers != ref.gpus:
            assert any(line.strip().startswith("workers: ") and ref.name in line for line in out.splitlines())
    assert "deviations from each cell's reference run" in out


@pytest.mark.parametrize("study", STUDIES)
def test_a_reduced_scale_prints_every_field_it_changes_from_the_paper_scale(study, capsys):
    spec = specs.load_spec(study)
    paper = specs.trials(spec, "paper")
    for scale in ("smoke", "quick"):
        if scale != "smoke" and scale not in (spec.get("scales") or {}):
            continue
        out = printed(spec, scale, capsys)
        built = specs.trials(spec, scale)
        inert = set.intersection(*(deviations.inert(t.config.to_dict()) for t in [*built, *paper]))
        for field in TrialConfig.model_fields:
            if field in deviations.SPEED_ONLY or field in inert:
                continue
            ours = {repr(t.config.to_dict()[field]) for t in built}
            theirs = {repr(t.config.to_dict()[field]) for t in paper}
            if ours != theirs:
                assert f"  {field}: " in out, (study, scale, field, out)


def test_a_changed_field_appears_and_an_inert_one_does_not(capsys):
    """The check above can fail: change one field of one paper cell and its line appears; change a field that
    the cell's schedule ignores and none does."""
    spec = specs.load_spec("batch_size_effect")
    before = deviations.for_scale(spec, "paper")
    assert not any(line.startswith("weight_decay: ") for line in before)
    changed = copy.deepcopy(spec)
    changed["base"]["weight_decay"] = 5.0e-4
    after = deviations.for_scale(changed, "paper")
    assert any(line.startswith("weight_decay: 0.0005 here, 0.0001 in ") for line in after), after
    inert = copy.deepcopy(spec)
    inert["base"]["min_momentum"] = 0.5   # constant momentum: the cyclical bounds do nothing
    assert deviations.for_scale(inert, "paper") == before


def test_batch_size_effect_paper_is_da2_as_its_author_ran_it(capsys):
    """The issue's 'done when': the DA net, Nesterov, BN batches TBS/4, BN fraction 0.9, no '8 GPUs x 125'."""
    assert study_main(["batch_size_effect", "--dry-run", "--scale", "paper"]) == 0
    out = capsys.readouterr().out
    trials = specs.trials(specs.load_spec("batch_size_effect"), "paper")
    assert {t.config.model for t in trials} == {"gresnet56"}
    assert {(t.config.optimizer, t.config.nesterov) for t in trials} == {("caffe_sgd", True)}
    assert {(t.config.batch_size, t.config.bn_batch) for t in trials} == {(128, 32), (256, 64), (512, 128),
                                                                          (1024, 256)}
    assert {t.config.bn_momentum for t in trials} == {0.1}            # moving_average_fraction 0.9
    assert {t.config.schedule for t in trials} == {"caffe_1cycle", "multistep"}
    assert "8 GPUs x 125" not in out and "deviations from each cell's reference run" in out
    assert "gResnet56_ResTBS512LR.0800.8M.95WD1e-4Epoch95BS128b_1" in out   # the log its TBS 512 cell reproduces
    for line in ("val_size: 5000 here, none in", "lr_scale: 0.5, 2 here, 1 in", "workers: 1 worker with BN over 32"):
        assert line in out, out


def test_a_paper_cell_without_a_reference_is_refused():
    spec = copy.deepcopy(specs.load_spec("total_batch"))
    spec["scales"]["paper"]["references"] = spec["scales"]["paper"]["references"][1:]
    with pytest.raises(specs.SpecError, match="names no reference run"):
        specs.validate_spec(spec, "total_batch.yaml")
    spec["scales"]["paper"]["references"] = [{"where": {}, "run": "clr3SS5kFig1aa"}]
    with pytest.raises(specs.SpecError, match="unknown reference run 'clr3SS5kFig1aa' \\(did you mean 'clr3SS5kFig1a'"):
        specs.validate_spec(spec, "total_batch.yaml")


def test_every_setup_record_is_a_known_base_with_known_fields():
    """The records of setups.yaml: each derived one names a logged run, every field is a trial field, and the
    logged runs alone carry display-line traces."""
    logs = set(references.log_names())
    setups = set(references.names()) - logs
    assert {"DA2-tbs128-1cycle", "SC4-tbs1536", "SC10-adam-clr", "seed-negative-mnist"} <= setups
    for name in setups:
        ref = references.load(name)
        assert ref.trace.empty and set(ref.config) <= set(TrialConfig.model_fields), name
        assert ref.unmapped.get("from", next(iter(logs))) in logs, name
    derived = references.load("DA2-tbs128-step")
    assert derived.config["model"] == "gresnet56" and derived.config["nesterov"] is True   # from the TBS 512 log
    assert derived.config["milestones"] == [9375, 14062, 16405, 17576, 17577]              # x4.sh, Caffe's order
