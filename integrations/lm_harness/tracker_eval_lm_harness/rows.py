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
import dataclasses
import itertools
from collections.abc import Iterator, Sequence

import numpy as np

DEVICE_FIELDS = ("tokens", "segment_ids", "positions", "target", "extra_column", "extra_target")
EXTRAS = 32  # extra predictions per row (at most the row's width)


@dataclasses.dataclass
class Segment:
    """One model input and the predictions read from it.

    Attributes:
      tokens: the input tokens, read from position 0.
      dense: (column, target token, request index) rows, one per column at most.
      extra: further predictions at columns `dense` already has (prefix sharing).
    """

    tokens: np.ndarray
    dense: np.ndarray
    extra: np.ndarray


_NONE = np.zeros((0, 3), np.int32)


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
    flat: list[int] = []
    bounds = [0]
    for index, (context, continuation) in enumerate(pairs):
        if not context or not continuation or len(continuation) > max_length:
            raise ValueError(
                f"request {index} has {len(context)} context and {len(continuation)} continuation tokens; "
                f"both must be non-empty and the continuation at most max_length={max_length} tokens"
            )
        flat += (list(context) + list(continuation))[-(max_length + 1):-1]
        bounds.append(len(flat))
    # Big-endian: comparing the bytes compares the token sequences (order and prefixes alike).
    tokens = np.asarray(flat, ">u4")
    inputs = [tokens[a:b] for a, b in itertools.pairwise(bounds)]
    keys = [array.tobytes() for array in inputs]
    order = sorted(range(len(pairs)), key=keys.__getitem__)
    host: dict[int, int] = {}
    # In lexicographic order a sequence that is a prefix of another is a prefix of its successor.
    for rank in range(len(order) - 1, -1, -1):
        i = order[rank]
        j = order[rank + 1] if rank + 1 < len(order) else None
        host[i] = host[j] if j is not None and keys[j].startswith(keys[i]) else i
    # Every prediction as (column, target, request), request by request.
    counts = np.array([len(continuation) for _, continuation in pairs], np.int64)
    ends = np.cumsum(counts)
    within = np.arange(ends[-1]) - np.repeat(ends - counts, counts)
    first = np.diff(np.asarray(bounds)) - counts
    entries = np.column_stack((np.repeat(first, counts) + within,
                               np.fromiter(itertools.chain.from_iterable(c for _, c in pairs), np.int32, ends[-1]),
                               np.repeat(np.arange(len(pairs)), counts))).astype(np.int32)
    served: dict[int, list[np.ndarray]] = {}
    for i, end in enumerate(ends.tolist()):
        served.setdefault(host[i], []).append(entries[end - counts[i]:end])
    segments = []
    for h, parts in served.items():
        if len(parts) == 1:  # one request: its columns are distinct
            segments.append(Segment(tokens=inputs[h], dense=parts[0], extra=_NONE))
            continue
        entries = np.concatenate(parts)
        entries = entries[np.argsort(entries[:, 0], kind="stable")]
        while len(entries):
            first = np.ones(len(entries), bool)
            first[1:] = entries[1:, 0] != entries[:-1, 0]
            extra = np.flatnonzero(~first)
            taken = np.flatnonzero(first).tolist() + extra[:max_extras].tolist()
            kept = np.ones(len(entries), bool)
            kept[taken] = False
            segments.append(Segment(tokens=inputs[h], dense=entries[first], extra=entries[extra[:max_extras]]))
            entries = entries[kept]
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


