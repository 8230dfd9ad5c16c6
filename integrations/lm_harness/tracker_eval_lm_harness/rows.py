"""Requests as rows of a few fixed widths: truncation, prefix sharing, packing, padding.

    widths = width_ladder(512)                                   # (128, 256, 512)
    segments = score_segments([(ctx, cont), ...], max_length=512)
    batches = score_batches(segments, rows=32, widths=widths, packing=True)
    batch = step_batch(sequences, rows=32, widths=widths)        # greedy generation: one step

Every batch is a dict of int32 numpy arrays of one of at most three widths per run, so the
compiled program is reused; the last batch of each width is padded with inactive rows.

A scored request follows lm-eval's Hugging Face backend: the model reads
`(context + continuation)[-(max_length + 1):][:-1]` and the last `len(continuation)` positions
predict the continuation. Requests whose input is a prefix of another's (e.g. the choices of a
question whose answers are one token long) are read in that other request's row: a causal model
gives the same logits there, so one row serves them all.

A prediction asked for is a `target` at its column (one per column, read densely like the model's
own output), or, when a column already has one (prefix sharing), one of a row's few `extra`
(column, target) pairs, which the program gathers one by one.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

DEVICE_FIELDS = ("tokens", "segment_ids", "positions", "target", "extra_column", "extra_target")
EXTRAS = 32  # extra predictions per row (at most the row's width)


@dataclasses.dataclass
class Segment:
    """One model input and the predictions read from it.

    Attributes:
      tokens: the input tokens, read from position 0.
      entries: (column, target token, request index) per scored prediction.
    """

    tokens: list[int]
    entries: list[tuple[int, int, int]]

    def extras(self) -> int:
        """Predictions beyond the first at their column."""
        return len(self.entries) - len({column for column, _, _ in self.entries})


def width_ladder(max_length: int) -> tuple[int, ...]:
    """Row widths of a run: a quarter, a half and all of `max_length`, rounded up to multiples of 8."""
    widths = {max_length}
    for part in (4, 2):
        width = min(max_length, -(-max_length // part // 8) * 8)
        if width >= 16:
            widths.add(width)
    return tuple(sorted(widths))


def extras_capacity(width: int) -> int:
    return min(EXTRAS, width)


def score_segments(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_length: int, max_extras: int = EXTRAS
) -> list[Segment]:
    """Segments serving every (context tokens, continuation tokens) pair; request i is pairs[i].

    A host serving more than `max_extras` predictions beyond one per column is split into copies.

    Raises:
      ValueError: a pair lm-eval's backend would refuse (empty context or continuation, or a
        continuation longer than `max_length`), naming the request.
    """
    inputs: list[tuple[int, ...]] = []
    for index, (context, continuation) in enumerate(pairs):
        if not context or not continuation or len(continuation) > max_length:
            raise ValueError(
                f"request {index} has {len(context)} context and {len(continuation)} continuation tokens; "
                f"both must be non-empty and the continuation at most max_length={max_length} tokens"
            )
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        inputs.append(tuple(whole[:-1]))
    order = sorted(range(len(pairs)), key=lambda i: inputs[i])
    host = {}
    # In lexicographic order a sequence that is a prefix of another is a prefix of its successor.
    for rank in range(len(order) - 1, -1, -1):
        i = order[rank]
        j = order[rank + 1] if rank + 1 < len(order) else None
        host[i] = host[j] if j is not None and inputs[j][: len(inputs[i])] == inputs[i] else i
    by_host: dict[int, dict[int, list[tuple[int, int, int]]]] = {}
    for i, (_, continuation) in enumerate(pairs):
        n = len(continuation)
        first = len(inputs[i]) - n
        columns = by_host.setdefault(host[i], {})
        for k in range(n):
            columns.setdefault(first + k, []).append((first + k, int(continuation[k]), i))
    segments = []
    for h, columns in by_host.items():
        queues = [collections.deque(entries) for entries in columns.values()]
        while any(queues):
            # A copy takes one prediction per column, then up to `max_extras` more.
            entries = [queue.popleft() for queue in queues if queue]
            for queue in queues:
                while queue and len(entries) - len({c for c, _, _ in entries}) < max_extras:
                    entries.append(queue.popleft())
            segments.append(Segment(tokens=list(inputs[h]), entries=entries))
    return segments


def _empty(rows: int, width: int) -> dict[str, np.ndarray]:
    """A batch: the program's input `device` [rows, fields, width] (one array, one transfer) and, as
    views of it, one array per field; then what only the host needs."""
    device = np.zeros((rows, len(DEVICE_FIELDS), width), np.int32)
    batch = {name: device[:, k] for k, name in enumerate(DEVICE_FIELDS)}
    batch["target"][:] = -1
    batch["extra_target"][:] = -1  # extra_column: only the first `extras_capacity(width)` are used
    batch.update(
        device=device,
        owner=np.full((rows, width), -1, np.int32),  # which request, per column ...
        extra_owner=np.full((rows, extras_capacity(width)), -1, np.int32),  # ... and per extra
        active=np.zeros((rows,), np.int32),  # real rows
    )
    return batch


def _fill_row(batch: dict[str, np.ndarray], row: int, segments: Sequence[Segment]) -> None:
    offset = extra = 0
    for number, segment in enumerate(segments, start=1):
        n = len(segment.tokens)
        batch["tokens"][row, offset:offset + n] = segment.tokens
        batch["segment_ids"][row, offset:offset + n] = number
        batch["positions"][row, offset:offset + n] = np.arange(n)
        for column, target, owner in segment.entries:
            if batch["owner"][row, offset + column] < 0:
                batch["target"][row, offset + column] = target
                batch["owner"][row, offset + column] = owner
            else:
                batch["extra_column"][row, extra] = offset + column
                batch["extra_target"][row, extra] = target
                batch["extra_owner"][row, extra] = owner
                extra += 1
        offset += n
    batch["active"][row] = 1


def _pack(segments: list[Segment], width: int) -> list[list[Segment]]:
    """Best-fit-decreasing by tokens (the fullest row that still has room), with each row's extra
    predictions bounded too."""
    rows: list[list[Segment]] = []
    extras_left: list[int] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for segment in sorted(segments, key=lambda s: (-len(s.tokens), s.tokens)):
        need, extras = len(segment.tokens), segment.extras()
        at = bisect.bisect_left(free, (need, -1))
        while at < len(free) and extras_left[free[at][1]] < extras:
            at += 1
        if at < len(free):
            tokens_left, r = free.pop(at)
        else:
            tokens_left, r = width, len(rows)
            rows.append([])
            extras_left.append(extras_capacity(width))
        rows[r].append(segment)
        extras_left[r] -= extras
        bisect.insort(free, (tokens_left - need, r))
    return rows


def _batches(rows_by_width: dict[int, list[list[Segment]]], rows: int) -> Iterator[dict[str, np.ndarray]]:
    for width in sorted(rows_by_width):
        packed = rows_by_width[width]
        for first in range(0, len(packed), rows):
            batch = _empty(rows, width)
            for r, row_segments in enumerate(packed[first:first + rows]):
                _fill_row(batch, r, row_segments)
            yield batch


def score_batches(
    segments: list[Segment], *, rows: int, widths: Sequence[int], packing: bool
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape batches holding every segment, sorted by length; each is filled when it is taken,
    so filling overlaps the device's work on the previous ones.

    Args:
      segments: from `score_segments` with `max_extras` at most `extras_capacity(widths[0])`.
      rows: rows per batch.
      widths: the run's width ladder; the last is `max_length`.
      packing: several segments per row (kept apart by segment ids); else one per row, in the
        narrowest width that holds it.
    """
    if packing:
        return _batches({widths[-1]: _pack(segments, widths[-1])}, rows)
    by_width: dict[int, list[list[Segment]]] = {}
    for segment in sorted(segments, key=lambda s: -len(s.tokens)):
        width = next(w for w in widths if w >= len(segment.tokens))
        by_width.setdefault(width, []).append([segment])
    return _batches(by_width, rows)


def step_batch(sequences: Sequence[Sequence[int]], *, rows: int, widths: Sequence[int]) -> dict[str, np.ndarray]:
    """One greedy-generation step: each sequence in its own row (the program's argmax after its last
    token is the next one). The width is the narrowest that holds the longest."""
    longest = max(len(s) for s in sequences)
    batch = _empty(rows, next(w for w in widths if w >= longest))
    for r, sequence in enumerate(sequences):
        _fill_row(batch, r, [Segment(tokens=list(sequence), entries=[])])
    return batch
