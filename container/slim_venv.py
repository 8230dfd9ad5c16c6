"""Trims the image's virtualenv to what a container runs (the Dockerfile's build stage calls it).

Two things dominate a venv beside the libraries themselves, and a watcher container needs neither
in full:

- Bytecode. pip compiles every module it installs (330 MB here, most of it for code a watcher never
  imports: the MLflow server, pandas' and scipy's corners). Without bytecode each start compiles what
  it imports again (a read-only root cannot cache it): jax, flax, orbax, mlflow and wandb took 12.7 s
  to import that way against 3.8 s with bytecode. So the build installs with `--no-compile`, and this
  script imports the runtime path (every module of tracker-eval and its plug-ins, then what they load
  lazily on the way to an evaluation and a delivery) and writes bytecode for exactly those modules.
- Test suites and C headers that numpy, scipy, pandas, matplotlib, scikit-learn and pyarrow ship
  inside their packages (54 MB), and build sources and type stubs elsewhere (17 MB). Nothing imports
  them at run time.

    python container/slim_venv.py    # with the venv's python, after every `pip install`
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pathlib
import pkgutil
import py_compile
import shutil
import sys
import sysconfig

SITE = pathlib.Path(sysconfig.get_paths()["purelib"])
# Packages whose wheels carry their own test suites (and headers for building against them).
PRUNED = ("numpy", "scipy", "pandas", "matplotlib", "sklearn", "pyarrow")
PRUNED_DIRS = ("tests", "include")
OURS = ("tracker_eval", "tracker_eval_wandb", "tracker_eval_mlflow", "tracker_eval_tensorboard",
        "tracker_eval_lm_harness")
# Loaded only on first use (inside a function, or by a tracker's own lazy loader): an evaluation,
# the MLflow client on a server or a sqlite store, W&B's run, the harness' evaluator.
# lm-eval's evaluator and task registry (800 modules, 19 MB of bytecode with datasets and pandas)
# are left to compile at the start of a harness suite: it runs for minutes, they take seconds.
LAZY = (
    "jax", "jax.numpy", "jax.experimental.multihost_utils", "flax.linen", "flax.training.train_state",
    "orbax.checkpoint", "optax", "tensorstore", "mlflow", "mlflow.tracking", "mlflow.store.tracking.rest_store",
    "mlflow.store.tracking.sqlalchemy_store", "wandb", "wandb.sdk.wandb_run", "tensorboard.compat.proto.event_pb2",
    "psycopg", "gcsfs",
)
# Sources for building against a package (C, C++, Cython) and type stubs: read by compilers and
# type checkers, never by the interpreter. jax and jaxlib keep theirs (`jax.ffi.include_dir()`).
SOURCE_SUFFIXES = (".c", ".cc", ".cpp", ".h", ".pyx", ".pxd", ".pyi")
KEEP_SOURCES = ("jax", "jaxlib")


def _remove_tree(directory: pathlib.Path) -> int:
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    shutil.rmtree(directory)
    return size


def prune() -> int:
    """Removes test suites, build sources, stubs and every bytecode file; returns the bytes removed."""
    removed = 0
    for package in PRUNED:
        for directory in sorted((SITE / package).rglob("*")):
            if directory.is_dir() and directory.name in PRUNED_DIRS and directory.exists():
                removed += _remove_tree(directory)
    for path in sorted(SITE.rglob("*")):
        top = path.relative_to(SITE).parts[0]
        if path.is_dir() and path.name == "__pycache__" and path.exists():
            removed += _remove_tree(path)  # pip's and setuptools' own, from `python -m venv`
        elif path.suffix in SOURCE_SUFFIXES and path.is_file() and top not in KEEP_SOURCES:
            removed += path.stat().st_size
            path.unlink()
    return removed


def import_runtime_path() -> None:
    for name in OURS:
        package = importlib.import_module(name)
        for module in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            if not module.name.endswith(".__main__"):  # importing it would run the command line
                importlib.import_module(module.name)
    for group in ("tracker_eval.loggers", "tracker_eval.suites"):
        for entry in importlib.metadata.entry_points(group=group):
            entry.load()
    for name in LAZY:
        importlib.import_module(name)


def compile_imported() -> int:
    written = 0
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if not source or not source.endswith(".py"):
            continue
        path = pathlib.Path(source)
        if SITE in path.parents:
            py_compile.compile(str(path), cfile=importlib.util.cache_from_source(str(path)), doraise=True)
            written += 1
    return written


def main() -> None:
    removed = prune()
    import_runtime_path()
    written = compile_imported()
    print(f"slim_venv: removed {removed / 1e6:.0f} MB of test suites, sources, stubs and bytecode; "
          f"bytecode for {written} imported modules")


if __name__ == "__main__":
    main()
