"""Scoring in fixed chunks against the answers kept for a (step, suite), so a later attempt continues.

    logp, greedy = score_kept(pairs, answers=store, size=rows * CHUNK_BATCHES, widths=widths,
                              max_length=512, score=lm.score_now)

Requests are cut into chunks that depend on the requests alone (by row width, then by their input
tokens, so requests that share a prefix stay together), and a chunk is scored as a whole: its
answers are kept as soon as its results are back, and an attempt after a kill recomputes only the
chunks that have an answer missing. A chunk is the same batches in every attempt, so a resumed
attempt gives the bits of an uninterrupted one; a chunk of CHUNK_BATCHES batches is a few seconds
of device work, which is what a kill may lose.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from tracker_eval.ledger.answers import request_key

CHUNK_BATCHES = 16  # full batches per chunk: what a kill may lose, and one wait for results
FLUSH_S = 0.25  # longest a kept answer waits in memory for its batch's transaction


class Answers(Protocol):
    """Where answers are kept (`tracker_eval.ledger.answers.AnswerStore` is one)."""

    def lookup(self, keys: Sequence[str]) -> dict[str, Any]: ...

    def keep(self, key: str, answer: Any) -> None: ...


Pairs = Sequence[tuple[Sequence[int], Sequence[int]]]


def pair_key(context: Sequence[int], continuation: Sequence[int]) -> str:
    """A scored pair's key: its tokens (the scope already names the tokenizer, model and step)."""
    return request_key("score", [[int(t) for t in context], [int(t) for t in continuation]])


def chunks(pairs: Pairs, *, size: int, widths: Sequence[int], max_length: int) -> list[list[int]]:
    """The pairs' indices in chunks of up to `size`: by the width their input needs, then by tokens."""
    def order_key(i: int) -> tuple[int, tuple[int, ...]]:
        context, continuation = pairs[i]
        tokens = (list(context) + list(continuation))[-(max_length + 1):-1]
        return bisect.bisect_left(widths, len(tokens)), tuple(int(t) for t in tokens)

    order = sorted(range(len(pairs)), key=order_key)
    return [order[start:start + size] for start in range(0, len(order), size)]


def score_kept(
    pairs: Pairs, *, answers: Answers, size: int, widths: Sequence[int], max_length: int,
    score: Callable[[Pairs], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, int]:
    """(log-likelihood, is greedy, how many were kept answers) of every pair; `score` runs the rest."""
    n = len(pairs)
    keys = [pair_key(context, continuation) for context, continuation in pairs]
    known = answers.lookup(keys)
    logp = np.zeros(n, np.float64)
    greedy = np.zeros(n, bool)
    reused = 0
    for chunk in chunks(pairs, size=size, widths=widths, max_length=max_length):
        if all(keys[i] in known for i in chunk):
            for i in chunk:
                logp[i], greedy[i] = known[keys[i]]
            reused += len(chunk)
            continue
        values, best = score([pairs[i] for i in chunk])
        for i, value, hit in zip(chunk, values.tolist(), best.tolist(), strict=True):
            logp[i], greedy[i] = value, hit
            answers.keep(keys[i], [value, hit])
    return logp, greedy, reused


def file_identity(path: str) -> str:
    """`path` and a hash of its bytes (a tokenizer file changed in place is another tokenizer);
    a name that is not a file (`bytes`) as it is."""
    if not os.path.isfile(path):
        return path
    with open(path, "rb") as f:
        return f"{path}@{hashlib.sha256(f.read()).hexdigest()[:16]}"


def generation_key(context: Sequence[int], until: Sequence[str], max_new: int) -> str:
    """A generation's key: its prompt tokens and what ends it (greedy decoding has no other option)."""
    return request_key("generate", [[int(t) for t in context], list(until), int(max_new)])
