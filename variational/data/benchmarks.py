"""Evaluation benchmarks: load one (file, folder, hub), turn its rows into prompts and answers per grader.

In:  a `BenchmarkConfig` (path, grader, subset/split, LiveCodeBench release and difficulty, GPQA shuffle seed)
     and the run's `parity.EvalPrompts` (how `parity` asks: AIME25 question-first, LiveCodeBench starter
     code, the GPQA option order).
Out: `load_benchmark` -> problem_id, problem (raw text), user (the user message of the paper's harness,
     SkyThought 0d190f1, method.md §6), gold (list[str]: accepted answers, or the correct letter),
     tests (the APPS `input_output` JSON string for code, else null).
Graders: math (math-verify in tasks/verify.py), mmlu_pro (letter A-J), gpqa (letter A-D, options shuffled
per question under a fixed seed), code (tests run by tasks/verify.check_code). The harness's own letter
readers (`official_choice`) give the official column of the eval stage.
Also the paper's table: which benchmarks make "Math avg" / "Other avg", and its Qwen3-4B-Base numbers.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import random
import re
import zlib
from pathlib import Path
from typing import Any

import polars as pl

import variational
from variational import parity, templates
from variational.config import BenchmarkConfig
from variational.data import raw
from variational.parity import EvalPrompts

EMBEDDED_EVAL_DIR = Path(variational.__file__).resolve().parent / "data" / "eval"
# Column names seen in public math benchmarks (MATH-500, AIME, OlympiadBench, GSM8K, NuminaMath ...),
# tried in this order; `solution` is a last resort for gold (its last \boxed{} or text after ####).
ID_COLUMNS = ("id", "problem_id", "unique_id", "idx", "question_id", "ID", "Record ID")
PROBLEM_COLUMNS = ("problem", "question", "Problem", "Question", "prompt")
GOLD_COLUMNS = ("answer", "final_answer", "expected_answer", "gold", "ground_truth", "Answer")
SOLUTION_COLUMNS = ("solution", "Solution")
GPQA_OPTION_COLUMNS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
LETTERS = {"mmlu_pro": templates.CHOICE_LETTERS[:10], "gpqa": templates.CHOICE_LETTERS[:4]}
# livecodebench/code_generation_lite: which jsonl files of the hub repo make up each release (its loader
# script's table; `datasets` >= 4 no longer runs loader scripts, so we pass the files ourselves).
LCB_FILES = ["test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl"]
LCB_RELEASES = {f"release_v{i}": LCB_FILES[:i] for i in range(1, 7)} | {"release_latest": LCB_FILES}
SCHEMA = {
    "problem_id": pl.String,
    "problem": pl.String,
    "user": pl.String,
    "gold": pl.List(pl.String),
    "tests": pl.String,
}

# ---------------------------------------------------------------- the paper's table (method.md §7)
MATH_AVG = ("math500", "aime24", "aime25", "amc23", "olympiadbench")
OTHER_AVG = ("gpqa_diamond", "lcb_easy", "lcb_medium", "lcb_hard", "mmlu_pro")
# Qwen3-4B-Base trained on the 17K set, in %; the base model's per-benchmark numbers are not published.
_BS_4B = (84.70, 27.29, 24.17, 70.16, 50.45, 44.95, 71.22, 19.54, 3.25, 63.03)
_OURS_ACC_4B = (88.30, 31.67, 27.29, 75.63, 55.71, 45.33, 80.29, 33.68, 5.79, 65.53)
PAPER_4B: dict[str, dict[str, float]] = {
    "paper Qwen3-4B-Base": {"Math avg": 21.38, "Other avg": 18.26},
    "paper BS-4B†": dict(zip(MATH_AVG + OTHER_AVG, _BS_4B, strict=True))
    | {"Math avg": 51.35, "Other avg": 40.40},
    "paper Ours-Acc PB": dict(zip(MATH_AVG + OTHER_AVG, _OURS_ACC_4B, strict=True))
    | {"Math avg": 55.72, "Other avg": 46.12},
}


def group_average(values: dict[str, float | None], group: tuple[str, ...]) -> float | None:
    """The paper's "Math avg" / "Other avg": the plain mean of the group's five scores; None unless all are there."""
    scores = [values.get(b) for b in group]
    return None if any(s is None for s in scores) else sum(scores) / len(scores)  # type: ignore[misc]


# ---------------------------------------------------------------- files


def benchmark_file(spec: BenchmarkConfig) -> Path | None:
    """The local file or folder behind a benchmark spec; None for a hub id."""
    path = spec.path
    if path.startswith("embedded:"):
        name = path.removeprefix("embedded:")
        file = EMBEDDED_EVAL_DIR / f"{name}.jsonl"
        if not file.exists():
            have = sorted(p.stem for p in EMBEDDED_EVAL_DIR.glob("*.jsonl"))
            raise FileNotFoundError(f"no embedded benchmark {name!r} in {EMBEDDED_EVAL_DIR}; have {have}")
        return file
    local = Path(path).expanduser()
    if local.exists():
        return local
    if local.suffix in (".jsonl", ".json", ".parquet"):
        raise FileNotFoundError(f"benchmark file {path!r} does not exist")
    return None


def benchmark_hash(spec: BenchmarkConfig) -> str:
    """Content hash of a local benchmark (file or folder); the hub id itself for a hub dataset."""
    file = benchmark_file(spec)
    if file is None:
        return f"hub:{spec.path}"
    h = hashlib.sha256()
    for f in sorted(file.rglob("*")) if file.is_dir() else [file]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _dataset_rows(source: str, spec: BenchmarkConfig) -> list[dict[str, Any]]:
    """A hub id or a local folder in the hub's layout, through `datasets` (the real loader, also offline)."""
    import datasets  # heavy; only for hub ids and dataset folders

    kwargs: dict[str, Any] = {}
    if spec.release_version is not None:
        if spec.release_version not in LCB_RELEASES:
            raise ValueError(f"release_version {spec.release_version!r}: use one of {sorted(LCB_RELEASES)}")
        kwargs["data_files"] = LCB_RELEASES[spec.release_version]
    ds = datasets.load_dataset(source, spec.subset, **kwargs)
    split = spec.split or ("test" if "test" in ds else next(iter(ds)))
    if split not in ds:
        raise ValueError(f"benchmark {source!r} has no split {split!r}; it has {list(ds)}")
    return ds[split].to_list()


