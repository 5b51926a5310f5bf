"""A study's analysis plan: the comparisons its report makes, declared in the study file beside the grid.

    analysis:
      tuning: best_on_validation        # or each_scale: how the study's `lr_scales` (max-LR tuning budget) is used
      comparisons:
        - {claim: SC4, kind: two_arm, field: batch_size, a: max, b: min, where: {schedule: one_cycle}}
        - {claim: question, kind: interaction, field: batch_size, a: max, b: min,
           by: schedule, by_a: one_cycle, by_b: multistep}
        - {claim: question, kind: non_inferior, field: schedule, a: one_cycle, b: multistep, margin: 0.005}

`expand(analysis, configs)` turns the plan into concrete `Comparison`s for the trial configs of one scale:
`max`/`min` become the largest/smallest value present, `strata` split a comparison per value, and each arm
knows the trials it takes and how many units (seeds) it has after tuning: the n the evaluation uses (for
best_level, the units of one level of each arm, since only each arm's best level is compared). `python -m
harness.study NAME --dry-run` prints `Comparison.line()` for each (the pre-registration) and
`harness.analysis.claims` evaluates exactly these comparisons on the runs. Nothing is inferred from names: arms
are typed field values.

`a_where` / `b_where` (two_arm, non_inferior) add conditions that only one arm's trials must meet, for arms that
differ in more than the compared field: DA1's cyclical momentum (whose `momentum` is not used) against constant
momentum 0.95 is `field: cycle_momentum, a: true, b: false, b_where: {momentum: 0.95}`.

`equal_time: true` says the claim compares the arms at equal training time, which the study gives each arm as its
own budget of epochs (DA2: the paper's 128/48 ... 1024/116, its equal-time budgets on its hardware): the line names
each arm's epochs, and the verdict reports each arm's measured training seconds and whether this hardware gave them
equal time.

`at_best: max_lr` (two_arm) compares each arm at its own best value of that field: an arm's trials are restricted
to the value (the study's grid of max LRs) whose median final accuracy over seeds is highest, on validation when
every trial holds out `val_size`, else on the test accuracy the verdict then reads (the same data: AlgoPerf
would not select that way, and the line says so). activation_mystery: each activation at its own best LR.

`best_lr: {field: mlp_activation, where: {...}}` (beside `comparisons`) asks the report for the best max LR of each
level of that field over the study's max_lr grid (the trials `where` selects; the LR with the highest median final
test accuracy over seeds), and its ratio to the 1/c prediction where a level is an activation x*x*c.

`non_inferior` asks whether arm a is not worse than arm b by more than a declared `margin` (in the metric's
unit: 0.005 is half a point of accuracy, 500 is 500 steps); the margin is required for it and only for it.

`where: {steps: max}` (or `min`) keeps the trials with the largest (smallest) value of that field among the scale's
trials, so one plan names a study's long and short arms at every scale. A `where` that keeps one value of a field
names it in the comparison's words ("plain images vs inverted images [final ReLU]"), as a stratum does.

Metrics (`metric:`, default final_acc; each has a direction that is "better"): final_acc, steps_to_target,
range_drop (SC3), and four read from each run's logged evaluation curve (harness.analysis.results.curve_outcomes):
`max_acc_drop` (the largest fall of test accuracy from one evaluation to the next, 0 if it never falls; lower is
better), `evals_below_chance` (evaluations whose test accuracy is below 1/classes + 0.10, every evaluation counted
and, for a diverged run, every planned evaluation after it stopped; lower is better), `dead_output_frac` (its last
value: output units <= 0 for every test image; lower is better) and `min_class_recall` (its last value: the worst
class's test recall; higher is better).

`expect: no_difference` (two_arm, interaction) makes a comparison a control: the plan expects no difference
between its arms, the line says so, and the verdict adds whether the expectation held. The rule: with at least 2
units in each arm (each cell for an interaction), the expectation FAILED when the decision rule finds a
difference (supported or contradicted), or when every per-seed difference (paired by seed where the arms share
seeds one to one, else every pair of units; an interaction's per-seed contrasts) is non-zero with the same sign
(a direction consistent across all seeds, which 3 seeds can show although no test at 3 vs 3 reaches p < 0.05);
else it HELD, which says only that no difference was found, not that the arms are equal. With fewer than 2 units in
an arm it is not tested. The arms' a/b order and the metric's direction only name the direction observed.

Tuning (AlgoPerf's rule): with `best_on_validation`, the trials of an arm that differ only in `lr_scale`
form one unit (one seed of one configuration); the unit's outcome is the trial with the best final
validation accuracy (`val_size` images held out of training), scored on the test set. With `each_scale`,
every LR scale gets its own comparison. A study with a single LR scale needs neither.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from harness import names
from harness.config import TRAIN_IMAGES, one_line, suggest

KINDS = ("two_arm", "trend", "interaction", "best_level", "best_shift", "range_test", "non_inferior")
METRICS = {  # metric -> (label, direction that is "better")
    "final_acc": ("final test accuracy", +1),
    "steps_to_target": ("steps to target", -1),
    "range_drop": ("accuracy lost from LR 0.3-1.2 to the lowest at LR 2-3 (the SC3 rule)", -1),
    # from each run's test-accuracy curve (harness.analysis.results.curve_outcomes)
    "max_acc_drop": ("instability: the largest drop of test accuracy between consecutive evaluations", -1),
    "evals_below_chance": ("instability: evaluations with test accuracy below chance + 10 points", -1),
    "dead_output_frac": ("final fraction of dead output units (<= 0 for every test image)", -1),
    "min_class_recall": ("final test recall of the worst class", +1),
}
FRACTIONS = ("final_acc", "range_drop", "max_acc_drop", "dead_output_frac", "min_class_recall")  # in [0, 1]: pp
EXPECT = ("no_difference",)               # a control's expectation (see the module docstring)
TUNING = ("best_on_validation", "each_scale")
NOT_DESIGN = ("seed", "lr_scale", "device", "data_dir", "eval_every", "target_acc")  # never confounds


class PlanError(ValueError):
    """An analysis plan that cannot be evaluated. One line: where, what was wrong, what is allowed."""


def key(v) -> str:
    """A value's identity for matching: 1000 == 1000.0, lists by their JSON."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return json.dumps(v, sort_keys=True)


