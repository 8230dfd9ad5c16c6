"""Runs fixed-shape batches through the compiled program on the mesh; process 0 leads, others follow.

    engine = Engine(adapter.apply_fn, mesh, rows=32, packing=False)
    engine.begin(exchange, should_abort=stop.is_set)   # one run: its agreement among processes
    outputs = engine.execute(params, batches)    # process 0: one float32 [rows, 3, width] per batch
    metrics_json = engine.follow(params)         # every other process, until process 0 finishes

Only process 0 runs lm-eval, whose request order differs from process to process, so the others
cannot build the batches themselves. Process 0 announces each group of up to CHUNK batches of one
width through the runtime's key-value store, under the run's `agreement` prefix (a follower may
wait there for minutes while lm-eval builds its requests, which no device collective would
tolerate). Every process then compiles the program for that width, if it has not yet, and agrees
in one `agreement` round before the group's device broadcast, because a collective cannot be
cancelled: a process that failed before it (in lm-eval, in its own setup, compiling) posts its
reason instead, and every process raises within the agreement's poll instead of waiting in a
broadcast its peer never joins. Each process runs the same program on its part of each global
batch; outputs are replicated by the program itself, so process 0 reads them without a gather.
Batches are dispatched without waiting for results (at most MAX_IN_FLIGHT queued) and results are
read once, after the last batch. A stop request (`should_abort`) is honoured by process 0 before
every batch: with several processes, it says before each batch of a group whether it runs, and
the others wait for that word, so all stop between the same two batches.
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
from tracker_eval.evaluation.agreement import POLL_S, Exchange, Solo
from tracker_eval.evaluation.evaluator import EvalAborted
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
        self._executables: dict[int, Any] = {}  # row width -> the program compiled for it
        self._channel: _Channel | None = None
        self._should_abort: Callable[[], bool] | None = None

    def begin(self, exchange: Exchange | Solo, *, should_abort: Callable[[], bool] | None = None) -> None:
        """Starts one evaluation: its agreement among the processes and process 0's stop request."""
        self._channel = None if exchange.solo else _Channel(exchange)
        self._should_abort = should_abort

    def check_stop(self) -> None:
        """Process 0: raises `EvalAborted` when a stop was requested (followers wait for process 0)."""
        if self._should_abort is not None and self._should_abort():
            raise EvalAborted("evaluation abandoned at a stop request")

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
                self.check_stop()
                self._executable(params, batch["tokens"].shape[1])
                self._dispatch(params, batch, pending, fetch=True)
        else:
            batches = list(batches)
            order = sorted(range(len(batches)), key=lambda i: batches[i]["tokens"].shape[1])
            results: list[Any] = [None] * len(batches)
            for group in _groups(order, key=lambda i: batches[i]["tokens"].shape[1]):
                self.check_stop()
                width = batches[group[0]]["tokens"].shape[1]
                self._executable(params, width)  # before the message: process 0's own failures come first
                self._channel.send(f"RUN {width} {len(group)}")
                self._channel.agree()
                self._channel.forget_previous()
                multihost_utils.broadcast_one_to_all(np.stack([_device_array(batches[i]) for i in group]))
                for k, i in enumerate(group):
                    stop = self._should_abort is not None and self._should_abort()
                    self._channel.say_batch(k, "stop" if stop else "go")
                    if stop:
                        raise EvalAborted("evaluation abandoned at a stop request")
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
          EvalAborted: process 0 abandoned the evaluation at a stop request.
          PeerFailedError: another process failed this evaluation; the message carries its reason.
        """
        assert self._channel is not None, "follow() is for the other processes of a multi-process job"
        pending: list[jax.Array] = []
        while True:
            op, _, rest = self._channel.receive().partition(" ")
            if op == "RUN":
                width, count = (int(v) for v in rest.split())
                self._executable(params, width)
                self._channel.agree()
                shape = (CHUNK if count == CHUNK else 1, self.rows, len(DEVICE_FIELDS), width)
                received = multihost_utils.broadcast_one_to_all(np.zeros(shape, np.int32))
                for k, array in enumerate(received[:count]):
                    if self._channel.hear_batch(k) == "stop":
                        jax.block_until_ready(pending)
                        raise EvalAborted("process 0 abandoned this evaluation at a stop request")
                    self._dispatch(params, array, pending)
                del pending[:-MAX_IN_FLIGHT]  # nothing is read here: keep only what bounds the queue
            elif op == "STOP":
                jax.block_until_ready(pending)
                return rest
            else:
                jax.block_until_ready(pending)
                raise EvalAborted(f"process 0 abandoned this evaluation at a stop request: {rest}")

    def finish(self, message: str) -> None:
        """Process 0: tells the followers the evaluation is over (with `message`, e.g. metrics)."""
        if self._channel is not None:
            self._channel.send(f"STOP {message}")

    def stopped(self, reason: str) -> None:
        """Process 0: tells the followers the evaluation was abandoned at a stop request."""
        if self._channel is not None:
            self._channel.send(f"STOPPED {reason}")

    def _executable(self, params: Any, width: int) -> Any:
        """The program compiled for rows of `width` (compiled before a group's agreement, so that a
        failure to trace or compile it stops every process instead of one)."""
        if width not in self._executables:
            spec = jax.ShapeDtypeStruct((self.rows, len(DEVICE_FIELDS), width), np.int32, sharding=self._by_row)
            self._executables[width] = self._program.lower(params, spec).compile()
        return self._executables[width]

    def _dispatch(self, params: Any, batch: Mapping[str, np.ndarray] | np.ndarray, pending: list[jax.Array], *,
                  fetch: bool = False) -> None:
        if len(pending) >= MAX_IN_FLIGHT:
            pending[-MAX_IN_FLIGHT].block_until_ready()  # a wait, not a transfer
        array = batch if isinstance(batch, np.ndarray) else _device_array(batch)
        # Compiled by `_executable` before the group's agreement: nothing here may fail on one process only.
        output = self._executables[array.shape[-1]](params, put(array, self._by_row))
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
    """Ordered messages from process 0 to the others, under the run's agreement prefix (deleted with
    it), and the agreement's rounds before each broadcast."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.namespace = f"{exchange.prefix}/harness"
        self.seq = 0

    def _key(self) -> str:
        return f"{self.namespace}/{self.seq}"

    def send(self, message: str) -> None:
        self.seq += 1
        kvstore.put(self.exchange.client, self._key(), message)

    def agree(self) -> None:
        """One agreement round: returns once every process is ready for the broadcast.

        Raises:
          PeerFailedError: a process failed before it (its reason is in the message).
        """
        self.exchange.agree_ready()

    def say_batch(self, index: int, verdict: str) -> None:
        """Process 0: whether batch `index` of the current group runs (`go`) or the run stops (`stop`);
        so a stop request takes effect between two batches on every process, not after a group."""
        kvstore.put(self.exchange.client, f"{self._key()}/b{index}", verdict)

    def hear_batch(self, index: int) -> str:
        """A follower: process 0's word on batch `index` of the current group."""
        return self._wait(f"{self._key()}/b{index}")

    def forget_previous(self) -> None:
        """Process 0: drops the previous group's message and batch words (every follower has agreed
        since, so it has read them all)."""
        if self.seq > 1:
            kvstore.delete(self.exchange.client, f"{self.namespace}/{self.seq - 1}")

    def receive(self) -> str:
        """The next message; raises `PeerFailedError` within `POLL_S` of another process's failure."""
        self.seq += 1
        return self._wait(self._key())

    def _wait(self, key: str) -> str:
        while True:  # a lost process 0 is noticed by the heartbeats, not here
            value = kvstore.wait_get(self.exchange.client, key, timeout_s=POLL_S)
            if value is not None:
                return value
            self.exchange.check()
