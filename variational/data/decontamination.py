"""Decontamination: word n-gram overlap between training texts and benchmark problems.

In:  texts (prompt_idx, field, text): the training questions and reference solutions; references (benchmark,
     problem_id, problem): the problems of the shipped sets named in `data.decontamination.against` and of
     the config's `eval.benchmarks` (`reference_specs` + `reference_problems`, every row: `limit` ignored).
Out: `find_contamination` -> CONTAMINATION_SCHEMA, one row per (prompt_idx, benchmark, problem_id) that
     passes: the field that matched, n, overlap, shared n-grams and the first matching n-gram (normalised).

Normalisation (`normalised`, applied to both sides), in this order:
1. Unicode NFKC (full-width characters, ligatures, non-breaking spaces become plain ones);
2. LaTeX: sizing and style commands are dropped (\\left \\right \\big \\Big \\bigl \\bigr \\Bigl \\Bigr \\bigg
   \\Bigg \\displaystyle \\textstyle \\limits \\nolimits), text wrappers are dropped and their argument kept
   (\\text \\textbf \\textit \\textrm \\mathrm \\mathbf \\mathit \\operatorname \\mbox), \\quad and \\qquad are
   spaces, spellings of one symbol become one (\\dfrac \\tfrac -> \\frac, \\dbinom \\tbinom -> \\binom, \\leq ->
   \\le, \\geq -> \\ge, \\neq -> \\ne, \\ldots \\cdots -> \\dots); every other command keeps its name as a
   word (`\\frac{m}{n}` reads "frac m n");
3. lower case;
4. every run of characters that are not letters or digits (punctuation, `$`, braces, backslashes, operators,
   whitespace) becomes one space. The words are what remains, split on the spaces.

Rule: for each n in `ngrams` (default 13, then 8), overlap = the share of a benchmark problem's distinct
n-grams that occur in one training text (its question, or its reference solution). A (row, problem) pair is
contaminated when the overlap reaches `min_overlap` (default 0.5) for some n; it is reported at the first such
n of the list. The share is the benchmark problem's, so a long training text that contains a problem under a
new lead-in sentence scores 1.0, while one boilerplate phrase ("... where m and n are relatively prime
positive integers. Find m+n.") shared with a 60-word AIME problem scores about 0.3. A problem with fewer
words than the smallest n has no n-gram and cannot be matched (`too_short` counts them).

Speed: each word is hashed once (polars), an n-gram is a 64-bit polynomial of its word hashes (numpy,
wrapping arithmetic), and the training n-grams are semi-joined against the set of benchmark n-grams before
anything is grouped, so the work grows with the number of words (bench/bench.py, section decontamination).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from variational.config import BenchmarkConfig
from variational.data.benchmarks import benchmark_hash, load_benchmark

CONTAMINATION_SCHEMA = {
    "prompt_idx": pl.Int64,
    "benchmark": pl.String,
    "problem_id": pl.String,
    "field": pl.String,  # which training text matched: question or solution
    "n": pl.Int64,
    "overlap": pl.Float64,  # share of the benchmark problem's distinct n-grams found in that text
    "shared": pl.Int64,  # how many of them
    "ngram": pl.String,  # the first of them in the training text, normalised
}
TEXT_SCHEMA = {"prompt_idx": pl.Int64, "field": pl.String, "text": pl.String}
REFERENCE_SCHEMA = {"benchmark": pl.String, "problem_id": pl.String, "problem": pl.String}
# registry.REFERENCE_SETS -> (shipped file under variational/data/eval, grader): the full sets
REFERENCE_FILES = {
    "aime24": ("aime24-full", "math"),
    "aime25": ("aime25-full", "math"),
    "amc23": ("amc23-full", "math"),
    "math500": ("math500-full", "math"),
    "olympiadbench": ("olympiadbench-full", "math"),
    "minerva": ("minerva-full", "math"),
    "gsm8k": ("gsm8k-full", "math"),
    "mmlu_pro": ("mmlu_pro-2000", "mmlu_pro"),  # a stratified 2,000 of the 12,032 test questions
    "heldout-tiny": ("heldout-tiny", "math"),
}
_DROPPED = (
    r"left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|bigg|Bigg|big|Big|displaystyle|textstyle|nolimits|limits"
)
_WRAPPERS = r"text|textbf|textit|textrm|mathrm|mathbf|mathit|operatorname|mbox"
_ALIASES = {"\\dfrac": "\\frac", "\\tfrac": "\\frac", "\\dbinom": "\\binom", "\\tbinom": "\\binom"}
_ALIASES |= {"\\leq": "\\le", "\\geq": "\\ge", "\\neq": "\\ne", "\\ldots": "\\dots", "\\cdots": "\\dots"}
_ALIASES |= {"\\qquad": " ", "\\quad": " "}
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the polynomial n-gram hash


# ---------------------------------------------------------------- normalisation


def normalised(text: pl.Expr) -> pl.Expr:
    """The normalised form of a text column (module docstring, steps 1-4): lower-case words, one space apart."""
    out = text.str.normalize("NFKC")
    # a command name ends at a non-letter: `\leftarrow` is not `\left` + "arrow"
    out = out.str.replace_all(rf"\\(?:{_DROPPED})([^a-zA-Z]|$)", " ${1}")
    out = out.str.replace_all(rf"\\(?:{_WRAPPERS})\s*\{{", " ")
    out = out.str.replace_many(list(_ALIASES), list(_ALIASES.values()))  # one pass, literal
    return out.str.to_lowercase().str.replace_all(r"[^\p{L}\p{N}]+", " ").str.strip_chars()


def normalise(text: str) -> str:
    """`normalised` for one string."""
    return pl.select(normalised(pl.lit(text, pl.String))).item()


def words_of(texts: pl.Series) -> pl.Series:
    """Each text -> its list of normalised words (an empty text gives an empty list)."""
    frame = pl.DataFrame({"t": texts.cast(pl.String).fill_null("")})
    return frame.select(normalised(pl.col("t")).str.split(" ").list.filter(pl.element() != ""))["t"]


# ---------------------------------------------------------------- n-grams


class Words:
    """The normalised words of some texts, and every word flattened: (text index, position, 64-bit hash)."""

    def __init__(self, texts: pl.Series):
        self.lists = words_of(texts)
        flat = (
            pl.DataFrame({"w": self.lists})
            .with_row_index("t")
            .explode("w")
            .drop_nulls("w")
            .with_columns(pos=pl.int_range(pl.len()).over("t"), h=pl.col("w").hash(seed=17))
        )
        self.t = flat["t"].to_numpy()
        self.pos = flat["pos"].to_numpy().astype(np.int64)
        self.h = flat["h"].to_numpy().astype(np.uint64)

    def ngram(self, t: int, pos: int, n: int) -> str:
        return " ".join(self.lists[t][pos : pos + n].to_list())


def ngram_hashes(words: Words, n: int) -> pl.DataFrame:
    """(t, pos, gram): one row per n-gram that lies inside one text; `t` indexes the texts, pos is the
    n-gram's first word. gram = Σ_j h(word_{pos+j}) · MIX^(n-1-j) mod 2^64."""
    starts = len(words.h) - n + 1
    if starts <= 0:
        return pl.DataFrame(schema={"t": pl.UInt32, "pos": pl.Int64, "gram": pl.UInt64})
    gram = words.h[:starts].copy()
    with np.errstate(over="ignore"):  # the hash is meant to wrap
        for j in range(1, n):
            np.multiply(gram, _MIX, out=gram)
            np.add(gram, words.h[j : j + starts], out=gram)
    inside = words.t[:starts] == words.t[n - 1 :]
    return pl.DataFrame(
        {"t": words.t[:starts][inside], "pos": words.pos[:starts][inside], "gram": gram[inside]},
        schema={"t": pl.UInt32, "pos": pl.Int64, "gram": pl.UInt64},
    )


