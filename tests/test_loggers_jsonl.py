"""JSONL logger: whole lines, npz references, idempotency, tolerance of a torn last line."""

from __future__ import annotations

import json
import math

import numpy as np

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.loggers.base import LoggerContext
from tracker_eval.loggers.console import ConsoleLogger
from tracker_eval.loggers.jsonl import JsonlLogger, load_per_example, load_samples, read_jsonl


def _result(step: int, checkpoint: str | None = None) -> EvalResult:
    return EvalResult(
        step=step,
        checkpoint=checkpoint or f"/ckpt/{step}",
        metrics={"loss": step / 8, "acc": float("nan")},
        per_example={"loss": np.arange(5, dtype=np.float32) + step},
        provenance={"config_hash": "abc"},
        time=1000.0 + step,
    )


def test_lines_and_npz_reference(tmp_path):
    logger = JsonlLogger(context=LoggerContext(output_dir=str(tmp_path)))
    logger.log_result(_result(300))
    logger.log_result(_result(100))
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert set(first) == {"step", "checkpoint", "metrics", "provenance", "time", "per_example"}
    assert first["step"] == 300 and first["metrics"]["loss"] == 37.5 and first["metrics"]["acc"] is None
    arrays = load_per_example(tmp_path / "metrics.jsonl", first)
    np.testing.assert_array_equal(arrays["loss"], np.array([300, 301, 302, 303, 304], dtype=np.float32))
    assert (tmp_path / first["per_example"]).exists()


def test_idempotent_across_reopen(tmp_path):
    context = LoggerContext(output_dir=str(tmp_path))
    logger = JsonlLogger(context=context)
    logger.log_result(_result(1))
    logger.log_result(_result(1))
    logger.close()
    logger = JsonlLogger(context=context)
    logger.log_result(_result(1))
    logger.log_result(_result(1, checkpoint="in-training"))
    logger.log_result(_result(2))
    logger.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["checkpoint"]) for r in records] == [(1, "/ckpt/1"), (1, "in-training"), (2, "/ckpt/2")]


def test_torn_last_line_is_tolerated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = json.dumps({"step": 5, "checkpoint": "/ckpt/5", "metrics": {}, "provenance": {}, "time": 1.0})
    path.write_text(good + "\n" + '{"step": 6, "checkpoint": "/ck')  # a crash mid-line
    assert [r["step"] for r in read_jsonl(path)] == [5]
    logger = JsonlLogger(context=LoggerContext(output_dir=str(tmp_path)))
    logger.log_result(_result(5))  # already present: not written again
    logger.log_result(_result(6))
    logger.close()
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [5, 6]
    assert path.read_bytes().endswith(b"\n")


def test_console_table(capsys):
    logger = ConsoleLogger(context=LoggerContext(output_dir="."))
    logger.log_result(_result(300))
    out = capsys.readouterr().out
    assert "eval step 300 (/ckpt/300)" in out
    assert "37.5" in out and "nan" in out
    assert "per_example/loss" in out and "n=5" in out and f"mean={302.0:.4g}" in out
    assert not math.isnan(302.0)


# Names that np.savez takes as its own arguments, one np.load confuses with another, a path-like
# one, non-ASCII and empty: every per-example name must come back from every writer as it went in.
ODD_NAMES = ("file", "allow_pickle", "x", "x.npy", "a/b", "ü", "")


def test_any_per_example_name_round_trips(tmp_path):
    from tracker_eval.ledger.steps import Ledger
    from tracker_eval.npz import read_npz

    arrays = {name: np.arange(3, dtype=np.int32) * (i + 1) for i, name in enumerate(ODD_NAMES)}
    result = EvalResult(step=7, checkpoint="/ckpt/7", metrics={"loss": 1.0}, per_example=arrays)
    logger = JsonlLogger(context=LoggerContext(output_dir=str(tmp_path)))
    logger.log_result(result)
    logger.close()
    record = read_jsonl(tmp_path / "metrics.jsonl")[0]
    ledger = Ledger(tmp_path / "ledger", checkpoint_dir="/ckpt", config_hash="h", loggers=["jsonl"])
    assert ledger.claim(7, owner="w") and ledger.record_metrics(result, owner="w")
    for read in (load_per_example(tmp_path / "metrics.jsonl", record), ledger.result(7).per_example,
                 read_npz(tmp_path / record["per_example"])):
        assert list(read) == list(ODD_NAMES)
        for name, want in arrays.items():
            assert read[name].dtype == want.dtype and np.array_equal(read[name], want), name


def test_samples_are_files_beside_the_metrics_referenced_by_task(tmp_path):
    samples = {"my_mc": [{"doc_id": 0, "resps": [[[-0.30000000000000004, True]]], "acc": 1.0},
                         {"doc_id": 1, "resps": [[[-2.5, False]]], "acc": 0.0}],
               "gen/odd": [{"doc_id": 0, "resps": [["caf\u00e9 \u2603"]], "target": None}], "empty": []}
    result = EvalResult(step=7, checkpoint="/ckpt/7", metrics={"my_mc/acc": 0.5}, suite="harness", samples=samples)
    logger = JsonlLogger(context=LoggerContext(output_dir=str(tmp_path)))
    logger.log_result(result)
    logger.log_result(_result(8))
    logger.close()
    first, second = read_jsonl(tmp_path / "metrics.jsonl")
    assert first["suite"] == "harness" and "samples" not in second
    assert sorted(first["samples"]) == ["empty", "gen/odd", "my_mc"]
    assert all(path.startswith("metrics.samples/harness/step_7_") for path in first["samples"].values())
    folder = tmp_path / first["samples"]["my_mc"]
    assert [json.loads(line) for line in folder.read_text().splitlines()] == samples["my_mc"]  # read independently
    assert load_samples(tmp_path / "metrics.jsonl", first) == samples
    context = LoggerContext(output_dir=str(tmp_path))
    off = JsonlLogger(JsonlLogger.Config(path="other.jsonl", samples=False), context=context)
    off.log_result(result)
    off.close()
    assert "samples" not in read_jsonl(tmp_path / "other.jsonl")[0] and not (tmp_path / "other.samples").exists()
