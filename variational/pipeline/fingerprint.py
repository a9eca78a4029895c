"""Fingerprints: the name of a stage's folder, and so what decides reuse.

fingerprint = hash(stage name, code version of the modules it declares, the config fields it declares,
upstream fingerprints, round, identity extras such as the data files' content).

The code version follows code, not prose: it hashes each module's abstract syntax tree with docstrings
dropped (comments and formatting never reach the AST), so editing a docstring, a comment or the layout of a
line recomputes nothing, while any change to a statement recomputes exactly the stages that declare the
module and those below them (tests/pipeline/test_fingerprint.py). Before this scheme (issue 16) the raw
source was hashed, so a data root made by an earlier release recomputes its stages once.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from variational.config import RunConfig, fields_for
from variational.pipeline.stage import Inputs, Ref, Stage

FP_LEN = 16
SCHEME = "ast-1"  # bump when the way code is hashed changes (every fingerprint changes with it)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            first = body[0].value if body and isinstance(body[0], ast.Expr) else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def normalised_code(source: str) -> str:
    """The module's code as its AST without docstrings, positions or comments: what a stage depends on."""
    return ast.dump(_strip_docstrings(ast.parse(source)), annotate_fields=False, include_attributes=False)


@functools.lru_cache(maxsize=256)
def _module_digest(source: str) -> str:
    return hashlib.sha256(normalised_code(source).encode()).hexdigest()


def module_source(module: ModuleType | str) -> str:
    """A module's source, read from its file without importing it (tracing a DAG must not load torch for the
    engines and trainers stages declare); a module object, or one without a file (`__main__`), by inspect."""
    if isinstance(module, str):
        spec = importlib.util.find_spec(module) if module != "__main__" else None
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            return Path(spec.origin).read_text(encoding="utf-8")
        module = sys.modules.get(module) or importlib.import_module(module)
    return inspect.getsource(module)


def code_version(*modules: ModuleType | str) -> str:
    """Hash of the normalised code of the modules a stage runs: a code edit invalidates the stage."""
    h = hashlib.sha256(SCHEME.encode())
    for mod in modules:
        h.update(_module_digest(module_source(mod)).encode())
    return h.hexdigest()[:FP_LEN]


def _canonical(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def fingerprint(stage: str, **parts: Any) -> str:
    """hash(stage name, code version, the config fields it reads, upstream fingerprints, model/seeds...)."""
    blob = json.dumps(_canonical({"stage": stage, **parts}), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:FP_LEN]


def stage_fingerprint(stage: Stage, conf: RunConfig | dict, refs: dict[str, Ref], round_: int = 1) -> str:
    conf = conf if isinstance(conf, RunConfig) else RunConfig.model_validate(conf)
    inputs = Inputs(stage, conf, refs, round_)
    return fingerprint(
        stage.name,
        code=code_version(*stage.modules),
        config=fields_for(conf, stage.fields),
        upstream={k: inputs.model_id(k) for k in stage.inputs if k in refs},
        identity=stage.identity(inputs) if stage.identity else None,
        round=round_ if stage.per_round else None,
    )
