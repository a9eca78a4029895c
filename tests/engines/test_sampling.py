"""variational/engines/sampling.py: the transformers fallback on the tiny random model (fast) and vLLM on the embedded
SmolLM2 (slow, one engine start for the module)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from variational.config import EngineConfig, SamplingConfig
from variational.engines.sampling import Completion, Sampler, engine_seed, request_seed, resolve_backend

PROMPTS = ["<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", "Once upon a time"]
HF = EngineConfig(backend="transformers", max_num_seqs=16)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Sampler:
    with Sampler(tiny_model_dir, HF) as sampler:
        yield sampler


def test_fallback_n_distinct_and_deterministic(tiny: Sampler) -> None:
    sp = SamplingConfig(temperature=1.0, max_tokens=8)
    first = tiny.generate(PROMPTS, n=4, sampling=sp, seeds=[11, 12])
    again = tiny.generate(PROMPTS, n=4, sampling=sp, seeds=[11, 12])
    other = tiny.generate(PROMPTS, n=4, sampling=sp, seeds=[13, 14])
    assert [len(c) for c in first] == [4, 4]
    for comps in first:
        assert len({c.text for c in comps}) == 4, "the n samples of one request must differ"
        assert all(c.finish_reason == "length" and c.n_tokens == 8 for c in comps)
    assert first == again
    assert first != other
    # a request's draws come from its own generator: the same seed alone in a batch gives the same first token
    alone = tiny.generate(PROMPTS[:1], n=4, sampling=sp, seeds=[11])
    assert [c.text[:3] for c in alone[0]] == [c.text[:3] for c in first[0]]


def test_fallback_stop_truncation_matches_unstopped_text(tiny: Sampler) -> None:
    # one request, one seed: the with-stop and without-stop runs draw the same tokens until the stop
    sp = SamplingConfig(temperature=1.0, max_tokens=24, seed=3)
    [[full]] = tiny.generate(PROMPTS[1:], n=1, sampling=sp)
    assert full.finish_reason == "length" and full.n_tokens == 24
    # a string the continuation is known to produce, first seen past its first tokens
    cut = next(
        i for i in range(len(full.text) // 2, len(full.text)) if full.text.find(full.text[i : i + 3]) == i
    )
    stop = full.text[cut : cut + 3]
    [[kept]] = tiny.generate(PROMPTS[1:], n=1, sampling=sp, stop=[stop])
    [[dropped]] = tiny.generate(PROMPTS[1:], n=1, sampling=sp, stop=[stop], include_stop=False)
    assert kept.text == full.text[: cut + len(stop)]
    assert dropped.text == full.text[:cut]
    assert kept.finish_reason == dropped.finish_reason == "stop"
    assert kept.n_tokens == dropped.n_tokens < full.n_tokens
    # the token count stops at the token that completed the stop string
    short = sp.model_copy(update={"max_tokens": kept.n_tokens - 1})
    [[before]] = tiny.generate(PROMPTS[1:], n=1, sampling=short)
    [[upto]] = tiny.generate(
        PROMPTS[1:], n=1, sampling=short.model_copy(update={"max_tokens": kept.n_tokens})
    )
    assert stop not in before.text and stop in upto.text


def test_fallback_rows_stopping_early_leave_the_batch(tiny: Sampler) -> None:
    sp = SamplingConfig(temperature=1.0, max_tokens=16)
    out = tiny.generate(PROMPTS, n=4, sampling=sp, stop=["e"], seeds=[1, 2])
    assert out == tiny.generate(PROMPTS, n=4, sampling=sp, stop=["e"], seeds=[1, 2])
    flat = [c for comps in out for c in comps]
    for c in flat:
        if c.finish_reason == "stop":
            assert c.text.endswith("e") and c.text.count("e") == 1 and c.n_tokens < 16
        else:
            assert "e" not in c.text and c.n_tokens == 16
    assert len({c.n_tokens for c in flat}) > 1, "rows should finish at different steps"


def test_fallback_prompt_too_long_gets_empty_length(tiny_model_dir: Path) -> None:
    with Sampler(tiny_model_dir, HF.model_copy(update={"max_model_len": 64})) as sampler:
        out = sampler.generate(["word " * 200, "short"], n=2, sampling=SamplingConfig(max_tokens=100))
    assert out[0] == [Completion("", 0, "length")] * 2
    assert all(c.finish_reason == "length" and 0 < c.n_tokens <= 64 for c in out[1])


def test_counters_add_up_the_prompt_and_generated_tokens(tiny_model_dir: Path) -> None:
    with Sampler(tiny_model_dir, HF) as sampler:
        assert sampler.counters()["tokens_in"] == 0 and sampler.counters()["start_s"] > 0
        out = sampler.generate(PROMPTS, n=3, sampling=SamplingConfig(max_tokens=5), seeds=[1, 2])
        got = sampler.counters()
    prompt_tokens = sum(len(ids) for ids in sampler.tokenizer(PROMPTS)["input_ids"])
    assert got["tokens_in"] == prompt_tokens  # a prompt of n samples counts once
    assert got["tokens_out"] == sum(c.n_tokens for comps in out for c in comps) == 2 * 3 * 5
    assert got["device"] == "cpu"


def test_load_serves_another_fine_tune_as_a_fresh_engine_would(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model of the same architecture and tokenizer gets its weights swapped in (one start); its samples
    equal those of a sampler opened on it."""
    import torch
    from transformers import AutoModelForCausalLM

    other = tmp_path / "tuned"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # other weights, same shapes
    model.save_pretrained(other)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    sp = SamplingConfig(temperature=1.0, max_tokens=6)
    with Sampler(other, HF) as fresh:
        expected = fresh.generate(PROMPTS, n=2, sampling=sp, seeds=[5, 6])
    with Sampler(tiny_model_dir, HF) as sampler:
        before = sampler.generate(PROMPTS, n=2, sampling=sp, seeds=[5, 6])
        started = sampler.start_s
        sampler.load(other)
        swapped = sampler.generate(PROMPTS, n=2, sampling=sp, seeds=[5, 6])
        assert sampler.model_dir == str(other) and sampler.start_s > started  # the swap counts as start time
    assert swapped == expected and swapped != before


