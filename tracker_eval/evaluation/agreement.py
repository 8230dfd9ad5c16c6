"""Processes of a multi-process evaluation agree before running anything a peer might not run.

    with agreement.scope(None, lambda: "tracker_eval/watch-1a2b/300/7") as exchange:  # stream/step/attempt
        with exchange.guard():             # an error in here reaches every process, then is raised
            state = restore(300)
            for batch in exchange.admit(placed_batches):   # only batches every process holds too
                accumulator = step(accumulator, batch)
            exchange.agree_done(rows=packed_rows)          # after it, a collective is safe
        rows = exchange.gathered_rows()                    # process 0: every process's rows

A collective cannot be cancelled: a process that enters one a peer never joins waits forever (a
cross-process sum over gloo with the peer gone still waited after 140 s). So processes report to
process 0 under `<prefix>/r<round>/<process>` and each round gets one verdict, `go <batches> <last>`
or `abort <process>\t<reason>`. A batch round compares how many prefetched batches each process
holds and whether its data ended: all run the smallest count, and data ending early on one process
is caught before anyone runs a batch the others lack. A failing process sets `<prefix>/abort` and
posts it as its report, so a peer waiting on a round learns at once and a peer reading its own data
within `POLL_S`; peers raise `PeerFailedError`, the failing process its own error. Process 0
deletes a round once the next proves all have read it, rows once read, and the prefix once every
process is done. In one process `open_exchange` returns `Solo`, which never touches the store.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import jax

from tracker_eval import kvstore
from tracker_eval.errors import one_line

LOG = logging.getLogger(__name__)
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

    def agree_ready(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Holding:
    """What one process holds at a batch round."""

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

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Reports any error raised in the block to every process, then re-raises it."""
        try:
            yield
        except PeerFailedError:
            raise
        except BaseException as error:
            try:
                self.fail(error)
            except Exception as unreported:  # noqa: BLE001 - the store is gone: the job is ending anyway
                LOG.warning("tracker-eval: could not tell the other processes that this one failed: %s",
                            one_line(unreported, limit=200))
            raise

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
            kvstore.put(self.client, f"{round_dir}/v", verdict)
            if self._round > 1:  # every process reported in this round, so all read the last verdict
                kvstore.delete(self.client, f"{self.prefix}/r{self._round - 1}")
        else:
            kvstore.put(self.client, f"{round_dir}/{self.me}", report)
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
            grant, last = self._agree_batches(Holding(len(held), self._taken, ended))
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

    def _agree_batches(self, holding: Holding) -> tuple[int, bool]:
        report = f"go {holding.have} {holding.total} {int(holding.ended)}"
        verdict = self._agree(report, decide_batches)
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
                kvstore.put(self.client, f"{self.prefix}/rows/{self.me}", rows)
        self._agree("go 0 0 1", lambda reports: "go 0 1")

    def agree_ready(self) -> None:
        """A round with nothing to decide: returns once every process is ready for a collective (a
        plug-in's own protocol calls it before each one).

        Raises:
          PeerFailedError: a process failed instead (before or while the others waited).
        """
        self._agree("go", lambda reports: "go")

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
            kvstore.put(self.client, f"{self.prefix}/done/{self.me}", "1", overwrite=True)
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


def _ready(source: Any) -> bool:
    ready = getattr(source, "ready", None)
    return True if ready is None else bool(ready())


def decide_batches(reports: list[str]) -> str:
    """Process 0's verdict on a batch round (`go <have> <total> <ended>` from each process): `go
    <grant> <last>` when the processes can go on together, else `abort <process>\t<reason>`."""
    holdings = [Holding(int(have), int(total), ended == "1") for _, have, total, ended in map(str.split, reports)]
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
