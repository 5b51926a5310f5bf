"""Trials of a shipped study with outcomes that make every planned comparison come out a known way, written to a
real MLflow store by the harness's own writers (tracking.start_study_run, TrialLogger) - tests/test_real_path.py.

How the outcomes are chosen, from the plan alone (nothing per study): a cell is a trial config without its seed
and lr_scale. Each comparison of `claims.planned_comparisons` becomes linear constraints on the cells' outcomes,
in the metric's own unit ("acc": final and time-budget accuracy; "steps": steps to target), with a gap wider than
the per-seed jitter, so that every unit of the better side beats every unit of the worse side:
  two_arm, non_inferior, best_level  every cell of arm a beats every cell of arm b (flipped: b beats a; a flipped
                                     non_inferior loses by the margin plus the gap);
  trend                              each level beats the next level towards arm b;
  interaction                        every combination of the four cells has (a - b | by_a) - (a - b | by_b) > 0;
  best_shift                         a best level under by_a, another under by_b, at a lower grid position
                                     (flipped: higher); every pair of positions is tried;
  range_test                         not a constraint: the run's curve stays accurate up to the top LR (claimed)
                                     or collapses at LR > top/2 (flipped).
Metrics read from a run's curve are families of their own (max_acc_drop "drop", evals_below_chance "below",
dead_output_frac "dead", min_class_recall "recall"), written into the curve by `_curve_history`. A control
(`expect: no_difference`) comes out "claimed" when its arms are equal in every seed (its expectation holds) and
"flipped" when arm a beats arm b in every unit (its expectation fails).
A linear program (scipy's HiGHS) finds outcomes that meet all constraints at once; when none exist the plan's
comparisons contradict each other and `Conflict` names the ones that do. "flipped" asks every comparison to come
out the opposite way, which must make the evaluation say so: the proof the test can fail.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field

import numpy as np
from synthetic_store import summary

from harness import plan
from harness import spec as specs
from harness.analysis import claims
from harness.study import tracking

WAYS = ("claimed", "flipped")
FAMILY = {"final_acc": "acc", "steps_to_target": "steps", "range_drop": "range", "max_acc_drop": "drop",
          "evals_below_chance": "below", "dead_output_frac": "dead", "min_class_recall": "recall"}
CURVE_FAMILIES = ("drop", "below", "dead", "recall")   # written into the curve (_curve_history)
ACC_BOUNDS = (0.3, 0.98)
ACC_JITTER = 0.004          # half-width of the per-seed noise on accuracy
GAP = {"acc": 0.02, "steps": 4.0,             # a pair of cells: wider than two jitters (steps: plus rounding)
       "drop": 0.02, "below": 2.0, "dead": 0.02, "recall": 0.02}
CONTRAST_GAP = {"acc": 0.03, "steps": 7.0,    # a contrast of four cells
                "drop": 0.03, "below": 3.0, "dead": 0.03, "recall": 0.03}
DROP_MAX = 0.08             # the dip stays above chance + 10 points: the lowest accuracy (0.3) minus this
BELOW_MAX = 8.0             # evaluations at chance, at most
TOTAL_SECONDS = 100.0       # every trial trains this long: the time budget is the end of every run
RANGE_POINTS = 13
SYSTEM = {"sys.torch": "2", "sys.cuda": "none", "sys.gpu_model": "none", "sys.gpu_count": "0",
          "sys.hostnames": "real-path", "sys.python": "3.11"}


class Conflict(AssertionError):
    """The plan's comparisons cannot all come out the asked way at once."""


class Unsupported(AssertionError):
    """A comparison this store does not know how to steer (a new kind or metric): the test must learn it."""


# ------------------------------------------------------------------------------------------------ cells
def cell_of(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in ("seed", "lr_scale")}, sort_keys=True,
                      default=str)


def takes(config: dict, match: dict) -> bool:
    return all(plan.key(config.get(f)) in {plan.key(v) for v in vals} for f, vals in match.items())


def cells(configs: list[dict], *matches: dict) -> list[str]:
    return sorted({cell_of(c) for c in configs if all(takes(c, m) for m in matches)})


@dataclass
class Row:
    """sum(coef[cell] * outcome[cell]) >= rhs, in one family's unit; `why` is the comparison's line."""
    family: str
    coef: dict
    rhs: float
    why: str


def _beats(family: str, direction: int, upper: list[str], lower: list[str], gap: float, why: str) -> list[Row]:
    """Every cell of `upper` better than every cell of `lower` by `gap` (better: direction x outcome higher)."""
    return [Row(family, {u: direction, lo: -direction}, gap, why) for u in upper for lo in lower if u != lo]


