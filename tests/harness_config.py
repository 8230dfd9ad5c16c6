"""The harness suite options shared by tests/test_harness.py and its multi-process child."""

from __future__ import annotations

MAX_LENGTH = 64
TASKS = ["t_both", "t_ppl", "t_gen"]


def suite_options(task_dir: str, **overrides: object) -> dict[str, object]:
    """A suite over the test tasks: short rows, small batches (several per request type), 1-shot."""
    return {"tasks": TASKS, "include_path": str(task_dir), "max_length": MAX_LENGTH, "batch_size": 6,
            "num_fewshot": 1, "bootstrap_iters": 100, "packing": True, **overrides}
