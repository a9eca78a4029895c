"""tasks/verify.py: math verdicts (gold first, extraction, statuses), hard deadlines on pathological rows,
code tests in the sandbox, the stage core and task, and agreement with the labelled pairs in shared/data."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import finished_stage

from tasks.verify import (
    OURS,
    PRIOR_VERDICTS,
    RULES,
    VERDICTS,
    MathPool,
    check_answers,
    check_code,
    verifier_report,
    verify,
)
from variational import templates
from variational.config import RunConfig, VerifyConfig
from variational.runner import run_stage, stage_fingerprint


@pytest.fixture(scope="module")
def pool() -> Iterator[MathPool]:
    with MathPool(2) as p:
        yield p


def check(pool: MathPool, rows: list[tuple[str | None, list[str] | None]], timeout_s: float = 5.0):
    df = pl.DataFrame(
        {"text": [r[0] for r in rows], "gold": [r[1] for r in rows]},
        schema_overrides={"gold": pl.List(pl.String)},
    )
    return check_answers(df, timeout_s=timeout_s, pool=pool)


# ---------------------------------------------------------------- math verdicts
def test_statuses_and_extraction(pool: MathPool) -> None:
    pi_output = templates.pi_response("maybe \\boxed{3}? no.", "So the answer is $\\boxed{\\frac{1}{2}}$.")
    rows = [
        ("Thus the answer is $\\boxed{\\frac{1}{2}}$.", ["0.5"]),  # ok, boxed
        ("so \\boxed{3}", ["4"]),  # wrong
        ("I could not solve it.", ["1"]),  # no answer at all
        ("\\boxed{2}", ["\\text{}"]),  # the gold does not parse
        ("The final answer is $12$", ["12"]),  # no boxed: the final answer expression
        ("\\boxed{7}", ["5", "7"]),  # any accepted gold
        (pi_output, ["1/2"]),  # the solution section is read, not the think
        ("\\frac{3}{4}i", ["\\frac34i"]),  # a bare LaTeX answer
        ("first \\boxed{1}.\n\nThen finally \\boxed{2}", ["2"]),  # the last boxed
        (None, ["1"]),
        ("\\boxed{1}", None),
        ("$\\boxed{36}$ dollars", ["\\$36"]),  # an escaped dollar is no delimiter (math500 golds)
        ("It is \\boxed{1} or \\boxed{2}.", ["2"]),  # boxed in one line form one set answer: no hedging
    ]
    out = check(pool, rows)
    assert out["status"].to_list() == [
        "ok",
        "wrong",
        "no_answer",
        "gold_unparsable",
        "ok",
        "ok",
        "ok",
        "ok",
        "ok",
        "no_answer",
        "gold_unparsable",
        "ok",
        "wrong",
    ]
    assert out["correct"].to_list() == [s == "ok" for s in out["status"]]
    assert out["extracted"].to_list()[:3] == ["\\frac{1}{2}", "3", None]
    assert out["extracted"][6] == "\\frac{1}{2}"
    assert out["extracted"][8] == "2"
    assert set(out["verifier"]) == {"math_verify"}
    assert out.columns == ["text", "gold", "extracted", "correct", "status", "verifier", "elapsed_ms"]
    assert (out["elapsed_ms"] >= 0).all()


def test_gold_is_passed_first(pool: MathPool) -> None:
    # math-verify is asymmetric: an interval prediction matches an inequality gold, not the other way round
    out = check(pool, [("$\\boxed{(1,2)}$", ["1<x<2"]), ("$\\boxed{1<x<2}$", ["(1,2)"])])
    assert out["correct"].to_list() == [True, False]


def test_keeps_order_and_extra_columns(pool: MathPool) -> None:
    df = pl.DataFrame(
        {"k": [3, 1, 2], "text": ["\\boxed{3}", "\\boxed{1}", "\\boxed{5}"], "gold": [["3"], ["1"], ["2"]]}
    )
    out = check_answers(df, pool=pool)
    assert out["k"].to_list() == [3, 1, 2]
    assert out["correct"].to_list() == [True, True, False]
    # a plain string gold is one accepted answer
    assert check_answers(df.with_columns(pl.lit("1").alias("gold")), pool=pool)["correct"].to_list() == [
        False,
        True,
        False,
    ]
    empty = check_answers(df.head(0), pool=pool)
    assert empty.height == 0 and "status" in empty.columns


# each rule of MathRules on a case whose verdict flips when the rule is off (region_cap is a time guard)
RULE_CASES = {
    "solution_section": (templates.pi_response("say \\boxed{3}? no.", "Recounting gives $4$."), ["4"]),
    "boxed_priority": ("So $\\boxed{5}$.\n\nThe final answer is $6$", ["5"]),
    "gold_wrap": ("The roots are $\\boxed{-2, 1}$.", ["-2,1"]),  # math500 writes several answers so
    "bare_answer": ("(\\frac{3}{5},\\frac{8}{3}]", ["$(\\frac{3}{5},\\frac{8}{3}]$"]),  # not a set
    "comma_both": ("1.22", ["1,22"]),  # a decimal comma, math-verify's reading
}


def test_each_rule_decides_its_case(pool: MathPool) -> None:
    assert set(RULES) == set(RULE_CASES) | {"region_cap"}
    rows = list(RULE_CASES.values())
    assert check(pool, rows)["correct"].all()
    df = check(pool, rows).select("text", "gold")
    for i, rule in enumerate(RULE_CASES):
        assert not check_answers(df, pool=pool, rules=OURS.without(rule))["correct"][i], rule
    # a list gold is not matched by one of its members, whichever way it is written
    out = check(pool, [("$\\boxed{-2}$", ["10, 4, -2"]), ("$\\boxed{1}$", ["-2,1"]), ("$x=2$", ["x=2"])])
    assert out["correct"].to_list() == [False, False, True]


# ---------------------------------------------------------------- deadlines
PATHOLOGICAL = [
    "\\boxed{" + "{" * 50_000,  # unclosed, deeply nested
    "\\boxed{" + "{" * 50_000 + "}" * 50_001,  # closed, deeply nested
    "$9^{9^{9^{9^{9}}}}$",  # power tower
    "The answer is " + "a" * 1_000_000,  # 1 MB
    "$" + "(" * 3000 + "1" + ")" * 3000 + "$",
]


def test_pathological_rows_return_in_time(pool: MathPool) -> None:
    timeout_s = 1.0
    rows = [("\\boxed{2}", ["2"])] + [(t, ["1"]) for t in PATHOLOGICAL] + [("\\boxed{3}", ["3"])]
    out = check(pool, rows, timeout_s=timeout_s)
    status = out["status"].to_list()
    assert status[0] == status[-1] == "ok"
    assert set(status[1:-1]) <= {"timeout", "no_answer", "wrong", "error"}, status
    # the power tower cannot finish in 1 s: only a deadline gives it this status (no wall-clock assertion,
    # the machine may be loaded; the row after it still being verified shows the pool went on)
    assert "timeout" in status


# ---------------------------------------------------------------- code
def fenced(code: str) -> str:
    return f"Reasoning...\n```python\nprint('not this one')\n```\nFinal:\n```python\n{code}\n```\n"


def test_check_code() -> None:
    # the sandbox's limits (wall clock, output flood, network) have their own tests in test_sandbox.py
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5   7", "output": "  12  \n\n"}]
    programs = {
        "correct": (fenced("a, b = map(int, input().split())\nprint(a + b)"), tests),
        "wrong": (fenced("print(3)"), tests),  # passes the first test only
        "crash": (fenced("raise SystemExit(1)"), tests),
        "loop": (fenced("while True:\n    pass"), tests),
        "memory": (fenced("x = bytearray(2 * 1024**3)\nprint(3)"), tests[:1]),
        "no_code": ("I would write a program.", tests),
        "no_tests": (fenced("print(1)"), []),
    }
    df = pl.DataFrame(
        {
            "name": list(programs),
            "text": [p[0] for p in programs.values()],
            "tests": [p[1] for p in programs.values()],
        },
        schema_overrides={"tests": pl.List(pl.Struct({"input": pl.String, "output": pl.String}))},
    )
    out = check_code(df, timeout_s=1.5, memory_mb=256)  # "loop" -> timeout below: the deadline held
    got = dict(zip(out["name"], out["status"], strict=True))
    expected = {
        "correct": "ok",
        "wrong": "wrong",
        "crash": "wrong",  # officially SystemExit ends a program normally: it printed nothing
        "loop": "timeout",
        "memory": "sandbox_violation",  # MemoryError under RLIMIT_AS
        "no_code": "no_code",
        "no_tests": "gold_unparsable",
    }
    assert got == expected
    assert dict(zip(out["name"], out["correct"], strict=True))["correct"] is True
    assert set(out["verifier"]) == {"code_tests"}
    assert out.filter(pl.col("name") == "correct")["extracted"][0].startswith("a, b = map")


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


# ---------------------------------------------------------------- agreement with labelled pairs
def agreement_by_set(pool: MathPool, data: Path, sets: tuple[str, ...]) -> tuple[dict, pl.DataFrame]:
    # a generous deadline: a loaded machine must not turn a slow row into a disagreement
    agreement, disagreements = verifier_report(data, timeout_s=20.0, sets=sets, pool=pool)
    by = {(r["set"], r["verifier"]): r for r in agreement.iter_rows(named=True)}
    for s in sets:
        assert by[s, "ours"]["agree"] >= by[s, "plain"]["agree"], (s, by[s, "ours"], by[s, "plain"])
        assert by[s, "ours"]["timeout_or_error"] == 0, by[s, "ours"]
    return by, disagreements


def test_agrees_with_labelled_pairs_at_least_as_often_as_plain_math_verify(
    pool: MathPool, shared_data: Path
) -> None:
    by, disagreements = agreement_by_set(pool, shared_data, ("math_verify", "hendrycks_is_equiv"))
    # measured 262/268 = 0.978, plain math-verify the same: the 6 misses are rows whose unit test used
    # another verifier_config (latex-only match types, precision 2, strict=False, set-relation comparison)
    assert by["math_verify", "ours"]["agreement"] >= 0.97
    # measured 14/16, plain 7/16 (bare golds like "\frac34i" do not parse without delimiters); hendrycks'
    # string is_equiv holds "4, 10, -2" != "10, 4, -2" where math-verify compares sets
    assert by["hendrycks_is_equiv", "ours"]["agreement"] >= 0.85
    ours_wrong = disagreements.filter(pl.col("ours") != pl.col("label"))
    assert ours_wrong.height == sum(r["pairs"] - r["agree"] for (_, v), r in by.items() if v == "ours")


@pytest.mark.slow
def test_long_cot_outputs_agree_at_least_as_often_as_plain_math_verify(
    pool: MathPool, shared_data: Path
) -> None:
    # 842 Sky-T1 completions (thought + solution) labelled by SkyThought's grader, itself noisy: most of
    # our "false accepts" are `x(t) = <gold>` answers its string match rejects. Measured 802 (0.952) vs
    # plain math-verify 772 (0.917): plain cannot parse bare golds such as "(-\infty,0]" or "(E)".
    by, _ = agreement_by_set(pool, shared_data, ("longcot_skyt1",))
    assert by["longcot_skyt1", "ours"]["agreement"] >= 0.94


@pytest.mark.slow
def test_throughput_easy_rows(pool: MathPool) -> None:
    # measured on 2 cores shared with other jobs (load 6-9): 380-910 pairs/s; real 7.7k-char long-CoT
    # outputs (shared/data longcot_skyt1): 22-26 pairs/s, 0.952 agreement with SkyThought's grader
    n = 2000
    df = pl.DataFrame(
        {
            "text": [f"Reasoning about {i}.\n\nSo the answer is $\\boxed{{{i % 97}}}$." for i in range(n)],
            "gold": [[str(i % 89)] for i in range(n)],
        }
    )
    check_answers(df.head(4), pool=pool)
    t0 = time.perf_counter()
    out = check_answers(df, pool=pool)
    rate = n / (time.perf_counter() - t0)
    print(f"check_answers: {rate:.0f} pairs/s on {pool.size} workers")
    assert out["correct"].sum() == sum(i % 97 == i % 89 for i in range(n))
    assert rate > 50
