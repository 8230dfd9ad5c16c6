"""The best step of a stream for one metric, kept in the ledger as results are stored.

A new value replaces the best when strictly better (lower for "min", higher for "max"); NaN never
counts; a tie goes to the lower step, so the answer does not depend on evaluation order.

    with write_transaction(conn):
        offer_best(conn, stream, step=300, value=0.42, mode="min")
    read_best(conn, stream)   # (300, 0.42)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from tracker_eval.ledger.files import decoded_metrics


def beats(step: int, value: float, *, best: tuple[int, float] | None, mode: str) -> bool:
    """Whether (`step`, `value`) replaces `best`: strictly better, or equal at a lower step; NaN never."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    best_step, best_value = best
    better = value < best_value if mode == "min" else value > best_value
    return better or (value == best_value and step < best_step)


def best_of(results: Iterable[tuple[int, Mapping[str, float]]], *, metric: str, mode: str) -> tuple[int, float] | None:
    """The best (step, value) of `metric` among (step, metrics) pairs, by the rules above; None if none has it."""
    best = None
    for step, metrics in results:
        if metric in metrics and beats(step, float(metrics[metric]), best=best, mode=mode):
            best = (step, float(metrics[metric]))
    return best


def offer_best(conn: Any, stream: int, *, step: int, value: float, mode: str) -> None:
    """Makes `step` the best of `stream` if `value` beats the current best (call inside a write)."""
    best_step, best_value = conn.execute(
        "SELECT best_step, best_value FROM streams WHERE stream_id = ?", (stream,)
    ).fetchone()
    current = None if best_step is None else (best_step, best_value)
    if beats(step, value, best=current, mode=mode):
        conn.execute("UPDATE streams SET best_step = ?, best_value = ? WHERE stream_id = ?", (step, value, stream))


def reconcile_best(conn: Any, stream: int, *, metric: str | None, mode: str) -> None:
    """Records which metric is tracked; when it changed since the last run, recomputes the best
    from every stored result (call inside a write)."""
    wanted = (metric, mode if metric else None)
    stored = conn.execute("SELECT best_metric, best_mode FROM streams WHERE stream_id = ?", (stream,)).fetchone()
    if tuple(stored) == wanted:
        return
    conn.execute(
        "UPDATE streams SET best_metric = ?, best_mode = ?, best_step = NULL, best_value = NULL "
        "WHERE stream_id = ?",
        (*wanted, stream),
    )
    if metric is None:
        return
    rows = conn.execute(
        "SELECT step, result_json FROM steps WHERE stream_id = ? AND result_json IS NOT NULL", (stream,)
    ).fetchall()
    for step, payload in rows:
        metrics = decoded_metrics(payload)
        if metric in metrics:
            offer_best(conn, stream, step=step, value=metrics[metric], mode=mode)


def tracked_metric(conn: Any, stream: int) -> tuple[str | None, str | None]:
    """The (metric, mode) whose best the ledger keeps for `stream`; (None, None) when none."""
    return tuple(conn.execute("SELECT best_metric, best_mode FROM streams WHERE stream_id = ?", (stream,)).fetchone())


def read_best(conn: Any, stream: int) -> tuple[int, float] | None:
    """The best step of `stream` and its value, or None when no stored result had the metric."""
    best_step, best_value = conn.execute(
        "SELECT best_step, best_value FROM streams WHERE stream_id = ?", (stream,)
    ).fetchone()
    return None if best_step is None else (best_step, best_value)