def read_rows(spec: BenchmarkConfig) -> list[dict[str, Any]]:
    """The benchmark's rows: a local file through the one dataset reader (variational/data/raw.py), a hub id
    or a hub-layout folder through `datasets`. A row that cannot be read stops the load, named."""
    file = benchmark_file(spec)
    if file is None or file.is_dir():
        return _dataset_rows(spec.path if file is None else str(file), spec)
    read = raw.read_rows(str(file))
    if read.rejects:
        bad = read.rejects[0]
        raise ValueError(f"benchmark {spec.path}: {bad['file']} row {bad['file_row']}: {bad['reason']}")
    return [{k: v for k, v in row.items() if k != "row_index"} for row in read.rows]


# ---------------------------------------------------------------- math


def _as_golds(value: Any) -> list[str]:
    """An answer field (str, number, list, 'text #### 18', '... \\boxed{x}') -> accepted answer strings."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [g for v in value for g in _as_golds(v)]
    if isinstance(value, float) and value.is_integer():
        return [str(int(value))]
    text = str(value).strip()
    if "####" in text:  # GSM8K: the final answer follows the last ####
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = templates.last_boxed(text)
    if boxed is not None:
        text = boxed.strip()
    return [text] if text else []


def _pick(rows: list[dict[str, Any]], options: tuple[str, ...]) -> str | None:
    fields = set().union(*(r.keys() for r in rows[:50]))
    return next((c for c in options if c in fields), None)


def _problem_id(row: dict[str, Any], id_col: str | None, i: int) -> str:
    return str(row[id_col]) if id_col and row.get(id_col) is not None else str(i)


def math_problems(
    rows: list[dict[str, Any]], name: str, question_first: bool = False
) -> list[dict[str, Any]]:
    fields = set().union(*(r.keys() for r in rows[:50]))
    id_col, problem_col = _pick(rows, ID_COLUMNS), _pick(rows, PROBLEM_COLUMNS)
    gold_cols = [c for c in GOLD_COLUMNS + SOLUTION_COLUMNS if c in fields]
    if problem_col is None or not gold_cols:
        raise ValueError(
            f"benchmark {name!r}: need a problem column {PROBLEM_COLUMNS} and an answer column "
            f"{GOLD_COLUMNS + SOLUTION_COLUMNS}; found {sorted(fields)}"
        )
    out, missing = [], []
    for i, r in enumerate(rows):
        pid = _problem_id(r, id_col, i)
        gold = next((g for c in gold_cols if (g := _as_golds(r.get(c)))), [])
        if not gold:
            missing.append(pid)
        problem = str(r[problem_col])
        user = templates.math_question(problem, question_first)
        out.append({"problem_id": pid, "problem": problem, "user": user, "gold": gold})
    if missing:
        raise ValueError(
            f"benchmark {name!r}: {len(missing)} rows without a gold answer in {gold_cols} "
            f"(first: {missing[:5]}); fix the file or pick another answer column"
        )
    return out


# ---------------------------------------------------------------- multiple choice


def _require_fields(rows: list[dict[str, Any]], fields: tuple[str, ...], name: str, schema: str) -> None:
    if missing := [f for f in fields if f not in rows[0]]:
        raise ValueError(
            f"benchmark {name!r}: rows lack {missing} of the {schema} schema; have {sorted(rows[0])}"
        )


def mmlu_pro_problems(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """TIGER-Lab/MMLU-Pro rows (question_id, question, options, answer_index) -> the gold letter."""
    _require_fields(rows, ("question", "options", "answer_index"), name, "MMLU-Pro")
    out = []
    for i, r in enumerate(rows):
        options, index = list(r["options"]), int(r["answer_index"])
        if not 0 <= index < len(options) <= 10:
            raise ValueError(f"benchmark {name!r} row {i}: answer_index {index} with {len(options)} options")
        out.append(
            {
                "problem_id": _problem_id(r, "question_id" if "question_id" in r else "id", i),
                "problem": r["question"],
                "user": templates.mmlu_pro_question(r["question"], options),
                "gold": [templates.CHOICE_LETTERS[index]],
            }
        )
    return out


def gpqa_problems(
    rows: list[dict[str, Any]], name: str, seed: int, harness_order: bool = False
) -> list[dict]:
    """Idavidrein/gpqa rows -> the four answers in an order drawn per question from (seed, Record ID), so a
    question's order does not depend on the row order or on other questions. `harness_order` (parity
    official): the harness's order instead, `random.seed(41)` then one `random.shuffle` per row in file
    order, the texts unstripped, the gold the first letter showing the correct answer's text."""
    _require_fields(rows, ("Question", *GPQA_OPTION_COLUMNS), name, "GPQA")
    harness = random.Random(parity.OFFICIAL_GPQA_SEED)
    out = []
    for i, r in enumerate(rows):
        pid = _problem_id(r, "Record ID", i)
        if harness_order:
            shown = [str(r[c]) for c in GPQA_OPTION_COLUMNS]
            harness.shuffle(shown)
            question, gold = str(r["Question"]), shown.index(str(r[GPQA_OPTION_COLUMNS[0]]))
        else:
            options = [str(r[c]).strip() for c in GPQA_OPTION_COLUMNS]
            order = list(range(4))
            random.Random(f"{seed}/{pid}").shuffle(order)
            shown = [options[j] for j in order]
            question, gold = str(r["Question"]).strip(), order.index(0)  # option 0 is the correct answer
        out.append(
            {
                "problem_id": pid,
                "problem": question,
                "user": templates.gpqa_question(question, shown),
                "gold": [templates.CHOICE_LETTERS[gold]],
            }
        )
    return out


