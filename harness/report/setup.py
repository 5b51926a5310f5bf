"""The report's "paper vs this run" table, the scale's declared deviations, what this run did, and provenance.

    side = paper_side(res, logged)        # (configs of the study's paper scale, where they came from)
    rows = paper_vs_run(side.configs, run_configs(res.trials), logged, side.spec)

The paper column is the study's own `paper` scale (`spec.trials(spec, "paper")`): of the spec the parent run
logged (`study_spec.yaml`) when it holds its scales, else of the study file in studies/ (the logged spec of a
run is resolved to the run's scale, so it has only that scale's trials). The "this run" column is read from
the trials' typed configs (the `harness.trial_config` tag), never parsed from cell names. Every row is a fact
about the configs (distinct values in first-seen order); where a paired cell sets several fields together
(batch size with its own LR and steps), the row lists them per cell.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from harness import names
from harness import spec as specs
from harness.config import TrialConfig

TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "mnist": 60000, "fashion_mnist": 60000, "digits": 1437}
PREPROCESS_WORDS = {"paper": "per-pixel mean subtraction + random mirror (the authors' Caffe data layer)",
                    "standard": "standardize + pad-4 random crop + random mirror", "none": "none"}
TUNING_WORDS = {"best_on_validation": "per seed, the LR scale with the best validation accuracy",
                "each_scale": "each LR scale compared separately", "single": "one LR scale, no tuning"}
DEFAULTS = TrialConfig().to_dict()


@dataclass
class PaperSide:
    configs: list[dict]        # the trial configs of the study's paper scale (empty: none declared)
    source: str                # where they came from, in words
    spec: dict | None          # the spec they were expanded from


def paper_side(study: str, logged: dict | None) -> PaperSide:
    """The paper-scale trials of the study: from the study file the parent run logged (`study_spec.yaml`'s
    `study_file`), else, for runs of older versions, from studies/STUDY.yaml as it is now."""
    candidates = []
    if logged and ((logged.get("study_file") or {}).get("scales") or {}).get("paper") is not None:
        candidates.append((logged["study_file"], "the paper scale of the study file logged with this run"))
    try:
        candidates.append((specs.load_spec(study), f"the paper scale of studies/{study}.yaml (the spec logged with "
                                                     f"this run holds only the scale it ran)"))
    except specs.SpecError:
        pass
    for spec, source in candidates:
        if "paper" not in (spec.get("scales") or {}):
            continue
        try:
            return PaperSide([t.config.to_dict() for t in specs.trials(spec, "paper")], source, spec)
        except specs.SpecError:
            continue
    return PaperSide([], f"no paper scale declared for study {study}", None)


def run_configs(trials: pd.DataFrame) -> list[dict]:
    """The trials' typed configs (TrialConfig, from the `harness.trial_config` tag), as dicts."""
    return [c.to_dict() for c in trials["config"]]


def _v(field: str, v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_v(field, x) for x in v) + "]"
    return "none" if v is None else str(v)


def _distinct(configs: list[dict], fn) -> str:
    vals = list(dict.fromkeys(fn(c) for c in configs))
    return "; ".join(vals) if vals else "n/a"


def _train_images(c: dict) -> int | None:
    n = c.get("train_size") or TRAIN_IMAGES.get(c.get("dataset"))
    if n and c.get("val_size"):
        n -= c["val_size"]
    return n


def _data(c: dict) -> str:
    size = f"{c['train_size']:,} of the training images" if c.get("train_size") else "all training images"
    held = f", {c['val_size']:,} held out for validation" if c.get("val_size") else ""
    inverted = ", inverted (1 - x)" if c.get("invert_images") else ""
    return f"{c['dataset']}, {size}{held}{inverted}"


def _model(c: dict) -> str:
    if c.get("model") == "mlp":
        return f"mlp {'x'.join(map(str, c.get('mlp_hidden') or []))}, {c.get('mlp_activation')}"
    return str(c.get("model"))


def _cell(c: dict) -> str:
    return f"batch {c['batch_size']}, {names.SCHEDULE_WORDS.get(c['schedule'], c['schedule'])}"


def _budget(c: dict) -> str:
    n = _train_images(c)
    epochs = f" ({c['steps'] * c['batch_size'] / n:.1f} epochs)" if n else ""
    return f"{_cell(c)}: {c['steps']:,} steps{epochs}"


def _lrs(c: dict) -> str:
    if c["schedule"] in ("constant", "multistep", "cosine"):
        lr = f"LR {_v('', c['max_lr'])}"
        if c["schedule"] == "multistep" and c.get("milestones"):
            lr += f", x{_v('', c['gamma'])} at steps {', '.join(map(str, c['milestones']))}"
    else:
        lr = f"LR {_v('', c['base_lr'])} to {_v('', c['max_lr'])}"
        if c.get("stepsize"):
            lr += f", stepsize {c['stepsize']}"
    return f"{_cell(c)}: {lr}"


