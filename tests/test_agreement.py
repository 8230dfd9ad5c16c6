"""The agreement protocol among processes, with threads as processes over an in-memory store.

The store below behaves like the runtime's key-value store as seen on a real 2-process job
(tests/test_multihost.py runs the real one): blocking gets time out with DEADLINE_EXCEEDED,
missing keys say NOT_FOUND, a key set twice says ALREADY_EXISTS, a delete takes the keys below.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tracker_eval.evaluation import agreement, batches, transfer

PREFIX = "tracker_eval/s/10/1"


class FakeStore:
    """The client methods tracker_eval.kvstore calls, over a dict; counts the most keys held."""

    def __init__(self) -> None:
        self.data: dict[str, object] = {}
        self.changed = threading.Condition()
        self.most = 0

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.changed:
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: key {key}")
            self.data[key] = value
            self.most = max(self.most, len(self.data))
            self.changed.notify_all()

    key_value_set_bytes = key_value_set

    def key_value_try_get(self, key):
        with self.changed:
            if key not in self.data:
                raise RuntimeError(f"NOT_FOUND: Config key {key} not found.")
            return self.data[key]

    def blocking_key_value_get(self, key, timeout_in_ms):
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.data, timeout=timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            return self.data[key]

    blocking_key_value_get_bytes = blocking_key_value_get

    def key_value_dir_get_bytes(self, key):
        with self.changed:
            return [(k, v) for k, v in self.data.items() if k.startswith(f"{key}/")]

    def key_value_delete(self, key):
        with self.changed:
            for k in [k for k in self.data if k == key or k.startswith(f"{key}/")]:
                del self.data[k]


def _run(store, bodies, *, timeout=60.0):
    """Runs each body(exchange) in its own thread as process i; returns (results, errors)."""
    results, errors = [None] * len(bodies), [None] * len(bodies)

    def run(index, body):
        exchange = agreement.Exchange(PREFIX, client=store, process_index=index, process_count=len(bodies),
                                      poll_s=0.05)
        try:
            with exchange.guard():
                results[index] = body(exchange)
        except Exception as error:  # noqa: BLE001 - the test reads what each process raised
            errors[index] = error
        finally:
            exchange.close()

    threads = [threading.Thread(target=run, args=(i, body), daemon=True) for i, body in enumerate(bodies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a process is still waiting"
    return results, errors


def _consume(items, seen):
    def body(exchange):
        for item in exchange.admit(items):
            seen.append(item)
        exchange.agree_done()
        return len(seen)

    return body


def test_processes_run_the_same_batches_and_leave_no_keys():
    store = FakeStore()
    slow = batches.prefetch(range(40), lambda i: (time.sleep(0.002), i)[1], depth=2)
    seen = [[], []]
    results, errors = _run(store, [_consume(list(range(40)), seen[0]), _consume(slow, seen[1])])
    assert errors == [None, None]
    assert results == [40, 40] and seen[0] == seen[1] == list(range(40))
    agreement.delete_finished(store)
    assert store.data == {}
    assert store.most <= 8  # rounds are deleted as they are proven read: the store does not grow


@pytest.mark.parametrize("short", [0, 1])
def test_data_ending_early_on_one_process_stops_both_before_any_batch_the_other_lacks(short):
    store = FakeStore()
    seen = [[], []]
    data = [list(range(5)), list(range(5))]
    data[short] = list(range(3))
    _, errors = _run(store, [_consume(data[0], seen[0]), _consume(data[1], seen[1])])
    assert all(isinstance(e, agreement.PeerFailedError) for e in errors), errors
    assert {e.process for e in errors} == {short}
    assert f"data ended after 3 batches on process {short} but process {1 - short}" in str(errors[0])
    assert len(seen[0]) <= 3 and len(seen[1]) <= 3


def test_a_failure_before_the_first_batch_reaches_a_peer_that_waits_on_its_own_data():
    store = FakeStore()
    never = threading.Event()
    stuck = batches.prefetch(iter(lambda: never.wait(), True), lambda item: item)  # yields nothing

    def cannot_restore(exchange):
        raise OSError("shard 3 of host 1 is unreadable")

    try:
        _, errors = _run(store, [_consume(stuck, []), cannot_restore])
    finally:
        never.set()
    assert isinstance(errors[1], OSError)
    assert isinstance(errors[0], agreement.PeerFailedError)
    assert str(errors[0]) == "process 1: OSError: shard 3 of host 1 is unreadable"


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failure_in_the_middle_stops_every_process_at_the_same_batch(failing):
    store = FakeStore()
    seen = [[], []]

    def items(index):
        for item in range(50):
            if index == failing and item == 7:
                raise ValueError("bad record 7")
            yield item

    _, errors = _run(store, [_consume(items(0), seen[0]), _consume(items(1), seen[1])])
    assert isinstance(errors[failing], ValueError)
    other = errors[1 - failing]
    assert isinstance(other, agreement.PeerFailedError) and other.process == failing
    assert other.reason == "ValueError: bad record 7"
    assert seen[0] == seen[1] and len(seen[0]) <= 7
    agreement.delete_finished(store)
    assert store.data == {}


def test_rows_travel_to_process_zero_in_dataset_order_and_are_deleted():
    store = FakeStore()
    # Two batches of 4 rows per process; rows of process p in batch b are 100 * b + 10 * p + i.
    parts = [{"file": np.asarray([100 * b + 10 * p + i for b in range(2) for i in range(4)], np.float32)}
             for p in range(2)]

    def body(index):
        def run(exchange):
            exchange.agree_done(rows=transfer.pack_rows(parts[index], np.asarray([4, 4])))
            return transfer.merge_rows(exchange.gathered_rows()) if exchange.primary else None

        return run

    results, errors = _run(store, [body(0), body(1)])
    assert errors == [None, None]
    expected = [0, 1, 2, 3, 10, 11, 12, 13, 100, 101, 102, 103, 110, 111, 112, 113]
    np.testing.assert_array_equal(results[0]["file"], expected)
    agreement.delete_finished(store)
    assert store.data == {}


def test_a_client_that_lost_a_method_fails_naming_the_installed_jaxlib():
    import jaxlib

    from tracker_eval import kvstore

    kvstore.check_client_api(FakeStore)  # has every method kvstore calls
    moved = type("Client", (), {k: v for k, v in vars(FakeStore).items() if k != "key_value_dir_get_bytes"})
    with pytest.raises(RuntimeError) as raised:
        kvstore.check_client_api(moved)
    message = str(raised.value)
    assert f"jaxlib {jaxlib.__version__}" in message and "key_value_dir_get_bytes" in message
    assert "\n" not in message
