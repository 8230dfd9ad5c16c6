"""`generate_until` requests: greedy decoding in batches through the compiled program.

    until, max_new = greedy_settings(gen_kwargs, task="my_gen", max_length=512, eos="\\x00")
    texts = generate_until(lm, requests)

As lm-eval's Hugging Face backend: requests grouped by their generation options, the end-of-text
text added to `until`, prompts cut from the left to `max_length - max_gen_toks` tokens, the
generated tokens decoded without special tokens and cut at the first stop sequence. The device
stops a row at end of text, at `max_gen_toks`, or when its last tokens are the tokens of a stop
sequence; if that text is then not found in the decoded row (a tokenizer whose decoding merges
or strips differently), the row is continued without that shortcut, so results never depend on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from tracker_eval_lm_harness.rows import generation_batches

if TYPE_CHECKING:
    from tracker_eval_lm_harness.lm import HarnessLM

# Options that do not change greedy decoding (the backend ignores them without sampling).
_GREEDY_NEUTRAL = {"do_sample", "temperature", "top_p", "top_k"}


def greedy_settings(
    gen_kwargs: Mapping[str, Any], *, task: str, max_length: int, eos: str, default_max: int = 256
) -> tuple[list[str], int]:
    """(stop sequences, max new tokens) of a task's generation options.

    Raises:
      ValueError: one line naming the task, when it asks for sampling or decoding options other than
        greedy, or for more new tokens than `max_length` leaves room for.
    """
    kwargs = normalize_gen_kwargs(dict(gen_kwargs), default_max)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_new = int(kwargs.pop("max_gen_toks"))
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
        raise ValueError(
            f"task {task!r} asks for sampling ({_options(kwargs)}); the lm_harness suite decodes greedily only: "
            "set do_sample: false in the task's generation_kwargs"
        )
    others = sorted(set(kwargs) - _GREEDY_NEUTRAL)
    if others:
        raise ValueError(
            f"task {task!r} sets generation option(s) {', '.join(others)}, which greedy decoding in the "
            "lm_harness suite cannot honour; remove them from the task's generation_kwargs"
        )
    if max_new >= max_length:
        raise ValueError(
            f"task {task!r} generates up to {max_new} tokens but max_length is {max_length}, leaving no room "
            "for the prompt; raise max_length or lower max_gen_toks"
        )
    return until, max_new


def _options(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={kwargs[k]!r}" for k in ("do_sample", "temperature") if k in kwargs)


def generate_until(lm: HarnessLM, requests: Sequence[Any]) -> list[str]:
    """The continuation of every request (`args == (context, gen_kwargs)`), in request order."""
    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
    results: list[str] = [""] * len(requests)
    for members in groups.values():
        first = requests[members[0]]
        until, max_new = greedy_settings(first.args[1], task=getattr(first, "task_name", "?"),
                                         max_length=lm.max_length, eos=eos, default_max=lm.max_gen_toks)
        contexts = [lm.generation_context(requests[i].args[0], max_tokens=lm.max_length - max_new) for i in members]
        for i, tokens in zip(members, greedy_tokens(lm, contexts, max_new=max_new, until=until), strict=True):
            results[i] = postprocess_generated_text(lm.tok_decode(tokens), until, None)
    return results


def greedy_tokens(lm: HarnessLM, contexts: list[list[int]], *, max_new: int, until: list[str]) -> list[list[int]]:
    """The greedy new tokens after each context: up to `max_new`, ending at end of text or once the
    decoded new text holds a stop sequence (the tokens after it are cut by lm-eval's postprocessing)."""
    stops = [lm.tok.encode(stop, add_special_tokens=False) for stop in until if stop]
    generated: list[list[int]] = [[] for _ in contexts]
    pending = [(i, max_new) for i in range(len(contexts))]
    use_stops = True
    while pending:
        by_budget: dict[int, list[int]] = {}
        for i, budget in pending:
            by_budget.setdefault(budget, []).append(i)
        pending = []
        for budget, members in sorted(by_budget.items()):
            batches = generation_batches([contexts[i] + generated[i] for i in members], rows=lm.engine.rows,
                                         widths=lm.widths, max_new=budget, stops=stops if use_stops else [])
            outputs = lm.engine.execute(lm.params, [batch for batch, _ in batches])
            for (batch, chunk), (_, _, tokens, end) in zip(batches, outputs, strict=True):
                for row, k in enumerate(chunk):
                    i = members[k]
                    new = tokens[row, batch["start"][row]:end[row]].tolist()
                    generated[i] += new
                    by_stop = len(new) < budget and (not new or new[-1] != lm.eot_token_id)
                    text = lm.tok_decode(generated[i])
                    if by_stop and not any(stop and stop in text for stop in until):
                        pending.append((i, budget - len(new)))
        use_stops = False
    return generated
