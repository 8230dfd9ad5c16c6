"""TensorBoard logger, read back with TensorBoard's own readers: a fresh EventAccumulator with its
default settings (what TensorBoard's Python loader does), the real `tensorboard` server with its
default Rust data loader (live and fresh), and its UI in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from browser import dump_dom
from fixtures_tensorboard import TensorboardServer
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util
from tracker_eval_tensorboard.logger import TensorboardConfig, TensorboardLogger, default_run_name
from tracker_eval_tensorboard.records import scan_records
from tracker_eval_tensorboard.runlog import FILE_PATTERN
from watcher_harness import wait_for

from tracker_eval.errors import ConfigError
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.loggers.base import LoggerContext

EXAMPLES = 257


def _losses(step: int) -> np.ndarray:
    """Per-example losses of a checkpoint, float64, different for every step."""
    return np.random.default_rng(step).gamma(2.0, 0.5, size=EXAMPLES) * (1 + 1000 / (step + 10))


def _result(step: int) -> EvalResult:
    losses = _losses(step).astype(np.float32)  # per-example arrays reach loggers as the device's float32
    return EvalResult(step=step, checkpoint=f"/ckpt/{step}",
                      metrics={"loss": float(np.mean(losses, dtype=np.float64)),
                               "accuracy": float(np.mean(losses < 1.0))},
                      per_example={"loss": losses}, provenance={"split": "validation", "host": "h1"})


def _reference(step: int) -> dict[str, float]:
    x = _losses(step).astype(np.float32).astype(np.float64)
    return {"loss": float(x.sum() / x.size), "accuracy": float(np.count_nonzero(x < 1.0) / x.size)}


def _logger(out, run_key: str = "stream-a", run_name: str = "eval") -> TensorboardLogger:
    context = LoggerContext(output_dir=str(out), run_key=run_key)
    return TensorboardLogger(TensorboardConfig(run_name=run_name), context=context)


def _generations(run_dir) -> list[str]:
    """Event files holding data (a replaced generation is emptied first and removed minutes later)."""
    return sorted(name for name in os.listdir(run_dir) if FILE_PATTERN.match(name) and os.path.getsize(run_dir / name))


def _default_scalars(run_dir, tag: str = "eval/loss") -> list[tuple[int, float]]:
    """(step, value) in read order from a fresh EventAccumulator with TensorBoard's default settings."""
    accumulator = event_accumulator.EventAccumulator(str(run_dir)).Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def _assert_every_step_once(run_dir, steps: list[int]) -> None:
    for name in ("loss", "accuracy"):
        points = _default_scalars(run_dir, f"eval/{name}")
        assert [s for s, _ in points] == steps, name  # each once, and in step order (no hidden point)
        for step, value in points:
            assert np.float32(value) == np.float32(_reference(step)[name]), (name, step)


