"""Runs the image built by `make image` as a container, with whatever runner this machine has.

    docker (with a running engine)  `docker run --read-only --user 10001 --network host ...`
    buildah                         `buildah run --isolation chroot --user 10001 ...` on a container
                                    made from the image (podman run cannot set RLIMIT_NOFILE in an
                                    unprivileged sandbox; buildah's chroot isolation needs no runtime)

buildah has no `--read-only`. As root, the container's file system is bind-mounted read-only onto
itself instead, so the root is read-only as with `docker run --read-only`. buildah 1.28 then fails
its own cleanup after every command (a nil-pointer panic, exit 2) and loses the command's exit
status, so each command runs under `sh`, which prints the status on a line of its own.

Both share the host's network, so a server on the host's loopback answers in the container. The
image's own configuration (ENTRYPOINT, CMD, HEALTHCHECK, ENV, USER) is read from the image, never
copied here, so the test runs what the image says.

    image = Image.local("localhost/tracker-eval:cpu")
    with image.container(mounts=[Mount(host, "/output")]) as box:
        proc = box.start(image.entrypoint + image.cmd)
        box.run(image.healthcheck)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

STORAGE = ("--storage-driver", os.environ.get("STORAGE_DRIVER", "vfs"))
UID = 10001
STATUS = "container command exit status: "
RUNNER_FILES = ("etc/hosts", "etc/resolv.conf", "etc/hostname", "run/.containerenv")


@dataclasses.dataclass(frozen=True)
class Mount:
    host: pathlib.Path
    target: str
    read_only: bool = False

    def spec(self) -> str:
        return f"{self.host}:{self.target}" + (":ro" if self.read_only else "")


def _docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


@dataclasses.dataclass(frozen=True)
class Image:
    """A local image and the parts of its configuration a container runs by."""

    name: str
    runner: str  # "docker" | "buildah"
    config: Mapping[str, Any]

    @classmethod
    def local(cls, name: str) -> Image:
        """The image in local container storage; a failure names `make image`."""
        if _docker_engine():
            runner, inspect = "docker", ["docker", "image", "inspect", name]
        else:
            runner, inspect = "buildah", ["podman", *STORAGE, "image", "inspect", name]
        proc = subprocess.run(inspect, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"no image {name} in local storage: run `make image` first\n{proc.stderr}"
        found = json.loads(proc.stdout)[0]
        config = dict(found.get("Config") or {})
        if "Healthcheck" not in config:  # podman keeps it beside the OCI config
            config["Healthcheck"] = found.get("Healthcheck") or found.get("HealthCheck")
        return cls(name, runner, config)

    @property
    def entrypoint(self) -> list[str]:
        return list(self.config.get("Entrypoint") or [])

    @property
    def cmd(self) -> list[str]:
        return list(self.config.get("Cmd") or [])

    @property
    def healthcheck(self) -> list[str]:
        test = list((self.config.get("Healthcheck") or {}).get("Test") or [])
        assert test[:1] == ["CMD"], f"the image has no exec-form HEALTHCHECK: {test}"
        return test[1:]

    @property
    def user(self) -> str:
        return str(self.config.get("User") or "")

    @contextlib.contextmanager
    def container(self, *, mounts: Sequence[Mount] = (), env: Mapping[str, str] | None = None) -> Iterator[Container]:
        """A container of this image; removed (with whatever still runs in it) on exit."""
        box = Container(self, list(mounts), dict(env or {}))
        try:
            yield box
        finally:
            box.remove()


class Container:
    """One container: `start` its main process, `run` short commands beside it (like `docker exec`)."""

    def __init__(self, image: Image, mounts: list[Mount], env: dict[str, str]) -> None:
        self.image = image
        self.mounts = mounts
        self.env = env
        self.name = f"tracker-eval-test-{uuid.uuid4().hex[:8]}"
        self.read_only_root = image.runner == "docker"
        self.root: pathlib.Path | None = None
        self.main: subprocess.Popen[str] | None = None
        if image.runner == "buildah":
            made = subprocess.run(["buildah", *STORAGE, "from", "--name", self.name, image.name],
                                  capture_output=True, text=True, timeout=600)
            assert made.returncode == 0, made.stderr
            if os.geteuid() == 0:
                self._make_root_read_only()

    def _make_root_read_only(self) -> None:
        mounted = subprocess.run(["buildah", *STORAGE, "mount", self.name], capture_output=True, text=True,
                                 timeout=120)
        assert mounted.returncode == 0, mounted.stderr
        root = pathlib.Path(mounted.stdout.strip())
        (root / "run" / ".containerenv").touch()  # buildah mounts onto it: it must exist beforehand
        subprocess.run(["mount", "--bind", str(root), str(root)], check=True, timeout=60)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True, timeout=60)
        self.root, self.read_only_root = root, True

    def _command(self, argv: Sequence[str], *, detached_name: str | None = None) -> list[str]:
        envs = [w for k, v in self.env.items() for w in ("-e", f"{k}={v}")]
        volumes = [w for m in self.mounts for w in ("-v", m.spec())]
        if self.image.runner == "docker":
            name = ["--name", detached_name] if detached_name else []
            # The image's own USER is what runs; the writable places are the mounts only.
            return ["docker", "run", "--rm", *name, "--read-only", "--network", "host", *volumes, *envs,
                    "--entrypoint", argv[0], self.image.name, *argv[1:]]
        if self.root is not None:
            argv = ["sh", "-c", f'"$@"; echo "{STATUS}$?"', "sh", *argv]
        return ["buildah", *STORAGE, "run", "--isolation", "chroot", "--user", self.image.user or str(UID),
                "--network", "host", *volumes, *envs, self.name, "--", *argv]

    def exit_status(self, returncode: int, output: str) -> int:
        """The command's own exit status (see the module's docstring for the read-only root)."""
        if self.root is None:
            return returncode
        found = [line for line in output.splitlines() if line.startswith(STATUS)]
        assert found, f"no exit status from the container (runner exit {returncode}):\n{output[-3000:]}"
        return int(found[-1][len(STATUS):])

    def start(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        """Starts the container's main process; its output is a pipe of lines."""
        self.main = subprocess.Popen(self._command(argv, detached_name=self.name), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        return self.main

    def run(self, argv: Sequence[str], *, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Runs a command to its end in a container of the same image with the same mounts."""
        if self.image.runner == "docker" and self.main is not None:
            command = ["docker", "exec", self.name, *argv]
        else:
            command = self._command(argv)
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        code = self.exit_status(proc.returncode, proc.stdout)
        stdout = "".join(line for line in proc.stdout.splitlines(keepends=True) if not line.startswith(STATUS))
        return subprocess.CompletedProcess(command, code, stdout, proc.stderr)

    def main_pid(self, marker: str, *, timeout: float = 120) -> int:
        """Host pid of the container's main process: the descendant of the runner whose command line
        holds `marker` (what `docker kill -s` or a kubelet signals)."""
        assert self.main is not None
        if self.image.runner == "docker":
            out = subprocess.run(["docker", "inspect", "--format", "{{.State.Pid}}", self.name],
                                 capture_output=True, text=True, timeout=60).stdout.strip()
            return int(out)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in _descendants(self.main.pid):
                if _runs(pid, marker):
                    return pid
            assert self.main.poll() is None, f"the container exited with {self.main.returncode}"
            time.sleep(0.1)
        raise AssertionError(f"no process with {marker!r} in the container after {timeout:g} s")

    def unmount_root(self) -> None:
        if self.root is not None:
            subprocess.run(["umount", str(self.root)], capture_output=True, timeout=60)
            self.root = None

    def changed_files(self, since: float) -> list[str]:
        """Files of the container's own root file system modified after `since` (mounts excluded)."""
        assert self.image.runner == "buildah"
        mounted = subprocess.run(["buildah", *STORAGE, "mount", self.name], capture_output=True, text=True,
                                 timeout=120)
        assert mounted.returncode == 0, mounted.stderr
        root = pathlib.Path(mounted.stdout.strip())
        skip = {m.target.strip("/") for m in self.mounts}
        changed = []
        for path in root.rglob("*"):
            rel = path.relative_to(root).as_posix()
            if any(rel == s or rel.startswith(f"{s}/") for s in skip) or rel in RUNNER_FILES:
                continue  # mount points, and the files the runner writes for every container
            with contextlib.suppress(FileNotFoundError):
                # Files and links only: the runner makes its mount points (directories) itself.
                if not path.is_dir() and path.lstat().st_mtime > since:
                    changed.append(rel)
        subprocess.run(["buildah", *STORAGE, "umount", self.name], capture_output=True, timeout=120)
        return sorted(changed)

    def remove(self) -> None:
        if self.main is not None and self.main.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.main.pid, signal.SIGKILL)
            self.main.wait(timeout=60)
        if self.image.runner == "docker":
            subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, timeout=120)
        else:
            self.unmount_root()
            subprocess.run(["buildah", *STORAGE, "rm", self.name], capture_output=True, timeout=300)


def _children(pid: int) -> list[int]:
    found = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def _runs(pid: int, program: str) -> bool:
    """Whether `pid` is `program` itself (or a python running its script), not a shell or runner
    whose arguments name it."""
    try:
        args = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    names = [os.path.basename(a) for a in args[:2]]
    return names[0] == program or (names[0].startswith("python") and names[1:] == [program])