# ------------------------------------------------------------------------------------------------ constraints
def family_of(c: plan.Comparison) -> str:
    if c.metric not in FAMILY:
        raise Unsupported(f"{c.line()}: metric {c.metric} (METRICS has {sorted(plan.METRICS)}) is not steered by "
                          "tests/real_path_store.py; teach FAMILY and the history how to make it come out a known way")
    return FAMILY[c.metric]


def rows_for(c: plan.Comparison, configs: list[dict], sign: int, shift: tuple | None = None) -> list[Row]:
    """The constraints that make comparison `c` come out as claimed (sign +1) or the opposite way (-1); a control
    (expect: no_difference) as claimed has its arms equal (each row both ways, with no gap)."""
    if c.expect == "no_difference":
        rows = _rows_for(c, configs, +1, shift)
        if sign < 0:
            return rows
        return [Row(r.family, {k: s * v for k, v in r.coef.items()}, 0.0, r.why) for r in rows for s in (1, -1)]
    return _rows_for(c, configs, sign, shift)


def _rows_for(c: plan.Comparison, configs: list[dict], sign: int, shift: tuple | None = None) -> list[Row]:
    fam, d, why = family_of(c), c.direction, c.line()
    pool = [x for x in configs if takes(x, c.where_match()) and takes(x, c.stratum_match())]
    if c.kind == "range_test":
        return []
    if c.kind in ("two_arm", "non_inferior", "best_level"):
        a, b = cells(pool, c.a.match), cells(pool, c.b.match)
        gap = GAP[fam] + (c.margin if c.kind == "non_inferior" and sign < 0 else 0.0)
        upper, lower = (a, b) if sign > 0 else (b, a)
        out = _beats(fam, d, upper, lower, gap, why)
        if c.kind == "best_level" and fam != "acc":   # the best level of each arm is picked by accuracy
            out += _beats("acc", +1, upper, lower, GAP["acc"], why)
        return out
    if c.kind == "trend":
        return _trend(c, pool, fam, sign)
    if c.kind == "interaction":
        quads = [cells(pool, arm.match, {c.by: by}) for by in (c.by_a, c.by_b) for arm in (c.a, c.b)]
        out = []
        for a1, b1, a2, b2 in itertools.product(*quads):
            coef: dict = {}
            for cell, k in ((a1, 1), (b1, -1), (a2, -1), (b2, 1)):
                coef[cell] = coef.get(cell, 0) + sign * d * k
            out.append(Row(fam, coef, CONTRAST_GAP[fam], why))
        return out
    if c.kind == "best_shift":
        return _best_shift(c, pool, shift, why)
    raise Unsupported(f"{why}: kind {c.kind} is not steered by tests/real_path_store.py")


def _trend(c: plan.Comparison, pool: list[dict], fam: str, sign: int) -> list[Row]:
    """Each level better than its neighbour towards arm b (claimed), or worse (flipped)."""
    levels = list(c.levels)
    pos = {plan.key(v): i for i, v in enumerate(levels)}
    if pos[plan.key(c.a.match[c.field][0])] < pos[plan.key(c.b.match[c.field][0])]:
        levels.reverse()                                   # from arm b's end towards arm a's
    by_level = [cells(pool, {c.field: (v,)}) for v in levels]
    out = []
    for lower, upper in itertools.pairwise(by_level):
        out += _beats(fam, c.direction, *((upper, lower) if sign > 0 else (lower, upper)), GAP[fam], c.line())
    return out


def shift_choices(c: plan.Comparison, configs: list[dict], sign: int) -> list[tuple[int, int]]:
    """best_shift: (position of the best level under by_a, under by_b) among the levels each group has, lower
    under by_a when claimed."""
    pool = [x for x in configs if takes(x, c.where_match()) and takes(x, c.stratum_match())]
    have = [[i for i, v in enumerate(c.levels) if cells(pool, {c.by: by, c.field: (v,)})] for by in (c.by_a, c.by_b)]
    return [(i, j) for i in have[0] for j in have[1] if (i < j if sign > 0 else i > j)]


def _best_shift(c: plan.Comparison, pool: list[dict], shift: tuple, why: str) -> list[Row]:
    out = []
    for by, best in zip((c.by_a, c.by_b), shift, strict=True):
        group = [x for x in pool if takes(x, {c.by: by})]
        top = cells(group, {c.field: (c.levels[best],)})
        rest = [x for x in cells(group) if x not in top]
        out += _beats("acc", +1, top, rest, GAP["acc"], why)
    return out


