"""variational/analysis/metrics.py: pass@k against brute force, avg@k aggregation and its bootstrap interval, the
markdown summary and the paper's table."""

from __future__ import annotations

import itertools
import random

import polars as pl
import pytest

import variational.analysis.metrics as ev
from variational.data import benchmarks


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Fraction of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_brute_force(n: int) -> None:
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert ev.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_edges_and_large_n() -> None:
    assert ev.pass_at_k(10, 0, 4) == 0.0
    assert ev.pass_at_k(10, 7, 4) == 1.0  # n - c < k
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # large n: product form stays finite and in [0, 1], and matches the exact binomial ratio
    from math import comb

    assert ev.pass_at_k(2000, 5, 64) == pytest.approx(1 - comb(1995, 64) / comb(2000, 64), rel=1e-9)
    with pytest.raises(ValueError, match="n=4 c=5"):
        ev.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 1, 5)


def eval_frame(outcomes: dict[tuple[str, str, str], list[bool]]) -> pl.DataFrame:
    rows = [
        {
            "model": m,
            "benchmark": b,
            "problem_id": p,
            "sample": j,
            "correct": ok,
            "status": "ok" if ok else "wrong",
        }
        for (m, b, p), oks in outcomes.items()
        for j, ok in enumerate(oks)
    ]
    return pl.DataFrame(rows)


def test_summarize_matches_brute_force_on_random_samples() -> None:
    rng = random.Random(0)
    outcomes = {
        (m, "bench", f"p{i}"): [rng.random() < 0.3 for _ in range(8)]
        for m in ("base", "pi_theta")
        for i in range(6)
    }
    summary = ev.summarize(eval_frame(outcomes))
    assert [c for c in summary.columns if c.startswith("pass@")] == ["pass@1", "pass@2", "pass@4", "pass@8"]
    for row in summary.iter_rows(named=True):
        probs = [v for (m, _, _), v in outcomes.items() if m == row["model"]]
        assert row["n_problems"] == 6 and row["k"] == 8
        assert row["avg_at_k"] == pytest.approx(sum(sum(v) / 8 for v in probs) / 6)
        for k in (1, 2, 4, 8):
            expect = sum(brute_pass_at_k(v, k) for v in probs) / 6
            assert row[f"pass@{k}"] == pytest.approx(expect)
        assert row["pass@1"] == pytest.approx(row["avg_at_k"])  # unbiased pass@1 is avg@k


def test_summarize_avg_is_mean_over_problems_and_skips_unparsable_gold() -> None:
    df = eval_frame(
        {
            ("base", "aime", "a"): [True, False, False, False],  # 0.25
            ("base", "aime", "b"): [True, True, True, True],  # 1.0
            ("base", "math", "c"): [True, False],  # k = 2 benchmark: no pass@4
        }
    )
    # a problem whose gold does not parse: excluded from every metric, counted in n_skipped
    bad = pl.DataFrame(
        {
            "model": ["base"] * 4,
            "benchmark": ["aime"] * 4,
            "problem_id": ["z"] * 4,
            "sample": [0, 1, 2, 3],
            "correct": [False] * 4,
            "status": ["gold_unparsable"] * 4,
        }
    )
    s = ev.summarize(pl.concat([df, bad]))
    aime = s.filter(pl.col("benchmark") == "aime").row(0, named=True)
    assert aime["n_problems"] == 2 and aime["n_skipped"] == 4 and aime["k"] == 4
    assert aime["avg_at_k"] == pytest.approx((0.25 + 1.0) / 2)
    assert aime["pass@4"] == pytest.approx(1.0)
    assert aime["pass@2"] == pytest.approx((0.5 + 1.0) / 2)  # C(3,2)/C(4,2) = 0.5 misses for "a"
    math_row = s.filter(pl.col("benchmark") == "math").row(0, named=True)
    assert math_row["k"] == 2 and math_row["avg_at_k"] == 0.5 and math_row["pass@4"] is None
    # explicit ks
    assert ev.summarize(df, ks=[1, 3]).columns[-2:] == ["pass@1", "pass@3"]


def test_summary_markdown_puts_models_side_by_side() -> None:
    df = eval_frame(
        {
            ("pi_theta", "aime", "a"): [True, True],
            ("base", "aime", "a"): [False, True],
            ("pi_theta0", "aime", "a"): [False, False],
        }
    )
    md = ev.summary_markdown(ev.summarize(df))
    header = md.splitlines()[0]
    assert header.index("base") < header.index("pi_theta0") < header.index("pi_theta |")
    assert "| aime | 1 | avg@2 | 50.0 | 0.0 | 100.0 |" in md
    assert "| aime | 1 | pass@2 | 100.0 | 0.0 | 100.0 |" in md


def plain_bootstrap(values: list[float], n_boot: int, seed: int) -> tuple[float, float]:
    """The same percentile bootstrap written as a loop: draw n problems with replacement, take the mean."""
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = sorted(sum(values[i] for i in row) / len(values) for row in draws)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def test_bootstrap_ci_matches_a_plain_loop_and_behaves() -> None:
    rng = random.Random(1)
    values = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(40)]
    low, high = ev.bootstrap_ci(values, n_boot=500, seed=3)
    assert (low, high) == pytest.approx(plain_bootstrap(values, 500, 3))
    mean = sum(values) / len(values)
    assert 0.0 <= low < mean < high <= 1.0
    assert ev.bootstrap_ci([1.0] * 10) == (1.0, 1.0)  # no spread, no width
    wide = ev.bootstrap_ci(values[:10])
    narrow = ev.bootstrap_ci(values * 10)  # same distribution, 10x the problems
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError, match="at least one problem"):
        ev.bootstrap_ci([])


