"""The claims registry and the statistics behind each verdict.

Every claim of shared/paper/claims.md (IDs SC1..SC10, DA1..DA4, CLR1) is a `Claim`: its statement,
setup, the paper's number and the authors' log number (transcribed from claims.md as data: the report prints
them beside ours), and the comparison it needs from a study's trials. `evaluate(results)` returns one
`Verdict` per comparison that the study's runs allow, and the claims it could not test (with why).

Which claims: the ones the parent run names in its `harness.claims` tag (all claims when the tag is empty).
Which trials: those at the study's largest scale (smoke < quick < paper) whose status is completed or
diverged. Diverged trials and trials that missed the target COUNT (as in AlgoPerf): a diverged trial's
accuracy is its real final accuracy (its last test accuracy when final_acc is absent, e.g. chance), and a
miss is an infinite steps-to-target. Errored and still-running trials are excluded and reported.

Arms and strata. A comparison contrasts arm A (the side the claim says is better) with arm B on one trial
field (e.g. schedule = one_cycle vs multistep). The other fields that vary in the study are split in two:
a field that is a function of the compared field (and of the strata chosen so far) goes with its arm
(a batch size's own max LR and step budget, a schedule's own step count); any other varying field is a
stratum, and each stratum gets its own verdict (e.g. one verdict per model). An arm that has a single value
of a stratum field that does not apply to it (stepsize for multistep, momentum when momentum cycles) is
shared by all strata of that field.

Decision rule (the same for every comparison; ALPHA = 0.05, MIN_N = 3):
  * statistic: difference of medians (arm A - arm B; for trends: largest level - smallest level), with a
    95% percentile-bootstrap interval from BOOTSTRAP resamples of the trials within each arm (seeded from
    the claim ID and comparison, so reports are reproducible);
  * test: Welch's t-test for accuracies (finite values); Mann-Whitney U for steps-to-target (a miss is
    +inf, which ranks last); a bootstrap sign p-value for contrasts of contrasts (SC5, DA3); a one-sample
    t-test against the threshold for SC3;
  * supported    : n >= MIN_N in every arm, the 95% CI excludes 0 on the claimed side, and p < ALPHA;
  * contradicted : n >= MIN_N in every arm, the 95% CI excludes 0 on the opposite side, and p < ALPHA;
  * inconclusive : otherwise (the reason is given).
  Trends (SC2, SC4, DA2) also need Spearman's rho over all trials of the stratum to have the claimed sign
  to be supported. Claims with a secondary metric (SC1: steps-to-target) are supported when the primary
  metric is supported and the secondary is not contradicted; contradicted when either is contradicted.
  A smoke-scale study never yields more than "pipeline check (smoke scale): would be <verdict>".
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field

import numpy as np
import pandas as pd

ALPHA = 0.05
MIN_N = 3
BOOTSTRAP = 2000
CYCLICAL = ("triangular", "one_cycle", "one_cycle_cos")
SCALE_ORDER = ("smoke", "quick", "paper")
STRENGTH = {"smoke": "none: pipeline check only", "quick": "indicative: reduced setup",
            "paper": "full: the paper's setup"}
METRICS = {  # claim metric -> (trials column, label, unit)
    "final_acc": ("outcome_acc", "final test accuracy", "acc"),
    "steps_to_target": ("steps_to_target_eff", "steps to target", "steps"),
}
# Fields listed first are preferred as strata; the rest of TrialConfig follows (see `_field_order`).
PRIORITY_FIELDS = ("dataset", "model", "optimizer", "schedule", "batch_size", "train_size", "weight_decay",
                   "momentum", "cycle_momentum", "mlp_activation", "mlp_hidden", "mlp_final_relu", "preprocess",
                   "bn_batch", "stepsize", "max_lr", "base_lr", "steps")
NOT_FACTORS = {"seed", "device", "data_dir", "eval_every", "workers", "target_acc"}
# Fields that do not apply to an arm defined by (field, value): such an arm is shared by all their strata.
NOT_APPLICABLE = {
    ("schedule", "multistep"): {"stepsize", "max_lr", "cycle_momentum", "max_momentum", "min_momentum", "final_div"},
    ("schedule", "constant"): {"stepsize", "max_lr", "milestones", "gamma", "cycle_momentum", "max_momentum",
                               "min_momentum", "final_div"},
    ("schedule", "triangular"): {"milestones", "gamma", "final_div"},
    ("schedule", "one_cycle"): {"milestones", "gamma"},
    ("schedule", "one_cycle_cos"): {"milestones", "gamma"},
    ("cycle_momentum", True): {"momentum"},
    ("cycle_momentum", False): {"max_momentum", "min_momentum"},
    ("optimizer", "adagrad"): {"momentum"},
    ("optimizer", "adadelta"): {"momentum"},
}


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    setup: str
    paper: str                      # the number printed in the paper (claims.md, column "paper")
    log: str                        # the number read from the authors' logs (claims.md, column "log")
    kind: str                       # two_arm | trend | interaction | best_level | best_shift | range_test
    field: str                      # the compared trial field
    a: tuple = ()                   # two_arm/interaction: values of arm A (claimed better); best_level: claimed best
    b: tuple = ()                   # values of arm B; best_shift: the schedules of the second group
    metrics: tuple = (("final_acc", +1),)   # (metric, claimed sign of A - B); the first one is primary
    by: str | None = None           # interaction / best_shift: the second field
    restrict: tuple = ()            # ((field, allowed values), ...) applied first when the field exists
    requires: tuple = ()            # ((field, values), ...): some trial must have one of the values
    detail: tuple = ()              # ((field, value, paper text, log text), ...) for one stratum or arm
    note: str = ""                  # what the comparison does not test

    def numbers_for(self, values: dict) -> tuple[str, str]:
        """(paper, log) text for a comparison whose arms/stratum have these field values."""
        for f, v, paper, log in self.detail:
            if f in values and _key(values[f]) == _key(v):
                return paper, log
        return self.paper, self.log


_CLR_VS_PC = {"kind": "two_arm", "field": "schedule", "a": CYCLICAL, "b": ("multistep",)}

# Numbers below are transcribed from shared/paper/claims.md ("paper" and "log" columns).
CLAIMS: dict[str, Claim] = {c.id: c for c in [
    Claim("SC1", "Super-convergence: one CLR cycle reaches higher accuracy in 1/8 of the iterations of PC-LR",
          "C10, ResNet-56, batch 1000; CLR 0.1-3 SS 5k 10k it vs PC-LR 0.35 80k it",
          "CLR 92.4 vs PC 91.2", "92.44 vs 90.32 (PC first >=90% at 71.1k, CLR at 9.5k)",
          metrics=(("final_acc", +1), ("steps_to_target", -1)), **_CLR_VS_PC),
    Claim("SC2", "Cycle length: longer cycles help, with diminishing returns",
          "CLR 0.1-3, SS 1k/3k/5k/10k (2k/6k/10k/20k it)",
          "89.7 @2k, 92.1 @6k, 92.4 @10k, 92.7 @20k", "-",
          kind="trend", field="stepsize", restrict=(("schedule", CYCLICAL),),
          note="tests 'longer is better' (longest vs shortest cycle); diminishing returns are not tested"),
    Claim("SC3", "LR range test stays accurate up to LR 3 for ResNet-56 (sign that super-convergence is possible)",
          "LR 0 -> 3 linearly over 5k/20k/100k it", '"remains consistently high"',
          "20k run: 74% @0.3, 80% @0.9-1.2, no divergence",
          kind="range_test", field="schedule", requires=(("schedule", ("range_test",)),),
          note="'stays accurate' = test accuracy at the largest LR within 10 points of the run's peak"),
    Claim("SC4", "Larger total batch sizes give better accuracy under super-convergence",
          "TBS 256/512/1000/1536 (32/64/125/192 per GPU x 8)", "direction only", "-",
          kind="trend", field="batch_size", restrict=(("schedule", CYCLICAL),)),
    Claim("SC5", "The advantage grows as training data shrinks", "50k/40k/30k/20k/10k training images",
          "table not confirmed",
          "CLR vs PC: 92.44/90.32, 91.10/90.43, 89.64/86.36, 87.92/62.33 (PC unstable, best 76.4), 80.59/71.20",
          kind="interaction", field="schedule", a=CYCLICAL, b=("multistep",), by="train_size",
          detail=(("train_size", 50000, "table not confirmed", "92.44 vs 90.32"),
                  ("train_size", 40000, "table not confirmed", "91.10 vs 90.43"),
                  ("train_size", 30000, "table not confirmed", "89.64 vs 86.36"),
                  ("train_size", 20000, "table not confirmed", "87.92 vs 62.33 (PC best 76.4)"),
                  ("train_size", 10000, "table not confirmed", "80.59 vs 71.20"))),
    Claim("SC6", "Large LRs regularize, so other regularization must be reduced: WD 1e-4 best for CLR 0.1-3",
          "WD 1e-3/1e-4/1e-5/1e-6", "-", "1e-3 diverged (9.95, best 65.9); 92.44; 88.28; 87.25",
          kind="best_level", field="weight_decay", a=(1e-4,), restrict=(("schedule", CYCLICAL),),
          note="claimed best level vs the best other level"),
    Claim("SC7", "Shallower and deeper nets also super-converge",
          "ResNet-20 (TBS 1000), ResNet-110 (TBS 800)", "R20 90.4 vs 88.6; R110 92.1 vs 91.0",
          "90.42 vs 88.64; 92.37 vs 91.21",
          requires=(("model", ("resnet20", "resnet110", "preact_resnet20", "preact_resnet110", "mlp", "small_cnn",
                               "preact_resnet56")),),
          detail=(("model", "resnet20", "R20 90.4 vs 88.6", "90.42 vs 88.64"),
                  ("model", "resnet110", "R110 92.1 vs 91.0", "92.37 vs 91.21")), **_CLR_VS_PC),
    Claim("SC8", "CIFAR-100 also super-converges", "ResNet-56, same schedules", "-", "CLR 68.20 vs PC 59.27",
          restrict=(("dataset", ("cifar100",)),), requires=(("dataset", ("cifar100",)),), **_CLR_VS_PC),
    Claim("SC9", "Momentum matters: 0.85-0.9 best with CLR", "momentum 0.80/0.85/0.90/0.95", "-",
          "91.86/92.29/92.44/90.74", kind="best_level", field="momentum", a=(0.85, 0.9),
          restrict=(("schedule", CYCLICAL), ("cycle_momentum", (False,))),
          note="constant momentum only (cycle_momentum false); claimed best levels vs the best other level"),
    Claim("SC10", "Adaptive optimizers do not super-converge like SGD",
          "Nesterov/Adam/AdaGrad/AdaDelta at PC 0.35 (Adam 0.0035); Nesterov+CLR", "-",
          "Nesterov PC 90.33, Nesterov CLR 92.47, Adam 87.15, AdaGrad 83.74, AdaDelta 70.97",
          kind="two_arm", field="optimizer", a=("sgd", "nesterov"), b=("adam", "adagrad", "adadelta"),
          detail=(("optimizer", "adam", "-", "Adam (PC) 87.15"), ("optimizer", "adagrad", "-", "AdaGrad (PC) 83.74"),
                  ("optimizer", "adadelta", "-", "AdaDelta (PC) 70.97"))),
    Claim("DA1", "Cyclical momentum 0.95->0.85 beats constant momentum under 1cycle",
          "ResNet-56, LR 0.08-0.8 SS 41 epochs, WD 1e-4, TBS 512, 95 epochs",
          "92.0 +- 0.2 vs 0.9 const 91.4, 0.95 const 92.1 +- 0.1", "91.91 (const 0.95)",
          kind="two_arm", field="cycle_momentum", a=(True,), b=(False,), restrict=(("schedule", CYCLICAL),),
          detail=(("momentum", 0.9, "92.0 +- 0.2 vs 91.4 (const 0.9)", "-"),
                  ("momentum", 0.95, "92.0 +- 0.2 vs 92.1 +- 0.1 (const 0.95)", "91.91 (const 0.95)"))),
    Claim("DA2", "At a fixed time budget, larger TBS gives higher test accuracy",
          "ResNet-56, TBS/epochs 128/48, 256/70, 512/95, 1024/116; max LR 0.4/0.4-0.6/0.8/1.0",
          "direction only", "-", kind="trend", field="batch_size", restrict=(("schedule", CYCLICAL),)),
    Claim("DA3", "Best weight decay is smaller with CLR than with a constant LR",
          "ResNet-56, const LR 0.1 prefers 1e-3..3e-4; 0.1-1 range prefers 1e-4", "-", "-",
          kind="best_shift", field="weight_decay", by="schedule", a=CYCLICAL, b=("constant",),
          note="best WD = the level with the highest median final accuracy in each schedule group"),
    Claim("DA4", "1cycle reaches in 1/4-1/8 of the epochs what a step schedule reaches",
          "C10 wide resnet, densenet, MNIST LeNet, C100 ResNet-56",
          "WRN 1cycle 50 ep 91.3 +- 0.1 vs step 800 ep 90.3 +- 1.0; densenet 50 ep 91.7 vs 100 ep 91.3; "
          "LeNet 12 ep 99.25 vs 85 ep 99.03; C100 ResNet-56 50 ep 66.4 vs 200 ep 61.6", "-",
          kind="two_arm", field="schedule", a=("one_cycle", "one_cycle_cos"), b=("multistep",),
          note="1cycle must use fewer steps than the step schedule (checked); accuracy compared"),
    Claim("CLR1", "CLR reaches a fixed LR's accuracy in far fewer iterations",
          'C10 (Caffe "full" net): 81.4% in 25k it vs 70k it', "81.4% in 25k it vs 70k it", "-",
          kind="two_arm", field="schedule", a=CYCLICAL, b=("constant",),
          metrics=(("steps_to_target", -1), ("final_acc", +1))),
]}


# ------------------------------------------------------------------------------------------------ verdicts
@dataclass
class Verdict:
    claim_id: str
    comparison: str                 # e.g. "one_cycle vs multistep @ batch_size=1000"
    statement: str
    paper: str
    log: str
    verdict: str                    # supported | contradicted | inconclusive | pipeline check
    would_be: str                   # the verdict the statistics give (differs from `verdict` at smoke scale)
    verdict_text: str
    measured: str                   # "we measured", one line
    evidence: str                   # test, n, scale, dataset/model, seeds, diverged/missed counts
    reason: str                     # why (for inconclusive: what is missing)
    metric: str
    direction: int
    a_label: str
    b_label: str
    n_a: int
    n_b: int
    median_a: float
    median_b: float
    diff: float
    ci_low: float
    ci_high: float
    p: float
    test: str
    rho: float = math.nan
    rho_p: float = math.nan
    scale: str = ""
    stratum: str = ""
    field: str = ""
    plot_x: str = ""
    plot_hue: str = ""
    cells: list = dc_field(default_factory=list)
    run_ids: list = dc_field(default_factory=list)
    secondary: list = dc_field(default_factory=list)

    def row(self) -> dict:
        d = asdict(self)
        d["cells"] = "; ".join(self.cells)
        d["run_ids"] = " ".join(self.run_ids)
        d["secondary"] = "; ".join(f"{s['metric']}: {s['would_be']} ({s['measured']})" for s in self.secondary)
        return d


@dataclass
class Evaluation:
    verdicts: list[Verdict]
    not_tested: list[tuple[str, str]]      # (claim id, why)
    scale: str
    requested: list[str]
    excluded: dict                          # status -> count of trials left out (error, running)
    n_trials: int


@dataclass
class _Arm:
    label: str
    rows: pd.DataFrame


# ------------------------------------------------------------------------------------------------ statistics
def _seed(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _median(x: np.ndarray, axis=None):
    return np.median(x, axis=axis)


def _sub(a, b):
    """a - b where inf - inf (both missed the target) counts as no difference."""
    with np.errstate(invalid="ignore"):
        d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return np.where(np.isnan(d), 0.0, d)


def bootstrap_median_diff(a, b, seed: int, n_boot: int = BOOTSTRAP) -> tuple[float, float, float]:
    """(median(a) - median(b), 2.5% and 97.5% percentiles of its bootstrap distribution)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    ma = _median(a[rng.integers(0, len(a), (n_boot, len(a)))], axis=1)
    mb = _median(b[rng.integers(0, len(b), (n_boot, len(b)))], axis=1)
    lo, hi = _ci(_sub(ma, mb))
    return float(_sub(np.median(a), np.median(b))), lo, hi