def level_value(v) -> float:
    if v is None:
        return math.inf
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def sorted_levels(values) -> list:
    uniq = {key(v): v for v in values}
    return sorted(uniq.values(), key=lambda v: (math.isnan(level_value(v)), level_value(v), str(v)))


def fmt(f: str, v) -> str:
    if v is None:
        return f"{f}=full" if f == "train_size" else f"{f}=none"
    if isinstance(v, float):
        return f"{f}={v:g}"
    if isinstance(v, (list, tuple)):
        return f"{f}=[{', '.join(map(str, v))}]"
    return f"{f}={v}"


def margin_text(metric: str, margin: float) -> str:
    """A non-inferiority margin as declared, and in words: '0.005 (0.5 pp)', '500 steps'."""
    if metric in FRACTIONS:
        return f"{margin:g} ({100 * margin:g} pp)"
    return f"{margin:g} steps" if metric == "steps_to_target" else f"{margin:g}"


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


# ------------------------------------------------------------------------------------------------ validation
class PlannedComparison(BaseModel):
    """One entry of `analysis.comparisons` as the study file declares it (`expand` resolves it on the trials).
    Validated with context {"fields": trial fields, "claims": claim IDs}."""
    model_config = ConfigDict(extra="forbid", strict=True)
    claim: str
    kind: Literal[KINDS]
    field: str
    a: Any = None
    b: Any = None
    where: dict = Field(None, description="must map trial fields to a value or a list of values")
    strata: list = Field(None, description="must be a list of trial fields")
    metric: Literal[*METRICS] = None  # default: range_drop for kind range_test, else final_acc
    by: str | None = None
    by_a: Any = None
    by_b: Any = None
    margin: float | None = None     # non_inferior: how much worse than b arm a may be, in the metric's unit
    a_where: dict = Field(None, description="must map trial fields to a value or a list of values")
    b_where: dict = Field(None, description="must map trial fields to a value or a list of values")
    equal_time: bool = False        # the claim is about equal training time: report each arm's measured seconds
    expect: Literal[EXPECT] = None  # a control: no_difference (see the module docstring)
    at_best: str | None = None      # two_arm: each arm at its own best value of this field (see the docstring)
    note: Any = None

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> PlannedComparison:
        fields, claims = info.context["fields"], info.context["claims"]
        if self.claim != "question" and self.claim not in claims:
            raise ValueError(f"claim '{self.claim}' is not known{suggest(self.claim, claims)}; "
                             f"allowed: question, {', '.join(claims)}")
        for f in [self.field, *(self.where or {}), *(self.strata or []), *([self.by] if self.by else []),
                  *(self.a_where or {}), *(self.b_where or {})]:
            if f not in fields:
                raise ValueError(f"'{f}' is not a trial field{suggest(f, fields)}")
        if self.kind in ("interaction", "best_shift") and None in (self.by, self.by_a, self.by_b):
            raise ValueError(f"kind {self.kind} needs by, by_a and by_b")
        if self.kind in ("two_arm", "interaction") and not {"a", "b"} <= self.model_fields_set:
            raise ValueError(f"kind {self.kind} needs arms a and b")
        if self.kind == "best_level" and "a" not in self.model_fields_set:
            raise ValueError("kind best_level needs a (the claimed best level or levels)")
        if self.kind == "non_inferior":
            if not {"a", "b"} <= self.model_fields_set:
                raise ValueError("kind non_inferior needs arms a and b")
            if self.margin is None or not math.isfinite(self.margin) or self.margin <= 0:
                raise ValueError(f"kind non_inferior needs margin, a positive number in the metric's unit (e.g. "
                                 f"0.005 for half a point of accuracy), got {self.margin!r}")
        elif self.margin is not None:
            raise ValueError(f"margin is only for kind non_inferior, not {self.kind}")
        if self.at_best is not None and (self.kind != "two_arm" or self.at_best not in fields
                                         or self.at_best == self.field):
            raise ValueError(f"at_best must be a trial field other than the compared one, on kind two_arm (e.g. "
                             f"at_best: max_lr), got {self.at_best!r} on kind {self.kind}")
        if (self.a_where or self.b_where) and self.kind not in ("two_arm", "non_inferior"):
            raise ValueError(f"a_where and b_where are only for kinds two_arm and non_inferior, not {self.kind}")
        if self.expect and self.kind not in ("two_arm", "interaction"):
            raise ValueError(f"expect: {self.expect} (a control) is only for kinds two_arm and interaction, not "
                             f"{self.kind}")
        return self


