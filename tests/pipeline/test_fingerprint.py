"""variational/pipeline/fingerprint.py: fingerprints are stable, change with every input, and follow code, not
prose: a docstring, comment or formatting edit keeps every fingerprint of a whole run, a one-statement change
recomputes exactly the stages that declare the module and those below them (the DAG from flows/recipe.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.recipe import dag
from variational import config, templates
from variational.config import DataConfig
from variational.pipeline import fingerprint as fpmod
from variational.pipeline.fingerprint import code_version, fingerprint, normalised_code

BASE = dict(code="c1", config=DataConfig(limit=8), upstream={"problems": "f1"}, seed=0)


def test_fingerprint_is_stable() -> None:
    fp = fingerprint("rollouts", **BASE)
    assert fp == fingerprint("rollouts", **BASE) and len(fp) == 16
    # the same values in another container or order hash the same
    same = dict(code="c1", config=DataConfig(limit=8).model_dump(), upstream={"problems": "f1"}, seed=0)
    assert fingerprint("rollouts", **same) == fp
    assert fingerprint("x", code="c", config={"a": 1, "b": Path("/p")}) == fingerprint(
        "x", code="c", config={"b": "/p", "a": 1}
    )


@pytest.mark.parametrize(
    "change",
    [
        {"code": "c2"},
        {"config": DataConfig(limit=9)},
        {"config": DataConfig(limit=8, subset_seed=1)},
        {"upstream": {"problems": "f2"}},
        {"seed": 1},
        {"model": "smollm2"},
    ],
)
def test_fingerprint_changes_with_every_input(change: dict) -> None:
    assert fingerprint("rollouts", **{**BASE, **change}) != fingerprint("rollouts", **BASE)


def test_fingerprint_changes_with_stage_name_and_code_version() -> None:
    assert fingerprint("verdicts", **BASE) != fingerprint("rollouts", **BASE)
    assert code_version(templates) == code_version(templates)
    assert code_version(templates) != code_version(config)
    assert code_version(templates, config) != code_version(config, templates)


# ---------------------------------------------------------------- code, not prose
SOURCE = '''"""A module."""

import os


def f(x: int) -> int:
    """Twice x."""
    return 2 * x  # doubled


class C:
    """A class."""

    y = 1
'''
PROSE_EDITS = {
    "module docstring": SOURCE.replace('"""A module."""', '"""A module, better described."""'),
    "function docstring": SOURCE.replace('"""Twice x."""', '"""Twice x.\n\n    More words."""'),
    "class docstring removed": SOURCE.replace('    """A class."""\n\n', ""),
    "comment": SOURCE.replace("# doubled", "# doubled, as method.md says").replace(
        "import os", "import os  # why"
    ),
    "formatting": SOURCE.replace("return 2 * x", "return (2\n            * x)").replace("\n\n\n", "\n\n\n\n"),
}
CODE_EDITS = {
    "constant": SOURCE.replace("2 * x", "3 * x"),
    "statement": SOURCE.replace("    y = 1\n", "    y = 1\n    z = 2\n"),
    "import": SOURCE.replace("import os", "import sys"),
    "string that is not a docstring": SOURCE.replace(
        "return 2 * x  # doubled", 'print("x")\n    return 2 * x'
    ),
}


@pytest.mark.parametrize("edit", PROSE_EDITS)
def test_prose_edits_keep_the_code_version(edit: str) -> None:
    assert normalised_code(PROSE_EDITS[edit]) == normalised_code(SOURCE)


@pytest.mark.parametrize("edit", CODE_EDITS)
def test_code_edits_change_it(edit: str) -> None:
    assert normalised_code(CODE_EDITS[edit]) != normalised_code(SOURCE)


def edited(monkeypatch: pytest.MonkeyPatch, module: str, edit) -> None:
    """Every fingerprint computed after this sees `module`'s source passed through `edit`."""
    real = fpmod.module_source

    def source(mod) -> str:
        text = real(mod)
        name = mod if isinstance(mod, str) else mod.__name__
        return edit(text) if name == module else text

    monkeypatch.setattr(fpmod, "module_source", source)


def fingerprints(*overrides: str) -> dict[str, str]:
    return {call.key: call.fingerprint for call in dag("tiny", list(overrides))}


def prose(text: str) -> str:
    """A docstring, a comment and formatting changed all over the module, no statement touched."""
    head, _, rest = text.partition('"""')
    out = head + '"""Edited: ' + rest  # the module docstring
    out = out.replace("\n\n\ndef ", "\n\n\n# a new comment\ndef ")
    return out.replace("):\n", "):  # a trailing comment\n", 3)


# module edited -> the stages of tiny that must change (the declaring stages and everything below them)
BELOW_WEIGHTS = {"weights@1", "train@1", "pi_theta@1", "eval@1"}
DEPENDENTS = {
    "variational.verifiers.math_rules": {"verdicts@1", *BELOW_WEIGHTS},
    "tasks.weights": BELOW_WEIGHTS,
    "variational.engines.scoring": {
        "posterior_samples@1",
        "logps@1",
        "rollouts@1",
        "verdicts@1",
        *BELOW_WEIGHTS,
    },  # think_len counts the scorer's token ids  # fmt: skip
    "trainers.sft": {
        "pi_theta0@1",
        "q_phi@1",
        "posterior_samples@1",
        "logps@1",
        "rollouts@1",
        "verdicts@1",
        *BELOW_WEIGHTS,
    },
    "tasks.evaluate": {"eval@1"},
    # data.decontaminate: flag (tiny): the table beside problems, which no training stage reads
    "variational.data.decontamination": {"contamination@1"},
}


@pytest.mark.parametrize("module", sorted(DEPENDENTS))
def test_a_prose_edit_keeps_every_fingerprint_of_a_run(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    before = fingerprints()
    source = fpmod.module_source(module)
    assert prose(source) != source  # the edit is real
    edited(monkeypatch, module, prose)
    assert fingerprints() == before


@pytest.mark.parametrize("module", sorted(DEPENDENTS))
def test_a_one_statement_change_recomputes_exactly_the_stages_below(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    before = fingerprints()
    edited(monkeypatch, module, lambda text: text + "\n_EDITED = 1\n")
    after = fingerprints()
    changed = {key for key in before if after[key] != before[key]}
    assert changed == DEPENDENTS[module]


def test_the_dag_names_every_stage_of_the_run_once_with_its_folder() -> None:
    calls = dag("tiny")
    assert [c.stage.name for c in calls] == [
        "problems", "contamination", "base_model", "pi_theta0", "q_phi", "posterior_samples", "logps",
        "rollouts", "verdicts", "weights", "train", "pi_theta", "eval",
    ]  # fmt: skip
    assert len({c.fingerprint for c in calls}) == len(calls)
    assert dag("tiny")[5].fingerprint == calls[5].fingerprint  # deterministic
