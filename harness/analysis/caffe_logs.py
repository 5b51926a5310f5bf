"""The authors' Caffe training logs -> compact reference curves, typed reference runs and their LR traces.

`python -m harness.analysis.caffe_logs [--logs DIR ...] [--out DIR]` parses every `*.log.gz` in the log folders
(default ../shared/paper/caffe-logs, the super-convergence authors' 43 logs, and ../shared/paper/da-logs, the
disciplined-approach author's 7, beside the repository; or $HARNESS_CAFFE_LOGS, folders joined by os.pathsep) and
writes into harness/analysis/reference/:

    <log>.csv               iteration, lr, test_acc, train_loss: one row per test interval (the report's overlay)
    index.csv               one row per log with the setup read from the log itself (dataset, model, schedule,
                            total batch, base/max LR, steps, momentum, weight decay, optimizer, training images)
                            and its final and best test accuracy (`match_reference` finds a study cell's logs)
    runs/<log>.json         the run in the harness's own terms: TrialConfig fields, and what no field says
                            (harness.analysis.caffe_runs writes it, harness.references reads it)
    runs/<log>.trace.csv    iteration, lr, momentum of every display line (momentum empty where the log prints
                            none): what tests/test_reference_runs.py checks the harness's schedules against

What the parser reads (Caffe's glog lines; everything else is skipped):
    Using GPUs 0, 1, 2, ...                       -> number of GPUs (total batch = GPUs x batch_size)
    Initializing solver from parameters: ...      -> every top-level solver field (repeated ones as a list)
    the training net: its name, data layer (source: ..._train10k_lmdb, batch_size: 125, mean_file, mirror),
      layer names (depth), Dropout and BatchNorm layers and their moving_average_fraction
    Iteration 100, Testing net (#0)               -> a test at iteration 100
    Test net output #0: accuracy = 0.4            -> its accuracy
    Iteration 100, loss = 2.1                     -> training loss at iteration 100 (newer Caffe, the DA logs:
                                                     Iteration 100 (5.9 iter/s, 33.6s/200 iters), loss = 2.1)
    Iteration 100, lr = 0.158                     -> learning rate at iteration 100 (the DA logs go on with
      , momentum = 0.95, weight decay = 0.0001)      the momentum in effect there)
A resumed log repeats iterations: the last line of an iteration wins.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from harness import REPO_ROOT
from harness.analysis.caffe_runs import reference_run
from harness.config import TRAIN_IMAGES

_PAPER = REPO_ROOT.parent / "shared/paper"
LOGS_DIRS = tuple(Path(p) for p in os.environ["HARNESS_CAFFE_LOGS"].split(os.pathsep)) \
    if os.environ.get("HARNESS_CAFFE_LOGS") else (_PAPER / "caffe-logs", _PAPER / "da-logs")
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
RUNS_DIR = REFERENCE_DIR / "runs"
TRACE_COLUMNS = ("iteration", "lr", "momentum")
CURVE_COLUMNS = ("iteration", "lr", "test_acc", "train_loss")
INDEX_COLUMNS = ("file", "claims", "dataset", "model", "schedule", "optimizer", "batch", "gpus", "base_lr", "max_lr",
                 "steps", "stepsize", "momentum", "weight_decay", "train_size", "notes", "tests", "last_iteration",
                 "final_acc", "best_acc")

# Which claim(s) of claims.md each log documents (by the figure/table in its file name).
CLAIMS_BY_LOG = {
    "clr3SS5kFig1a": "SC1;SC5;SC6;SC9", "lr35Fig1a": "SC1;SC5",
    "clr3SS5kCifar100Fig8": "SC8", "lr35Cifar100Fig8": "SC8", "range3Cifar100kFig8": "SC8",
    "clr3SS5kMom8Fig11": "SC9", "clr3SS5kMom85Fig11": "SC9", "clr3SS5kMom95Fig11": "SC9",
    "clr3SS5kWD-3Fig11": "SC6", "clr3SS5kWD-5Fig11": "SC6", "clr3SS5kWD-6Fig11": "SC6",
    "clr3SS5kNestFig9": "SC10", "lr35NestFig9": "SC10", "lr35AdamFig9": "SC10", "lr35AdaGradFig9": "SC10",
    "lr35AdaDeltaFig9": "SC10",
    "clr3SS5kRes20Tab1": "SC7", "clr3SS5kRes110Tab1": "SC7", "lr35Res20Fig6b": "SC7", "lr35Res110Fig6b": "SC7",
    "range2Res20Fig4b": "SC3;SC7", "range2Res110Fig4b": "SC3;SC7",
    "clr3SS5kTr10kTab1": "SC5", "clr3SS5kTr20kTab1": "SC5", "clr3SS5kTr30kTab1": "SC5",
    "clr3SS5kTr40kTab1": "SC5", "lr35Tr10kTab1": "SC5", "lr35Tr20kTab1": "SC5", "lr35Tr30kTab1": "SC5",
    "lr35Tr40kTab1": "SC5",
    "range3Iter5kFig2b": "SC3", "range3Iter20kFig2b": "SC3", "range3Iter100kFig2b": "SC3",
    "range2SS80kRes56LR": "SC3", "range2SS80kRes56wd0": "SC3", "range2SS80kRes56wd1": "SC3",
    "lrRange3SS520kClip2Fig12a": "SC3", "lrRange3SS520kClip2Fig12b": "SC3", "lrRange3SS520kClip5Fig12a": "SC3",
    "lrRange3SS520kClip5Fig12b": "SC3", "lrRange3SS520kClip10Fig12a": "SC3", "lrRange3SS520kClip10Fig12b": "SC3",
    "lrRange3SS520kDropuoutFig10a": "SC3;SC6",
    # the disciplined-approach author's (da-logs): DA1's constant-momentum 0.95 run (91.91) at DA2's TBS 512 / 95
    # epochs; DA4's 1cycle runs (wide resnet, densenet, C100 ResNet-56) and densenet's step baseline. The 3-layer
    # CIFAR-100 net's 1cycle run documents no claim of claims.md.
    "gResnet56_ResTBS512LR.0800.8M.95WD1e-4Epoch95BS128b_1": "DA1;DA2",
    "c100Resnet56_C100Res1CycLR.1001.2CM0.95.85WD1e-4Epoch145BS256g_1": "DA4",
    "wide32cifar_Wide1CycLR.1001CM0.95.85WD1e-4Epoch50BS128a_1": "DA4",
    "wide32cifar_Wide1CycLR.1001M0.95WD1e-5Epoch100BS128j_1": "DA4",
    "genDensenet40_Den1CycLR.1004M0.9WD1e-6Epoch50BS128c_1": "DA4",
    "genDensenet40_DenOrigLR0.10.1M0.9WD1e-4Epoch400BS128c_1": "DA4",
    "cifar100_C100CycLR.0020.02CM0.95.8WD6e-4Epoch50BS128l_1": "",
}
FULL_TRAIN = {k: v for k, v in TRAIN_IMAGES.items() if k != "digits"}   # the logs' datasets

_TEST = re.compile(r"Iteration (\d+), Testing net \(#0\)")
_ACC = re.compile(r"Test net output #\d+: [Aa]ccuracy = ([-+0-9.eEnaif]+)")  # wide32cifar's layer: "Accuracy"
_LOSS = re.compile(r"\] Iteration (\d+)(?: \([^)]*\))?, loss = ([-+0-9.eEnaif]+)")  # DA: "Iteration 0 (.. iters), loss"
_LR = re.compile(r"\] Iteration (\d+), lr = ([-+0-9.eEnaif]+)")
_MOMENTUM = re.compile(r", momentum = ([-+0-9.eEnaif]+)")
_SOLVER = re.compile(r"Initializing solver from parameters:(.*?)(?:\n[IWE]\d{4} )", re.DOTALL)
# the harness's name of a net, by the name the net itself gives (the DA author's; the SC nets by their layers)
_NETS = {"Cifar-Densenet": "densenet40", "widenet32 with k=4-cifar10": "wide32", "CIFAR10_full": "caffe_cifar10_full"}


@dataclass
class CaffeLog:
    name: str            # file name without .log.gz
    curve: list[dict]    # one dict per test interval: iteration, lr, test_acc, train_loss
    setup: dict          # the index.csv row without the accuracy columns
    trace: list[tuple[int, float, float]] = field(default_factory=list)  # (iteration, lr, momentum) per display
    run: dict = field(default_factory=dict)  # the reference run (harness.analysis.caffe_runs.reference_run)


def parse_log(path: str | Path) -> CaffeLog:
    """Parse one (gzipped or plain) Caffe log."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", errors="replace") as f:
        text = f.read()
    name = path.name.removesuffix(".gz").removesuffix(".log")

    tests: dict[int, float] = {}
    losses: dict[int, float] = {}
    lrs: dict[int, float] = {}
    moms: dict[int, float] = {}
    current: int | None = None
    for line in text.splitlines():
        if "Iteration" in line:
            if (m := _TEST.search(line)):
                current = int(m.group(1))
            elif (m := _LR.search(line)):
                lrs[int(m.group(1))] = float(m.group(2))   # a resumed log repeats iterations: last one wins
                mom = _MOMENTUM.search(line)
                moms[int(m.group(1))] = float(mom.group(1)) if mom else math.nan
            elif (m := _LOSS.search(line)):
                losses[int(m.group(1))] = float(m.group(2))
        elif current is not None and "Test net output" in line and (m := _ACC.search(line)):
            tests[current] = float(m.group(1))
            current = None
    curve = [{"iteration": it, "lr": lrs.get(it, math.nan), "test_acc": acc, "train_loss": losses.get(it, math.nan)}
             for it, acc in sorted(tests.items())]
    head = text[: text.find("Testing net (#0)")] if "Testing net (#0)" in text else text
    solver, net = solver_fields(head), net_facts(head)
    gpus_line = re.search(r"Using GPUs ([0-9, ]+)", head)
    gpus = len(gpus_line.group(1).split(",")) if gpus_line else 1
    claims = CLAIMS_BY_LOG.get(name, "")
    run = reference_run(name, f"{path.parent.name}/{path.name}", claims.split(";") if claims else [], gpus, solver,
                        net)
    trace = [(it, lr, moms[it]) for it, lr in sorted(lrs.items())]
    return CaffeLog(name=name, curve=curve, setup=_setup(name, gpus, solver, net, curve), trace=trace, run=run)