class BestLr(BaseModel):
    """`analysis.best_lr`: the report's table of the best max LR per level of `field` (see the docstring)."""
    model_config = ConfigDict(extra="forbid", strict=True, title="field (a trial field), e.g. {field: mlp_activation}")
    field: str
    where: dict = Field(None, description="must map trial fields to a value or a list of values")

    @model_validator(mode="after")
    def _known(self, info: ValidationInfo) -> BestLr:
        fields = info.context["fields"]
        if self.field not in fields or self.field == "max_lr":
            raise ValueError(f"field must be a trial field other than max_lr{suggest(self.field, fields)}, "
                             f"got {self.field!r}")
        for f in self.where or {}:
            if f not in fields:
                raise ValueError(f"where: '{f}' is not a trial field{suggest(f, fields)}")
        return self


class AnalysisPlan(BaseModel):
    """The `analysis` section: how the study's `lr_scales` are used, and the comparisons its report makes."""
    model_config = ConfigDict(extra="forbid", strict=True)
    tuning: Literal[TUNING] = "best_on_validation"
    comparisons: list[PlannedComparison] = Field(min_length=1, description="must be a non-empty list of comparisons")
    best_lr: BestLr = None


def validate(analysis, where: str, fields: tuple[str, ...], claims: tuple[str, ...]) -> None:
    """Check the `analysis` section's shape; values are checked against the trials by `expand`."""
    try:
        AnalysisPlan.model_validate(analysis, context={"fields": fields, "claims": claims})
    except ValidationError as e:
        raise PlanError(f"{where}: {one_line(e, AnalysisPlan, analysis, root='analysis')}") from None


