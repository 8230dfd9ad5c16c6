"""Resume within an `lm_harness` suite: what a second attempt costs after a SIGKILL, and what keeping
the answers costs an attempt that is never killed.

The suite is the shipped `pydoc` group (multiple choice, rolling perplexity, generation) on TinyLM,
packed, 32 rows a batch, `max_length` 512, on 8 fake CPU devices (`make bench` sets XLA_FLAGS). A
child process compiles, then runs it at one step and is SIGKILLed 70% of an uninterrupted run's
time into it; a snapshot of ``answers.sqlite`` as the kill left it is the starting point
of every resumed attempt. Three runs alternate in each repeat (forwards, then backwards), all with
compiled programs: answers not kept (`resume: false`), answers kept from nothing (a new step each
repeat), and the resumed attempt. `harness_resume_ratio` = resumed / kept from nothing;
`resume_overhead_ratio` = kept / not kept; medians over repeats of each repeat's ratio.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from tracker_eval.config import MeshConfig
from tracker_eval.evaluation.models import adapt_model
from tracker_eval.evaluation.sharding import make_mesh, place_params
from tracker_eval.tasks import language_model as lm

OPTIONS = {"tasks": ["pydoc"], "limit": 200, "max_length": 512, "batch_size": 32, "packing": True,
           "bootstrap_iters": 0}
STREAM, KILLED_STEP, KILL_AT, REPEATS, WIDTH = "bench-resume", 7, 0.7, 5, 384
CHILD = "import sys; from benchmarks.bench_harness_resume import _child; _child(sys.argv[1])"


def _suite(output_dir: str | None, *, resume: bool = True) -> tuple[Any, Any]:
    """(suite, params on its mesh), built as every run of this benchmark builds them."""
    from tracker_eval_lm_harness.suite import HarnessSuite  # noqa: PLC0415

    mesh = make_mesh(MeshConfig(data=-1))
    model = lm.make_model(width=WIDTH)
    params = place_params(lm.init_params(model, seed=0), mesh, rule="replicated")
    config = HarnessSuite.Config.from_mapping({**OPTIONS, "resume": resume})
    suite = HarnessSuite(config, adapter=adapt_model(model), mesh=mesh, name="harness", output_dir=output_dir,
                         stream=STREAM)
    return suite, params


def _child(output_dir: str) -> None:
    """The attempt that is killed: compiles (a run at step 0), says so, runs the step until the
    parent's SIGKILL."""
    suite, params = _suite(output_dir)
    suite.run(params, step=0)
    print("go", flush=True)
    suite.run(params, step=KILLED_STEP)
    print("finished", flush=True)


def _kept(output_dir: pathlib.Path) -> int:
    path = output_dir / "answers.sqlite"
    if not path.exists():
        return 0
    conn = sqlite3.connect(str(path), timeout=30)
    try:
        return conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def _killed_attempt(output_dir: pathlib.Path, *, seconds: float) -> int:
    """Runs the child and SIGKILLs it KILL_AT of `seconds` (an uninterrupted run's) into the step;
    returns how many of the step's answers it had kept."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(output_dir)], env=os.environ.copy(),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout is not None
    try:
        if child.stdout.readline().strip() != "go":
            raise RuntimeError("the attempt to kill failed before its step")
        time.sleep(KILL_AT * seconds)  # a benchmark's fixed point in a run, not a test's wait
        if child.poll() is not None:
            raise RuntimeError(f"the attempt to kill ended before {KILL_AT:.0%} of an uninterrupted run's time")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    conn = sqlite3.connect(str(output_dir / "answers.sqlite"))
    try:  # the WAL into the main file, so that one file is the snapshot
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return conn.execute("SELECT COUNT(*) FROM answers WHERE step = ?", (KILLED_STEP,)).fetchone()[0]
    finally:
        conn.close()


def _restore(snapshot: pathlib.Path, output_dir: pathlib.Path) -> None:
    for suffix in ("-wal", "-shm"):
        (output_dir / f"answers.sqlite{suffix}").unlink(missing_ok=True)
    shutil.copyfile(snapshot, output_dir / "answers.sqlite")


def run() -> dict[str, float]:
    from tracker_eval.ledger.answers import discard_answers  # noqa: PLC0415

    root = pathlib.Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        kept_dir, resumed_dir, killed_dir = root / "kept", root / "resumed", root / "killed"
        for folder in (kept_dir, resumed_dir, killed_dir):
            folder.mkdir()
        plain, params = _suite(None, resume=False)
        kept, _ = _suite(str(kept_dir))
        resumed, _ = _suite(str(resumed_dir))
        kept.run(params, step=0)  # compiles every width; the others reuse the compiled shapes
        plain.run(params, step=0)
        resumed.run(params, step=0)
        whole = kept.run(params, step=KILLED_STEP)
        total = whole.provenance["answers_kept"]
        at_kill = _killed_attempt(killed_dir, seconds=whole.provenance["seconds"])
        snapshot = root / "snapshot.sqlite"
        shutil.copyfile(killed_dir / "answers.sqlite", snapshot)
        times: dict[str, list[float]] = {"plain": [], "kept": [], "resumed": []}
        for repeat in range(REPEATS):
            _restore(snapshot, resumed_dir)
            runs = {"plain": lambda: plain.run(params, step=KILLED_STEP),
                    "kept": lambda r=repeat: kept.run(params, step=100 + r),
                    "resumed": lambda: resumed.run(params, step=KILLED_STEP)}
            order = list(runs) if repeat % 2 == 0 else list(reversed(runs))  # neither side always first
            for name in order:
                fn = runs[name]
                start = time.perf_counter()
                result = fn()
                times[name].append(time.perf_counter() - start)
                if name == "resumed":
                    assert result.metrics == whole.metrics and result.samples == whole.samples
                    reused = result.provenance["answers_reused"]
            discard_answers(kept_dir, stream=STREAM, step=100 + repeat)
        for suite in (plain, kept, resumed):
            suite.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    resume = statistics.median(r / k for r, k in zip(times["resumed"], times["kept"], strict=True))
    overhead = statistics.median(k / p for k, p in zip(times["kept"], times["plain"], strict=True))
    print(f"  lm-eval's share of a run {whole.provenance['lm_eval_overhead_share']:.2f}; answers an attempt "
          f"keeps {total}, kept at the kill {at_kill} ({at_kill / total:.0%}), reused "
          f"{reused}; seconds per repeat: " + "; ".join(f"{k} " + " ".join(f"{x:.2f}" for x in v)
                                                     for k, v in times.items()))
    return {"harness_resume_ratio": resume, "resume_overhead_ratio": overhead,
            "harness_resume_killed_at_share": at_kill / total}
