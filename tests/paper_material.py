"""The paper's material for the tests: the full copy in ../shared when it is there, else the excerpts derived
from it and committed in tests/fixtures/, so a fresh clone passes its own tests.

    tests/fixtures/caffe_resnet{20,56,110}.csv   the prototxt layers (TRAIN net) as parsed by `parse_prototxt`
    tests/fixtures/da_NAME.csv                    the same for the DA author's da-config/architectures/NAME.prototxt
                                                  (with the fields DA_FIELDS adds: filler std, dropout, pooling, LRN)
    tests/fixtures/claims_table.md                the claims table of claims.md, verbatim
    tests/fixtures/caffe-logs/NAME.log.gz         a few Caffe logs: every line the parser reads, nothing else
    tests/fixtures/mnist/*-idx?-ubyte.gz          the first MNIST images, in MNIST's own IDX format

`python tests/paper_material.py` re-derives them from ../shared (or --shared DIR); `--check` re-derives into a
temporary folder and fails if anything differs (CI runs it). HARNESS_REQUIRE_SHARED=1 (set by .ci/run) turns a
missing ../shared into a test failure instead of a quiet fall-back to the excerpts.
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(os.environ.get("HARNESS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DEPTHS = (20, 56, 110)
# The disciplined-approach author's nets (harness/trial/da_models.py; cifar100 is caffe_cifar10_full with 100 outputs)
DA_PROTOTXTS = ("gResnet56", "c100Resnet56", "wide32cifar", "genDensenet40", "cifar100")
# The logs the tests name (claims numbers, setups, one of each schedule kind), each a few hundred lines.
LOG_EXCERPTS = ("clr3SS5kFig1a", "clr3SS5kRes110Tab1", "range3Iter20kFig2b", "lr35Fig1a")
MNIST_TRAIN, MNIST_TEST = 200, 50


def shared_path(relative: str) -> Path | None:
    """../shared/<relative> if it exists; None if not (a failure under HARNESS_REQUIRE_SHARED=1)."""
    path = SHARED / relative
    if path.exists():
        return path
    if os.environ.get("HARNESS_REQUIRE_SHARED") == "1":
        import pytest
        pytest.fail(f"HARNESS_REQUIRE_SHARED=1 but {path} is missing: the full-material check would be skipped")
    return None


# ------------------------------------------------------------------------------------------------ prototxt
# A tiny prototxt reader: enough for Data, Convolution, BatchNorm, Scale, ReLU, Pooling, Eltwise, DummyData,
# Concat, InnerProduct, Dropout and LRN. List-valued fields are JSON in the CSV. The DA tables also keep DA_FIELDS'
# extras: the gaussian filler's std, Dropout's ratio, global pooling and the LRN's [local_size, alpha, beta, region].
LAYER_FIELDS = ("name", "type", "bottom", "top", "num_output", "kernel_size", "stride", "pad", "pool", "bias_term",
                "weight_filler", "dims", "moving_average_fraction", "mults")
DA_FIELDS = (*LAYER_FIELDS, "std", "dropout_ratio", "global_pooling", "lrn")
_LISTS = ("bottom", "top", "dims", "moving_average_fraction", "mults", "lrn")


def _int(block: str, key: str, default: int) -> int:
    m = re.search(rf"\b{key}:\s*(\d+)", block)
    return int(m.group(1)) if m else default


def _float(block: str, key: str) -> float | None:
    m = re.search(rf"\b{key}:\s*([-+\d.eE]+)", block)
    return float(m.group(1)) if m else None


def _lrn(block: str) -> list:
    """[local_size, alpha, beta, norm_region] of an LRN layer with Caffe's defaults (5, 1, 0.75, ACROSS_CHANNELS)."""
    region = re.search(r"norm_region:\s*(\w+)", block)
    alpha, beta = _float(block, "alpha"), _float(block, "beta")
    return [_int(block, "local_size", 5), 1.0 if alpha is None else alpha, 0.75 if beta is None else beta,
            region.group(1) if region else "ACROSS_CHANNELS"]


def _dropout_ratio(block: str) -> float:
    ratio = _float(block, "dropout_ratio")
    return 0.5 if ratio is None else ratio  # Caffe's default


