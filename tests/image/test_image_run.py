"""The image that `make image` built, run as a container (`make test` runs this after `make image`).

As a user runs it: uid 10001 from the image's USER, a read-only root file system, the checkpoints
and the config mounted read-only, an output folder (and /tmp, the home) mounted writable, the
shipped `configs/cluster/watch.yaml`, the image's own CMD and HEALTHCHECK. The container evaluates
every checkpoint once, with values equal to a float64 numpy reference, delivers them to JSONL, to
offline W&B and to an MLflow server on the host's loopback, turns unhealthy while its process is
stopped and healthy again when it goes on, and ends in order on SIGTERM.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import threading
import time
import uuid

import pytest
import yaml
from runtime import UID, Image, Mount
from watcher_harness import (
    SOURCE_STEPS,
    assert_equal_to_reference,
    assert_exactly_once,
    ledger_execute,
    ledger_rows,
    publish,
    stored_metrics,
    wait_for,
)

pytest_plugins = ["fixtures_mlflow", "watcher_harness"]

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("TRACKER_EVAL_IMAGE", "localhost/tracker-eval:cpu")
STALE_S = 4.0


@pytest.fixture(scope="module")
def image() -> Image:
    return Image.local(IMAGE)


def _normalized(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '-', name).lower()}=={version}"


def test_image_holds_the_lock_and_the_packages_not_editable(image):
    assert image.user.split(":")[0] == str(UID), image.user
    with image.container() as box:
        listed = box.run(["python", "-m", "pip", "list", "--format=json"])
        assert listed.returncode == 0, listed.stderr
        probe = box.run(["python", "-c", (
            "import importlib.metadata as m, os, tracker_eval, tracker_eval_lm_harness;"
            "print(sorted(e.name for e in m.entry_points(group='tracker_eval.loggers')));"
            "print(sorted(e.name for e in m.entry_points(group='tracker_eval.suites')));"
            "print(os.getuid(), tracker_eval.__file__)")])
        helped = box.run([*image.entrypoint, "--help"])
    packages = json.loads(listed.stdout)
    lock = {_normalized(line.strip()) for line in (ROOT / "requirements.lock").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    installed = {_normalized(f"{p['name']}=={p['version']}") for p in packages}
    assert lock <= installed, f"not installed as locked: {sorted(lock - installed)}"
    ours = {"tracker-eval==0.1.0", "tracker-eval-wandb==0.1.0", "tracker-eval-mlflow==0.1.0",
            "tracker-eval-tensorboard==0.1.0", "tracker-eval-lm-harness==0.1.0"}
    bootstrap = {v for v in installed if v.split("==")[0] in ("pip", "setuptools", "wheel")}
    assert installed - lock - bootstrap == ours, f"installed beyond the lock: {sorted(installed - lock - bootstrap)}"
    assert not [p["name"] for p in packages if p.get("editable_project_location")]
    assert probe.returncode == 0, probe.stderr
    loggers, suites, where = probe.stdout.splitlines()
    assert loggers == str(["console", "jsonl", "mlflow", "tensorboard", "wandb"])
    assert suites == str(["lm_harness"])
    assert where.split() == [str(UID), where.split()[1]] and where.split()[1].startswith("/opt/venv/"), where
    assert helped.returncode == 0 and re.search(r"\bwatch\b", helped.stdout), helped.stdout + helped.stderr


def _writable(path: pathlib.Path) -> pathlib.Path:
    """A host folder that uid 10001 owns, as README tells users to prepare the output mount."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, UID, UID)
    else:
        path.chmod(0o777)
    return path


def _health(box, image) -> tuple[int, str]:
    proc = box.run(image.healthcheck, timeout=180)
    return proc.returncode, proc.stdout.strip() + proc.stderr.strip()


