"""A data factory that fails on one process, once: a host whose shard cannot be read for one step."""

from __future__ import annotations

import os
import time

from tracker_eval.tasks import classification


def make_eval_data(*, split, batch_size, process_index=0, process_count=1, fail_process=1, after=2, marker):
    """The digits data; on `fail_process`, the first evaluation raises after `after` batches and
    writes the time of the failure to `marker` (later evaluations find it and read normally)."""
    failing = process_index == fail_process and not os.path.exists(marker)
    batches = classification.make_eval_data(split=split, batch_size=batch_size, process_index=process_index,
                                            process_count=process_count)
    for index, batch in enumerate(batches):
        if failing and index == after:
            with open(marker, "w") as f:
                f.write(repr(time.time()))
            raise OSError(f"shard {index} of host {process_index} is unreadable (injected)")
        yield batch
