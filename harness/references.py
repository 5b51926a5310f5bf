"""The authors' runs as typed references: one per Caffe log, read from the committed files.

harness/analysis/reference/runs/<log>.json holds a log's run in the harness's own terms (written by
`python -m harness.analysis.caffe_logs`, see harness/analysis/caffe_runs.py for how each field is read), and
<log>.trace.csv the LR and momentum of each of its display lines. `load(name)` gives both as a `Reference`;
`Reference.trial_config()` is its TrialConfig (the harness's defaults for every field the log does not determine).
harness/analysis/reference/setups.yaml adds the setups no log holds (claims.md's other batch sizes, cycle lengths,
the DA job scripts' budgets, our declared extensions, the seed studies) as typed records: a log's reference with
named fields changed (`from`, `set`), or a whole record (`config`); their `log` is the record's `source` in words
and their trace is empty.
This module is core (it imports only harness.config), so every side may compare its runs with the authors'.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from harness.config import TrialConfig, suggest

RUNS_DIR = Path(__file__).resolve().parent / "analysis" / "reference" / "runs"
SETUPS = RUNS_DIR.parent / "setups.yaml"


@dataclass(frozen=True)
class Reference:
    name: str             # the log's file name without .log.gz
    log: str              # "<folder>/<file>" in shared/paper/
    claims: tuple[str, ...]
    gpus: int
    config: dict          # TrialConfig fields the log determines
    unmapped: dict        # the solver fields (and facts of the net) no TrialConfig field says
    trace: pd.DataFrame   # iteration, lr, momentum per display line (momentum NaN where the log prints none)

    def trial_config(self, **overrides) -> TrialConfig:
        """The reference's TrialConfig: its config over the harness's defaults, then `overrides`."""
        return TrialConfig.from_dict({**self.config, **overrides})


def names() -> list[str]:
    """Every committed reference (the logs' runs and the setups' records), sorted."""
    return sorted([*log_names(), *_setups()])


def log_names() -> list[str]:
    """The references that are an author's logged run (each has a display-line trace), sorted."""
    return sorted(p.name.removesuffix(".json") for p in RUNS_DIR.glob("*.json"))


def load(name: str) -> Reference:
    """The reference `name` (a log's run or a setup's record); ValueError (one line, with the closest name) if there
    is none."""
    if name in _setups():
        return _setup(name)
    path = RUNS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no reference run '{name}'{suggest(name, names())}; see {RUNS_DIR} and {SETUPS.name} for "
                         f"the {len(names())} there are")
    run = json.loads(path.read_text())
    trace = pd.read_csv(RUNS_DIR / f"{name}.trace.csv", dtype={"iteration": int, "lr": float, "momentum": float})
    return Reference(name=run["name"], log=run["log"], claims=tuple(run["claims"]), gpus=run["gpus"],
                     config=run["config"], unmapped=run["unmapped"], trace=trace)


@functools.cache
def _setups() -> dict[str, dict]:
    return yaml.safe_load(SETUPS.read_text()) or {} if SETUPS.is_file() else {}


def _setup(name: str) -> Reference:
    record = _setups()[name]
    base = load(record["from"]) if "from" in record else None
    config = {**(base.config if base else {}), **record.get("config", {}), **record.get("set", {})}
    config = {k: v for k, v in config.items() if v is not None or k in ("stepsize",)}
    unknown = set(config) - set(TrialConfig.model_fields)  # a record of what claims.md says may be partial (the
    if unknown:                                            # MNIST step runs' milestones are not given), never wrong
        raise ValueError(f"{SETUPS.name}: {name}: unknown trial fields {sorted(unknown)}")
    return Reference(name=name, log=record["source"], claims=tuple(record.get("claims", [])),
                     gpus=record.get("gpus", base.gpus if base else 1), config=config,
                     unmapped={"from": record["from"]} if base else {},
                     trace=pd.DataFrame({"iteration": pd.Series(dtype=int), "lr": pd.Series(dtype=float),
                                         "momentum": pd.Series(dtype=float)}))
