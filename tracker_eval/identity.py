"""Result identity: which results are "the same result", decided here and nowhere else.

    stream_hash(config)          # a config without suites: its one ledger stream (and tracker run)
    run_hash(config)             # a config with suites: what its suites share (the tracker run)
    suite_hash(config, "val")    # one suite's ledger stream: the run, the name, the kind, its numbers
    tracker_run_key(config)      # the tracker run; tracker_run_name / tracker_run_id of it name it
    tracker_suite(result)        # "val", or "val-v2" for the second set of options `val` ever had
    delivery_key(result)         # (step, checkpoint, tracker suite): each logger's idempotence key
    best_key("val", "loss")      # "best_val/loss": the run summary's key of the best value

Two results are the same result when they have the same ledger stream and step. A stream is the
checkpoint directory plus a hash of what changes the numbers, after defaults are applied: restating
a default or changing how fast the numbers come (batch size, cache, the harness's packing) is not a
change. A plug-in suite kind says which of its options change the numbers through its ``Config``'s
``numbers_key()``; without one, every option of the checked config counts.

The rule for trackers: all suites of a run share one tracker run, and a tracker run never holds two
different numbers under one (key, step). A suite whose number-changing options change becomes a new
version of that suite in the ledger (a new stream under the same run), and its results reach the
trackers under keys of their own: version 1 keeps ``<prefix>/<suite>/<metric>``, version N > 1 is
``<prefix>/<suite>-vN/<metric>`` (``-`` cannot occur in a suite name, so no other suite's keys can
collide). Versions count in the order the ledger first saw them, so going back to earlier options
is that earlier version again, with its results already delivered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from tracker_eval.config.schema import EvalConfig
from tracker_eval.config.suites import EVAL_KIND, SuiteConfig, load_kind
from tracker_eval.locations import normalize_checkpoint_dir

SPEED_OPTIONS = ("batch_size", "cache", "cache_max_mb")
"""Options of an ``eval`` suite that change how fast, not which numbers: a new value keeps the stream."""
VERSION_MARK = "-v"
"""Between a suite's name and its version (> 1) in tracker keys: ``val-v2``."""


def stable_hash(value: Any) -> str:
    """A short hash of a JSON-able value, independent of key order."""
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _checkpoint_numbers(checkpoint: Any) -> dict[str, Any]:
    """The `checkpoint:` fields that change the numbers: how step folders are named does not, so a
    root read with an explicit `step_prefix` keeps the stream it had when the prefix was detected."""
    fields = dataclasses.asdict(checkpoint)
    fields.pop("step_prefix", None)
    fields.pop("step_format_fixed_length", None)
    return fields


def stream_hash(config: EvalConfig) -> str:
    """The ledger stream (and tracker run) of a config without suites: the fields that change the
    numbers (not mesh, batch size, cache, loggers or paths), so a job rescheduled onto another
    cluster shape keeps its ledger."""
    keyed = {
        "model": config.model,
        "eval_function": config.eval_function,
        "data": config.data,
        "split": config.split,
        "checkpoint": _checkpoint_numbers(config.checkpoint),
        "finalize": config.finalize,
        "model_kwargs": dict(config.model_kwargs),
        "data_kwargs": dict(config.data_kwargs),
        "seed": config.seed,
    }
    return stable_hash(keyed)


def run_hash(config: EvalConfig) -> str:
    """What the suites of a run share: the tracker run and the ledger's run-level state (model,
    model_kwargs, checkpoint.*, seed). Without suites it is `stream_hash`, so existing ledgers and
    tracker runs continue."""
    if not config.has_suites:
        return stream_hash(config)
    return stable_hash({
        "model": config.model,
        "model_kwargs": dict(config.model_kwargs),
        "checkpoint": _checkpoint_numbers(config.checkpoint),
        "seed": config.seed,
    })


def suite_numbers(suite: SuiteConfig) -> dict[str, Any]:
    """The options of `suite` that change its numbers, defaults applied.

    ``eval``: every option but `SPEED_OPTIONS` (the loader already filled in the defaults). A plug-in
    kind: its checked config's ``numbers_key()``, else all its checked fields.

    Raises:
      ConfigError: the kind is not installed, or its options are invalid.
    """
    if suite.kind == EVAL_KIND:
        return {k: v for k, v in suite.options.items() if k not in SPEED_OPTIONS}
    kind = load_kind(suite.kind, where=f"suites.{suite.name}")
    checked = kind.Config.from_mapping(dict(suite.options), where=f"suites.{suite.name}")
    numbers = getattr(checked, "numbers_key", None)
    if callable(numbers):
        return dict(numbers())
    if dataclasses.is_dataclass(checked) and not isinstance(checked, type):
        return dataclasses.asdict(checked)
    return dict(suite.options)


