"""The folders are the architecture (style.md §4, §9; issue 16): imports point one way, folder by folder;
engines, math-verify and Prefect each have one home; stage modules stay light; tests mirror the packages;
modules and functions stay small enough to read in one sitting; one registry names the stages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["variational", "flows", "tasks", "trainers"]
# Layers, lowest first: a module may import its own layer and the ones below, never one above. The
# top-level modules of variational/ (config, registry, templates, shutdown, parity) are the base every layer uses;
# pipeline, engines, verifiers and data are independent of each other; trainers train; analysis reads
# finished stores; tasks declare stages on all of them; flows compose tasks; the CLI starts everything.
LAYERS: list[set[str]] = [
    {
        "variational.config",
        "variational.registry",
        "variational.templates",
        "variational.shutdown",
        "variational.parity",
    },
    {"variational.pipeline"},
    {"variational.engines", "variational.verifiers", "variational.data"},
    {"trainers"},
    {"variational.analysis"},
    {"tasks"},
    {"flows"},
    {"variational.cli"},
]
# the one allowed crossing inside a layer: nothing (pipeline, engines, verifiers and data are siblings)
SIBLINGS_MAY_IMPORT: dict[str, set[str]] = {}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# test files that cover several modules, or modules covered by another module's tests
TESTED_BY = {
    "tasks/sample_posterior.py": "tests/tasks/test_sample_stages.py",
    "tasks/sample_prior.py": "tests/tasks/test_sample_stages.py",
    "tasks/rollouts.py": "tests/tasks/test_sample_stages.py",
    "tasks/base_model.py": "tests/engines/test_models.py",
    "variational/engines/samples.py": "tests/tasks/test_sample_stages.py",
    "variational/verifiers/harness.py": "tests/verifiers/test_apps_check.py",
    "variational/verifiers/math_rules.py": "tests/verifiers/test_answers.py",
    "variational/pipeline/stage.py": "tests/pipeline/test_runner.py",
    "variational/registry.py": "tests/test_structure.py",
    "variational/analysis/figures.py": "tests/analysis/test_report.py",
    # the command line's modules: tests/cli/test_cli.py runs every command through `main`
    **{
        f"variational/cli/{m}.py": "tests/cli/test_cli.py"
        for m in ("common", "run", "store", "data", "__main__")
    },
}


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, as dotted names (`from a.b import c` gives a.b and a.b.c)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imports_of(path)}


def sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if p.name != "__init__.py"]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def layer_of(module: str) -> int | None:
    best, where = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, where = len(prefix), i
    return where


def unit_of(module: str) -> str | None:
    """The layer entry (package or module) a module belongs to."""
    matches = [p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def test_every_module_has_a_layer() -> None:
    assert [module_name(p) for p in sources() if layer_of(module_name(p)) is None] == []


def test_imports_point_one_way() -> None:
    """A module imports its own unit, the layers below, never a layer above, never a sibling package."""
    offenders = []
    for path in sources():
        me = module_name(path)
        mine, my_unit = layer_of(me), unit_of(me)
        for name in imports_of(path):
            if name.split(".")[0] not in PACKAGES or (there := layer_of(name)) is None:
                continue
            other = unit_of(name)
            if there > mine or (
                there == mine
                and other != my_unit
                and other not in SIBLINGS_MAY_IMPORT.get(my_unit, set())
                and mine != 0
            ):
                offenders.append(f"{me} imports {name}")
    assert not offenders, "\n".join(sorted(set(offenders)))


def test_only_the_engine_module_imports_vllm() -> None:
    users = {str(p.relative_to(REPO)) for p in sources() if "vllm" in roots(p)}
    assert users <= {"variational/engines/sampling.py"}, users


def test_only_the_math_grader_imports_math_verify() -> None:
    users = {str(p.relative_to(REPO)) for p in sources() if "math_verify" in roots(p)}
    assert users <= {"variational/verifiers/math_rules.py"}, users


def test_prefect_has_one_home() -> None:
    """Prefect and prefect-ray calls live in the orchestration module; the flow file is Prefect itself."""
    users = {str(p.relative_to(REPO)) for p in sources() if roots(p) & {"prefect", "prefect_ray"}}
    assert users <= {"variational/pipeline/orchestration.py", "flows/recipe.py"}, users


def test_importing_a_stage_module_loads_no_engine() -> None:
    """Declarations and pure cores are importable without torch, vllm or transformers (the tests of pure
    cores, the planner and the CLI's fast paths depend on it)."""
    stages = sorted(module_name(p) for p in (REPO / "tasks").glob("*.py") if p.name != "__init__.py")
    code = (
        f"import sys, importlib; [importlib.import_module(m) for m in {stages!r}]; import flows.recipe; "
        "print(sorted(m for m in ('torch','vllm','transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_tests_mirror_the_packages() -> None:
    """tests/<folder>/test_<module>.py for every module (or the file TESTED_BY names)."""
    missing = []
    for path in sources():
        rel = path.relative_to(REPO)
        parts = rel.parts[1:-1] if rel.parts[0] == "variational" else rel.parts[:-1]
        expected = TESTED_BY.get(str(rel), str(Path("tests", *parts, f"test_{path.stem}.py")))
        if rel.parts[0] == "flows":
            expected = TESTED_BY.get(str(rel), "tests/flows/test_recipe.py")
        if not (REPO / expected).exists():
            missing.append(f"{rel} -> {expected}")
    assert not missing, f"modules without tests: {missing}"


def test_modules_and_functions_stay_readable() -> None:
    too_long = []
    for path in sources():
        text = path.read_text()
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, too_long


def test_tasks_hold_no_plumbing() -> None:
    """tasks/ = declarations + pure cores: no Prefect, no store, no manifests, no other stage module."""
    for path in (REPO / "tasks").glob("*.py"):
        text = path.read_text()
        assert not roots(path) & {"prefect", "prefect_ray"}, path.name
        assert not {n for n in imports_of(path) if n.startswith("tasks.") or n == "tasks"}, path.name
        for word in ("StageStore", "manifest.json", "is_complete", "write_shard", "record_stage"):
            assert word not in text, f"{path.name} uses {word}"


def test_stage_names_live_in_the_registry_only() -> None:
    """No module but the registry spells out the list of stage names."""
    from variational import registry

    offenders = []
    for path in sources():
        if path.name == "registry.py":
            continue
        tree = ast.parse(path.read_text())
        inputs = {id(k.value) for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "inputs"}
        for node in ast.walk(tree):  # a Stage's `inputs=(...)` names its upstream stages: that is its job
            if isinstance(node, ast.Tuple | ast.List | ast.Set) and id(node) not in inputs:
                words = {
                    e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
                }
                if len(words & set(registry.STAGES)) >= 4:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_registry_names_the_stages_and_rules_the_modules_implement() -> None:
    from flows.recipe import dag
    from tasks import select, weights
    from variational import registry

    runs = ([], ["rounds=2"], ["data.decontaminate=drop"])
    declared = {c.stage.name for overrides in runs for c in dag("tiny", overrides)}
    assert declared == set(registry.STAGES), declared ^ set(registry.STAGES)
    assert set(weights.ESTIMATORS) == set(registry.ESTIMATORS)
    assert set(weights.QUESTION_WEIGHTINGS) | {"none"} == set(registry.QUESTION_WEIGHTINGS)
    assert set(select.MODES) == set(registry.SELECTION_MODES)


def test_every_declared_field_exists() -> None:
    from flows.recipe import dag
    from variational.config import fields_for, load_config

    conf = load_config("tiny")
    for call in dag("tiny", ["rounds=2"]):
        stage = call.stage
        fields_for(conf, stage.fields + stage.uses)  # raises KeyError naming a bad path
        # where shards run never changes what they hold (per-request seeds): no fingerprint reads it
        assert not [f for f in stage.fields if f.split(".")[0] == "executor"], stage.name


def test_test_files_have_unique_names() -> None:
    """pytest imports test files by basename (no __init__.py): two test_x.py in two folders collide."""
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
