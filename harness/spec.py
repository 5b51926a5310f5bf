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
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from harness import REPO_ROOT, names, plan, references
from harness.config import FIELDS, ConfigError, Fraction, TrialConfig, one_line, suggest

STUDIES_DIR = REPO_ROOT / "studies"
SCALES = ("smoke", "quick", "paper")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement strategies for a trial's ranks
SHORT = {"batch_size": "bs", "max_lr": "lr", "seed": "s", "weight_decay": "wd", "momentum": "mom",
         "train_size": "n", "bn_batch": "bn", "steps": "it", "stepsize": "ss", "base_lr": "blr", "lr_scale": "x"}
IDENTITY = ("dataset", "model", "optimizer", "batch_size", "schedule", "train_size", "weight_decay", "momentum",
            "cycle_momentum", "stepsize", "steps", "max_lr", "lr_scale", "seed")
KNOWN_CLAIMS = ("SC1", "SC2", "SC3", "SC4", "SC5", "SC6", "SC7", "SC8", "SC9", "SC10",
                "DA1", "DA2", "DA3", "DA4", "CLR1")


class SpecError(ValueError):
    """A study file that cannot run. One line: where, what was wrong, what is allowed."""


LATE_FIELDS = {"clr_stages": [], "nesterov": False,  # TrialConfig fields newer than the first trial keys
               "zero_grad": True}


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
    reference: str | None = None         # paper scale: the reference run its cell reproduces (harness.references)

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
        config = (self.declared or self.config).to_dict()
        for late, default in LATE_FIELDS.items():  # added after keys were first written: at their defaults they
            if config[late] == default:            # leave every earlier key as it was
                del config[late]
        ident = [self.study, self.scale, self.workers, config]
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
        raise SpecError(f"no study '{name_or_path}'{suggest(name_or_path, known)}; studies: "
                        f"{', '.join(known) or 'none'} (files in {STUDIES_DIR})")
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


# ------------------------------------------------------------------------------------------------ the schema
def _trial_fields(name: str, lists: bool) -> type[BaseModel]:
    """The trial fields that a section of a study file sets, each checked on its own (the rules between fields
    wait for the trials): as in a config or, with `lists`, as grid axes (each a non-empty list of values).
    lr_scale is not one of them: the LR tuning budget is `lr_scales`."""
    fields: dict[str, Any] = {}
    for k, f in TrialConfig.model_fields.items():
        one = Annotated[f.annotation, *f.metadata] if f.metadata else f.annotation
        fields[k] = (list[one], Field(None, min_length=1)) if lists else (one, Field(None, description=f.description))
    budget = "is not set here: the LR tuning budget is lr_scales: [factors]"
    fields["lr_scale"] = (None, Field(None, description=budget))
    title = "trial fields to lists of values" if lists else "trial fields"  # "must be a mapping of <title>"
    return create_model(name, __config__=ConfigDict(extra="forbid", title=title), **fields)


TrialFields = _trial_fields("TrialFields", lists=False)
TrialLists = _trial_fields("TrialLists", lists=True)
LrScales = Annotated[list[Annotated[float, Field(gt=0)]],
                     Field(min_length=1, description="must be a non-empty list of positive factors")]
Paired = Annotated[dict[str, Annotated[list[TrialFields], Field(min_length=1)]],
                   Field(description="must map axis names to non-empty lists of mappings of trial fields")]
_SCHEMA = ConfigDict(extra="forbid", strict=True)  # strict: true/false is not a number, 3 is not a string


class Resources(BaseModel):
    """`resources`: each trial's `workers` ranks, with these GPUs and CPUs each, placed by a Ray strategy."""
    model_config = _SCHEMA
    workers: int = Field(None, ge=1, description="must be an integer >= 1")
    gpus_per_worker: float = Field(None, ge=0, description="must be a number >= 0")
    cpus_per_worker: float = Field(None, gt=0, description="must be a number > 0")
    placement: Literal[PLACEMENTS] = None


class ReferenceRule(BaseModel):
    """`scales.paper.references[i]`: the trials whose fields equal `where` reproduce reference run `run`."""
    model_config = _SCHEMA
    where: dict[str, Any] = {}
    run: str