def solver_fields(head: str) -> dict[str, str | list[str]]:
    """The top-level fields of the log's `Initializing solver from parameters:` block, as raw strings (a field
    given more than once, e.g. stepvalue, as a list); nested blocks (train_state { }) are skipped."""
    solver: dict[str, str | list[str]] = {}
    block = _SOLVER.search(head)
    depth = 0
    for line in (block.group(1) if block else "").splitlines():
        text = line.strip()
        if text.endswith("{"):
            depth += 1
        elif text == "}":
            depth -= 1
        elif depth == 0 and ":" in text:
            key, _, value = text.partition(":")
            value = value.strip().strip('"')
            if key in solver:
                solver[key] = [*(solver[key] if isinstance(solver[key], list) else [solver[key]]), value]
            else:
                solver[key] = value
    return solver


def net_facts(head: str) -> dict:
    """What the training net says: dataset, train_size (None: the full set), model (the harness's name, or a
    description), dropout, mean_file, mirror, the per-GPU batch and BatchNorm's distinct moving-average fractions."""
    train_net = head[head.find("Creating training net"):] if "Creating training net" in head else head
    batch = re.search(r"batch_size: (\d+)", train_net)
    source = re.search(r'source: "([^"]+)"', train_net)
    source_text = source.group(1) if source else ""
    dataset = "cifar100" if "cifar100" in source_text else "cifar10"
    tr = re.search(r"train(\d+)k", source_text)
    fractions = {float(f) for f in re.findall(r"moving_average_fraction: ([0-9.eE+-]+)", train_net)}
    if len(re.findall(r"moving_average_fraction:", train_net)) < len(re.findall(r'type: "BatchNorm"', train_net)):
        fractions.add(0.999)  # a BatchNorm layer that sets none: Caffe's default
    return {"dataset": dataset, "train_size": int(tr.group(1)) * 1000 if tr else None,
            "model": _model(train_net, dataset), "dropout": bool(re.search(r'type: "Dropout"', train_net)),
            "mean_file": bool(re.search(r"mean_file:", train_net)),
            "mirror": bool(re.search(r"mirror: true", train_net)),
            "batch": int(batch.group(1)) if batch else None, "bn_fractions": sorted(fractions)}


