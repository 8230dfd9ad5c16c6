"""tracker_eval.checkpoints (listing, restore, describe) against real Orbax checkpoints on 8 CPU devices."""

from __future__ import annotations

import gc
import json
import logging
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ckpt_factory import SavedStep, fsdp_sharding, make_mesh, save_train_states
from jax.sharding import NamedSharding, PartitionSpec

from tracker_eval.checkpoints import restore as restore_module
from tracker_eval.checkpoints import tree as tree_module
from tracker_eval.checkpoints.describe import describe_checkpoint
from tracker_eval.checkpoints.listing import finalized_steps
from tracker_eval.checkpoints.restore import restore_eval_variables
from tracker_eval.checkpoints.tree import CheckpointVanishedError, CorruptCheckpointError
from tracker_eval.errors import ConfigError

TOP_KEYS = "top-level keys are: batch_stats, opt_state, params, step"


@pytest.fixture
def failed_read_leftovers_settled() -> Any:
    """Waits, at the end of a test that fails a read on purpose, for that read's leftovers.

    After a failed read, TensorStore completes the read's other futures into Orbax's closed event
    loop, and its coroutines are reported when collected ("Exception ignored in ..."; the CLI drops
    both, tracker_eval/logs.py). They arrive just after the failure; waiting until none has come for
    half a second keeps them in the test that caused them, where `fails_reads` accepts them, rather
    than in whichever test runs next.
    """
    arrived = [time.monotonic()]
    previous = sys.unraisablehook

    def counting(info: Any) -> None:
        arrived.append(time.monotonic())
        previous(info)

    sys.unraisablehook = counting
    yield
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() - arrived[-1] < 0.5 and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.05)
        gc.collect()
    finally:
        sys.unraisablehook = previous


def fails_reads(test: Any) -> Any:
    """Marks a test that makes an Orbax read fail on purpose: its leftovers are expected, there only."""
    marks = (
        pytest.mark.usefixtures("failed_read_leftovers_settled"),
        pytest.mark.filterwarnings("ignore:Exception ignored in. <coroutine object _read_array_index_and_device_put"
                                   ":pytest.PytestUnraisableExceptionWarning"),
        pytest.mark.filterwarnings("ignore:Exception ignored in. None[\\s\\S]*Event loop is closed"
                                   ":pytest.PytestUnraisableExceptionWarning"),
    )
    for mark in marks:
        test = mark(test)
    return test

@pytest.fixture(scope="module", autouse=True)
def _eight_devices() -> None:
    # tests/conftest.py asks for 8 fake CPU devices before JAX starts.
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


@pytest.fixture(scope="module")
def composite(tmp_path_factory: pytest.TempPathFactory) -> dict[int, SavedStep]:
    """Composite(state=StandardSave(TrainState), metadata=JsonSave) at steps 10 and 20, 8-way fsdp."""
    root = tmp_path_factory.mktemp("composite")
    return save_train_states(root, steps=[10, 20], item="state", state_kind="train_state")


@pytest.fixture(scope="module")
def standard(tmp_path_factory: pytest.TempPathFactory) -> dict[int, SavedStep]:
    """StandardSave(dict) on a single-item manager: stored under `default`."""
    return save_train_states(tmp_path_factory.mktemp("standard"), steps=[5], layout="standard", state_kind="dict")


@pytest.fixture(scope="module")
def per_array(tmp_path_factory: pytest.TempPathFactory) -> dict[int, SavedStep]:
    """Without OCDBT: one directory per array, so single arrays can be damaged."""
    return save_train_states(tmp_path_factory.mktemp("per_array"), steps=[7], use_ocdbt=False)


def _root(saved: dict[int, SavedStep]) -> pathlib.Path:
    return next(iter(saved.values())).path.parent


def _copy(saved: dict[int, SavedStep], tmp_path: pathlib.Path) -> pathlib.Path:
    dest = tmp_path / "ckpts"
    shutil.copytree(_root(saved), dest)
    return dest


def _replicated(mesh: jax.sharding.Mesh) -> Any:
    return lambda tree: jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree)


def _fsdp(mesh: jax.sharding.Mesh) -> Any:
    axis = mesh.axis_names[0]
    return lambda tree: jax.tree.map(lambda sds: fsdp_sharding(sds.shape, mesh, axis=axis), tree)


def _assert_restored(restored: Any, expected: Any, shardings_for: Any) -> None:
    wanted = shardings_for(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected))
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    leaves = (jax.tree.leaves(restored), jax.tree.leaves(expected), jax.tree.leaves(wanted))
    for got, want, sharding in zip(*leaves, strict=True):
        assert isinstance(got, jax.Array)
        assert got.sharding == sharding
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), want, strict=True)