def test_every_step_once_in_the_default_reader_through_late_steps_resends_and_a_restart(tmp_path):
    logger = _logger(tmp_path)
    logger.log_config({"model": "digits", "split": "validation"})
    for step in (200, 400, 100, 400, 300):  # 100 and 300 arrive late; 400 is sent twice
        logger.log_result(_result(step))
        logger.flush()
    logger.set_summary({"best_step": 300, "best_loss": 0.25})
    logger.log_result(_result(500))
    logger.close()
    assert logger.compactions == 2  # one new generation per late step, none for in-order steps
    run_dir = tmp_path / "tensorboard" / "eval"
    assert _generations(run_dir) == ["events.out.tfevents.0000000003.tracker-eval"]

    # A restarted process replays everything (as the outbox does after a crash): nothing is added.
    size = os.path.getsize(run_dir / _generations(run_dir)[0])
    again = _logger(tmp_path)
    again.log_config({"model": "digits", "split": "validation"})
    for step in (100, 200, 300, 400, 500):
        again.log_result(_result(step))
    again.set_summary({"best_step": 300, "best_loss": 0.25})
    again.close()
    assert os.path.getsize(run_dir / _generations(run_dir)[0]) == size
    steps = [100, 200, 300, 400, 500]
    _assert_every_step_once(run_dir, steps)

    keep_all = event_accumulator.STORE_EVERYTHING_SIZE_GUIDANCE  # the defaults keep 1 histogram, 10 texts
    everything = event_accumulator.EventAccumulator(str(run_dir), size_guidance=keep_all).Reload()
    histograms = everything.Tensors("eval/per_example/loss")
    assert [e.step for e in histograms] == steps
    for event in histograms:
        buckets = tensor_util.make_ndarray(event.tensor_proto)  # rows [left, right, count]
        x = _losses(event.step).astype(np.float32).astype(np.float64)
        edges = np.linspace(x.min(), x.max(), 31)
        assert buckets.shape == (30, 3)
        np.testing.assert_allclose(buckets[:, 0], edges[:-1], rtol=1e-12)
        np.testing.assert_allclose(buckets[:, 1], edges[1:], rtol=1e-12)
        assert buckets[:, 2].tolist() == np.histogram(x, bins=edges)[0].tolist()
    assert everything.SummaryMetadata("eval/per_example/loss").plugin_data.plugin_name == "histograms"

    (provenance,) = everything.Tensors("tracker_eval/provenance")  # once per run, with the first result
    text = tensor_util.make_ndarray(provenance.tensor_proto).item().decode()
    doc = json.loads(text.strip("`\n"))
    assert provenance.step == 200 and doc["first_checkpoint"] == "/ckpt/200" and doc["stream"] == "stream-a"
    assert doc["config"] == {"model": "digits", "split": "validation"} and doc["provenance"]["host"] == "h1"
    (best,) = everything.Tensors("tracker_eval/best")
    best_text = tensor_util.make_ndarray(best.tensor_proto).item().decode()
    assert best.step == 300 and "best_step**: 300" in best_text and "best_loss**: 0.25" in best_text


def test_an_alert_is_a_text_at_its_step_once(tmp_path):
    alert = {"suite": "", "metric": "loss", "step": 300, "message": "step 300 is worse than step 200 (best) on loss"}
    result = EvalResult(step=300, checkpoint="/ckpt/300", metrics={"loss": 0.5}, alerts=(alert,))
    logger = _logger(tmp_path)
    logger.log_result(result)
    logger.close()
    again = _logger(tmp_path)  # a restart resends the step
    again.log_result(result)
    again.close()
    keep_all = event_accumulator.STORE_EVERYTHING_SIZE_GUIDANCE
    everything = event_accumulator.EventAccumulator(str(logger.run_dir), size_guidance=keep_all).Reload()
    (text,) = everything.Tensors("eval/alerts/loss")
    assert text.step == 300 and tensor_util.make_ndarray(text.tensor_proto).item().decode() == alert["message"]


