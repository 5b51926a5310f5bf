"""What reaches the terminal: Tune's table and the harness's own lines. Everything else a study's processes
log (Ray Train's per-report lines, Ray's token-auth warning, libraries' warnings and INFO lines) goes to the
study's log file, `<storage>/<study>-<scale>/harness.log`, named in the study's first lines.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

# Lines that are neither the harness's nor Tune's table go to <storage>/<experiment>/harness.log, not the terminal:
NOISY_LOGGERS = (
    "py.warnings",  # third-party warnings (e.g. SQLAlchemy's deprecations under MLflow), via logging.captureWarnings
    "ray._private.authentication.authentication_token_setup",  # "Token authentication is enabled ..." at ray.init
    # a tracking outage: urllib3's "Retrying (Retry(total=...)) after connection broken ..." and MLflow's own
    # retry warnings, per HTTP call; TrialLogger says once that tracking is down and once that it is back
    "urllib3",
    "mlflow.utils.rest_utils",
    "mlflow.utils.request_utils",
    # Tune's "Experiment has been interrupted ... Resume experiment with: Tuner.restore(...)" after Ctrl-C (and its
    # other run-level lines): the harness prints its own way to continue (--resume)
    "ray.tune.tune",
    # a Ray actor stopped at the end of a study (see _stopped_actor_to_log)
    "harness.study.stopped",
)
_HELD = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)  # until the log exists


def quiet_console(log_path: str | None = None, *more_loggers: str) -> None:
    """Route NOISY_LOGGERS (and more_loggers) to log_path, appended, and nowhere else; without a path, hold their
    records in memory until a later call names the file (the experiment folder is known only after ray.init)."""
    logging.captureWarnings(True)
    sys.unraisablehook = _stopped_actor_to_log
    handler = _HELD
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)  # another node's first process there
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s pid %(process)d %(name)s %(levelname)s: %(message)s"))
    for name in (*NOISY_LOGGERS, *more_loggers):
        logger = logging.getLogger(name)
        for old in logger.handlers:
            if old is not _HELD and old is not handler:
                old.close()  # an earlier study's file, in the same process (tests)
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.INFO)
    if log_path and _HELD.buffer:
        _HELD.setTarget(handler)
        _HELD.flush()


def _stopped_actor_to_log(unraisable) -> None:
    """sys.unraisablehook: when Ray stops an actor (a trial driver at the end of its study) its SIGTERM handler raises
    SystemExit; landing inside a weakref callback, Python prints "Exception ignored in ... SystemExit: 1" with a
    traceback on the study's console. That is the actor being stopped, not an error: one line to the log file.
    Every other unraisable exception goes to Python's own hook."""
    if issubclass(unraisable.exc_type, SystemExit):
        logging.getLogger("harness.study.stopped").info(
            "process stopped (SystemExit %s) while in %r", unraisable.exc_value, unraisable.object)
        return
    sys.__unraisablehook__(unraisable)


class _DivertChatter(logging.Filter):
    """On a console handler: records below WARNING from libraries go to the log file instead of the console."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or record.name.startswith("harness"):
            return True
        self.target.handle(record)
        return False


def quiet_worker(log_path: str | None) -> None:
    """In a Ray Train worker: quiet_console, and INFO lines of any library (Ray Train's "Reporting training
    result ...", logged under a logger named by its source file) diverted from the console handlers to the log."""
    quiet_console(log_path)
    if not log_path:
        return
    target = logging.FileHandler(log_path)
    target.setFormatter(logging.Formatter("%(asctime)s pid %(process)d %(name)s %(levelname)s: %(message)s"))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DivertChatter) for f in handler.filters):
            handler.addFilter(_DivertChatter(target))