def test_lists_only_finalized_steps_and_ignores_tmp(composite: dict[int, SavedStep], tmp_path: pathlib.Path) -> None:
    root = _copy(composite, tmp_path)
    shutil.copytree(root / "20", root / "30.orbax-checkpoint-tmp")
    (root / "not_a_step").mkdir()
    # Same answer as Orbax's own (slower) listing.
    assert finalized_steps(os.fspath(root)) == sorted(ocp.utils.checkpoint_steps(root)) == [10, 20]


def test_missing_directory_lists_nothing(tmp_path: pathlib.Path) -> None:
    assert finalized_steps(tmp_path / "not-yet") == []
    assert finalized_steps(tmp_path) == []


def test_late_lower_step_renamed_in_appears(composite: dict[int, SavedStep], tmp_path: pathlib.Path) -> None:
    root = _copy(composite, tmp_path)
    tmp_step = root / "15.orbax-checkpoint-tmp"
    shutil.copytree(root / "10", tmp_step)
    assert finalized_steps(root) == [10, 20]
    tmp_step.rename(root / "15")
    assert finalized_steps(root) == [10, 15, 20]


@pytest.mark.parametrize(
    ("relative", "hint"),
    [
        ("20", "looks like one checkpoint step"),
        ("20/state", "looks like one checkpoint item"),
        ("20/_CHECKPOINT_METADATA", "is a file"),
    ],
)
def test_not_a_checkpoint_root(composite: dict[int, SavedStep], relative: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint) as info:
        finalized_steps(_root(composite) / relative)
    assert "set checkpoint_dir" in str(info.value)
    assert "\n" not in str(info.value)


def test_listing_1000_steps_is_cheap(tmp_path: pathlib.Path) -> None:
    for step in range(1000):
        (tmp_path / str(step)).mkdir()
    (tmp_path / "1000.orbax-checkpoint-tmp").mkdir()
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        steps = finalized_steps(tmp_path)
        timings.append(time.perf_counter() - start)
    assert steps == list(range(1000))
    # ~1 ms here; the bound leaves room for slow CI disks.
    assert sorted(timings)[2] < 0.1


@pytest.mark.parametrize("placement", ["fsdp", "replicated"])
@pytest.mark.parametrize(
    ("shape", "names", "first_device"),
    [((1,), ("fsdp",), 0), ((4,), ("fsdp",), 4), ((2, 2, 2), ("fsdp", "data", "model"), 0)],
)
def test_restores_params_onto_other_meshes(
    composite: dict[int, SavedStep], shape: tuple[int, ...], names: tuple[str, ...], first_device: int, placement: str
) -> None:
    size = int(np.prod(shape))
    mesh = make_mesh(shape, names, devices=jax.devices()[first_device : first_device + size])
    shardings_for = _fsdp(mesh) if placement == "fsdp" else _replicated(mesh)
    params, collections = restore_eval_variables(_root(composite), 20, item="state", shardings_for=shardings_for)
    _assert_restored(params, composite[20].params, shardings_for)
    assert collections == {}


def test_restores_older_step_and_mutable_collection(composite: dict[int, SavedStep]) -> None:
    mesh = make_mesh((4,), ("fsdp",))
    params, collections = restore_eval_variables(
        _root(composite), 10, item=None, params_path="params", mutable=("batch_stats",), shardings_for=_fsdp(mesh)
    )
    _assert_restored(params, composite[10].params, _fsdp(mesh))
    assert list(collections) == ["batch_stats"]
    _assert_restored(collections["batch_stats"], composite[10].batch_stats, _fsdp(mesh))


@pytest.mark.parametrize("item", [None, "default"])
def test_standard_save_layout(standard: dict[int, SavedStep], item: str | None) -> None:
    assert (standard[5].path / "default" / "_METADATA").is_file()
    mesh = make_mesh((2, 2, 2), ("fsdp", "data", "model"))
    sharding = NamedSharding(mesh, PartitionSpec())
    params, collections = restore_eval_variables(
        _root(standard), 5, item=item, params_path="params", mutable=("batch_stats",), shardings_for=lambda _: sharding
    )
    _assert_restored(params, standard[5].params, _replicated(mesh))
    _assert_restored(collections["batch_stats"], standard[5].batch_stats, _replicated(mesh))


