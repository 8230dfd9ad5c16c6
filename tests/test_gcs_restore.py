"""Params-only restore from gs:// against a real GCS server on loopback (fake-gcs-server): bytes read,
bounded retries when the storage fails, an unreachable server told apart from a deleted step, listing."""

from __future__ import annotations

import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fixtures_gcs import CountingProxy, free_port
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tracker_eval.checkpoints import remote
from tracker_eval.checkpoints.gcs import GcsStepLister
from tracker_eval.checkpoints.listing import finalized_steps
from tracker_eval.checkpoints.restore import restore_eval_variables
from tracker_eval.checkpoints.tree import (
    CheckpointUnreachableError,
    CheckpointVanishedError,
    CorruptCheckpointError,
    StorageUnavailableError,
)
from tracker_eval.errors import ConfigError

pytest_plugins = ["fixtures_gcs"]

BUCKET = "restore-ckpts"
ROOT = f"gs://{BUCKET}/exp/run"
# Three 8 MB float32 arrays per copy (params, Adam mu, Adam nu), each shard 2 MB. Orbax coalesces
# GCS reads less than 1 MB apart, so with small shards the optimizer's bytes in between would be
# read as well and the ratio would depend on timing (notes/gcs.md, section 4).
SHAPE = (2048, 1024)
NAMES = ("a", "b", "c")


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:4]), ("x",))


def _rows(mesh: Mesh) -> Any:
    return lambda tree: jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec("x")), tree)


@pytest.fixture(scope="module")
def saved(gcs) -> dict[str, Any]:
    """Step 1 of a train state (params + Adam mu/nu), saved by Orbax to gs:// through the emulator."""
    gcs.create_bucket(BUCKET)
    mesh = _mesh()
    rng = np.random.default_rng(0)
    host = {part: {n: rng.standard_normal(SHAPE, dtype=np.float32) for n in NAMES} for part in ("params", "mu", "nu")}
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    state = {"params": host["params"], "opt_state": {"mu": host["mu"], "nu": host["nu"]}}
    on_mesh = jax.tree.map(lambda a: jax.device_put(a, sharding), state)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in gcs.env().items():
            patch.setenv(key, value)
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
        with ocp.CheckpointManager(ROOT, options=options) as manager:
            manager.save(1, args=ocp.args.StandardSave(on_mesh))
            manager.wait_until_finished()
    return host


def _full_restore(mesh: Mesh) -> Any:
    sds = jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=NamedSharding(mesh, PartitionSpec("x")))
    target = {"params": dict.fromkeys(NAMES, sds), "opt_state": {"mu": dict.fromkeys(NAMES, sds),
                                                                 "nu": dict.fromkeys(NAMES, sds)}}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(f"{ROOT}/1/default", args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))


def test_params_only_restore_reads_under_045_of_a_full_restore(gcs, gcs_env, saved, monkeypatch):
    proxy = CountingProxy(gcs.url)
    try:
        for key, value in gcs.env(proxy.url).items():
            monkeypatch.setenv(key, value)
        mesh = _mesh()
        full = _full_restore(mesh)
        full_bytes = proxy.bytes_served
        np.testing.assert_array_equal(np.asarray(full["opt_state"]["nu"]["c"]), saved["nu"]["c"])
        proxy.reset()
        params, extra = restore_eval_variables(ROOT, 1, item=None, shardings_for=_rows(mesh))
        params_bytes = proxy.bytes_served
    finally:
        proxy.close()
    assert extra == {} and sorted(params) == list(NAMES)
    for name in NAMES:
        np.testing.assert_array_equal(np.asarray(params[name]), saved["params"][name], strict=True)
        assert params[name].sharding == NamedSharding(mesh, PartitionSpec("x"))
    data_bytes = 9 * np.prod(SHAPE) * 4  # zstd takes ~8% off random float32s
    assert full_bytes >= 0.8 * data_bytes, f"a full restore served {full_bytes} bytes for {data_bytes} of arrays"
    ratio = params_bytes / full_bytes
    assert ratio <= 0.45, f"params-only restore read {params_bytes} bytes, {ratio:.3f} of a full restore's {full_bytes}"


