"""variational/verifiers/labelled.py: plain math-verify, ours (strict) and the official grader against the
labelled pairs of shared/data."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from tasks.verify import check_answers
from variational.verifiers.labelled import format_verifier_report, verifier_report
from variational.verifiers.math_rules import MathPool
from variational.verifiers.official_math import OfficialMathPool


@pytest.fixture(scope="module")
def pool() -> Iterator[MathPool]:
    with MathPool(2) as p:
        yield p


@pytest.fixture(scope="module")
def official_pool() -> Iterator[OfficialMathPool]:
    with OfficialMathPool(2) as p:
        yield p


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


def test_both_graders_on_the_unit_test_pairs(
    pool: MathPool, official_pool: OfficialMathPool, shared_data: Path
) -> None:
    sets = ("math_verify", "hendrycks_is_equiv")
    agreement, disagreements = verifier_report(
        shared_data, timeout_s=20.0, sets=sets, pool=pool, official_pool=official_pool, grader="both"
    )
    print(format_verifier_report(agreement, disagreements).split("\n\n")[0])
    by = {(r["set"], r["verifier"]): r for r in agreement.iter_rows(named=True)}
    # these labels are math-verify's and MATH's own expectations, not the official grader's: it disagrees
    # by design (a bare "$\frac{1}{2}$" prediction is read by its last number, 2). Measured 116/268, 10/16: the same as SkyThought 0d190f1's own code.
    assert by["math_verify", "official"]["agree"] == 116
    assert by["hendrycks_is_equiv", "official"]["agree"] == 10
    assert by["math_verify", "ours"]["agreement"] >= 0.97
    assert {r["timeout_or_error"] for r in agreement.iter_rows(named=True)} == {0}


@pytest.mark.slow
def test_official_grader_reproduces_the_skythought_long_cot_labels(
    pool: MathPool, official_pool: OfficialMathPool, shared_data: Path
) -> None:
    # The labels are SkyThought's Qwen2.5-Math eval verdicts (branch `corrupt`): the official grader's
    # ancestor, not the same code (Minerva golds unstripped, another strip_string, a vendored latex2sympy), so
    # they are not exactly reproducible. Measured: SkyThought 0d190f1's own code 822/842 (run outside the
    # repository, in long-lived processes), ours 825/842; most misses are "1.87\\times10^6" against a gold
    # "1.87e6", equal for the official code, not for the older eval. Hence 0.975, not 0.99.
    agreement, disagreements = verifier_report(
        shared_data,
        timeout_s=20.0,
        sets=("longcot_skyt1",),
        pool=pool,
        official_pool=official_pool,
        grader="both",
    )
    print(format_verifier_report(agreement, disagreements).split("\n\n")[0])
    by = {r["verifier"]: r for r in agreement.iter_rows(named=True)}
    assert by["official"]["agreement"] >= 0.975
    assert by["official"]["agreement"] > by["ours"]["agreement"]


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
