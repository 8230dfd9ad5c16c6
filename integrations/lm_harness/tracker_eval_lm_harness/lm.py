"""lm-eval's `LM` interface served by the compiled program: what lm-eval calls on process 0.

    lm = HarnessLM(tokenizer=tok, engine=engine, params=params, max_length=512, widths=(128, 256, 512),
                   packing=False)
    lm_eval.evaluator.evaluate(lm, task_dict, ...)

It subclasses lm-eval's `TemplateLM`, so context/continuation splitting, the moved trailing space and
the empty-context prefix token are lm-eval's own code; truncation, rolling windows and generation
follow its Hugging Face backend. Results come back from the device once per lm-eval call, and
per-token log-probabilities are summed per request in float64 on the host.

Given `answers` (the kept answers of this (step, suite), see `resume`), scoring runs in fixed
chunks whose answers are kept as they come back, and generations are kept one by one as they end;
what an earlier attempt kept is not computed again.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from tracker_eval_lm_harness import generation
from tracker_eval_lm_harness.engine import Engine
from tracker_eval_lm_harness.resume import CHUNK_BATCHES, Answers, score_kept
from tracker_eval_lm_harness.rows import extras_capacity, score_batches, score_segments
from tracker_eval_lm_harness.tokenizer import Tokenizer

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's Hugging Face backend default


class HarnessLM(TemplateLM):
    """A causal LM on a device mesh, seen by lm-eval as one process (world size 1)."""

    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        engine: Engine,
        params: Any,
        max_length: int,
        widths: Sequence[int],
        packing: bool,
        answers: Answers | None = None,
    ) -> None:
        super().__init__()
        self.tok = tokenizer
        self.engine = engine
        self.params = params
        self._max_length = max_length
        self.widths = tuple(widths)
        self.packing = packing
        self.answers = answers
        self.reused = 0  # scored pairs and generations served from kept answers ...
        self.kept = 0  # ... and computed and kept in this attempt
        self.requests: collections.Counter[str] = collections.Counter()
        self.seconds = 0.0  # inside the request methods: the rest of a run is lm-eval's own work
        self.rows_scored = 0  # real rows of scoring batches ...
        self.segments_scored = 0  # ... and the model inputs they held (more than rows when packed)
        self._prefix_text = tokenizer.decode([tokenizer.prefix_token_id], skip_special_tokens=False)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any
    ) -> list[int]:
        """As the Hugging Face backend: the tokenizer's own special tokens unless the text already
        starts with the prefix token's text."""
        add = add_special_tokens
        if add is None:
            add = not (self._prefix_text and string.startswith(self._prefix_text))
        ids = self.tok.encode(string, add_special_tokens=add)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
        ids = [tokens] if isinstance(tokens, (int, np.integer)) else list(tokens)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """(log-likelihood, is greedy) of each continuation after its context, as token lists."""
        if self.answers is None or not pairs:
            return self.score_now(pairs)
        size = self.engine.rows * CHUNK_BATCHES  # rows of the first width: fewer batches when packed
        logp, greedy, reused = score_kept(pairs, answers=self.answers, size=size, widths=self.widths,
                                          max_length=self.max_length, score=self.score_now)
        self.reused += reused
        self.kept += len(pairs) - reused
        return logp, greedy

    def score_now(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """As `score`, every pair run on the device now (one wait for results, after the last batch)."""
        n = len(pairs)
        if n == 0:
            return np.zeros(0), np.zeros(0, bool)
        segments = score_segments(pairs, max_length=self.max_length, max_extras=extras_capacity(self.widths[0]))
        batches: list[dict[str, np.ndarray]] = []

        def built() -> Iterator[dict[str, np.ndarray]]:
            for batch in score_batches(segments, rows=self.engine.rows, widths=self.widths, packing=self.packing):
                batches.append(batch)
                yield batch

        outputs = self.engine.execute(self.params, built())
        self.rows_scored += int(sum(batch["active"].sum() for batch in batches))
        self.segments_scored += len(segments)
        total = np.zeros(n, np.float64)
        missed = np.zeros(n, np.int64)
        for batch, output in zip(batches, outputs, strict=True):
            extras = batch["extra_owner"].shape[1]
            logp, best, extra_logp = output[:, 0], output[:, 1].astype(np.int64), output[:, 2, :extras]
            extra_columns = batch["extra_column"][:, :extras]
            extra_hit = np.take_along_axis(best, extra_columns, axis=1) == batch["extra_target"][:, :extras]
            for owner, values, hit in ((batch["owner"], logp, best == batch["target"]),
                                       (batch["extra_owner"], extra_logp, extra_hit)):
                real = owner >= 0
                total += np.bincount(owner[real], weights=values[real].astype(np.float64), minlength=n)
                missed += np.bincount(owner[real], weights=~hit[real], minlength=n).astype(np.int64)
        return total, missed == 0

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        logp, greedy = self.score([(context, continuation) for _, context, continuation in requests])
        return [(float(value), bool(best)) for value, best in zip(logp, greedy, strict=True)]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        start = time.perf_counter()
        self.requests["loglikelihood"] += len(requests)
        try:
            return super().loglikelihood(requests, disable_tqdm=True)
        finally:
            self.seconds += time.perf_counter() - start

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Per text, the sum over lm-eval's disjoint rolling windows of `max_length` tokens (context 1)."""
        start = time.perf_counter()
        self.requests["loglikelihood_rolling"] += len(requests)
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            for context, predicted in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((context, predicted))
                owners.append(index)
        logp, _ = self.score(windows)
        totals = [0.0] * len(requests)
        for owner, value in zip(owners, logp, strict=True):  # window order, as the backend sums
            totals[owner] += float(value)
        self.seconds += time.perf_counter() - start
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        start = time.perf_counter()
        self.requests["generate_until"] += len(requests)
        try:
            return generation.generate_until(self, requests)
        finally:
            self.seconds += time.perf_counter() - start

    def generation_context(self, text: str, *, max_tokens: int) -> list[int]:
        """A generation prompt's tokens, cut from the left to `max_tokens` (the backend's batch encode)."""
        ids = self.tok_encode(text)[-max_tokens:]
        return ids or [self.prefix_token_id]