def parse_prototxt(path: Path) -> list[dict]:
    text = re.sub(r"#[^\n]*", "", path.read_text())
    layers = []
    for block in re.findall(r"^layer\s*\{.*?^\}", text, flags=re.MULTILINE | re.DOTALL):
        phase = re.search(r"phase:\s*(\w+)", block)
        if phase and phase.group(1) == "TEST":
            continue  # the TEST copies of the data and BatchNorm layers
        filler = re.search(r"weight_filler\s*\{\s*type:\s*\"(\w+)\"", block)
        filler_block = re.search(r"weight_filler\s*\{(.*?)\}", block, flags=re.DOTALL)
        kind = re.search(r"type:\s*\"(\w+)\"", block).group(1)
        bias_term = re.search(r"bias_term:\s*(\w+)", block)
        layers.append({
            "name": re.search(r"name:\s*\"(.*?)\"", block).group(1),
            "type": kind,
            "bottom": re.findall(r"bottom:\s*\"(.*?)\"", block),
            "top": re.findall(r"top:\s*\"(.*?)\"", block),
            "num_output": _int(block, "num_output", 0),
            "kernel_size": _int(block, "kernel_size", 0),
            "stride": _int(block, "stride", 1),
            "pad": _int(block, "pad", 0),
            "pool": (re.search(r"pool:\s*(\w+)", block) or [None, None])[1],
            "bias_term": bias_term is None or bias_term.group(1) == "true",
            "weight_filler": filler.group(1) if filler else None,
            "dims": [int(d) for d in re.findall(r"dim:\s*(\d+)", block)],
            "moving_average_fraction": re.findall(r"moving_average_fraction:\s*([\d.]+)", block),
            # [lr_mult, decay_mult] per `param { }` block; Caffe's defaults are 1 and 1
            "mults": [[float(_int(p, "lr_mult", 1)), float(_int(p, "decay_mult", 1))]
                      for p in re.findall(r"\bparam\s*\{(.*?)\}", block, flags=re.DOTALL)],
            "std": _float(filler_block.group(1), "std") if filler_block else None,
            "dropout_ratio": _dropout_ratio(block) if kind == "Dropout" else None,
            "global_pooling": bool(re.search(r"global_pooling:\s*true", block)),
            "lrn": _lrn(block) if kind == "LRN" else [],
        })
    return layers


def write_layer_table(layers: list[dict], path: Path, fields: tuple[str, ...] = LAYER_FIELDS) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(fields)
        for L in layers:
            w.writerow([json.dumps(L[k], separators=(",", ":")) if k in _LISTS else
                        ("" if L[k] is None else L[k]) for k in fields])


def read_layer_table(path: Path, fields: tuple[str, ...] = LAYER_FIELDS) -> list[dict]:
    """The layers `write_layer_table` wrote, typed as `parse_prototxt` gives them (for the fields the table has)."""
    layers = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            L = {k: json.loads(row[k]) if k in _LISTS else row[k] for k in fields}
            for k in ("num_output", "kernel_size", "stride", "pad"):
                L[k] = int(L[k])
            for k in ("bias_term", "global_pooling"):
                if k in L:
                    L[k] = L[k] == "True"
            for k in ("std", "dropout_ratio"):
                if k in L:
                    L[k] = float(L[k]) if L[k] else None
            L["pool"] = L["pool"] or None
            L["weight_filler"] = L["weight_filler"] or None
            layers.append(L)
    return layers


def caffe_layers(depth: int) -> list[dict]:
    """The TRAIN net of Resnet{depth}Cifar.prototxt: parsed from ../shared, else the committed table."""
    proto = shared_path(f"paper/caffe-config/Resnet{depth}Cifar.prototxt")
    return parse_prototxt(proto) if proto else read_layer_table(FIXTURES / f"caffe_resnet{depth}.csv")


def da_layers(name: str) -> list[dict]:
    """The TRAIN net of da-config/architectures/NAME.prototxt (one of DA_PROTOTXTS): parsed from ../shared, else the
    committed table."""
    proto = shared_path(f"paper/da-config/architectures/{name}.prototxt")
    return parse_prototxt(proto) if proto else read_layer_table(FIXTURES / f"da_{name}.csv", DA_FIELDS)


# ------------------------------------------------------------------------------------------------ claims.md
def claims_table(text: str) -> str:
    """The lines of claims.md's claims table (header, rule and one row per claim)."""
    lines = text.splitlines()
    start = lines.index("## Claims (IDs are ours; keep them stable)") + 1
    table = []
    for line in lines[start:]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table) + "\n"


def claims_md() -> str:
    full = shared_path("paper/claims.md")
    return full.read_text() if full else (FIXTURES / "claims_table.md").read_text()


# ------------------------------------------------------------------------------------------------ Caffe logs
_KEEP_BODY = re.compile(r"\] Iteration \d+(?: \([^)]*\))?, (?:Testing net|lr = |loss = )|Test net output #")
_KEEP_HEAD = re.compile(r"Using GPUs|Creating training net|source:|batch_size:|type: \"Dropout\"|brc1|^name:|"
                        r"mean_file:|mirror:|moving_average_fraction:|type: \"BatchNorm\"")
_BLOCK_NAME = re.compile(r"L1_b\d+_|Conv16_\d+")


