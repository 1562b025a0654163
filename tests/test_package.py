"""Boundaries of the engine package."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alliance"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_engine_package_imports_neither_kopf_nor_kubernetes():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(imported_modules(path) & {"kopf", "kubernetes"})
        for path in PACKAGE.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_coordinator_side_does_not_load_tensorflow():
    code = (
        "import sys, alliance.cli, alliance.coordinator, alliance.local, alliance.member, "
        "alliance.strategies, alliance.trainers\n"
        "bad = [m for m in ('tensorflow', 'keras', 'kopf', 'kubernetes') if m in sys.modules]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
