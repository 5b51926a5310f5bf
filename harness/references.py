"""The authors' runs as typed references: one per Caffe log, read from the committed files.

harness/analysis/reference/runs/<log>.json holds a log's run in the harness's own terms (written by
`python -m harness.analysis.caffe_logs`, see harness/analysis/caffe_runs.py for how each field is read), and
<log>.trace.csv the LR and momentum of each of its display lines. `load(name)` gives both as a `Reference`;
`Reference.trial_config()` is its TrialConfig (the harness's defaults for every field the log does not determine).
This module is core (it imports only harness.config), so every side may compare its runs with the authors'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.config import TrialConfig, suggest

RUNS_DIR = Path(__file__).resolve().parent / "analysis" / "reference" / "runs"


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
    """The committed references, sorted."""
    return sorted(p.name.removesuffix(".json") for p in RUNS_DIR.glob("*.json"))


def load(name: str) -> Reference:
    """The reference of log `name`; ValueError (one line, with the closest name) if there is none."""
    path = RUNS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no reference run '{name}'{suggest(name, names())}; see {RUNS_DIR} for the "
                         f"{len(names())} there are")
    run = json.loads(path.read_text())
    trace = pd.read_csv(RUNS_DIR / f"{name}.trace.csv", dtype={"iteration": int, "lr": float, "momentum": float})
    return Reference(name=run["name"], log=run["log"], claims=tuple(run["claims"]), gpus=run["gpus"],
                     config=run["config"], unmapped=run["unmapped"], trace=trace)
