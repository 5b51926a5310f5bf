"""Study files: `studies/NAME.yaml` -> a validated spec -> the list of trials of one scale.

A study file holds: `name`, `question`, `claims` (IDs from the paper's claims table), `target_acc`,
`resources` (workers per trial, GPUs and CPUs per worker), `base` (a trial config), `grid` (trial field ->
list of values; the cross product), `paired` (axis name -> list of field dicts that vary together, e.g. a
batch size with its own max LR and step budget) and `scales` (smoke / quick / paper: overrides of `base`,
`grid`, `paired`, `lr_scales`, `resources`, `target_acc`, plus `images_per_s` for the dry-run cost estimate).
`lr_scales` gives every cell the same max-LR tuning budget: each cell runs its own LR curve (base_lr and
max_lr) multiplied by each factor; the factor is the typed trial field `lr_scale` (the trainer applies it;
`max_lr` stays the cell's nominal value). `analysis` is the study's analysis plan (see harness/plan.py), and
`scales.<scale>.deviations` lists, in words, how that scale deviates from the authors' setup.

Everything is checked before anything starts; any problem is a `SpecError` with one line.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness import REPO_ROOT, names, plan
from harness.config import FIELDS, ConfigError, TrialConfig, coerce

STUDIES_DIR = REPO_ROOT / "studies"
SCALES = ("smoke", "quick", "paper")
TOP_KEYS = ("name", "question", "claims", "target_acc", "resources", "base", "grid", "paired", "lr_scales", "analysis",
            "scales")
SCALE_KEYS = ("base", "grid", "paired", "lr_scales", "resources", "target_acc", "images_per_s", "deviations")
RESOURCE_KEYS = ("workers", "gpus_per_worker", "cpus_per_worker", "placement")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement strategies for a trial's ranks
SHORT = {"batch_size": "bs", "max_lr": "lr", "seed": "s", "weight_decay": "wd", "momentum": "mom",
         "train_size": "n", "bn_batch": "bn", "steps": "it", "stepsize": "ss", "base_lr": "blr", "lr_scale": "x"}
IDENTITY = ("dataset", "model", "optimizer", "batch_size", "schedule", "train_size", "weight_decay", "momentum",
            "cycle_momentum", "stepsize", "steps", "max_lr", "lr_scale", "seed")
KNOWN_CLAIMS = ("SC1", "SC2", "SC3", "SC4", "SC5", "SC6", "SC7", "SC8", "SC9", "SC10",
                "DA1", "DA2", "DA3", "DA4", "CLR1")


class SpecError(ValueError):
    """A study file that cannot run. One line: where, what was wrong, what is allowed."""


@dataclass(frozen=True)
class Trial:
    """One trial of a study: its typed config, and everything else derived from it here, once.

    `naming` lists the fields that tell the study's trials apart (seed included when it varies), in the order
    that names them; the name, key, cell and titles below are computed from the config and those fields only."""
    study: str
    scale: str
    workers: int
    config: TrialConfig                  # what the trial runs
    naming: tuple[str, ...] = ()
    declared: TrialConfig | None = None  # the study file's config where the runner resolved part of it (a max LR
                                         # from a finder study): the name and key follow it, so they stay put

    @property
    def cell_fields(self) -> tuple[str, ...]:
        """The fields that name the trial's cell: trials of one cell differ only by seed."""
        return tuple(f for f in self.naming if f != "seed")

    @property
    def name(self) -> str:
        """Stable, filesystem-safe, unique in the study: the Tune trial name."""
        return _name((self.declared or self.config).to_dict(), list(self.naming))

    @property
    def key(self) -> str:
        """Deterministic hash of study, scale, world size and config: finds the MLflow run again."""
        ident = [self.study, self.scale, self.workers, (self.declared or self.config).to_dict()]
        return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def cell(self) -> str:
        """The cell as `field=value,...`: an identifier (the one-trial command's --cell, a grouping key)."""
        config = (self.declared or self.config).to_dict()
        return ",".join(f"{k}={config[k]}" for k in self.cell_fields) or "all"

    @property
    def title(self) -> str:
        """The trial in words: its MLflow run name and its label in the report ("batch 1000, one-cycle, seed 0")."""
        return names.title(self.config, self.naming, empty="the only trial")

    @property
    def cell_title(self) -> str:
        """The cell in words, seed aside ("batch 1000, one-cycle")."""
        return names.title(self.config, self.cell_fields)

    def to_tune(self) -> dict:
        """What Tune's param_space carries: the config as its canonical JSON, plus the name and title that Tune's
        trial folders and progress table show."""
        return {"study": self.study, "scale": self.scale, "workers": self.workers, "naming": list(self.naming),
                "config": self.config.to_json(), "declared": self.declared and self.declared.to_json(),
                "name": self.name, "title": self.title}

    @classmethod
    def from_tune(cls, d: dict) -> Trial:
        declared = TrialConfig.from_json(d["declared"]) if d.get("declared") else None
        return cls(d["study"], d["scale"], int(d["workers"]), TrialConfig.from_json(d["config"]),
                   tuple(d["naming"]), declared)