def test_summary_has_the_interval_and_markdown_shows_it() -> None:
    outcomes = {("base", "heldout", f"p{i}"): [i % 2 == 0, i % 3 == 0, False, True] for i in range(12)}
    summary = ev.summarize(eval_frame(outcomes))
    row = summary.row(0, named=True)
    assert row["avg_ci_low"] < row["avg_at_k"] < row["avg_ci_high"]
    md = ev.summary_markdown(summary)
    ci = f"[{100 * row['avg_ci_low']:.1f}, {100 * row['avg_ci_high']:.1f}]"
    assert f"| heldout | 12 | 95% CI | {ci} |" in md and "bootstrap over problems" in md
    assert "Paper table" not in md  # no paper benchmark in this run


def test_paper_table_averages_and_reference_columns() -> None:
    # a run with every paper benchmark: pi_theta scores exactly the paper's Ours-Acc numbers
    ours = benchmarks.PAPER_4B["paper Ours-Acc PB"]
    rows = []
    for bench in benchmarks.MATH_AVG + benchmarks.OTHER_AVG:
        target = ours[bench] / 100
        for model, acc in (("pi_theta", target), ("base", 0.0)):
            n_correct = round(acc * 10000)  # 10000 one-sample problems reproduce the value to 0.01%
            rows.append((model, bench, n_correct))
    summary = pl.DataFrame(
        [
            {"model": m, "benchmark": b, "n_problems": 10000, "n_skipped": 0, "k": 1, "avg_at_k": c / 10000}
            for m, b, c in rows
        ]
    )
    table = ev.paper_table(summary)
    assert table.columns == ["benchmark", "base", "pi_theta", *benchmarks.PAPER_4B]
    by = {r["benchmark"]: r for r in table.iter_rows(named=True)}
    assert by["Math avg"]["pi_theta"] == pytest.approx(55.72, abs=0.01)
    assert by["Other avg"]["pi_theta"] == pytest.approx(46.12, abs=0.01)
    assert by["Math avg"]["paper Qwen3-4B-Base"] == 21.38 and by["aime24"]["paper Qwen3-4B-Base"] is None
    assert by["lcb_easy"]["paper BS-4B†"] == 71.22 and by["Other avg"]["paper BS-4B†"] == 40.40
    md = ev.summary_markdown(summary)
    assert "| Math avg | 0.00 | 55.72 | 21.38 | 51.35 | 55.72 |" in md
    # one benchmark missing: its group average is not computed
    partial = ev.paper_table(summary.filter(pl.col("benchmark") != "aime25"))
    assert {r["benchmark"]: r["pi_theta"] for r in partial.iter_rows(named=True)}["Math avg"] is None


# ---------------------------------------------------------------- both graders (issue 18)
def both_ways(outcomes: dict[tuple[str, str, str], list[tuple[bool, bool]]]) -> pl.DataFrame:
    """(model, benchmark, problem) -> per sample (ours, official)."""
    rows = [
        {
            "model": m,
            "benchmark": b,
            "problem_id": p,
            "sample": j,
            "correct": ours,
            "status": "ok" if ours else "wrong",
            "correct_official": theirs,
            "status_official": "ok" if theirs else "wrong",
        }
        for (m, b, p), samples in outcomes.items()
        for j, (ours, theirs) in enumerate(samples)
    ]
    return pl.DataFrame(rows)


def test_summarize_per_grader_and_unparsable_gold_is_wrong_officially() -> None:
    df = both_ways(
        {("base", "aime", "a"): [(True, False), (True, True)], ("base", "aime", "b"): [(False, False)] * 2}
    )
    unparsable = df.filter(pl.col("problem_id") == "b").with_columns(
        problem_id=pl.lit("z"), status=pl.lit("gold_unparsable"), status_official=pl.lit("gold_unparsable")
    )
    s = ev.summarize(pl.concat([df, unparsable]))
    assert s["grader"].to_list() == ["strict", "official"]
    strict, official = s.row(0, named=True), s.row(1, named=True)
    # strict: z is left out (n_skipped); official: z counts, as wrong, as the harness counts it
    assert (strict["n_problems"], strict["n_skipped"], strict["avg_at_k"]) == (2, 2, pytest.approx(0.5))
    assert (official["n_problems"], official["n_skipped"]) == (3, 0)
    assert official["avg_at_k"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert official["pass@2"] == pytest.approx(1 / 3)


def test_summary_markdown_puts_strict_and_official_side_by_side() -> None:
    df = both_ways(
        {
            ("pi_theta", "aime", "a"): [(True, False), (True, True)],
            ("base", "aime", "a"): [(False, False)] * 2,
        }
    )
    md = ev.summary_markdown(ev.summarize(df))
    assert md.splitlines()[0] == (
        "| benchmark | n | metric | base strict | base official | pi_theta strict | pi_theta official |"
    )
    assert "| aime | 1 | avg@2 | 0.0 | 0.0 | 100.0 | 50.0 |" in md


def test_paper_numbers_sit_next_to_the_official_columns() -> None:
    rows = [
        {"model": m, "benchmark": b, "grader": g, "n_problems": 1, "n_skipped": 0, "k": 1, "avg_at_k": v}
        for b in benchmarks.MATH_AVG + benchmarks.OTHER_AVG
        for m in ("base", "pi_theta")
        for g, v in (("strict", 0.5), ("official", 0.25))
    ]
    table = ev.paper_table(pl.DataFrame(rows))
    strict = ["base strict", "pi_theta strict"]
    official = ["base official", "pi_theta official"]
    assert table.columns == ["benchmark", *strict, *official, *benchmarks.PAPER_4B]
    by = {r["benchmark"]: r for r in table.iter_rows(named=True)}
    assert by["Math avg"]["pi_theta official"] == 25.0 and by["Math avg"]["pi_theta strict"] == 50.0
