"""Where the ledger lives: `ledger.url` / TRACKER_EVAL_LEDGER_URL, and one-line exit-2 errors against a
real PostgreSQL server (unreachable, missing database, refused user, missing privileges), the
password masked in every one; the SQLite default unchanged and without the driver."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_postgres import PostgresServer, free_port

from tracker_eval.cli import main
from tracker_eval.config import load_config
from tracker_eval.config.ledger import ENV_VAR, LedgerConfig, resolve_ledger_url
from tracker_eval.errors import ConfigError
from tracker_eval.runners.stream import open_ledger

pytest_plugins = ["fixtures_postgres"]

CLASSIFICATION = "tracker_eval.tasks.classification"
PASSWORD = "Sekr1t-Pass-42"


def write_config(root: Path, **extra: object) -> Path:
    config = {"checkpoint_dir": str(root / "ckpts"), "model": f"{CLASSIFICATION}:make_model",
              "eval_function": f"{CLASSIFICATION}:eval_function", "data": f"{CLASSIFICATION}:make_eval_data",
              "batch_size": 8, "output_dir": str(root / "out"), "loggers": [{"type": "jsonl"}], **extra}
    (root / "ckpts").mkdir(exist_ok=True)
    path = root / "watch.yaml"
    path.write_text(json.dumps(config))
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _no_ambient_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_the_default_is_the_sqlite_file_and_stays_out_of_the_run_config(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    assert config.ledger == LedgerConfig(url=None)
    assert resolve_ledger_url(config.ledger) is None
    assert "ledger" not in config.to_dict()  # run configs recorded by trackers stay as they were
    ledger = open_ledger(config, loggers=["jsonl"])
    try:
        assert ledger.url is None
        assert (tmp_path / "out" / "ledger.sqlite").is_file()
    finally:
        ledger.close()


def test_a_sqlite_ledger_never_imports_the_driver(tmp_path: Path) -> None:
    probe = ("import sys; from tracker_eval.ledger.steps import Ledger; "
             f"ledger = Ledger({str(tmp_path)!r}, checkpoint_dir='/c', config_hash='h', loggers=['a']); "
             "ledger.register([1]); assert ledger.claim(1, owner='w'); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('psycopg', 'psycopg_binary')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "ledger.sqlite").is_file()


@pytest.mark.parametrize(("url", "message"), [
    ("mysql://u@h:3306/db", "is not a PostgreSQL URL"),
    ("postgresql://u@h:port/db", "is not a valid URL"),
    ("postgresql://u@h:70000/db", "is not a valid URL|outside 1..65535"),
    ("postgresql://u@h:5432", "names no database"),
    ("/tmp/ledger.sqlite", "is not a PostgreSQL URL"),
])
def test_a_malformed_url_is_a_config_error_that_shows_the_form(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(write_config(tmp_path, ledger={"url": url}))
    assert "postgresql://USER@HOST:PORT/DATABASE" in str(raised.value)


def test_a_password_in_the_url_is_masked_in_errors_and_the_run_config(tmp_path: Path) -> None:
    url = f"mysql://alice:{PASSWORD}@db:3306/evals"
    with pytest.raises(ConfigError) as raised:
        load_config(write_config(tmp_path, ledger={"url": url}))
    assert PASSWORD not in str(raised.value) and "***" in str(raised.value)
    config = load_config(write_config(tmp_path, ledger={"url": f"postgresql://alice:{PASSWORD}@db:5432/evals"}))
    assert config.to_dict()["ledger"] == {"url": "postgresql://***@db:5432/evals"}


def test_the_environment_names_the_ledger_and_the_config_overrides_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_server: PostgresServer, postgres_url: str) -> None:
    monkeypatch.setenv(ENV_VAR, postgres_url)
    config = load_config(write_config(tmp_path))
    assert resolve_ledger_url(config.ledger) == postgres_url
    ledger = open_ledger(config, loggers=["jsonl"])
    try:
        assert ledger.register([5, 7]) == [5, 7]
    finally:
        ledger.close()
    database = postgres_url.rsplit("/", 1)[1]
    stored = postgres_server.sql("SELECT string_agg(step::text, ',' ORDER BY step) FROM steps", database=database)
    assert stored == "5,7"
    assert not (tmp_path / "out" / "ledger.sqlite").exists()
    # The config's URL wins over the environment's (which now names a port nobody listens on).
    monkeypatch.setenv(ENV_VAR, f"postgresql://tracker@127.0.0.1:{free_port()}/nowhere")
    config = load_config(write_config(tmp_path, ledger={"url": postgres_url}))
    assert resolve_ledger_url(config.ledger) == postgres_url
    open_ledger(config, loggers=["jsonl"]).close()


def test_a_malformed_url_in_the_environment_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ENV_VAR, f"https://alice:{PASSWORD}@db/evals")
    code, _, err = run_cli(capsys, "retry", "--config", str(write_config(tmp_path)))
    assert code == 2
    assert err.count("\n") == 1 and ENV_VAR in err and "not a PostgreSQL URL" in err
    assert PASSWORD not in err


def _one_line_exit_2(capsys: pytest.CaptureFixture[str], config: Path, url: str, *, command: str = "retry") -> str:
    code, out, err = run_cli(capsys, command, "--config", str(config), f"ledger.url={url}")
    assert code == 2, (out, err)
    assert err.startswith("tracker-eval: error: ") and err.count("\n") == 1, err
    assert PASSWORD not in out + err
    return err


def test_an_unreachable_server_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql://tracker:{PASSWORD}@127.0.0.1:{free_port()}/evals"
    for command in ("retry", "status"):
        err = _one_line_exit_2(capsys, write_config(tmp_path), url, command=command)
        assert "cannot reach the ledger database postgresql://***@127.0.0.1:" in err or \
            "cannot read" in err, err
        assert "start the server" in err or "server runs" in err, err


def test_a_missing_database_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               postgres_server: PostgresServer) -> None:
    err = _one_line_exit_2(capsys, write_config(tmp_path), postgres_server.url_of("no_such_db"))
    assert "does not exist" in err and "createdb" in err, err


def test_a_wrong_password_is_one_line_exit_2_and_never_printed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_server: PostgresServer, postgres_url: str) -> None:
    postgres_server.sql(f"CREATE ROLE wrongpw LOGIN PASSWORD '{PASSWORD}x'")
    database = postgres_url.rsplit("/", 1)[1]
    err = _one_line_exit_2(capsys, write_config(tmp_path), postgres_server.url_of(database, user="wrongpw",
                                                                                   password=PASSWORD))
    assert "refused the user" in err and "PGPASSWORD" in err and "***" in err, err


def test_a_password_in_the_url_logs_in(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       postgres_server: PostgresServer, postgres_url: str) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    postgres_server.sql(f"CREATE ROLE owner_pw LOGIN PASSWORD '{PASSWORD}'; "
                        f'ALTER DATABASE "{database}" OWNER TO owner_pw', database=database)
    postgres_server.sql("ALTER SCHEMA public OWNER TO owner_pw", database=database)
    url = postgres_server.url_of(database, user="owner_pw", password=PASSWORD)
    code, out, err = run_cli(capsys, "retry", "--config", str(write_config(tmp_path)), f"ledger.url={url}")
    assert code == 0, err
    assert "nothing to re-queue" in out and PASSWORD not in out + err
    assert postgres_server.sql("SELECT tableowner FROM pg_tables WHERE tablename = 'steps'", database=database) \
        == "owner_pw"


def test_a_user_that_may_not_create_the_tables_is_one_line_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_server: PostgresServer, postgres_url: str) -> None:
    postgres_server.sql(f"CREATE ROLE nocreate LOGIN PASSWORD '{PASSWORD}'")
    database = postgres_url.rsplit("/", 1)[1]
    err = _one_line_exit_2(capsys, write_config(tmp_path),
                           postgres_server.url_of(database, user="nocreate", password=PASSWORD))
    assert "may not create the ledger's tables" in err and "GRANT CREATE ON SCHEMA public" in err, err
    assert "run tracker-eval with the owner's URL" in err, err  # the superuser's name "tracker" is no secret


def test_a_user_that_may_only_read_cannot_watch_but_can_see_status_and_health(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_server: PostgresServer, postgres_url: str) -> None:
    config = write_config(tmp_path)
    ledger = open_ledger(load_config(config, overrides=[f"ledger.url={postgres_url}"]), loggers=["jsonl"])
    try:
        ledger.register([10, 20])
        ledger.touch_heartbeat("watcher-1")
    finally:
        ledger.close()
    database = postgres_url.rsplit("/", 1)[1]
    postgres_server.sql(f"CREATE ROLE reader LOGIN PASSWORD '{PASSWORD}'; "
                        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader", database=database)
    reader = postgres_server.url_of(database, user="reader", password=PASSWORD)
    err = _one_line_exit_2(capsys, config, reader)
    assert "may not write the ledger" in err and "GRANT SELECT, INSERT, UPDATE, DELETE" in err, err
    before = postgres_server.sql("SELECT string_agg(step || ':' || state, ',' ORDER BY step) FROM steps",
                                 database=database)
    code, out, err = run_cli(capsys, "status", "--config", str(config), "--json", f"ledger.url={reader}")
    assert code == 0, err
    assert [row["step"] for row in json.loads(out)["steps"]] == [10, 20]
    code, out, err = run_cli(capsys, "status", "--config", str(config), "--health", f"ledger.url={reader}")
    assert code == 0 and out.startswith("healthy: last watcher heartbeat"), (out, err)
    assert postgres_server.sql("SELECT string_agg(step || ':' || state, ',' ORDER BY step) FROM steps",
                               database=database) == before == "10:pending,20:pending"


def test_libpq_settings_apply_pgpassword_and_server_options_in_the_url(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        postgres_server: PostgresServer, postgres_url: str) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    postgres_server.sql(f"CREATE ROLE libpq_user LOGIN PASSWORD '{PASSWORD}'; CREATE SCHEMA evals AUTHORIZATION "
                        "libpq_user", database=database)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # not in the URL: libpq reads it
    url = postgres_server.url_of(database, user="libpq_user") + "?options=-csearch_path%3Devals"
    config = write_config(tmp_path)
    ledger = open_ledger(load_config(config, overrides=[f"ledger.url={url}"]), loggers=["jsonl"])
    try:
        assert ledger.register([3]) == [3]
    finally:
        ledger.close()
    # The URL's server options chose the schema, for the writer and for the read-only status alike.
    assert postgres_server.sql("SELECT schemaname FROM pg_tables WHERE tablename = 'steps'", database=database) \
        == "evals"
    code, out, err = run_cli(capsys, "status", "--config", str(config), "--json", f"ledger.url={url}")
    assert code == 0, err
    assert [row["step"] for row in json.loads(out)["steps"]] == [3]
