"""The report's "paper vs this run" table, the scale's declared deviations, what this run did, and provenance.

    side = paper_side(res, logged)        # (configs of the study's paper scale, where they came from)
    rows = paper_vs_run(side.configs, run_configs(res.trials), logged, side.spec)

Columns: setting | this study's paper scale | the paper (claims.md) | this run. The paper-scale column is the
study's own `paper` scale (`spec.trials(spec, "paper")`): of the spec the parent run logged (`study_spec.yaml`)
when it holds its scales, else of the study file in studies/ (the logged spec of a run is resolved to the run's
scale, so it has only that scale's trials). The paper column is what the project keeps of the paper for the
study's claims (`paper_reference`): each claim's setup from the claims table (harness.analysis.claims.CLAIMS)
and the setups read from the authors' logs that document those claims (harness/analysis/reference/index.csv);
a row the paper says nothing about is "-", never the study's own value. The "this run" column is read from
the trials' typed configs (the `harness.trial_config` tag), never parsed from cell names. Every row is a fact
about the configs (distinct values in first-seen order); where a paired cell sets several fields together
(batch size with its own LR and steps), the row lists them per cell.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from harness import deviations as deviations_mod
from harness import names, references
from harness import spec as specs
from harness.config import TrialConfig

TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "mnist": 60000, "fashion_mnist": 60000, "digits": 1437}
PREPROCESS_WORDS = {"paper": "per-pixel mean subtraction + random mirror (the authors' Caffe data layer)",
                    "mean": "mean image subtraction, no mirror (cifar10_full's Caffe data layer)",
                    "pixel_standard": "per-pixel standardization with the training set's mean and std, no augmentation",
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
    cycles = c.get("cycle_momentum") and c["schedule"] in deviations_mod.CYCLING
    mom = f"cyclical {_v('', c['max_momentum'])} to {_v('', c['min_momentum'])}" if cycles \
        else f"{_v('', c['momentum'])}"
    solver = f"{c['optimizer']} (Nesterov)" if c.get("nesterov") else c["optimizer"]
    return f"{solver}, momentum {mom}, weight decay {_v('', c['weight_decay'])}"


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


COLUMNS = ["setting", "this study's paper scale", "the reference runs"]   # + "this run (SCALE scale)"
WIDTHS = [1.35, 3.3, 2.75, 3.3]
PAPER_SOURCE = ("Reference column: the runs the paper scale's cells name (the authors' logs, or the claims table's "
                "setups as typed records; harness.references), in the same words as the other columns; for a study "
                "file that names none, the setups of the authors' logs that document its claims.")


def columns(scale: str) -> list[str]:
    return [*COLUMNS, f"this run ({scale} scale)"]


@dataclass
class PaperReference:
    claims: list[tuple[str, str]]   # (claim id, its setup in the claims table)
    logs: pd.DataFrame              # the index.csv rows of the authors' logs that document these claims


def paper_reference(claim_ids) -> PaperReference:
    """What the project keeps of the paper for these claims: the claims table's setups and the authors' logs."""
    from harness.analysis import caffe_logs
    from harness.analysis.claims import CLAIMS

    ids = [c for c in dict.fromkeys(claim_ids or []) if c in CLAIMS]
    index = caffe_logs.load_index()
    documents = index["claims"].fillna("").map(lambda s: bool(set(s.split(";")) & set(ids)))
    return PaperReference([(c, CLAIMS[c].setup) for c in ids], index[documents].reset_index(drop=True))


def _num(v) -> str:
    return "-" if v is None or pd.isna(v) else f"{float(v):g}"


def _ref_schedule(r) -> str:
    return f"batch {int(r['batch'])}, {names.SCHEDULE_WORDS.get(r['schedule'], r['schedule'])}"


def _ref_distinct(logs: pd.DataFrame, fn) -> str:
    return "; ".join(dict.fromkeys(fn(r) for r in logs.to_dict("records"))) if len(logs) else "-"


def paper_rows(ref: PaperReference) -> dict[str, str]:
    """setting -> what the paper's reference says (the authors' logs' own setups); "-" where it says nothing."""
    logs = ref.logs

    def epochs(r) -> str:
        return f"{_ref_schedule(r)}: {int(r['steps']):,} steps ({r['steps'] * r['batch'] / r['train_size']:.1f} epochs)"

    def lrs(r) -> str:
        if r["base_lr"] == r["max_lr"]:
            return f"{_ref_schedule(r)}: LR {_num(r['max_lr'])}"
        return f"{_ref_schedule(r)}: LR {_num(r['base_lr'])} to {_num(r['max_lr'])}, stepsize {int(r['stepsize'])}"

    return {
        "claims and their setup": "; ".join(f"{c}: {s}" for c, s in ref.claims) or "-",
        "data and training images": _ref_distinct(logs, lambda r: f"{r['dataset']}, {int(r['train_size']):,} training "
                                                                   f"images"),
        "model": _ref_distinct(logs, lambda r: str(r["model"])),
        "total batch sizes": _ref_distinct(logs, lambda r: str(int(r["batch"]))),
        "BN statistics over": _ref_distinct(logs, lambda r: f"the per-GPU batch ({int(r['batch']) // int(r['gpus'])} = "
                                                             f"batch {int(r['batch'])} / {int(r['gpus'])} GPUs)"),
        "steps (epochs) per cell": _ref_distinct(logs, epochs),
        "learning rates per cell": _ref_distinct(logs, lrs),
        "optimizer": _ref_distinct(logs, lambda r: f"{r['optimizer']}, momentum {_num(r['momentum'])}, weight decay "
                                                    f"{_num(r['weight_decay'])}"),
        "seeds": f"one run per setup ({len(logs)} authors' logs)" if len(logs) else "-",
    }