def test_container_watches_delivers_reports_health_and_stops_on_sigterm(
        image, tmp_path, mlflow_server, source_checkpoints):
    ckpts, out = tmp_path / "ckpts", _writable(tmp_path / "out")
    scratch, home = _writable(tmp_path / "tmp"), _writable(tmp_path / "home")
    for step in SOURCE_STEPS[:3]:
        publish(source_checkpoints, ckpts, step)
    # The shipped config, with a short poll and a short staleness so the test need not wait minutes.
    shipped = yaml.safe_load((ROOT / "configs" / "cluster" / "watch.yaml").read_text())
    shipped["watch"].update(poll_interval_s=0.5, health_stale_s=STALE_S)
    shipped_loggers = [spec["type"] for spec in shipped["loggers"]]
    assert shipped_loggers == ["console", "jsonl", "mlflow", "wandb"], shipped_loggers
    experiment = f"image-{uuid.uuid4().hex[:8]}"
    shipped["loggers"][2]["experiment"] = experiment
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "watch.yaml").write_text(yaml.safe_dump(shipped, sort_keys=False))
    mounts = [Mount(ckpts, "/checkpoints", read_only=True), Mount(config_dir, "/config", read_only=True),
              Mount(out, "/output"), Mount(scratch, "/tmp"), Mount(home, "/home/tracker")]
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

    lines: list[tuple[float, str]] = []
    with image.container(mounts=mounts, env=env) as box:
        started = time.time()
        main = box.start([*image.entrypoint, *image.cmd])
        reader = threading.Thread(target=lambda: lines.extend((time.time(), line) for line in main.stdout),
                                  daemon=True)
        reader.start()

        def tail() -> str:
            return "".join(line for _, line in lines[-40:])

        def delivered(steps) -> bool:
            assert main.poll() is None, f"the container exited with {main.returncode}:\n{tail()}"
            rows = ledger_rows(out) if (out / "ledger.sqlite").exists() else {}
            return all(rows.get(s, {}).get("state") == "delivered" for s in steps)

        wait_for(lambda: delivered(SOURCE_STEPS[:3]), timeout=600, what="the first three steps delivered")
        first_poll = next((t for t, line in lines if "watching" in line), None)
        watcher = box.main_pid("tracker-eval")

        code, said = _health(box, image)
        assert code == 0 and said.startswith("healthy"), said
        if box.read_only_root:  # as `docker run --read-only` and readOnlyRootFilesystem: true
            probe = box.run(["sh", "-c", "touch /opt/venv/probe || touch /home/probe"])
            assert probe.returncode != 0 and "Read-only file system" in probe.stderr + probe.stdout, probe
        os.kill(watcher, signal.SIGSTOP)  # wedged: alive, but no heartbeat
        try:
            wait_for(lambda: _health(box, image)[0] == 1, timeout=180, what="HEALTHCHECK exit 1 when stale")
            code, said = _health(box, image)
            assert code == 1 and said.startswith("unhealthy: last watcher heartbeat"), said
        finally:
            os.kill(watcher, signal.SIGCONT)
        wait_for(lambda: _health(box, image)[0] == 0, timeout=180, what="HEALTHCHECK exit 0 again")

        publish(source_checkpoints, ckpts, SOURCE_STEPS[3])  # a new checkpoint while it runs
        wait_for(lambda: delivered(SOURCE_STEPS[:4]), timeout=300, what="the new step delivered")
        os.kill(watcher, signal.SIGTERM)
        main.wait(timeout=180)
        reader.join(10)
        code = box.exit_status(main.returncode, "".join(line for _, line in lines))
        assert code == 0, tail()
        # Before anything on the host opens the ledger (SQLite would make its -shm file as root).
        owned = {p.lstat().st_uid for p in out.rglob("*")}
        assert owned == {UID}, f"files in the output mount not owned by uid {UID}: {owned}"
        if box.image.runner == "buildah":
            changed = box.changed_files(started)
            assert not changed, f"the container wrote outside its mounts: {changed[:20]}"

    text = "".join(line for _, line in lines)
    assert "Traceback" not in text, tail()
    steps = list(SOURCE_STEPS[:4])
    rows = ledger_rows(out)
    assert {s: (r["state"], r["attempts"]) for s, r in rows.items()} == {s: ("delivered", 1) for s in steps}
    pending = ledger_execute(out, "SELECT COUNT(*) FROM outbox WHERE state = 'pending'")
    assert pending[0][0] == 0, "SIGTERM left deliveries in the outbox"
    stored = stored_metrics(out)
    assert_equal_to_reference(stored, ckpts, steps)
    assert_exactly_once(out, stored, mlflow=(mlflow_server.url, experiment), wandb=True)
    if first_poll is not None:
        print(f"\ncontainer start to first poll: {first_poll - started:.1f} s")
