"""The answer store: a (step, suite)'s answers kept in batches, never served to another scope, and
surviving SIGKILL except for at most the last `flush_s` seconds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from watcher_harness import child_env, wait_for

from tracker_eval.ledger.answers import AnswerStore, answer_scope, discard_answers, request_key

IDENTITY = {"model": "tiny:make", "tokenizer": "bytes-v1", "max_length": 512, "tasks": {"cloze": 1.0}}


def _scope(**changes: object) -> str:
    step = changes.pop("step", 1500)
    return answer_scope(stream="suite-hash", step=step, identity={**IDENTITY, **changes})


def test_answers_round_trip_exactly_stay_in_their_scope_and_are_discarded(tmp_path):
    answers = {request_key("loglikelihood", ["ctx", f" choice {i}"]): [-(i + 1) / 3.0, i % 2 == 0] for i in range(50)}
    answers[request_key("loglikelihood_rolling", ["some text"])] = -123.456789012345
    answers[request_key("generate_until", ["Q:", {"until": ["\n"]}])] = " an answer\nwith lines"
    with AnswerStore(tmp_path, scope=_scope(), flush_s=60.0, max_batch=10_000) as store:
        for key, value in answers.items():
            store.keep(key, value)
        assert store.lookup(answers) == answers  # served from memory before its batch is written
    assert store.batches_written == 1  # one transaction for 52 answers, at close
    with AnswerStore(tmp_path, scope=_scope()) as again:
        assert again.lookup([*answers, request_key("loglikelihood", ["ctx", " other"])]) == answers
    assert request_key("loglikelihood", ("ctx", " choice 0")) in answers  # a tuple and a list are one request
    for other in (_scope(step=1000), _scope(model="tiny:other"), _scope(tokenizer="bytes-v2"),
                  _scope(max_length=1024), _scope(tasks={"cloze": 2.0}),
                  answer_scope(stream="another-suite", step=1500, identity=IDENTITY)):
        with AnswerStore(tmp_path, scope=other) as elsewhere:
            assert elsewhere.lookup(answers) == {}
    with AnswerStore(tmp_path, scope=_scope(step=1000)) as neighbour:
        neighbour.keep("k", 1.0)
    assert discard_answers(tmp_path, _scope()) == len(answers)
    with AnswerStore(tmp_path, scope=_scope()) as after:
        assert after.lookup(answers) == {}
    with AnswerStore(tmp_path, scope=_scope(step=1000)) as neighbour:
        assert neighbour.lookup(["k"]) == {"k": 1.0}


def test_answers_are_discarded_by_stream_and_step_whatever_their_scope(tmp_path):
    """What stores a result knows the stream and the step, not the rest of the scope (model, tasks):
    every scope of that (stream, step) goes, a neighbouring step's or stream's stays."""
    scopes = {(stream, step, model): answer_scope(stream=stream, step=step, identity={**IDENTITY, "model": model})
              for stream in ("s1", "s2") for step in (1000, 1500) for model in ("a", "b")}
    for (stream, step, _), scope in scopes.items():
        with AnswerStore(tmp_path, scope=scope, stream=stream, step=step) as store:
            store.keep("k", [-1.5, True])
    assert discard_answers(tmp_path, stream="s1", step=1500) == 2
    for (stream, step, _), scope in scopes.items():
        with AnswerStore(tmp_path, scope=scope) as store:
            assert store.lookup(["k"]) == ({} if (stream, step) == ("s1", 1500) else {"k": [-1.5, True]})
    with pytest.raises(ValueError, match="either scope or both stream and step"):
        discard_answers(tmp_path, stream="s1")
    assert discard_answers(tmp_path / "nothing-here", stream="s1", step=1) == 0


def test_a_full_batch_is_written_without_waiting_for_flush_s_in_few_transactions(tmp_path):
    keys = [request_key("loglikelihood", [str(i)]) for i in range(1000)]
    with AnswerStore(tmp_path, scope=_scope(), flush_s=600.0, max_batch=100) as store, \
            AnswerStore(tmp_path, scope=_scope(), flush_s=600.0) as reader:  # reads only the file
        for i, key in enumerate(keys):
            store.keep(key, float(i))
        # At most one batch short of max_batch may wait for flush_s; the full ones are written now.
        on_disk = wait_for(lambda: len(found := reader.lookup(keys)) >= 900 and found, timeout=60,
                           what="full batches on disk")
        assert 1 <= store.batches_written <= 10  # batched: not a transaction per answer
    want = {key: float(i) for i, key in enumerate(keys)}
    assert on_disk == {key: want[key] for key in on_disk}


CHILD = """
import sys, time
from tracker_eval.ledger.answers import AnswerStore, request_key
store = AnswerStore(sys.argv[1], scope=sys.argv[2], flush_s=float(sys.argv[3]))
i = 0
while True:
    store.keep(request_key("loglikelihood", [str(i)]), [-i / 7.0, i % 3 == 0])
    print(i, flush=True)
    i += 1
    time.sleep(0.002)
"""


@pytest.mark.parametrize("kill_after_s", [1.3, 2.9])
def test_sigkill_loses_at_most_the_last_flush_interval(tmp_path, kill_after_s):
    flush_s = 0.5
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), _scope(), str(flush_s)],
                             stdout=subprocess.PIPE, text=True, env=child_env(devices=1))
    assert child.stdout is not None
    kept: list[tuple[float, int]] = []
    start = time.monotonic()
    while time.monotonic() - start < kill_after_s:
        line = child.stdout.readline()
        assert line, "the child stopped early"
        kept.append((time.monotonic(), int(line)))
    killed_at = time.monotonic()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    keys = {request_key("loglikelihood", [str(i)]): i for _, i in kept}
    with AnswerStore(tmp_path, scope=_scope()) as store:
        found = store.lookup(keys)
    assert found, "nothing survived"
    for key, value in found.items():
        i = keys[key]
        assert value == [-i / 7.0, i % 3 == 0]
    survived = {keys[key] for key in found}
    # Everything kept well before the kill survived; the loss is bounded by the flush interval
    # (plus the time this test took to read the lines, on a busy machine).
    old = {i for at, i in kept if at < killed_at - flush_s - 1.0}
    assert old <= survived, sorted(old - survived)[:10]
    assert survived == set(range(len(survived)))  # batches are prefixes: no hole
    print(json.dumps({"kept": len(kept), "survived": len(survived)}))
