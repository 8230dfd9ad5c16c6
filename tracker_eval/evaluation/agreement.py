"""Processes of a multi-process evaluation agree before running any program a peer might not run.

    exchange = open_exchange("tracker_eval/watch-1a2b3c4d/300/7")   # stream/step/attempt
    try:
        with exchange.guard():             # an error in here reaches every process, then is raised
            state = restore(300)
            for batch in exchange.admit(placed_batches):   # only batches every process holds too
                accumulator = step(accumulator, batch)
            exchange.agree_done(rows=packed_rows)          # after it, a collective is safe
        rows = exchange.gathered_rows()                    # process 0: every process's rows
    finally:
        exchange.close()

Collectives cannot be cancelled: a process that enters one its peer never joins waits forever (a
cross-process sum over gloo with the peer gone was still waiting after 140 s). So no process may
dispatch a step before every process holds that step's batch, and none may gather results before
every process has finished its steps. Processes report to process 0 through the runtime's
key-value store under `<prefix>/r<round>/<process>`; process 0 answers each round with one verdict
(`go <batches> <last>` or `abort <process> <reason>`). A batch round reports how many placed batches
each process holds and whether its data has ended; all run the smallest number, so data that ends
early on one process is seen before anyone runs a batch the others lack. A round takes every batch
already prefetched, so rounds are few and run while earlier steps compute.

A process that fails anywhere in a guarded block sets `<prefix>/abort` (first failure wins) and
posts it in place of its round report. Processes waiting on a round see it at once; a process
reading its own data looks every `POLL_S` seconds. All then raise `PeerFailedError` naming the
failing process and its one-line reason; the failing process raises its own error. Nothing waits
on a peer that failed longer than `POLL_S` past the local work it is in (a restore, one batch
read, the steps already in flight). A peer that dies is the heartbeat monitor's business.

Keys are deleted once read: process 0 deletes each round when the next one proves every process
has read it, rows as it reads them, and the whole prefix once every process has said it is done.
In a single process `open_exchange` returns a pass-through that never touches the store.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import jax

from tracker_eval import kvstore
from tracker_eval.errors import one_line

T = TypeVar("T")

POLL_S = 0.5  # how often a process that waits on its own work looks for a peer's failure
MOST_PER_ROUND = 8  # prefetched batches one round may grant; more are taken in the next round
ROWS_WAIT_S = 60.0  # rows are posted before the last round: they are there when it is over

_to_delete: dict[int, list[tuple[str, int]]] = {}  # process 0, per client: closed (prefix, process count)


class PeerFailedError(RuntimeError):
    """Another process of the job failed this evaluation; the message names it and its reason."""

    def __init__(self, process: int, reason: str) -> None:
        super().__init__(f"process {process}: {reason}")
        self.process = process
        self.reason = reason


def open_exchange(prefix: str) -> Exchange | Solo:
    """The agreement of one evaluation attempt; `prefix` must be the same on every process and
    never reused in a job (e.g. `tracker_eval/<stream>/<step>/<attempt>`)."""
    if jax.process_count() == 1:
        return Solo()
    return Exchange(prefix, client=kvstore.client(), process_index=jax.process_index(),
                    process_count=jax.process_count())


@contextlib.contextmanager
def scope(exchange: Exchange | Solo | None, prefix: Callable[[], str]) -> Iterator[Exchange | Solo]:
    """`exchange` as it is, or a new one for `prefix()` that is closed when the block ends."""
    if exchange is not None:
        yield exchange
        return
    opened = open_exchange(prefix())
    try:
        yield opened
    finally:
        opened.close()


class Solo:
    """One process: nothing to agree on, nothing stored."""

    solo = True
    primary = True

    def guard(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def admit(self, batches: Iterable[T], **_: Any) -> Iterable[T]:
        return batches

    def agree_done(self, *, rows: bytes | None = None) -> None:
        del rows

    def gathered_rows(self) -> list[bytes]:
        return []

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class _Holding:
    have: int  # batches held and not yet granted
    total: int  # batches taken from the data so far
    ended: bool  # the data has no more


class Exchange:
    """One evaluation attempt's agreements among the processes of a job (see the module doc)."""

    solo = False

    def __init__(self, prefix: str, *, client: Any, process_index: int, process_count: int,
                 poll_s: float = POLL_S) -> None:
        self.prefix = prefix.rstrip("/")
        self.client = client
        self.me = process_index
        self.count = process_count
        self.primary = process_index == 0
        self.poll_s = poll_s
        self._round = 1  # the round this process reports in next
        self._failed = False
        self._rows: bytes | None = None
        self._taken = 0  # batches taken from this process's data

    def guard(self) -> contextlib.AbstractContextManager[None]:
        """Reports any error raised in the block to every process, then re-raises it."""
        return _Guard(self)

    def fail(self, error: BaseException) -> None:
        """Tells every process that this one failed (once; later calls do nothing)."""
        if self._failed:
            return
        self._failed = True
        reason = f"{self.me}\t{type(error).__name__}: {one_line(error, limit=400)}"
        kvstore.set_once(self.client, f"{self.prefix}/abort", reason)
        # In place of this round's report, so whoever waits on it wakes now.
        key = f"{self.prefix}/r{self._round}/{'v' if self.primary else self.me}"
        kvstore.set_once(self.client, key, f"abort {reason}")

    def check(self) -> None:
        """Raises `PeerFailedError` when another process has failed this evaluation."""
        value = kvstore.try_get(self.client, f"{self.prefix}/abort")
        if value is not None:
            self._raise(value)

    def _raise(self, abort: str) -> None:
        process, _, reason = abort.partition("\t")
        self._failed = True
        raise PeerFailedError(int(process), reason)

    def _wait(self, key: str) -> str:
        while True:
            value = kvstore.wait_get(self.client, key, timeout_s=self.poll_s)
            if value is not None:
                return value
            self.check()

    def _agree(self, report: str, decide: Callable[[list[str]], str]) -> str:
        """One round: every process's report reaches process 0, whose verdict reaches everyone."""
        round_dir = f"{self.prefix}/r{self._round}"
        if self.primary:
            reports = [report]
            for process in range(1, self.count):
                reports.append(self._wait(f"{round_dir}/{process}"))
            failed = next((r for r in reports if r.startswith("abort ")), None)
            verdict = failed or decide(reports)
            if verdict.startswith("abort ") and failed is None:
                kvstore.set_once(self.client, f"{self.prefix}/abort", verdict[len("abort "):])
            self.client.key_value_set(f"{round_dir}/v", verdict)
            if self._round > 1:  # every process reported in this round, so all read the last verdict
                kvstore.delete(self.client, f"{self.prefix}/r{self._round - 1}")
        else:
            self.client.key_value_set(f"{round_dir}/{self.me}", report)
            verdict = self._wait(f"{round_dir}/v")
        self._round += 1
        if verdict.startswith("abort "):
            self._raise(verdict[len("abort "):])
        return verdict

    def admit(self, batches: Iterable[T], *, before_round: Callable[[], None] | None = None,
              first: Callable[[T], None] | None = None) -> Iterator[T]:
        """The batches every process holds, in order; ends when every process's data has ended.

        Args:
          batches: this process's placed batches (a `prefetch` is waited on with failure checks).
          before_round: called before each round (e.g. raises when the evaluation must stop).
          first: called with the first batch before the first round (e.g. to trace the step), so
            an error there stops every process before any of them runs a batch.

        Raises:
          PeerFailedError: a peer failed, or the processes' data ended after different counts.
        """
        source = iter(batches)
        held: collections.deque[T] = collections.deque()
        ended = False
        while True:
            if not held and not ended:
                ended = not self._take(source, held, wait=True)
                if held and self._taken == 1 and first is not None:
                    first(held[0])
            while not ended and len(held) < MOST_PER_ROUND and _ready(source):
                ended = not self._take(source, held, wait=False)
            if before_round is not None:
                before_round()
            grant, last = self._agree_batches(_Holding(len(held), self._taken, ended))
            for _ in range(grant):
                yield held.popleft()
            if last:
                return

    def _take(self, source: Iterator[T], held: collections.deque[T], *, wait: bool) -> bool:
        if wait and hasattr(source, "wait"):
            while not source.wait(self.poll_s):
                self.check()
        try:
            held.append(next(source))
        except StopIteration:
            return False
        self._taken += 1
        return True

    def _agree_batches(self, holding: _Holding) -> tuple[int, bool]:
        report = f"go {holding.have} {holding.total} {int(holding.ended)}"
        verdict = self._agree(report, _decide_batches)
        _, grant, last = verdict.split()
        return int(grant), last == "1"

    def agree_done(self, *, rows: bytes | None = None) -> None:
        """The last round: every process finished its steps (and posted its rows first).

        Raises:
          PeerFailedError: a peer failed.
        """
        if rows is not None:
            if self.primary:
                self._rows = rows
            else:
                self.client.key_value_set_bytes(f"{self.prefix}/rows/{self.me}", rows)
        self._agree("go 0 0 1", lambda reports: "go 0 1")

    def gathered_rows(self) -> list[bytes]:
        """Process 0: every process's posted rows in process order (deleted once read); else []."""
        if not self.primary or self._rows is None:
            return []
        parts = [self._rows]
        for process in range(1, self.count):
            key = f"{self.prefix}/rows/{process}"
            data = kvstore.wait_get_bytes(self.client, key, timeout_s=ROWS_WAIT_S)
            if data is None:
                raise RuntimeError(f"process {process}'s per-example rows never arrived under {key}")
            parts.append(data)
            kvstore.delete(self.client, key)
        return parts

    def close(self) -> None:
        """Followers say they are done; process 0 deletes every finished exchange's keys."""
        if not self.primary:
            self.client.key_value_set(f"{self.prefix}/done/{self.me}", "1", allow_overwrite=True)
            return
        _to_delete.setdefault(id(self.client), []).append((self.prefix, self.count))
        delete_finished(self.client)