class Scale(BaseModel):
    """`scales.<scale>`: overrides of the study's sections, the throughput of the cost estimate, deviations."""
    model_config = _SCHEMA
    base: TrialFields = None
    grid: TrialLists = None
    paired: Paired = None
    lr_scales: LrScales = None
    resources: Resources = None
    target_acc: Fraction = None
    images_per_s: float = Field(None, gt=0, description="must be a positive number")
    deviations: list[str] = Field(None, description="must be a list of sentences")
    references: list[ReferenceRule] = Field(None, description="must be a list of {where: {field: value}, run: NAME}")


class Study(BaseModel):
    """A study file (see the module's docstring). `analysis` is checked by harness.plan."""
    model_config = _SCHEMA
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$", description="must be letters, digits, '_' or '-'")
    question: str
    claims: list[Literal[KNOWN_CLAIMS]] = Field(
        None, description=f"must be a list of claim IDs from {', '.join(KNOWN_CLAIMS)}")
    target_acc: Fraction = None
    resources: Resources = None
    base: TrialFields
    grid: TrialLists = None
    paired: Paired = None
    lr_scales: LrScales = None
    analysis: Any = None
    scales: dict[Literal[SCALES], Scale | None] = Field(None, description=f"must map {', '.join(SCALES)} to overrides")


def validate_spec(spec: Any, where: str) -> None:
    """Check a study file: its schema (`Study`), its analysis plan, and then every trial of every scale it has."""
    if not isinstance(spec, dict):
        raise SpecError(f"{where}: a study file is a mapping with keys {', '.join(Study.model_fields)}")
    try:
        Study.model_validate(spec)
    except ValidationError as e:
        raise SpecError(f"{where}: {one_line(e, Study, spec)}") from None
    if "analysis" in spec:
        try:
            plan.validate(spec["analysis"], where, FIELDS, KNOWN_CLAIMS)
        except plan.PlanError as e:
            raise SpecError(str(e)) from None
    for scale in SCALES:
        if scale in (spec.get("scales") or {}) or scale == "smoke":
            built = trials(spec, scale, where=where)  # expands and validates every trial config
            if "analysis" in spec:
                try:
                    plan.expand(spec["analysis"], [t.config.to_dict() for t in built], where=f"{where}: scale {scale}")
                except plan.PlanError as e:
                    raise SpecError(str(e)) from None


def at_scale(spec: dict, scale: str) -> dict:
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
    out["references"] = list(over.get("references") or [])
    return out


def reference_of(config: dict, rules: list[dict]) -> str | None:
    """The run of the first `references` rule whose `where` the config matches (numbers compared as numbers)."""
    for rule in rules:
        if all(same(config.get(k), v) for k, v in (rule.get("where") or {}).items()):
            return rule["run"]
    return None


def same(a, b) -> bool:
    """Equal as config values: numbers to 1e-9 relative (an int is its float), lists and tuples alike."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-9 * max(abs(a), abs(b))
    return a == b


def trials(spec: dict, scale: str, where: str = "study", workers: int | None = None) -> list[Trial]:
    """Expand one scale of a study into its trials, each config validated for the trial's world size."""
    r = at_scale(spec, scale)
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
    refs = [reference_of(cfg.to_dict(), r["references"]) for cfg in built]
    if scale == "paper":
        _check_references(built, refs, r["references"], where)
    return [Trial(spec["name"], scale, world, cfg, tuple(used), reference=ref) for cfg, ref in zip(built, refs)]


def _check_references(built: list[TrialConfig], refs: list[str | None], rules: list[dict], where: str) -> None:
    """Every paper-scale trial reproduces a known reference run, and every rule is used."""
    known = references.names()
    for rule in rules:
        if rule["run"] not in known:
            raise SpecError(f"{where}: scale paper: unknown reference run '{rule['run']}'"
                            f"{suggest(rule['run'], known)}; python -m harness.references lists the known runs")
        if rule["run"] not in refs:
            raise SpecError(f"{where}: scale paper: references rule {rule} matches no trial")
    for cfg, ref in zip(built, refs):
        if ref is None:
            fields = {k: cfg.to_dict()[k] for k in ("model", "dataset", "schedule", "batch_size", "max_lr")}
            raise SpecError(f"{where}: scale paper: trial {fields} names no reference run; every paper-scale cell "
                            f"says which run it reproduces (scales.paper.references: [{{where: {{field: value}}, "
                            f"run: NAME}}])")


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