def _restore_in_thread(mesh: Mesh, *, bound_s: float = 120.0) -> BaseException | None:
    """Runs a params-only restore; returns what it raised, failing the test if it is still blocked."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            restore_eval_variables(ROOT, 1, item=None, shardings_for=_rows(mesh))
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(bound_s)
    assert outcome, f"the restore was still retrying after {bound_s:g} s: storage waits are not bounded"
    return outcome[0]


def test_storage_failures_end_a_restore_after_a_bounded_number_of_attempts(gcs, gcs_env, saved, monkeypatch):
    remote.bound_storage_waits(ROOT)
    proxy = CountingProxy(gcs.url)
    try:
        for key, value in gcs.env(proxy.url).items():
            monkeypatch.setenv(key, value)
        mesh = _mesh()
        # Array data (TensorStore reads carry a `tensorstore=` query parameter) answers 503.
        proxy.fail = lambda method, path: 503 if "tensorstore=" in path else None
        error = _restore_in_thread(mesh)
        assert isinstance(error, CorruptCheckpointError), error
        data_reads = {k: n for k, n in proxy.by_path.items() if k.endswith(" media")}
        assert max(data_reads.values()) > 1, f"no array read was retried: {data_reads}"
        assert max(data_reads.values()) <= remote.TS_GCS_RETRIES["max_retries"] + 1, data_reads
        # Everything answers 503: gcsfs gives up after GCSFS_ATTEMPTS tries of a request (its own
        # default is 6, ~33 s), and since the storage cannot say whether the step exists, the step
        # is not judged. (A lookup races a GET with a list; the cancelled list may get one try more.)
        proxy.reset()
        proxy.fail = lambda method, path: 503
        error = _restore_in_thread(mesh)
        assert isinstance(error, CheckpointUnreachableError), error
        assert max(proxy.by_path.values()) <= remote.GCSFS_ATTEMPTS + 1, dict(proxy.by_path)
    finally:
        proxy.close()


def test_a_dead_server_is_unreachable_not_a_deleted_step(gcs, gcs_env, saved, monkeypatch, tmp_path):
    from tracker_eval.config import EvalConfig
    from tracker_eval.runners.status import collect_status

    remote.bound_storage_waits(ROOT)
    dead = f"http://127.0.0.1:{free_port()}"
    for key, value in gcs.env(dead).items():
        monkeypatch.setenv(key, value)
    error = _restore_in_thread(_mesh())
    assert isinstance(error, CheckpointUnreachableError), error
    with pytest.raises(StorageUnavailableError, match="cannot list gs://restore-ckpts/exp/run"):
        finalized_steps(ROOT)
    # `status` (and its --health, a Kubernetes liveness probe) still answers from the ledger.
    config = EvalConfig(checkpoint_dir=ROOT, model="m:f", eval_function="m:f", data="m:f", batch_size=8,
                        output_dir=str(tmp_path / "out"))
    assert collect_status(config)["newest_step"] is None
    # And a step that really is gone is still told apart from an outage.
    for key, value in gcs.env().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(CheckpointVanishedError, match="step 7 no longer exists"):
        restore_eval_variables(ROOT, 7, item=None, shardings_for=_rows(_mesh()))


def test_listing_finished_steps_with_few_requests(gcs, gcs_env):
    gcs.create_bucket(BUCKET)
    root = f"gs://{BUCKET}/listing/run"
    # A finished step, one interrupted before its marker, and a directory that is not a step.
    for step in (20, 40):
        gcs.upload(f"{root}/{step}/_CHECKPOINT_METADATA", b"{}")
        gcs.upload(f"{root}/{step}/default/_METADATA", b"{}")
    gcs.write_marker(f"{root}/20")
    gcs.upload(f"{root}/notes/readme.txt", b"not a step")
    lister = GcsStepLister(root)
    assert lister.finalized_steps() == [20]
    assert lister.requests == 3  # one list of the step directories, one marker check per new step
    assert lister.finalized_steps() == [20] and lister.requests == 5  # 40 is checked again, 20 is known
    gcs.write_marker(f"{root}/40")
    assert lister.finalized_steps() == [20, 40] and lister.requests == 7
    assert lister.finalized_steps() == [20, 40] and lister.requests == 8  # nothing new: one request
    gcs.delete_step(f"{root}/20")
    assert lister.finalized_steps() == [40]
    # Many new steps at once: one list of the markers instead of a GET each.
    for step in range(100, 100 + 12):
        gcs.upload(f"{root}/{step}/_CHECKPOINT_METADATA", b"{}")
        if step % 2:
            gcs.write_marker(f"{root}/{step}")
    fresh = GcsStepLister(root)
    assert fresh.finalized_steps() == [40, *range(101, 112, 2)] and fresh.requests == 2
    assert finalized_steps(f"gs://{BUCKET}/listing/nothing-yet") == []
    with pytest.raises(ConfigError, match="looks like one checkpoint step.*likely 'gs://restore-ckpts/listing/run'"):
        finalized_steps(f"{root}/40")
    with pytest.raises(ConfigError, match="not a valid GCS location"):
        finalized_steps("gs://B/run")
    with pytest.raises(StorageUnavailableError, match="bucket 'no-such-bucket' does not exist"):
        finalized_steps("gs://no-such-bucket/run")


def test_real_gcs_without_credentials_is_a_one_line_config_error(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    missing = tmp_path / "no-such-key.json"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    with pytest.raises(ConfigError, match="no Google credentials for a gs:// checkpoint_dir") as raised:
        finalized_steps("gs://some-bucket/run")
    assert "\n" not in str(raised.value) and "GOOGLE_APPLICATION_CREDENTIALS" in str(raised.value)
