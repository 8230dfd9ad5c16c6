"""Task folders for the harness tests: lm-eval YAMLs with relative `data_files`, as a user writes them.

    write_tasks(folder, greedy=lambda prompt: ...)   # greedy: the reference's completion of a prompt

Tasks: `t_mc` and `t_mc2` (multiple choice, one- and many-byte choices, an empty context, contexts
longer than the model window), the group `t_both` over them with aggregated acc, `t_ppl` (rolling
perplexity of texts up to four windows long) and `t_gen` (generation scored by exact match under two
filters; half of its targets are the reference's own greedy completions, so the score is not 0,
and its stop sequences are taken from what the reference generates, so generations do stop early,
on one byte and on two).
"""

from __future__ import annotations

import json
import pathlib
import random
from collections.abc import Callable

from tracker_eval.tasks import pydoc_text

MC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{train: data/{name}_train.jsonl, test: data/{name}_test.jsonl}}
output_type: multiple_choice
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""

GROUP = """group: t_both
task: [t_mc, t_mc2]
aggregate_metric_list:
  - {metric: acc, aggregation: mean, weight_by_size: true}
  - {metric: acc_norm, aggregation: mean, weight_by_size: true}
metadata: {version: 1.0}
"""

PPL = """task: t_ppl
dataset_path: json
dataset_kwargs:
  data_files: {test: data/ppl.jsonl}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
metadata: {version: 1.0}
"""

GEN = """task: t_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: data/gen.jsonl}}
output_type: generate_until
test_split: test
num_fewshot: 0
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: {until}, max_gen_toks: 8, do_sample: false}}
filter_list:
  - name: strict-match
    filter: [{{function: take_first}}]
  - name: first-word
    filter: [{{function: regex, regex_pattern: "(\\\\w+)", group_select: 0}}, {{function: take_first}}]
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _mc_docs(text: str, rnd: random.Random, lengths: list[int]) -> list[dict]:
    docs = []
    for length in lengths:
        start = rnd.randrange(0, len(text) - 200)
        choices = rnd.sample(["a", "b", "x", "the", "value", "of", "is", "and"], 4)
        docs.append({"context": text[start:start + length].strip(), "choices": choices, "label": rnd.randrange(4)})
    return docs


def stop_sequences(continuations: list[str]) -> list[str]:
    """A newline, the commonest ASCII character inside the continuations, and an ASCII pair from one of them."""
    inner = [c for text in continuations for c in text[1:6] if c.isascii() and c.isprintable()]
    single = max(sorted(set(inner)), key=inner.count)
    pair = next(text[i:i + 2] for text in continuations for i in range(2, len(text) - 1)
                if text[i:i + 2].isascii() and text[i:i + 2].isprintable() and single not in text[i:i + 2])
    return ["\n", single, pair]


def write_tasks(folder: pathlib.Path, *, greedy: Callable[[str, dict], str]) -> pathlib.Path:
    """Writes the test tasks into `folder` (YAMLs at the top, data under data/); returns `folder`.

    `greedy(prompt, generation_kwargs)` is the reference's answer to a generate_until request.
    """
    text = pydoc_text.text("heldout")
    rnd = random.Random(7)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    # Mostly short inputs, so packed rows hold several; two longer than the model window.
    for name, lengths in (("t_mc", [0, 9, 14, 90, 150, 6]), ("t_mc2", [20, 3, 8, 11])):
        (folder / f"{name}.yaml").write_text(MC.format(name=name))
        _write_jsonl(data / f"{name}_test.jsonl", _mc_docs(text, rnd, lengths))
        _write_jsonl(data / f"{name}_train.jsonl", _mc_docs(text, rnd, [6, 9, 12]))
    (folder / "t_both.yaml").write_text(GROUP)
    (folder / "t_ppl.yaml").write_text(PPL)
    _write_jsonl(data / "ppl.jsonl", [{"text": text[s:s + n]} for s, n in ((100, 20), (900, 60), (3000, 150),
                                                                            (7000, 250))])
    prompts = [text[s:s + n] for s, n in ((400, 30), (1500, 55), (5000, 12), (8000, 70), (12000, 40), (15000, 64))]
    until = stop_sequences([greedy(p, {"until": [], "max_gen_toks": 8}) for p in prompts])
    (folder / "t_gen.yaml").write_text(GEN.format(until=json.dumps(until)))
    options = {"until": until, "max_gen_toks": 8, "do_sample": False}
    _write_jsonl(data / "gen.jsonl", [{"prompt": p, "target": greedy(p, options) if i % 2 == 0 else "not this"}
                                      for i, p in enumerate(prompts)])
    return folder


SHUFFLE = """task: t_shuffle
dataset_path: json
dataset_kwargs:
  data_files: {test: data/shuffle.jsonl}
output_type: multiple_choice
test_split: test
process_docs: !function shuffle_docs.process_docs
doc_to_text: "{{context}}\\n(A) {{choices[0]}} (B) {{choices[1]}} (C) {{choices[2]}} (D) {{choices[3]}}\\nAnswer:"
doc_to_choice: [" A", " B", " C", " D"]
doc_to_target: label
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
metadata: {version: 1.0}
"""

SHUFFLE_DOCS = '''"""As lm-eval's GPQA tasks do: the choices of every document are shuffled with the global `random`.

Recomputed at every call (as with `datasets` caching off), so every run draws from `random` again.
"""

import random


def process_docs(dataset):
    def shuffle(doc):
        choices = list(doc["choices"])
        answer = choices[doc["label"]]
        random.shuffle(choices)
        return {"choices": choices, "label": choices.index(answer)}

    return dataset.map(shuffle, load_from_cache_file=False)
'''


def write_shuffle_task(folder: pathlib.Path, *, documents: int = 40) -> pathlib.Path:
    """Writes `t_shuffle` into `folder`: 4-choice questions whose choices `process_docs` shuffles with
    Python's global `random`, listed in the prompt (the answer is a letter), so each shuffle scores
    differently. Returns `folder`."""
    rnd = random.Random(11)
    text = pydoc_text.text("heldout")
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    (folder / "t_shuffle.yaml").write_text(SHUFFLE)
    (folder / "shuffle_docs.py").write_text(SHUFFLE_DOCS)
    words = ["value", "list", "module", "class", "string", "object", "import", "method"]
    docs = []
    for _ in range(documents):
        start = rnd.randrange(0, len(text) - 100)
        docs.append({"context": text[start:start + 24].strip(), "choices": rnd.sample(words, 4),
                     "label": rnd.randrange(4)})
    _write_jsonl(data / "shuffle.jsonl", docs)
    return folder
