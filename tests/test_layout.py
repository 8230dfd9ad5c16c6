"""The package layout: stages import only stages below them, and every folder says what it is.

Imports are read with `ast` (function-level imports included), so a lazy import that runs back up
the data path fails here as surely as a top-level one.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tracker_eval"

SHARED = "shared"  # top-level modules every stage may use
ENTRY = "entry"  # public entry points on top of everything
# What each folder may import besides itself: only folders below it on the data path.
ALLOWED = {
    SHARED: {SHARED},
    "checkpoints": {SHARED},
    "evaluation": {SHARED},
    "ledger": {SHARED, "evaluation"},
    "loggers": {SHARED, "evaluation"},
    "runners": {SHARED, "checkpoints", "evaluation", "ledger", "loggers"},
    "tasks": {SHARED, "evaluation"},
    "demo": {SHARED, "checkpoints", "evaluation", "ledger", "loggers", "runners", "tasks", ENTRY},
    ENTRY: {SHARED, "checkpoints", "evaluation", "ledger", "loggers", "runners", "tasks", "demo", ENTRY},
}
# Public entry points at the top level and the stage whose names they make public.
ENTRY_POINTS = {"tracker_eval": ENTRY, "tracker_eval.cli": ENTRY, "tracker_eval.metrics": "evaluation"}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _group(module: str) -> str:
    if module in ENTRY_POINTS:
        return ENTRY_POINTS[module]
    parts = module.split(".")
    folder = PACKAGE / parts[1]
    return parts[1] if folder.is_dir() and parts[1] != "config" else SHARED


def _imports(path: pathlib.Path, module: str) -> list[tuple[int, str]]:
    """(line, imported tracker_eval module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "tracker_eval":
                # `from tracker_eval import X`: X is a submodule or a lazily exported public name.
                for alias in node.names:
                    sub = f"tracker_eval.{alias.name}"
                    found.append((node.lineno, sub if (PACKAGE / alias.name).exists()
                                  or (PACKAGE / f"{alias.name}.py").exists() else "tracker_eval"))
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found if name == "tracker_eval" or name.startswith("tracker_eval.")]


MODULES = _modules()


def test_every_folder_is_a_documented_stage() -> None:
    for folder in sorted(p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = folder / "__init__.py"
        assert init.exists(), f"{folder} has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import:" in doc, f"{init} must say which stages it may import"
        if folder.name != "config":
            assert folder.name in ALLOWED, f"{folder.name}/ is not placed on the data path in this test"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_run_down_the_data_path(module: str) -> None:
    group = _group(module)
    allowed = ALLOWED[group] | {group}
    wrong = []
    for line, imported in _imports(MODULES[module], module):
        if imported == "tracker_eval" and _is_bare_import(MODULES[module], line):
            continue  # `import tracker_eval` for __version__ loads nothing of any stage
        target = ENTRY if imported == "tracker_eval" else _group(imported)
        if target not in allowed:
            wrong.append(f"line {line}: {imported} ({target})")
    assert not wrong, f"{module} ({group}) may import only {sorted(allowed)}; it imports " + "; ".join(wrong)


def _is_bare_import(path: pathlib.Path, line: int) -> bool:
    text = path.read_text().splitlines()[line - 1].strip()
    return text.startswith("import tracker_eval") and "." not in text.split()[1]


def test_the_checker_sees_an_upward_import(tmp_path: pathlib.Path) -> None:
    """The rule is only as good as its reading of imports: an upward import must be reported."""
    fake = tmp_path / "tracker_eval" / "evaluation"
    fake.mkdir(parents=True)
    source = fake / "bad.py"
    source.write_text(
        "def f():\n    from tracker_eval.runners.watcher import Watcher\n    from ..ledger import steps\n"
    )
    found = [name for _, name in _imports(source, "tracker_eval.evaluation.bad")]
    assert found == ["tracker_eval.runners.watcher", "tracker_eval.ledger"]
    assert _group("tracker_eval.runners.watcher") not in ALLOWED["evaluation"]


def test_no_module_is_a_grab_bag() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 340}
    assert not long, f"modules past ~300 lines, split them by concept: {long}"


def _package_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Module -> the modules of `modules` it imports (function-level imports included)."""
    return {name: {imported for _, imported in _imports(path, name) if imported in modules and imported != name}
            for name, path in modules.items()}


def test_the_package_imports_one_way() -> None:
    """No module imports one that imports it back, even lazily: `demo/run.py` <-> `demo/harness.py` and
    `checkpoints/gcs.py` <-> `checkpoints/listing.py` once did; what both need now lives below them."""
    assert _cycle(_package_graph(MODULES)) == []


def test_the_cycle_finder_sees_a_lazy_cycle(tmp_path: pathlib.Path) -> None:
    """A cycle closed by a function-level import is a cycle too."""
    package = tmp_path / "tracker_eval" / "demo"
    package.mkdir(parents=True)
    (package / "a.py").write_text("from tracker_eval.demo.b import x\n")
    (package / "b.py").write_text("def x():\n    from tracker_eval.demo.a import y\n")
    (package / "c.py").write_text("from tracker_eval.demo.b import x\n")
    modules = {f"tracker_eval.demo.{n}": package / f"{n}.py" for n in "abc"}
    assert _cycle(_package_graph(modules)) == ["tracker_eval.demo.a", "tracker_eval.demo.b", "tracker_eval.demo.a"]


# What decides "the same result" (`tracker_eval/identity.py`): no other module may define these.
IDENTITY = {"stable_hash", "stream_hash", "config_hash", "run_hash", "suite_hash", "run_key", "tracker_run_key",
            "tracker_run_name", "tracker_run_id", "suite_label", "tracker_suite", "delivery_key", "record_key",
            "best_key", "default_run_name", "derive_run_id"}


def test_result_identity_has_one_owner() -> None:
    plugins = sorted((PACKAGE.parent / "integrations").glob("*/tracker_eval_*/**/*.py"))
    found = []
    for path in [*MODULES.values(), *plugins]:
        if path == PACKAGE / "identity.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in IDENTITY:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert not found, f"identity is tracker_eval/identity.py's to derive; defined elsewhere: {found}"


PLUGINS = PACKAGE.parent / "integrations"


def _plugin_graph(package: pathlib.Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (`if TYPE_CHECKING:` imports included)."""
    name = package.name
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == name:  # `from pkg import module`
                found |= {f"{name}.{alias.name}" for alias in node.names
                          if (package / f"{alias.name}.py").exists() or (package / alias.name).is_dir()}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(f"{name}."):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith(f"{name}.")}
        graph[module] = found - {module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` as [a, b, ..., a], or [] when dependencies run one way."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target):], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return []


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PLUGINS.glob("*/*/__init__.py")))
def test_plugin_modules_import_one_way(package: str) -> None:
    (folder,) = PLUGINS.glob(f"*/{package}")
    assert _cycle(_plugin_graph(folder)) == []