def _pairs(texts: Words, refs: Words, n: int, min_overlap: float) -> pl.DataFrame:
    """(t, r, n, overlap, shared, pos) of every (text, reference) pair whose overlap at n passes."""
    ref_grams = ngram_hashes(refs, n).unique(["t", "gram"]).rename({"t": "r"}).drop("pos")
    totals = ref_grams.group_by("r").agg(total=pl.len())
    text_grams = (
        ngram_hashes(texts, n)
        .join(ref_grams.select("gram").unique(), on="gram", how="semi")  # the few n-grams that can match
        .group_by("t", "gram")
        .agg(pl.col("pos").min())
    )
    return (
        text_grams.join(ref_grams, on="gram")
        .group_by("t", "r")
        .agg(shared=pl.len(), pos=pl.col("pos").min())
        .join(totals, on="r")
        .with_columns(overlap=pl.col("shared") / pl.col("total"), n=pl.lit(n, pl.Int64))
        .filter(pl.col("overlap") >= min_overlap)
        .drop("total")
    )


def find_contamination(
    texts: pl.DataFrame,
    references: pl.DataFrame,
    ngrams: tuple[int, ...] | list[int] = (13, 8),
    min_overlap: float = 0.5,
) -> pl.DataFrame:
    """texts (TEXT_SCHEMA) x references (REFERENCE_SCHEMA) -> CONTAMINATION_SCHEMA (module docstring), sorted by
    prompt_idx, benchmark, problem_id. Pure: the same inputs give the same rows."""
    if not ngrams or min(ngrams) < 1:
        raise ValueError(f"ngrams must be positive word counts, got {list(ngrams)}")
    if not 0 < min_overlap <= 1:
        raise ValueError(f"min_overlap must be in (0, 1], got {min_overlap}")
    text_words, ref_words = Words(texts["text"]), Words(references["problem"])
    found = [_pairs(text_words, ref_words, n, min_overlap) for n in ngrams]
    pairs = pl.concat(found).with_columns(rank=pl.col("n").replace_strict(list(ngrams), range(len(ngrams))))
    if pairs.is_empty():
        return pl.DataFrame(schema=CONTAMINATION_SCHEMA)
    keyed = pairs.join(texts.select("prompt_idx", "field").with_row_index("t"), on="t").join(
        references.select("benchmark", "problem_id").with_row_index("r"), on="r"
    )
    best = keyed.sort(
        ["prompt_idx", "benchmark", "problem_id", "rank", "overlap", "field"],
        descending=[False, False, False, False, True, False],
    ).unique(["prompt_idx", "benchmark", "problem_id"], keep="first", maintain_order=True)
    ngram = [text_words.ngram(t, pos, n) for t, pos, n in best.select("t", "pos", "n").iter_rows()]
    return best.with_columns(ngram=pl.Series(ngram, dtype=pl.String)).select(
        [pl.col(c).cast(dtype) for c, dtype in CONTAMINATION_SCHEMA.items()]
    )


