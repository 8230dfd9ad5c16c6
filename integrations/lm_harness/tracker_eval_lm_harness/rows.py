"""Requests as rows of a few fixed widths: truncation, prefix sharing, packing, padding.

    widths = width_ladder(512)                                   # (128, 256, 512)
    segments = score_segments([(ctx, cont), ...], max_length=512)
    batches = score_batches(segments, rows=32, widths=widths, packing=True)
    batches = generation_batches(contexts, rows=32, widths=widths, max_new=16, stops=[[10]])

Every batch is a dict of int32 numpy arrays of one of at most three shapes per run, so the
compiled program is reused; the last batch of each width is padded with inactive rows.

A scored request follows lm-eval's Hugging Face backend: the model reads
`(context + continuation)[-(max_length + 1):][:-1]` and the last `len(continuation)` positions
predict the continuation. Requests whose input is a prefix of another's (e.g. the choices of a
question whose answers are one token long) are read in that other request's row: a causal model
gives the same logits there, so one row serves them all.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

STOPS, STOP_LEN = 8, 16  # stop sequences checked on device per batch, tokens each (longer: host only)


@dataclasses.dataclass
class Segment:
    """One model input and the predictions read from it.

    Attributes:
      tokens: the input tokens, read from position 0.
      entries: (column, target token, request index) per scored prediction.
    """

    tokens: list[int]
    entries: list[tuple[int, int, int]]


def width_ladder(max_length: int) -> tuple[int, ...]:
    """Row widths of a run: a quarter, a half and all of `max_length`, rounded up to multiples of 8."""
    widths = {max_length}
    for part in (4, 2):
        width = min(max_length, -(-max_length // part // 8) * 8)
        if width >= 16:
            widths.add(width)
    return tuple(sorted(widths))


def score_segments(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_length: int) -> list[Segment]:
    """Segments serving every (context tokens, continuation tokens) pair; request i is pairs[i].

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
    by_host: dict[int, list[tuple[int, int, int]]] = {}
    for i, (_, continuation) in enumerate(pairs):
        n = len(continuation)
        first = len(inputs[i]) - n
        by_host.setdefault(host[i], []).extend((first + k, int(continuation[k]), i) for k in range(n))
    segments = []
    for h, entries in by_host.items():
        # Entries of one row are bounded by its width: split a crowded host into copies.
        for start in range(0, len(entries), max_length):
            segments.append(Segment(tokens=list(inputs[h]), entries=entries[start:start + max_length]))
    return segments


def _empty(rows: int, width: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.zeros((rows, width), np.int32),
        "segment_ids": np.zeros((rows, width), np.int32),
        "positions": np.zeros((rows, width), np.int32),
        "entry_column": np.zeros((rows, width), np.int32),
        "entry_target": np.full((rows, width), -1, np.int32),
        "entry_owner": np.full((rows, width), -1, np.int32),  # host only: which request
        "start": np.zeros((rows,), np.int32),
        "active": np.zeros((rows,), np.int32),
        "new_tokens": np.zeros((), np.int32),
        "stops": np.full((STOPS, STOP_LEN), -1, np.int32),
        "stop_lengths": np.zeros((STOPS,), np.int32),
    }


def _fill_row(batch: dict[str, np.ndarray], row: int, segments: Sequence[Segment]) -> None:
    offset = entry = 0
    for number, segment in enumerate(segments, start=1):
        n = len(segment.tokens)
        batch["tokens"][row, offset:offset + n] = segment.tokens
        batch["segment_ids"][row, offset:offset + n] = number
        batch["positions"][row, offset:offset + n] = np.arange(n)
        entries = np.asarray(segment.entries, np.int32).reshape(-1, 3)
        k = len(entries)
        batch["entry_column"][row, entry:entry + k] = entries[:, 0] + offset
        batch["entry_target"][row, entry:entry + k] = entries[:, 1]
        batch["entry_owner"][row, entry:entry + k] = entries[:, 2]
        entry += k
        offset += n
    batch["active"][row] = 1


