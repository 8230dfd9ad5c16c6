"""Checkpoints as real trainers write them: xlstm-jax, MaxText, flax.nnx, ours, and Orbax 0.6.1's files.

`eval` (in this process) and `watch` (real subprocesses) equal a float64 numpy reference on each
layout with only the `checkpoint:` settings the README's table gives; step names are detected,
folders that are not read are said, and the gs:// lister reads prefixed names as the local one.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import shutil
from typing import Any

import named_mesh_model
import numpy as np
import pytest
import trainer_writers as tw
from watcher_harness import WatcherProcess, jsonl_points

from tracker_eval.checkpoints import gcs as gcs_lister
from tracker_eval.checkpoints.listing import survey
from tracker_eval.checkpoints.roots import RootNaming, StepNames, detect, strays
from tracker_eval.cli import main
from tracker_eval.runners.polling import StepPoller
from tracker_eval.runners.status import collect_status

pytest_plugins = ["fixtures_gcs"]

OLD_ORBAX = pathlib.Path(__file__).parent / "data" / "orbax_0_6_1" / "checkpoints"
STEPS = (10, 20)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[pathlib.Path, dict[str, Any]]]:
    """Each layout's root with steps 10 and 20, and the settings that read it."""
    base = tmp_path_factory.mktemp("layouts")
    layouts = (*tw.LAYOUTS, "nnx_batchnorm")
    return {layout: (base / layout, tw.write(layout, base / layout, STEPS)) for layout in layouts}


def _config(tmp_path: pathlib.Path, root: pathlib.Path, settings: dict[str, Any], **extra: Any) -> pathlib.Path:
    config = {
        "checkpoint_dir": str(root),
        "eval_function": "trainer_writers:eval_function",
        "data": "trainer_writers:make_data",
        "batch_size": 4,
        "output_dir": str(tmp_path / "out"),
        "loggers": [{"type": "jsonl"}],
        **settings,
        **extra,
    }
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(config))
    return path


def _eval(config: pathlib.Path, tmp_path: pathlib.Path, *args: str) -> dict[str, Any]:
    output = tmp_path / "result.json"
    assert main(["eval", "--config", str(config), "--output", str(output), *args]) == 0
    return json.loads(output.read_text())


@pytest.mark.parametrize(
    ("folders", "expected"),
    [
        (["10", "20", "20.orbax-checkpoint-tmp"], StepNames()),
        (["checkpoint_10", "checkpoint_20", "checkpoint_30.orbax-checkpoint-tmp-171"], StepNames("checkpoint")),
        (["my_run_ckpt_0010", "my_run_ckpt_0020", "my_run_ckpt_12345"], StepNames("my_run_ckpt", 4)),
        (["00000100", "00000200"], StepNames(None, 8)),
        (["10", "checkpoint_20"], StepNames()),  # plain numbers win; the other one is a stray
        (["a_1", "b_2"], None),  # two prefixes: the user picks
        (["d", "ocdbt.process_0", "manifest.ocdbt"], None),  # an item's own folders are no steps
    ],
)
def test_step_names_are_detected_as_orbax_writes_them(folders: list[str], expected: StepNames | None) -> None:
    found = detect(folders)
    assert found == expected
    if found is not None:  # every name read is written back the same way, tmp folders never read
        read = {f: found.step_of(f) for f in folders if found.step_of(f) is not None}
        assert all(found.folder(step) == f and ".orbax-checkpoint-tmp" not in f for f, step in read.items())
        assert strays(found, folders) == sorted(set(folders) - set(read) - {f for f in folders if "tmp" in f})