def test_nested_params_path_with_slashes(composite: dict[int, SavedStep]) -> None:
    mesh = make_mesh((1,), ("fsdp",))
    kernel, _ = restore_eval_variables(
        _root(composite), 20, item="state", params_path="params/Dense_1/kernel", shardings_for=_replicated(mesh)
    )
    np.testing.assert_array_equal(np.asarray(kernel), composite[20].params["Dense_1"]["kernel"], strict=True)


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
@fails_reads
def test_params_only_never_reads_optimizer_state(per_array: dict[int, SavedStep], tmp_path: pathlib.Path) -> None:
    root = _copy(per_array, tmp_path)
    item_dir = root / "7" / "state"
    opt_dirs = sorted(p for p in item_dir.iterdir() if p.name.startswith("opt_state."))
    assert len(opt_dirs) == 21, [p.name for p in item_dir.iterdir()]
    # Shapes and dtypes of every array are read (the small `.zarray` files); the chunk files hold
    # the data, and those of the whole Adam state go.
    chunks = [f for d in opt_dirs for f in d.iterdir() if not f.name.startswith(".")]
    assert len(chunks) >= 21
    for path in chunks:
        path.unlink()
    mesh = make_mesh((8,), ("fsdp",))
    params, collections = restore_eval_variables(
        root, 7, item="state", mutable=("batch_stats",), shardings_for=_fsdp(mesh)
    )
    _assert_restored(params, per_array[7].params, _fsdp(mesh))
    _assert_restored(collections["batch_stats"], per_array[7].batch_stats, _fsdp(mesh))
    # The same files make a full restore of the item fail: what was deleted is really needed there.
    with pytest.raises(Exception, match="opt_state"):
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            checkpointer.restore(item_dir)


@pytest.fixture
def full_metadata_read_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Orbax's full metadata read (the fallback) fails the test: only the light path may serve."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the light path failed and Orbax's full metadata read was used")

    monkeypatch.setattr(restore_module, "_read_tree_metadata", refuse)


@pytest.mark.parametrize(
    ("layout", "step", "item"),
    [("composite", 20, "state"), ("composite", 10, None), ("standard", 5, None), ("per_array", 7, "state")],
)
@pytest.mark.usefixtures("full_metadata_read_refused")
def test_params_only_light_path_serves_the_standard_layouts(
    request: pytest.FixtureRequest, layout: str, step: int, item: str | None
) -> None:
    saved = request.getfixturevalue(layout)
    mesh = make_mesh((4,), ("fsdp",))
    params, collections = restore_eval_variables(
        _root(saved), step, item=item, mutable=("batch_stats",), shardings_for=_fsdp(mesh)
    )
    _assert_restored(params, saved[step].params, _fsdp(mesh))
    _assert_restored(collections["batch_stats"], saved[step].batch_stats, _fsdp(mesh))


