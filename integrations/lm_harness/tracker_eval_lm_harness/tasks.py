"""The suite's lm-eval tasks, loaded once: names checked, few-shot settings applied, data local.

    tasks = TaskSet(config, eos="\\x00", scratch="/tmp/x")   # after offline.prepare_environment()
    tasks.loaded        # lm-eval's {"tasks": ..., "groups": ..., "group_map": ...}, reused every run
    tasks.reset()       # before each run: the few-shot sampler starts from its seed again

Names are looked up among the shipped `pydoc_*` tasks and the config's `include_path` first;
indexing lm-eval's ~15,000 bundled tasks (~13 s) happens only when a name is not found there.
What `simple_evaluate` does to tasks (global seeds before loading, num_fewshot, few-shot seed) is
done here once, so each checkpoint's run is lm-eval's `evaluate` on the same task objects.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

from tracker_eval.errors import ConfigError, one_line
from tracker_eval_lm_harness.config import HarnessConfig
from tracker_eval_lm_harness.generation import greedy_settings
from tracker_eval_lm_harness.seeds import Seeds
from tracker_eval_lm_harness.shims import write_shims

SHIPPED = pathlib.Path(__file__).parent / "pydoc_tasks"


class _DropCustomDatasetNote(logging.Filter):
    """lm-eval warns on every load of a task with a `custom_dataset` about passing metadata."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def task_manager(paths: list[pathlib.Path], *, builtin: bool) -> Any:
    """lm-eval's TaskManager over `paths`, and over its ~15,000 bundled tasks when `builtin`."""
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 - imports `datasets`: after the offline switches

    return TaskManager(include_path=[str(p) for p in paths], include_defaults=builtin)


class TaskSet:
    """The configured tasks and groups as lm-eval task objects."""

    def __init__(self, config: HarnessConfig, *, eos: str, scratch: str, seeds: Seeds) -> None:
        """Loads and checks every task.

        Args:
          config: the suite's config.
          eos: the tokenizer's end-of-text text (added to generation stop sequences).
          scratch: a private folder for the include_path shims.
          seeds: the global seeds; the tasks load under `seeds.loading()`, as in `simple_evaluate`.

        Raises:
          ConfigError: an unknown name, a task whose data cannot be loaded offline, or a generative
            task the suite cannot serve (sampling, max_gen_toks >= max_length).
        """
        self.config = config
        paths = [SHIPPED]
        if config.include_path is not None:
            paths.append(write_shims(config.include_path, into=pathlib.Path(scratch) / "shims"))
        manager = task_manager(paths, builtin=False)
        if any(name not in manager.all_tasks for name in config.tasks):
            local = manager.all_tasks
            manager = task_manager(paths, builtin=True)
            unknown = [name for name in config.tasks if name not in manager.all_tasks]
            if unknown:
                raise ConfigError(
                    f"unknown task {unknown[0]!r}: not among the shipped tasks, include_path or lm-eval's own "
                    f"tasks; local tasks are {', '.join(local)}"
                )
        note = _DropCustomDatasetNote()
        task_logger = logging.getLogger("lm_eval.api.task")
        task_logger.addFilter(note)
        try:
            with seeds.loading():
                self.loaded: dict[str, Any] = manager.load(list(config.tasks))
        except Exception as error:  # noqa: BLE001 - datasets and lm-eval raise many kinds
            raise ConfigError(
                f"tasks {list(config.tasks)} could not be loaded: {one_line(error, limit=300)}; task data must "
                "be local files (the suite runs offline)"
            ) from None
        finally:
            task_logger.removeFilter(note)
        for name, task in self.loaded["tasks"].items():
            self._configure(name, task, eos=eos)

    def _configure(self, name: str, task: Any, *, eos: str) -> None:
        # As simple_evaluate: a task that pins num_fewshot: 0 keeps it; unset means 0.
        if self.config.num_fewshot is not None:
            if task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.config.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        if task.get_config("output_type") == "generate_until":
            try:
                greedy_settings(task.get_config("generation_kwargs") or {}, task=name,
                                max_length=self.config.max_length, eos=eos)
            except ValueError as error:
                raise ConfigError(str(error)) from None

    def reset(self) -> None:
        """Seeds every task's few-shot sampler again, so each run draws the same examples."""
        for task in self.loaded["tasks"].values():
            task.set_fewshot_seed(seed=self.config.fewshot_seed)

    def versions(self) -> dict[str, str]:
        """Task name -> its version (lm-eval's, from the YAML's metadata): part of what keys kept answers."""
        return {name: str(getattr(task, "VERSION", None)) for name, task in self.loaded["tasks"].items()}

    def groups(self) -> dict[str, list[str]]:
        """Group name -> its children's names."""
        return {name: list(children) for name, children in self.loaded.get("group_map", {}).items()}