def _fill(batch: dict[str, np.ndarray], rows: Sequence[Sequence[Segment]]) -> None:
    """Writes each row's segments one after another, with all of a batch's rows at once."""
    placed = [(r, offset, number, segment) for r, row in enumerate(rows)
              for number, segment, offset in zip(itertools.count(1), row, _offsets(row))]
    seg_row = np.array([r for r, _, _, _ in placed], np.int64)
    seg_offset = np.array([o for _, o, _, _ in placed], np.int64)
    lengths = np.array([len(s.tokens) for _, _, _, s in placed], np.int64)
    token_row = np.repeat(seg_row, lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    token_column = np.repeat(seg_offset, lengths) + within
    batch["tokens"][token_row, token_column] = np.concatenate([s.tokens for _, _, _, s in placed])
    batch["segment_ids"][token_row, token_column] = np.repeat([n for _, _, n, _ in placed], lengths)
    batch["positions"][token_row, token_column] = within
    for kind in ("dense", "extra"):
        counts = np.array([len(getattr(s, kind)) for _, _, _, s in placed], np.int64)
        if not counts.sum():
            continue
        entries = np.concatenate([getattr(s, kind) for _, _, _, s in placed])
        row = np.repeat(seg_row, counts)
        column = entries[:, 0] + np.repeat(seg_offset, counts)
        if kind == "dense":
            batch["target"][row, column] = entries[:, 1]
            batch["owner"][row, column] = entries[:, 2]
        else:  # slots 0, 1, ... within each row (rows come in order)
            slot = np.arange(len(row)) - np.searchsorted(row, row)
            batch["extra_column"][row, slot] = column
            batch["extra_target"][row, slot] = entries[:, 1]
            batch["extra_owner"][row, slot] = entries[:, 2]
    batch["active"][: len(rows)] = 1


def _offsets(row: Sequence[Segment]) -> list[int]:
    return np.cumsum([0] + [len(s.tokens) for s in row[:-1]]).tolist()


def _pack(segments: list[Segment], width: int, *, max_rows: int | None = None) -> tuple[list[list[Segment]],
                                                                                      list[Segment]]:
    """Best-fit-decreasing by tokens (the fullest row that still has room), with each row's extra
    predictions bounded too; segments that fit no row once there are `max_rows` are returned apart."""
    rows: list[list[Segment]] = []
    overflow: list[Segment] = []
    extras_left: list[int] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for segment in sorted(segments, key=lambda s: -len(s.tokens)):
        need, extras = len(segment.tokens), len(segment.extra)
        at = bisect.bisect_left(free, (need, -1))
        while at < len(free) and extras_left[free[at][1]] < extras:
            at += 1
        if at < len(free):
            tokens_left, r = free.pop(at)
        elif max_rows is not None and len(rows) >= max_rows:
            overflow.append(segment)
            continue
        else:
            tokens_left, r = width, len(rows)
            rows.append([])
            extras_left.append(extras_capacity(width))
        rows[r].append(segment)
        extras_left[r] -= extras
        bisect.insort(free, (tokens_left - need, r))
    return rows, overflow


def _pack_widths(segments: list[Segment], *, rows: int, widths: Sequence[int]) -> dict[int, list[list[Segment]]]:
    """Packed rows by width: full batches of the widest rows, and what would leave the last batch
    mostly padding packed into narrower rows instead, when that costs fewer row-positions.

    With lengths spread over 16..max_length, the widest batches come out ~99% full except the last,
    which is often mostly padding; its segments (the shortest: they are placed last) usually fit
    a batch a quarter as wide.
    """
    width = widths[-1]
    packed, _ = _pack(segments, width)
    full = len(packed) // rows * rows
    best, cost = {width: packed}, -(-len(packed) // rows) * width
    if full == len(packed):
        return best
    kept, overflow = _pack(segments, width, max_rows=full)
    longest = max(len(s.tokens) for s in overflow)
    for narrow in widths[:-1]:
        if narrow < longest:
            continue
        tail, _ = _pack(overflow, narrow)
        tail_cost = full // rows * width + -(-len(tail) // rows) * narrow
        if tail_cost < cost:
            best, cost = ({width: kept, narrow: tail} if kept else {narrow: tail}), tail_cost
    return best


def _batches(rows_by_width: dict[int, list[list[Segment]]], rows: int) -> Iterator[dict[str, np.ndarray]]:
    for width in sorted(rows_by_width):
        packed = rows_by_width[width]
        for first in range(0, len(packed), rows):
            batch = _empty(rows, width)
            _fill(batch, packed[first:first + rows])
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
      packing: several segments per row (kept apart by segment ids), in full-width rows but for a
        last batch that narrower rows hold for less; else one per row, in the narrowest width
        that holds it.
    """
    if packing:
        return _batches(_pack_widths(segments, rows=rows, widths=widths), rows)
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
    _fill(batch, [[Segment(tokens=np.asarray(s, np.int32), dense=_NONE, extra=_NONE)] for s in sequences])
    return batch