def _model(train_net: str, dataset: str) -> str:
    named = re.search(r'^name: "(.*)"', train_net, re.MULTILINE)
    if named and named.group(1) in _NETS:
        return _NETS[named.group(1)]
    if re.search(r"group\d+_block\d+", train_net):  # the DA author's ResNet-56: c100Resnet56 is its CIFAR-100 file
        return "c100resnet56" if dataset == "cifar100" else "gresnet56"
    if "brc1" in train_net:  # pre-activation bottleneck blocks (BN-ReLU-conv x3)
        blocks = max((int(b) for b in re.findall(r"L1_b(\d+)_brc", train_net)), default=0)
        return f"preact_bottleneck_resnet{9 * blocks + 2}"
    blocks = max((int(b) for b in re.findall(r"L1_b(\d+)_", train_net)), default=0) or \
        max((int(b) for b in re.findall(r"Conv16_(\d+)", train_net)), default=0)
    return f"resnet{6 * blocks + 2}" if blocks else "unknown"


def _setup(name: str, gpus: int, raw: dict, net: dict, curve: list[dict]) -> dict:
    solver = {k: v[0] if isinstance(v, list) else v for k, v in raw.items()}
    dataset, batch, model = net["dataset"], net["batch"], net["model"]
    train_size = net["train_size"] or FULL_TRAIN[dataset]
    notes = []
    if net["dropout"] and model != "densenet40":  # DenseNet-40 has its Dropout layers in the harness's model too
        notes.append("dropout")
    if "clip_gradients" in solver:
        notes.append(f"clip_gradients={solver['clip_gradients']}")

    policy = solver.get("lr_policy", "")
    base_lr = float(solver.get("base_lr", "nan"))
    steps = int(solver.get("max_iter", "0"))
    stepsize = int(solver["stepsize"]) if "stepsize" in solver else None
    if policy == "triangular" and base_lr == 0 and stepsize == steps:
        schedule = "range_test"
    else:
        schedule = {"triangular": "triangular", "multistep": "multistep", "fixed": "constant",
                    "1cycle": "caffe_1cycle"}.get(policy, policy)
    max_lr = float(solver["max_lr"]) if "max_lr" in solver else base_lr
    optimizer = solver.get("type", "SGD").lower()
    accs = [r["test_acc"] for r in curve]
    return {
        "file": name, "claims": CLAIMS_BY_LOG.get(name, ""), "dataset": dataset, "model": model,
        "schedule": schedule, "optimizer": optimizer, "batch": gpus * batch if batch else None,
        "gpus": gpus, "base_lr": base_lr, "max_lr": max_lr, "steps": steps, "stepsize": stepsize,
        "momentum": float(solver.get("momentum", "0")) if optimizer in ("sgd", "nesterov", "adam") else None,
        "weight_decay": float(solver.get("weight_decay", "0")), "train_size": train_size,
        "notes": " ".join(notes), "tests": len(curve), "last_iteration": curve[-1]["iteration"] if curve else 0,
        "final_acc": accs[-1] if accs else math.nan, "best_acc": max(accs) if accs else math.nan,
    }


