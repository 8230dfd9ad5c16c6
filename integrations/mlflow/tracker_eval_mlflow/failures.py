"""What an MLflow failure means for delivery: refused (never retried), unreachable (an outage), or neither.

    with classified():
        client.log_batch(...)     # HTTP 400: marked permanent; connection refused: marked unavailable

The `MlflowException` keeps its type (callers may catch it); `tracker_eval.loggers.failures.mark`
tells delivery what it means. A refused result is undeliverable at once, an outage is retried for as
long as it lasts without counting, anything else counts toward ``watch.max_delivery_attempts``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tracker_eval.loggers.failures import FailureKind, PermanentDeliveryError, mark

# Answers that say the server is down or overloaded rather than that it refuses the request.
_UNAVAILABLE_STATUSES = (408, 429, 502, 503, 504)


class NonFiniteMetricError(PermanentDeliveryError, ValueError):
    """A metric is NaN or infinite and ``nan_policy`` is ``error``: this result is never sent."""


@contextlib.contextmanager
def classified() -> Iterator[None]:
    """Marks an `MlflowException` raised inside with what it means for delivery, and re-raises it.

    HTTP 4xx other than 408 and 429 is permanent (the server refuses the request); no connection, a
    timeout, exhausted retries and 408/429/502/503/504 are an outage; anything else is unmarked.
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as error:
        status = error.get_http_status_code()
        if _unreachable(error) or status in _UNAVAILABLE_STATUSES:
            mark(error, FailureKind.UNAVAILABLE)
        elif 400 <= status < 500:
            mark(error, FailureKind.PERMANENT)
        raise


def _unreachable(error: BaseException) -> bool:
    # MLflow wraps connection failures, timeouts and exhausted retries in a plain MlflowException
    # raised while handling the requests error, which stays on the chain.
    import requests

    kinds = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError)
    link: BaseException | None = error
    for _ in range(16):
        if link is None:
            return False
        if isinstance(link, kinds):
            return True
        link = link.__cause__ or link.__context__
    return False