def paper_vs_run(paper: list[dict], run: list[dict], run_spec: dict | None, paper_spec: dict | None,
                 workers: int | None = None, paper_workers: int | None = None) -> list[list[str]]:
    """Rows [setting, this study's paper scale, the paper (claims.md), this run]; the claims are the spec's."""
    ref = paper_rows(paper_reference((run_spec or {}).get("claims") or (paper_spec or {}).get("claims")))
    referenced = reference_configs(paper_spec)
    rows = [
        ("claims and their setup", None),
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
        elif label == "claims and their setup":
            p, r = (", ".join((spec or {}).get("claims") or []) or "-" for spec in (paper_spec, run_spec))
        elif label == "LR tuning":
            p, r = _tuning(paper_spec, paper), _tuning(run_spec, run)
        else:
            p, r = fn(paper), fn(run)
        if referenced and label not in ("claims and their setup", "LR tuning"):  # the cells' own reference runs
            known = [c for c, keys in referenced if REFERENCE_FIELDS.get(label, set()) <= keys]
            them = "-" if len(known) < len(referenced) else \
                _distinct(known, lambda c: _bn_batch(c, None)) if label == "BN statistics over" else \
                fn(known) if fn is not _seeds else f"one run per setup ({len(known)} reference runs)"
        else:
            them = ref.get(label, "-")
        out.append([label, p if paper else "n/a (no paper scale)", them, r])
    return out


# The fields each row of the table reads: a reference run shows a row only where it determines all of them.
REFERENCE_FIELDS = {"data and training images": {"dataset", "train_size", "val_size"}, "model": {"model"},
                    "total batch sizes": {"batch_size"}, "BN statistics over": {"bn_batch"},
                    "steps (epochs) per cell": {"steps", "batch_size", "schedule"},
                    "learning rates per cell": {"schedule", "max_lr"},
                    "optimizer": {"optimizer", "momentum", "weight_decay"}, "BN momentum (PyTorch convention)":
                    {"bn_momentum"}, "augmentation (preprocess)": {"preprocess"}, "target accuracy": {"target_acc"},
                    "seeds": set()}


def reference_configs(paper_spec: dict | None) -> list[tuple[dict, set]]:
    """(config over the defaults, the fields it determines) of each reference run the paper scale's cells name
    (harness.references); [] when the spec names none (a study file older than the references)."""
    try:
        trials = specs.trials(paper_spec, "paper") if paper_spec else []
    except specs.SpecError:
        return []
    out = []
    for name in dict.fromkeys(t.reference for t in trials if t.reference):
        config = deviations_mod.reference_config(references.load(name))
        out.append(({**deviations_mod.DEFAULTS, **config}, set(config)))
    return out


def deviations(logged: dict | None, study_spec: dict | None, scale: str) -> tuple[list[str], str]:
    """(the scale's deviations from the authors' setup, where they were read): computed field by field from the
    study file the run logged (harness.deviations: the paper scale against each cell's reference run, a reduced
    scale against the paper scale), then the scale's declared free text for what no field says."""
    spec = (logged or {}).get("study_file") or study_spec
    declared = (list(logged["deviations"]) if logged and logged.get("deviations") is not None else
                list((((study_spec or {}).get("scales") or {}).get(scale) or {}).get("deviations") or []))
    try:
        computed = deviations_mod.for_scale(spec, scale) if spec else []
        where = ("computed from the study file logged with this run" if (logged or {}).get("study_file")
                 else "computed from the study file")
    except specs.SpecError as e:  # a study file older than the references: say so, keep its declared list
        computed, where = [], f"not computed ({e})"
    if declared:
        where += "; then the scale's declared deviations"
    return [*computed, *(" ".join(d.split()) for d in declared)], where


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