def _pack(segments: list[Segment], width: int) -> list[list[Segment]]:
    """Best-fit-decreasing by tokens (the fullest row that still has room), with each row's
    entries bounded by the width too."""
    rows: list[list[Segment]] = []
    entries_left: list[int] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for segment in sorted(segments, key=lambda s: (-len(s.tokens), s.tokens)):
        need, scored = len(segment.tokens), len(segment.entries)
        at = bisect.bisect_left(free, (need, -1))
        while at < len(free) and entries_left[free[at][1]] < scored:
            at += 1
        if at < len(free):
            tokens_left, r = free.pop(at)
        else:
            tokens_left, r = width, len(rows)
            rows.append([])
            entries_left.append(width)
        rows[r].append(segment)
        entries_left[r] -= scored
        bisect.insort(free, (tokens_left - need, r))
    return rows


def _batches(rows_by_width: dict[int, list[list[Segment]]], rows: int) -> list[dict[str, np.ndarray]]:
    out = []
    for width in sorted(rows_by_width):
        packed = rows_by_width[width]
        for first in range(0, len(packed), rows):
            batch = _empty(rows, width)
            for r, row_segments in enumerate(packed[first:first + rows]):
                _fill_row(batch, r, row_segments)
            out.append(batch)
    return out


def score_batches(
    segments: list[Segment], *, rows: int, widths: Sequence[int], packing: bool
) -> list[dict[str, np.ndarray]]:
    """Fixed-shape batches holding every segment, sorted by length.

    Args:
      segments: from `score_segments`.
      rows: rows per batch.
      widths: the run's width ladder; the last is `max_length`.
      packing: several segments per row (kept apart by segment ids); else one per row, in the
        narrowest width that holds it.
    """
    if packing:
        return _batches({widths[-1]: _pack(segments, widths[-1])}, rows)
    by_width: dict[int, list[list[Segment]]] = {}
    for segment in sorted(segments, key=lambda s: -len(s.tokens)):
        # A row's entries are bounded by its width like its tokens (`score_segments` caps both).
        width = next(w for w in widths if w >= max(len(segment.tokens), len(segment.entries)))
        by_width.setdefault(width, []).append([segment])
    return _batches(by_width, rows)


def generation_batches(
    contexts: Sequence[Sequence[int]],
    *,
    rows: int,
    widths: Sequence[int],
    max_new: int,
    stops: Sequence[Sequence[int]],
) -> list[tuple[dict[str, np.ndarray], list[int]]]:
    """Batches of one context per row with room for `max_new` tokens; (batch, request per row).

    Contexts must already be cut to `widths[-1] - max_new` tokens. Stop sequences up to STOP_LEN
    tokens (the first STOPS of them) are checked on device; the host applies all of them anyway.
    """
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    by_width: dict[int, list[int]] = {}
    for i in order:
        width = next(w for w in widths if w >= len(contexts[i]) + max_new)
        by_width.setdefault(width, []).append(i)
    device_stops = [list(s) for s in stops if 0 < len(s) <= STOP_LEN][:STOPS]
    out = []
    for width in sorted(by_width):
        members = by_width[width]
        for first in range(0, len(members), rows):
            chunk = members[first:first + rows]
            batch = _empty(rows, width)
            batch["segment_ids"][:] = 1
            batch["positions"][:] = np.arange(width)
            for r, i in enumerate(chunk):
                batch["tokens"][r, : len(contexts[i])] = contexts[i]
                batch["start"][r] = len(contexts[i])
                batch["active"][r] = 1
            batch["new_tokens"][...] = max_new
            for k, stop in enumerate(device_stops):
                batch["stops"][k, STOP_LEN - len(stop):] = stop
                batch["stop_lengths"][k] = len(stop)
            out.append((batch, chunk))
    return out
