"""`generate_until` requests: greedy decoding, batched, one step at a time through the compiled program.

    until, max_new = greedy_settings(gen_kwargs, task="my_gen", max_length=512, eos="\\x00")
    texts = generate_until(lm, requests)

As lm-eval's Hugging Face backend: requests grouped by their generation options, the end-of-text
text added to `until`, prompts cut from the left to `max_length - max_gen_toks` tokens, a sequence
ended by end of text, by `max_gen_toks` new tokens or once its decoded new text holds a stop
string, then decoded without special tokens and cut at the first stop string. Each step is one
batch of up to `rows` sequences, the longest prompts first; a finished sequence's row goes to the
next waiting prompt at once (continuous batching). There is no KV cache: the model contract is a
plain forward pass, so a step costs one forward pass of each row.

Given the LM's `answers`, each generation is kept as soon as it ends, and prompts whose generation
an earlier attempt kept are not decoded again.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from tracker_eval_lm_harness.resume import FLUSH_S, Answers, generation_key
from tracker_eval_lm_harness.rows import step_batch

# Options that do not change greedy decoding (the backend ignores them without sampling).
_GREEDY_NEUTRAL = {"do_sample", "temperature", "top_p", "top_k"}


class Runner(Protocol):
    """Runs fixed-shape batches (`engine.Engine` is one)."""

    rows: int

    def execute(self, params: Any, batches: Iterable[Mapping[str, np.ndarray]]) -> list[np.ndarray]: ...


class Decoder(Protocol):
    """What decoding needs of the LM (`lm.HarnessLM` is one). Named here, so that this module
    depends on no LM class and `lm` alone imports `generation`."""

    engine: Runner
    params: Any
    widths: tuple[int, ...]
    answers: Answers | None
    reused: int
    kept: int

    @property
    def max_length(self) -> int: ...

    @property
    def max_gen_toks(self) -> int: ...

    @property
    def eot_token_id(self) -> int: ...

    def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str: ...

    def generation_context(self, text: str, *, max_tokens: int) -> list[int]: ...


def greedy_settings(
    gen_kwargs: Mapping[str, Any], *, task: str, max_length: int, eos: str, default_max: int = 256
) -> tuple[list[str], int]:
    """(stop strings, max new tokens) of a task's generation options.

    Raises:
      ValueError: one line naming the task, when it asks for sampling or decoding options other than
        greedy, or for more new tokens than `max_length` leaves room for.
    """
    kwargs = normalize_gen_kwargs(dict(gen_kwargs), default_max)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_new = int(kwargs.pop("max_gen_toks"))
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
        options = ", ".join(f"{k}={kwargs[k]!r}" for k in ("do_sample", "temperature") if k in kwargs)
        raise ValueError(
            f"task {task!r} asks for sampling ({options}); the lm_harness suite decodes greedily only: "
            "set do_sample: false in the task's generation_kwargs"
        )
    others = sorted(set(kwargs) - _GREEDY_NEUTRAL)
    if others:
        raise ValueError(
            f"task {task!r} sets generation option(s) {', '.join(others)}, which greedy decoding in the "
            "lm_harness suite cannot honour; remove them from the task's generation_kwargs"
        )
    if not 0 < max_new < max_length:
        raise ValueError(
            f"task {task!r} generates up to {max_new} tokens but max_length is {max_length}; raise max_length "
            "or set max_gen_toks between 1 and max_length - 1 (the prompt needs room)"
        )
    return until, max_new


def generate_until(lm: Decoder, requests: Sequence[Any]) -> list[str]:
    """The continuation of every request (`args == (context, gen_kwargs)`), in request order."""
    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
    results: list[str] = [""] * len(requests)
    for members in groups.values():
        _generate_group(lm, [requests[i] for i in members], members, results, eos=eos)
    return results


def _generate_group(lm: Decoder, requests: Sequence[Any], members: Sequence[int], results: list[str], *,
                    eos: str) -> None:
    """Decodes the requests of one set of generation options into `results[members[k]]`. With the
    LM's `answers`: a finished generation is kept as its text, one under way as its tokens so far
    (every FLUSH_S seconds); a later attempt takes the texts and continues the token lists."""
    first = requests[0]
    until, max_new = greedy_settings(first.args[1], task=getattr(first, "task_name", "?"),
                                     max_length=lm.max_length, eos=eos, default_max=lm.max_gen_toks)
    contexts = [lm.generation_context(request.args[0], max_tokens=lm.max_length - max_new) for request in requests]
    keys = [generation_key(context, until, max_new) for context in contexts]
    known = lm.answers.lookup(keys) if lm.answers is not None else {}
    todo = [k for k, key in enumerate(keys) if not isinstance(known.get(key), str)]
    for k, key in enumerate(keys):
        if isinstance(known.get(key), str):
            results[members[k]] = known[key]
    lm.reused += len(keys) - len(todo)
    started = [list(known.get(keys[k]) or []) for k in todo]
    answers = lm.answers

    def done(j: int, tokens: list[int]) -> None:
        text = postprocess_generated_text(lm.tok_decode(tokens), until, None)
        results[members[todo[j]]] = text
        if answers is not None:
            answers.keep(keys[todo[j]], text)
            lm.kept += 1

    def progress(partial: dict[int, list[int]]) -> None:
        if answers is not None:
            for j, tokens in partial.items():
                answers.keep(keys[todo[j]], tokens)

    greedy_tokens(lm, [contexts[k] for k in todo], max_new=max_new, until=until, done=done, started=started,
                  progress=progress)


def greedy_tokens(
    lm: Decoder, contexts: Sequence[list[int]], *, max_new: int, until: Sequence[str],
    done: Callable[[int, list[int]], None] | None = None, started: Sequence[list[int]] | None = None,
    progress: Callable[[dict[int, list[int]]], None] | None = None,
) -> list[list[int]]:
    """The greedy new tokens after each context, until it is ended (see the module docstring).

    `started[i]`: tokens context i already generated (an earlier attempt's); `done(i, tokens)` is
    called as context i's generation ends, `progress({i: tokens})` with the unfinished ones every
    FLUSH_S seconds.
    """
    generated: list[list[int]] = [list(tokens) for tokens in started] if started else [[] for _ in contexts]
    waiting = collections.deque(sorted(range(len(contexts)), key=lambda i: -len(contexts[i])))
    running: list[int] = []
    stops = [stop for stop in until if stop]
    reported = time.monotonic()
    while waiting or running:
        while waiting and len(running) < lm.engine.rows:
            running.append(waiting.popleft())
        sequences = [contexts[i] + generated[i] for i in running]
        batch = step_batch(sequences, rows=lm.engine.rows, widths=lm.widths)
        (output,) = lm.engine.execute(lm.params, [batch])
        best = output[:, 1]
        still = []
        for row, i in enumerate(running):
            token = int(best[row, len(sequences[row]) - 1])
            generated[i].append(token)
            text = lm.tok_decode(generated[i], skip_special_tokens=False)
            if token != lm.eot_token_id and len(generated[i]) < max_new and not any(stop in text for stop in stops):
                still.append(i)
            elif done is not None:
                done(i, generated[i])
        running = still
        if progress is not None and running and time.monotonic() - reported >= FLUSH_S:
            progress({i: list(generated[i]) for i in running})
            reported = time.monotonic()
    return generated
