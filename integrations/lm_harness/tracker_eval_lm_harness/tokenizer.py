"""The suite's tokenizers: UTF-8 bytes, or a Hugging Face `tokenizer.json` without transformers.

    tok = load_tokenizer("bytes")
    tok.encode("hé")                  # [104, 195, 169]
    tok.decode([0, 104, 105])         # "hi" (token 0, the prefix/end-of-text token, is special)
    tok = load_tokenizer("path/to/tokenizer.json")

Both mirror what lm-eval's Hugging Face backend gets from `AutoTokenizer`: `encode` adds the
tokenizer's own special tokens unless told not to, `decode` can skip them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

from tracker_eval.errors import ConfigError

# Names under which tokenizer.json files commonly declare their special tokens, most specific first.
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|bos|>")


class Tokenizer(Protocol):
    """What the harness needs of a tokenizer."""

    name: str
    vocab_size: int
    eot_token_id: int
    prefix_token_id: int

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the tokenizer's own BOS/EOS templates apply."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); token 0 is the prefix (BOS) and end-of-text token.

    A NUL byte in text therefore reads as end of text, which real text does not contain.
    """

    name = "bytes"
    vocab_size = 256
    eot_token_id = 0
    prefix_token_id = 0

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        del add_special_tokens  # no template: like GPT-2's tokenizer, nothing is added
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        data = bytes(int(i) for i in ids if not (skip_special_tokens and int(i) == 0))
        return data.decode("utf-8", errors="replace")


class JsonTokenizer:
    """A `tokenizer.json` read by the `tokenizers` library.

    BOS and EOS come from a `tokenizer_config.json` next to the file when there is one (as
    transformers reads them), else from the special tokens the file declares under common names.
    """

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer  # noqa: PLC0415 - optional, heavy

        try:
            self._tok = RustTokenizer.from_file(path)
        except Exception as error:  # noqa: BLE001 - the library's parse errors vary
            raise ConfigError(f"tokenizer {path!r} could not be read as a tokenizer.json: {error}") from None
        self.name = os.path.abspath(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _side_config(path)
        specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        eos = self._token_id(config.get("eos_token"), specials, _EOS_NAMES)
        if eos is None:
            raise ConfigError(
                f"tokenizer {path!r}: cannot tell its end-of-text token; put a tokenizer_config.json with "
                "eos_token (as Hugging Face model repositories have) next to it"
            )
        bos = self._token_id(config.get("bos_token"), specials, _BOS_NAMES)
        self.eot_token_id = eos
        self.prefix_token_id = bos if bos is not None else eos
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))

    def _token_id(self, configured: Any, specials: dict[str, int], names: Sequence[str]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        if isinstance(configured, str):
            found = self._tok.token_to_id(configured)
            if found is not None:
                return found
        return next((specials[n] for n in names if n in specials), None)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text


def _side_config(path: str) -> dict[str, Any]:
    side = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    if not os.path.isfile(side):
        return {}
    try:
        with open(side, encoding="utf-8") as f:
            loaded = json.load(f)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{side!r} next to the tokenizer is not valid JSON ({error}); fix or remove it") from None
    return loaded if isinstance(loaded, dict) else {}


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`, applied by its decode when the tokenizer config says so."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def load_tokenizer(spec: str) -> Tokenizer:
    """`bytes` or the path of a tokenizer.json.

    Raises:
      ConfigError: the file cannot be read or has no end-of-text token.
    """
    return ByteTokenizer() if spec == "bytes" else JsonTokenizer(spec)