def too_short(references: pl.DataFrame, n: int) -> pl.DataFrame:
    """benchmark -> how many of its problems have fewer than n words (no n-gram: never matched)."""
    short = references.with_columns(words=words_of(references["problem"]).list.len() < n)
    return short.group_by("benchmark", maintain_order=True).agg(too_short=pl.col("words").sum())


# ---------------------------------------------------------------- the benchmark sets


def shipped_spec(name: str) -> BenchmarkConfig:
    """The spec of one shipped reference set (registry.REFERENCE_SETS)."""
    if name not in REFERENCE_FILES:
        raise ValueError(f"no shipped benchmark set {name!r}; have {sorted(REFERENCE_FILES)}")
    file, grader = REFERENCE_FILES[name]
    return BenchmarkConfig(path=f"embedded:{file}", grader=grader)


def _unloadable(name: str, spec: BenchmarkConfig, err: Exception) -> ValueError:
    return ValueError(
        f"decontamination: benchmark {name!r} ({spec.path}) could not be loaded: {str(err).splitlines()[0]}; "
        "make it loadable (evaluation needs it too) or set data.decontaminate: off"
    )


def _rows_key(name: str, spec: BenchmarkConfig) -> tuple:
    """What decides which problems a spec loads (not k, not the GPQA option order)."""
    try:
        content = benchmark_hash(spec)
    except (OSError, ValueError) as err:  # a local file that is not there
        raise _unloadable(name, spec, err) from None
    return (content, spec.grader, spec.subset, spec.split, spec.release_version, spec.difficulty)


def reference_specs(
    against: list[str], eval_benchmarks: dict[str, BenchmarkConfig]
) -> dict[str, BenchmarkConfig]:
    """The benchmarks to check: every evaluated one (all its rows), then each shipped set of `against` the
    config does not already evaluate (same content); a shipped set whose name an evaluated benchmark of other
    content takes is named by its file instead (`mmlu_pro-2000` beside a hub `mmlu_pro`)."""
    specs = {name: spec.model_copy(update={"limit": None}) for name, spec in eval_benchmarks.items()}
    seen = {_rows_key(name, s) for name, s in specs.items()}
    for name in against:
        spec = shipped_spec(name)
        if _rows_key(name, spec) in seen:
            continue
        specs[REFERENCE_FILES[name][0] if name in specs else name] = spec
    return specs


def reference_identity(specs: dict[str, BenchmarkConfig]) -> dict[str, list]:
    """name -> what its problems depend on (content hash or hub id, and the row filters): for fingerprints."""
    return {name: list(_rows_key(name, spec)) for name, spec in sorted(specs.items())}


def reference_problems(specs: dict[str, BenchmarkConfig]) -> pl.DataFrame:
    """REFERENCE_SCHEMA rows of every spec; a benchmark that cannot be loaded stops with one line naming it."""
    frames = []
    for name, spec in specs.items():
        try:
            rows = load_benchmark(name, spec)
        except (OSError, ValueError, ImportError) as err:  # hub offline or gated, a bad row
            raise _unloadable(name, spec, err) from None
        frames.append(rows.select(pl.lit(name).alias("benchmark"), "problem_id", "problem"))
    return pl.concat(frames) if frames else pl.DataFrame(schema=REFERENCE_SCHEMA)
