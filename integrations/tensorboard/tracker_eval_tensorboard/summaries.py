"""TensorBoard summary values and events built with TensorBoard's own helpers (no TensorFlow).

Scalars are written as ``simple_value`` (float32, as every TensorBoard writer stores them) so that
an ``EventAccumulator`` lists them under ``Scalars`` and keeps up to 10,000 per tag by default;
histograms and texts are the plugins' tensor summaries (``histogram_pb``, ``text_pb``).

    event = make_event(300, [scalar("eval/loss", 0.12), histogram("eval/per_example/loss", losses)])
    texts_of(event)    # [("tracker_eval/best", 300, "...")] for text values
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.histogram.summary_v2 import histogram_pb
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.util import tensor_util

Value = summary_pb2.Summary.Value


def scalar(tag: str, value: float) -> Value:
    """A scalar point (``simple_value``; TensorBoard keeps scalars as float32)."""
    return Value(tag=tag, simple_value=float(value))


def histogram(tag: str, values: np.ndarray, *, buckets: int) -> Value:
    """A histogram of ``values`` in ``buckets`` equal-width buckets from their min to their max."""
    (value,) = histogram_pb(tag, np.asarray(values, dtype=np.float64), buckets=buckets).value
    return value


def text(tag: str, markdown: str) -> Value:
    """A text summary (TensorBoard renders it as Markdown)."""
    (value,) = text_pb(tag, markdown).value
    return value


def make_event(step: int, values: Sequence[Value], *, wall_time: float) -> event_pb2.Event:
    """One event at ``step`` holding ``values``."""
    return event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(value=list(values)))


def texts_of(event: event_pb2.Event, *, prefix: str) -> list[tuple[str, int, str]]:
    """``(tag, step, text)`` of the event's text values whose tag starts with ``prefix``."""
    out = []
    for value in event.summary.value:
        if value.tag.startswith(prefix) and value.metadata.plugin_data.plugin_name == "text":
            item = tensor_util.make_ndarray(value.tensor).item()
            out.append((value.tag, event.step, item.decode() if isinstance(item, bytes) else str(item)))
    return out
