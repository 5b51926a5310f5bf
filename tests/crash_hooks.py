"""Lose a Ray Train worker at a chosen moment: a Ray `worker_process_setup_hook` for the resilience tests.

Nothing of this lives in harness/: the test's Ray session names `crash_hooks.install` as the setup hook of
every Ray worker process and points $HARNESS_TEST_CRASH_PLAN at a JSON file, {"moment", "rank", "step"}:

    window        rank `rank` is killed before optimizer step `step` + 1 (between two evaluations)
    eval          ... as it enters the evaluation after step `step`

The process SIGKILLs itself (after SETTLE_S), as a lost node looks to Ray Train. A plan fires once
(`<plan>.fired` marks it), so the restarted worker carries on. With no plan file, nothing is patched.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path

PLAN_ENV = "HARNESS_TEST_CRASH_PLAN"
SETTLE_S = 2.0  # between the decision to die and the death: the last report is collected by then


def install() -> None:
    plan_path = os.environ.get(PLAN_ENV)
    if not plan_path:
        return

    import harness.trial.data as data
    import harness.trial.loop as trial

    last_step = {"index": -1}

    def crash_if(moment: str, step: int) -> None:
        path = Path(plan_path)
        if not path.exists():
            return
        plan = json.loads(path.read_text())
        if plan["moment"] != moment or plan["step"] != step or _rank() != plan["rank"]:
            return
        try:  # fire once: the first process to create the marker dies
            os.close(os.open(f"{plan_path}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        # A real window or evaluation lasts seconds, and Train's controller has long collected the last report
        # (polled every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) when a node goes; tiny test steps take milliseconds, so
        # without this pause the loss could land before the step-10 checkpoint is registered (resume from 5).
        time.sleep(SETTLE_S)
        os.kill(os.getpid(), signal.SIGKILL)

    original_get = data.TrainBatches.get

    @functools.wraps(original_get)
    def get(self, step):
        last_step["index"] = step
        crash_if("window", step)
        return original_get(self, step)

    original_evaluate = trial.evaluate

    @functools.wraps(original_evaluate)
    def evaluate(*args, **kwargs):
        crash_if("eval", last_step["index"] + 1)
        return original_evaluate(*args, **kwargs)

    data.TrainBatches.get = get
    trial.evaluate = evaluate


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