def _ci(boot: np.ndarray) -> tuple[float, float]:
    """95% percentile interval; no interpolation, so infinite differences (missed targets) stay infinite."""
    lo, hi = np.quantile(boot, [0.025, 0.975], method="inverted_cdf")
    return float(lo), float(hi)


def welch_p(a, b) -> float:
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2:
        return math.nan
    if np.ptp(a) < 1e-12 and np.ptp(b) < 1e-12:       # no spread at all: the difference is exact
        return 1.0 if abs(a.mean() - b.mean()) < 1e-12 else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return float(p) if np.isfinite(p) else 1.0


def mannwhitney_p(a, b) -> float:
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2:
        return math.nan
    if len(set(np.concatenate([a, b]).tolist())) == 1:
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)


def spearman(x, y) -> tuple[float, float]:
    from scipy import stats
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or len(set(y.tolist())) < 2:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = stats.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def decide(lo: float, hi: float, p: float, direction: int, ns: list[int]) -> tuple[str, str]:
    """The decision rule of the module docstring: (verdict, reason)."""
    if min(ns) < MIN_N:
        return "inconclusive", f"fewer than {MIN_N} trials in an arm (n = {' vs '.join(map(str, ns))})"
    claimed = lo > 0 if direction > 0 else hi < 0
    opposite = hi < 0 if direction > 0 else lo > 0
    if claimed and p < ALPHA:
        return "supported", "95% CI excludes 0 in the claimed direction and p < 0.05"
    if opposite and p < ALPHA:
        return "contradicted", "95% CI excludes 0 in the opposite direction and p < 0.05"
    if not (claimed or opposite):
        return "inconclusive", "95% CI includes 0"
    return "inconclusive", f"p = {p:.2g} >= 0.05"