def delete_finished(client: Any) -> int:
    """Process 0: deletes the keys of every closed exchange all processes are done with.

    An exchange's followers usually say so just after process 0 closes it, so its keys go at the
    next close; at most the last exchange or two are ever left.

    Returns:
      How many closed exchanges still wait for a process.
    """
    pending = _to_delete.get(id(client), [])
    for prefix, count in list(pending):
        if len(kvstore.keys_under(client, f"{prefix}/done")) >= count - 1:
            kvstore.delete(client, prefix)
            pending.remove((prefix, count))
    return len(pending)


class _Guard:
    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        if error is not None and not isinstance(error, (PeerFailedError, GeneratorExit)):
            self.exchange.fail(error)


def _ready(source: Any) -> bool:
    ready = getattr(source, "ready", None)
    return True if ready is None else bool(ready())


def _decide_batches(reports: list[str]) -> str:
    """Process 0's verdict on a batch round: how many batches everyone runs now, or abort."""
    holdings = []
    for report in reports:
        _, have, total, ended = report.split()
        holdings.append(_Holding(int(have), int(total), ended == "1"))
    return decide_batches(holdings)


def decide_batches(holdings: list[_Holding]) -> str:
    """`go <grant> <last>` when the processes can go on together, else `abort <process>\\t<reason>`."""
    ended = [p for p, h in enumerate(holdings) if h.ended]
    if ended:
        short = min(ended, key=lambda p: holdings[p].total)
        long = max(range(len(holdings)), key=lambda p: holdings[p].total)
        if holdings[long].total > holdings[short].total:
            return (f"abort {short}\tdata ended after {holdings[short].total} batches on process {short} "
                    f"but process {long} has at least {holdings[long].total}; every process must yield "
                    "the same number of batches (yield empty batches where a process has no rows)")
        if len(ended) == len(holdings):
            return f"go {holdings[0].have} 1"
    return f"go {min(h.have for h in holdings)} 0"
