"""Recovery sits above the compiler core, beside the driver: it imports `planer.compiler`
modules by their public names and never the driver (`planer.compiler.driver`), which
imports recovery itself (the `recover` stage)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RECOVERY = Path(__file__).resolve().parents[1] / "recovery"


def _violations(source: str) -> list[str]:
    """Names each driver import and each private name taken from planer.compiler."""
    tree = ast.parse(source)
    aliases: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if module.startswith("planer.compiler.driver"):
                found.append(f"imports {module}")
            elif module.startswith("planer.compiler"):
                for alias in node.names:
                    if alias.name.startswith("_"):
                        found.append(f"imports private {module}.{alias.name}")
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            found.extend(f"imports {a.name}" for a in node.names
                         if a.name.startswith("planer.compiler.driver"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            found.append(f"reads private {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("path", sorted(RECOVERY.glob("*.py")), ids=lambda p: p.name)
def test_recovery_uses_public_compiler_names_only(path: Path) -> None:
    assert _violations(path.read_text()) == []


def test_the_check_catches_a_driver_import_and_a_private_finder_helper() -> None:
    source = ("from planer.compiler import blocks as finder\n"
              "from planer.compiler.driver.pipeline import read_model\n"
              "finder._find_ffns(None)\n")
    assert _violations(source) == ["imports planer.compiler.driver.pipeline",
                                   "reads private finder._find_ffns"]
