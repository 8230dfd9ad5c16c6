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
