"""Each package says what it exports, and exports only that (as httpx's
test_exported_members.py does); layers use each other only through those names."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mfo_actors"
PACKAGES = ["mfo_actors.client", "mfo_actors.store", "mfo_actors.runtime",
            "mfo_actors.taskflow", "mfo_actors.daemon", "mfo_actors.http",
            "mfo_actors.mock_server"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_public_members_are_exported(name: str) -> None:
    package = importlib.import_module(name)
    public = sorted(member for member, value in vars(package).items()
                    if not member.startswith("_") and not isinstance(value, types.ModuleType)
                    and member != "annotations")
    exported = package.__all__
    assert sorted(exported) == public, f"{name}: __all__ differs from its public names"
    assert len(set(exported)) == len(exported), f"{name}: a name listed twice"


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from module import name`` in *path*."""
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_actors_use_only_what_client_and_store_export() -> None:
    exported = {pkg: set(importlib.import_module(pkg).__all__)
                for pkg in ("mfo_actors.client", "mfo_actors.store")}
    wrong: list[str] = []
    for path in sorted((ROOT / "actors").glob("*.py")):
        for module, name in _imports(path):
            for pkg, names in exported.items():
                if module.startswith(pkg + "."):
                    wrong.append(f"{path.name}: from {module} import {name}")
                elif module == pkg and name not in names:
                    wrong.append(f"{path.name}: {pkg}.{name} is not exported")
    assert not wrong, wrong


def test_taskflow_does_not_import_the_daemon_config() -> None:
    code = "import sys, mfo_actors.taskflow; print('mfo_actors.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
