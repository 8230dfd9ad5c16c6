"""The ledger's two backends for parametrized tests: the SQLite file and a PostgreSQL database.

    pytest_plugins = ["fixtures_postgres", "ledger_backends"]

    def test_x(tmp_path, ledger_url):   # runs twice: None (the SQLite file), then a fresh PostgreSQL database
        ledger = Ledger(tmp_path, url=ledger_url, ...)

Every mechanism must hold on both, so the ledger's tests take `ledger_url` and keep their assertions;
only what is about one backend's storage itself (SQLite's WAL file, PostgreSQL's roles) is not parametrized.
"""

from __future__ import annotations

import pytest

BACKENDS = ("sqlite", "postgres")


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest) -> str | None:
    """None for the SQLite file in the test's output_dir; else a fresh database of the session's PostgreSQL server."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")