def test_two_writers_of_one_run_see_each_other(tmp_path):
    # The watcher and training's in-loop evaluation deliver to one run, one at a time (the ledger's
    # lease); each logger reads what the other wrote under the run's lock before writing.
    watcher, training = _logger(tmp_path), _logger(tmp_path)
    watcher.log_result(_result(100))
    watcher.flush()
    training.log_result(_result(100))  # a re-send of a step the other process wrote
    training.log_result(_result(300))
    training.flush()
    watcher.log_result(_result(200))  # late for the run, though the watcher itself never saw 300
    watcher.log_result(_result(300))
    watcher.close()
    training.close()
    assert watcher.compactions == 1 and training.compactions == 0
    _assert_every_step_once(tmp_path / "tensorboard" / "eval", [100, 200, 300])


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, os.path.dirname(sys.argv[3]))
    from test_loggers_tensorboard import _logger, _result
    from tracker_eval_tensorboard import runlog

    out, point = sys.argv[1], sys.argv[2]
    logger = _logger(out)
    for step in (200, 300):
        logger.log_result(_result(step))
        logger.flush()
    print("flushed", flush=True)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "mid-compaction":  # the new generation is renamed in; the old one is not emptied yet
        runlog._retire = die
        logger.log_result(_result(100))
        logger.flush()
    elif point == "mid-append":  # half of the record is on disk
        write_all = runlog._write_all
        runlog._write_all = lambda fd, data: (write_all(fd, data[: len(data) // 2]), die())
        logger.log_result(_result(400))
        logger.flush()
    else:  # logged, never flushed: not delivered
        logger.log_result(_result(400))
        die()
    """
)


@pytest.mark.parametrize("point", ["mid-compaction", "mid-append", "unflushed"])
def test_sigkill_then_restart_holds_every_step_once(tmp_path, point):
    child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), point, __file__],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert "flushed" in child.stdout
    run_dir = tmp_path / "tensorboard" / "eval"
    files = _generations(run_dir)
    if point == "mid-compaction":
        assert len(files) == 2  # killed between the rename and emptying the old file: the run is held twice
    else:
        assert len(files) == 1
        assert scan_records(run_dir / files[0]).torn == (point == "mid-append")
        assert [s for s, _ in _default_scalars(run_dir)] == [200, 300]  # readers skip a torn tail

    # The restart repairs the run first; the outbox re-sends what was not acknowledged (and more).
    # In-order steps only, so a torn tail would be appended to if it were not repaired.
    logger = _logger(tmp_path)
    for step in (200, 300, 400, 500):
        logger.log_result(_result(step))
    logger.close()
    assert len(_generations(run_dir)) == 1
    assert not any(name.startswith(".tracker-eval-tmp") for name in os.listdir(run_dir))
    _assert_every_step_once(run_dir, ([100] if point == "mid-compaction" else []) + [200, 300, 400, 500])


def test_late_step_in_a_live_tensorboard_server_and_its_ui(tmp_path):
    logger = _logger(tmp_path)
    for step in (100, 200, 300):
        logger.log_result(_result(step))
        logger.flush()
    logdir = tmp_path / "tensorboard"
    with TensorboardServer(logdir, log=tmp_path / "tensorboard-live.log") as live:
        wait_for(lambda: live.scalar_steps("eval", "eval/loss") == [100, 200, 300], timeout=90,
                 what="the live server showing steps 100-300")
        logger.log_result(_result(50))  # late: the Rust loader would drop 100-300 if 50 followed them
        logger.close()
        steps = [50, 100, 200, 300]
        wait_for(lambda: live.scalar_steps("eval", "eval/loss") == steps, timeout=90,
                 what=f"the live server showing {steps}, the late step without hiding higher ones")
        with TensorboardServer(logdir, log=tmp_path / "tensorboard-fresh.log") as fresh:
            wait_for(lambda: fresh.scalar_steps("eval", "eval/loss") == steps, timeout=90,
                     what="a freshly started server showing every step")

        # The UI's own data API, fetched by the browser, and the dashboard it renders.
        profile = tmp_path / "chromium-profile"
        tags = json.loads(_pre(dump_dom(f"{live.url}/data/plugin/scalars/tags", profile=profile)))
        assert {"eval/loss", "eval/accuracy"} <= set(tags["eval"])
        series = json.loads(_pre(dump_dom(f"{live.url}/data/plugin/scalars/scalars?run=eval&tag=eval%2Floss",
                                          profile=profile)))
        assert [row[1] for row in series] == steps
        for _, step, value in series:
            assert np.float32(value) == np.float32(_reference(step)["loss"])
        page = dump_dom(f"{live.url}/#timeseries", profile=profile)
        assert 'title="eval/loss"' in page and 'title="eval/accuracy"' in page, page[-3000:]


def _pre(dom: str) -> str:
    """The text Chromium shows for a JSON response (inside <pre>), unescaped."""
    import html  # noqa: PLC0415

    match = re.search(r"<pre[^>]*>(.*)</pre>", dom, re.DOTALL)
    assert match, dom[-2000:]
    return html.unescape(match.group(1))


def test_run_names_and_streams_are_checked(tmp_path):
    assert default_run_name("ckpts@1a2b") == default_run_name("ckpts@1a2b") != default_run_name("ckpts@ffff")
    assert re.fullmatch(r"eval-[0-9a-f]{10}", default_run_name("ckpts@1a2b"))
    for bad in ("../up", "/abs", "a/./b", ".", "run.tfevents.x"):
        with pytest.raises(ConfigError, match="run_name"):
            _logger(tmp_path, run_name=bad)
    _logger(tmp_path).close()
    with pytest.raises(ConfigError, match="another evaluation stream"):
        _logger(tmp_path, run_key="stream-b")
