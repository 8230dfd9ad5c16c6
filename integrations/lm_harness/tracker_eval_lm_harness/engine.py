"""Runs fixed-shape batches through the compiled program on the mesh; process 0 leads, others follow.

    engine = Engine(adapter.apply_fn, mesh, rows=32, packing=False, namespace="harness")
    outputs = engine.execute(params, batches)    # process 0: one float32 [rows, 3, width] per batch
    metrics_json = engine.follow(params)         # every other process, until process 0 finishes

Only process 0 runs lm-eval, whose request order differs from process to process, so the others
cannot build the batches themselves. Process 0 announces each group of up to CHUNK batches of one
width through the runtime's key-value store (a follower may wait there for minutes while lm-eval
builds its requests, which no device collective would tolerate), then every process takes the
group's arrays through one device broadcast and runs the same program on its part of each global
batch. Outputs are replicated by the program itself then, so process 0 reads them without a gather.
Batches are dispatched without waiting for results (at most MAX_IN_FLIGHT queued) and results
are read once, after the last batch.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from tracker_eval import kvstore
from tracker_eval.evaluation.sharding import batch_sharding, put, replicated
from tracker_eval_lm_harness.program import build_program
from tracker_eval_lm_harness.rows import DEVICE_FIELDS, extras_capacity

CHUNK = 8  # batches per broadcast
MAX_IN_FLIGHT = 2  # XLA's CPU runtime deadlocks on unbounded queues of collective programs


class Engine:
    """The compiled program on one mesh, and the leader/follower protocol of a multi-process job."""

    def __init__(
        self,
        apply_fn: Callable[..., Any],
        mesh: jax.sharding.Mesh,
        *,
        rows: int,
        packing: bool,
        namespace: str,
    ) -> None:
        self.rows = rows
        self.compiled_shapes: list[tuple[int, ...]] = []
        self.device_seconds = 0.0
        program = build_program(apply_fn, packing=packing, extras=extras_capacity,
                                on_trace=self.compiled_shapes.append)
        self._by_row = batch_sharding(mesh)
        # One process reads each device's rows directly; several get the outputs replicated by the
        # program itself, so process 0 reads its own copy without a separate gather.
        self._multi = jax.process_count() > 1
        self._program = jax.jit(program, out_shardings=replicated(mesh) if self._multi else self._by_row)
        self._channel = _Channel(f"tracker_eval/harness/{namespace}") if self._multi else None

    def begin(self) -> None:
        """Starts one evaluation on every process (numbers this run's messages)."""
        if self._channel is not None:
            self._channel.begin()

    def execute(self, params: Any, batches: Iterable[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
        """Process 0: runs every batch (followers run them too) and returns the outputs in order.

        Args:
          params: the model's params on the mesh.
          batches: from `rows.score_batches` (consumed as they are built) or `rows.step_batch`.

        Returns:
          Per batch, the program's float32 [rows, 3, width]: logp, argmax, extra logps.
        """
        start = time.perf_counter()
        pending: list[jax.Array] = []
        if self._channel is None:
            for batch in batches:
                self._dispatch(params, batch, pending, fetch=True)
        else:
            batches = list(batches)
            order = sorted(range(len(batches)), key=lambda i: batches[i]["tokens"].shape[1])
            results: list[Any] = [None] * len(batches)
            for group in _groups(order, key=lambda i: batches[i]["tokens"].shape[1]):
                width = batches[group[0]]["tokens"].shape[1]
                self._channel.send(f"RUN {width} {len(group)}")
                multihost_utils.broadcast_one_to_all(np.stack([_device_array(batches[i]) for i in group]))
                self._channel.forget()
                for i in group:
                    results[i] = len(pending)
                    self._dispatch(params, batches[i], pending, fetch=True)
            pending = [pending[results[i]] for i in range(len(results))]
        fetched = [np.asarray(out.addressable_data(0) if self._multi else out) for out in pending]
        self.device_seconds += time.perf_counter() - start
        return fetched

    def follow(self, params: Any) -> str:
        """Every process but 0: runs what process 0 announces until it finishes.

        Returns:
          The message process 0 finished with (its metrics as JSON).

        Raises:
          RuntimeError: process 0 failed; the message carries its reason.
        """
        assert self._channel is not None, "follow() is for the other processes of a multi-process job"
        pending: list[jax.Array] = []
        while True:
            op, _, rest = self._channel.receive().partition(" ")
            if op == "RUN":
                width, count = (int(v) for v in rest.split())
                shape = (CHUNK if count == CHUNK else 1, self.rows, len(DEVICE_FIELDS), width)
                received = multihost_utils.broadcast_one_to_all(np.zeros(shape, np.int32))
                for array in received[:count]:
                    self._dispatch(params, array, pending)
                del pending[:-MAX_IN_FLIGHT]  # nothing is read here: keep only what bounds the queue
            elif op == "STOP":
                jax.block_until_ready(pending)
                return rest
            else:
                jax.block_until_ready(pending)
                raise RuntimeError(f"process 0 stopped this evaluation: {rest}")

    def finish(self, message: str) -> None:
        """Process 0: tells the followers the evaluation is over (with `message`, e.g. metrics)."""
        if self._channel is not None:
            self._channel.send(f"STOP {message}")

    def abort(self, reason: str) -> None:
        """Process 0: tells the followers the evaluation failed."""
        if self._channel is not None:
            self._channel.send(f"ABORT {reason}")

    def _dispatch(self, params: Any, batch: Mapping[str, np.ndarray] | np.ndarray, pending: list[jax.Array], *,
                  fetch: bool = False) -> None:
        if len(pending) >= MAX_IN_FLIGHT:
            pending[-MAX_IN_FLIGHT].block_until_ready()  # a wait, not a transfer
        array = batch if isinstance(batch, np.ndarray) else _device_array(batch)
        output = self._program(params, put(array, self._by_row))
        if fetch:  # the copy to the host overlaps the next batches' work
            output.copy_to_host_async()
        pending.append(output)


def _groups(order: list[int], *, key: Callable[[int], int]) -> list[list[int]]:
    """Runs of equal key, cut into groups of CHUNK and the rest one by one (two broadcast shapes a width)."""
    groups: list[list[int]] = []
    for _, same in itertools.groupby(order, key=key):
        run = list(same)
        full = len(run) // CHUNK * CHUNK
        groups += [run[s:s + CHUNK] for s in range(0, full, CHUNK)] + [[j] for j in run[full:]]
    return groups


def _device_array(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """The program's input: the per-token arrays of a batch, [rows, fields, width] (one transfer)."""
    return batch["device"]


class _Channel:
    """Ordered messages from process 0 to the others through the runtime's key-value store."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.epoch = 0
        self.seq = 0

    def begin(self) -> None:
        self.epoch += 1
        self.seq = 0

    def _key(self) -> str:
        return f"{self.namespace}/{self.epoch}/{self.seq}"

    def send(self, message: str) -> None:
        self.seq += 1
        kvstore.client().key_value_set(self._key(), message)

    def forget(self) -> None:
        """Drops the last message once every follower has acted on it (they joined its broadcast)."""
        kvstore.client().key_value_delete(self._key())

    def receive(self) -> str:
        self.seq += 1
        client = kvstore.client()
        while True:  # a lost process 0 is noticed by the runtime's heartbeats, not here
            try:
                return client.blocking_key_value_get(self._key(), 10_000)
            except Exception as error:  # noqa: BLE001 - this poll's timeout, or a lost coordinator
                if "DEADLINE_EXCEEDED" not in str(error) and "timed out" not in str(error).lower():
                    raise