# ------------------------------------------------------------------------------------------------ CSV I/O
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def curve_csv(log: CaffeLog) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CURVE_COLUMNS)
    for row in log.curve:
        w.writerow([_fmt(row[c]) for c in CURVE_COLUMNS])
    return buf.getvalue()


def index_csv(logs: list[CaffeLog]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(INDEX_COLUMNS)
    for log in sorted(logs, key=lambda x: x.name):
        w.writerow([_fmt(log.setup[c]) for c in INDEX_COLUMNS])
    return buf.getvalue()


def trace_csv(log: CaffeLog) -> str:
    """runs/<log>.trace.csv: iteration, lr, momentum of each display line, as printed (6 significant digits)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(TRACE_COLUMNS)
    for row in log.trace:
        w.writerow([_fmt(v) for v in row])
    return buf.getvalue()


def run_json(log: CaffeLog) -> str:
    """runs/<log>.json: the reference run (see harness.analysis.caffe_runs), one field a line (lists on theirs)."""
    text = json.dumps(log.run, indent=2)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"


def write_reference(logs_dirs: Path | Iterable[Path] = LOGS_DIRS, out_dir: Path = REFERENCE_DIR) -> list[CaffeLog]:
    """Parse every log in logs_dirs (one folder or several) and (re)write, in out_dir, each log's curve CSV,
    index.csv, and runs/ with each log's reference run and display-line trace."""
    dirs = [Path(logs_dirs)] if isinstance(logs_dirs, (str, Path)) else [Path(d) for d in logs_dirs]
    paths = [p for d in dirs for p in sorted(d.glob("*.log.gz")) + sorted(d.glob("*.log"))]
    if not paths:
        raise FileNotFoundError(f"no Caffe logs (*.log.gz) in {', '.join(map(str, dirs))}; pass --logs DIR")
    out_dir = Path(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    logs = [parse_log(p) for p in paths]
    for log in logs:
        (out_dir / f"{log.name}.csv").write_text(curve_csv(log))
        (out_dir / "runs" / f"{log.name}.json").write_text(run_json(log))
        (out_dir / "runs" / f"{log.name}.trace.csv").write_text(trace_csv(log))
    (out_dir / "index.csv").write_text(index_csv(logs))
    return logs


# ------------------------------------------------------------------------------------------ reading back
def load_index(ref_dir: Path = REFERENCE_DIR):
    """index.csv as a DataFrame (empty if missing)."""
    import pandas as pd
    path = Path(ref_dir) / "index.csv"
    if not path.is_file():
        return pd.DataFrame(columns=INDEX_COLUMNS)
    return pd.read_csv(path)


def load_curve(file: str, ref_dir: Path = REFERENCE_DIR):
    import pandas as pd
    return pd.read_csv(Path(ref_dir) / f"{file}.csv")


def _same(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(a) == str(b)


def match_reference(setup: dict, index=None) -> list[str]:
    """Names of the authors' logs whose setup equals a study cell's setup.

    `setup` holds TrialConfig fields (dataset, model, schedule, batch_size, max_lr, steps, and optionally
    lr_scale, optimizer, nesterov, momentum, weight_decay, train_size). Required equal: dataset, model, schedule, total
    batch, peak LR and steps; the optional fields must also agree when both sides have them (train_size None
    means the full training set). The peak LR is the trial's `max_lr` x `lr_scale` for every schedule (the
    harness's convention: multistep starts at max_lr), against the log's max_lr (Caffe's base_lr for
    multistep and fixed, whose index rows carry it as max_lr too).
    """
    index = load_index() if index is None else index
    if index.empty:
        return []
    sched = setup.get("schedule")
    scale = setup.get("lr_scale")
    peak = setup.get("max_lr")
    if peak is not None and scale is not None and not _isnan(scale):
        peak = float(peak) * float(scale)
    out = []
    for row in index.to_dict("records"):
        if (row["dataset"], row["model"], row["schedule"]) != (setup.get("dataset"), setup.get("model"), sched):
            continue
        if not (_same(row["batch"], setup.get("batch_size")) and _same(row["max_lr"], peak)
                and _same(row["steps"], setup.get("steps"))):
            continue
        ts = setup.get("train_size")
        ts = FULL_TRAIN.get(row["dataset"]) if ts in (None, "None") or _isnan(ts) else ts
        if not _same(row["train_size"], ts):
            continue
        ok = True
        for key in ("optimizer", "weight_decay", "momentum"):
            mine = setup.get(key)
            if key == "optimizer" and mine is not None:
                mine = "nesterov" if setup.get("nesterov") is True else CAFFE_SOLVER.get(mine, mine)
            if mine is not None and not _isnan(row.get(key)) and not _isnan(mine):
                ok &= _same(row[key], mine)
        if ok and not (isinstance(row.get("notes"), str) and row["notes"]):
            out.append(row["file"])
    return out


# The harness's optimizers named by the Caffe solver type they reproduce (the logs' `optimizer` column):
# caffe_sgd is Caffe's SGD exactly; PyTorch's sgd is the same method with the LR outside the momentum buffer.
CAFFE_SOLVER = {"caffe_sgd": "sgd"}


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.analysis.caffe_logs",
                                 description="Parse the authors' Caffe logs into "
                                             "harness/analysis/reference/: *.csv, index.csv, runs/.")
    ap.add_argument("--logs", type=Path, action="append",
                    help=f"a folder of *.log.gz, repeatable (default {' and '.join(map(str, LOGS_DIRS))})")
    ap.add_argument("--out", type=Path, default=REFERENCE_DIR, help=f"output folder (default {REFERENCE_DIR})")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        logs = write_reference(args.logs or LOGS_DIRS, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"parsed {len(logs)} logs into {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
