"""Resume within an `lm_harness` suite: a watcher SIGKILLed in the middle of a step's harness run, then
restarted, computes only what the killed attempt had not kept, and stores the result an uninterrupted
run stores (metrics and per-sample records, bit for bit); the kept answers go once it is stored.

The model is the byte LM paced by a file (tests/harness_models.py:make_paced_lm): every batch appends
a byte to a marker file, which counts the model calls of each attempt.
"""

from __future__ import annotations

import json
import pathlib
import sqlite3

import pytest
from tracker_eval_lm_harness.offline import prepare_environment

prepare_environment()  # before lm-eval (and with it `datasets`) is imported by the reference

from harness_reference import ReferenceLM, tiny_lm_logits  # noqa: E402
from harness_tasks import write_shuffle_task, write_tasks  # noqa: E402
from reference import restored_params  # noqa: E402
from watcher_harness import WatcherProcess, ledger_rows, publish, wait_for  # noqa: E402

from tracker_eval.ledger.files import read_samples  # noqa: E402

MAX_LENGTH = 64
# Many log-likelihood requests (t_shuffle), rolling windows (t_ppl) and generations (t_gen).
OPTIONS = {"kind": "lm_harness", "tasks": ["t_shuffle", "t_ppl", "t_gen"], "max_length": MAX_LENGTH,
           "batch_size": 2, "bootstrap_iters": 0}
SLOW_S = 0.05  # per batch in the attempt that is killed, so the kill lands in the middle of the step


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A checkpoint (step 1) of the byte LM, and one task folder holding the three tasks."""
    from tracker_eval.tasks.train import train_language_model

    root = tmp_path_factory.mktemp("harness-resume")
    train_language_model(root / "ckpts", steps=1, save_every=1, batch_size=4, seq_len=32)
    tasks = write_shuffle_task(root / "tasks", documents=60)
    reference = ReferenceLM(tiny_lm_logits(restored_params(root / "ckpts", 1)), max_length=MAX_LENGTH)
    write_tasks(tasks, greedy=reference.complete)
    return root / "ckpts", tasks


def _config(root: pathlib.Path, tasks: pathlib.Path) -> pathlib.Path:
    config = {
        "checkpoint_dir": str(root / "ckpts"),
        "output_dir": str(root / "out"),
        "model": "harness_models:make_paced_lm",
        "model_kwargs": {"marker": str(root / "batches"), "delay_file": str(root / "delay")},
        "suites": {"harness": {**OPTIONS, "include_path": str(tasks)}},
        "loggers": [{"type": "jsonl"}],
        "watch": {"poll_interval_s": 0.3, "until_step": 1, "idle_timeout_s": 120},
    }
    path = root / "watch.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _batches(root: pathlib.Path) -> int:
    marker = root / "batches"
    return marker.stat().st_size if marker.exists() else 0


def _kept(output_dir: pathlib.Path) -> int:
    """Answers on disk (0 before the file or its table exists)."""
    path = output_dir / "answers.sqlite"
    if not path.exists():
        return 0
    conn = sqlite3.connect(str(path), timeout=30)
    try:
        return conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def _stored(output_dir: pathlib.Path) -> tuple[dict, dict, dict]:
    """Step 1's stored (metrics, provenance, per-sample records)."""
    conn = sqlite3.connect(str(output_dir / "ledger.sqlite"), timeout=30)
    try:
        payload, samples_path = conn.execute("SELECT result_json, samples_path FROM steps WHERE step = 1").fetchone()
    finally:
        conn.close()
    result = json.loads(payload)
    return result["metrics"], result["provenance"], read_samples(output_dir / samples_path)


def _run_to_the_end(root: pathlib.Path, tasks: pathlib.Path) -> None:
    with WatcherProcess(_config(root, tasks)) as watcher:
        code = watcher.wait_exit(timeout=300)
    assert code == 0, watcher.tail()
    assert ledger_rows(root / "out")[1]["state"] == "delivered"


def test_a_sigkilled_harness_step_resumes_with_fewer_model_calls_and_the_uninterrupted_result(tmp_path, source):
    ckpts, tasks = source
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for root in (whole, cut):
        publish(ckpts, root / "ckpts", 1)
        (root / "delay").write_text("0")

    _run_to_the_end(whole, tasks)
    whole_calls = _batches(whole)
    metrics, provenance, samples = _stored(whole / "out")
    kept_by_whole = _kept(whole / "out")

    (cut / "delay").write_text(str(SLOW_S))
    with WatcherProcess(_config(cut, tasks)) as first:
        # Killed once about half of what an attempt keeps is on disk: scores, and none of the result.
        wait_for(lambda: _kept(cut / "out") >= provenance["answers_kept"] // 2, timeout=300,
                 what="half of the answers kept", watchers=[first])
        first.kill9()
    kept_at_kill = _kept(cut / "out")
    assert ledger_rows(cut / "out")[1]["metrics"] == {}
    calls_before = _batches(cut)
    (cut / "delay").write_text("0")
    _run_to_the_end(cut, tasks)
    second_calls = _batches(cut) - calls_before
    again, again_provenance, again_samples = _stored(cut / "out")

    # Fewer model calls: only the requests without a kept answer were run.
    assert 0 < second_calls < whole_calls, (second_calls, whole_calls)
    assert again_provenance["answers_reused"] >= kept_at_kill // 2 > 0, (again_provenance, kept_at_kill)
    assert provenance["answers_reused"] == 0 and provenance["answers_kept"] > 0
    assert again_provenance["requests"] == provenance["requests"]
    # The result of an uninterrupted run, bit for bit: metrics and every per-sample record.
    assert again == metrics
    assert again_samples == samples
    assert set(samples) == {"t_shuffle", "t_ppl", "t_gen"} and all(samples.values())
    # The answers go once the result is stored (and the uninterrupted run's went too).
    assert _kept(cut / "out") == 0 and kept_by_whole == 0
    print(f"model calls: uninterrupted {whole_calls}, after the kill {second_calls}; "
          f"answers kept at the kill {kept_at_kill}")
