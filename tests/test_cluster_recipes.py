"""Cluster recipes in configs/cluster/: every file parses, the fields that matter are wired right, and
the SLURM script's own srun command runs as two JAX processes on loopback."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "configs" / "cluster"
SBATCH = CLUSTER / "slurm_watch.sbatch"
WATCH_CONFIG = CLUSTER / "watch.yaml"
IMAGE_CONFIG = "/config/watch.yaml"
IMAGE_UID = 10001
HEALTH_COMMAND = ["tracker-eval", "status", "--config", IMAGE_CONFIG, "--health"]
SECRET_WORDS = ("KEY", "TOKEN", "PASSWORD", "SECRET")
VENV_BIN = pathlib.Path(sys.executable).parent


def _documents(name: str) -> list[dict[str, Any]]:
    with open(CLUSTER / name) as f:
        docs = [doc for doc in yaml.safe_load_all(f) if doc is not None]
    assert docs, f"{name} holds no YAML document"
    return docs


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['kind'] for d in docs]}"
    return found[0]


def _pod_templates(doc: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    if doc["kind"] == "Deployment":
        yield doc["metadata"]["name"], doc["spec"]["template"]
    elif doc["kind"] == "JobSet":
        for rjob in doc["spec"]["replicatedJobs"]:
            yield rjob["name"], rjob["template"]["spec"]["template"]


def _sbatch_options() -> dict[str, str]:
    options = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").strip().partition("=")
            options[key] = value
    return options


def _srun_argv() -> list[str]:
    """The srun line of the script (continuations joined), split as the shell would."""
    text = SBATCH.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.strip().startswith("srun ")]
    assert len(lines) == 1, f"expected one srun line in {SBATCH.name}, got {lines}"
    return shlex.split(lines[0])


def _command_after_srun(argv: list[str]) -> list[str]:
    """What srun starts on every task: everything from the first word that is not an srun option."""
    assert argv[0] == "srun"
    rest = argv[1:]
    while rest and rest[0].startswith("-"):
        rest = rest[1:]
    return rest


def _expand(word: str, values: Mapping[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in values, f"the srun line uses ${{{name}}}, which the test does not set"
        return values[name]

    return re.sub(r"\$\{(\w+)\}", sub, word)


def test_watch_config_loads_with_every_recipe_override():
    from tracker_eval.config import load_config

    config = load_config(WATCH_CONFIG)
    assert config.checkpoint_dir == "/checkpoints" and config.output_dir == "/output"
    assert config.distributed is None, "the file must stay single-process; recipes add distributed.*"
    types = [spec["type"] for spec in config.loggers]
    assert {"wandb", "mlflow", "jsonl"} <= set(types)
    text = WATCH_CONFIG.read_text()
    assert not re.search(r"(api_key|password|token)\s*:", text, re.I), "secrets belong in the environment"
    slurm = load_config(WATCH_CONFIG, overrides=["distributed.auto=true", "checkpoint_dir=/c", "output_dir=/o"])
    assert slurm.distributed is not None and slurm.distributed.auto
    mlflow = next(spec for spec in slurm.loggers if spec["type"] == "mlflow")
    assert mlflow["tracking_uri"] == "sqlite:////o/mlflow.db", "the default MLflow store must follow output_dir"


def test_sbatch_requests_one_task_per_gpu_and_runs_the_watcher():
    options = _sbatch_options()
    assert int(options["--nodes"]) >= 2
    assert options["--ntasks-per-node"] == options["--gpus-per-node"], (
        "JAX restricts each SLURM task to GPU number SLURM_LOCALID: one task per GPU"
    )
    assert "--gpus-per-task" not in options
    assert options.get("--signal", "").startswith("TERM@"), "a time limit should stop the watcher with SIGTERM"
    argv = _srun_argv()
    assert "--kill-on-bad-exit=1" in argv
    command = _command_after_srun(argv)
    assert command[:4] == ["tracker-eval", "watch", "--config", "${TRACKER_EVAL_CONFIG}"]
    assert "distributed.auto=true" in command[4:]
    assert "checkpoint_dir=${CHECKPOINT_DIR}" in command and "output_dir=${OUTPUT_DIR}" in command
    text = SBATCH.read_text()
    assert 'configs/cluster/watch.yaml}"' in text, "the default config must be the one the other recipes mount"
    assert not re.search(r"^\s*(export\s+)?\w*(KEY|TOKEN|PASSWORD|SECRET)\w*=", text, re.M)
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, timeout=10)


def _check_pod_template(where: str, template: Mapping[str, Any], *, checkpoint_volume: bool = True) -> dict[str, Any]:
    spec = template["spec"]
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == IMAGE_UID, where
    [container] = spec["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
    assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
    resources = container["resources"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"], where
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    if checkpoint_volume:
        checkpoints = mounts["/checkpoints"]
        assert checkpoints.get("readOnly") is True, f"{where}: the checkpoint mount must be read-only"
        assert volumes[checkpoints["name"]]["persistentVolumeClaim"]["readOnly"] is True, where
    config = mounts["/config"]
    assert config.get("readOnly") is True and "configMap" in volumes[config["name"]], where
    for path in ("/output", "/tmp", "/home/tracker"):
        assert path in mounts and not mounts[path].get("readOnly"), f"{where}: {path} must be writable"
    command = " ".join([*container.get("command", []), *container.get("args", [])])
    assert re.search(rf"tracker-eval\s+watch\s+--config\s+{IMAGE_CONFIG}(\s|$)", command), f"{where}: {command}"
    for env in container.get("env", []):
        if any(word in env["name"] for word in SECRET_WORDS):
            assert "value" not in env, f"{where}: {env['name']} must come from a Secret, not a literal"
            assert env["valueFrom"]["secretKeyRef"]["name"], where
    return container


def test_k8s_watcher_is_one_non_root_pod_with_a_persistent_ledger():
    docs = _documents("k8s_watcher.yaml")
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "two watchers must never share one ledger"
    [(where, template)] = list(_pod_templates(deployment))
    assert template["spec"]["restartPolicy"] == "Always"
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert labels.items() <= template["metadata"]["labels"].items()
    container = _check_pod_template(where, template)
    assert container["livenessProbe"]["exec"]["command"] == HEALTH_COMMAND
    assert container["startupProbe"]["exec"]["command"] == HEALTH_COMMAND
    secret_envs = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD"} <= secret_envs
    output = next(v for v in template["spec"]["volumes"] if v["name"] == "output")
    claim = _one(docs, "PersistentVolumeClaim")
    assert output["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_k8s_gcs_watcher_reads_the_bucket_with_workload_identity_and_no_checkpoint_volume(monkeypatch):
    from tracker_eval.config import load_config

    docs = _documents("k8s_watcher_gcs.yaml")
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "two watchers must never share one ledger"
    [(where, template)] = list(_pod_templates(deployment))
    container = _check_pod_template(where, template, checkpoint_volume=False)
    spec = template["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [_one(docs, "PersistentVolumeClaim")["metadata"]["name"]], "only the ledger needs a volume"
    assert "/checkpoints" not in {m["mountPath"] for m in container["volumeMounts"]}
    # Workload identity: the pod runs as a service account bound to a Google service account.
    account = _one(docs, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    env = {e["name"]: e for e in container["env"]}
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in env, "workload identity needs no key file"
    # The watcher and its probes (which inherit the container's environment) load the same config
    # with the bucket as checkpoint_dir, so status --health reads the watcher's own stream.
    monkeypatch.setenv("CHECKPOINT_DIR", env["CHECKPOINT_DIR"]["value"])
    config = load_config(WATCH_CONFIG, overrides=container["args"][3:])
    assert config.checkpoint_dir.startswith("gs://") and config.output_dir == "/output"
    assert container["livenessProbe"]["exec"]["command"] == HEALTH_COMMAND
    assert container["startupProbe"]["exec"]["command"] == HEALTH_COMMAND
    secret_envs = {name for name, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD"} <= secret_envs


def _shell_words(command: str, env: Mapping[str, str]) -> list[str]:
    """The argv that `sh -c command` would exec, with the given environment."""
    assert command.startswith("exec tracker-eval ")
    probe = "printf '%s\\n' " + command.removeprefix("exec tracker-eval ")
    out = subprocess.run(["sh", "-c", probe], env=dict(env, PATH=os.environ["PATH"]), capture_output=True,
                         text=True, check=True, timeout=10)
    return out.stdout.splitlines()


def test_k8s_multihost_jobset_wires_coordinator_and_process_ids():
    from tracker_eval.config import load_config

    docs = _documents("k8s_multihost_jobset.yaml")
    jobset = _one(docs, "JobSet")
    subdomain = jobset["spec"].get("network", {}).get("subdomain", jobset["metadata"]["name"])
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    rjobs = {r["name"]: r for r in jobset["spec"]["replicatedJobs"]}
    assert set(rjobs) == {"leader", "workers"} and rjobs["leader"]["replicas"] == 1
    leader_job = rjobs["leader"]["template"]["spec"]
    assert leader_job["completions"] == leader_job["parallelism"] == 1
    worker_job = rjobs["workers"]["template"]["spec"]
    assert worker_job["completionMode"] == "Indexed"
    assert worker_job["completions"] == worker_job["parallelism"]
    assert rjobs["workers"]["replicas"] == 1, "process ids come from one indexed worker Job"
    total = 1 + worker_job["completions"]
    coordinator = f"{jobset['metadata']['name']}-leader-0-0.{subdomain}"
    claim = _one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    seen_ids = []
    for where, template in _pod_templates(jobset):
        container = _check_pod_template(where, template)
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        assert int(env["NUM_PROCESSES"]) == total, f"{where}: NUM_PROCESSES must be 1 + worker completions"
        [command] = container["args"]
        indexes = range(1) if where == "leader" else range(worker_job["completions"])
        for index in indexes:
            argv = _shell_words(command, dict(env, JOB_COMPLETION_INDEX=str(index)))
            assert argv[:3] == ["watch", "--config", IMAGE_CONFIG]
            config = load_config(WATCH_CONFIG, overrides=argv[3:])
            dist = config.distributed
            assert dist is not None and not dist.auto and dist.num_processes == total
            host, _, port = dist.coordinator_address.rpartition(":")
            assert host == coordinator, f"{where}: {host} is not the leader pod's DNS name {coordinator}"
            seen_ids.append(dist.process_id)
        output = next(v for v in template["spec"]["volumes"] if v["name"] == "output")
        if where == "leader":
            assert {"containerPort": int(port), "name": "coordinator"}.items() <= container["ports"][0].items()
            assert output["persistentVolumeClaim"]["claimName"] == claim, "process 0's ledger must persist"
            assert container["livenessProbe"]["exec"]["command"] == HEALTH_COMMAND
        else:
            assert "emptyDir" in output, "only process 0 writes output; workers must not claim the ledger PVC"
        assert template["spec"]["restartPolicy"] in ("Never", "OnFailure")
    assert sorted(seen_ids) == list(range(total)), f"process ids {seen_ids} must be 0..{total - 1} once each"
    assert jobset["spec"]["successPolicy"]["targetReplicatedJobs"] == ["leader"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from tracker_eval.tasks.train import train_classifier

    directory = tmp_path_factory.mktemp("slurm") / "checkpoints"
    train_classifier(directory, steps=20, save_every=10)
    assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == [10, 20]
    return directory


def _free_slurm_port() -> int:
    """A free port in the range JAX derives from SLURM_JOB_ID (61440 + job id % 4096)."""
    for port in range(61440 + os.getpid() % 2048, 65536):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 61440..65535")


def _slurm_env(*, proc_id: int, ntasks: int, job_id: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}",
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NODELIST="127.0.0.1",
        SLURM_STEP_NODELIST="127.0.0.1",
        SLURM_STEP_NUM_NODES="1",
        SLURM_NTASKS=str(ntasks),
        SLURM_PROCID=str(proc_id),
        SLURM_LOCALID=str(proc_id),
        SLURM_NODEID="0",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_slurm_srun_command_runs_two_processes_on_loopback(tmp_path, checkpoints):
    """The script's srun command, unchanged, on 2 tasks of a 1-node 'allocation' on 127.0.0.1.

    Only the stop condition is added (watch.until_step) plus short distributed timeouts, so a
    process that cannot join fails in seconds instead of minutes.
    """
    output = tmp_path / "output"
    values = {"TRACKER_EVAL_CONFIG": str(WATCH_CONFIG), "CHECKPOINT_DIR": str(checkpoints),
              "OUTPUT_DIR": str(output)}
    command = [_expand(word, values) for word in _command_after_srun(_srun_argv())]
    command += ["watch.until_step=20", "watch.idle_timeout_s=120", "watch.poll_interval_s=1",
                "distributed.initialization_timeout_s=60", "distributed.heartbeat_timeout_s=20"]
    port = _free_slurm_port()
    job_id = 4096 * 100 + (port - 61440)
    procs = []
    logs = []
    try:
        for proc_id in range(2):
            log = open(tmp_path / f"task{proc_id}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(command, env=_slurm_env(proc_id=proc_id, ntasks=2, job_id=job_id),
                                          stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
        deadline = time.monotonic() + 300
        codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
    assert codes == [0, 0], f"exit codes {codes}\n--- task 0\n{texts[0][-4000:]}\n--- task 1\n{texts[1][-4000:]}"
    for proc_id, text in enumerate(texts):
        assert f"process {proc_id} of 2 joined" in text, f"task {proc_id} did not join a 2-process runtime"
        assert "evaluating step 20" in text, f"task {proc_id} did not take part in evaluating step 20"
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(line["step"] for line in lines) == [10, 20], "each step once: only process 0 writes results"
    assert "eval step" not in texts[1], "process 1 must not report results"
    status_env = _slurm_env(proc_id=0, ntasks=1, job_id=job_id)
    overrides = [f"checkpoint_dir={checkpoints}", f"output_dir={output}"]
    status = subprocess.run(["tracker-eval", "status", "--config", str(WATCH_CONFIG), "--json", *overrides],
                            env=status_env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert {s["step"]: s["state"] for s in doc["steps"]} == {10: "delivered", 20: "delivered"}, doc
    for s in doc["steps"]:
        assert set(s["deliveries"].values()) == {"delivered"}, s
    health = [word if word != IMAGE_CONFIG else str(WATCH_CONFIG) for word in HEALTH_COMMAND]
    healthy = subprocess.run([*health, *overrides], env=status_env, capture_output=True, text=True, timeout=120)
    assert healthy.returncode == 0, f"a watcher that just ran should be healthy: {healthy.stdout}{healthy.stderr}"


def test_k8s_postgres_watchers_are_three_replicas_with_the_ledger_url_from_a_secret_and_no_volume(monkeypatch):
    from tracker_eval.config import load_config, resolve_ledger_url

    docs = _documents("k8s_watchers_postgres.yaml")
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    [(where, template)] = list(_pod_templates(deployment))
    container = _check_pod_template(where, template, checkpoint_volume=False)
    spec = template["spec"]
    assert not [v for v in spec["volumes"] if "persistentVolumeClaim" in v], "no pod may need a disk of its own"
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == "output")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    env = {e["name"]: e for e in container["env"]}
    assert env["TRACKER_EVAL_LEDGER_URL"]["valueFrom"]["secretKeyRef"]["key"] == "TRACKER_EVAL_LEDGER_URL"
    assert container["livenessProbe"]["exec"]["command"] == HEALTH_COMMAND
    # The pods and their probes load the shipped config onto the PostgreSQL ledger the Secret names.
    monkeypatch.setenv("CHECKPOINT_DIR", env["CHECKPOINT_DIR"]["value"])
    monkeypatch.setenv("TRACKER_EVAL_LEDGER_URL", "postgresql://evals:hunter2@db:5432/evals?sslmode=require")
    config = load_config(WATCH_CONFIG, overrides=container["args"][3:])
    assert resolve_ledger_url(config.ledger).startswith("postgresql://")


def test_slurm_job_array_runs_one_watcher_per_task_on_the_shared_ledger(tmp_path):
    path = CLUSTER / "slurm_watch_array.sbatch"
    options = {}
    for line in path.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").strip().partition("=")
            options[key] = value
    assert re.fullmatch(r"\d+-\d+", options["--array"]) and options["--ntasks"] == "1"
    assert options["--signal"].startswith("TERM@")
    # Without the ledger URL the script stops at once with a line naming it (no watcher on a private SQLite file).
    env = {"PATH": os.environ["PATH"], "CHECKPOINT_DIR": str(tmp_path), "SLURM_SUBMIT_DIR": str(ROOT)}
    done = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0 and "TRACKER_EVAL_LEDGER_URL" in done.stderr, done.stderr
    # With it, srun gets one watcher whose output_dir is the task's own.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$SRUN_ARGS\"\n")
    (fake / "srun").chmod(0o755)
    args_file = tmp_path / "srun-args"
    env.update(PATH=f"{fake}:{os.environ['PATH']}", SRUN_ARGS=str(args_file), SLURM_ARRAY_JOB_ID="77",
               SLURM_ARRAY_TASK_ID="2", TMPDIR=str(tmp_path), TRACKER_EVAL_LEDGER_URL="postgresql://evals@db:5432/e")
    done = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    argv = args_file.read_text().splitlines()
    assert argv[argv.index("tracker-eval"):argv.index("tracker-eval") + 2] == ["tracker-eval", "watch"]
    assert f"output_dir={tmp_path}/tracker-eval-77-2" in argv and f"checkpoint_dir={tmp_path}" in argv
