"""A trial's max LR taken from an LR finder study recorded in MLflow (`lr_from_finder: STUDY`).

    trials = with_finder_lrs(trials, uri, scale)   # the study runner, once the tracking store answers

For every trial whose config names a finder study, the finder runs of that study's latest finished invocation
at the same scale are looked up; those of the trial's cell are the ones that agree with the trial on every
field that varies among the finder runs (except seed and the sweep's own fields). The median over them (their
seeds) of the `lr_suggestion` metric (lr_steepest, lr_valley or lr_smith) becomes the trial's max_lr, and
max_lr / lr_base_div its base_lr. The trial's declared max_lr/base_lr are placeholders; its name and key stay.
A finder study that has not run, or has no run of the trial's cell, is one line (FinderLookupError) and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import statistics

from harness.config import TrialConfig
from harness.spec import Trial
from harness.study import tracking

SUGGESTION_METRIC = {"steepest": "lr_steepest", "valley": "lr_valley", "smith": "lr_smith"}  # harness.trial.finder's
SWEEP_FIELDS = {"seed", "base_lr", "max_lr", "steps", "kind", "finder_mode", "finder_smoothing",
                "finder_stop_factor", "finder_val", "eval_every", "target_acc"}


class FinderLookupError(tracking.TrackingError):
    """No finder run to take an LR from. The message is one line."""


def with_finder_lrs(trials: list[Trial], uri: str, scale: str) -> list[Trial]:
    """The trials with their LRs from finder runs (trials without lr_from_finder unchanged); a resolved trial
    keeps the study file's config as `declared`, so its name and key stay."""
    cache: dict[str, list[tuple[TrialConfig, dict]]] = {}
    out = []
    for t in trials:
        study = t.config.lr_from_finder
        if not study:
            out.append(t)
            continue
        if study not in cache:
            cache[study] = finder_runs(uri, study, scale)
        lr = suggested_lr(cache[study], t.config, study, scale)
        config = t.config.replace(max_lr=lr, base_lr=lr / t.config.lr_base_div)
        out.append(dataclasses.replace(t, config=config, declared=t.declared or t.config))
    return out


def finder_runs(uri: str, study: str, scale: str) -> list[tuple[TrialConfig, dict]]:
    """(typed config, metrics) of the completed lr_finder runs of the study's latest finished invocation at
    `scale`."""
    hint = f"run `python -m harness.study {study} --scale {scale}` first"
    try:
        parent = tracking.latest_study_run(uri, study, scale=scale, finished=True)
    except tracking.TrackingError as e:
        raise FinderLookupError(f"lr_from_finder: {e}; {hint}") from None
    runs = tracking.trial_runs(uri, parent, status="completed")
    out = []
    for run in runs:
        config = tracking.run_config(run)
        if config is not None and config.kind == "lr_finder":
            out.append((config, dict(run.data.metrics)))
    return out


def suggested_lr(runs: list[tuple[TrialConfig, dict]], config: TrialConfig, study: str, scale: str) -> float:
    metric = SUGGESTION_METRIC[config.lr_suggestion]
    finder = [c.to_dict() for c, _ in runs]
    mine = config.to_dict()
    varying = sorted({k for c in finder for k in c
                      if k not in SWEEP_FIELDS and len({json.dumps(f.get(k)) for f in finder}) > 1})
    cell = {k: mine[k] for k in varying}
    values = [m[metric] for c, (_, m) in zip(finder, runs) if all(c.get(k) == v for k, v in cell.items())
              and metric in m]
    if not values:
        where = ", ".join(f"{k}={v}" for k, v in cell.items()) or "any cell"
        raise FinderLookupError(f"lr_from_finder: study '{study}' (scale {scale}) has no completed finder run "
                                f"with {where} and metric {metric}; run the finder study with that cell")
    return float(statistics.median(values))