def _momentum(c: dict) -> str:
    cycles = c.get("cycle_momentum") and c["schedule"] in ("triangular", "triangular2", "one_cycle", "one_cycle_cos")
    mom = f"cyclical {_v('', c['max_momentum'])} to {_v('', c['min_momentum'])}" if cycles \
        else f"{_v('', c['momentum'])}"
    return f"{c['optimizer']}, momentum {mom}, weight decay {_v('', c['weight_decay'])}"


def _bn_batch(c: dict, workers: int | None) -> str:
    if c.get("bn_batch"):
        return f"{c['bn_batch']} images"
    if workers:
        return f"the per-worker batch ({c['batch_size'] // workers} = batch {c['batch_size']} / {workers} workers)"
    return "the per-worker batch"


def _seeds(configs: list[dict]) -> str:
    seeds = sorted({c["seed"] for c in configs})
    return f"{len(seeds)} ({', '.join(map(str, seeds))})"


def _tuning(spec: dict | None, configs: list[dict]) -> str:
    scales = sorted({float(c.get("lr_scale", 1.0)) for c in configs})
    rule = ((spec or {}).get("analysis") or {}).get("tuning", "single")
    text = TUNING_WORDS.get(rule, rule)
    return f"{text}; LR scales {', '.join(f'x{s:g}' for s in scales)}" if configs else "n/a"


def paper_vs_run(paper: list[dict], run: list[dict], run_spec: dict | None, paper_spec: dict | None,
                 workers: int | None = None, paper_workers: int | None = None) -> list[list[str]]:
    """Rows [setting, paper, this run]."""
    rows = [
        ("data and training images", lambda cs: _distinct(cs, _data)),
        ("model", lambda cs: _distinct(cs, _model)),
        ("total batch sizes", lambda cs: _distinct(cs, lambda c: str(c["batch_size"]))),
        ("BN statistics over", None),
        ("steps (epochs) per cell", lambda cs: _distinct(cs, _budget)),
        ("learning rates per cell", lambda cs: _distinct(cs, _lrs)),
        ("LR tuning", None),
        ("optimizer", lambda cs: _distinct(cs, _momentum)),
        ("BN momentum (PyTorch convention)", lambda cs: _distinct(cs, lambda c: _v("", c["bn_momentum"]))),
        ("augmentation (preprocess)", lambda cs: _distinct(cs, lambda c: PREPROCESS_WORDS.get(c["preprocess"],
                                                                                              c["preprocess"]))),
        ("target accuracy", lambda cs: _distinct(cs, lambda c: f"{100 * c['target_acc']:g}%")),
        ("seeds", _seeds),
    ]
    out = []
    for label, fn in rows:
        if label == "BN statistics over":
            p = _distinct(paper, lambda c: _bn_batch(c, paper_workers))
            r = _distinct(run, lambda c: _bn_batch(c, workers))
        elif label == "LR tuning":
            p, r = _tuning(paper_spec, paper), _tuning(run_spec, run)
        else:
            p, r = fn(paper), fn(run)
        out.append([label, p if paper else "n/a (no paper scale)", r])
    return out


def deviations(logged: dict | None, study_spec: dict | None, scale: str) -> tuple[list[str], str]:
    """(the scale's declared deviations from the authors' setup, where they were read)."""
    if logged and logged.get("deviations") is not None:
        return list(logged["deviations"]), "declared in the study spec logged with this run"
    body = ((study_spec or {}).get("scales") or {}).get(scale) or {}
    if body.get("deviations"):
        return list(body["deviations"]), "declared in the study file (the logged spec has none)"
    return [], "none declared"


def provenance(parent: dict) -> str:
    """'<commit> (clean working tree)' or '<commit> (dirty working tree: a.py, b.py)'."""
    tags = parent.get("tags", {})
    commit = tags.get(names.GIT_COMMIT, "unknown")
    dirty = tags.get(names.GIT_DIRTY)
    try:
        files = json.loads(tags.get(names.GIT_DIRTY_FILES, "null"))
    except ValueError:
        files = None
    if dirty == "true":
        listed = f": {', '.join(files)}" if files else " (files not recorded)"
        return f"{commit} (dirty working tree{listed})"
    if dirty == "false":
        return f"{commit} (clean working tree)"
    return f"{commit} (working-tree state not recorded)"


def this_run(trials: pd.DataFrame, scale: str, configs: list[dict]) -> str:
    """One sentence: what this run did (scale, trials, cells, seeds, LR scales)."""
    t = trials[trials["scale"] == scale] if "scale" in trials else trials
    seeds = sorted({int(c["seed"]) for c in configs})
    scales = sorted({float(c.get("lr_scale", 1.0)) for c in configs})
    per_cell = t.groupby("cell")["run_id"].count()
    n_text = f"{per_cell.min()}" if len(per_cell) and per_cell.min() == per_cell.max() else \
        f"{per_cell.min()}-{per_cell.max()}" if len(per_cell) else "0"
    return (f"This run: {scale} scale, {len(t)} trials in {t['cell'].nunique()} cells, {n_text} trials per cell "
            f"(seeds {', '.join(map(str, seeds)) or 'n/a'}; LR scales {', '.join(f'x{s:g}' for s in scales)}).")
