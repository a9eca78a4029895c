"""tasks/verify.py: the stage core (math and code rows, order, keys) and the verdicts / prior_verdicts tasks."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import finished_stage

from tasks.verify import PRIOR_VERDICTS, VERDICTS, official_golds, verdict_summary, verify
from variational import templates
from variational.config import RunConfig, VerifyConfig
from variational.pipeline.fingerprint import stage_fingerprint
from variational.pipeline.runner import run_stage
from variational.verifiers.math_rules import MathPool


@pytest.fixture(scope="module")
def pool() -> Iterator[MathPool]:
    with MathPool(2) as p:
        yield p


def fenced(code: str) -> str:
    return f"Reasoning...\n```python\nprint('not this one')\n```\nFinal:\n```python\n{code}\n```\n"


# ---------------------------------------------------------------- the stage
def test_verify_core(pool: MathPool) -> None:
    problems = pl.DataFrame(
        {
            "prompt_idx": [0, 1],
            "kind": ["math", "code"],
            "gold": [["4"], []],
            "tests": [None, [{"input": "2\n", "output": "4\n"}]],
        }
    )
    rollouts = pl.DataFrame(
        {
            "prompt_idx": [1, 0, 0, 1],
            "sample_idx": [0, 0, 1, 1],
            "rollout_idx": [0, 0, 0, 0],
            "round": [1, 1, 1, 1],
            "text": [fenced("print(int(input()) * 2)"), "\\boxed{4}", "\\boxed{5}", fenced("print(5)")],
            "n_tokens": [9, 9, 9, 9],
        }
    )
    out = verify(rollouts, problems, VerifyConfig(code_timeout_s=5), pool=pool)
    assert out.columns == [
        "prompt_idx", "sample_idx", "rollout_idx", "round", "extracted", "correct", "status", "verifier", "elapsed_ms"
    ]  # fmt: skip
    assert out["prompt_idx"].to_list() == [1, 0, 0, 1]
    assert out["correct"].to_list() == [True, True, False, False]
    assert out["verifier"].to_list() == ["code_tests", "math_verify", "math_verify", "code_tests"]
    with pytest.raises(ValueError, match="prompt_idx \\[7\\]"):
        verify(rollouts.with_columns(pl.lit(7).alias("prompt_idx")), problems, VerifyConfig(), pool=pool)


def test_verify_task_writes_and_reuses(tmp_path: Path) -> None:
    cfg = RunConfig(name="t", base_model="embedded:smollm2-135m", data_root=str(tmp_path)).model_dump()
    cfg["verify"]["shard_size"] = 2
    cfg["verify"]["workers"] = 1
    inputs = {
        "problems": pl.DataFrame({"prompt_idx": [0, 1], "kind": ["math", "math"], "gold": [["1"], ["2"]]}),
        "rollouts": pl.DataFrame(
            {
                "prompt_idx": [0, 0, 1],
                "sample_idx": [0, 1, 0],
                "rollout_idx": [0, 0, 0],
                "text": ["\\boxed{1}", "\\boxed{3}", "no idea"],
            }
        ),
    }
    upstream = {name: finished_stage(tmp_path, "t", name, df) for name, df in inputs.items()}
    manifest = run_stage(VERDICTS, cfg, upstream)
    assert manifest["rows"] == 3 and manifest["shards"] == 2
    out = pl.read_parquet(tmp_path / manifest["path"] / "part-*.parquet")
    assert out["status"].to_list() == ["ok", "wrong", "no_answer"]
    assert run_stage(VERDICTS, cfg, upstream) == manifest  # reused
    cfg["verify"]["workers"] = 2  # speed only: same stage, reused
    assert run_stage(VERDICTS, cfg, upstream) == manifest
    cfg["verify"]["timeout_s"] = 2.0
    assert stage_fingerprint(VERDICTS, cfg, upstream) != manifest["fingerprint"]


def test_no_sandbox_is_in_the_fingerprint_which_jail_is_not(tmp_path: Path) -> None:
    # without isolation a program can read the data root (its expected outputs) and the network, so its
    # verdict can differ: verdicts judged with verify.sandbox none are never reused as sandboxed ones
    cfg = RunConfig(name="t", base_model="embedded:smollm2-135m", data_root=str(tmp_path)).model_dump()
    refs = {"rollouts": {"fingerprint": "r"}, "problems": {"fingerprint": "p"}}
    prints = {}
    for setting in ("auto", "root", "userns", "none"):
        cfg["verify"]["sandbox"] = setting
        prints[setting] = stage_fingerprint(VERDICTS, cfg, refs)
    assert prints["auto"] == prints["root"] == prints["userns"] != prints["none"]


def test_unsandboxed_code_rows_are_marked_and_summarised(pool: MathPool) -> None:
    problems = pl.DataFrame(
        {
            "prompt_idx": [0, 1],
            "kind": ["math", "code"],
            "gold": [["4"], []],
            "tests": [None, '{"inputs": ["2\\n"], "outputs": ["4\\n"]}'],
        }
    )
    rollouts = pl.DataFrame({"prompt_idx": [0, 1], "text": ["\\boxed{4}", fenced("print(int(input()) * 2)")]})
    out = verify(rollouts, problems, VerifyConfig(sandbox="none"), pool=pool)
    assert out["verifier"].to_list() == ["math_verify", "code_tests_unsandboxed"]
    assert out["correct"].to_list() == [True, True]
    summary = verdict_summary(out)
    assert summary.startswith("**Warning: 1 code rows were judged WITHOUT a sandbox** (verify.sandbox: none)")
    sandboxed = verify(rollouts, problems, VerifyConfig(), pool=pool)
    assert sandboxed["verifier"].to_list() == ["math_verify", "code_tests"]
    assert "WITHOUT" not in verdict_summary(sandboxed) and verdict_summary(sandboxed).startswith("accuracy")


def test_verify_prior_task_reads_responses(tmp_path: Path) -> None:
    cfg = RunConfig(name="t", base_model="embedded:smollm2-135m", data_root=str(tmp_path)).model_dump()
    cfg["verify"]["workers"] = 1
    inputs = {
        "problems": pl.DataFrame({"prompt_idx": [0], "kind": ["math"], "gold": [["6"]]}),
        "prior_samples": pl.DataFrame(
            {
                "prompt_idx": [0, 0],
                "sample_idx": [0, 1],
                "round": [2, 2],
                "response": [
                    templates.pi_response("2*3", "$\\boxed{6}$"),
                    templates.pi_response("hm", "$\\boxed{5}$"),
                ],
            }
        ),
    }
    upstream = {name: finished_stage(tmp_path, "t", name, df) for name, df in inputs.items()}
    manifest = run_stage(PRIOR_VERDICTS, cfg, upstream, 2)
    out = pl.read_parquet(tmp_path / manifest["path"] / "part-*.parquet")
    assert out.select("sample_idx", "round", "correct").rows() == [(0, 2, True), (1, 2, False)]


# ---------------------------------------------------------------- parity official (variational/parity.py)
OFFICIAL_MATH = importlib.util.find_spec("variational.verifiers.official_math") is not None


def _verdicts(tmp_path: Path, parity: str, problems: pl.DataFrame, texts: list[str]) -> pl.DataFrame:
    cfg = RunConfig(name="t", base_model="m", data_root=str(tmp_path), parity=parity).model_dump()
    cfg["verify"]["workers"] = 1
    rollouts = pl.DataFrame(
        {"prompt_idx": [0] * len(texts), "sample_idx": list(range(len(texts))), "text": texts}
    )
    upstream = {
        name: finished_stage(tmp_path, "t", name, df)
        for name, df in (("problems", problems), ("rollouts", rollouts))
    }
    manifest = run_stage(VERDICTS, cfg, upstream)
    return pl.read_parquet(tmp_path / manifest["path"] / "part-*.parquet")


def test_official_parity_judges_code_by_the_official_verdict_rule(tmp_path: Path) -> None:
    """The stage asks parity.verify_rules: officially a crashing program passes (np.all over -1)."""
    problems = pl.DataFrame(
        {
            "prompt_idx": [0],
            "kind": ["code"],
            "gold": [[]],
            "tests": ['{"inputs": ["2\\n"], "outputs": ["4\\n"]}'],
        }
    )
    texts = [fenced("raise ValueError('boom')"), fenced("print(int(input()) * 2)"), fenced("print(5)")]
    strict = _verdicts(tmp_path / "strict", "strict", problems, texts)
    official = _verdicts(tmp_path / "official", "official", problems, texts)
    assert strict["correct"].to_list() == [False, True, False]
    assert official["correct"].to_list() == [True, True, False]
    assert official["status"].to_list() == ["runtime_error", "ok", "wrong"]


@pytest.mark.skipif(not OFFICIAL_MATH, reason="the official math grader (issue-18-math) is not merged yet")
def test_official_parity_judges_math_by_the_official_grader(tmp_path: Path) -> None:
    """\\boxed{0.5} against gold 50: correct for SkyThought's math_equal (percentages), wrong for ours."""
    problems = pl.DataFrame({"prompt_idx": [0], "kind": ["math"], "gold": [["50"]]})
    texts = ["so \\boxed{0.5}", "so \\boxed{50}", "so \\boxed{7}"]
    assert _verdicts(tmp_path / "s", "strict", problems, texts)["correct"].to_list() == [False, True, False]
    assert _verdicts(tmp_path / "o", "official", problems, texts)["correct"].to_list() == [True, True, False]


def test_official_golds_are_whole_solutions() -> None:
    """verify_parallel.py reads the source's ground-truth solution and the reference solution with
    extract_answer: our extracted answer is re-boxed (it reads back the same), the reference goes in whole
    (its fallbacks then apply: a reference without \\boxed still gives its last number)."""
    problems = pl.DataFrame(
        {"gold": [["\\frac{1}{2}", "0.5"], []], "solution_ref": ["so \\boxed{0.5}", "hence the total is 12."]}
    )
    assert official_golds(problems).to_list() == [
        ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "so \\boxed{0.5}"],
        ["hence the total is 12."],
    ]
    assert official_golds(problems.drop("solution_ref")).to_list() == [
        ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}"],
        [],
    ]
