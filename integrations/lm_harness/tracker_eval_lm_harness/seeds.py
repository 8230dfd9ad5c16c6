"""lm-eval's global seeds, as `simple_evaluate` sets them, replayed for every run of a suite.

    seeds = Seeds(random_seed=0, numpy_seed=1234)
    with seeds.loading():        # Python's `random` and numpy's global stream seeded; tasks load
        task_manager.load(...)
    with seeds.running():        # both streams as they were right after loading
        lm_eval.evaluator.evaluate(...)

`simple_evaluate` seeds Python's `random` (0) and numpy (1234) before it loads the tasks, and task
code draws from those streams: lm-eval's GPQA tasks shuffle each question's choices with `random`
in `process_docs`, which runs when a task loads and again when its requests are built. A suite
loads its tasks once and runs them for every checkpoint, so each run starts from the streams'
state right after loading, which is where `simple_evaluate`'s one run starts: every checkpoint,
every run and every process of the job sees the documents `simple_evaluate` would. The caller's
own streams are left as they were (both contexts restore them on exit).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np


def _states() -> tuple[Any, Any]:
    return random.getstate(), np.random.get_state()


def _set(states: tuple[Any, Any]) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])


class Seeds:
    """The global streams' seeds and their state after the tasks loaded."""

    def __init__(self, *, random_seed: int, numpy_seed: int) -> None:
        self.random_seed = random_seed
        self.numpy_seed = numpy_seed
        self._after_loading: tuple[Any, Any] | None = None

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Seeds both streams for the block (the tasks' loading) and keeps their state at its end."""
        caller = _states()
        random.seed(self.random_seed)
        np.random.seed(self.numpy_seed)
        try:
            yield
        finally:
            self._after_loading = _states()
            _set(caller)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Both streams as `loading` left them, for the block (one run)."""
        if self._after_loading is None:
            raise RuntimeError("Seeds.running() before Seeds.loading(): load the tasks first")
        caller = _states()
        _set(self._after_loading)
        try:
            yield
        finally:
            _set(caller)