_BOXED_LETTER = re.compile(r"^[\s$({\[]*(?:\\text(?:bf)?\{|\\mathrm\{)?\s*\(?([A-P])\)?(?![A-Za-z])")
_ANSWER_IS = re.compile(r"[Aa]nswer(?:\s+is)?\s*:?\s*\**\s*(?:\\boxed\{)?\(?([A-P])\)?(?![A-Za-z])")
_LONE_LETTER = re.compile(r"(?<![\w'’])([A-P])(?![\w'’])")


# The harness's readers (SkyThought 0d190f1 util/math_parsing_util.py), re-stated: no \boxed, no sections.
_GPQA_LETTER = re.compile(r"\b(A|B|C|D)\b")
_MMLU_ANSWER_IS = re.compile(r"answer is \(?([A-J])\)?")
_MMLU_ANSWER_LINE = re.compile(r".*[aA]nswer:\s*([A-J])")
_MMLU_LAST_LETTER = re.compile(r"\b[A-J]\b(?!.*\b[A-J]\b)", re.DOTALL)


def official_choice(text: str | None, grader: str) -> str | None:
    """The letter the harness reads, or None. GPQA: the last standalone A-D of the UPPER-CASED response (an
    English "a" counts as A). MMLU-Pro: the first "answer is (X)" anywhere (case-sensitive, no word boundary
    after the letter), else the first line with "Answer: X" (its last such X), else the last standalone
    A-J."""
    if not text:
        return None
    if grader == "gpqa":
        found = _GPQA_LETTER.findall(text.upper())
        return found[-1] if found else None
    if grader != "mmlu_pro":
        raise ValueError(f"official_choice: grader {grader!r} is not multiple choice (gpqa, mmlu_pro)")
    for pattern in (_MMLU_ANSWER_IS, _MMLU_ANSWER_LINE):
        if m := pattern.search(text):
            return m.group(1)
    m = _MMLU_LAST_LETTER.search(text)
    return m.group(0) if m else None


