"""Params-only restore vs a full train-state restore of the same Orbax checkpoint: time and bytes read.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks restore

The checkpoint holds ~42 MB of float32 params plus Adam `mu` and `nu` of the same size, written
8-way fsdp-sharded. Both restores target the same 8-way fsdp shardings. Bytes are the growth of
`rchar` in /proc/self/io: every byte handed to this process by read()/pread(), page-cache hits
included (`read_bytes` counts only what reached the disk, and the cache cannot be dropped here);
the checkpoint is hot in the page cache for both, so the times compare the work, not the disk.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from tracker_eval.checkpoints.restore import restore_eval_variables

REPEATS = 7
# ~42 MB of float32 params: kernels 2048x2048, 2048x2048, 2048x1024, 1024x16.
IN_FEATURES = 2048
FEATURES = (2048, 2048, 1024, 16)


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def _measure(restore: Callable[[], Any]) -> tuple[float, int]:
    start_bytes = _rchar()
    start = time.perf_counter()
    jax.block_until_ready(restore())
    return time.perf_counter() - start, _rchar() - start_bytes


def run() -> dict[str, float]:
    """Measures both restores REPEATS times, alternating, and returns medians.

    Returns:
        restore_params_only_ratio (time, target <= 0.45), restore_params_only_bytes_ratio,
        restore_params_only_s, restore_full_s, restore_params_only_mb_read, restore_full_mb_read.
    """
    # The tests directory holds the checkpoint writer shared with the tests.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from ckpt_factory import fsdp_sharding, make_mesh, save_train_states

    if jax.device_count() < 8:
        raise RuntimeError("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (8 devices needed)")
    mesh = make_mesh((8,), ("fsdp",))

    def shardings_for(tree: Any) -> Any:
        return jax.tree.map(lambda sds: fsdp_sharding(sds.shape, mesh, axis="fsdp"), tree)

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "ckpts"
        save_train_states(root, steps=[100], item="state", features=FEATURES, in_features=IN_FEATURES)
        item_dir = root / "100" / "state"

        def params_only() -> Any:
            return restore_eval_variables(
                root, 100, item="state", mutable=("batch_stats",), shardings_for=shardings_for
            )

        def full() -> Any:
            # What a restore of the whole train state costs: the same metadata-driven targets for
            # every leaf, optimizer state included.
            tree = ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
            target = shardings_for(jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree))
            target = jax.tree.map(
                lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s), tree, target
            )
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
                args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
                return checkpointer.restore(item_dir, args=args)

        # Warm-up: page cache, tensorstore and compilation caches, for both alike.
        _measure(params_only)
        _measure(full)
        samples: dict[str, list[tuple[float, int]]] = {"params": [], "full": []}
        for _ in range(REPEATS):
            samples["params"].append(_measure(params_only))
            samples["full"].append(_measure(full))

    params_s = statistics.median(t for t, _ in samples["params"])
    full_s = statistics.median(t for t, _ in samples["full"])
    params_b = statistics.median(b for _, b in samples["params"])
    full_b = statistics.median(b for _, b in samples["full"])
    return {
        "restore_params_only_ratio": params_s / full_s,
        "restore_params_only_bytes_ratio": params_b / full_b,
        "restore_params_only_s": params_s,
        "restore_full_s": full_s,
        "restore_params_only_mb_read": params_b / 1e6,
        "restore_full_mb_read": full_b / 1e6,
    }