# ------------------------------------------------------------------------------------------------ expansion
@dataclass(frozen=True)
class Arm:
    label: str                      # "batch_size=1000"
    match: dict                     # field -> tuple of allowed values (typed)

    @property
    def words(self) -> str:
        """The arm in words from its typed values: 'batch 1000', 'one-cycle / triangular CLR'."""
        return " / ".join(names.value_words(f, v) for f, vals in self.match.items() for v in vals) or self.label

    def takes(self, config: dict) -> bool:
        return all(key(config.get(f)) in {key(v) for v in vals} for f, vals in self.match.items())


@dataclass(frozen=True)
class Comparison:
    claim: str
    kind: str
    field: str
    metric: str
    a: Arm                          # the side the claim says is better (trend: largest level)
    b: Arm
    tuning: str                     # best_on_validation | each_scale | single
    n_lr_scales: int
    stratum: dict = field(default_factory=dict)
    levels: tuple = ()              # trend / best_level: every level of `field` in the comparison
    by: str | None = None
    by_a: tuple = ()
    by_b: tuple = ()
    n_a: int = 0                    # planned units (after tuning) per arm; interaction: per cell (min);
    n_b: int = 0                    # best_level, best_shift: per level (the fewest of the arm's levels)
    n_a_max: int = 0                # best_level: the most units of one of the arm's levels, when levels differ
    n_b_max: int = 0
    margin: float | None = None     # non_inferior: how much worse than b arm a may be (the metric's unit)
    equal_time: bool = False        # the arms' budgets stand for equal training time (see the module docstring)
    expect: str | None = None       # a control's expectation: no_difference (see the module docstring)
    at_best: str | None = None      # two_arm: each arm at its own best value of this field
    at_best_on: str = ""            # at_best: "validation" or "test" (the data the best value is selected on)
    epochs: tuple = ()              # equal_time: (arm a's epochs, arm b's epochs) as the plan's trials set them
    confounds: tuple = ()           # "steps 19200 vs 5800": what else differs between the arms
    note: str = ""

    @property
    def metric_label(self) -> str:
        return METRICS[self.metric][0]

    @property
    def direction(self) -> int:
        return METRICS[self.metric][1]

    @property
    def stratum_text(self) -> str:
        return ", ".join(fmt(f, v) for f, v in self.stratum.items())

    @property
    def title(self) -> str:
        """`arm A vs arm B [stratum]`, the comparison in one phrase."""
        if self.kind == "interaction":
            text = (f"({self.a.label} - {self.b.label}) under {self.by}={'/'.join(map(str, self.by_a))} minus "
                    f"under {self.by}={'/'.join(map(str, self.by_b))}")
        elif self.kind == "best_shift":
            text = f"best {self.field} under {self.by}={'/'.join(map(str, self.by_a))} vs " \
                   f"{self.by}={'/'.join(map(str, self.by_b))}"
        elif self.kind == "range_test":
            text = "LR range test: accuracy at the largest LR vs the run's peak"
        elif self.kind == "best_level":
            text = f"claimed best {self.a.label} vs the best other {self.field}"
        elif self.kind == "non_inferior":
            text = f"{self.a.label} not worse than {self.b.label} by more than {margin_text(self.metric, self.margin)}"
        else:
            text = f"{self.a.label} vs {self.b.label}"
        return text + (f" [{self.stratum_text}]" if self.stratum else "")

    @property
    def words(self) -> str:
        """The comparison in words (the report's tables): built from the typed values, as `title` is."""
        def by(vals) -> str:
            return " / ".join(names.value_words(self.by, v) for v in vals)
        a, b, field_words = self.a.words, self.b.words, self.field.replace("_", " ")
        if self.kind == "interaction":
            text = f"({a} minus {b}) under {by(self.by_a)}, minus the same under {by(self.by_b)}"
        elif self.kind == "best_shift":
            text = f"best {field_words} under {by(self.by_a)} vs under {by(self.by_b)}"
        elif self.kind == "range_test":
            text = "LR range test: accuracy at the largest LR vs the run's peak"
        elif self.kind == "best_level":
            text = f"claimed best {a} vs the best other {field_words}"
        elif self.kind == "non_inferior":
            text = f"{a} not worse than {b} by more than {margin_text(self.metric, self.margin)}"
        else:
            text = f"{a} vs {b}"
        only = [names.value_words(f, vals[0]) for f, vals in self._where if len(vals) == 1]  # where: one value
        stratum = ", ".join([*only, *(names.value_words(f, v) for f, v in self.stratum.items())])
        return text + (f" [{stratum}]" if stratum else "") + ("; control" if self.expect else "")

    @property
    def tuning_text(self) -> str:
        if self.tuning == "best_on_validation":
            return f"best of {self.n_lr_scales} LR scales per seed, selected on validation accuracy"
        if self.tuning == "each_scale":
            return "each LR scale compared separately"
        return "one LR scale"

    def line(self) -> str:
        """The pre-registration line: `CLAIM: arm A vs arm B [stratum], n per arm, metric (tuning)`."""
        na, nb = (f"{n}-{hi}" if hi > n else str(n) for n, hi in ((self.n_a, self.n_a_max), (self.n_b, self.n_b_max)))
        n = f"n={na} vs {nb} per arm" if na != nb else f"n={na} per arm"
        extra = f"; arms also differ: {', '.join(self.confounds)}" if self.confounds else ""
        only = "; ".join(f"{f} {'/'.join(fmt(f, v).split('=', 1)[1] for v in vals)}" for f, vals in self._where)
        only = f", trials with {only}" if only else ""
        return (f"{self.claim}: {self.title}{only}, {n}, {self.metric_label}{self.budget_text}{self.at_best_text} "
                f"({self.tuning_text}){self.expect_text}{extra}")

    @property
    def expect_text(self) -> str:
        """A control's expectation and when it fails (the module docstring's rule); '' for a claim."""
        if self.expect != "no_difference":
            return ""
        return ("; control, no difference expected: the expectation fails if the decision rule finds a difference "
                "or every per-seed difference has the same sign")

    @property
    def at_best_text(self) -> str:
        """at_best: ', each arm at its own best max_lr (...)'; else ''."""
        if not self.at_best:
            return ""
        on = "validation accuracy" if self.at_best_on == "validation" else \
            "the same test accuracy the verdict reads: selection on the evaluation data, which AlgoPerf would not do"
        return f", each arm at its own best {self.at_best} (the value with the best median over seeds, on {on})"

    @property
    def budget_text(self) -> str:
        """equal_time: ' at each arm's own epoch budget (116 vs 48 epochs, ...)'; else ''."""
        if not self.equal_time:
            return ""
        ea, eb = ("/".join(f"{e:g}" for e in arm) for arm in self.epochs)
        return (f" at each arm's own epoch budget ({ea} vs {eb} epochs, the claim's equal-time budgets; the "
                f"verdict reports the arms' measured training seconds)")

    def cells(self) -> list[tuple[str, dict]]:
        """(label, field -> allowed values) of each group whose trials the comparison reads."""
        base = {**self.stratum_match()}
        if self.kind in ("interaction", "best_shift"):
            return [(f"{arm.label}, {self.by}={'/'.join(map(str, by))}", {**base, **arm.match, self.by: by})
                    for by in (self.by_a, self.by_b) for arm in ((self.a, self.b) if self.kind == "interaction"
                                                                  else (self.a,))]
        return [(self.a.label, {**base, **self.a.match}), (self.b.label, {**base, **self.b.match})]

    def stratum_match(self) -> dict:
        return {f: (v,) for f, v in self.stratum.items()}

    def where_match(self) -> dict:
        return dict(self._where)

    _where: tuple = ()