def suite_hash(config: EvalConfig, name: str) -> str:
    """The ledger stream of suite `name`: the run, the suite's name and kind, and its numbers
    (`stream_hash` for the one suite "" of a config without suites)."""
    if not config.has_suites:
        return stream_hash(config)
    suite = config.suite(name)
    return stable_hash({"run": run_hash(config), "suite": suite.name, "kind": suite.kind,
                        "options": suite_numbers(suite)})


def earlier_suite_hashes(config: EvalConfig, name: str) -> tuple[str, ...]:
    """Hashes that earlier releases gave suite `name` and `suite_hash` no longer gives: a plug-in
    suite's raw options (before defaults, packing included). The ledger adopts such a stream as
    the suite's, so upgrading evaluates nothing again."""
    if not config.has_suites:
        return ()
    suite = config.suite(name)
    raw = {k: v for k, v in suite.options.items() if k not in SPEED_OPTIONS}
    earlier = stable_hash({"run": run_hash(config), "suite": suite.name, "kind": suite.kind, "options": raw})
    return () if earlier == suite_hash(config, name) else (earlier,)


def tracker_run_key(config: EvalConfig) -> str:
    """The tracker run of a stream: checkpoint directory (normalized as the ledger does) and
    `run_hash`, so all suites of a run, and every version of each, go to one tracker run."""
    return f"{normalize_checkpoint_dir(config.checkpoint_dir)}@{run_hash(config)}"


def answer_stream(config: EvalConfig, name: str) -> str:
    """Whose kept answers (`tracker_eval.ledger.answers`) a suite's are: the checkpoint directory
    (normalized as the ledger does) and `suite_hash`, so neither another checkpoint folder, another
    model nor other suite options ever read them."""
    return f"{normalize_checkpoint_dir(config.checkpoint_dir)}@{suite_hash(config, name)}"


def tracker_run_name(run_key: str) -> str:
    """``eval-<10 hex digits>``: the default name of a tracker run (MLflow run, TensorBoard run
    directory), stable for a run key across restarts and processes."""
    return "eval-" + hashlib.sha256(run_key.encode()).hexdigest()[:10]


def tracker_run_id(run_key: str) -> str:
    """``eval-<16 hex digits>``: a deterministic W&B run id (letters, digits and ``-``) for a run key."""
    return "eval-" + hashlib.sha256(run_key.encode()).hexdigest()[:16]


def suite_label(suite: str, version: int) -> str:
    """A suite's name as trackers see it: ``val`` for version 1, ``val-v2`` for version 2."""
    return suite if version <= 1 or not suite else f"{suite}{VERSION_MARK}{version}"


def tracker_suite(result: Any) -> str:
    """The suite segment of `result`'s tracker keys, file names and idempotence keys
    (`suite_label` of its ``suite`` and ``suite_version``)."""
    return suite_label(result.suite, int(getattr(result, "suite_version", 1)))


def delivery_key(result: Any) -> tuple[int, str, str]:
    """(step, checkpoint, tracker suite): a destination that holds this key holds this result."""
    return int(result.step), str(result.checkpoint), tracker_suite(result)


def best_key(tracker_suite_name: str, metric: str) -> str:
    """The run summary's key of the best value: ``best_<metric>`` without suites, else
    ``best_<tracker suite>/<metric>`` like the metric's own key (``eval/val/loss`` -> ``best_val/loss``),
    since several suites may have a metric of that name."""
    return f"best_{tracker_suite_name}/{metric}" if tracker_suite_name else f"best_{metric}"


def record_key(record: Mapping[str, Any]) -> tuple[int, str, str]:
    """`delivery_key` of a result's JSON record (``EvalResult.to_json``), as a JSONL file holds it."""
    label = suite_label(str(record.get("suite", "")), int(record.get("suite_version", 1)))
    return int(record["step"]), str(record["checkpoint"]), label
