"""Documents of the shipped pydoc tasks, built from Python's own help topics (no download, no files).

`test` documents come from the held-out topics the demo's language model never trains on; `train`
documents (few-shot examples) from the training topics. Built deterministically with a local
random generator, in memory (`custom_dataset`), so nothing is written to the datasets cache.

    cloze()       # multiple choice: which word comes next?  {"context", "choices", "label"}
    perplexity()  # rolling log-likelihood of ~1 KB passages  {"text"}
    completion()  # finish a half-written word               {"prompt", "target"}
"""

from __future__ import annotations

import random
import re
from typing import Any

SIZES = {"train": 40, "test": 120}
_WORD = re.compile(r"(?<= )[a-z]{4,12}(?=[ .,;:])")
_LONG_WORD = re.compile(r"(?<= )[a-z]{7,14}(?=[ .,;:])")


def _text(split: str) -> str:
    from tracker_eval.tasks import pydoc_text  # noqa: PLC0415

    return pydoc_text.text("heldout" if split == "test" else "train")


def _context(text: str, end: int, *, chars: int) -> str:
    """Up to `chars` characters before `end`, starting at a word."""
    start = max(0, end - chars)
    if start > 0:
        start = text.index(" ", start) + 1 if " " in text[start:end] else start
    return text[start:end]


def _dataset(build: Any) -> Any:
    import datasets  # noqa: PLC0415

    return datasets.DatasetDict({split: datasets.Dataset.from_list(build(split)) for split in SIZES})


def cloze(**_: Any) -> Any:
    """A held-out word after ~150 characters of context, against three words of similar length."""

    def build(split: str) -> list[dict[str, Any]]:
        text = _text(split)
        rnd = random.Random(f"pydoc_cloze/{split}")
        found = [(m.start(), m.group()) for m in _WORD.finditer(text)]
        vocabulary = sorted({word for _, word in found})
        docs = []
        for at in sorted(rnd.sample(range(len(found)), SIZES[split])):
            start, word = found[at]
            alike = [w for w in vocabulary if w != word and abs(len(w) - len(word)) <= 1]
            choices = rnd.sample(alike, 3) + [word]
            rnd.shuffle(choices)
            docs.append({"context": _context(text, start - 1, chars=150), "choices": choices,
                         "label": choices.index(word)})
        return docs

    return _dataset(build)


def perplexity(**_: Any) -> Any:
    """Passages of whole paragraphs, 600 to 2,000 characters (several windows of 512 bytes)."""

    def build(split: str) -> list[dict[str, Any]]:
        docs, current = [], ""
        for paragraph in _text(split).split("\n\n"):
            current = f"{current}\n\n{paragraph}" if current else paragraph
            if len(current) >= 600:
                docs.append({"text": current if len(current) <= 2000 else current[:2000].rsplit("\n", 1)[0]})
                current = ""
        return docs[: SIZES[split]]

    return _dataset(build)


def completion(**_: Any) -> Any:
    """The rest of a long word whose first half ends the prompt."""

    def build(split: str) -> list[dict[str, Any]]:
        text = _text(split)
        rnd = random.Random(f"pydoc_gen/{split}")
        found = [(m.start(), m.group()) for m in _LONG_WORD.finditer(text)]
        docs = []
        for at in sorted(rnd.sample(range(len(found)), SIZES[split])):
            start, word = found[at]
            half = len(word) // 2
            docs.append({"prompt": _context(text, start, chars=100) + word[:half], "target": word[half:]})
        return docs

    return _dataset(build)
