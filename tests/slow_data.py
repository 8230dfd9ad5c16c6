"""A data factory that is slow on purpose, so tests can act while an evaluation runs."""

from __future__ import annotations

import time

from tracker_eval.tasks import classification


def make_eval_data(*, split, batch_size, process_index=0, process_count=1, delay_s=0.5):
    for batch in classification.make_eval_data(split=split, batch_size=batch_size,
                                               process_index=process_index, process_count=process_count):
        time.sleep(delay_s)
        yield batch
