"""The Dockerfile read as text: hadolint finds nothing, the required instructions are there, no secret
is baked in, the wheelhouse is the only source when filled, and the cuda12 variant resolves against
the lock. The image itself is built by `make image` and run as a container by tests/image/."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = pathlib.Path(sys.executable).with_name("hadolint")
SECRET_WORDS = ("KEY", "TOKEN", "PASSWORD", "SECRET")
IMAGE_CONFIG = "/config/watch.yaml"


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by stage (index 0: before the first FROM), continuations joined."""
    stages: list[list[Instruction]] = [[]]
    logical = ""
    for line in text.splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if logical and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        keyword, _, value = logical.strip().partition(" ")
        instruction = Instruction(keyword.upper(), value.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
        logical = ""
    assert not logical, "the Dockerfile ends inside a continued line"
    return stages


def parse_assignments(value: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` / `ARG A=1` into a dict (an ARG without a default maps to '')."""
    out = {}
    for word in shlex.split(value):
        key, _, val = word.partition("=")
        out[key] = val
    return out


def expand(text: str, env: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


STAGES = parse_dockerfile(DOCKERFILE.read_text())


def _stage(name: str | None) -> list[Instruction]:
    for stage in STAGES[1:]:
        words = stage[0].value.split()
        named = len(words) == 3 and words[1].upper() == "AS" and words[2] == name
        if named or (name is None and stage is STAGES[-1]):
            return stage
    raise AssertionError(f"no stage {name!r} in the Dockerfile")


def _one(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the stage, got {found}"
    return found[0]


def _exec_form(value: str) -> list[str]:
    words = json.loads(value)
    assert isinstance(words, list), f"{value} is not an exec-form JSON array"
    return words


def test_hadolint_finds_nothing():
    proc = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    assert "hadolint ignore" not in DOCKERFILE.read_text(), "no rule may be silenced without a reason"


def test_runtime_stage_runs_the_watcher_as_a_fixed_non_root_user():
    final = _stage(None)
    args = {}
    for instruction in final:
        if instruction.keyword == "ARG":
            args.update(parse_assignments(instruction.value))
    user = expand(_one(final, "USER").value, args)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 10000 and gid == uid, f"USER {user!r}: a fixed numeric non-root uid"
    assert _exec_form(_one(final, "ENTRYPOINT").value) == ["tracker-eval"]
    assert _exec_form(_one(final, "CMD").value) == ["watch", "--config", IMAGE_CONFIG]
    assert _exec_form(_one(final, "VOLUME").value) == ["/output"]
    healthcheck = _one(final, "HEALTHCHECK").value
    command = healthcheck.split(" CMD ", 1)[1]
    assert _exec_form(command) == ["tracker-eval", "status", "--config", IMAGE_CONFIG, "--health"]
    env = {}
    for instruction in final:
        if instruction.keyword == "ENV":
            env.update(parse_assignments(instruction.value))
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["WANDB_DIR"].startswith("/output")
    assert env["MPLCONFIGDIR"] and env["HOME"]
    setup = " ".join(i.value for i in final if i.keyword == "RUN")
    assert re.search(r"useradd .*--uid \"?\$\{APP_UID\}", setup) and "chown tracker:tracker /output" in setup
    copied = [i.value for i in final if i.keyword == "COPY"]
    assert copied == ["--from=build /opt/venv /opt/venv"], "the runtime stage takes only the built venv"


def test_no_secret_has_a_value_in_the_dockerfile():
    for stage in STAGES:
        for instruction in stage:
            if instruction.keyword not in ("ENV", "ARG"):
                continue
            for key, value in parse_assignments(instruction.value).items():
                if any(word in key.upper() for word in SECRET_WORDS):
                    raise AssertionError(f"{instruction.keyword} {key} sets a secret-looking value {value!r}")
    text = DOCKERFILE.read_text()
    assert not re.search(r"(WANDB_API_KEY|MLFLOW_TRACKING_PASSWORD)=\S", text)


def test_build_installs_the_lock_file_then_the_packages_without_deps():
    runs = [i.value for i in _stage("build") if i.keyword == "RUN"]
    lock_installs = [r for r in runs if re.search(r"\bpip install\b.*-r requirements\.lock", r)]
    assert len(lock_installs) == 1, runs
    package_install = [r for r in runs if re.search(r"\bpip install\b.*--no-deps", r)]
    assert len(package_install) == 1, runs
    targets = [w for w in package_install[0].split("&&")[0].split() if not w.startswith("-")][2:]
    integrations = ["./integrations/lm_harness", "./integrations/mlflow", "./integrations/tensorboard",
                    "./integrations/wandb"]
    assert sorted(targets) == [".", *integrations], targets
    assert "-e" not in package_install[0].split(), "the image installs the packages, not editable links"
    cuda = [r for r in runs if "cuda12" in r]
    assert len(cuda) == 1 and "requirements.lock" in cuda[0] and "jax[cuda12]==" in cuda[0], runs
    assert "ARG ACCELERATOR=cpu" in DOCKERFILE.read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements.lock" in makefile, "make install and the image must read the same lock file"


def dockerignore_excludes(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches its files."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/HEAD", "runs/demo/x", "bench/results.json",
                                  "test-artifacts/a.png", "mlruns/0/meta.yaml", "tests/test_container.py",
                                  "tracker_eval/__pycache__/cli.cpython-311.pyc", "tracker_eval.egg-info/PKG-INFO",
                                  "integrations/wandb/tracker_eval_wandb.egg-info/PKG-INFO", ".pytest_cache/v",
                                  "configs/watch.yaml", "build/lib/x.py",
                                  "wheelhouse/.complete-cpu"])
def test_dockerignore_keeps_out(path):
    assert dockerignore_excludes(path, _dockerignore())


@pytest.mark.parametrize("path", ["requirements.lock", "pyproject.toml", "tracker_eval/cli.py",
                                  "tracker_eval/loggers/jsonl.py", "integrations/wandb/pyproject.toml",
                                  "integrations/mlflow/tracker_eval_mlflow/logger.py"])
def test_dockerignore_lets_through(path):
    assert not dockerignore_excludes(path, _dockerignore())


def test_cuda12_build_resolves_against_the_lock(tmp_path):
    """The Dockerfile's cuda12 RUN line, run as written with pip in dry-run mode against the package
    index: the CUDA plugin of the locked jax resolves, and every package it brings that the lock
    also names keeps the locked version (the CUDA image cannot run here without a GPU)."""
    runs = [i.value for i in _stage("build") if i.keyword == "RUN" and "cuda12" in i.value]
    assert len(runs) == 1, runs
    shutil.copy(ROOT / "requirements.lock", tmp_path / "requirements.lock")
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(ACCELERATOR="cuda12", PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               PIP_DRY_RUN="1", PIP_IGNORE_INSTALLED="1", PIP_REPORT=str(report), PIP_QUIET="1")
    proc = subprocess.run(["sh", "-c", runs[0]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    lock = dict(_normalized(line.strip()).split("==") for line in (ROOT / "requirements.lock").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert resolved["jax-cuda12-plugin"] == lock["jax"] == resolved["jax"], resolved
    differ = {name: (version, lock[name]) for name, version in resolved.items()
              if name in lock and lock[name] != version}
    assert not differ, f"the cuda12 build would move locked packages: {differ}"
    extra = sorted(name for name in resolved if name not in lock)
    assert extra and all(n.startswith(("nvidia-", "jax-cuda12-")) for n in extra), extra


def _normalized(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '-', name).lower()}=={version}"


def test_the_build_installs_from_a_filled_wheelhouse_alone():
    """`make wheelhouse` fills wheelhouse/; the build stage then turns the index off (no-index)."""
    runs = [i.value for i in _stage("build") if i.keyword == "RUN" and "-r requirements.lock" in i.value]
    assert len(runs) == 1 and "no-index = true" in runs[0] and "find-links = /wheelhouse" in runs[0], runs
    copies = [i.value for i in _stage("build") if i.keyword == "COPY"]
    assert "wheelhouse/ /wheelhouse/" in copies, copies
    lock_copy, wheel_copy = copies.index("requirements.lock ./"), copies.index("wheelhouse/ /wheelhouse/")
    assert lock_copy < wheel_copy < copies.index("tracker_eval ./tracker_eval"), copies
    assert not dockerignore_excludes("wheelhouse/jax-0.10.2-py3-none-any.whl", _dockerignore())
    tracked = subprocess.run(["git", "ls-files", "wheelhouse"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60).stdout.split()
    assert tracked == ["wheelhouse/README.md"], f"only the README of wheelhouse/ is in the repository: {tracked}"


def _tools_without_builders(tmp_path: pathlib.Path, *, podman_fails: bool) -> dict[str, str]:
    """PATH with the basic tools build.sh uses and no docker or podman (or a podman that cannot start)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sh", "env", "id", "date", "ls", "mkdir", "printf", "tail", "cat", "dirname"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    if podman_fails:
        fake = bin_dir / "podman"
        fake.write_text("#!/bin/sh\necho 'Error: cannot set up namespace: permission denied' >&2\nexit 125\n")
        fake.chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path)}


@pytest.mark.parametrize("podman_fails", [False, True])
def test_make_image_without_a_usable_builder_is_one_line_and_exit_2(tmp_path, podman_fails):
    env = _tools_without_builders(tmp_path, podman_fails=podman_fails)
    proc = subprocess.run(["bash", str(ROOT / "container" / "build.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make image: "), lines
    if not podman_fails:
        assert "no OCI builder: install docker" in lines[0] and "podman and buildah" in lines[0], lines
    elif os.geteuid() == 0:
        assert "podman cannot start: Error: cannot set up namespace: permission denied" in lines[0], lines
    else:
        assert "rootless podman needs entries for this user in /etc/subuid" in lines[0], lines


def test_make_image_names_a_wrong_accelerator(tmp_path):
    env = {**_tools_without_builders(tmp_path, podman_fails=False), "ACCELERATOR": "rocm"}
    proc = subprocess.run(["bash", str(ROOT / "container" / "build.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("make image: ACCELERATOR=rocm is not an image variant; use ACCELERATOR=cpu or "
                                   "ACCELERATOR=cuda12"), proc.stderr
