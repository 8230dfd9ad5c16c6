"""A stream's identity (ledger stream, tracker run key) does not depend on the working directory."""

from __future__ import annotations

import pathlib

import pytest

from tracker_eval.config import load_config
from tracker_eval.identity import stream_hash, tracker_run_key
from tracker_eval.ledger.steps import Ledger
from tracker_eval.locations import is_url, normalize_checkpoint_dir

MINIMAL = {
    "model": "tracker_eval.tasks.classification:make_model",
    "eval_function": "tracker_eval.tasks.classification:eval_function",
    "data": "tracker_eval.tasks.classification:make_eval_data",
    "batch_size": 32,
}


def _identity(checkpoint_dir: str, *, cwd: pathlib.Path, output_dir: pathlib.Path,
              monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, int]:
    """(run key, ledger stream directory, ledger stream id) as a process started in `cwd` sees them."""
    monkeypatch.chdir(cwd)
    config = load_config(base={**MINIMAL, "checkpoint_dir": checkpoint_dir, "output_dir": str(output_dir)})
    with Ledger(output_dir, checkpoint_dir=config.checkpoint_dir, config_hash=stream_hash(config)) as ledger:
        return tracker_run_key(config), ledger.checkpoint_dir, ledger._stream


def test_training_and_watcher_in_different_directories_share_one_identity(tmp_path, monkeypatch):
    run, container = tmp_path / "job", tmp_path / "container-root"
    (run / "ckpts").mkdir(parents=True)
    container.mkdir()
    out = tmp_path / "out"
    # A training process started in the job directory with a relative path, a watcher container
    # started elsewhere with the absolute one (and a trailing slash).
    trainer = _identity("ckpts", cwd=run, output_dir=out, monkeypatch=monkeypatch)
    watcher = _identity(f"{run / 'ckpts'}/", cwd=container, output_dir=out, monkeypatch=monkeypatch)
    assert trainer == watcher
    assert trainer[0].startswith(f"{run / 'ckpts'}@")

    bucket = []
    for cwd, url in ((run, "gs://bucket/runs/42"), (container, "gs://bucket/runs/42/"), (tmp_path, "GS://bucket/runs/42")):
        bucket.append(_identity(url, cwd=cwd, output_dir=out, monkeypatch=monkeypatch))
    assert bucket[0] == bucket[1] == bucket[2]
    key, directory, stream = bucket[0]
    assert directory == "gs://bucket/runs/42"
    assert key.startswith("gs://bucket/runs/42@"), key  # never <cwd>/gs:/bucket/...
    assert stream != trainer[2]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("gs://b/run", "gs://b/run"),
        ("gs://b/run///", "gs://b/run"),
        ("s3://b/a//b", "s3://b/a//b"),  # object stores may hold "//" in names: kept
        ("gs://b", "gs://b"),
        ("file:///data/ckpts/", "file:///data/ckpts"),
    ],
)
def test_urls_are_kept_as_urls(given, expected):
    assert is_url(given)
    assert normalize_checkpoint_dir(given) == expected


def test_local_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_url("ckpts") and not is_url("/a/gs:/b")
    assert normalize_checkpoint_dir("ckpts") == normalize_checkpoint_dir("./ckpts/") == str(tmp_path / "ckpts")
