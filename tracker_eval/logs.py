"""Quiet, readable output: our own log lines plainly formatted, noisy libraries held back, no secrets.

    configure_logging(verbose=False)   # absl/orbax/jax/wandb/mlflow chatter only with --verbose

Every log record of the process, whichever library logs it and whichever handler prints it
(MLflow prints through its own), is masked by `tracker_eval.redact.redact_text` when it is made:
its message and its traceback. Python warnings go through logging, and uncaught exceptions (main
thread or any other) are printed the same way, so a tracker's URL with credentials is never
printed.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
import warnings
from typing import Any

from tracker_eval.redact import redact_text

NOISY = ("absl", "jax", "jax._src", "orbax", "orbax.checkpoint", "etils", "wandb", "mlflow", "alembic",
         "sqlalchemy", "urllib3", "git", "matplotlib", "PIL", "tensorstore", "fsspec", "google.auth", "google.cloud")
# Logs every failed request of a storage outage at ERROR with a traceback; tracker-eval says once
# that the storage does not answer.
SILENT = ("gcsfs",)


def quiet_environment() -> None:
    """Environment settings that must precede library imports (C++ logging of XLA/TensorStore)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("ALEMBIC_LOG_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def is_failed_read_leftover(error: BaseException | None) -> bool:
    """Whether `error` is a leftover of a failed Orbax/TensorStore read, reported after the fact.

    After a failed read, TensorStore completes its futures from its own threads and Orbax's asyncio
    glue then calls into a loop that is gone ("Event loop is closed"), and the read's other tasks,
    when collected, are reported by asyncio ("Task exception was never retrieved") with the
    TensorStore spec of each array. They carry nothing the user's one-line error about the
    checkpoint lacks.
    """
    if error is None:
        return False
    text = str(error)
    return (isinstance(error, RuntimeError) and "Event loop is closed" in text) or "tensorstore_spec" in text


def _quiet_unraisable(info: Any) -> None:
    if is_failed_read_leftover(info.exc_value):
        logging.getLogger("tracker_eval").debug("ignored leftover of a failed read: %s", info.exc_value)
        return
    _DEFAULT_UNRAISABLE(info)


_DEFAULT_UNRAISABLE = sys.unraisablehook


class _AsyncioLeftovers(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" reports of failed reads (see above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("exception was never retrieved" in record.getMessage() and is_failed_read_leftover(error))


_DEFAULT_RECORD_FACTORY = logging.getLogRecordFactory()


def _redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """A log record whose message and traceback are already rendered with credentials masked."""
    record = _DEFAULT_RECORD_FACTORY(*args, **kwargs)
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string is logging's to report, as it would
        return record
    record.msg, record.args = redact_text(message), None
    if record.exc_info and record.exc_info[0] is not None:
        record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)
    return record


def _uncaught(kind: type[BaseException], error: BaseException, tb: Any, *, thread: str = "") -> None:
    where = f" in thread {thread}" if thread else ""
    text = "".join(traceback.format_exception(kind, error, tb))
    print(redact_text(f"tracker-eval: uncaught error{where}:\n{text}").rstrip("\n"), file=sys.stderr)


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    _uncaught(args.exc_type, args.exc_value, args.exc_traceback,
              thread=args.thread.name if args.thread is not None else "?")


def mask_secrets_in_output() -> None:
    """Masks credentials in every log record, warning and uncaught exception of this process."""
    if logging.getLogRecordFactory() is not _redacted_record:
        logging.setLogRecordFactory(_redacted_record)
    logging.captureWarnings(True)
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread


def configure_logging(*, verbose: bool = False) -> None:
    """Our logger prints `tracker-eval: message`; libraries log warnings+ only unless verbose."""
    mask_secrets_in_output()
    if verbose:
        os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO"
    root = logging.getLogger()
    if not any(getattr(h, "_tracker_eval", False) for h in root.handlers):
        handler = logging.StreamHandler()
        layout = "%(asctime)s %(name)s %(levelname)s %(message)s" if verbose else "%(message)s"
        handler.setFormatter(logging.Formatter(layout))
        handler._tracker_eval = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("tracker_eval").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    for name in SILENT:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    if not verbose:
        sys.unraisablehook = _quiet_unraisable
        asyncio_logger = logging.getLogger("asyncio")
        if not any(isinstance(f, _AsyncioLeftovers) for f in asyncio_logger.filters):
            asyncio_logger.addFilter(_AsyncioLeftovers())
        try:
            from absl import logging as absl_logging  # noqa: PLC0415

            absl_logging.set_verbosity(absl_logging.ERROR)
        except ImportError:
            pass
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
        # Python warnings of the libraries held back above (e.g. alembic's notes while MLflow
        # migrates its store): library internals, not something the user can act on.
        for name in NOISY:
            warnings.filterwarnings("ignore", module=rf"{re.escape(name)}(\.|$)")