def _values_of(configs: list[dict], f: str) -> list:
    return sorted_levels(c.get(f) for c in configs)


def _resolve_arm(spec, present: list, f: str, at: str) -> tuple:
    if spec in ("max", "min"):
        numeric = [v for v in present if not math.isnan(level_value(v))]
        if not numeric:
            raise PlanError(f"{at}: '{spec}' needs numeric values of {f}; the trials have {present}")
        return (numeric[-1] if spec == "max" else numeric[0],)
    values = tuple(spec) if isinstance(spec, list) else (spec,)
    known = {key(v) for v in present}
    missing = [v for v in values if key(v) not in known]
    if len(missing) == len(values):
        raise PlanError(f"{at}: no trial has {f} in {list(values)}; the trials have {present}")
    return tuple(v for v in values if key(v) in known)


def _filter(configs: list[dict], match: dict) -> list[dict]:
    return [c for c in configs if all(key(c.get(f)) in {key(v) for v in vals} for f, vals in match.items())]


def _units(configs: list[dict], tuning: str) -> int:
    """Trials after tuning: with selection, the trials that differ only in lr_scale are one unit."""
    if tuning != "best_on_validation":
        return len(configs)
    return len({json.dumps({k: v for k, v in c.items() if k != "lr_scale"}, sort_keys=True) for c in configs})


