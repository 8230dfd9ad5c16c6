"""Finalized Orbax steps in a GCS bucket, listed with a request or two per poll.

    lister = GcsStepLister("gs://bucket/run")
    lister.finalized_steps()    # [100, 200]: steps whose <step folder>/commit_success.txt exists
    lister.requests             # JSON-API requests made so far

On GCS Orbax writes each step in place and its `<step>/commit_success.txt` last, so a step is
finished if and only if that marker exists. Orbax's own listing checks every step on every call
(9-20 requests per step through gcsfs). Here one poll is:

1. one `objects.list` with `delimiter=/` under the root: the step "directories" (1,000 per page);
2. a metadata GET of `<step>/commit_success.txt`, only for steps not yet known to be finished
   (normally the one being saved). Finalization is monotonic, so a finished step is remembered;
   a step that is gone from the listing of step directories was deleted and is forgotten.

When many steps are new (the first poll of a long run), one `objects.list` of the whole root with
`matchGlob=<root><step_prefix>_*/commit_success.txt` (`<root>*/...` for plain `<N>` names) replaces
their GETs: real GCS then returns just the markers, 1,000 per page. The names are filtered here as
well, because emulators ignore matchGlob and return every object. Step folders are named as
`checkpoint.step_prefix` says or as detected (`tracker_eval.checkpoints.roots`), as on local disks.
Nothing is cached by a library, so every poll sees the bucket as it is.

Credentials: with `STORAGE_EMULATOR_HOST` set, plain requests go to that emulator; otherwise
Application Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, workload identity, the metadata
server) with the read-only scope. The lister needs `storage.objects.list` and `storage.objects.get`
on the bucket (roles/storage.objectViewer). No credential is ever logged.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

import requests

from tracker_eval.checkpoints.roots import NamedRoot, RootNaming, StepNames, check_is_root
from tracker_eval.checkpoints.tree import COMMIT_MARKER, StorageLocationMissingError, StorageUnavailableError
from tracker_eval.errors import ConfigError, one_line

READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
GCS_API = "https://storage.googleapis.com"
# New steps up to this many get one GET each; more are settled by one list of the markers.
MAX_MARKER_GETS = 8
_PAGE = 1000
_MAX_PAGES = 10_000  # 10 million entries: a bound, not a limit anyone reaches
_TIMEOUT_S = (5.0, 30.0)  # connect, read
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def parse_gs_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``gs://bucket/some/run``; the prefix is "" or ends with "/".

    Raises:
        ConfigError: Not a gs:// URL with a valid bucket name.
    """
    rest = url[len("gs://") :] if url.startswith("gs://") else ""
    bucket, _, path = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise ConfigError(
            f"checkpoint_dir {url!r} is not a valid GCS location; write it as gs://BUCKET/PATH/TO/RUN "
            "(the CheckpointManager root)"
        )
    path = path.strip("/")
    return bucket, f"{path}/" if path else ""


def _session() -> tuple[requests.Session, str]:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator not in ("", "default"):
        base = emulator if emulator.startswith(("http://", "https://")) else f"http://{emulator}"
        return requests.Session(), base.rstrip("/")
    import google.auth  # noqa: PLC0415
    import google.auth.exceptions  # noqa: PLC0415
    from google.auth.transport.requests import AuthorizedSession  # noqa: PLC0415

    try:
        credentials, _ = google.auth.default(scopes=[READ_ONLY_SCOPE])
    except google.auth.exceptions.DefaultCredentialsError as error:
        raise ConfigError(
            "no Google credentials for a gs:// checkpoint_dir: set GOOGLE_APPLICATION_CREDENTIALS to a service "
            "account key file, or run where the metadata server provides them (GCE, GKE workload identity); "
            f"({type(error).__name__})"
        ) from None
    return AuthorizedSession(credentials), GCS_API  # refreshes its token itself


