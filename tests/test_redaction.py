"""No credential in any text tracker-eval prints, logs or stores, wherever the credential was given.

Unit cases of `redact_text`, then the real commands: a watcher, `status` and `eval` with a tracking
URI that carries a password (a real MLflow client against a server that is down: its error text
quotes the URL), MLFLOW_TRACKING_TOKEN and WANDB_API_KEY in the environment, and a tracker that
fails quoting all of them. Every printed line and every file under output_dir is searched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from fixtures_gcs import free_port
from watcher_harness import EXE, WatcherProcess, child_env, ledger_rows, publish, write_config

from tracker_eval.redact import redact_text, remember_secrets

pytest_plugins = ["watcher_harness"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("API request to http://alice:s3cr3tpass@host:5000/api/2.0/x failed",
         "API request to http://***@host:5000/api/2.0/x failed"),
        ("401 (Authorization: Bearer abcdefgh12345678)", "401 (Authorization: Bearer ***)"),
        ("GET /graphql?api_key=k3y&x=1 and ?access_token=t0k", "GET /graphql?api_key=***&x=1 and ?access_token=***"),
        ("tokenizer=bytes, metric key=loss, token count 12", "tokenizer=bytes, metric key=loss, token count 12"),
    ],
)
def test_redact_text_masks_credentials_in_an_error_text(text, expected):
    assert redact_text(text) == expected


def test_redact_text_masks_secret_environment_values_and_remembered_config_secrets(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb0123456789")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a secret, though its name holds "token"
    remember_secrets({"loggers": [{"tracking_uri": "https://bob:pa%24%24word99@host"}, {"api_key": "plugin-key-1"}]})
    text = "key wandb0123456789, password pa$$word99, option plugin-key-1, parallelism false"
    assert redact_text(text) == "key ***, password ***, option ***, parallelism false"


def test_libpqs_password_variable_is_masked(monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "pg-secret-4711")
    assert redact_text("login with pg-secret-4711 failed") == "login with *** failed"


def test_a_database_urls_password_is_remembered_but_its_user_is_not():
    # The role name (here a common word) would otherwise be masked in every unrelated text.
    remember_secrets({"ledger": {"url": "postgresql://evaluator@db:5432/evals"}})
    remember_secrets({"ledger": {"url": "postgres://reporter:Ledger-pw-77@db/evals"}})
    text = "the evaluator process, the reporter role, password Ledger-pw-77"
    assert redact_text(text) == "the evaluator process, the reporter role, password ***"
    assert redact_text("postgresql://evaluator@db/evals") == "postgresql://***@db/evals"


_LOUD_PROCESS = """
import logging, sys, threading, warnings
from tracker_eval.logs import configure_logging
configure_logging(verbose=True)
url = sys.argv[1]
try:
    raise ConnectionError(f"API request to {url}/api failed")
except ConnectionError:
    logging.getLogger("mlflow.utils.rest_utils").exception("request to %s failed", url)
