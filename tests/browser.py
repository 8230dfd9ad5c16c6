"""Headless Chromium for the UI tests: find the binary, load a page, return its DOM.

    dom = dump_dom("http://127.0.0.1:5000/#/experiments/1", profile=tmp_path / "chromium-profile")
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

BROWSER_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--virtual-time-budget=60000", "--run-all-compositor-stages-before-draw",
]


def chromium() -> str:
    """Path of the Chromium binary; fails the test with the install command when there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail(
        "Chromium is needed to check the trackers' web UIs but is not installed. Install it with "
        "`apt-get update && apt-get install -y chromium` (as root; `make test` does this when it can)."
    )


def dump_dom(url: str, *, profile: pathlib.Path, timeout_s: float = 120) -> str:
    """The DOM of ``url`` after its scripts ran (bounded by Chromium's virtual time budget)."""
    done = subprocess.run([chromium(), *BROWSER_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