# ------------------------------------------------------------------------------------------------ helpers
def _key(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "None"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _level_value(v) -> float:
    """Numeric position of a level for sorting and trends; None (e.g. train_size: full set) sorts last."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return math.inf
    if isinstance(v, bool):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def sorted_levels(values) -> list:
    """Distinct values in numeric order (then text): the order of levels in tables and figures."""
    uniq = {_key(v): v for v in values}
    return sorted(uniq.values(), key=lambda v: (math.isnan(_level_value(v)), _level_value(v), _key(v)))


def _fmt_level(f: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{f}=full" if f == "train_size" else f"{f}=None"
    if isinstance(v, float):
        return f"{f}={v:g}"
    return f"{f}={v}"


def _field_order(columns) -> list[str]:
    try:
        from harness.config import FIELDS
    except Exception:
        FIELDS = ()
    order = [f for f in PRIORITY_FIELDS] + [f for f in FIELDS if f not in PRIORITY_FIELDS]
    return [f for f in order if f in columns and f not in NOT_FACTORS]


def _varying(df: pd.DataFrame, exclude) -> list[str]:
    out = []
    for f in _field_order(df.columns):
        if f not in exclude and df[f].map(_key).nunique() > 1:
            out.append(f)
    return out


def split_fields(df: pd.DataFrame, compared: list[str]) -> tuple[list[str], list[str]]:
    """(strata, dependent): greedy, in `_field_order`; see the module docstring."""
    keys = df.apply(lambda col: col.map(_key)) if len(df) else df
    strata: list[str] = []
    dependent: list[str] = []
    for g in _varying(df, set(compared)):
        det = compared + strata
        if keys.groupby(det)[g].nunique().max() <= 1:
            dependent.append(g)
        else:
            strata.append(g)
    return strata, dependent


def _restrict(df: pd.DataFrame, restrict) -> pd.DataFrame:
    for f, allowed in restrict:
        if f in df.columns:
            df = df[df[f].map(_key).isin({_key(v) for v in allowed})]
    return df


def _stratum_combos(df: pd.DataFrame, strata: list[str]) -> list[dict]:
    if not strata:
        return [{}]
    combos = df[strata].drop_duplicates().to_dict("records")
    return sorted(combos, key=lambda c: [(_level_value(c[s]), _key(c[s])) for s in strata])


def _match(df: pd.DataFrame, combo: dict, skip=()) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    for f, v in combo.items():
        if f not in skip:
            mask &= df[f].map(_key) == _key(v)
    return df[mask]


def _stratum_label(combo: dict) -> str:
    return ", ".join(_fmt_level(f, v) for f, v in combo.items())


def _values(df: pd.DataFrame, metric: str) -> np.ndarray:
    return df[METRICS[metric][0]].astype(float).to_numpy()


def _fmt_value(metric: str, v: float) -> str:
    if metric == "final_acc":
        return "n/a" if not np.isfinite(v) else f"{100 * v:.2f}%"
    if v == math.inf:
        return "never"
    return "n/a" if not np.isfinite(v) else f"{v:,.0f}"


def _fmt_diff(metric: str, v: float) -> str:
    if metric == "final_acc":
        return f"{100 * v:+.2f} pp"
    if not np.isfinite(v):
        return "+inf" if v > 0 else "-inf"
    return f"{v:+,.0f}"


def _setup_text(df: pd.DataFrame) -> str:
    parts = []
    for f in ("dataset", "model"):
        if f in df.columns:
            parts.append("/".join(sorted({_key(v) for v in df[f]})))
    seeds = df.groupby("cell")["run_id"].count() if len(df) else pd.Series(dtype=int)
    if len(seeds):
        lo, hi = int(seeds.min()), int(seeds.max())
        parts.append(f"{lo} seeds/cell" if lo == hi else f"{lo}-{hi} seeds/cell")
    return " · ".join(parts)


def _outcome_counts(df: pd.DataFrame) -> str:
    div = int((df["status"] == "diverged").sum())
    miss = int(np.isinf(df["steps_to_target_eff"].astype(float)).sum()) - div
    parts = []
    if div:
        parts.append(f"{div} diverged")
    if miss:
        parts.append(f"{miss} missed target")
    return ", ".join(parts)


def _finish(claim: Claim, scale: str, df: pd.DataFrame, verdict: str, reason: str, **kw) -> Verdict:
    """Fill the presentation fields of a Verdict."""
    would_be = verdict
    if scale == "smoke":
        shown, text = "pipeline check", f"pipeline check (smoke scale): would be {verdict}"
    else:
        shown, text = verdict, verdict
    values = dict(kw.pop("values", {}))
    paper, log = claim.numbers_for(values)
    n = f"n = {kw['n_a']} vs {kw['n_b']}" if "n_a" in kw else ""
    test = kw.get("test", "")
    p = kw.get("p", math.nan)
    bits = [f"{scale} scale ({STRENGTH.get(scale, scale)})", _setup_text(df), n,
            f"{test} p = {p:.2g}" if test and np.isfinite(p) else ""]
    if np.isfinite(kw.get("rho", math.nan)):
        bits.append(f"Spearman rho = {kw['rho']:+.2f} (p = {kw['rho_p']:.2g})")
    counts = _outcome_counts(df)
    if counts:
        bits.append(counts)
    if claim.note:
        bits.append(claim.note)
    kw.setdefault("cells", sorted(df["cell"].unique().tolist()))
    kw.setdefault("run_ids", df["run_id"].tolist())
    return Verdict(claim_id=claim.id, statement=claim.statement, paper=paper, log=log, verdict=shown,
                   would_be=would_be, verdict_text=text, evidence=" · ".join(b for b in bits if b), reason=reason,
                   scale=scale, field=claim.field, **kw)


# ------------------------------------------------------------------------------------------------ comparisons
def _compare_arms(claim: Claim, scale: str, a: _Arm, b: _Arm, comparison: str, stratum: str, values: dict,
                  metrics=None, extra_measured: str = "", rho=(math.nan, math.nan), plot=("", ""),
                  context: pd.DataFrame | None = None) -> Verdict:
    metrics = metrics or claim.metrics
    results = []
    for metric, direction in metrics:
        va, vb = _values(a.rows, metric), _values(b.rows, metric)
        seed = _seed(claim.id, comparison, metric)
        diff, lo, hi = bootstrap_median_diff(va, vb, seed)
        if metric == "final_acc":
            p, test = welch_p(va, vb), "Welch t"
        else:
            p, test = mannwhitney_p(va, vb), "Mann-Whitney U"
        verdict, reason = decide(lo, hi, p, direction, [len(va), len(vb)])
        ma, mb = float(np.median(va)), float(np.median(vb))
        measured = (f"{METRICS[metric][1]}: {a.label} {_fmt_value(metric, ma)} vs {b.label} {_fmt_value(metric, mb)} "
                    f"(diff {_fmt_diff(metric, diff)}, 95% CI [{_fmt_diff(metric, lo)}, {_fmt_diff(metric, hi)}])")
        results.append({"metric": metric, "direction": direction, "verdict": verdict, "reason": reason, "diff": diff,
                        "lo": lo, "hi": hi, "p": p, "test": test, "ma": ma, "mb": mb, "measured": measured,
                        "n": (len(va), len(vb))})
    main = results[0]
    verdict, reason = main["verdict"], main["reason"]
    if np.isfinite(rho[0]) and verdict == "supported" and rho[0] * main["direction"] <= 0:
        verdict, reason = "inconclusive", "extremes differ as claimed but the Spearman trend does not agree"
    secondary = []
    for r in results[1:]:
        secondary.append({"metric": r["metric"], "would_be": r["verdict"], "measured": r["measured"], "p": r["p"],
                          "test": r["test"]})
        if r["verdict"] == "contradicted" and verdict != "contradicted":
            verdict, reason = "contradicted", f"{METRICS[r['metric']][1]} contradicts the claim"
        elif r["verdict"] == "inconclusive" and verdict == "supported":
            reason += f"; {METRICS[r['metric']][1]} inconclusive ({r['reason']})"
    measured = "; ".join(r["measured"] for r in results) + extra_measured
    rows = context if context is not None else pd.concat([a.rows, b.rows])
    return _finish(claim, scale, rows, verdict, reason, comparison=comparison, measured=measured,
                   metric=main["metric"], direction=main["direction"], a_label=a.label, b_label=b.label,
                   n_a=main["n"][0], n_b=main["n"][1], median_a=main["ma"], median_b=main["mb"], diff=main["diff"],
                   ci_low=main["lo"], ci_high=main["hi"], p=main["p"], test=main["test"], rho=rho[0], rho_p=rho[1],
                   stratum=stratum, secondary=secondary, values=values, plot_x=plot[0], plot_hue=plot[1])


def _arm_pairs(claim: Claim, df: pd.DataFrame) -> list[tuple]:
    present = {_key(v): v for v in df[claim.field]}
    a_vals = [v for v in claim.a if _key(v) in present]
    b_vals = [v for v in claim.b if _key(v) in present]
    return [(av, bv) for av in a_vals for bv in b_vals]


def _eval_two_arm(claim: Claim, df: pd.DataFrame, scale: str):
    pairs = _arm_pairs(claim, df)
    if not pairs:
        have = ", ".join(sorted({_key(v) for v in df[claim.field]})) or "none"
        return f"needs {claim.field} in {{{', '.join(map(_key, claim.a))}}} and in " \
               f"{{{', '.join(map(_key, claim.b))}}}; the study has {have}"
    out = []
    for av, bv in pairs:
        both = df[df[claim.field].map(_key).isin([_key(av), _key(bv)])]
        strata, _ = split_fields(both, [claim.field])
        arm_a = both[both[claim.field].map(_key) == _key(av)]
        arm_b = both[both[claim.field].map(_key) == _key(bv)]
        skip_a = _shared(arm_a, strata, claim.field, av)
        skip_b = _shared(arm_b, strata, claim.field, bv)
        for combo in _stratum_combos(both, strata):
            ra, rb = _match(arm_a, combo, skip_a), _match(arm_b, combo, skip_b)
            if ra.empty or rb.empty:
                continue
            if claim.id == "DA4" and "steps" in df.columns and not (ra["steps"].max() < rb["steps"].min()):
                continue
            la, lb = _arm_label(claim.field, av), _arm_label(claim.field, bv)
            # a shared arm's partner carries its own level of that field, e.g. "False (momentum=0.95)"
            lb += "".join(f" ({_fmt_level(s, combo[s])})" for s in strata if s in skip_a)
            la += "".join(f" ({_fmt_level(s, combo[s])})" for s in strata if s in skip_b)
            stratum = _stratum_label({s: v for s, v in combo.items() if s not in skip_a | skip_b})
            comparison = f"{la} vs {lb}" + (f" @ {stratum}" if stratum else "")
            values = {claim.field: bv, **combo}
            hue = next((s for s in strata if s not in skip_a and s not in skip_b), "")
            out.append(_compare_arms(claim, scale, _Arm(la, ra), _Arm(lb, rb), comparison, stratum, values,
                                     extra_measured=_covary_text(ra, rb, both, claim.field),
                                     plot=(claim.field, hue)))
    return out or f"no stratum has both arms of {claim.field} with trials"


def _arm_label(f: str, v) -> str:
    return _key(v) if f in ("schedule", "optimizer", "model", "dataset") else _fmt_level(f, v)


def _shared(arm: pd.DataFrame, strata: list[str], f: str, value) -> set[str]:
    """Stratum fields that do not apply to this arm and have a single value in it (the arm is shared)."""
    na = NOT_APPLICABLE.get((f, value), set())
    return {s for s in strata if s in na and arm[s].map(_key).nunique() == 1}


def _covary_text(ra: pd.DataFrame, rb: pd.DataFrame, both: pd.DataFrame, f: str) -> str:
    """The fields that differ between the two arms besides the compared one (their paired settings)."""
    diffs = []
    na = set()
    for rows in (ra, rb):
        if f in rows.columns and rows[f].map(_key).nunique() == 1:
            na |= NOT_APPLICABLE.get((f, rows[f].iloc[0]), set())
    for g in ("steps", "max_lr", "base_lr", "stepsize", "batch_size"):
        if g in both.columns and g != f and g not in na:
            va, vb = ra[g].map(_key).unique(), rb[g].map(_key).unique()
            if len(va) == 1 and len(vb) == 1 and va[0] != vb[0]:
                diffs.append(f"{g} {va[0]} vs {vb[0]}")
    return f" [arms also differ: {', '.join(diffs)}]" if diffs else ""


def _eval_trend(claim: Claim, df: pd.DataFrame, scale: str):
    f = claim.field
    if df[f].map(_key).nunique() < 2:
        have = ", ".join(sorted({_key(v) for v in df[f]})) or "none"
        return f"needs at least 2 levels of {f}; the study has {have}"
    strata, _ = split_fields(df, [f])
    out = []
    for combo in _stratum_combos(df, strata):
        rows = _match(df, combo)
        levels = sorted_levels(rows[f])
        if len(levels) < 2:
            continue
        lo_v, hi_v = levels[0], levels[-1]
        ra = rows[rows[f].map(_key) == _key(hi_v)]
        rb = rows[rows[f].map(_key) == _key(lo_v)]
        x = rows[f].map(_level_value).to_numpy()
        if np.isinf(x).any():
            x = np.where(np.isinf(x), np.nanmax(x[np.isfinite(x)]) * 2 if np.isfinite(x).any() else 1, x)
        rho = spearman(x, _values(rows, "final_acc"))
        stratum = _stratum_label(combo)
        la, lb = _fmt_level(f, hi_v), _fmt_level(f, lo_v)
        comparison = f"largest vs smallest {f}: {la.split('=')[1]} vs {lb.split('=')[1]}" + \
            (f" @ {stratum}" if stratum else "")
        medians = rows.groupby(rows[f].map(_key))[METRICS["final_acc"][0]].median()
        trend = ", ".join(f"{_key(v)}: {100 * medians[_key(v)]:.2f}%" for v in levels)
        out.append(_compare_arms(claim, scale, _Arm(la, ra), _Arm(lb, rb), comparison, stratum,
                                 {f: hi_v, **combo}, metrics=(("final_acc", +1),),
                                 extra_measured=f"; medians by {f}: {trend}", rho=rho,
                                 plot=(f, strata[0] if strata else ""), context=rows))
    return out or f"no stratum has 2 levels of {f}"


def _eval_best_level(claim: Claim, df: pd.DataFrame, scale: str):
    f = claim.field
    claimed = {_key(v) for v in claim.a}
    present = {_key(v) for v in df[f]}
    if not (claimed & present) or not (present - claimed):
        return f"needs {f} at a claimed best level ({', '.join(sorted(claimed))}) and at another level; " \
               f"the study has {', '.join(sorted(present)) or 'none'}"
    strata, _ = split_fields(df, [f])
    out = []
    col = METRICS["final_acc"][0]
    for combo in _stratum_combos(df, strata):
        rows = _match(df, combo)
        med = rows.groupby(rows[f].map(_key))[col].median()
        cand_a = [k for k in med.index if k in claimed]
        cand_b = [k for k in med.index if k not in claimed]
        if not cand_a or not cand_b:
            continue
        ka = max(cand_a, key=lambda k: med[k])
        kb = max(cand_b, key=lambda k: med[k])
        ra, rb = rows[rows[f].map(_key) == ka], rows[rows[f].map(_key) == kb]
        stratum = _stratum_label(combo)
        la, lb = f"{f}={ka} (claimed best)", f"{f}={kb} (best other)"
        comparison = f"{f} {ka} vs {kb}" + (f" @ {stratum}" if stratum else "")
        levels = sorted_levels(rows[f])
        trend = ", ".join(f"{_key(v)}: {100 * med[_key(v)]:.2f}%" for v in levels)
        v = _compare_arms(claim, scale, _Arm(la, ra), _Arm(lb, rb), comparison, stratum, combo,
                          metrics=(("final_acc", +1),), extra_measured=f"; medians by {f}: {trend}",
                          plot=(f, strata[0] if strata else ""), context=rows)
        out.append(v)
    return out or f"no stratum has both a claimed and another level of {f}"


def _boot_p(boot: np.ndarray) -> float:
    """Two-sided bootstrap sign p-value: 2 x the smaller tail mass at 0 (add-one smoothed)."""
    n = len(boot)
    tail = min((boot <= 0).sum(), (boot >= 0).sum())
    return float(min(1.0, 2 * (tail + 1) / (n + 1)))


def _eval_interaction(claim: Claim, df: pd.DataFrame, scale: str):
    f, g = claim.field, claim.by
    if g not in df.columns:
        return f"needs {g} to vary"
    pairs = _arm_pairs(claim, df)
    if not pairs or df[g].map(_key).nunique() < 2:
        return f"needs {f} in both {{{', '.join(map(_key, claim.a))}}} and {{{', '.join(map(_key, claim.b))}}} " \
               f"at 2 or more levels of {g}"
    col = METRICS["final_acc"][0]
    out = []
    for av, bv in pairs:
        both = df[df[f].map(_key).isin([_key(av), _key(bv)])]
        strata, _ = split_fields(both, [f, g])
        for combo in _stratum_combos(both, strata):
            rows = _match(both, combo)
            levels = [lv for lv in sorted_levels(rows[g])
                      if {_key(av), _key(bv)} <= set(rows[rows[g].map(_key) == _key(lv)][f].map(_key))]
            if len(levels) < 2:
                continue
            small, large = levels[0], levels[-1]

            def cell(arm, lv, rows=rows):
                return rows[(rows[f].map(_key) == _key(arm)) & (rows[g].map(_key) == _key(lv))][col].astype(float)

            cells = [cell(av, small).to_numpy(), cell(bv, small).to_numpy(), cell(av, large).to_numpy(),
                     cell(bv, large).to_numpy()]
            rng = np.random.default_rng(_seed(claim.id, _key(av), _key(bv), _stratum_label(combo)))
            boots = [np.median(c[rng.integers(0, len(c), (BOOTSTRAP, len(c)))], axis=1) for c in cells]
            boot = (boots[0] - boots[1]) - (boots[2] - boots[3])
            meds = [float(np.median(c)) for c in cells]
            diff = (meds[0] - meds[1]) - (meds[2] - meds[3])
            lo, hi = _ci(boot)
            p = _boot_p(boot)
            verdict, reason = decide(lo, hi, p, +1, [len(c) for c in cells])
            adv = []
            for lv in levels:
                ma = cell(av, lv).median()
                mb = cell(bv, lv).median()
                adv.append(f"{_fmt_level(g, lv).split('=')[1]}: {100 * (ma - mb):+.2f} pp")
            measured = (f"advantage of {_key(av)} over {_key(bv)} (median final accuracy) by {g}: {', '.join(adv)}; "
                        f"smallest minus largest {g}: {100 * diff:+.2f} pp, 95% CI [{100 * lo:+.2f}, {100 * hi:+.2f}]")
            stratum = _stratum_label(combo)
            comparison = f"{_key(av)} - {_key(bv)} advantage at {g} {_fmt_level(g, small).split('=')[1]} vs " \
                         f"{_fmt_level(g, large).split('=')[1]}" + (f" @ {stratum}" if stratum else "")
            used = rows[rows[g].map(_key).isin([_key(lv) for lv in levels])]
            out.append(_finish(claim, scale, used, verdict, reason, comparison=comparison, measured=measured,
                               metric="final_acc", direction=+1, a_label=f"{g}={_key(small)}",
                               b_label=f"{g}={_key(large)}", n_a=min(len(cells[0]), len(cells[1])),
                               n_b=min(len(cells[2]), len(cells[3])), median_a=meds[0] - meds[1],
                               median_b=meds[2] - meds[3], diff=diff, ci_low=lo, ci_high=hi, p=p,
                               test="bootstrap (difference of differences)", stratum=stratum, values=combo,
                               plot_x=g, plot_hue=f))
    return out or f"no stratum has both arms at 2 levels of {g}"


def _eval_best_shift(claim: Claim, df: pd.DataFrame, scale: str):
    f, g = claim.field, claim.by
    col = METRICS["final_acc"][0]
    if g not in df.columns:
        return f"needs {g} to vary"
    g1 = df[df[g].map(_key).isin({_key(v) for v in claim.a})]
    g2 = df[df[g].map(_key).isin({_key(v) for v in claim.b})]
    if g1[f].map(_key).nunique() < 2 or g2[f].map(_key).nunique() < 2:
        return f"needs at least 2 levels of {f} under both a cyclical schedule and {', '.join(claim.b)}"
    levels = sorted_levels(pd.concat([g1[f], g2[f]]))
    pos = {_key(v): i for i, v in enumerate(levels)}
    rng = np.random.default_rng(_seed(claim.id, f, g))

    def best(group: pd.DataFrame):
        keys = sorted(group[f].map(_key).unique(), key=lambda k: pos[k])
        vals = [group[group[f].map(_key) == k][col].astype(float).to_numpy() for k in keys]
        point = keys[int(np.argmax([np.median(v) for v in vals]))]
        boot_meds = np.stack([np.median(v[rng.integers(0, len(v), (BOOTSTRAP, len(v)))], axis=1) for v in vals])
        boot = np.array([pos[keys[i]] for i in np.argmax(boot_meds, axis=0)])
        return point, boot, min(len(v) for v in vals)

    b1, boot1, n1 = best(g1)
    b2, boot2, n2 = best(g2)
    boot = (boot1 - boot2).astype(float)
    diff = float(pos[b1] - pos[b2])
    lo, hi = _ci(boot)
    p = _boot_p(boot)
    verdict, reason = decide(lo, hi, p, -1, [n1, n2])
    measured = (f"best {f}: {b1} with {'/'.join(sorted({_key(v) for v in g1[g]}))} vs {b2} with "
                f"{'/'.join(sorted({_key(v) for v in g2[g]}))} (difference in grid positions {diff:+.0f}, "
                f"95% CI [{lo:+.0f}, {hi:+.0f}]; levels {', '.join(_key(v) for v in levels)})")
    used = pd.concat([g1, g2])
    return [_finish(claim, scale, used, verdict, reason, comparison=f"best {f}: cyclical vs {', '.join(claim.b)}",
                    measured=measured, metric="final_acc", direction=-1, a_label=f"best {f} (cyclical) {b1}",
                    b_label=f"best {f} ({', '.join(claim.b)}) {b2}", n_a=n1, n_b=n2, median_a=pos[b1],
                    median_b=pos[b2], diff=diff, ci_low=lo, ci_high=hi, p=p, test="bootstrap (argmax level)",
                    plot_x=f, plot_hue=g)]


RANGE_DROP = 0.10   # SC3: "stays accurate" = accuracy at the largest LR at most 10 points below the run's peak


def _eval_range_test(claim: Claim, df: pd.DataFrame, scale: str, curves: pd.DataFrame | None):
    from scipy import stats
    rt = df[df["schedule"].map(_key) == "range_test"] if "schedule" in df.columns else df.iloc[0:0]
    if rt.empty:
        return "needs range_test trials"
    if curves is None or curves.empty:
        return "needs the range test's test-accuracy curves (none logged)"
    strata, _ = split_fields(rt, ["schedule"])
    out = []
    for combo in _stratum_combos(rt, strata):
        rows = _match(rt, combo)
        drops, lr_top = [], []
        for rid in rows["run_id"]:
            c = curves[curves["run_id"] == rid].dropna(subset=["test_acc"]).sort_values("step")
            if c.empty:
                continue
            drops.append(float(c["test_acc"].max() - c["test_acc"].iloc[-1]))
            lr_top.append(float(c["lr"].max()))
        if not drops:
            continue
        d = np.asarray(drops)
        rng = np.random.default_rng(_seed(claim.id, _stratum_label(combo)))
        boot = np.median(d[rng.integers(0, len(d), (BOOTSTRAP, len(d)))], axis=1)
        lo, hi = _ci(boot)
        margin = RANGE_DROP - d       # > 0: stays accurate
        if len(d) < 2:
            p = math.nan
        elif np.ptp(d) < 1e-12:
            p = 0.0 if abs(margin[0]) > 1e-12 else 1.0
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = float(stats.ttest_1samp(margin, 0.0).pvalue)
        verdict, reason = decide(RANGE_DROP - hi, RANGE_DROP - lo, p, +1, [len(d)])
        stratum = _stratum_label(combo)
        measured = (f"accuracy lost between the peak and the largest LR ({max(lr_top):g}): median "
                    f"{100 * np.median(d):.1f} points, 95% CI [{100 * lo:.1f}, {100 * hi:.1f}] "
                    f"(threshold {100 * RANGE_DROP:.0f})")
        out.append(_finish(claim, scale, rows, verdict, reason, comparison="LR range test" +
                           (f" @ {stratum}" if stratum else ""), measured=measured, metric="range_drop",
                           direction=-1, a_label="drop", b_label=f"threshold {RANGE_DROP}", n_a=len(d), n_b=len(d),
                           median_a=float(np.median(d)), median_b=RANGE_DROP, diff=float(np.median(d) - RANGE_DROP),
                           ci_low=lo - RANGE_DROP, ci_high=hi - RANGE_DROP, p=p, test="one-sample t",
                           stratum=stratum, values=combo, plot_x="lr", plot_hue=strata[0] if strata else ""))
    return out or "no range test trial has a test-accuracy curve"


# ------------------------------------------------------------------------------------------------ entry points
def usable_trials(trials: pd.DataFrame, scale: str | None = None) -> tuple[pd.DataFrame, str, dict]:
    """(trials the verdicts use, the scale they are at, counts of excluded trials by status)."""
    if "scale" in trials.columns and trials["scale"].notna().any():
        present = [s for s in SCALE_ORDER if s in set(trials["scale"])]
        scale = scale or (present[-1] if present else str(trials["scale"].iloc[0]))
        at_scale = trials[trials["scale"] == scale]
    else:
        scale, at_scale = scale or "unknown", trials
    excluded = at_scale[~at_scale["status"].isin(["completed", "diverged"])]["status"].value_counts().to_dict()
    use = at_scale[at_scale["status"].isin(["completed", "diverged"]) & at_scale["outcome_acc"].notna()]
    return use, scale, excluded


def evaluate_claim(claim: Claim, trials: pd.DataFrame, scale: str, curves: pd.DataFrame | None = None):
    """list[Verdict], or a string saying why the claim is not tested by these trials."""
    df = trials
    for f, values in claim.requires:
        if f not in df.columns or not df[f].map(_key).isin({_key(v) for v in values}).any():
            return f"needs {f} in {{{', '.join(map(_key, values))}}}"
    if claim.field not in df.columns:
        return f"needs the field {claim.field}"
    df = _restrict(df, claim.restrict)
    if df.empty:
        return "no trial matches " + ", ".join(f"{f} in {{{', '.join(map(_key, v))}}}" for f, v in claim.restrict)
    if claim.kind == "two_arm":
        return _eval_two_arm(claim, df, scale)
    if claim.kind == "trend":
        return _eval_trend(claim, df, scale)
    if claim.kind == "best_level":
        return _eval_best_level(claim, df, scale)
    if claim.kind == "interaction":
        return _eval_interaction(claim, df, scale)
    if claim.kind == "best_shift":
        return _eval_best_shift(claim, df, scale)
    if claim.kind == "range_test":
        return _eval_range_test(claim, df, scale, curves)
    raise ValueError(f"unknown claim kind {claim.kind}")


def requested_claims(parents: list[dict]) -> list[str]:
    ids: list[str] = []
    for p in parents:
        for c in str(p.get("tags", {}).get("harness.claims", "")).split(","):
            c = c.strip()
            if c and c not in ids:
                ids.append(c)
    return ids


def evaluate(results, claim_ids: list[str] | None = None) -> Evaluation:
    """Verdicts for a StudyResults: the claims its parent run names (or `claim_ids`, or all)."""
    requested = claim_ids or requested_claims(results.parents)
    return evaluate_frame(results.trials, results.curves, requested)


def evaluate_frame(trials: pd.DataFrame, curves: pd.DataFrame | None = None,
                   claim_ids: list[str] | None = None, scale: str | None = None) -> Evaluation:
    use, scale, excluded = usable_trials(trials, scale)
    ids = list(claim_ids) if claim_ids else list(CLAIMS)
    verdicts, not_tested = [], []
    for cid in ids:
        claim = CLAIMS.get(cid)
        if claim is None:
            not_tested.append((cid, f"unknown claim ID; known: {', '.join(CLAIMS)}"))
            continue
        if use.empty:
            not_tested.append((cid, "no completed or diverged trials"))
            continue
        res = evaluate_claim(claim, use, scale, curves)
        if isinstance(res, str):
            not_tested.append((cid, res))
        else:
            verdicts.extend(res)
    return Evaluation(verdicts=verdicts, not_tested=not_tested, scale=scale, requested=ids, excluded=excluded,
                      n_trials=len(use))
