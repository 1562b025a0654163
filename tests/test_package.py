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


def test_the_data_package_starts_nothing():
    # `alliance split`, `check-data` and `predict` read data through it: none of them may load
    # the embedded runner (it starts processes and the S3 server) or TensorFlow.
    code = (
        "import sys, alliance.data\n"
        "print([m for m in ('alliance.embedded', 'alliance.s3server', 'tensorflow', 'keras') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_coordinator_side_does_not_load_tensorflow():
    code = (
        "import sys, alliance.cli, alliance.coordinator, alliance.embedded, alliance.member, "
        "alliance.strategies, alliance.trainers\n"
        "bad = [m for m in ('tensorflow', 'keras', 'kopf', 'kubernetes') if m in sys.modules]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_agent_contract_imports_only_the_standard_library():
    # The operator's pod builders and the embedded runner import it; neither loads TensorFlow.
    assert imported_modules(PACKAGE / "contract.py") <= set(sys.stdlib_module_names)


OPERATOR = Path(__file__).resolve().parents[1] / "operator" / "alliance_operator"


def test_the_operator_reuses_the_engine_and_does_not_load_tensorflow():
    # Its image carries no TensorFlow: models are built by the init pod (member image).
    code = (
        "import sys, alliance_operator.main\n"
        "print([m for m in ('tensorflow', 'keras') if m in sys.modules], "
        "'alliance.coordinator' in sys.modules, 'alliance.engine' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] True True"


def test_only_main_knows_kopf_decorators_and_only_k8s_calls_the_api():
    for path in OPERATOR.rglob("*.py"):
        text = path.read_text()
        name = str(path.relative_to(OPERATOR))
        if name != "main.py":
            assert "@kopf." not in text, f"{name} registers kopf handlers"
        # uninstall.py is a program of its own (the chart's pre-delete hook) with its own
        # ServiceAccount and Role: its two API calls are checked against that Role
        # (tests/test_chart.py), apart from the operator's.
        if name not in ("k8s.py", "uninstall.py"):
            assert "kubernetes" not in imported_modules(path), f"{name} imports kubernetes"
    builders = OPERATOR / "resources"
    for path in builders.rglob("*.py"):
        assert imported_modules(path) & {"kopf", "kubernetes", "time", "datetime"} == set(), path
