"""The ledger's two backends for parametrized tests: the SQLite file and a PostgreSQL database.

    pytest_plugins = ["fixtures_postgres", "ledger_backends"]

    def test_x(tmp_path, ledger_url):   # runs twice: None (the SQLite file), then a fresh PostgreSQL database
        ledger = Ledger(tmp_path, url=ledger_url, ...)

    def test_y(tmp_path, ledger_backend):   # the same, also named by TRACKER_EVAL_LEDGER_URL, so that
        with WatcherProcess(config) as w:   # every tracker-eval process the test starts uses it
            ...

Every mechanism must hold on both, so the ledger's tests take `ledger_url` and keep their assertions;
only what is about one backend's storage itself (SQLite's WAL file, PostgreSQL's roles) is not parametrized.
"""

from __future__ import annotations

import pytest

from tracker_eval.config.ledger import ENV_VAR

BACKENDS = ("sqlite", "postgres")


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest) -> str | None:
    """None for the SQLite file in the test's output_dir; else a fresh database of the session's PostgreSQL server."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def ledger_backend(ledger_url: str | None, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """`ledger_url`, also set as TRACKER_EVAL_LEDGER_URL (unset for SQLite): the test, the helpers of
    `watcher_harness` (`ledger_rows`) and every tracker-eval process it starts then use that backend."""
    if ledger_url is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, ledger_url)
    return ledger_url