# ------------------------------------------------------------------------------------------------ solving
def _solve(rows: list[Row], bounds: dict[str, dict]) -> dict[str, dict] | None:
    """Per family, outcomes per cell that meet every row (smallest sum), or None when there are none."""
    from scipy.optimize import linprog
    out = {}
    for fam in {r.family for r in rows}:
        mine = [r for r in rows if r.family == fam]
        names = sorted({k for r in mine for k in r.coef})
        index = {k: i for i, k in enumerate(names)}
        a_ub = np.zeros((len(mine), len(names)))
        for i, r in enumerate(mine):
            for k, v in r.coef.items():
                a_ub[i, index[k]] -= v
        res = linprog(np.ones(len(names)), A_ub=a_ub, b_ub=[-r.rhs for r in mine],
                      bounds=[bounds[fam][k] for k in names], method="highs")
        if res.status != 0:
            return None
        top = max(bounds[fam][k][1] for k in names) - res.x.max() if fam == "acc" else 0.0
        values = np.round(res.x + top, 6)   # accuracies up to the top (any level will do); equal cells stay equal
        out[fam] = dict(zip(names, values, strict=True))
    return out


def _bounds(configs: list[dict]) -> dict[str, dict]:
    steps = {cell_of(c): (2.0, float(c["steps"]) - 2.0) for c in configs}
    def within(lo: float, hi: float) -> dict:
        return {cell_of(c): (lo, hi) for c in configs}
    acc = (ACC_BOUNDS[0] + ACC_JITTER, ACC_BOUNDS[1] - ACC_JITTER)
    return {"acc": within(*acc), "steps": steps, "drop": within(ACC_JITTER, DROP_MAX), "below": within(0.0, BELOW_MAX),
            "dead": within(ACC_JITTER, 0.9), "recall": within(*acc)}


def design(comparisons: list[plan.Comparison], configs: list[dict], way: str) -> dict[str, dict]:
    """Outcomes per family and cell that make every comparison come out `way` (claimed / flipped); raises
    Conflict naming the comparisons that cannot come out that way together."""
    sign = 1 if way == "claimed" else -1
    bounds = _bounds(configs)
    fixed = [r for c in comparisons if c.kind != "best_shift" for r in rows_for(c, configs, sign)]
    shifts = [c for c in comparisons if c.kind == "best_shift"]
    for choice in itertools.product(*(shift_choices(c, configs, sign) for c in shifts)):
        rows = fixed + [r for c, s in zip(shifts, choice, strict=True) for r in rows_for(c, configs, sign, s)]
        solved = _solve(rows, bounds)
        if solved is not None:
            solved["range"] = {cell_of(x): way for c in comparisons if c.kind == "range_test"
                               for x in configs if takes(x, c.where_match()) and takes(x, c.stratum_match())}
            return solved
    raise Conflict(_conflict_text(comparisons, configs, sign, bounds, way))


def _feasible(group: list[plan.Comparison], configs: list[dict], sign: int, bounds: dict) -> bool:
    shifts = [c for c in group if c.kind == "best_shift"]
    fixed = [r for c in group if c.kind != "best_shift" for r in rows_for(c, configs, sign)]
    return any(_solve(fixed + [r for c, s in zip(shifts, ch, strict=True) for r in rows_for(c, configs, sign, s)],
                      bounds) is not None
               for ch in itertools.product(*(shift_choices(c, configs, sign) for c in shifts)))


def _conflict_text(comparisons, configs, sign, bounds, way) -> str:
    alone = [c.line() for c in comparisons if not _feasible([c], configs, sign, bounds)]
    pairs = [f"{a.line()}  AND  {b.line()}" for a, b in itertools.combinations(comparisons, 2)
             if not _feasible([a, b], configs, sign, bounds)]
    found = "; ".join(alone) if alone else " | ".join(pairs) if pairs else "no pair alone: three or more together"
    return f"no outcomes make every planned comparison come out {way}: {found}"


# ------------------------------------------------------------------------------------------------ runs
def _acc_jitter(config: dict) -> float:
    scale_step = round(math.log2(float(config.get("lr_scale") or 1.0)) * 3)
    return ACC_JITTER * (((int(config["seed"]) * 5 + scale_step) % 9) - 4) / 4


