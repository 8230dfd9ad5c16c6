"""The Dockerfile without a Docker engine: hadolint finds nothing, the required instructions are there,
no secret is baked in, and the build stage's own RUN lines rebuild the image's Python environment
in a fresh virtualenv, from the build context that .dockerignore lets through."""

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
from collections.abc import Iterator, Mapping

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
                                  "configs/watch.yaml", "build/lib/x.py"])
def test_dockerignore_keeps_out(path):
    assert dockerignore_excludes(path, _dockerignore())


@pytest.mark.parametrize("path", ["requirements.lock", "pyproject.toml", "tracker_eval/cli.py",
                                  "tracker_eval/loggers/jsonl.py", "integrations/wandb/pyproject.toml",
                                  "integrations/mlflow/tracker_eval_mlflow/logger.py"])
def test_dockerignore_lets_through(path):
    assert not dockerignore_excludes(path, _dockerignore())


def _context_files(source: pathlib.Path, patterns: list[str]) -> Iterator[pathlib.Path]:
    if source.is_file():
        yield source
        return
    for path in sorted(source.rglob("*")):
        if path.is_file() and not dockerignore_excludes(path.relative_to(ROOT).as_posix(), patterns):
            yield path


class BuildStage:
    """Replays the build stage's ARG/ENV/WORKDIR/COPY/RUN here, with the image's absolute paths mapped
    under a temporary root. RUN lines run with sh, exactly as written, with the machine's pip config."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.patterns = _dockerignore()
        base = pathlib.Path(os.path.realpath(sys.executable))
        tools = root / "tools"
        tools.mkdir(parents=True)
        (tools / "python").symlink_to(base)  # the base interpreter, as in the python image
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        env["PATH"] = f"{tools}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin"
        self.env = env
        self.workdir = root

    def map(self, text: str) -> str:
        return re.sub(r"(?<![\w./-])/(opt|src)\b", lambda m: f"{self.root}/{m.group(1)}", text)

    def run(self, stage: list[Instruction]) -> None:
        for instruction in stage[1:]:
            handler = getattr(self, f"do_{instruction.keyword.lower()}")
            handler(instruction.value)

    def do_arg(self, value: str) -> None:
        for key, default in parse_assignments(value).items():
            self.env.setdefault(key, default)

    def do_env(self, value: str) -> None:
        for key, val in parse_assignments(self.map(value)).items():
            self.env[key] = expand(val, self.env)

    def do_workdir(self, value: str) -> None:
        self.workdir = pathlib.Path(self.map(value))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def do_copy(self, value: str) -> None:
        *sources, dest = shlex.split(value)
        assert not any(s.startswith("--") for s in sources), f"COPY {value}: flags are not replayed"
        target = (self.workdir / self.map(dest)).resolve()
        for source in sources:
            src = ROOT / source
            assert src.exists(), f"COPY {source}: not in the repository"
            kept = not dockerignore_excludes(source.strip("./"), self.patterns)
            assert kept, f"COPY {source}: .dockerignore drops it"
            for path in _context_files(src, self.patterns):
                rel = path.relative_to(src) if src.is_dir() else pathlib.Path(path.name)
                out = target / rel if (src.is_dir() or dest.endswith("/")) else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)

    def do_run(self, value: str) -> None:
        proc = subprocess.run(["sh", "-c", self.map(value)], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"RUN {value}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The image's /opt/venv, built once per test session from the Dockerfile's build stage."""
    stage = BuildStage(tmp_path_factory.mktemp("image"))
    stage.run(_stage("build"))
    venv = stage.root / "opt" / "venv"
    assert (venv / "bin" / "tracker-eval").exists(), "the build stage did not install the console script"
    return venv


def _normalized(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '-', name).lower()}=={version}"


def test_image_environment_matches_the_lock_and_runs(image_venv, tmp_path):
    python = image_venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{image_venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
    lock = {_normalized(line.strip()) for line in (ROOT / "requirements.lock").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], env=env,
                            capture_output=True, text=True, timeout=120, check=True).stdout
    packages = json.loads(listed)
    installed = {_normalized(f"{p['name']}=={p['version']}") for p in packages}
    assert lock <= installed, f"not installed as locked: {sorted(lock - installed)}"
    ours = {"tracker-eval==0.1.0", "tracker-eval-wandb==0.1.0", "tracker-eval-mlflow==0.1.0",
            "tracker-eval-tensorboard==0.1.0", "tracker-eval-lm-harness==0.1.0"}
    bootstrap = {v for v in installed if v.split("==")[0] in ("pip", "setuptools", "wheel")}
    assert installed - lock - bootstrap == ours, f"installed beyond the lock: {sorted(installed - lock - bootstrap)}"
    editable = [p["name"] for p in packages if p.get("editable_project_location")]
    assert not editable, f"the image installs packages, not editable links: {editable}"
    helped = subprocess.run([str(image_venv / "bin" / "tracker-eval"), "--help"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    for command in ("eval", "watch", "status", "demo"):
        assert re.search(rf"\b{command}\b", helped.stdout), f"{command} missing from --help:\n{helped.stdout}"
    probe = (
        "import importlib.metadata as m, pathlib, tracker_eval, tracker_eval_wandb, tracker_eval_mlflow;"
        "import tracker_eval_tensorboard, tracker_eval_lm_harness as h;"
        "print(sorted(e.name for e in m.entry_points(group='tracker_eval.loggers')));"
        "print(sorted(e.name for e in m.entry_points(group='tracker_eval.suites')));"
        "print(sorted(p.name for p in (pathlib.Path(h.__file__).parent / 'pydoc_tasks').glob('*.[py]*')));"
        "print(tracker_eval.__file__)"
    )
    shown = subprocess.run([str(python), "-c", probe], env=env, capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    names, suites, shipped_tasks, location = shown.stdout.splitlines()
    assert names == str(["console", "jsonl", "mlflow", "tensorboard", "wandb"])
    assert suites == str(["lm_harness"])
    assert shipped_tasks == str(["data.py", "pydoc.yaml", "pydoc_cloze.yaml", "pydoc_gen.yaml", "pydoc_ppl.yaml"])
    assert pathlib.Path(location).is_relative_to(image_venv), f"tracker_eval imported from {location}"


def test_image_healthcheck_reports_unhealthy_without_a_watcher(image_venv, tmp_path):
    """The HEALTHCHECK command, run from the image's environment, on an output dir no watcher used."""
    (tmp_path / "checkpoints").mkdir()
    config = tmp_path / "watch.yaml"
    config.write_text((ROOT / "configs" / "cluster" / "watch.yaml").read_text())
    final = _stage(None)
    command = _exec_form(_one(final, "HEALTHCHECK").value.split(" CMD ", 1)[1])
    command = [str(config) if word == IMAGE_CONFIG else word for word in command]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{image_venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
    proc = subprocess.run([*command, f"checkpoint_dir={tmp_path / 'checkpoints'}", f"output_dir={tmp_path / 'out'}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "unhealthy" in proc.stdout, proc.stdout + proc.stderr
