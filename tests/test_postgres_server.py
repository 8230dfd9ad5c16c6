"""The PostgreSQL test server itself: it runs unprivileged on loopback, keeps its data across a
restart and makes isolated databases (the ledger's PostgreSQL tests rely on all three)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures_postgres import PostgresServer

pytest_plugins = ["fixtures_postgres"]


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def test_server_listens_on_loopback_as_an_unprivileged_user(postgres_server: PostgresServer) -> None:
    assert postgres_server.sql("SHOW listen_addresses") == "127.0.0.1"
    assert postgres_server.sql("SHOW port") == str(postgres_server.port)
    assert postgres_server.process is not None
    assert _uid_of(postgres_server.process.pid) != 0
    if os.geteuid() != 0:
        assert _uid_of(postgres_server.process.pid) == os.geteuid()


def test_databases_are_isolated(postgres_server: PostgresServer, postgres_url: str) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    postgres_server.sql("CREATE TABLE marker (x INTEGER)", database=name)
    other = postgres_server.create_database(f"{name}_other")
    assert postgres_server.sql("SELECT to_regclass('marker') IS NULL", database=other.rsplit("/", 1)[1]) == "t"
    assert postgres_server.sql("SELECT to_regclass('marker') IS NULL", database=name) == "f"


def test_stop_and_start_keep_data_and_port() -> None:
    server = PostgresServer().start()
    try:
        server.sql("CREATE DATABASE kept")
        server.sql("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (42)", database="kept")
        port = server.port
        server.stop()
        assert server.process is None
        with pytest.raises(RuntimeError, match="psql failed"):
            server.sql("SELECT 1")
        server.start()
        assert server.port == port
        assert server.sql("SELECT x FROM t", database="kept") == "42"
    finally:
        server.remove()
    assert not server.root.exists()
