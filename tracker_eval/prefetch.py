"""Places host batches onto the devices one batch ahead of the eval step, in a background thread.

    for placed in prefetch(loader, placer.place, depth=2):
        step(placed)

Placement (padding, host-to-device copies) overlaps the previous batch's computation, so a
Python data loader costs the evaluation little beyond its own time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()


def prefetch(source: Iterable[Any], place: Callable[[Any], T], *, depth: int = 2) -> Iterator[T]:
    """Yields `place(item)` for each item of `source`, produced `depth` items ahead.

    Errors in the source or in `place` are re-raised in the consumer at the position they occurred.
    Closing the generator early stops the producer thread.
    """
    slots: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in source:
                placed = place(item)
                while not stop.is_set():
                    try:
                        slots.put((placed, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((_DONE, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer thread
            slots.put((_DONE, error))

    worker = threading.Thread(target=produce, name="tracker-eval-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            placed, error = slots.get()
            if placed is _DONE:
                if error is not None:
                    raise error
                return
            yield placed
    finally:
        stop.set()
        while worker.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.1)