def _confounds(a: list[dict], b: list[dict], skip: set) -> tuple:
    out = []
    for f in sorted({*a[0], *b[0]} if a and b else ()):
        if f in skip or f in NOT_DESIGN:
            continue
        va, vb = {key(c.get(f)) for c in a}, {key(c.get(f)) for c in b}
        if va != vb:
            show = lambda vs: "/".join(sorted(vs, key=lambda s: (level_value(json.loads(s)), s)))  # noqa: E731
            out.append(f"{f} {show(va)} vs {show(vb)}")
    return tuple(out)


def tuning_mode(analysis: dict, configs: list[dict]) -> tuple[str, int]:
    scales = {key(c.get("lr_scale", 1.0)) for c in configs}
    if len(scales) <= 1:
        return "single", 1
    return analysis.get("tuning", "best_on_validation"), len(scales)


def expand(analysis: dict, configs: list[dict], where: str = "study") -> list[Comparison]:
    """The plan's comparisons for these trial configs (one scale of a study). Raises PlanError (one line)."""
    tuning, n_scales = tuning_mode(analysis, configs)
    if tuning == "best_on_validation" and any(not c.get("val_size") for c in configs):
        raise PlanError(f"{where}: analysis.tuning best_on_validation with {n_scales} LR scales needs val_size "
                        f"(a validation split held out of training) in every trial; set it in base")
    out: list[Comparison] = []
    for i, c in enumerate(analysis["comparisons"]):
        at = f"{where}: analysis.comparisons[{i}] ({c['claim']})"
        restrict = {g: _resolve_arm(v, _values_of(configs, g), g, at) if v in ("max", "min") else _as_tuple(v)
                    for g, v in (c.get("where") or {}).items()}
        pool = _filter(configs, restrict)
        restrict = {g: tuple(v for v in vals if _filter(pool, {g: (v,)})) for g, vals in restrict.items()}  # present
        if not pool:
            raise PlanError(f"{at}: no trial matches where {c.get('where')}")
        strata = list(c.get("strata") or []) + (["lr_scale"] if tuning == "each_scale" else [])
        combos = [{}]
        for s in strata:
            combos = [{**combo, s: v} for combo in combos for v in _values_of(pool, s)]
        for combo in combos:
            rows = _filter(pool, {s: (v,) for s, v in combo.items()})
            if rows:
                common = dict(claim=c["claim"], kind=c["kind"], field=c["field"], tuning=tuning,
                              metric=c.get("metric", "range_drop" if c["kind"] == "range_test" else "final_acc"),
                              n_lr_scales=n_scales, stratum=combo, note=c.get("note", ""), margin=c.get("margin"),
                              equal_time=c.get("equal_time", False), _where=tuple(restrict.items()),
                              expect=c.get("expect"),
                              at_best=c.get("at_best"), at_best_on="" if not c.get("at_best") else
                              "validation" if all(x.get("val_size") for x in pool) else "test")
                out.append(_comparison(c, rows, common, tuning, at))
    return out