def log_excerpt(text: str) -> str:
    """The lines of a Caffe log that harness.analysis.caffe_logs reads: the solver block before the training net, then
    the net's name, data layer (source, batch, mean file, mirror), dropout, BatchNorm and first-stage block names,
    then every test, accuracy, loss and lr line.
    parse_log gives the same curve and setup on the excerpt as on the whole log (checked by --check)."""
    lines = text.splitlines()
    first_test = next(i for i, line in enumerate(lines) if "Testing net (#0)" in line)
    net = next(i for i, line in enumerate(lines) if "Creating training net" in line)
    out = lines[:net]
    seen: set[str] = set()
    for line in lines[net:first_test]:
        block = _BLOCK_NAME.search(line)
        if _KEEP_HEAD.search(line) or (block and block.group(0) not in seen):
            if block:
                seen.add(block.group(0))
            out.append(line)
    out += [line for line in lines[first_test:] if _KEEP_BODY.search(line)]
    return "\n".join(out) + "\n"


def caffe_logs_dir() -> Path:
    full = shared_path("paper/caffe-logs")
    return full if full else FIXTURES / "caffe-logs"


# ------------------------------------------------------------------------------------------------ MNIST
def mnist_dir() -> Path:
    full = shared_path("data/mnist")
    return full if full else FIXTURES / "mnist"


def _idx_head(path: Path, count: int) -> bytes:
    """The first `count` items of a gzipped IDX file, as an IDX file."""
    with gzip.open(path, "rb") as f:
        magic = f.read(4)
        ndim = magic[3]
        dims = [int.from_bytes(f.read(4), "big") for _ in range(ndim)]
        item = 1
        for d in dims[1:]:
            item *= d
        body = f.read(count * item)
    return magic + b"".join(d.to_bytes(4, "big") for d in [count, *dims[1:]]) + body


# ------------------------------------------------------------------------------------------------ derive
def derive(shared: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for depth in DEPTHS:
        write_layer_table(parse_prototxt(shared / f"paper/caffe-config/Resnet{depth}Cifar.prototxt"),
                          out / f"caffe_resnet{depth}.csv")
    for name in DA_PROTOTXTS:
        write_layer_table(parse_prototxt(shared / f"paper/da-config/architectures/{name}.prototxt"),
                          out / f"da_{name}.csv", DA_FIELDS)
    (out / "claims_table.md").write_text(claims_table((shared / "paper/claims.md").read_text()))
    (out / "caffe-logs").mkdir(exist_ok=True)
    for name in LOG_EXCERPTS:
        with gzip.open(shared / f"paper/caffe-logs/{name}.log.gz", "rt", errors="replace") as f:
            text = log_excerpt(f.read())
        # mtime=0: the same input gives the same bytes, so --check can compare files
        with open(out / "caffe-logs" / f"{name}.log.gz", "wb") as raw, \
                gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(text.encode())
    (out / "mnist").mkdir(exist_ok=True)
    for split, n in (("train", MNIST_TRAIN), ("t10k", MNIST_TEST)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte.gz"
            with open(out / "mnist" / name, "wb") as raw, \
                    gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
                f.write(_idx_head(shared / "data/mnist" / name, n))


def check(shared: Path) -> list[str]:
    """Files that differ between tests/fixtures and a fresh derivation (empty: the fixtures are current)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from harness.analysis import caffe_logs
    problems = []
    with tempfile.TemporaryDirectory() as d:
        derive(shared, Path(d))
        for fresh in sorted(Path(d).rglob("*")):
            if fresh.is_file():
                rel = fresh.relative_to(d)
                if not (FIXTURES / rel).is_file() or not filecmp.cmp(fresh, FIXTURES / rel, shallow=False):
                    problems.append(f"{rel}: differs from a fresh derivation")
    for name in DA_PROTOTXTS:  # a committed table must read back as the parsed prototxt, field for field
        table = FIXTURES / f"da_{name}.csv"
        if table.is_file() and read_layer_table(table, DA_FIELDS) != \
                parse_prototxt(shared / f"paper/da-config/architectures/{name}.prototxt"):
            problems.append(f"da_{name}.csv reads back differently from its prototxt")
    for name in LOG_EXCERPTS:  # an excerpt must parse exactly like its whole log
        whole = caffe_logs.parse_log(shared / f"paper/caffe-logs/{name}.log.gz")
        part = caffe_logs.parse_log(FIXTURES / "caffe-logs" / f"{name}.log.gz")
        if (whole.curve, whole.setup, whole.run) != (part.curve, part.setup, part.run) or \
                whole.trace != part.trace:
            problems.append(f"caffe-logs/{name}.log.gz parses differently from the whole log")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=SHARED, help=f"the shared folder (default {SHARED})")
    ap.add_argument("--check", action="store_true", help="fail if tests/fixtures differ from a fresh derivation")
    args = ap.parse_args(argv)
    if not (args.shared / "paper").is_dir():
        print(f"error: no paper material at {args.shared}/paper; pass --shared DIR", file=sys.stderr)
        return 2
    if args.check:
        problems = check(args.shared)
        for p in problems:
            print(f"error: tests/fixtures/{p}; run python tests/paper_material.py", file=sys.stderr)
        if not problems:
            print(f"tests/fixtures match a fresh derivation from {args.shared}")
        return 1 if problems else 0
    derive(args.shared, FIXTURES)
    print(f"wrote {FIXTURES} from {args.shared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
