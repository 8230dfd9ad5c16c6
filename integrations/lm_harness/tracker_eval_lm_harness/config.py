"""Options of a `kind: lm_harness` suite, checked when the config loads.

    config = HarnessConfig.from_mapping({"tasks": ["my_mc"], "packing": True}, where="suites.harness")
    config.max_length   # 512

Every bad value is a `ConfigError` naming the key, the value and the fix, raised before any model,
dataset or lm-eval import is touched.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from tracker_eval.errors import ConfigError

BYTES = "bytes"


@dataclasses.dataclass(frozen=True)
class HarnessConfig:
    """One LM Evaluation Harness suite: which tasks, how the model is fed, how results are aggregated."""

    tasks: tuple[str, ...]
    """Task, group or tag names known to lm-eval: the shipped `pydoc_*` tasks, tasks in `include_path`,
    or lm-eval's own bundled tasks (their data must already be in the local datasets cache)."""
    include_path: str | None = None
    """A folder of task YAMLs in lm-eval's own format; relative `dataset_kwargs.data_files` resolve
    against each YAML's folder. Relative to the working directory; null = shipped tasks only."""
    tokenizer: str = BYTES
    """`bytes` (UTF-8 bytes, vocab 256, token 0 = prefix/BOS and end of text) or a path to a
    Hugging Face `tokenizer.json` (BOS/EOS from a `tokenizer_config.json` beside it, if any)."""
    max_length: int = 512
    """Longest token sequence the model is run on (lm-eval truncates longer inputs from the left)."""
    batch_size: int = 32
    """Rows per global batch, rounded up to a multiple of the mesh's batch shards."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt for every task; null = each task's own default (0 if unset)."""
    limit: int | float | None = None
    """Documents per task: an int N takes the first N, a float in (0, 1) that fraction; null = all."""
    bootstrap_iters: int = 1000
    """Bootstrap resamples for the stderr of non-mean metrics; 0 = no stderr at all."""
    packing: bool = False
    """Several requests per row, kept apart by `segment_ids=`/`positions=` passed to the model, which
    must honour them; false = one request per row, the model called with tokens only."""
    fewshot_seed: int = 1234
    """Seed of the few-shot sampler (lm-eval's default), reset before every checkpoint's run."""
    random_seed: int = 0
    """Seed of Python's global `random` before the tasks load (lm-eval's `simple_evaluate` default);
    task code such as a `process_docs` that shuffles draws from it. Every run starts where loading left it."""
    numpy_random_seed: int = 1234
    """Seed of numpy's global generator before the tasks load (lm-eval's default), replayed the same way."""
    resume: bool = True
    """Keep each (step, suite)'s answers as they are computed (``answers.sqlite`` in output_dir), so an
    attempt killed part-way is continued by the next one; false = score every request in one go."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks is empty; name at least one task or group, e.g. tasks: [pydoc_cloze]")
        for name in self.tasks:
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"tasks contains {name!r}; every entry must be a task or group name")
        if self.include_path is not None and not os.path.isdir(self.include_path):
            raise ConfigError(
                f"include_path {self.include_path!r} is not a folder; point it at the folder holding your "
                "task YAMLs (relative paths start at the working directory)"
            )
        if self.tokenizer != BYTES and not os.path.isfile(self.tokenizer):
            raise ConfigError(
                f"tokenizer {self.tokenizer!r} is neither 'bytes' nor an existing file; give the path of a "
                "tokenizer.json (Hugging Face tokenizers format) or use bytes"
            )
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2 tokens, got {self.max_length}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive number of rows, got {self.batch_size}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"num_fewshot must be >= 0 or null (each task's default), got {self.num_fewshot}")
        if self.limit is not None:
            if isinstance(self.limit, float) and not 0.0 < self.limit < 1.0:
                raise ConfigError(
                    f"limit {self.limit} as a float is a fraction of each task's documents and must lie in (0, 1); "
                    "give an integer for a count"
                )
            if isinstance(self.limit, int) and self.limit < 1:
                raise ConfigError(f"limit must be a positive number of documents or null (all), got {self.limit}")
        if not 0 <= self.numpy_random_seed < 2**32:
            raise ConfigError(f"numpy_random_seed must lie in [0, 2**32 - 1] (numpy's range), "
                              f"got {self.numpy_random_seed}")
        if self.bootstrap_iters < 0:
            raise ConfigError(f"bootstrap_iters must be >= 0 (0 = no stderr), got {self.bootstrap_iters}")

    def numbers_key(self) -> dict[str, Any]:
        """The options that change the scores, for the stream's config hash: all but `batch_size` and
        `packing`, which give the same numbers (to float rounding) however the rows are cut. The
        seeds are in: they choose few-shot examples and whatever task code draws at random."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("batch_size", "packing", "resume")}

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], *, where: str = "lm_harness suite") -> HarnessConfig:
        """Builds the config from YAML values, strictly.

        Args:
          options: the suite's keys (without `kind`).
          where: location named in error messages, e.g. ``suites.harness``.

        Raises:
          ConfigError: an unknown key (valid keys listed), a value of the wrong type or out of range.
        """
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in fields:
                raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(fields)}")
        if "tasks" not in options:
            raise ConfigError(f"{where}: 'tasks' is required, e.g. tasks: [pydoc_cloze, pydoc_ppl]")
        hints = typing.get_type_hints(cls)
        values = {key: _check(value, hints[key], key=f"{where}.{key}") for key, value in options.items()}
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None


def _check(value: Any, hint: Any, *, key: str) -> Any:
    """`value` converted to the field's type (lists become tuples), or a ConfigError naming `key`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        if value is None and type(None) in arms:
            return None
        for arm in arms:
            if arm is not type(None) and _fits(value, arm):
                return _convert(value, arm)
        names = " or ".join("null" if a is type(None) else _name(a) for a in arms)
        raise ConfigError(f"{key} must be {names}, got {value!r}")
    if not _fits(value, hint):
        raise ConfigError(f"{key} must be {_name(hint)}, got {value!r}")
    return _convert(value, hint)


def _fits(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if hint is float:
        return isinstance(value, float)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _convert(value: Any, hint: Any) -> Any:
    return tuple(value) if typing.get_origin(hint) is tuple else value


def _name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of names"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))
