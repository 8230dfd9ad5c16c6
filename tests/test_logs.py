"""Quiet output: leftovers of failed Orbax reads never reach the log; other errors always do."""

from __future__ import annotations

import logging
import sys

import pytest

from tracker_eval.logs import NOISY, configure_logging

SPEC = "OUT_OF_RANGE: Error opening \"zarr\" driver [tensorstore_spec='{\"driver\":\"zarr\"}']"


def _asyncio_report(error: BaseException) -> logging.LogRecord:
    # What asyncio's default exception handler logs when a failed task is garbage collected.
    return logging.getLogger("asyncio").makeRecord(
        "asyncio", logging.ERROR, __file__, 1, "Task exception was never retrieved\nfuture: <Task ...>", (),
        (type(error), error, None),
    )


@pytest.fixture
def restore_logging():
    """configure_logging changes process-wide state; put it back for the tests that follow."""
    names = ["", "asyncio", "tracker_eval", *NOISY]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), list(logging.getLogger(n).filters))
             for n in names}
    hook = sys.unraisablehook
    yield
    sys.unraisablehook = hook
    for name, (level, handlers, filters) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.filters[:] = filters


def test_asyncio_reports_of_failed_reads_are_dropped_and_other_errors_kept(restore_logging):
    configure_logging(verbose=False)
    asyncio_logger = logging.getLogger("asyncio")
    assert not asyncio_logger.filter(_asyncio_report(ValueError(SPEC)))
    assert not asyncio_logger.filter(_asyncio_report(RuntimeError("Event loop is closed")))
    assert asyncio_logger.filter(_asyncio_report(ValueError("a bug in someone's coroutine")))
    other = asyncio_logger.makeRecord("asyncio", logging.ERROR, __file__, 1, "Unclosed client session", (), None)
    assert asyncio_logger.filter(other)
    configure_logging(verbose=False)  # idempotent: one filter, not two
    assert len(asyncio_logger.filters) == 1


def test_library_warnings_stay_off_the_terminal_unless_verbose(restore_logging, monkeypatch):
    import warnings

    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "ERROR")  # verbose sets it; put back at teardown

    def raised(module: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            configure_logging(verbose=verbose)
            warnings.warn_explicit("note", UserWarning, "x.py", 1, module=module)
        return [str(w.message) for w in caught]

    verbose = False
    assert raised("alembic.operations.batch") == [] and raised("sqlalchemy.engine") == []
    assert raised("my_project.eval") == ["note"]  # the user's own warnings are theirs to see
    verbose = True
    assert raised("alembic.operations.batch") == ["note"]