def test_a_refused_light_path_falls_back_and_says_why(
    composite: dict[int, SavedStep], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise OSError("simulated: array metadata unreadable")

    monkeypatch.setattr(tree_module, "_fill_shapes", unreadable)
    mesh = make_mesh((4,), ("fsdp",))
    with caplog.at_level(logging.DEBUG, logger="tracker_eval"):
        params, _ = restore_eval_variables(_root(composite), 20, item="state", shardings_for=_fsdp(mesh))
    _assert_restored(params, composite[20].params, _fsdp(mesh))
    said = [r.getMessage() for r in caplog.records if "full metadata read" in r.getMessage()]
    assert len(said) == 1 and "simulated: array metadata unreadable" in said[0], said


@pytest.mark.parametrize(
    ("kwargs", "config_key", "bad", "listed"),
    [
        (
            {"item": "sate"},
            "checkpoint.item",
            "'sate'",
            ["metadata (JsonCheckpointHandler)", "state (StandardCheckpointHandler)"],
        ),
        ({"item": "metadata"}, "checkpoint.item", "'metadata'", ["state (StandardCheckpointHandler)"]),
        ({"item": "state", "params_path": "parms"}, "checkpoint.params", "'parms'", [TOP_KEYS]),
        (
            {"item": "state", "params_path": "params.Dense_9"},
            "checkpoint.params",
            "'params.Dense_9'",
            [TOP_KEYS, "'params' holds: BatchNorm_0, BatchNorm_1, Dense_0, Dense_1, Dense_2"],
        ),
        ({"item": "state", "mutable": ("batch_stat",)}, "checkpoint.mutable", "'batch_stat'", [TOP_KEYS]),
    ],
)
def test_wrong_names_list_what_the_checkpoint_holds(
    composite: dict[int, SavedStep], kwargs: dict[str, Any], config_key: str, bad: str, listed: list[str]
) -> None:
    mesh = make_mesh((1,), ("fsdp",))
    with pytest.raises(ConfigError) as info:
        restore_eval_variables(_root(composite), 20, shardings_for=_replicated(mesh), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert f"{config_key} {bad}" in message
    assert f"set {config_key}" in message
    for text in listed:
        assert text in message


def test_item_none_with_two_pytree_items_asks_to_choose(
    composite: dict[int, SavedStep], tmp_path: pathlib.Path
) -> None:
    root = _copy(composite, tmp_path)
    shutil.copytree(root / "20" / "state", root / "20" / "ema_state")
    meta_file = root / "20" / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_file.read_text())
    meta["item_handlers"]["ema_state"] = meta["item_handlers"]["state"]
    meta_file.write_text(json.dumps(meta))
    mesh = make_mesh((1,), ("fsdp",))
    with pytest.raises(ConfigError, match=r"checkpoint.item is null .* several pytree items: ema_state, state"):
        restore_eval_variables(root, 20, item=None, shardings_for=_replicated(mesh))


def test_sharding_that_cannot_hold_an_array_is_a_config_error(composite: dict[int, SavedStep]) -> None:
    mesh = make_mesh((3,), ("fsdp",))
    with pytest.raises(ConfigError, match=r"params\['BatchNorm_0'\]\['bias'\] of shape \(64,\) cannot be placed"):
        restore_eval_variables(
            _root(composite), 20, item="state", shardings_for=lambda _: NamedSharding(mesh, PartitionSpec("fsdp"))
        )


def test_describe_checkpoint_lists_items_and_keys(composite: dict[int, SavedStep]) -> None:
    text = describe_checkpoint(_root(composite), 20, depth=1)
    assert text.splitlines() == [
        os.fspath(composite[20].path),
        "  metadata [JsonCheckpointHandler]",
        "  state [StandardCheckpointHandler]",
        # float32: batch_stats 2*(64+32); params (24+1)*64 + 2*64 + (64+1)*32 + 2*32 + (32+1)*16;
        # Adam mu and nu as params, plus an int32 count.
        "    batch_stats: 4 arrays, 0.8 kB",
        "    opt_state: 21 arrays, 35.2 kB",
        "    params: 10 arrays, 17.6 kB",
        "    step: int32[]",
    ]


def _truncate_files(directory: pathlib.Path) -> int:
    count = 0
    for path in directory.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
            count += 1
    return count


@pytest.mark.parametrize("damage", ["truncate_ocdbt_data", "delete_item_metadata", "delete_array_files"])
@fails_reads
def test_corrupt_checkpoint(composite: dict[int, SavedStep], tmp_path: pathlib.Path, damage: str) -> None:
    root = _copy(composite, tmp_path)
    item_dir = root / "20" / "state"
    if damage == "truncate_ocdbt_data":
        assert _truncate_files(item_dir / "d") > 0
    elif damage == "delete_item_metadata":
        (item_dir / "_METADATA").unlink()
    else:
        shutil.rmtree(item_dir / "d")
    mesh = make_mesh((4,), ("fsdp",))
    with pytest.raises(CorruptCheckpointError) as info:
        restore_eval_variables(root, 20, item="state", shardings_for=_fsdp(mesh))
    assert info.value.step == 20
    assert "step 20" in str(info.value) and os.fspath(root / "20") in str(info.value)


@fails_reads
def test_truncated_params_array_without_ocdbt(per_array: dict[int, SavedStep], tmp_path: pathlib.Path) -> None:
    root = _copy(per_array, tmp_path)
    assert _truncate_files(root / "7" / "state" / "params.Dense_0.kernel") > 0
    mesh = make_mesh((4,), ("fsdp",))
    with pytest.raises(CorruptCheckpointError, match="step 7"):
        restore_eval_variables(root, 7, item="state", shardings_for=_fsdp(mesh))


def test_checkpoint_deleted_before_restore(composite: dict[int, SavedStep], tmp_path: pathlib.Path) -> None:
    root = _copy(composite, tmp_path)
    shutil.rmtree(root / "10")
    mesh = make_mesh((4,), ("fsdp",))
    with pytest.raises(CheckpointVanishedError, match="step 10") as info:
        restore_eval_variables(root, 10, item="state", shardings_for=_fsdp(mesh))
    assert info.value.path == os.fspath(root / "10")
    assert finalized_steps(root) == [20]


@fails_reads
def test_checkpoint_deleted_during_restore(composite: dict[int, SavedStep], tmp_path: pathlib.Path) -> None:
    root = _copy(composite, tmp_path)
    mesh = make_mesh((4,), ("fsdp",))

    def shardings_then_retention(tree: Any) -> Any:
        # Runs after the metadata was read and before any array is: retention strikes in between.
        shutil.rmtree(root / "20")
        return _fsdp(mesh)(tree)

    with pytest.raises(CheckpointVanishedError, match="step 20"):
        restore_eval_variables(root, 20, item="state", shardings_for=shardings_then_retention)
