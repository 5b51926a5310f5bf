"""A scale's deviations, computed from the configs, never remembered.

    for_scale(spec, "paper")   # each paper-scale trial against the reference run its cell names
    for_scale(spec, "quick")   # each field of the quick scale's trials against the paper scale's

Paper scale: every cell of a study's paper scale names the run it reproduces (`reference: NAME` in its paired
entry, grid or base; harness.references: an author's log, or a setup of claims.md as a typed record). The list is
the field-by-field difference between the trial's config and that reference's config, over the fields the
reference determines, plus the device layout (our workers vs the reference's GPUs, with the BN batch each sees).
Reduced scales: per trial field, the values this scale's trials take against the values the paper scale's take;
only the fields that say how fast, never what is computed (device, memory format, compilation, the warm-up left
out of images/s, the data folder) are left out. Free text in a scale's `deviations` stays for what no field can
say; the dry run and the report print both, the computed lines first.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness import references
from harness import spec as specs
from harness.config import TRAIN_IMAGES, TrialConfig

SPEED_ONLY = ("device", "channels_last", "compile", "warmup_steps", "data_dir")  # how fast, not what is computed
# A reference run trained on its full training set, at its own LRs, with nothing of ours switched on: the fields
# a log cannot print because the authors' code had no such knob, at the value that means "as the authors ran it".
IMPLIED = {"val_size": None, "train_size": None, "lr_scale": 1.0, "clr_stages": [], "zero_grad": True,
           "invert_images": False, "kind": "train", "lr_from_finder": None}


CYCLING = ("triangular", "triangular2", "one_cycle", "one_cycle_cos", "caffe_1cycle")  # LR (and momentum) cycle
NO_BN = ("mlp", "caffe_lenet", "caffe_cifar10_full")   # nets without BatchNorm: bn_batch and bn_momentum do nothing


def inert(config: dict) -> set[str]:
    """The fields that change nothing this config computes (a multistep run's stepsize, a constant momentum's
    cyclical bounds, an MLP's BN momentum): a difference there is no deviation."""
    out = set()
    schedule, optimizer = config["schedule"], config["optimizer"]
    if schedule in ("constant", "multistep", "cosine"):
        out |= {"base_lr", "stepsize"}
    if schedule != "multistep":
        out |= {"milestones", "gamma"}
    if schedule not in ("one_cycle", "one_cycle_cos", "caffe_1cycle"):
        out.add("final_div")
    if schedule not in ("triangular", "triangular2"):
        out.add("clr_stages")
    momentum_free = optimizer in ("adagrad", "adadelta")
    cycles = config["cycle_momentum"] and schedule in CYCLING and not momentum_free
    out |= {"momentum"} if cycles else {"max_momentum", "min_momentum"}
    if schedule not in CYCLING:
        out.add("cycle_momentum")
    if momentum_free:
        out |= {"momentum", "nesterov", "max_momentum", "min_momentum", "cycle_momentum"}
    if config["model"] in NO_BN:
        out |= {"bn_batch", "bn_momentum"}
    if config["model"] != "mlp":
        out |= {f for f in config if f.startswith("mlp_")}
    if config["kind"] != "lr_finder":
        out |= {f for f in config if f.startswith("finder_")}
    if not config.get("lr_from_finder"):
        out |= {"lr_suggestion", "lr_base_div"}
    return out


DEFAULTS = TrialConfig().to_dict()


@dataclass(frozen=True)
class Difference:
    field: str
    ours: object
    theirs: object
    against: str      # the reference's name, or "the paper scale"
    cell: str         # the cell in words ("" for a whole-scale difference)


def reference_config(ref: references.Reference) -> dict:
    """The fields a reference determines, in TrialConfig terms: its own, then IMPLIED for the rest of those where
    it is a run (a log's, or one derived from a log); a claims.md record implies only the hold-out and LR scale."""
    run = ref.log.endswith(".log.gz") or "from" in ref.unmapped
    implied = IMPLIED if run else {k: IMPLIED[k] for k in ("val_size", "lr_scale")}
    return normalized({**implied, **ref.config})


def normalized(config: dict) -> dict:
    """The same run in one spelling: the full training set as no subset, a range test's stepsize as its steps."""
    out = dict(config)
    if out.get("train_size") is not None and out["train_size"] == TRAIN_IMAGES.get(out.get("dataset")):
        out["train_size"] = None
    if out.get("schedule") == "range_test" and out.get("stepsize") is None and "steps" in out:
        out["stepsize"] = out["steps"]
    return out


def against_reference(trial: specs.Trial) -> list[Difference]:
    """The trial's config against its cell's reference, field by field; the device layout as a field `workers`."""
    if not trial.reference:
        return []
    ref = references.load(trial.reference)
    ours, theirs = normalized(trial.config.to_dict()), reference_config(ref)
    skip = inert(ours) & inert({**DEFAULTS, **theirs})
    out = [Difference(f, ours[f], v, ref.name, trial.cell_title)
           for f, v in theirs.items() if f not in skip and not specs.same(ours[f], v)]
    bn = trial.config.bn_batch or trial.config.batch_size // trial.workers
    if trial.workers != ref.gpus:
        out.append(Difference("workers", f"{trial.workers} worker{'s' * (trial.workers > 1)} with BN over {bn} "
                              f"images per micro-batch", f"{ref.gpus} GPUs x {ref.config.get('bn_batch')}",
                              ref.name, trial.cell_title))
    return out


def against_paper(trials: list[specs.Trial], paper: list[specs.Trial]) -> list[Difference]:
    """Per trial field, the values of a reduced scale against the paper scale's, where the two sets differ."""
    out = []
    everywhere_inert = set.intersection(*(inert(t.config.to_dict()) for t in [*trials, *paper]))
    for field in TrialConfig.model_fields:
        if field in SPEED_ONLY or field in everywhere_inert:
            continue
        ours, theirs = _values(trials, field), _values(paper, field)
        if len(ours) != len(theirs) or not all(specs.same(a, b) for a, b in zip(ours, theirs)):
            out.append(Difference(field, ours, theirs, "the paper scale", ""))
    workers = sorted({t.workers for t in trials}), sorted({t.workers for t in paper})
    if workers[0] != workers[1]:
        out.append(Difference("workers", workers[0], workers[1], "the paper scale", ""))
    return out


def _values(trials: list[specs.Trial], field: str) -> list:
    """The distinct values of a field over the trials, sorted where they sort."""
    seen: list = []
    for t in trials:
        v = t.config.to_dict()[field]
        if not any(specs.same(v, s) for s in seen):
            seen.append(v)
    try:
        return sorted(seen, key=lambda v: (v is None, v))
    except TypeError:
        return seen


def _text(v) -> str:
    if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
        return "[" + "; ".join(_text(x) for x in v) + "]"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_text(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return "none" if v is None else str(v)


def lines(differences: list[Difference], all_cells: list[str]) -> list[str]:
    """One sentence per (field, their value): our values there, the references, and the cells it holds for."""
    grouped: dict[tuple, dict[str, list]] = {}
    for d in differences:
        g = grouped.setdefault((d.field, _text(d.theirs)), {"ours": [], "against": [], "cells": []})
        for key, value in (("ours", _text(d.ours)), ("against", d.against), ("cells", d.cell)):
            if value and value not in g[key]:
                g[key].append(value)
    out = []
    for (field, theirs), g in grouped.items():
        cells = g["cells"]
        where = "" if not cells else " (every cell)" if set(cells) >= set(all_cells) and len(all_cells) > 1 else \
            f" ({'; '.join(cells)})" if len(cells) <= 4 else f" ({len(cells)} of {len(all_cells)} cells)"
        out.append(f"{field}: {', '.join(g['ours'])} here, {theirs} in {', '.join(g['against'])}{where}")
    return out


def for_scale(spec: dict, scale: str, workers: int | None = None) -> list[str]:
    """The computed deviation lines of one scale of a study (see the module's docstring); `workers` as the
    command line may override the study file's."""
    built = specs.trials(spec, scale, workers=workers)
    cells = list(dict.fromkeys(t.cell_title for t in built))
    if scale == "paper":
        return lines([d for t in built for d in against_reference(t)], cells)
    if "paper" not in (spec.get("scales") or {}):
        return ["no paper scale declared: nothing to compare this scale with"]
    return lines(against_paper(built, specs.trials(spec, "paper")), cells)
