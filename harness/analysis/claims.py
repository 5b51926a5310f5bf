"""The claims registry and the statistics behind each verdict of a study's analysis plan.

Every claim of the paper (IDs SC1..SC10, DA1..DA4, CLR1) is a `Claim`: its statement, setup, the paper's
number and the authors' log number (transcribed as data: the report prints them beside ours). What a study
compares is NOT inferred here: each study declares its comparisons in its file (`analysis:`, harness/plan.py),
`--dry-run` pre-registers them, and `plan_verdicts` evaluates exactly those on the study's runs.

Which trials: those at the study's largest scale (smoke < quick < paper) whose status is completed or
diverged. Diverged trials and trials that missed the target COUNT (as in AlgoPerf): a diverged trial's
accuracy is its real final accuracy, and a miss is an infinite steps-to-target. Errored and still-running
trials are excluded and reported.

Tuning (harness/plan.py): with `best_on_validation`, each unit of an arm (one seed of one configuration)
contributes the LR scale whose final validation accuracy is best; its TEST metric is what is compared.

Decision rule (the same for every comparison; ALPHA = 0.05, MIN_N = 5): the evidence is a pair of bounds on the
difference (arm A - arm B) and a test; supported when the bounds exclude 0 on the claimed side and p < ALPHA,
contradicted when they exclude 0 on the opposite side and p < ALPHA, inconclusive otherwise (the reason is given).
What the bounds and the test are depends on how many units (seeds after tuning) each arm has:
  * n >= MIN_N in every arm: the difference of medians with a 95% percentile-bootstrap interval from BOOTSTRAP
    resamples of the units within each arm (seeded from the comparison, so reports are reproducible), and
    Welch's t-test for accuracies, Mann-Whitney U for steps-to-target (a miss is +inf, which ranks last), a
    bootstrap sign p-value for contrasts of contrasts (interaction, best_shift), a one-sample t-test against the
    threshold for the LR range test. No Welch, Mann-Whitney or one-sample t test runs on an arm whose units all
    have the same value ("no ... test: an arm has no spread": its variance estimate of 0 would make any difference
    look certain); a permutation test (below) takes its place;
  * 2 <= n < MIN_N: no interval (a bootstrap of 3 or 4 units has a handful of distinct resamples, and its
    "95%" interval is the range of their medians). Instead, labelled as such: the range of the per-seed
    differences (paired by seed where both arms have one unit per seed and the same seeds, else every pair of
    units), and an exact permutation test (scipy.stats.permutation_test, which enumerates every split of the
    units when there are at most EXACT_MAX) on the difference of MEANS for accuracies, of mean RANKS for
    steps-to-target. Means, not medians: the median of 3 or 4 units moves only with its middle values, so its
    permutation distribution is a few tied values, while the mean uses every unit and is what Welch's test is
    about at larger n; ranks for steps because a miss is +inf, which only ranks can weigh (Mann-Whitney's
    statistic). With 3 vs 3 units the smallest p any exact test can give is 2/20 = 0.1, so such a comparison is
    never supported; the reason says so. Contrasts of contrasts and range tests get an exact sign-flip test on
    the per-seed contrasts (per-run margins) when the units pair up by seed, else no test;
  * n < 2 in an arm: nothing but the per-seed values and the observed direction; inconclusive.
Trends also need Spearman's rho over all levels to have the claimed sign to be supported; no rho is computed on
fewer than MIN_LEVELS distinct levels (with 2 levels it only restates the two-arm difference).
Non-inferiority (kind non_inferior, a declared margin in the metric's unit): supported when the lower bound of
the evidence for "A better than B" (the 95% CI at n >= MIN_N; below, the worst per-seed difference) is above
-margin; contradicted when its upper bound is below -margin (A clearly worse by more than the margin); else
inconclusive. Below MIN_N this is a description of the seeds at hand, not a confidence statement, and is labelled.
Controls (`expect: no_difference`): the verdict above is computed as for any comparison, and `expectation` adds
whether the control held: failed when that verdict is supported or contradicted or when every per-seed difference
(interaction: contrast) is non-zero with one sign, held otherwise, not tested below 2 units (harness/plan.py).
Metrics read from the curves (max_acc_drop, evals_below_chance, dead_output_frac, min_class_recall) are per-run
numbers (harness.analysis.results.curve_outcomes) and go through the same rule as accuracies.
A smoke-scale study never yields more than "pipeline check (smoke scale): would be <verdict>".
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field

import numpy as np
import pandas as pd

from harness import names
from harness import plan as plans
from harness.plan import Comparison, fmt, key, level_value

ALPHA = 0.05
MIN_N = 5           # units per arm below which no interval is shown (per-seed differences and an exact test instead)
MIN_LEVELS = 3      # distinct levels below which no rank correlation is computed
EXACT_MAX = 200_000  # splits an exact permutation test enumerates at most; beyond, PERMUTATIONS seeded random ones
PERMUTATIONS = 9999
BOOTSTRAP = 2000
SCALE_ORDER = ("smoke", "quick", "paper")
STRENGTH = {"smoke": "none: pipeline check only", "quick": "indicative: reduced setup",
            "paper": "full: the paper's setup"}
COLUMN = {"final_acc": "outcome_acc", "steps_to_target": "steps_to_target_eff",   # metric -> trials column it reads
          "max_acc_drop": "max_acc_drop", "evals_below_chance": "evals_below_chance",  # these four: from the curves
          "dead_output_frac": "final_dead_output_frac", "min_class_recall": "final_min_class_recall"}
EQUAL_TIME = 0.10   # equal_time comparisons: arms whose median training seconds differ by more got unequal time
DECISION_RULE = (  # the rule of the module docstring in one paragraph, for the report's method section
    f"Decision rule: for each comparison, the difference of medians (arm A - arm B). With at least {MIN_N} units "
    f"(seeds after tuning) per arm: a 95% percentile-bootstrap interval ({BOOTSTRAP} resamples of the units in each "
    f"arm, seeded) and a test (Welch t for accuracy, Mann-Whitney U for steps-to-target, where a miss counts as "
    f"infinitely many steps; on an arm whose units all have the same value neither runs, and a permutation test "
    f"takes its place). With 2 to {MIN_N - 1} units per arm: no interval; the range of the per-seed differences "
    f"(paired by seed where the arms share seeds) and an exact permutation test over every split of the units (of "
    f"the difference of means for accuracy, of mean ranks for steps), which cannot give p below 0.05 with 3 vs 3 "
    f"units. Supported: the interval (or every per-seed difference) excludes 0 in the claimed direction and "
    f"p < {ALPHA}. Contradicted: the same in the opposite direction. Otherwise inconclusive. Trends also need "
    f"Spearman's rho in the claimed direction (computed on {MIN_LEVELS} or more levels only). Non-inferiority "
    f"(A not worse than B by more than a declared margin): supported when the worse end of the interval (below "
    f"{MIN_N} units: the worst per-seed difference) is within the margin, contradicted when the better end is "
    f"beyond it. A control (no difference expected) failed when the rule finds a difference or every per-seed "
    f"difference has the same sign, and held otherwise. Diverged trials count with their real final accuracy; "
    f"errored trials are excluded and listed. A smoke-scale study only checks the pipeline.")
# SC3, the LR range test's rule. "Stays accurate" = the smoothed test accuracy at the high-LR end of the ramp is at
# most RANGE_DROP below the accuracy at the reference LRs. Every window is a fraction of the ramp's top LR (3 in the
# paper), so the rule reads a 5k, 20k or 100k ramp alike:
#   reference = median test accuracy of the evaluations at LR in RANGE_REF x top LR ([0.3, 1.2]: the paper's 20k log
#               reads 74% at 0.3 and 80% at 0.9-1.2);
#   smoothed  = at each evaluation, the median of the evaluations within +- RANGE_SMOOTH x top LR (+- 0.25: a sixth
#               of the ramp, 8 evaluations of the 5k log, 33 of the 20k, 166 of the 100k; cut at the ramp's ends);
#   high end  = the LOWEST smoothed accuracy at LR in RANGE_END x top LR ([2, 3]), so a collapse or a divergence
#               anywhere there counts, while one noisy evaluation moves a median of 8+ by little;
#   drop      = reference - high end; a run that stopped before the high-LR window (diverged) has its final
#               accuracy as its high end.
# Calibration on the authors' logs (harness/analysis/reference/, tests/test_range_rule.py):
#   range3Iter5kFig2b   reference 72.79%, high end 68.81% (LR 2.88): drop  3.98 points
#   range3Iter20kFig2b  reference 77.44%, high end 71.03% (LR 2.15): drop  6.41 points
#   range3Iter100kFig2b reference 80.96%, high end 73.48% (LR 2.99): drop  7.48 points
# (the old rule, peak minus the last evaluation, gave 14.2 points on the 100k log, which the paper calls
# "consistently high"). RANGE_DROP = 15 points leaves 7.5 points of room above the worst of the three, and a run
# that falls to chance (10%) at LR 1.5 drops about 60 points.
RANGE_DROP = 0.15
RANGE_REF = (0.1, 0.4)
RANGE_END = (2 / 3, 1.0)
RANGE_SMOOTH = 1 / 12


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    setup: str
    paper: str                      # the number printed in the paper (claims.md, column "paper")
    log: str                        # the number read from the authors' logs (claims.md, column "log")
    detail: tuple = ()              # ((field, value, paper text, log text), ...) for one stratum or arm

    def numbers_for(self, values: dict) -> tuple[str, str]:
        """(paper, log) text for a comparison whose arms/stratum have these field values."""
        for f, v, paper, log in self.detail:
            if f in values and key(values[f]) == key(v):
                return paper, log
        return self.paper, self.log


QUESTION = Claim("question", "The study's own question", "as the study file says", "-", "-")

# Numbers below are transcribed from the paper's claims table ("paper" and "log" columns).
CLAIMS: dict[str, Claim] = {c.id: c for c in [
    Claim("SC1", "Super-convergence: one CLR cycle reaches higher accuracy in 1/8 of the iterations of PC-LR",
          "C10, ResNet-56, batch 1000; CLR 0.1-3 SS 5k 10k it vs PC-LR 0.35 80k it",
          "CLR 92.4 vs PC 91.2", "92.44 vs 90.32 (PC first >=90% at 71.1k, CLR at 9.5k)"),
    Claim("SC2", "Cycle length: longer cycles help, with diminishing returns",
          "CLR 0.1-3, SS 1k/3k/5k/10k (2k/6k/10k/20k it)", "89.7 @2k, 92.1 @6k, 92.4 @10k, 92.7 @20k", "-"),
    Claim("SC3", "LR range test stays accurate up to LR 3 for ResNet-56 (sign that super-convergence is possible)",
          "LR 0 -> 3 linearly over 5k/20k/100k it", '"remains consistently high"',
          "20k run: 74% @0.3, 80% @0.9-1.2, no divergence"),
    Claim("SC4", "Larger total batch sizes give better accuracy under super-convergence",
          "TBS 256/512/1000/1536 (32/64/125/192 per GPU x 8)", "direction only", "-"),
    Claim("SC5", "The advantage grows as training data shrinks", "50k/40k/30k/20k/10k training images",
          "table not confirmed",
          "CLR vs PC: 92.44/90.32, 91.10/90.43, 89.64/86.36, 87.92/62.33 (PC unstable, best 76.4), 80.59/71.20",
          detail=(("train_size", 50000, "table not confirmed", "92.44 vs 90.32"),
                  ("train_size", 40000, "table not confirmed", "91.10 vs 90.43"),
                  ("train_size", 30000, "table not confirmed", "89.64 vs 86.36"),
                  ("train_size", 20000, "table not confirmed", "87.92 vs 62.33 (PC best 76.4)"),
                  ("train_size", 10000, "table not confirmed", "80.59 vs 71.20"))),
    Claim("SC6", "Large LRs regularize, so other regularization must be reduced: WD 1e-4 best for CLR 0.1-3",
          "WD 1e-3/1e-4/1e-5/1e-6", "-", "1e-3 diverged (9.95, best 65.9); 92.44; 88.28; 87.25"),
    Claim("SC7", "Shallower and deeper nets also super-converge",
          "ResNet-20 (TBS 1000), ResNet-110 (TBS 800)", "R20 90.4 vs 88.6; R110 92.1 vs 91.0",
          "90.42 vs 88.64; 92.37 vs 91.21",
          detail=(("model", "resnet20", "R20 90.4 vs 88.6", "90.42 vs 88.64"),
                  ("model", "resnet110", "R110 92.1 vs 91.0", "92.37 vs 91.21"))),
    Claim("SC8", "CIFAR-100 also super-converges", "ResNet-56, same schedules", "-", "CLR 68.20 vs PC 59.27"),
    Claim("SC9", "Momentum matters: 0.85-0.9 best with CLR", "momentum 0.80/0.85/0.90/0.95", "-",
          "91.86/92.29/92.44/90.74"),
    Claim("SC10", "Adaptive optimizers do not super-converge like SGD",
          "Nesterov/Adam/AdaGrad/AdaDelta at PC 0.35 (Adam 0.0035); Nesterov+CLR", "-",
          "Nesterov PC 90.33, Nesterov CLR 92.47, Adam 87.15, AdaGrad 83.74, AdaDelta 70.97",
          detail=(("optimizer", "adam", "-", "Adam (PC) 87.15"), ("optimizer", "adagrad", "-", "AdaGrad (PC) 83.74"),
                  ("optimizer", "adadelta", "-", "AdaDelta (PC) 70.97"))),
    Claim("DA1", "Cyclical momentum 0.95->0.85 beats constant momentum under 1cycle",
          "ResNet-56, LR 0.08-0.8 SS 41 epochs, WD 1e-4, TBS 512, 95 epochs",
          "92.0 +- 0.2 vs 0.9 const 91.4, 0.95 const 92.1 +- 0.1", "91.91 (const 0.95)",
          detail=(("momentum", 0.9, "92.0 +- 0.2 vs 91.4 (const 0.9)", "-"),
                  ("momentum", 0.95, "92.0 +- 0.2 vs 92.1 +- 0.1 (const 0.95)", "91.91 (const 0.95)"))),
    Claim("DA2", "At a fixed time budget, larger TBS gives higher test accuracy",
          "ResNet-56, TBS/epochs 128/48, 256/70, 512/95, 1024/116; max LR 0.4/0.4-0.6/0.8/1.0",
          "direction only", "-"),
    Claim("DA3", "Best weight decay is smaller with CLR than with a constant LR",
          "ResNet-56, const LR 0.1 prefers 1e-3..3e-4; 0.1-1 range prefers 1e-4", "-", "-"),
    Claim("DA4", "1cycle reaches in 1/4-1/8 of the epochs what a step schedule reaches",
          "C10 wide resnet, densenet, MNIST LeNet, C100 ResNet-56",
          "WRN 1cycle 50 ep 91.3 +- 0.1 vs step 800 ep 90.3 +- 1.0; densenet 50 ep 91.7 vs 100 ep 91.3; "
          "LeNet 12 ep 99.25 vs 85 ep 99.03; C100 ResNet-56 50 ep 66.4 vs 200 ep 61.6", "-"),
    Claim("CLR1", "CLR reaches a fixed LR's accuracy in far fewer iterations",
          'C10 (Caffe "full" net): 81.4% in 25k it vs 70k it', "81.4% in 25k it vs 70k it", "-"),
]}


# ------------------------------------------------------------------------------------------------ verdicts
@dataclass
class Verdict:
    claim_id: str
    comparison: str                 # the plan's comparison title, e.g. "batch_size=1000 vs batch_size=125"
    statement: str
    paper: str
    log: str
    verdict: str                    # supported | contradicted | inconclusive | pipeline check
    would_be: str                   # the verdict the statistics give (differs from `verdict` at smoke scale)
    verdict_text: str
    measured: str                   # "we measured", one line
    evidence: str                   # test, n, scale, tuning, diverged/missed counts
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
    ci_low: float = math.nan        # NaN when no interval is shown (n < MIN_N)
    ci_high: float = math.nan
    p: float = math.nan
    test: str = ""                  # what p comes from, labelled ("exact permutation test, ... (all 20 splits)")
    p_min: float = math.nan         # an exact test's smallest possible p (2 / its number of splits)
    no_test: str = ""               # why the usual test did not run ("no Welch t test: an arm has no spread")
    seed_low: float = math.nan      # below MIN_N: the range of the per-seed differences (arm A - arm B) ...
    seed_high: float = math.nan
    seed_label: str = ""            # ... and what they are ("per-seed differences (paired by seed)")
    margin: float = math.nan        # non_inferior: the declared margin (the metric's unit)
    rho: float = math.nan
    rho_p: float = math.nan
    scale: str = ""
    stratum: str = ""
    field: str = ""
    plot_x: str = ""
    plot_hue: str = ""
    observed: str = ""              # the observed direction: "same as the claim" | "opposite to the claim" | ...
    per_seed: str = ""              # the units' values per arm, shown when n < MIN_N
    confounds: str = ""             # what else differs between the arms (from the plan)
    planned: str = ""               # the pre-registered line of this comparison
    tuning: str = ""                # how the LR tuning budget was used, and what it selected
    comparison_words: str = ""      # the comparison in words, e.g. "batch 1000 vs batch 125"
    expectation: str = ""           # a control (expect: no_difference): held | failed | not tested; "" for a claim
    expectation_why: str = ""       # ... and why, by the rule of harness/plan.py
    cells: list = dc_field(default_factory=list)
    run_ids: list = dc_field(default_factory=list)

    @property
    def ci_shown(self) -> bool:
        """False below MIN_N units per arm: no interval is computed or printed."""
        return not (math.isnan(self.ci_low) or math.isnan(self.ci_high))

    @property
    def interval_and_test(self) -> str:
        """The interval and the test this verdict rests on, each labelled for what it is (the report's row)."""
        diff = (lambda x: f"{x:+.0f} grid positions") if "argmax" in self.test or self.seed_label.startswith(
            "per-seed shifts") else (lambda x: _fmt_diff(self.metric, x))
        parts = []
        if self.ci_shown:
            parts.append(f"95% percentile-bootstrap interval of the difference of medians: [{diff(self.ci_low)}, "
                         f"{diff(self.ci_high)}] ({BOOTSTRAP} resamples)")
        elif min(self.n_a, self.n_b) < 2:
            return (f"none: fewer than 2 units in an arm (n = {self.n_a} vs {self.n_b}), so no interval, no range "
                    f"and no test; the per-seed values and the observed direction are the evidence")
        else:
            parts.append(f"no interval: fewer than {MIN_N} units in an arm (n = {self.n_a} vs {self.n_b})")
        if self.seed_label and not (np.isnan(self.seed_low) or np.isnan(self.seed_high)):
            parts.append(f"{self.seed_label}: from {diff(self.seed_low)} to {diff(self.seed_high)}")
        if self.no_test:
            parts.append(self.no_test)
        if self.test and not np.isnan(self.p):
            bound = f" (the smallest p it can give is {self.p_min:.2g})" if np.isfinite(self.p_min) else ""
            parts.append(f"{self.test}: p = {self.p:.2g}{bound}")
        if not np.isnan(self.margin):
            parts.append(f"non-inferiority margin {_fmt_margin(self.metric, self.margin)}")
        return "; ".join(parts)

    def row(self) -> dict:
        d = asdict(self)
        d["cells"] = "; ".join(self.cells)
        d["run_ids"] = " ".join(self.run_ids)
        return d


@dataclass
class Evaluation:
    verdicts: list[Verdict]
    not_tested: list[tuple[str, str]]      # (claim id, why)
    scale: str
    requested: list[str]
    excluded: dict                          # status -> count of trials left out (error, running)
    n_trials: int
    plan: list[str] = dc_field(default_factory=list)   # the pre-registered lines


# ------------------------------------------------------------------------------------------------ statistics
def _seed(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _sub(a, b):
    """a - b where inf - inf (both missed the target) counts as no difference."""
    with np.errstate(invalid="ignore"):
        d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return np.where(np.isnan(d), 0.0, d)


def _boot_medians(x: np.ndarray, rng) -> np.ndarray:
    return np.median(x[rng.integers(0, len(x), (BOOTSTRAP, len(x)))], axis=1)


def bootstrap_median_diff(a, b, seed: int, n_boot: int = BOOTSTRAP) -> tuple[float, float, float]:
    """(median(a) - median(b), 2.5% and 97.5% percentiles of its bootstrap distribution)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, len(a), (n_boot, len(a)))], axis=1)
    mb = np.median(b[rng.integers(0, len(b), (n_boot, len(b)))], axis=1)
    lo, hi = _ci(_sub(ma, mb))
    return float(_sub(np.median(a), np.median(b))), lo, hi


def _ci(boot: np.ndarray) -> tuple[float, float]:
    """95% percentile interval; no interpolation, so infinite differences (missed targets) stay infinite."""
    lo, hi = np.quantile(boot, [0.025, 0.975], method="inverted_cdf")
    return float(lo), float(hi)


def no_spread(x) -> bool:
    """All values the same (e.g. every run diverged to chance, or every run missed the target)."""
    x = np.asarray(x, dtype=float)
    return len(x) > 0 and (len(set(x.tolist())) == 1 or (np.all(np.isfinite(x)) and np.ptp(x) < 1e-12))


def welch_p(a, b) -> float:
    """Welch's t-test; NaN with fewer than 2 units in an arm or when an arm has no spread (its variance estimate
    of 0 makes the standard error that of the other arm alone, and any difference look near-certain)."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2 or no_spread(a) or no_spread(b):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return float(p) if np.isfinite(p) else 1.0


def mannwhitney_p(a, b) -> float:
    """Mann-Whitney U (two-sided); NaN with fewer than 2 units in an arm or when an arm has no spread."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2 or no_spread(a) or no_spread(b):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)


def spearman(x, y) -> tuple[float, float]:
    """Spearman's rho of y on the levels x; NaN on fewer than MIN_LEVELS distinct levels (with two levels a rank
    correlation only restates the difference between them, with a p-value that counts every trial as a level)."""
    from scipy import stats
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(set(x.tolist())) < MIN_LEVELS or len(set(y.tolist())) < 2:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = stats.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


@dataclass(frozen=True)
class Permutation:
    """A permutation test's two-sided p, what it tested (labelled), and the smallest p its splits allow."""
    p: float
    label: str
    p_min: float = math.nan         # exact tests: 2 / number of splits (ties can only make it larger)


