"""A trial's max LR taken from an LR finder study recorded in MLflow (`lr_from_finder: STUDY`).

    trials = resolve(trials, uri, scale)   # the study runner, once the tracking store answers

For every trial whose config names a finder study, the finder runs of that study's latest finished invocation
at the same scale are looked up; those of the trial's cell are the ones that agree with the trial on every
field that varies among the finder runs (except seed and the sweep's own fields). The median over them (their
seeds) of the `lr_suggestion` metric (lr_steepest, lr_valley or lr_smith) becomes the trial's max_lr, and
max_lr / lr_base_div its base_lr. The trial's declared max_lr/base_lr are placeholders; its name and key stay.
A finder study that has not run, or has no run of the trial's cell, is one line (FinderLookupError) and exit 2.
"""

from __future__ import annotations

import dataclasses
import statistics

from harness import tracking

SUGGESTION_METRIC = {"steepest": "lr_steepest", "valley": "lr_valley", "smith": "lr_smith"}  # harness.lr_finder's
SWEEP_FIELDS = {"seed", "base_lr", "max_lr", "steps", "kind", "finder_mode", "finder_smoothing",
                "finder_stop_factor", "finder_val", "eval_every", "target_acc"}


class FinderLookupError(tracking.TrackingError):
    """No finder run to take an LR from. The message is one line."""


def resolve(trials: list, uri: str, scale: str) -> list:
    """The trials with their LRs from finder runs (trials without lr_from_finder unchanged)."""
    cache: dict[str, list[tuple[dict, dict]]] = {}
    out = []
    for t in trials:
        study = t.config.get("lr_from_finder")
        if not study:
            out.append(t)
            continue
        if study not in cache:
            cache[study] = finder_runs(uri, study, scale)
        lr = suggested_lr(cache[study], t.config, study, scale)
        config = {**t.config, "max_lr": lr, "base_lr": lr / t.config["lr_base_div"]}
        out.append(dataclasses.replace(t, config=config))
    return out


def finder_runs(uri: str, study: str, scale: str) -> list[tuple[dict, dict]]:
    """(params, metrics) of the completed lr_finder runs of the study's latest finished invocation at `scale`."""
    client = tracking._client(uri)
    exp = client.get_experiment_by_name(study)
    hint = f"run `python -m harness.study {study} --scale {scale}` first"
    if exp is None:
        raise FinderLookupError(f"lr_from_finder: no study '{study}' in the MLflow store {uri}; {hint}")
    parents = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`harness.role` = 'study' and tags.`harness.scale` = '{scale}' and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise FinderLookupError(f"lr_from_finder: study '{study}' has no finished run at scale {scale}; {hint}")
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}' and tags.`harness.role` = 'trial' and "
        "params.kind = 'lr_finder' and tags.`harness.status` = 'completed'"), max_results=10000)
    return [(r.data.params, r.data.metrics) for r in runs]


def suggested_lr(runs: list[tuple[dict, dict]], config: dict, study: str, scale: str) -> float:
    metric = SUGGESTION_METRIC[config["lr_suggestion"]]
    varying = sorted({k for params, _ in runs for k in params
                      if k not in SWEEP_FIELDS and len({p.get(k) for p, _ in runs}) > 1})
    cell = {k: tracking._param_str(config[k]) for k in varying if k in config}
    values = [m[metric] for p, m in runs if all(p.get(k) == v for k, v in cell.items()) and metric in m]
    if not values:
        where = ", ".join(f"{k}={v}" for k, v in cell.items()) or "any cell"
        raise FinderLookupError(f"lr_from_finder: study '{study}' (scale {scale}) has no completed finder run "
                                f"with {where} and metric {metric}; run the finder study with that cell")
    return float(statistics.median(values))