handler = logging.StreamHandler(sys.stderr)  # a library's own handler, as MLflow installs one
own = logging.getLogger("mlflow.own")
own.addHandler(handler)
own.propagate = False
own.error("retrying %s", url)
warnings.warn(f"cannot reach {url}", UserWarning, stacklevel=1)
worker = threading.Thread(target=lambda: (_ for _ in ()).throw(RuntimeError(f"lost {url}")), name="sender")
worker.start()
worker.join()
raise RuntimeError(f"giving up on {url}")
"""


def test_log_records_warnings_and_uncaught_errors_of_any_library_are_masked(tmp_path):
    secret = uuid.uuid4().hex
    proc = subprocess.run([sys.executable, "-c", _LOUD_PROCESS, f"http://alice:{secret}@127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60, env=child_env())
    said = proc.stdout + proc.stderr
    for line in ("request to http://***@127.0.0.1:1 failed", "ConnectionError: API request to http://***@127.0.0.1:1",
                 "retrying http://***@127.0.0.1:1", "cannot reach http://***@127.0.0.1:1",
                 "uncaught error in thread sender", "RuntimeError: lost http://***@127.0.0.1:1",
                 "RuntimeError: giving up on http://***@127.0.0.1:1"):
        assert line in said, said
    assert secret not in said, said


def test_no_credential_reaches_stderr_the_ledger_status_or_eval_output(tmp_path, source_checkpoints, monkeypatch):
    secrets = {name: f"{name.lower()}-{uuid.uuid4().hex}" for name in ("URL", "MLFLOW", "WANDB")}
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secrets["MLFLOW"])
    monkeypatch.setenv("WANDB_API_KEY", secrets["WANDB"])
    dead = f"http://alice:{secrets['URL']}@127.0.0.1:{free_port()}"  # nothing listens: every request fails
    config = write_config(
        tmp_path, watch={"poll_interval_s": 0.3, "until_step": 20, "max_delivery_attempts": 1, "outbox_wait_s": 2},
        loggers=[{"type": "jsonl"},
                 {"type": "mlflow", "id": "mlflow", "tracking_uri": dead, "timeout_s": 2, "max_retries": 0},
                 {"type": "failing_logger:CredentialEchoLogger", "id": "echo", "url": dead}])
    publish(source_checkpoints, tmp_path / "ckpts", 20)

    with WatcherProcess(config) as watcher:
        assert watcher.wait_exit(timeout=180) == 0, watcher.tail()
    deliveries = ledger_rows(tmp_path / "out")[20]["deliveries"]
    assert {name: d["state"] for name, d in deliveries.items()} == {
        "jsonl": "delivered", "mlflow": "pending", "echo": "undeliverable"}, deliveries
    printed = {"watch": watcher.text}

    status = _cli("status", "--config", str(config), "--json")
    errors = json.loads(status.stdout)["steps"][0]["delivery_errors"]
    # The errors are there, with what the trackers said, only the credentials masked.
    assert "API request to http://***@127.0.0.1" in errors["mlflow"], errors
    assert "api_key=*** failed: 401 Unauthorized (Authorization: Bearer ***); rejected key *** and token ***" in \
        errors["echo"], errors
    printed["status --json"] = status.stdout + status.stderr
    table = _cli("status", "--config", str(config))
    printed["status"] = table.stdout + table.stderr
    assert "step 20 -> echo: failed 1 times" in table.stdout, table.stdout
    for args in (["eval", "--config", str(config)], ["--verbose", "eval", "--config", str(config)]):
        evaluated = _cli(*args)
        assert evaluated.returncode == 0, evaluated.stderr
        assert "tracker-eval: warning: logger 'mlflow'" in evaluated.stderr, evaluated.stderr
        printed[" ".join(args[:2])] = evaluated.stdout + evaluated.stderr

    for secret in secrets.values():
        leaks = [where for where, text in printed.items() if secret in text]
        leaks += [str(p) for p in (tmp_path / "out").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not leaks, f"{secret[:6]}... appears in {leaks}"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=180, env=child_env())


def test_status_masks_a_credential_that_an_older_ledger_holds(tmp_path):
    """Ledgers written before error texts were masked may hold one; status shows it masked."""
    import numpy as np

    from tracker_eval.config import load_config
    from tracker_eval.evaluation.result import EvalResult
    from tracker_eval.identity import stream_hash
    from tracker_eval.ledger.steps import Ledger
    from tracker_eval.runners.status import collect_status

    (tmp_path / "ckpts" / "10").mkdir(parents=True)
    config = load_config(write_config(tmp_path, watch={}, loggers=[{"type": "jsonl"}]))
    secret = uuid.uuid4().hex
    with Ledger(config.output_dir, checkpoint_dir=config.checkpoint_dir, config_hash=stream_hash(config),
                loggers=["jsonl"]) as ledger:
        assert ledger.claim(10, owner="old")
        assert ledger.record_metrics(EvalResult(step=10, checkpoint="/ckpts/10", metrics={"loss": 0.5},
                                                per_example={"loss": np.ones(2)}), owner="old")
        with ledger._conn() as conn:  # as an older version stored it: unmasked
            conn.execute("UPDATE outbox SET last_error = ?", (f"API request to http://alice:{secret}@host failed",))
            conn.execute("UPDATE steps SET reason = ?", (f"token={secret}",))
    row = collect_status(config)["steps"][0]
    assert row["delivery_errors"] == {"jsonl": "API request to http://***@host failed"}
    assert row["reason"] == "token=***"