def _diff_of_means(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _permute(data: tuple, statistic, n_splits: int, kind: str, seed: int) -> tuple[float, bool]:
    """scipy.stats.permutation_test, exact (every split enumerated once: n_resamples >= the number of distinct
    splits, scipy's rule) when there are at most EXACT_MAX splits, else PERMUTATIONS seeded random ones."""
    from scipy import stats
    exact = n_splits <= EXACT_MAX
    res = stats.permutation_test(data, statistic, permutation_type=kind, vectorized=True,
                                 n_resamples=math.inf if exact else PERMUTATIONS, alternative="two-sided",
                                 rng=np.random.default_rng(seed))
    return float(res.pvalue), exact


def permutation_test(a, b, metric: str, seed: int = 0) -> Permutation:
    """Are the two arms' units exchangeable? Two-sided test of the difference of means (accuracies) or of mean
    ranks (steps-to-target, where a miss is +inf and only ranks can weigh it), over every split of the pooled
    units into arms of these sizes (module docstring: why means and not medians)."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 1:
        return Permutation(math.nan, "")
    ranks = metric == "steps_to_target" or not np.all(np.isfinite(np.concatenate([a, b])))
    if ranks:
        r = stats.rankdata(np.concatenate([a, b]))
        a, b = r[:len(a)], r[len(a):]
    splits = math.comb(len(a) + len(b), len(a))
    p, exact = _permute((a, b), _diff_of_means, splits, "independent", seed)
    what = "difference of mean ranks" if ranks else "difference of means"
    how = f"all {splits} splits of the units" if exact else f"{PERMUTATIONS} random splits of the units, seeded"
    return Permutation(p, f"{'exact' if exact else 'randomized'} permutation test on the {what} ({how})",
                       min(1.0, 2 / splits) if exact else math.nan)


def sign_flip_test(d, what: str, seed: int = 0) -> Permutation:
    """Is the mean of the paired values `d` (per-seed contrasts, per-run margins) 0? Every sign pattern of the
    values (2^n) is enumerated; infinite values (missed targets) are tested on their signed ranks instead."""
    from scipy import stats
    d = np.asarray(d, dtype=float)
    if len(d) < 2:
        return Permutation(math.nan, "")
    ranked = not np.all(np.isfinite(d))
    if ranked:
        d = np.sign(d) * stats.rankdata(np.abs(d))
    p, exact = _permute((d,), _mean, 2 ** len(d), "samples", seed)
    how = f"all {2 ** len(d)} sign patterns" if exact else f"{PERMUTATIONS} random sign patterns, seeded"
    return Permutation(p, f"{'exact' if exact else 'randomized'} sign-flip test on the mean "
                          f"{'signed rank of the ' if ranked else ''}{what} ({how})",
                       min(1.0, 2 / 2 ** len(d)) if exact else math.nan)


def seed_differences(ra: pd.DataFrame, rb: pd.DataFrame, col: str) -> tuple[np.ndarray, str]:
    """Arm A - arm B per seed when both arms have one unit per seed and the same seeds ("paired by seed"); else
    the difference of every pair of units (A's unit minus B's). Returns (differences, their label)."""
    a, b = ra[col].astype(float), rb[col].astype(float)
    if "seed" in ra and "seed" in rb and ra["seed"].is_unique and rb["seed"].is_unique \
            and set(ra["seed"]) == set(rb["seed"]):
        sa, sb = dict(zip(ra["seed"], a, strict=True)), dict(zip(rb["seed"], b, strict=True))
        return _sub([sa[s] for s in sorted(sa)], [sb[s] for s in sorted(sa)]), "per-seed differences (paired by seed)"
    return (_sub(a.to_numpy()[:, None], b.to_numpy()[None, :]).ravel(),
            "differences of every pair of units (the arms do not share seeds one to one)")


def _boot_p(boot: np.ndarray) -> float:
    """Two-sided bootstrap sign p-value: 2 x the smaller tail mass at 0 (add-one smoothed)."""
    n = len(boot)
    tail = min((boot <= 0).sum(), (boot >= 0).sum())
    return float(min(1.0, 2 * (tail + 1) / (n + 1)))


def decide(lo: float, hi: float, p: float, direction: int, ns: list[int], bounds: str = "the 95% CI",
           test: str = "the test's", p_min: float = math.nan, no_test: str = "") -> tuple[str, str]:
    """The decision rule of the module docstring: (verdict, reason). `lo`, `hi` bound the difference A - B (the
    95% CI at n >= MIN_N, the range of the per-seed differences below, named by `bounds`); `p` comes from `test`
    (NaN: none ran, `no_test` says why); `p_min` is an exact test's smallest possible p."""
    if min(ns) < 2:
        return "inconclusive", f"fewer than 2 units in an arm (n = {' vs '.join(map(str, ns))}): " \
                               "per-seed values and the observed direction only"
    if np.isnan(lo) or np.isnan(hi):
        return "inconclusive", f"no bounds on the difference ({bounds})"
    claimed = lo > 0 if direction > 0 else hi < 0
    opposite = hi < 0 if direction > 0 else lo > 0
    if not (claimed or opposite):
        return "inconclusive", f"{bounds} includes 0"
    side = "claimed" if claimed else "opposite"
    if np.isnan(p):
        return "inconclusive", f"{bounds} excludes 0 in the {side} direction, but no test: {no_test or 'none ran'}"
    if p < ALPHA:
        return ("supported" if claimed else "contradicted"), \
            f"{bounds} excludes 0 in the {side} direction and {test} p < {ALPHA:g}"
    reason = f"{bounds} excludes 0 in the {side} direction, but {test} p = {p:.2g} >= {ALPHA:g}"
    if np.isfinite(p_min) and p_min >= ALPHA:
        reason += f" ({' vs '.join(map(str, ns))} units: this test cannot give p below {p_min:.2g})"
    return "inconclusive", reason


def decide_non_inferior(lo: float, hi: float, margin: float, direction: int, ns: list[int], bounds: str,
                        metric: str) -> tuple[str, str]:
    """Non-inferiority of A to B by `margin` (module docstring). `lo`, `hi` bound A - B as in `decide`; `bounds`
    names the end that is worse for A ("the worse end of the 95% CI", "the worst per-seed difference")."""
    if min(ns) < 2:
        return "inconclusive", f"fewer than 2 units in an arm (n = {' vs '.join(map(str, ns))}): " \
                               "per-seed values only"
    if np.isnan(lo) or np.isnan(hi):
        return "inconclusive", f"no bounds on the difference ({bounds})"
    worst, best = (lo, hi) if direction > 0 else (-hi, -lo)       # "A better than B" is positive
    m = _fmt_margin(metric, margin)
    if worst > -margin:
        return "supported", f"{bounds}, {_fmt_diff(metric, direction * worst)}, is within the margin of {m}: A is " \
                            f"not worse than B by more than the margin"
    if best < -margin:
        return "contradicted", f"even the other end of the evidence, {_fmt_diff(metric, direction * best)}, is " \
                               f"beyond the margin of {m}: A is worse than B by more than the margin"
    return "inconclusive", f"{bounds}, {_fmt_diff(metric, direction * worst)}, is beyond the margin of {m}, the " \
                           f"other end, {_fmt_diff(metric, direction * best)}, within it"


def expectation(c: Comparison, verdict: str, d, label: str, ns: list[int]) -> tuple[str, str]:
    """A control's expectation (`expect: no_difference`, the rule of harness/plan.py): (held | failed | not tested,
    why), from the decision rule's `verdict` and `d`, the per-seed differences (or contrasts) that `label` names;
    ("", "") for a comparison that is not a control."""
    if c.expect != "no_difference":
        return "", ""
    if min(ns) < 2:
        return "not tested", f"fewer than 2 units in an arm (n = {' vs '.join(map(str, ns))})"
    if verdict in ("supported", "contradicted"):
        return "failed", f"the decision rule finds a difference ({verdict})"
    d = np.asarray(d, dtype=float)
    if len(d) and (np.all(d > 0) or np.all(d < 0)):
        return "failed", (f"every one of the {label} has the same sign, from {_fmt_diff(c.metric, float(d.min()))} "
                          f"to {_fmt_diff(c.metric, float(d.max()))}")
    return "held", (f"no difference found: the decision rule finds none and the {label} do not all have one sign "
                    f"(which does not show that the arms are equal)")


def observed_direction(diff: float, direction: int) -> str:
    if not np.isfinite(diff) and np.isnan(diff):
        return "no value"
    if diff == 0:
        return "no difference"
    return "same as the claim" if diff * direction > 0 else "opposite to the claim"


# ------------------------------------------------------------------------------------------------ trials
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


def _match(df: pd.DataFrame, match: dict) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    for f, vals in match.items():
        if f not in df.columns:
            return df.iloc[0:0]
        mask &= df[f].map(key).isin({key(v) for v in vals})
    return df[mask]


def _design_fields(df: pd.DataFrame) -> list[str]:
    from harness.config import FIELDS
    return [f for f in FIELDS if f in df.columns and f not in ("lr_scale", "data_dir", "device")]


def select_lr_scale(rows: pd.DataFrame, tuning: str) -> tuple[pd.DataFrame, list[str]]:
    """AlgoPerf's selection: per unit (the trials that differ only in lr_scale), the trial with the best final
    validation accuracy (ties: the scale nearest 1). Returns the selected rows and one line per choice."""
    if tuning != "best_on_validation" or rows.empty or "lr_scale" not in rows.columns:
        return rows, []
    design = _design_fields(rows)
    unit = rows[design].apply(lambda r: json.dumps([key(v) for v in r]), axis=1)
    val = rows.get("final_val_acc", pd.Series(np.nan, index=rows.index)).astype(float).fillna(-np.inf)
    near_one = (np.log(rows["lr_scale"].astype(float))).abs()
    order = pd.DataFrame({"unit": unit, "val": -val, "near": near_one}, index=rows.index)
    best = order.sort_values(["unit", "val", "near"]).groupby("unit", sort=False).head(1).index
    chosen = rows.loc[best]
    lines = [f"seed {r.get('seed')}: LR x{float(r['lr_scale']):g} "
             f"(val {100 * float(r.get('final_val_acc', np.nan)):.2f}%)" for _, r in chosen.iterrows()]
    return chosen, lines


# ------------------------------------------------------------------------------------------------ evaluation
def _fmt_value(metric: str, v: float) -> str:
    if metric in plans.FRACTIONS:
        return "n/a" if not np.isfinite(v) else f"{100 * v:.2f}%"
    if v == math.inf:
        return "never"
    return "n/a" if not np.isfinite(v) else f"{v:,.0f}"


def _fmt_diff(metric: str, v: float) -> str:
    if metric in plans.FRACTIONS:
        return f"{100 * v:+.2f} pp"
    if not np.isfinite(v):
        return "+inf" if v > 0 else "-inf"
    return f"{v:+,.0f}"


def _fmt_margin(metric: str, margin: float) -> str:
    if metric in plans.FRACTIONS:
        return f"{100 * margin:.2f} pp"
    return f"{margin:,.0f} steps" if metric == "steps_to_target" else f"{margin:g}"


def _per_seed(label: str, rows: pd.DataFrame, col: str, metric: str) -> str:
    vals = [f"s{r.get('seed')} {_fmt_value(metric, float(r[col]))}" for _, r in rows.sort_values("seed").iterrows()]
    return f"{label}: {', '.join(vals) or 'none'}"


def _outcome_counts(df: pd.DataFrame) -> str:
    div = int((df["status"] == "diverged").sum())
    miss = int(np.isinf(df["steps_to_target_eff"].astype(float)).sum()) - div if "steps_to_target_eff" in df else 0
    parts = [f"{div} diverged"] if div else []
    if miss > 0:
        parts.append(f"{miss} missed target")
    return ", ".join(parts)


def _verdict(c: Comparison, scale: str, used: pd.DataFrame, verdict: str, reason: str, notes: tuple = (),
             **kw) -> Verdict:
    """The Verdict of `c`; its evidence line lists the n, the test (or why none ran), the per-seed range below
    MIN_N, the trend's rho (or why none), each labelled, plus `notes`."""
    claim = CLAIMS.get(c.claim, QUESTION)
    kw.setdefault("measured", "")
    paper, log = claim.numbers_for({**c.stratum, **{f: v[0] for f, v in c.a.match.items() if v}})
    shown, text = verdict, verdict
    if scale == "smoke":
        shown, text = "pipeline check", f"pipeline check (smoke scale): would be {verdict}"
    if kw.get("expectation"):
        text += f"; control, no difference expected: expectation {kw['expectation']}"
    n_a, n_b = kw.get("n_a", 0), kw.get("n_b", 0)
    bits = [f"{scale} scale ({STRENGTH.get(scale, scale)})", f"n = {n_a} vs {n_b} (planned {c.n_a} vs {c.n_b})",
            c.tuning_text]
    if kw.get("no_test"):
        bits.append(kw["no_test"])
    if kw.get("test") and not np.isnan(kw.get("p", math.nan)):
        p_min = kw.get("p_min", math.nan)
        bits.append(f"{kw['test']} p = {kw['p']:.2g}" + (f" (at best {p_min:.2g})" if np.isfinite(p_min) else ""))
    if kw.get("seed_label") and not np.isnan(kw.get("seed_low", math.nan)):
        fmt_d = (lambda x: f"{x:+.0f}") if kw["seed_label"].startswith("per-seed shifts") else \
            (lambda x: _fmt_diff(c.metric, x))
        bits.append(f"{kw['seed_label']} from {fmt_d(kw['seed_low'])} to {fmt_d(kw['seed_high'])}")
    if not np.isnan(kw.get("rho", math.nan)):
        bits.append(f"Spearman rho = {kw['rho']:+.2f} (p = {kw['rho_p']:.2g})")
    bits.extend(notes)
    if c.margin is not None:
        kw["margin"] = float(c.margin)
        bits.append(f"non-inferiority margin {_fmt_margin(c.metric, c.margin)}")
    if _outcome_counts(used):
        bits.append(_outcome_counts(used))
    if kw.get("expectation"):
        bits.append(f"control, no difference expected: expectation {kw['expectation']} ({kw['expectation_why']})")
    if c.note:
        bits.append(c.note)
    return Verdict(claim_id=c.claim, comparison=c.title, comparison_words=c.words, statement=claim.statement,
                   paper=paper, log=log,
                   verdict=shown, would_be=verdict, verdict_text=text, evidence=" · ".join(bits), reason=reason,
                   scale=scale, field=c.field, metric=c.metric, direction=c.direction, stratum=c.stratum_text,
                   confounds=", ".join(c.confounds), planned=c.line(),
                   cells=[lbl for lbl, _ in c.cells()], run_ids=used["run_id"].tolist(), **kw)


def _arm_test(va, vb, metric: str, seed: int) -> dict:
    """n >= MIN_N: Welch t (accuracies) or Mann-Whitney U (steps); on an arm with no spread, neither: the
    permutation test instead, and `no_test` says why."""
    name = "Mann-Whitney U" if metric == "steps_to_target" else "Welch t"
    if no_spread(va) or no_spread(vb):
        perm = permutation_test(va, vb, metric, seed)
        return dict(p=perm.p, test=perm.label, p_min=perm.p_min, no_test=f"no {name} test: an arm has no spread")
    return dict(p=mannwhitney_p(va, vb) if metric == "steps_to_target" else welch_p(va, vb), test=name)


def _two_groups(c: Comparison, scale: str, ra: pd.DataFrame, rb: pd.DataFrame, col: str, used: pd.DataFrame,
                extra: str = "", rho=(math.nan, math.nan), tuning: str = "", notes: tuple = ()) -> Verdict:
    per_seed = "; ".join([_per_seed(c.a.words, ra, col, c.metric), _per_seed(c.b.words, rb, col, c.metric)])
    ra, rb = ra[ra[col].astype(float).notna()], rb[rb[col].astype(float).notna()]   # the units with a value
    va, vb = ra[col].astype(float).to_numpy(), rb[col].astype(float).to_numpy()
    if not len(va) or not len(vb):
        return _verdict(c, scale, used, "inconclusive", "an arm has no value of the metric",
                        measured=f"{c.metric_label}: no value in an arm (not logged by its runs)", a_label=c.a.label,
                        b_label=c.b.label, n_a=len(va), n_b=len(vb), median_a=math.nan, median_b=math.nan,
                        diff=math.nan, observed="no value", tuning=tuning, plot_x=c.field)
    ns = [len(va), len(vb)]
    ma, mb = float(np.median(va)), float(np.median(vb))
    diff = float(_sub(ma, mb))
    inferior = c.kind == "non_inferior"
    observed = observed_direction(diff, c.direction) if not inferior else \
        "within the margin" if c.direction * diff > -c.margin else "worse than the margin"
    if c.expect:   # a control claims no direction: name the arm that came out better
        observed = {"same as the claim": f"{c.a.words} better", "opposite to the claim": f"{c.b.words} better"}.get(
            observed, observed)
    seed = _seed(c.claim, c.title, c.metric)
    head = (f"{c.metric_label}: {c.a.words} {_fmt_value(c.metric, ma)} vs {c.b.words} "
            f"{_fmt_value(c.metric, mb)}")
    stats_kw: dict = {}
    if min(ns) >= MIN_N:
        _, lo, hi = bootstrap_median_diff(va, vb, seed)
        if inferior:
            verdict, reason = decide_non_inferior(lo, hi, c.margin, c.direction, ns, "the worse end of the 95% CI",
                                                  c.metric)
        else:
            stats_kw = _arm_test(va, vb, c.metric, seed)
            verdict, reason = decide(lo, hi, stats_kw["p"], c.direction, ns, "the 95% CI", stats_kw["test"],
                                     stats_kw.get("p_min", math.nan), stats_kw.get("no_test", ""))
        measured = (f"{head} (diff {_fmt_diff(c.metric, diff)}, 95% CI "
                    f"[{_fmt_diff(c.metric, lo)}, {_fmt_diff(c.metric, hi)}])")
        stats_kw.update(ci_low=lo, ci_high=hi)
    elif min(ns) >= 2:
        d, label = seed_differences(ra, rb, col)
        lo, hi = float(np.min(d)), float(np.max(d))
        if inferior:
            worst = "the worst " + label.replace("differences", "difference", 1)
            verdict, reason = decide_non_inferior(lo, hi, c.margin, c.direction, ns, worst, c.metric)
        else:
            perm = permutation_test(va, vb, c.metric, seed)
            stats_kw = dict(p=perm.p, test=perm.label, p_min=perm.p_min)
            verdict, reason = decide(lo, hi, perm.p, c.direction, ns, f"the range of the {label}", perm.label,
                                     perm.p_min)
        stats_kw.update(seed_low=lo, seed_high=hi, seed_label=label)
        measured = (f"{head} (medians, diff {_fmt_diff(c.metric, diff)}: {observed}; {label} from "
                    f"{_fmt_diff(c.metric, lo)} to {_fmt_diff(c.metric, hi)}); per seed {per_seed}")
    else:
        verdict, reason = (decide_non_inferior if inferior else decide)(
            *((math.nan, math.nan, c.margin, c.direction, ns, "", c.metric) if inferior
              else (math.nan, math.nan, math.nan, c.direction, ns)))
        measured = f"{head} (medians, diff {_fmt_diff(c.metric, diff)}: {observed}); per seed {per_seed}"
    if not np.isnan(rho[0]) and verdict == "supported" and rho[0] * c.direction <= 0:
        verdict, reason = "inconclusive", "the extremes differ as claimed but the Spearman trend does not agree"
    if c.expect:
        d, label = seed_differences(ra, rb, col) if min(ns) >= 2 else (np.array([]), "")
        stats_kw.update(zip(("expectation", "expectation_why"), expectation(c, verdict, d, label, ns), strict=True))
    return _verdict(c, scale, used, verdict, reason, notes=notes, measured=measured + extra, a_label=c.a.label,
                    b_label=c.b.label, n_a=len(va), n_b=len(vb), median_a=ma, median_b=mb, diff=diff,
                    observed=observed, per_seed=per_seed, rho=rho[0], rho_p=rho[1], tuning=tuning,
                    plot_x=c.field, plot_hue=next(iter(c.where_match()), ""), **stats_kw)


def _eval_comparison(c: Comparison, df: pd.DataFrame, scale: str, curves: pd.DataFrame | None) -> Verdict | str:
    pool = _match(_match(df, c.where_match()), c.stratum_match())
    if pool.empty:
        return f"{c.title}: no usable trial"
    if c.kind == "range_test":
        return _eval_range_test(c, pool, scale, curves)
    if c.kind == "best_shift":
        return _eval_best_shift(c, pool, scale)
    if c.kind == "interaction":
        return _eval_interaction(c, pool, scale)
    arms = {"a": _match(pool, c.a.match), "b": _match(pool, c.b.match)}
    if c.kind == "best_level":
        arms = {k: _best_level_rows(rows, c) for k, rows in arms.items()}
    elif c.at_best:
        arms = {k: rows_at_best(rows, c.at_best, c.at_best_on) for k, rows in arms.items()}
    selected, notes = {}, []
    for k, rows in arms.items():
        selected[k], lines = select_lr_scale(rows, c.tuning)
        if lines:
            notes.append(f"{(c.a if k == 'a' else c.b).label}: {'; '.join(lines)}")
    tuning = c.tuning_text + (f" (selected: {' | '.join(notes)})" if notes else "")
    ra, rb = selected["a"], selected["b"]
    if ra.empty or rb.empty:
        return f"{c.title}: an arm has no usable trial (a: {len(ra)}, b: {len(rb)})"
    col = COLUMN[c.metric]
    used = pd.concat([ra, rb])
    extra = time_budget_text(c, ra, rb) if c.equal_time else ""
    rho, notes = (math.nan, math.nan), ()
    if c.kind == "trend":
        every = select_lr_scale(pool, c.tuning)[0]
        x = every[c.field].map(level_value).to_numpy(dtype=float)
        rho = spearman(x, every[COLUMN.get(c.metric, "outcome_acc")].astype(float).to_numpy())
        if len(set(x.tolist())) < MIN_LEVELS:
            notes = (f"no Spearman rho: fewer than {MIN_LEVELS} levels of {c.field}",)
        med = every.groupby(every[c.field].map(key))["outcome_acc"].median()
        extra += "; medians by " + c.field + ": " + ", ".join(
            f"{json.loads(k) if k != 'null' else 'full'}: {100 * v:.2f}%"
            for k, v in sorted(med.items(), key=lambda kv: level_value(json.loads(kv[0]))))
    if c.kind == "best_level":
        extra += f"; levels {', '.join(fmt(c.field, v) for v in c.levels)}"
    if c.at_best:
        extra += f"; at each arm's best {c.at_best} ({c.at_best_on} data): " + " vs ".join(
            fmt(c.at_best, r[c.at_best].iloc[0]) for r in (ra, rb))
    return _two_groups(c, scale, ra, rb, col, used, extra=extra, rho=rho, tuning=tuning, notes=notes)


def time_budget_text(c: Comparison, ra: pd.DataFrame, rb: pd.DataFrame) -> str:
    """An equal_time comparison's arms: their epoch budgets, their measured training seconds (medians), and
    plainly whether this hardware gave them equal time (within EQUAL_TIME)."""
    secs = [float(np.nanmedian(r["train_seconds"].astype(float))) if "train_seconds" in r and
            r["train_seconds"].notna().any() else math.nan for r in (ra, rb)]
    epochs = " vs ".join("/".join(f"{e:g}" for e in arm) for arm in c.epochs)
    if not all(np.isfinite(secs)):
        return f"; {epochs} epochs; training seconds not logged, so equal time is not shown"
    ratio = secs[0] / secs[1] if secs[1] > 0 else math.inf
    text = (f"; {epochs} epochs took {secs[0]:,.0f} s vs {secs[1]:,.0f} s of training (medians; A/B = "
            f"{ratio:.2f})")
    if abs(ratio - 1) <= EQUAL_TIME:
        return text + ": equal time on this hardware, within 10%"
    return text + (": this hardware did NOT give the arms equal time, so this compares the paper's epoch budgets, "
                   "not equal times")


def _best_level_rows(rows: pd.DataFrame, c: Comparison) -> pd.DataFrame:
    """The rows of the level with the highest median final accuracy among this arm's levels."""
    if rows.empty:
        return rows
    med = rows.groupby(rows[c.field].map(key))["outcome_acc"].median()
    return rows[rows[c.field].map(key) == med.idxmax()]


def rows_at_best(rows: pd.DataFrame, field: str, on: str) -> pd.DataFrame:
    """at_best: the arm's rows at its value of `field` with the best median final accuracy, on validation
    (`on` "validation") or on the test accuracy itself ("test")."""
    if rows.empty:
        return rows
    col = "final_val_acc" if on == "validation" else "outcome_acc"
    med = rows.groupby(rows[field].map(key))[col].median()
    return rows[rows[field].map(key) == med.idxmax()]


def _eval_interaction(c: Comparison, pool: pd.DataFrame, scale: str) -> Verdict | str:
    col = COLUMN[c.metric]
    cells, used = [], []
    for by in (c.by_a, c.by_b):
        for arm in (c.a, c.b):
            rows, _ = select_lr_scale(_match(pool, {**arm.match, c.by: by}), c.tuning)
            cells.append(rows[col].astype(float).to_numpy())
            used.append(rows)
    if any(len(x) == 0 for x in cells):
        return f"{c.title}: a cell has no usable trial"
    used_df = pd.concat(used)
    meds = [float(np.median(x)) for x in cells]
    diff = (meds[0] - meds[1]) - (meds[2] - meds[3])
    ns = [len(x) for x in cells]
    observed = observed_direction(diff, c.direction)
    def by_words(vals) -> str:
        return " / ".join(names.value_words(c.by, v) for v in vals)
    adv = f"{c.a.words} minus {c.b.words}: {_fmt_diff(c.metric, meds[0] - meds[1])} under " \
          f"{by_words(c.by_a)}, {_fmt_diff(c.metric, meds[2] - meds[3])} under {by_words(c.by_b)}"
    kw: dict = {}
    if min(ns) >= MIN_N:
        rng = np.random.default_rng(_seed(c.claim, c.title))
        boots = [_boot_medians(x, rng) for x in cells]
        boot = (boots[0] - boots[1]) - (boots[2] - boots[3])
        lo, hi = _ci(boot)
        p = _boot_p(boot)
        verdict, reason = decide(lo, hi, p, c.direction, ns)
        measured = f"{adv}; difference {_fmt_diff(c.metric, diff)}, 95% CI [{_fmt_diff(c.metric, lo)}, " \
                   f"{_fmt_diff(c.metric, hi)}]"
        kw = dict(ci_low=lo, ci_high=hi, p=p, test="bootstrap (difference of differences)")
    elif min(ns) >= 2:
        d, label, paired = _contrasts(used, col)
        lo, hi = float(np.min(d)), float(np.max(d))
        kw = dict(seed_low=lo, seed_high=hi, seed_label=label)
        if paired:
            perm = sign_flip_test(d, "per-seed contrast", _seed(c.claim, c.title))
            kw.update(p=perm.p, test=perm.label, p_min=perm.p_min)
        else:
            kw["no_test"] = "no exact test: the four cells do not share seeds one to one"
        verdict, reason = decide(lo, hi, kw.get("p", math.nan), c.direction, ns, f"the range of the {label}",
                                 kw.get("test", ""), kw.get("p_min", math.nan), kw.get("no_test", ""))
        measured = (f"{adv}; difference {_fmt_diff(c.metric, diff)} ({observed}; {label} from "
                    f"{_fmt_diff(c.metric, lo)} to {_fmt_diff(c.metric, hi)})")
    else:
        verdict, reason = decide(math.nan, math.nan, math.nan, c.direction, ns)
        measured = f"{adv}; difference {_fmt_diff(c.metric, diff)} ({observed})"
    per_seed = "; ".join(_per_seed(f"{arm.words}, {by_words(by)}", rows, col, c.metric)
                         for (by, arm), rows in zip([(c.by_a, c.a), (c.by_a, c.b), (c.by_b, c.a), (c.by_b, c.b)],
                                                    used, strict=True))
    if min(ns) < MIN_N:
        measured += f"; per seed {per_seed}"
    if c.expect:
        d, label, _ = _contrasts(used, col) if min(ns) >= 2 else (np.array([]), "", False)
        kw.update(zip(("expectation", "expectation_why"), expectation(c, verdict, d, label, ns), strict=True))
    return _verdict(c, scale, used_df, verdict, reason, measured=measured, a_label=f"under {c.by}={c.by_a[0]}",
                    b_label=f"under {c.by}={c.by_b[0]}", n_a=min(ns[:2]), n_b=min(ns[2:]), median_a=meds[0] - meds[1],
                    median_b=meds[2] - meds[3], diff=diff, observed=observed, per_seed=per_seed, plot_x=c.field,
                    plot_hue=c.by, tuning=c.tuning_text, **kw)


def _contrasts(cells: list[pd.DataFrame], col: str) -> tuple[np.ndarray, str, bool]:
    """(A - B under by_a) - (A - B under by_b) per seed when the four cells have one unit per seed and the same
    seeds; else the extremes over every combination of units. Returns (contrasts, their label, paired)."""
    seeds = [set(r["seed"]) if "seed" in r and r["seed"].is_unique else None for r in cells]
    if all(x is not None and x == seeds[0] for x in seeds):
        v = [dict(zip(r["seed"], r[col].astype(float), strict=True)) for r in cells]
        order = sorted(seeds[0])
        col_of = [np.array([x[s] for s in order]) for x in v]
        return _sub(_sub(col_of[0], col_of[1]), _sub(col_of[2], col_of[3])), \
            "per-seed contrasts (paired by seed)", True
    v = [r[col].astype(float).to_numpy() for r in cells]
    lo = _sub(_sub(v[0].min(), v[1].max()), _sub(v[2].max(), v[3].min()))
    hi = _sub(_sub(v[0].max(), v[1].min()), _sub(v[2].min(), v[3].max()))
    return np.array([float(lo), float(hi)]), \
        "contrasts of every combination of units (the cells do not share seeds one to one)", False


def _seed_best_levels(g: pd.DataFrame, f: str, pos: dict) -> dict | None:
    """Seed -> grid position of the level with the best outcome for that seed, when every level has one unit per
    seed and the same seeds; else None."""
    if "seed" not in g:
        return None
    by_level = {k: dict(zip(r["seed"], r["outcome_acc"].astype(float), strict=True))
                for k, r in g.groupby(g[f].map(key)) if r["seed"].is_unique}
    if len(by_level) != g[f].map(key).nunique() or len({frozenset(x) for x in by_level.values()}) != 1:
        return None
    ks = sorted(by_level, key=lambda k: pos[k])
    return {s: pos[ks[int(np.argmax([by_level[k][s] for k in ks]))]] for s in next(iter(by_level.values()))}


def _eval_best_shift(c: Comparison, pool: pd.DataFrame, scale: str) -> Verdict | str:
    f = c.field
    levels = plans.sorted_levels(pool[f])
    pos = {key(v): i for i, v in enumerate(levels)}
    rng = np.random.default_rng(_seed(c.claim, c.title))
    groups, results = [], []
    for by in (c.by_a, c.by_b):
        g, _ = select_lr_scale(_match(pool, {c.by: by}), c.tuning)
        if g[f].map(key).nunique() < 2:
            return f"{c.title}: needs 2 or more levels of {f} under {c.by}={'/'.join(map(str, by))}"
        ks = sorted(g[f].map(key).unique(), key=lambda k: pos[k])
        vals = [g[g[f].map(key) == k]["outcome_acc"].astype(float).to_numpy() for k in ks]
        point = ks[int(np.argmax([np.median(v) for v in vals]))]
        boot = np.array([pos[ks[i]] for i in np.argmax(np.stack([_boot_medians(v, rng) for v in vals]), axis=0)])
        results.append((point, boot, min(len(v) for v in vals)))
        groups.append(g)
    per_seed_best = [_seed_best_levels(g, f, pos) for g in groups]
    (b1, boot1, n1), (b2, boot2, n2) = results
    diff = float(pos[b1] - pos[b2])
    observed = observed_direction(diff, -1)
    kw: dict = {}
    if min(n1, n2) >= MIN_N:
        boot = (boot1 - boot2).astype(float)
        lo, hi = _ci(boot)
        p = _boot_p(boot)
        verdict, reason = decide(lo, hi, p, -1, [n1, n2])
        kw = dict(ci_low=lo, ci_high=hi, p=p, test="bootstrap (argmax level)")
    elif min(n1, n2) >= 2 and None not in per_seed_best and set(per_seed_best[0]) == set(per_seed_best[1]):
        order = sorted(per_seed_best[0])
        d = np.array([per_seed_best[0][s] - per_seed_best[1][s] for s in order], dtype=float)
        label = "per-seed shifts of the best level (grid positions, paired by seed)"
        perm = sign_flip_test(d, "per-seed shift", _seed(c.claim, c.title))
        kw = dict(seed_low=float(d.min()), seed_high=float(d.max()), seed_label=label, p=perm.p, test=perm.label,
                  p_min=perm.p_min)
        verdict, reason = decide(kw["seed_low"], kw["seed_high"], perm.p, -1, [n1, n2], f"the range of the {label}",
                                 perm.label, perm.p_min)
    elif min(n1, n2) >= 2:
        kw = dict(no_test="no range and no test: the levels do not share seeds one to one")
        verdict, reason = "inconclusive", f"fewer than {MIN_N} units per level and no pairing by seed: the " \
                                          "observed best levels only"
    else:
        verdict, reason = decide(math.nan, math.nan, math.nan, -1, [n1, n2])
    name = lambda k: json.loads(k)  # noqa: E731
    measured = (f"best {f}: {name(b1)} under {c.by}={'/'.join(map(str, c.by_a))} vs {name(b2)} under "
                f"{c.by}={'/'.join(map(str, c.by_b))} (difference in grid positions {diff:+.0f}: {observed}; "
                f"levels {', '.join(str(v) for v in levels)})")
    if kw.get("seed_label"):
        measured += f"; {kw['seed_label']} from {kw['seed_low']:+.0f} to {kw['seed_high']:+.0f}"
    return _verdict(c, scale, pd.concat(groups), verdict, reason, measured=measured, a_label=f"best {f} (A)",
                    b_label=f"best {f} (B)", n_a=n1, n_b=n2, median_a=pos[b1], median_b=pos[b2], diff=diff,
                    observed=observed, plot_x=f, plot_hue=c.by, tuning=c.tuning_text, **kw)


@dataclass
class RangeReading:
    """One range-test run under the SC3 rule (RANGE_DROP and the windows above it)."""
    reference: float        # median accuracy at LR in RANGE_REF x top LR
    high_end: float         # lowest smoothed accuracy at LR in RANGE_END x top LR (or the final accuracy)
    high_end_lr: float      # where that lowest smoothed accuracy is (NaN: the run never reached the window)
    top_lr: float
    drop: float             # reference - high_end

    @property
    def stays_accurate(self) -> bool:
        return bool(self.drop <= RANGE_DROP)

    def text(self) -> str:
        where = f"LR {self.high_end_lr:.2f}" if np.isfinite(self.high_end_lr) else \
            "final, the high-LR window not reached"
        return (f"{100 * self.reference:.1f}% -> {100 * self.high_end:.1f}% ({where}): drop "
                f"{100 * self.drop:.1f} points")


def range_reading(lr, acc, top_lr: float | None = None, final_acc: float = math.nan) -> RangeReading:
    """The SC3 rule on one run's curve (`lr`, `acc` per evaluation); `top_lr` is the ramp's planned top LR (default:
    the largest LR in the curve), `final_acc` the run's final accuracy, its high end if it stopped early."""
    lr, acc = np.asarray(lr, dtype=float), np.asarray(acc, dtype=float)
    ok = np.isfinite(lr) & np.isfinite(acc)
    lr, acc = lr[ok], acc[ok]
    top = float(top_lr) if top_lr is not None and np.isfinite(top_lr) and top_lr > 0 else \
        float(lr.max()) if len(lr) else math.nan
    ref_mask = (lr >= RANGE_REF[0] * top - 1e-9) & (lr <= RANGE_REF[1] * top + 1e-9)
    reference = float(np.median(acc[ref_mask])) if ref_mask.any() else math.nan
    end_mask = (lr >= RANGE_END[0] * top - 1e-9) & (lr <= RANGE_END[1] * top + 1e-9)
    if end_mask.any():
        half = RANGE_SMOOTH * top
        smooth = np.array([np.median(acc[np.abs(lr - x) <= half + 1e-9]) for x in lr[end_mask]])
        i = int(np.argmin(smooth))
        high, high_lr = float(smooth[i]), float(lr[end_mask][i])
    else:   # stopped (diverged) before the high-LR window: its final accuracy, or nothing
        fin = float(final_acc) if final_acc is not None and np.isfinite(final_acc) else \
            (float(acc[-1]) if len(acc) else math.nan)
        high, high_lr = fin, math.nan
    return RangeReading(reference, high, high_lr, top, reference - high)


def _eval_range_test(c: Comparison, rows: pd.DataFrame, scale: str, curves: pd.DataFrame | None) -> Verdict | str:
    """SC3 per run: the drop of `range_reading` (reference LRs vs the smoothed high-LR end), against RANGE_DROP."""
    from scipy import stats
    if curves is None or curves.empty:
        return f"{c.title}: needs the range test's test-accuracy curves (none logged)"
    rows, _ = select_lr_scale(rows, c.tuning)   # one run per unit, as the plan counts them
    readings, used = [], []
    for _, r in rows.iterrows():
        cv = curves[curves["run_id"] == r["run_id"]].dropna(subset=["test_acc"]).sort_values("step")
        if cv.empty:
            continue
        planned = pd.to_numeric(pd.Series([r.get("max_lr", math.nan)]), errors="coerce").iloc[0]
        top = float(np.nanmax([planned, cv["lr"].astype(float).max()]))   # planned top LR, even if it stopped early
        rd = range_reading(cv["lr"], cv["test_acc"], top, float(r.get("outcome_acc", math.nan)))
        if not np.isfinite(rd.drop):
            continue
        readings.append(rd)
        used.append(r)
    if not readings:
        return f"{c.title}: no range test trial has a test-accuracy curve with evaluations at the reference LRs"
    d = np.asarray([rd.drop for rd in readings])
    med = float(np.median(d))
    observed = observed_direction(RANGE_DROP - med, +1)
    kw: dict = {}
    top = max(rd.top_lr for rd in readings)
    measured = (f"median test accuracy at LR {RANGE_REF[0] * top:g}-{RANGE_REF[1] * top:g} minus the lowest "
                f"accuracy at LR {RANGE_END[0] * top:g}-{RANGE_END[1] * top:g} (each evaluation smoothed by the "
                f"median within +-{RANGE_SMOOTH * top:g} LR): median drop {100 * med:.1f} points (threshold "
                f"{100 * RANGE_DROP:.0f}); per run {'; '.join(rd.text() for rd in readings)}")
    if len(d) >= MIN_N:
        rng = np.random.default_rng(_seed(c.claim, c.title))
        lo, hi = _ci(_boot_medians(d, rng))
        margin = RANGE_DROP - d
        if no_spread(d):
            perm = sign_flip_test(margin, "per-run margin (threshold minus drop)", _seed(c.claim, c.title))
            kw = dict(p=perm.p, test=perm.label, p_min=perm.p_min, no_test="no one-sample t test: the runs have "
                                                                          "no spread")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kw = dict(p=float(stats.ttest_1samp(margin, 0.0).pvalue), test="one-sample t")
        verdict, reason = decide(RANGE_DROP - hi, RANGE_DROP - lo, kw["p"], +1, [len(d)], "the 95% CI", kw["test"],
                                 kw.get("p_min", math.nan), kw.get("no_test", ""))
        measured += f"; 95% CI of the median drop [{100 * lo:.1f}, {100 * hi:.1f}]"
        kw.update(ci_low=lo - RANGE_DROP, ci_high=hi - RANGE_DROP)
    elif len(d) >= 2:
        label = "per-run drops minus the threshold"
        perm = sign_flip_test(RANGE_DROP - d, "per-run margin (threshold minus drop)", _seed(c.claim, c.title))
        kw = dict(p=perm.p, test=perm.label, p_min=perm.p_min, seed_label=label,
                  seed_low=float(d.min() - RANGE_DROP), seed_high=float(d.max() - RANGE_DROP))
        verdict, reason = decide(RANGE_DROP - d.max(), RANGE_DROP - d.min(), perm.p, +1, [len(d)],
                                 "the range of the per-run margins (threshold minus drop)", perm.label, perm.p_min)
    else:
        verdict, reason = decide(math.nan, math.nan, math.nan, +1, [len(d)])
    return _verdict(c, scale, pd.DataFrame(used), verdict, reason, measured=measured, a_label="drop",
                    b_label=f"threshold {RANGE_DROP}", n_a=len(d), n_b=len(d), median_a=med, median_b=RANGE_DROP,
                    diff=med - RANGE_DROP, observed=observed, plot_x="lr", tuning=c.tuning_text, **kw)


# ------------------------------------------------------------------------------------------------ entry points
def plan_verdicts(comparisons: list[Comparison], trials: pd.DataFrame, curves: pd.DataFrame | None = None,
                  scale: str | None = None, claim_ids: list[str] | None = None) -> Evaluation:
    """Verdicts for exactly these (pre-registered) comparisons on these trials."""
    use, scale, excluded = usable_trials(trials, scale)
    if any(COLUMN.get(c.metric) not in use.columns for c in comparisons if c.metric in COLUMN):
        from harness.analysis.results import curve_outcomes
        use = curve_outcomes(use, curves)   # the curve metrics of trials not loaded by load_study (tests' frames)
    verdicts, not_tested = [], []
    for c in comparisons:
        if use.empty:
            not_tested.append((c.claim, f"{c.title}: no completed or diverged trials"))
            continue
        res = _eval_comparison(c, use, scale, curves)
        if isinstance(res, str):
            not_tested.append((c.claim, res))
        else:
            res.planned = c.line()
            verdicts.append(res)
    planned = {c.claim for c in comparisons}
    for cid in claim_ids or []:
        if cid not in planned:
            not_tested.append((cid, "the study's analysis plan has no comparison for it"))
    requested = list(dict.fromkeys([*(claim_ids or []), *[c.claim for c in comparisons]]))
    return Evaluation(verdicts=verdicts, not_tested=not_tested, scale=scale, requested=requested, excluded=excluded,
                      n_trials=len(use), plan=[c.line() for c in comparisons])


def requested_claims(parents: list[dict]) -> list[str]:
    ids: list[str] = []
    for p in parents:
        for c in str(p.get("tags", {}).get(names.CLAIMS, "")).split(","):
            c = c.strip()
            if c and c not in ids:
                ids.append(c)
    return ids


def planned_comparisons(spec: dict, scale: str, configs: list[dict] | None = None) -> list[Comparison]:
    """The comparisons a study's plan makes at one scale: expanded from the study spec's own trials (the
    pre-registered plan), or from `configs` when the spec cannot be expanded (e.g. a spec without scales)."""
    from harness import spec as specs
    analysis = spec.get("analysis")
    if not analysis:
        return []
    if configs is None:
        configs = [t.config.to_dict() for t in specs.trials(spec, scale)]
    return plans.expand(analysis, configs, where=spec.get("name", "study"))


def verdicts(results, spec: dict | None = None) -> Evaluation:
    """Verdicts for a StudyResults: the plan of the spec its parent run logged (or `spec`, a study file)."""
    from harness import spec as specs
    claim_ids = requested_claims(results.parents)
    spec = spec or getattr(results, "spec", None) or results.logged_spec()
    if not spec:
        try:
            spec = specs.load_spec(results.study)
        except specs.SpecError:
            spec = None
    use, scale, _ = usable_trials(results.trials)
    if not spec or not spec.get("analysis"):
        ev = plan_verdicts([], results.trials, results.curves, scale, claim_ids)
        ev.not_tested = [(cid, "the study declares no analysis plan") for cid in claim_ids]
        return ev
    logged_scale = spec.get("scale")
    if logged_scale:  # the resolved spec logged with the run: its own base/grid/paired are this scale's
        spec = {**{k: v for k, v in spec.items() if k not in ("scale", "images_per_s", "deviations")}, "scales": {}}
        scale_for_plan = "smoke"
    else:
        scale_for_plan = scale
    try:
        comparisons = planned_comparisons(spec, scale_for_plan)
    except Exception:  # a spec that no longer expands (code changed since): plan on the runs' own configs
        from harness.config import FIELDS
        configs = [{f: r[f] for f in FIELDS if f in use.columns} for _, r in use.iterrows()]
        comparisons = plans.expand(spec["analysis"], configs, where=results.study)
    return plan_verdicts(comparisons, results.trials, results.curves, scale, claim_ids)


def sorted_levels(values) -> list:
    """Distinct values in numeric order (then text): the order of levels in tables and figures."""
    return plans.sorted_levels(values)
