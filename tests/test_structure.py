"""Import boundaries and layout (style.md §4, §9): engines in one place, light modules stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["variational", "flows", "tasks", "trainers"]
# test files that cover several modules, or modules covered by another module's tests
TESTED_BY = {
    "sample_posterior": "test_sample_stages.py",
    "sample_prior": "test_sample_stages.py",
    "rollouts": "test_sample_stages.py",
    "sft": "test_sft.py",
    "base_model": "test_models.py",
    "sqlview": "test_sql.py",
    "cli": "test_cli.py",
    "stage": "test_store.py",
    "report": "test_report.py",
    "recipe": "test_pipeline.py",
}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in (REPO / pkg).glob("*.py") if p.name != "__init__.py"]


def test_only_the_engine_module_imports_vllm() -> None:
    users = {str(p.relative_to(REPO)) for p in sources() if "vllm" in imports_of(p)}
    assert users <= {"variational/sampling.py"}, users


def test_only_verify_imports_math_verify() -> None:
    users = {str(p.relative_to(REPO)) for p in sources() if "math_verify" in imports_of(p)}
    assert users <= {"tasks/verify.py"}, users


def test_weights_needs_no_gpu_stack() -> None:
    code = "import sys, tasks.weights, tasks.select; print(sorted(m for m in ('torch','vllm','transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_module_has_tests() -> None:
    tests = {p.name for p in (REPO / "tests").glob("test_*.py")}
    missing = []
    for path in sources():
        stem = path.stem
        expected = TESTED_BY.get(stem, f"test_{stem}.py")
        if expected not in tests:
            missing.append(f"{path.relative_to(REPO)} -> tests/{expected}")
    assert not missing, f"modules without tests: {missing}"