def extract_choice(text: str | None, letters: str) -> str | None:
    """The chosen letter of a multiple-choice answer, or None.

    Looked for in the solution section when there is one (else the whole text), in this order: the last
    `\\boxed{}` (what the prompt asks for: `B`, `(B)`, `\\text{B}`, `B) 42`), the last "answer is (X)" /
    "Answer: X" (the MMLU-Pro harness's first rule), the last standalone capital letter among `letters`."""
    if not text:
        return None
    region = templates.extract_solution(text) or text
    boxed = templates.last_boxed(region)
    if boxed is not None and (m := _BOXED_LETTER.match(boxed)) and m.group(1) in letters:
        return m.group(1)
    for pattern in (_ANSWER_IS, _LONE_LETTER):
        found = [x for x in pattern.findall(region) if x in letters]
        if found:
            return found[-1]
    return None


# ---------------------------------------------------------------- code (LiveCodeBench)


class _PlainDataUnpickler(pickle.Unpickler):
    """LiveCodeBench's private tests are a pickled str; refuse anything that would import or call code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test-case blob")


def decode_private_tests(value: str | None) -> list[dict[str, Any]]:
    """`private_test_cases` as the hub stores it (base64 of zlib of a pickled JSON string), or plain JSON."""
    if not value:
        return []
    if value.lstrip().startswith("["):
        return json.loads(value)
    blob = _PlainDataUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
    return json.loads(blob) if isinstance(blob, str) else blob


def lcb_input_output(tests: list[dict[str, Any]], fn_name: str | None) -> str:
    """LiveCodeBench tests -> the APPS `input_output` JSON string that tasks/verify.check_code judges.

    stdin: inputs/outputs are the raw strings. functional: each input line is one JSON argument, the
    output one JSON value, wrapped in a one-element list as APPS call-based outputs are; the raw test texts
    ride along (`raw_inputs`, `raw_outputs`) for the harness's own parser (the official column)."""
    if fn_name is None:
        return json.dumps({"inputs": [t["input"] for t in tests], "outputs": [t["output"] for t in tests]})
    inputs = [[json.loads(line) for line in t["input"].split("\n") if line.strip()] for t in tests]
    outputs = [[json.loads(t["output"])] for t in tests]
    raw = {"raw_inputs": [t["input"] for t in tests], "raw_outputs": [t["output"] for t in tests]}
    return json.dumps({"inputs": inputs, "outputs": outputs, "fn_name": fn_name} | raw)


