"""Quiet, readable output: our own log lines plainly formatted, noisy libraries held back.

    configure_logging(verbose=False)   # absl/orbax/jax/wandb/mlflow chatter only with --verbose
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

NOISY = ("absl", "jax", "jax._src", "orbax", "orbax.checkpoint", "etils", "wandb", "mlflow", "alembic",
         "urllib3", "git", "matplotlib", "PIL", "tensorstore")


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


def _quiet_unraisable(info: Any) -> None:
    """Drops Orbax/TensorStore's late callbacks into an already-closed event loop.

    After a failed read, TensorStore completes its futures from its own threads and Orbax's
    asyncio glue then calls into a loop that is gone; Python reports that as an unraisable
    traceback on stderr. It carries no information the user's error line lacks.
    """
    if isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value):
        logging.getLogger("tracker_eval").debug("ignored late event-loop callback: %s", info.exc_value)
        return
    _DEFAULT_UNRAISABLE(info)


_DEFAULT_UNRAISABLE = sys.unraisablehook


def configure_logging(*, verbose: bool = False) -> None:
    """Our logger prints `tracker-eval: message`; libraries log warnings+ only unless verbose."""
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
    if not verbose:
        sys.unraisablehook = _quiet_unraisable
        try:
            from absl import logging as absl_logging  # noqa: PLC0415

            absl_logging.set_verbosity(absl_logging.ERROR)
        except ImportError:
            pass
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
