"""Why a delivery failed, in three kinds: the one place that tells a poison result from an outage.

    kind = classify(error)
    if kind is FailureKind.PERMANENT: ...     # undeliverable now: the tracker will never take it
    elif kind is FailureKind.UNAVAILABLE: ... # the tracker is down: retry forever, count nothing
    else: ...                                 # FailureKind.TRANSIENT: retry, count toward the limit

A logger says what it knows by raising (or chaining from) `PermanentDeliveryError` (the tracker
refused this result: an HTTP 4xx, a value it cannot store) or `TrackerUnavailableError` (it cannot
be reached), or by marking a library's own exception, which keeps its type for callers
(``mark(error, FailureKind.PERMANENT); raise``). Without any of these, the exception chain
decides: a refused connection, a timeout, a full disk are outages; anything else is transient and
counts toward ``watch.max_delivery_attempts``, after which the result is undeliverable too. An
outage never counts, so a tracker that is down for a day gets its whole backlog, in step order,
when it comes back.
"""

from __future__ import annotations

import enum
import errno
import socket

__all__ = ["FailureKind", "PermanentDeliveryError", "TrackerUnavailableError", "classify", "mark"]

_OUTAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_MARK = "tracker_eval_failure_kind"


class PermanentDeliveryError(Exception):
    """The destination will never accept this result as it is (e.g. HTTP 400, a NaN it refuses).

    The delivery is marked undeliverable at once; ``tracker-eval retry`` queues it again once the
    cause is fixed (e.g. ``nan_policy`` changed).
    """


class TrackerUnavailableError(Exception):
    """The destination cannot be reached now; the result is not at fault. Retried, never counted."""


class FailureKind(enum.StrEnum):
    """How a failed delivery is treated."""

    PERMANENT = "permanent"  # undeliverable at once
    UNAVAILABLE = "unavailable"  # an outage: retried with backoff, never counted
    TRANSIENT = "transient"  # retried with backoff; undeliverable after max_delivery_attempts


def mark(error: BaseException, kind: FailureKind) -> BaseException:
    """Says how delivery must treat `error` without changing its type; returns it, to ``raise``.

    Args:
      error: the exception a tracker library raised.
      kind: what it means for this result.

    Returns:
      `error` itself.
    """
    setattr(error, _MARK, FailureKind(kind))
    return error


def classify(error: BaseException) -> FailureKind:
    """The kind of a logger failure, from the exception and the ones it was raised from.

    Args:
      error: what the logger call raised.

    Returns:
      The first kind stated (`mark`, `PermanentDeliveryError`, `TrackerUnavailableError`) found
      walking ``__cause__``/``__context__`` from `error` inward (a context that
      ``raise ... from`` suppressed is not part of the chain, as in a traceback); otherwise
      UNAVAILABLE for connection errors, timeouts, name resolution and a full disk, else TRANSIENT.
    """
    for link in _chain(error):
        marked = getattr(link, _MARK, None)
        if marked is not None:
            return FailureKind(marked)
        if isinstance(link, PermanentDeliveryError):
            return FailureKind.PERMANENT
        if isinstance(link, TrackerUnavailableError):
            return FailureKind.UNAVAILABLE
    for link in _chain(error):
        if isinstance(link, (ConnectionError, TimeoutError, socket.gaierror)):
            return FailureKind.UNAVAILABLE
        if isinstance(link, OSError) and link.errno in _OUTAGE_ERRNOS:
            return FailureKind.UNAVAILABLE
    return FailureKind.TRANSIENT


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and not any(link is s for s in seen) and len(seen) < 32:
        seen.append(link)
        # As Python's own traceback does: ``raise X from None`` (or ``from cause``) hides the
        # exception being handled, so a refusal raised while handling a connection error is a refusal.
        if link.__cause__ is not None:
            link = link.__cause__
        elif link.__suppress_context__:
            link = None
        else:
            link = link.__context__
    return seen
