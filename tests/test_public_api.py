"""Every module declares its public names, and the pure core imports nothing that does I/O."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import batch_export

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(batch_export.__path__, "batch_export.")
    if not name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_module_declares_all_and_defines_it(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert sorted(set(exported)) == sorted(exported), f"{name}.__all__ has duplicates"
    for public in exported:
        assert hasattr(module, public), f"{name}.__all__ names {public!r}, which does not exist"


IO_MODULES = {"aiohttp", "aiofiles", "aiosqlite", "sqlite3", "socket", "anyio", "subprocess"}


PURE_CORE = [
    "batch_export.breaker",
    "batch_export.discovery",
    "batch_export.lifecycle",
    "batch_export.pace",
    "batch_export.units",
] + [
    name
    for name in MODULES
    if name == "batch_export.manifest" or name.startswith("batch_export.manifest.")
]


@pytest.mark.parametrize("name", PURE_CORE)
def test_pure_core_imports_no_io(name: str) -> None:
    source = Path(importlib.import_module(name).__file__ or "").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & IO_MODULES, f"{name} imports {imported & IO_MODULES}"


def _project_imports(name: str) -> set[str]:
    """The batch_export modules ``name`` imports at run time (``if TYPE_CHECKING:`` left out)."""
    tree = ast.parse(Path(importlib.import_module(name).__file__ or "").read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for child in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("batch_export")
        ):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("batch_export")}
    return found


def test_value_types_module_is_a_leaf() -> None:
    assert _project_imports("batch_export.types") == set()


@pytest.mark.parametrize("name", MODULES)
def test_only_the_cli_and_api_layer_imports_the_runner(name: str) -> None:
    if name in {
        "batch_export.runner",
        "batch_export.app",
        "batch_export.cli",
        "batch_export.exporter",
    }:
        return
    assert "batch_export.runner" not in _project_imports(name)


def test_readme_module_table_matches_the_tree() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            named |= set(re.findall(r"`([\w./]+)`", row.split(" | ")[0]))
    package = Path(batch_export.__file__).parent
    tree = {
        p.name + ("/" if p.is_dir() else "")
        for p in package.iterdir()
        if not p.name.startswith((".", "__pycache__"))
    }
    assert named == tree
