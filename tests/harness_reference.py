"""Independent float64 references for the harness tests: the models' forward passes in numpy, and an
lm-eval `LM` that serves every request with them, one unpadded sequence at a time.

Only lm-eval's own code is shared with the suite (TemplateLM's context/continuation split, the rolling
window helpers, the generation-option helpers); tokenization (UTF-8 bytes, 0 = prefix and end of
text), truncation, scoring and greedy decoding are written here again, following lm-eval's Hugging
Face backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text


def _f64(tree: Any) -> Any:
    return {k: _f64(v) if isinstance(v, dict) else np.asarray(v, np.float64) for k, v in tree.items()}


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def tiny_lm_logits(params: Any) -> Callable[[list[int]], np.ndarray]:
    """TinyLM (tracker_eval.tasks.language_model) on one sequence: [T] -> [T, 256] float64."""
    p = _f64(params)

    def logits(tokens: list[int]) -> np.ndarray:
        x = p["embed"]["embedding"][np.asarray(tokens)]
        kernel = p["mix"]["kernel"]
        context = kernel.shape[0]
        padded = np.concatenate([np.zeros((context - 1, x.shape[1])), x])
        mixed = p["mix"]["bias"] + sum(padded[k:k + len(tokens)] @ kernel[k] for k in range(context))
        h = mixed + _gelu(mixed) @ p["mlp"]["kernel"] + p["mlp"]["bias"]
        return h @ p["logits"]["kernel"] + p["logits"]["bias"]

    return logits


def attention_lm_logits(params: Any) -> Callable[[list[int]], np.ndarray]:
    """TinyAttentionLM (tests/harness_models.py) on one sequence at positions 0..T-1."""
    p = _f64(params)

    def logits(tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        x = p["embed"]["embedding"][np.asarray(tokens)] + p["position"]["embedding"][np.arange(n)]
        q, k, v = (x @ p[name]["kernel"] for name in ("query", "key", "value"))
        scores = q @ k.T / math.sqrt(x.shape[1])
        scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + (weights @ v) @ p["out"]["kernel"] + p["out"]["bias"]
        x = x + _gelu(x) @ p["mlp"]["kernel"] + p["mlp"]["bias"]
        return x @ p["logits"]["kernel"] + p["logits"]["bias"]

    return logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


class ReferenceLM(TemplateLM):
    """Every request from a float64 forward pass of exactly its own tokens.

    Tokens are UTF-8 bytes with 0 as prefix and end of text, or those of a `tokenizers.Tokenizer`
    whose `<|endoftext|>` is both (a GPT-2-style tokenizer, as transformers would load it).
    """

    def __init__(self, logits_fn: Callable[[list[int]], np.ndarray], *, max_length: int, tokenizer: Any = None) -> None:
        super().__init__()
        self.logits_fn = logits_fn
        self._max_length = max_length
        self.tokenizer_json = tokenizer
        self._eot = 0 if tokenizer is None else tokenizer.token_to_id("<|endoftext|>")

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if self.tokenizer_json is not None:
            return self.tokenizer_json.encode(string).ids
        return list(string.encode("utf-8"))

    def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
        ids = [tokens] if isinstance(tokens, int) else list(tokens)
        if self.tokenizer_json is not None:
            return self.tokenizer_json.decode(ids, skip_special_tokens=skip_special_tokens)
        return bytes(t for t in ids if not (skip_special_tokens and t == 0)).decode("utf-8", errors="replace")

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list[Any]:
        out = []
        for _, context, continuation in requests:
            assert context and continuation and len(continuation) <= self.max_length
            inputs = (context + continuation)[-(self.max_length + 1):][:-1]
            logp = log_softmax(self.logits_fn(inputs))[len(inputs) - len(continuation):]
            picked = logp[np.arange(len(continuation)), continuation]
            out.append((float(picked.sum()), bool((logp.argmax(-1) == np.asarray(continuation)).all())))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in (r.args for r in requests):
            windows = [(None, *lm_utils.make_disjoint_window(w)) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self._eot, max_seq_len=self.max_length, context_len=1)]
            out.append(sum(value for value, _ in self._loglikelihood_tokens(windows)))
        return out

    def greedy(self, context: list[int], *, max_new: int, until: list[str]) -> list[int]:
        """Greedy tokens after `context`, stopping like Hugging Face's generate with lm-eval's
        stop-sequence criterion (end of text, or a stop string in the decoded new text)."""
        tokens, new = list(context), []
        for _ in range(max_new):
            token = int(np.argmax(self.logits_fn(tokens)[-1]))
            tokens.append(token)
            new.append(token)
            if token == self._eot or any(stop and stop in self.tok_decode(new, skip_special_tokens=False)
                                         for stop in until):
                break
        return new

    def complete(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        """One generate_until request, as the Hugging Face backend answers it."""
        kwargs = normalize_gen_kwargs(gen_kwargs, 256)
        eos = self.tok_decode(self._eot, skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_new = kwargs.pop("max_gen_toks")
        prompt = self.tok_encode(context)[-(self.max_length - max_new):]
        text = self.tok_decode(self.greedy(prompt, max_new=max_new, until=until))
        return postprocess_generated_text(text, until, None)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        return [self.complete(context, gen_kwargs) for context, gen_kwargs in (r.args for r in requests)]