class GcsStepLister(NamedRoot):
    """The finalized steps under one gs:// CheckpointManager root (see the module docstring).

    Args:
        location: ``gs://bucket/path/to/run``.
        step_names: How step folders are named; None detects it from the folder names.

    Raises:
        ConfigError: A malformed URL, or no credentials.
    """

    def __init__(self, location: str, *, step_names: StepNames | None = None) -> None:
        self.location = location
        self.bucket, self.prefix = parse_gs_url(location)
        self._session, self._base = _session()
        self._objects = f"{self._base}/storage/v1/b/{urllib.parse.quote(self.bucket, safe='')}/o"
        self._marker = re.compile(re.escape(self.prefix) + r"([^/]+)/" + re.escape(COMMIT_MARKER) + r"\Z")
        self._naming = RootNaming(location, step_names)
        self._finished: set[int] = set()
        self.requests = 0

    def finalized_steps(self) -> list[int]:
        directories, names = self._children()
        before = self._naming.names
        folders = self._naming.read(directories)
        if self._naming.names != before:
            self._finished.clear()  # the first steps of a detected format: what was known is of another
        present = set(folders)
        self._finished &= present  # a step directory that is gone was deleted
        new = sorted(present - self._finished)
        if len(new) > MAX_MARKER_GETS:
            self._finished |= self._listed_markers() & present
        else:
            self._finished.update(step for step in new if self._has_marker(folders[step]))
        steps = sorted(self._finished)
        check_is_root(self.location, steps=steps, names=names, parent=_url_parent)
        return steps

    def close(self) -> None:
        self._session.close()

    def _children(self) -> tuple[list[str], list[str]]:
        """Names of the step directories and of the objects directly under the root."""
        directories: list[str] = []
        names: list[str] = []
        params = {"prefix": self.prefix, "delimiter": "/", "maxResults": str(_PAGE),
                  "fields": "prefixes,items(name),nextPageToken"}
        for page in self._pages(params):
            directories += [p[len(self.prefix) :].rstrip("/") for p in page.get("prefixes", ())]
            names += [item["name"][len(self.prefix) :] for item in page.get("items", ())]
        return directories, names

    def _listed_markers(self) -> set[int]:
        names = self._naming.names
        folders = f"{names.prefix}_*" if names.prefix else "*"  # names are filtered below as well
        params = {"prefix": self.prefix, "matchGlob": f"{self.prefix}{folders}/{COMMIT_MARKER}",
                  "maxResults": str(_PAGE), "fields": "items(name),nextPageToken"}
        found = set()
        for page in self._pages(params):
            for item in page.get("items", ()):
                match = self._marker.match(item["name"])
                step = None if match is None else names.step_of(match[1])
                if step is not None:
                    found.add(step)
        return found

    def _pages(self, params: dict[str, str]) -> Iterator[dict[str, Any]]:
        for _ in range(_MAX_PAGES):
            response = self._get(self._objects, params, what="list")
            try:
                page = response.json()
            except ValueError as error:  # a proxy's error page, a truncated answer
                raise StorageUnavailableError(f"cannot list {self.location}: the answer is not JSON") from error
            yield page
            token = page.get("nextPageToken")
            if not token:
                return
            params = {**params, "pageToken": token}
        raise StorageUnavailableError(f"listing {self.location} returned more than {_MAX_PAGES} pages")

    def _has_marker(self, folder: str) -> bool:
        name = urllib.parse.quote(f"{self.prefix}{folder}/{COMMIT_MARKER}", safe="")
        response = self._get(f"{self._objects}/{name}", {"fields": "name"}, what=f"check step {folder} of",
                             missing_ok=True)
        return response.status_code == 200

    def _get(self, url: str, params: dict[str, str], *, what: str, missing_ok: bool = False) -> requests.Response:
        import google.auth.exceptions  # noqa: PLC0415 - a token refresh that fails is an outage too

        self.requests += 1
        try:
            response = self._session.get(url, params=params, timeout=_TIMEOUT_S)
        except (requests.RequestException, google.auth.exceptions.GoogleAuthError) as error:
            raise StorageUnavailableError(
                f"cannot {what} {self.location}: {type(error).__name__}: {one_line(error, limit=200)}"
            ) from error
        if response.status_code == 200 or (missing_ok and response.status_code == 404):
            return response
        if response.status_code == 404 and url == self._objects:  # a list under a bucket that does not exist
            raise StorageLocationMissingError(f"cannot {what} {self.location}: {_explain(response, self.bucket)}")
        raise StorageUnavailableError(f"cannot {what} {self.location}: {_explain(response, self.bucket)}")


def _explain(response: requests.Response, bucket: str) -> str:
    code = response.status_code
    if code in (401, 403):
        return (f"HTTP {code}: the credentials may not read bucket {bucket!r}; grant storage.objects.list and "
                "storage.objects.get on it (roles/storage.objectViewer)")
    if code == 404:
        return f"HTTP 404: bucket {bucket!r} does not exist; check checkpoint_dir"
    return f"HTTP {code} {response.reason or ''}".strip()


def _url_parent(url: str) -> str:
    return url.rstrip("/").rpartition("/")[0]
