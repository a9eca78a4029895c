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
    "runner": "test_runner.py",
    "apps_check": "test_check_code.py",
    "apps_harness": "test_check_code.py",
    "registry": "test_structure.py",
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


def test_variational_never_imports_tasks_or_flows() -> None:
    """The runner and the store serve the stages; they do not know them (the CLI starts the flow)."""
    offenders = {
        str(p.relative_to(REPO))
        for p in (REPO / "variational").glob("*.py")
        if p.name != "cli.py" and imports_of(p) & {"tasks", "flows"}
    }
    assert not offenders, offenders


def test_tasks_hold_no_plumbing() -> None:
    """tasks/ = declarations + pure cores: no Prefect, no store, no manifests."""
    for path in (REPO / "tasks").glob("*.py"):
        text = path.read_text()
        assert "prefect" not in imports_of(path), path.name
        for word in ("StageStore", "manifest.json", "is_complete", "write_shard", "record_stage"):
            assert word not in text, f"{path.name} uses {word}"


def test_registry_names_the_stages_and_rules_the_modules_implement() -> None:
    from flows import recipe
    from tasks import select, weights
    from variational import registry
    from variational.runner import Stage

    declared = {v.name for v in vars(recipe).values() if isinstance(v, Stage)}
    assert declared == set(registry.STAGES), declared ^ set(registry.STAGES)
    assert set(weights.ESTIMATORS) == set(registry.ESTIMATORS)
    assert set(weights.QUESTION_WEIGHTINGS) | {"none"} == set(registry.QUESTION_WEIGHTINGS)
    assert set(select.MODES) == set(registry.SELECTION_MODES)


def test_every_declared_field_exists() -> None:
    from flows import recipe
    from variational.config import fields_for, load_config
    from variational.runner import Stage

    conf = load_config("tiny")
    for stage in (v for v in vars(recipe).values() if isinstance(v, Stage)):
        fields_for(conf, stage.fields + stage.uses)  # raises KeyError naming a bad path
        # where shards run never changes what they hold (per-request seeds): no fingerprint reads it
        assert not [f for f in stage.fields if f.split(".")[0] == "executor"], stage.name