def lcb_problems(rows: list[dict[str, Any]], name: str, starter_code: bool = True) -> list[dict[str, Any]]:
    """livecodebench/code_generation_lite rows -> prompt + tests. Tests: the private ones, as the harness
    grades (the public ones when a copy has no private tests); call-based iff the tests are `functional`.
    `starter_code` False (parity official): the prompt shows none, as the harness's."""
    _require_fields(rows, ("question_id", "question_content", "public_test_cases"), name, "LiveCodeBench")
    out = []
    for r in rows:
        public = json.loads(r["public_test_cases"] or "[]")
        tests = decode_private_tests(r.get("private_test_cases")) or public
        if not tests:
            raise ValueError(f"benchmark {name!r}: problem {r['question_id']} has no test cases")
        call_based = any(t.get("testtype") == "functional" for t in tests)
        fn_name = json.loads(r.get("metadata") or "{}").get("func_name") if call_based else None
        if call_based and not fn_name:
            raise ValueError(
                f"benchmark {name!r}: problem {r['question_id']} has functional tests but no func_name"
            )
        question, starter = r["question_content"], r.get("starter_code") or ""
        out.append(
            {
                "problem_id": str(r["question_id"]),
                "problem": question,
                "user": templates.code_question(question, starter if starter_code else "", call_based),
                "gold": [],
                "tests": lcb_input_output(tests, fn_name),
            }
        )
    return out


# ---------------------------------------------------------------- one entry point


def load_benchmark(
    name: str, spec: BenchmarkConfig, prompts: EvalPrompts = parity.STRICT_PROMPTS
) -> pl.DataFrame:
    """spec -> problem_id, problem, user, gold, tests (see the module docstring); LiveCodeBench rows are
    filtered by difficulty before the first `spec.limit` rows are kept. `prompts`: how the run's parity
    asks (parity.eval_prompts)."""
    rows = read_rows(spec)
    if spec.difficulty is not None:
        rows = [r for r in rows if r.get("difficulty") == spec.difficulty]
    if spec.limit is not None:
        rows = rows[: spec.limit]
    if not rows:
        raise ValueError(f"benchmark {name!r} is empty (path {spec.path!r}, difficulty {spec.difficulty})")
    if spec.grader == "math":
        problems = math_problems(rows, name, name in prompts.question_first)
    elif spec.grader == "mmlu_pro":
        problems = mmlu_pro_problems(rows, name)
    elif spec.grader == "gpqa":
        problems = gpqa_problems(rows, name, spec.shuffle_seed, prompts.gpqa_order == "harness")
    else:
        problems = lcb_problems(rows, name, prompts.starter_code)
    df = pl.DataFrame([{c: p.get(c) for c in SCHEMA} for p in problems], schema=SCHEMA).with_columns(
        pl.col("gold").list.unique(maintain_order=True)
    )
    if df["problem_id"].n_unique() != df.height:
        raise ValueError(f"benchmark {name!r}: duplicate problem ids; give each row a unique id")
    return df