def _comparison(c: dict, rows: list[dict], common: dict, tuning: str, at: str) -> Comparison:
    """One planned comparison `c` within one stratum's `rows`: its arms resolved, n per arm, confounds."""
    f, kind = c["field"], c["kind"]
    present = _values_of(rows, f)
    if kind == "range_test":
        arm = Arm("range test", {})
        return Comparison(**common, a=arm, b=arm, n_a=_units(rows, tuning), n_b=_units(rows, tuning))
    if kind in ("interaction", "best_shift"):
        by_values = _values_of(rows, c["by"])
        common.update(by=c["by"], by_a=_resolve_arm(c["by_a"], by_values, c["by"], at),
                      by_b=_resolve_arm(c["by_b"], by_values, c["by"], at))
    if kind == "best_shift":
        groups = [_filter(rows, {c["by"]: by}) for by in (common["by_a"], common["by_b"])]
        n = [min(_units(_filter(g, {f: (v,)}), tuning) for v in _values_of(g, f)) for g in groups]
        arm = Arm(f"best {f}", {})
        return Comparison(**common, a=arm, b=arm, levels=tuple(present), n_a=n[0], n_b=n[1])
    a_vals, b_vals = _arm_values(c, present, at)
    arm_a, arm_b = (_arm(f, vals, c.get(side)) for vals, side in ((a_vals, "a_where"), (b_vals, "b_where")))
    ra, rb = _filter(rows, arm_a.match), _filter(rows, arm_b.match)
    for arm, r in (("a", ra), ("b", rb)):
        if not r:
            raise PlanError(f"{at}: arm {arm} ({(arm_a, arm_b)[arm == 'b'].label}) matches no trial")
    if common["equal_time"]:
        common["epochs"] = tuple(tuple(sorted({_epochs(x) for x in r})) for r in (ra, rb))
    if kind == "interaction":
        cells = [_filter(r, {c["by"]: by}) for by in (common["by_a"], common["by_b"]) for r in (ra, rb)]
        if any(not x for x in cells):
            raise PlanError(f"{at}: an interaction cell has no trials (each arm needs both {c['by']} values)")
        n_a, n_b = min(_units(x, tuning) for x in cells[:2]), min(_units(x, tuning) for x in cells[2:])
        conf = _confounds(cells[0], cells[1], {f, c["by"]})
    elif kind == "best_level" or c.get("at_best"):   # each arm's best level is compared: n is one level's units
        g = c.get("at_best") or f
        per_level = [[_units(_filter(r, {g: (v,)}), tuning) for v in (vals if g == f else _values_of(r, g))]
                     for r, vals in ((ra, a_vals), (rb, b_vals))]
        per_level = [[n for n in ns if n] or [0] for ns in per_level]
        n_a, n_b = min(per_level[0]), min(per_level[1])
        common.update(n_a_max=max(per_level[0]), n_b_max=max(per_level[1]))
        conf = _confounds(ra, rb, {f, g})   # at_best: the arms' own best values are the design, not a confound
    else:
        n_a, n_b = _units(ra, tuning), _units(rb, tuning)
        conf = _confounds(ra, rb, {f, *(c.get("a_where") or {}), *(c.get("b_where") or {})})  # those are in the labels
    levels = tuple(present) if kind in ("trend", "best_level") else ()
    return Comparison(**common, a=arm_a, b=arm_b, levels=levels, n_a=n_a, n_b=n_b, confounds=conf)


def _arm(f: str, values: tuple, extra: dict | None) -> Arm:
    """An arm: the compared field's values, plus the conditions of its own a_where / b_where."""
    match = {f: values, **{g: _as_tuple(v) for g, v in (extra or {}).items()}}
    return Arm(", ".join(" / ".join(fmt(g, v) for v in vals) for g, vals in match.items()), match)


def _epochs(config: dict) -> float:
    """Passes over the dataset's training set (train_size, or the whole set as the paper counts it)."""
    images = config.get("train_size") or TRAIN_IMAGES[config.get("dataset", "digits")]
    return round(config["steps"] * config["batch_size"] / images, 1)


def _arm_values(c: dict, present: list, at: str) -> tuple[tuple, tuple]:
    """The values of the compared field in arm a and arm b (max/min resolved); distinct and non-empty."""
    f = c["field"]
    if c["kind"] == "best_level":
        a_vals = _resolve_arm(c["a"], present, f, at)
        b_vals = _resolve_arm(c["b"], present, f, at) if "b" in c else tuple(
            v for v in present if key(v) not in {key(x) for x in a_vals})
    else:
        a_vals = _resolve_arm(c.get("a", "max"), present, f, at)
        b_vals = _resolve_arm(c.get("b", "min"), present, f, at)
    if not b_vals or {key(v) for v in a_vals} & {key(v) for v in b_vals}:
        raise PlanError(f"{at}: arms a {list(a_vals)} and b {list(b_vals)} of {f} must be distinct and "
                        f"non-empty (values present: {present})")
    return a_vals, b_vals