@pytest.mark.parametrize("layout", tw.LAYOUTS)
def test_eval_of_each_trainers_layout_equals_the_float64_reference(
    written: dict[str, Any], tmp_path: pathlib.Path, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    root, settings = written[layout]
    caplog.set_level(logging.INFO, logger="tracker_eval")
    result = _eval(_config(tmp_path, root, settings), tmp_path)
    loss, losses = tw.reference(20)
    assert result["step"] == 20
    assert result["metrics"]["loss"] == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(result["metrics"]["example_loss"], losses, rtol=1e-5)
    detected = [r.getMessage() for r in caplog.records if "(detected;" in r.getMessage()]
    said = (f"tracker-eval: checkpoint_dir {str(root)!r}: step folders are named checkpoint_<N> (detected; "
            "checkpoint.step_prefix: checkpoint sets it)")
    assert detected == ([said] if layout == "xlstm" else [])  # said once: eval lists, then restores


def test_nnx_state_with_batch_statistics_restores_them(written: dict[str, Any], tmp_path: pathlib.Path) -> None:
    root, settings = written["nnx_batchnorm"]
    result = _eval(_config(tmp_path, root, settings), tmp_path)
    assert result["metrics"]["loss"] == pytest.approx(tw.reference_batchnorm(20), rel=1e-5)


def test_watch_evaluates_every_layout_equal_to_the_reference(written: dict[str, Any], tmp_path: pathlib.Path) -> None:
    watchers = {}
    root_of = {layout: written[layout][0] for layout in ("xlstm", "maxtext", "nnx")}
    for layout in ("xlstm", "maxtext", "nnx"):
        root, settings = written[layout]
        (tmp_path / layout).mkdir()
        watch = {"until_step": 20, "poll_interval_s": 0.2, "best": {"metric": "loss", "mode": "min"}}
        config = _config(tmp_path / layout, root, settings, watch=watch)
        watchers[layout] = WatcherProcess(config).start()
    # And one that reads no step: the xlstm root with another step_prefix. It says so, once.
    root, settings = written["xlstm"]
    (tmp_path / "stray").mkdir()
    wrong = {**settings, "checkpoint": {**settings["checkpoint"], "step_prefix": "ckpt"}}
    watch = {"idle_timeout_s": 2, "poll_interval_s": 0.2}
    stray = WatcherProcess(_config(tmp_path / "stray", root, wrong, watch=watch)).start()
    try:
        assert stray.wait_exit(timeout=240) == 0, stray.tail()
        said = [line for _, line in stray.lines if "do not match the step names" in line]
        assert len(said) == 1 and "set checkpoint.step_prefix: checkpoint to read them" in said[0], stray.tail()
        for layout, watcher in watchers.items():
            assert watcher.wait_exit(timeout=240) == 0, watcher.tail()
            points = jsonl_points(tmp_path / layout / "out")
            assert sorted(points) == list(STEPS), (layout, watcher.tail())
            for step in STEPS:
                assert points[step][-1]["loss"] == pytest.approx(tw.reference(step)[0], rel=1e-5), layout
            best = json.loads((tmp_path / layout / "out" / "best.json").read_text())
            folder = "checkpoint_10" if layout == "xlstm" else "10"  # step 10 has the lower loss
            assert (best["step"], best["checkpoint"]) == (10, str(root_of[layout] / folder)), layout
    finally:
        for watcher in [*watchers.values(), stray]:
            watcher.kill9()


def test_checkpoint_written_by_orbax_0_6_1_restores(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "checkpoints"
    shutil.copytree(OLD_ORBAX, root)
    step_meta = json.loads((root / "checkpoint_10" / "_CHECKPOINT_METADATA").read_text())
    assert "item_handlers" not in step_meta  # what makes it old: handlers are found from the folders
    assert json.loads((root / "checkpoint_10" / "params" / "_METADATA").read_text())["use_zarr3"] is False
    settings = {"model": "trainer_writers:make_linen", "checkpoint": {"item": "params", "params": None}}
    result = _eval(_config(tmp_path, root, settings), tmp_path)
    assert result["step"] == 10
    assert result["metrics"]["loss"] == pytest.approx(tw.reference(10)[0], rel=1e-5)


def test_folders_that_match_no_step_name_are_said_in_one_line(
    written: dict[str, Any], tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    root, settings = written["xlstm"]
    wrong = {**settings, "checkpoint": {**settings["checkpoint"], "step_prefix": "ckpt"}}
    config = _config(tmp_path, root, wrong)
    # eval: exit 2 with the line, naming the setting that reads them.
    assert main(["eval", "--config", str(config)]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "checkpoint_10, checkpoint_20" in said[0], said
    assert "set checkpoint.step_prefix: checkpoint to read them" in said[0]
    # watch: the first poll says it, once; later polls do not repeat it.
    caplog.set_level(logging.WARNING, logger="tracker_eval")
    poller = StepPoller(root, poll_interval_s=0.1, step_names=StepNames("ckpt"))
    try:
        assert poller.poll() == [] and poller.poll() == []
    finally:
        poller.close()
    lines = [r.getMessage() for r in caplog.records if "do not match the step names" in r.getMessage()]
    assert len(lines) == 1 and "ckpt_<N> (set)" in lines[0] and "checkpoint.step_prefix: checkpoint" in lines[0]
    # status: the same line in its document.
    from tracker_eval.config import load_config  # noqa: PLC0415

    doc = collect_status(load_config(config))
    assert doc["newest_step"] is None and "checkpoint.step_prefix: checkpoint" in doc["notice"]


def test_gcs_lister_reads_prefixed_step_names_and_only_committed_steps(
    written: dict[str, Any], gcs: Any, gcs_env: dict[str, str], tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, settings = written["xlstm"]
    url = "gs://layouts/run/checkpoints"
    gcs.create_bucket("layouts")
    for step, committed in ((10, True), (20, False)):
        folder = root / f"checkpoint_{step}"
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "commit_success.txt"):
            gcs.upload(f"{url}/checkpoint_{step}/{path.relative_to(folder).as_posix()}", path.read_bytes())
        if committed:
            gcs.write_marker(f"{url}/checkpoint_{step}")
    for max_gets in (8, 0):  # a GET per new step's marker, and one list of the markers (matchGlob)
        monkeypatch.setattr(gcs_lister, "MAX_MARKER_GETS", max_gets)
        listed = survey(url)
        assert listed.steps == [10] and listed.step_names == StepNames("checkpoint") and listed.notice is None
    result = _eval(_config(tmp_path, root, settings, checkpoint_dir=url), tmp_path)
    assert result["step"] == 10 and result["metrics"]["loss"] == pytest.approx(tw.reference(10)[0], rel=1e-5)
    gcs.write_marker(f"{url}/checkpoint_20")
    assert survey(url).steps == [10, 20]


@pytest.mark.parametrize("factory", ["make_model", "make_model_current"])
def test_model_with_collectives_over_its_own_mesh_axis_names(tmp_path: pathlib.Path, factory: str) -> None:
    root = tmp_path / "ckpts"
    named_mesh_model.write(root, 10)
    settings = {**named_mesh_model.settings(), "model": f"named_mesh_model:{factory}"}
    result = _eval(_config(tmp_path, root, settings), tmp_path)
    x, y = tw.dataset()
    assert result["metrics"]["loss"] == pytest.approx(named_mesh_model.reference(10, x, y), rel=1e-5)
    (record,) = (json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
    assert record["provenance"]["mesh_shape"] == {"dp": 1, "fsdp": 2, "tp": 2}


def test_named_mesh_settings_are_checked(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    settings = {"model": "named_mesh_model:make_model", "mesh": {"axes": {"dp": 2, "tp": 2}}}
    assert main(["eval", "--config", str(_config(tmp_path, tmp_path, settings))]) == 2
    assert "mesh.axes {'dp': 2, 'tp': 2} needs mesh.batch_axes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"checkpoint": {"step_prefix": "runs/checkpoint"}}, "checkpoint.step_prefix 'runs/checkpoint' must be"),
        ({"checkpoint": {"step_format_fixed_length": 0}}, "checkpoint.step_format_fixed_length must be >= 1"),
        ({"mesh": {"axes": {"dp": 2}, "batch_axes": ["data"]}}, "mesh.batch_axes names 'data', which is not in"),
        ({"mesh": {"axes": {"dp": 2}, "batch_axes": ["dp"], "fsdp": 2}}, "mesh.axes replaces mesh.data/fsdp/tensor"),
        ({"mesh": {"axes": {"dp": -1, "tp": -1}, "batch_axes": ["dp"]}}, "at most one mesh axis may be -1"),
    ],
)
def test_step_name_and_mesh_settings_are_checked(
    tmp_path: pathlib.Path, settings: dict[str, Any], message: str
) -> None:
    from tracker_eval.config import load_config  # noqa: PLC0415
    from tracker_eval.errors import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(_config(tmp_path, tmp_path, {"model": "trainer_writers:make_linen", **settings}))


@pytest.mark.parametrize(
    ("configured", "folders", "remedy"),
    [
        (None, ["10", "checkpoint_20"], "(detected): checkpoint_20; set checkpoint.step_prefix: checkpoint to read"),
        (StepNames("checkpoint"), ["10", "20"], "(set): 10, 20; set checkpoint.step_prefix: '' to read them"),
        (StepNames("checkpoint"), ["checkpoint_0007"], "set checkpoint.step_prefix: checkpoint, "
                                                       "checkpoint.step_format_fixed_length: 4 to read them"),
        (None, ["step-100", "step-200"], "(Orbax's default): step-100, step-200; Orbax names steps <N> or"),
        (None, ["10", "10.orbax-checkpoint-tmp", "checkpoints_dataloaders"], None),  # nothing unread
    ],
)
def test_the_line_on_unread_folders_names_the_setting_that_reads_them(
    configured: StepNames | None, folders: list[str], remedy: str | None
) -> None:
    naming = RootNaming("/runs/r1", configured)
    naming.read(folders)
    assert (naming.notice is None) if remedy is None else (remedy in naming.notice)
