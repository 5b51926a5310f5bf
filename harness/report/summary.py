"""What the runs say: the study's verdicts sorted by how firmly their runs point one way.

    groups = summary_groups(ev.verdicts)      # [(title, [verdict, ...]), ...], every verdict in exactly one
    lines = [summary_line(v) for v in vs]      # the verdict's own words: comparison, what it measured, control

Three groups: the comparisons the decision rule decided; those where every unit (or the interval) points the
same way but the rule could not decide at this n (at 3 vs 3 no exact test reaches p < 0.05); and those whose
units disagree or tie. Nothing is computed anew: a line is the verdict's comparison in words and its measured
medians and range, so every number traces to the verdicts table and from there to the MLflow runs.
"""

from __future__ import annotations

import math

DECIDED = ("supported", "contradicted")
GROUPS = ("Decided by the rule",
          "Every seed (or the interval) on one side, not decided by the rule",
          "Seeds (or the interval) on both sides, or tied")
INTRO = ("The verdicts above, sorted by how firmly their runs point one way: what the rule decided; where every seed "
         "(with 5 or more per arm: the interval) lies on one side of 0 (of the margin, for a non-inferiority "
         "comparison) but the rule did not decide, as at 3 seeds per arm, where no exact test reaches p < 0.05; and "
         "where they lie on both sides. A control expects no difference and says whether that held.")


def one_way(v) -> int:
    """+1 / -1 when the interval (5+ units per arm) or every per-unit difference (fewer) lies above / below 0
    (arm A minus arm B), 0 when it includes 0 or there is none. A non-inferiority comparison reads its margin
    instead of 0: +1 when all of it is within the margin, -1 when all of it is beyond."""
    lo, hi = (v.ci_low, v.ci_high) if v.ci_shown else (v.seed_low, v.seed_high)
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return 0
    if not math.isnan(v.margin):      # in the claimed direction, A may be worse than B by at most the margin
        lo, hi = sorted((lo * (v.direction or 1), hi * (v.direction or 1)))
        lo, hi = lo + v.margin, hi + v.margin
    return 1 if lo > 0 else -1 if hi < 0 else 0


def summary_groups(verdicts: list) -> list[tuple[str, list]]:
    """(title, verdicts) for each non-empty group, the plan's order kept inside a group."""
    decided = [v for v in verdicts if v.would_be in DECIDED]
    rest = [v for v in verdicts if v.would_be not in DECIDED]
    groups = zip(GROUPS, (decided, [v for v in rest if one_way(v)], [v for v in rest if not one_way(v)]),
                 strict=True)
    return [(title, vs) for title, vs in groups if vs]


def summary_line(v) -> str:
    """'[comparison]: what it measured (medians, difference, range)' plus the verdict or the control's outcome."""
    measured = v.measured.split("); per seed ")[0] + (")" if "); per seed " in v.measured else "")
    tail = []
    if v.would_be in DECIDED:
        tail.append(v.verdict_text)
    if v.expectation:
        tail.append(f"control, no difference expected: {v.expectation}")
    return f"{v.comparison_words or v.comparison}: {measured}" + (f" - {'; '.join(tail)}" if tail else "")