def test_generate_checks_seeds(tiny: Sampler) -> None:
    with pytest.raises(ValueError, match="one seed per prompt"):
        tiny.generate(PROMPTS, n=1, sampling=SamplingConfig(max_tokens=2), seeds=[1])
    assert tiny.generate([], n=3, sampling=SamplingConfig()) == []


def test_auto_falls_back_with_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # what a machine without vLLM looks like to `import vllm`
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("auto") == "transformers"
    assert any(r.levelno == logging.WARNING and "transformers fallback" in r.message for r in caplog.records)
    assert resolve_backend("vllm") == "vllm"


def test_seeds_distinct_and_spread() -> None:
    seeds = {request_seed(0, r, p, k) for r in (1, 2) for p in range(50) for k in range(8)}
    assert len(seeds) == 2 * 50 * 8
    assert request_seed(7, 1, 3, 2) == request_seed(7, 1, 3, 2)
    # vLLM seeds child j with seed + j: engine seeds of neighbouring requests must be far apart
    assert abs(engine_seed(1) - engine_seed(2)) > 1 << 20
    assert engine_seed(5) == engine_seed(5) < 1 << 63
    with pytest.raises(ValueError):
        request_seed(0, 1, 1 << 24)


def test_importing_sampling_does_not_import_vllm() -> None:
    code = "import sys, variational.engines.sampling, tasks.sample_posterior, tasks.rollouts; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- vLLM (slow)


@pytest.fixture(scope="module")
def vllm_sampler(embedded_model_dir: Path) -> Sampler:
    pytest.importorskip("vllm")
    engine = EngineConfig(
        backend="vllm", dtype="float32", max_model_len=1024, max_num_seqs=32, kv_cache_gib=0.5
    )
    with Sampler(embedded_model_dir, engine) as sampler:
        yield sampler


QUESTIONS = [
    "<|im_start|>user\nWhat is 2+2? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a sentence about the sea.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.slow
def test_vllm_n_samples_distinct_and_reproducible(vllm_sampler: Sampler) -> None:
    sp = SamplingConfig(temperature=0.9, max_tokens=24)
    first = vllm_sampler.generate(QUESTIONS, n=4, sampling=sp, seeds=[0, 1, 2], stop=["."])
    again = vllm_sampler.generate(QUESTIONS, n=4, sampling=sp, seeds=[0, 1, 2], stop=["."])
    assert [[c.text for c in cs] for cs in first] == [[c.text for c in cs] for cs in again]
    for comps in first:
        assert len({c.text for c in comps}) == 4
        for c in comps:
            assert c.finish_reason in ("stop", "length") and 0 < c.n_tokens <= 24
            if "." in c.text:  # the stop string ends the text and is kept
                assert c.text.endswith(".") and c.text.count(".") == 1 and c.finish_reason == "stop"
    assert any(c.text.endswith(".") for comps in first for c in comps)
    dropped = vllm_sampler.generate(
        QUESTIONS, n=4, sampling=sp, seeds=[0, 1, 2], stop=["."], include_stop=False
    )
    assert all("." not in c.text for comps in dropped for c in comps)


@pytest.mark.slow
def test_vllm_greedy_matches_transformers_fallback(vllm_sampler: Sampler, embedded_model_dir: Path) -> None:
    """Same prompt ids, same stop rule, same token count: greedy fp32 outputs agree across backends."""
    greedy = SamplingConfig(temperature=0, max_tokens=16)
    ours = vllm_sampler.generate(QUESTIONS, n=1, sampling=greedy, stop=["."])
    engine = EngineConfig(backend="transformers", dtype="float32", max_model_len=1024)
    with Sampler(embedded_model_dir, engine) as hf:
        theirs = hf.generate(QUESTIONS, n=1, sampling=greedy, stop=["."])
    assert ours == theirs


@pytest.mark.slow
def test_vllm_load_serves_a_fine_tune_as_a_fresh_engine(
    vllm_sampler: Sampler, embedded_model_dir: Path, tmp_path: Path
) -> None:
    """Sampler.load swaps a model's weights into the running engine (the eval stage's one start for three
    models): its samples equal a fresh engine's on that model, the tied lm-head included (issue 21: the
    reload alone left the head on the old embeddings), and loading the first model back restores it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tuned = tmp_path / "tuned"
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.05)  # the tied head moves with the embeddings
        model.model.layers[0].mlp.down_proj.weight.mul_(0.9)
    model.save_pretrained(tuned)
    AutoTokenizer.from_pretrained(embedded_model_dir).save_pretrained(tuned)
    sp = SamplingConfig(temperature=0.9, max_tokens=24)
    before = vllm_sampler.generate(QUESTIONS, n=2, sampling=sp, seeds=[0, 1, 2])
    with Sampler(tuned, vllm_sampler.engine) as fresh:
        expected = fresh.generate(QUESTIONS, n=2, sampling=sp, seeds=[0, 1, 2])
    vllm_sampler.load(tuned)
    try:
        assert vllm_sampler.generate(QUESTIONS, n=2, sampling=sp, seeds=[0, 1, 2]) == expected != before
    finally:
        vllm_sampler.load(embedded_model_dir)
    assert vllm_sampler.generate(QUESTIONS, n=2, sampling=sp, seeds=[0, 1, 2]) == before
