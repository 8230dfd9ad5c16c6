"""Text that ships with Python itself: the help topics of `pydoc_data`, split by paragraph.

    pydoc_text.text("heldout")     # ~1/8 of the distinct paragraphs, never trained on
    pydoc_text.text("train")       # the others, in topic order: ~300 KB of English and Python

The byte-level language model trains on `train`; the LM Evaluation Harness demo tasks (`pydoc_cloze`,
`pydoc_ppl`, `pydoc_gen`) are built from `heldout`. Topics repeat each other's paragraphs (the
`compound` topic holds `for`, `try`, `class`...), so the split is by distinct paragraph, chosen by a
hash of its text: a paragraph is on one side wherever it appears. The text is whatever this Python
version ships, so both sides always agree.
"""

from __future__ import annotations

import functools
import hashlib

SPLITS = ("train", "heldout")


@functools.cache
def paragraphs(split: str) -> tuple[str, ...]:
    """The distinct paragraphs of one split, in topic-name order."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    from pydoc_data.topics import topics  # noqa: PLC0415

    seen: set[str] = set()
    out = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            paragraph = paragraph.strip("\n")
            if not paragraph.strip() or paragraph in seen:
                continue
            seen.add(paragraph)
            heldout = hashlib.sha256(paragraph.encode("utf-8")).digest()[0] % 8 == 0
            if heldout == (split == "heldout"):
                out.append(paragraph)
    return tuple(out)


def text(split: str) -> str:
    """The paragraphs of one split joined by blank lines."""
    return "\n\n".join(paragraphs(split))