def study_path(name: str) -> Path:
    return STUDIES_DIR / f"{name}.yaml"


def list_studies() -> list[tuple[str, str]]:
    out = []
    for path in sorted(STUDIES_DIR.glob("*.yaml")):
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        out.append((path.stem, " ".join(str(raw.get("question", "")).split())))
    return out


def load_spec(name_or_path: str) -> dict:
    """Read and validate a study file (name in studies/ or a path). Returns the raw spec dict."""
    path = Path(name_or_path)
    if not path.suffix:
        path = study_path(name_or_path)
    if not path.is_file():
        known = [n for n, _ in list_studies()]
        hint = difflib.get_close_matches(str(name_or_path), known, n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise SpecError(f"no study '{name_or_path}'{did}; studies: {', '.join(known) or 'none'} "
                        f"(files in {STUDIES_DIR})")
    try:
        with open(path) as f:
            spec = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise SpecError(_yaml_error(path, e)) from None
    validate_spec(spec, path.name)
    return spec


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """One line: where the parser stopped (1-based line and column), what it found, and what it was inside."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path.name} line {mark.line + 1}, column {mark.column + 1}" if mark else path.name
    problem = getattr(e, "problem", None) or str(e)
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    inside = f" ({context} from line {start.line + 1}, column {start.column + 1})" if context and start else ""
    return (f"{where}: not valid YAML: {' '.join(problem.split())}{inside}; a study file is a YAML mapping "
            f"like {study_path('batch_size_effect')}")


def validate_spec(spec: Any, where: str) -> None:
    if not isinstance(spec, dict):
        raise SpecError(f"{where}: a study file is a mapping with keys {', '.join(TOP_KEYS)}")
    _keys(spec, TOP_KEYS, where)
    for required in ("name", "question", "base"):
        if required not in spec:
            raise SpecError(f"{where}: missing required key '{required}'")
    if not isinstance(spec["name"], str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", spec["name"]):
        raise SpecError(f"{where}: name must be letters, digits, '_' or '-', got {spec['name']!r}")
    claims = spec.get("claims", [])
    if not isinstance(claims, list) or any(c not in KNOWN_CLAIMS for c in claims):
        raise SpecError(f"{where}: claims must be a list of claim IDs from {', '.join(KNOWN_CLAIMS)}, got {claims!r}")
    _section(spec, where)
    scales = spec.get("scales", {})
    if not isinstance(scales, dict):
        raise SpecError(f"{where}: scales must map {', '.join(SCALES)} to overrides")
    _keys(scales, SCALES, f"{where}: scales")
    for scale in scales:
        body = scales[scale] or {}
        if not isinstance(body, dict):
            raise SpecError(f"{where}: scales.{scale} must be a mapping of {', '.join(SCALE_KEYS)}")
        _keys(body, SCALE_KEYS, f"{where}: scales.{scale}")
        _section(body, f"{where}: scales.{scale}")
        if "images_per_s" in body and not _is_number(body["images_per_s"], positive=True):
            raise SpecError(f"{where}: scales.{scale}.images_per_s must be a positive number")
        devs = body.get("deviations", [])
        if not isinstance(devs, list) or not all(isinstance(d, str) for d in devs):
            raise SpecError(f"{where}: scales.{scale}.deviations must be a list of sentences")
    if "analysis" in spec:
        try:
            plan.validate(spec["analysis"], where, FIELDS, KNOWN_CLAIMS)
        except plan.PlanError as e:
            raise SpecError(str(e)) from None
    for scale in SCALES:
        if scale in scales or scale == "smoke":
            built = trials(spec, scale, where=where)  # expands and validates every trial config
            if "analysis" in spec:
                try:
                    plan.expand(spec["analysis"], [t.config.to_dict() for t in built], where=f"{where}: scale {scale}")
                except plan.PlanError as e:
                    raise SpecError(str(e)) from None


def _section(body: dict, where: str) -> None:
    for part in ("base", "grid"):
        if "lr_scale" in (body.get(part) or {}):
            raise SpecError(f"{where}: {part}.lr_scale: set the LR tuning budget with lr_scales: [factors]")
    for key in ("base",):
        if key in body:
            if not isinstance(body[key], dict):
                raise SpecError(f"{where}: {key} must be a mapping of trial fields")
            _keys(body[key], FIELDS, f"{where}: {key}")
            _types(body[key], f"{where}: {key}")
    if "grid" in body:
        grid = body["grid"]
        if not isinstance(grid, dict):
            raise SpecError(f"{where}: grid must map trial fields to lists of values")
        _keys(grid, FIELDS, f"{where}: grid")
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise SpecError(f"{where}: grid.{k} must be a non-empty list of values, got {v!r}")
            for value in v:
                _types({k: value}, f"{where}: grid")
    if "paired" in body:
        paired = body["paired"]
        if not isinstance(paired, dict):
            raise SpecError(f"{where}: paired must map axis names to lists of field mappings")
        for axis, options in paired.items():
            if not isinstance(options, list) or not options or not all(isinstance(o, dict) for o in options):
                raise SpecError(f"{where}: paired.{axis} must be a non-empty list of mappings of trial fields")
            for o in options:
                _keys(o, FIELDS, f"{where}: paired.{axis}")
                _types(o, f"{where}: paired.{axis}")
    if "resources" in body:
        res = body["resources"]
        if not isinstance(res, dict):
            raise SpecError(f"{where}: resources must be a mapping of {', '.join(RESOURCE_KEYS)}")
        _keys(res, RESOURCE_KEYS, f"{where}: resources")
        if "workers" in res and (not isinstance(res["workers"], int) or isinstance(res["workers"], bool)
                                 or res["workers"] < 1):
            raise SpecError(f"{where}: resources.workers must be an integer >= 1, got {res['workers']!r}")
        if "placement" in res and res["placement"] not in PLACEMENTS:
            raise SpecError(f"{where}: resources.placement '{res['placement']}' is not known; "
                            f"allowed: {', '.join(PLACEMENTS)}")
        for k in ("gpus_per_worker", "cpus_per_worker"):
            if k in res and not _is_number(res[k], positive=(k == "cpus_per_worker")):
                raise SpecError(f"{where}: resources.{k} must be a number >= 0, got {res[k]!r}")
    if "lr_scales" in body and (not isinstance(body["lr_scales"], list) or not body["lr_scales"]
                                or not all(_is_number(v, positive=True) for v in body["lr_scales"])):
        raise SpecError(f"{where}: lr_scales must be a non-empty list of positive factors, got {body['lr_scales']!r}")
    if "target_acc" in body and not (_is_number(body["target_acc"], positive=True) and body["target_acc"] <= 1):
        raise SpecError(f"{where}: target_acc is a fraction in (0, 1], got {body['target_acc']!r}")


def resolve(spec: dict, scale: str) -> dict:
    """The spec with one scale's overrides applied: base merged, grid/paired axes replaced."""
    if scale not in SCALES:
        raise SpecError(f"unknown scale '{scale}'; allowed: {', '.join(SCALES)}")
    over = (spec.get("scales") or {}).get(scale)
    if over is None and scale != "smoke":
        raise SpecError(f"study '{spec['name']}' has no scale '{scale}'; it has: "
                        f"{', '.join(spec.get('scales') or {}) or 'none'}")
    over = over or {}
    out = {k: copy.deepcopy(v) for k, v in spec.items() if k != "scales"}
    out["scale"] = scale
    out["base"] = {**spec.get("base", {}), **over.get("base", {})}
    out["grid"] = {**spec.get("grid", {}), **over.get("grid", {})}
    out["paired"] = {**spec.get("paired", {}), **over.get("paired", {})}
    out["resources"] = {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1,
                        **spec.get("resources", {}), **over.get("resources", {})}
    out["target_acc"] = over.get("target_acc", spec.get("target_acc", out["base"].get("target_acc", 0.9)))
    out["lr_scales"] = over.get("lr_scales", spec.get("lr_scales", [1.0]))
    out["images_per_s"] = over.get("images_per_s")
    out["deviations"] = list(over.get("deviations", []))
    return out


def trials(spec: dict, scale: str, where: str = "study", workers: int | None = None) -> list[Trial]:
    """Expand one scale of a study into its trials, each config validated for the trial's world size."""
    r = resolve(spec, scale)
    world = workers or r["resources"]["workers"]
    axes: list[list[dict]] = [opts for opts in r["paired"].values()]
    axes += [[{field: v} for v in values] for field, values in r["grid"].items()]
    axes.append([{"lr_scale": float(x)} for x in r["lr_scales"]])  # the max-LR tuning budget: a typed field
    varying = _varying_fields(axes)
    built = []
    for combo in itertools.product(*axes):
        fields = {**r["base"], "target_acc": r["target_acc"]}
        for part in combo:
            fields.update(part)
        try:
            cfg = TrialConfig.from_dict(fields)
            cfg.validate(world_size=world)
        except ConfigError as e:
            label = ",".join(f"{k}={fields.get(k)}" for k in varying) or "base"
            raise SpecError(f"{where}: scale {scale}, trial {label}: {e}") from None
        built.append(cfg)
    # Name and cell by the fewest varying fields that tell trials apart, in IDENTITY order, then the rest.
    ident = [k for k in IDENTITY if k in varying] + [k for k in varying if k not in IDENTITY]
    def distinct(fields: list[str]) -> int:
        return len({_name(c.to_dict(), fields) for c in built})
    used: list[str] = []
    for k in ident:
        if distinct(used) == len(built):
            break
        if distinct(used + [k]) > distinct(used):
            used.append(k)
    if distinct(used) < len(built):
        raise SpecError(f"{where}: scale {scale}: two trials have the same config (duplicate grid values)")
    return [Trial(spec["name"], scale, world, cfg, tuple(used)) for cfg in built]


def _varying_fields(axes: list[list[dict]]) -> list[str]:
    fields: list[str] = []
    for options in axes:
        for o in options:
            for k in o:
                if k not in fields and len({json.dumps(opt.get(k)) for opt in options}) > 1:
                    fields.append(k)
    return fields


def _text(v) -> str:
    return "x".join(map(str, v)) if isinstance(v, list) else (f"{v:g}" if isinstance(v, float) else str(v))


def _name(config: dict, varying: list[str]) -> str:
    parts = []
    for k in varying:
        text = _text(config[k])
        parts.append(text if k in ("schedule", "model", "dataset", "optimizer") else f"{SHORT.get(k, k)}{text}")
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", "-".join(parts)) or "trial"


def _keys(d: dict, allowed, where: str) -> None:
    for k in d:
        if k not in allowed:
            hint = difflib.get_close_matches(str(k), list(allowed), n=1)
            did = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise SpecError(f"{where}: unknown key '{k}'{did}; allowed: {', '.join(allowed)}")


def _types(fields: dict, where: str) -> None:
    """Type-check each field on its own, so a value that every trial overrides is still caught."""
    hints = typing.get_type_hints(TrialConfig)
    for k, v in fields.items():
        try:
            coerce(k, v, hints[k])
        except ConfigError as e:
            raise SpecError(f"{where}: {e}") from None


def _is_number(v, positive: bool = False) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    return ok and (v > 0 if positive else v >= 0)
