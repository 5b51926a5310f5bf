"""Measured trial throughput, kept where the dry-run's cost estimate reads it.

    python -m harness.study NAME --scale paper --preflight      # records one figure per distinct config
    python -m harness.study NAME --scale paper --dry-run        # "at N images/s per trial (measured on ...)"

A trial's cost per image is set by what it computes, not by its LR or seed: `COST_FIELDS` and the number of
workers. Trials that agree on those share one `cost_key`, and the preflight runs one trial of each key
(`distinct`). Each measurement is a record in one JSON file (`store_path`: $HARNESS_THROUGHPUT_FILE, else
$XDG_CACHE_HOME/harness/throughput.json, ~/.cache by default), keyed by cost key and device, with the study,
scale, commit and time that measured it. Keyed by what sets the cost rather than by study, a figure measured by
one study's preflight serves every study with the same config (super_convergence's ResNet-56 at batch 1000 is
less_data's). A newer measurement of a key on the same device replaces the older one.

`measured(resolved, trials)` is the dry-run's figure: when every trial's key has a record, the images of all
trials over the seconds they take at their own key's rate, preferring records on the kind of device the study
asks for (GPU or CPU), the newest first; None while a key has none.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from harness import spec as specs
from harness.config import TrialConfig

COST_FIELDS = ("model", "mlp_hidden", "dataset", "preprocess", "batch_size", "bn_batch", "optimizer", "precision",
               "channels_last", "compile", "device")
STORE_ENV = "HARNESS_THROUGHPUT_FILE"


def cost_key(cfg: TrialConfig, workers: int) -> str:
    """What sets one trial's cost per image, as canonical JSON: COST_FIELDS and the number of DDP workers."""
    fields = cfg.to_dict()
    return json.dumps({**{k: fields[k] for k in COST_FIELDS}, "workers": workers}, sort_keys=True)


def distinct(trials: list[specs.Trial]) -> list[specs.Trial]:
    """The first trial of each cost key, in the study's order."""
    seen: dict[str, specs.Trial] = {}
    for t in trials:
        seen.setdefault(cost_key(t.config, t.workers), t)
    return list(seen.values())


def store_path() -> Path:
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "harness" / "throughput.json"


def _records() -> list[dict]:
    try:
        return json.loads(store_path().read_text())["records"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: nothing measured
        return []


def record(trial: specs.Trial, images_per_s: float, device: str, device_kind: str, commit: str,
           **details) -> dict:
    """Store the measured images/s of `trial`'s config (the trial's, all its workers together) on `device`;
    `details` (steps, s_per_step, peak memory, how it was measured) are kept beside it. Returns the record."""
    rec = {"key": cost_key(trial.config, trial.workers), "device": device, "device_kind": device_kind,
           "images_per_s": images_per_s, "commit": commit, "study": trial.study, "scale": trial.scale,
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details}
    kept = [r for r in _records() if (r.get("key"), r.get("device")) != (rec["key"], device)]
    path = store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".throughput-", delete=False) as f:
        json.dump({"records": [*kept, rec]}, f, indent=1)
    os.replace(f.name, path)  # a reader sees the old file or the new one, never half of one
    return rec


def lookup(key: str, device_kind: str) -> dict | None:
    """The record for `key`: on a `device_kind` device ("cuda" or "cpu") if there is one, the newest first."""
    hits = [r for r in _records() if r.get("key") == key]
    hits.sort(key=lambda r: (r.get("device_kind") == device_kind, r.get("measured_at", "")), reverse=True)
    return hits[0] if hits else None


def measured(resolved: dict, trials: list[specs.Trial]) -> tuple[float, str] | None:
    """(images/s of one trial, averaged over the trials by their images, where it comes from) when every trial's
    config has a record; None otherwise."""
    want = "cuda" if resolved["resources"]["gpus_per_worker"] else "cpu"
    images = seconds = 0.0
    used: list[dict] = []
    for t in trials:
        rec = lookup(cost_key(t.config, t.workers), want)
        if rec is None:
            return None
        images += t.config.steps * t.config.batch_size
        seconds += t.config.steps * t.config.batch_size / rec["images_per_s"]
        if rec not in used:
            used.append(rec)
    devices = ", ".join(dict.fromkeys(r["device"] for r in used))
    commits = ", ".join(dict.fromkeys(r["commit"] for r in used))
    steps = "/".join(str(s) for s in dict.fromkeys(r.get("steps") for r in used))
    other = [r for r in used if r.get("device_kind") != want]
    caveat = f"; {len(other)} of them not on the {'GPU' if want == 'cuda' else 'CPU'}s the study asks for, so the " \
        f"hours below are that device's" if other else ""
    return images / seconds, (f"measured on {devices} at {commits}: --preflight of {len(used)} "
                              f"config{'s' if len(used) != 1 else ''}, {steps} steps each, {store_path()}{caveat}")