def history(config: dict, outcome: dict) -> list[dict]:
    """Evaluation records: a range test's LR ramp, else chance at step 0, the target crossed at the designed
    step (when one is designed), the designed final accuracy at the last step."""
    cell, steps = cell_of(config), int(config["steps"])
    if cell in outcome.get("range", {}):
        return _range_history(config, outcome["range"][cell])
    acc = outcome.get("acc", {}).get(cell, 0.6) + _acc_jitter(config)
    if any(cell in outcome.get(f, {}) for f in CURVE_FAMILIES):
        return _curve_history(config, outcome, acc)
    target = float(config["target_acc"])
    chance = min(0.1, target / 2)
    if cell in outcome.get("steps", {}):
        reach = int(round(outcome["steps"][cell])) + int(config["seed"]) % 2
        points = [(0, chance), (reach, min(1.0, target + 0.001)), (steps, acc)]
    else:
        points = [(0, chance), (steps // 2, min((chance + acc) / 2, target - 0.001)), (steps, acc)]
    return [_record(config, step, a) for step, a in points]


def _curve_history(config: dict, outcome: dict, acc: float) -> list[dict]:
    """A curve with the designed instability: `below` evaluations at chance (1/10, under chance + 10 points), then
    the final accuracy, a dip of `drop` under it (still above chance + 10 points) and the final accuracy again at
    the last step; every record carries the designed final dead_output_frac and min_class_recall."""
    cell, steps, jitter = cell_of(config), int(config["steps"]), _acc_jitter(config)
    def designed(family: str, default: float) -> float:
        return outcome[family][cell] + jitter if cell in outcome.get(family, {}) else default
    below = int(round(outcome["below"][cell])) + int(config["seed"]) % 2 if cell in outcome.get("below", {}) else 0
    drop = designed("drop", 0.0)
    points = [*((i + 1, 0.1) for i in range(below)), (below + 1, acc), (below + 2, acc - drop), (steps, acc)]
    extra = {"dead_output_frac": designed("dead", 0.0), "min_class_recall": designed("recall", acc)}
    return [{**_record(config, step, a), **extra} for step, a in points]


def _range_history(config: dict, way: str) -> list[dict]:
    steps, top = int(config["steps"]), float(config["max_lr"])
    wobble = 0.01 * (int(config["seed"]) % 3)
    out = []
    for i in range(RANGE_POINTS):
        frac = i / (RANGE_POINTS - 1)
        high = way == "flipped" and frac > 0.5
        out.append(_record(config, round(steps * frac), 0.1 + wobble if high else 0.8 - wobble * frac,
                           lr=top * frac))
    return out


def _record(config: dict, step: int, acc: float, lr: float | None = None) -> dict:
    steps = int(config["steps"])
    return {"step": step, "epoch": step / max(steps, 1), "lr": float(config["max_lr"]) if lr is None else lr,
            "momentum": float(config.get("momentum") or 0.0), "train_loss": 2.3 * (1 - acc),
            "test_loss": 2.5 * (1 - acc), "test_acc": acc, "val_acc": acc, "images_per_s": 1000.0,
            "train_seconds": TOTAL_SECONDS * step / steps}


@dataclass
class Written:
    study: str
    scale: str
    way: str
    parent: str
    comparisons: list = field(default_factory=list)
    needs_curves: bool = False


def write(uri: str, study: str, scale: str, way: str, spec: dict | None = None) -> Written:
    """One invocation of the study (a parent run and every trial of the scale) through the harness's writers,
    with outcomes that make each planned comparison come out `way`; `spec`: the study file's, else this one."""
    spec = spec or specs.load_spec(study)
    trials = specs.trials(spec, scale, where=study)
    comparisons = claims.planned_comparisons(spec, scale)
    outcome = design(comparisons, [t.config.to_dict() for t in trials], way)
    resolved = specs.at_scale(spec, scale)
    parent = tracking.start_study_run(uri, resolved, scale, f"/real-path/{study}-{scale}-{way}",
                                      "python -m harness.study", {"CPU": 2.0}, "test", resume=False)
    exp = tracking.experiment_id(uri, study)
    for t in trials:
        config = t.config.to_dict()
        records = history(config, outcome)
        logger = tracking.TrialLogger(uri, experiment_id=exp, parent_run_id=parent, trial=t, grace_s=5)
        logger.start(t.workers, SYSTEM)
        for r in records:
            logger.log_eval(r)
        done = {**summary(config, records, "completed"), "final_val_acc": records[-1]["val_acc"]}
        assert logger.finish(done, records), f"{t.name}: not delivered to {uri}"
    assert tracking.end_study_run(uri, parent, "FINISHED")
    needs = any(c.kind == "range_test" or c.metric not in ("final_acc", "steps_to_target") for c in comparisons)
    return Written(study, scale, way, parent, comparisons, needs)
