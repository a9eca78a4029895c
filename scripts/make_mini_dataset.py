"""Build the shipped mini datasets from /work/shared/data (deterministic; rerun to regenerate).

Out:
- variational/data/mini_stratos.jsonl: rows in the exact Bespoke-Stratos-17k schema {system, conversations}
  plus a `source` column: templated one/two-step arithmetic word problems (arith/<i>), the GSM8K test items
  with the shortest solutions (gsm8k/<id>), and a few hand-written science questions (ruc/<i>) so the ruc
  fallback of the Acc estimator runs. Thinks are 1-4 sentences, so responses stay ~50-150 tokens and
  SmolLM2-135M-Instruct can sometimes solve them.
- variational/data/eval/<bench>.jsonl: 8 rows {id, problem, answer, source} for the tiny config, and
  <bench>-full.jsonl: every row, same fields, for the subset-1k and full-17k configs.

Usage: python scripts/make_mini_dataset.py [--shared /work/shared/data]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from variational.templates import BEGIN_SOLUTION, BEGIN_THOUGHT, END_SOLUTION, END_THOUGHT, PI_SYSTEM, SEP

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "variational" / "data"
BOXED_PREFIX = "Return your final response within \\boxed{}. "  # how Bespoke-Stratos math questions start
N_ARITH, N_GSM8K, EVAL_ROWS = 36, 24, 8

# (question, think, answer): short science/puzzle items standing in for the STILL ("ruc") rows
RUC = [
    (
        "How many legs does an insect have?",
        "Insects are arthropods with three body parts. Each of the three thorax segments carries a pair of legs, so 3 pairs.",
        "6",
    ),
    (
        "Water boils at how many degrees Celsius at sea level?",
        "At standard atmospheric pressure water boils at one hundred degrees on the Celsius scale.",
        "100",
    ),
    (
        "How many planets are in the Solar System?",
        "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune. Pluto is a dwarf planet now. That makes eight.",
        "8",
    ),
    (
        "A triangle has angles of 50 and 60 degrees. What is the third angle in degrees?",
        "The angles of a triangle add up to 180 degrees. 180 - 50 - 60 = 70.",
        "70",
    ),
    (
        "How many hours are in two days?",
        "One day has 24 hours. Two days have 2 * 24 = 48 hours.",
        "48",
    ),
    (
        "What is the atomic number of carbon?",
        "Carbon has six protons in its nucleus, and the atomic number counts the protons.",
        "6",
    ),
]

# (question, think) templates of one/two-step word problems; `ans` is filled from ANSWERS
ARITH = [
    (
        "{name} has {a} apples. {pron} buys {b} more apples. How many apples does {name} have now?",
        "{name} starts with {a} apples and gets {b} more. {a} + {b} = {ans}.",
    ),
    (
        "{name} had {s} stickers and gave {b} of them to a friend. How many stickers are left?",
        "{name} started with {s} stickers and gave away {b}. {s} - {b} = {ans}.",
    ),
    (
        "A box holds {a} pencils. How many pencils are in {b} boxes?",
        "Each box has {a} pencils and there are {b} boxes. {a} * {b} = {ans}.",
    ),
    (
        "{name} has {a} red marbles and {b} blue marbles. {pron} loses {c} marbles. How many marbles are left?",
        "First, {a} + {b} = {s} marbles in total. Then {pron_l} loses {c}, so {s} - {c} = {ans}.",
    ),
    (
        "A bus has {a} rows with {b} seats in each row. {c} seats are empty. How many people are sitting?",
        "There are {a} * {b} = {p} seats. {c} are empty, so {p} - {c} = {ans} people are sitting.",
    ),
    (
        "{name} reads {a} pages every day for {b} days. How many pages does {pron_l} read in total?",
        "{a} pages a day for {b} days is {a} * {b} = {ans} pages.",
    ),
]
ANSWERS = ["a + b", "s - b", "a * b", "s - c", "p - c", "a * b"]
NAMES = [("Tom", "He"), ("Mia", "She"), ("Sam", "He"), ("Lily", "She"), ("Ben", "He"), ("Ava", "She")]


def stratos_row(question: str, think: str, solution: str, source: str) -> dict:
    """One row in the Bespoke-Stratos-17k schema (method.md §5) plus its source."""
    assistant = f"{BEGIN_THOUGHT}{SEP}{think}{SEP}{END_THOUGHT}{SEP}{BEGIN_SOLUTION}{SEP}{solution}{SEP}{END_SOLUTION}"
    return {
        "system": PI_SYSTEM,
        "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": assistant}],
        "source": source,
    }


def arith_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        (template, think_t), formula = ARITH[i % len(ARITH)], ANSWERS[i % len(ARITH)]
        name, pron = NAMES[i % len(NAMES)]
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        nums = dict(a=a, b=b, c=rng.randint(1, min(a, b)), s=a + b, p=a * b)
        nums["ans"] = eval(formula, {}, nums)  # formulas are the literals above
        fields = dict(name=name, pron=pron, pron_l=pron.lower(), **nums)
        think = think_t.format(**fields) + f" So the answer is {nums['ans']}."
        solution = f"The answer is $\\boxed{{{nums['ans']}}}$."
        rows.append(stratos_row(BOXED_PREFIX + template.format(**fields), think, solution, f"arith/{i}"))
    return rows


def solution_steps(item: dict) -> list[str]:
    """A GSM8K solution's steps: its non-empty lines before `####`, calculator annotations removed."""
    lines = item["solution"].split("\n")
    return [re.sub(r"<<[^>]*>>", "", x).strip() for x in lines if x.strip() and not x.startswith("####")]


def ranked_gsm8k(path: Path) -> list[dict]:
    """GSM8K test items with an integer answer, fewest solution steps first (then the shortest question).
    The training set takes the head of this order and scripts/make_eval_sets.py the items after it."""
    items = [json.loads(line) for line in path.read_text().splitlines()]
    items = [it for it in items if re.fullmatch(r"-?\d+", it["answer"])]
    return sorted(items, key=lambda it: (len(solution_steps(it)), len(it["problem"]), it["id"]))


def gsm8k_rows(path: Path, n: int) -> list[dict]:
    """The first n ranked GSM8K test items as long-CoT training rows."""
    rows = []
    for it in ranked_gsm8k(path)[:n]:
        st = solution_steps(it)
        think = (
            "Let me work through it step by step.\n\n"
            + "\n\n".join(st)
            + f"\n\nSo the answer is {it['answer']}."
        )
        solution = f"{st[-1]}\n\nThe final answer is $\\boxed{{{it['answer']}}}$."
        question = " ".join(it["problem"].split())
        rows.append(stratos_row(BOXED_PREFIX + question, think, solution, f"gsm8k/{it['id']}"))
    return rows


def ruc_rows() -> list[dict]:
    return [
        stratos_row(BOXED_PREFIX + q, think + f" The answer is {a}.", f"$\\boxed{{{a}}}$", f"ruc/{i}")
        for i, (q, think, a) in enumerate(RUC)
    ]


def eval_subsets(shared: Path) -> dict[str, list[dict]]:
    """<bench>: 8 rows for the tiny config; <bench>-full: every row (subset-1k / full-17k configs)."""
    out = {}
    for bench in ("math500", "aime24", "aime25", "amc23", "olympiadbench"):
        items = [json.loads(line) for line in (shared / f"{bench}.jsonl").read_text().splitlines()]
        items = [
            {k: it[k] for k in ("id", "problem", "answer", "source")} | {"level": it.get("level")}
            for it in items
        ]
        # the easiest MATH level gives a 135M model a chance to score at all
        small = [it for it in items if it["level"] == 1] if bench == "math500" else items
        out[bench] = [_without_level(it) for it in small[:EVAL_ROWS]]
        out[f"{bench}-full"] = [_without_level(it) for it in items]
    return out


def _without_level(item: dict) -> dict:
    return {k: v for k, v in item.items() if k != "level"}


def interleave(*groups: list[dict]) -> list[dict]:
    """Spread each group evenly over the file, so `limit: N` without a seed still sees every source."""
    keyed = [((i + 0.5) / len(g), gi, row) for gi, g in enumerate(groups) for i, row in enumerate(g)]
    return [row for _, _, row in sorted(keyed, key=lambda t: (t[0], t[1]))]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {path.relative_to(REPO)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    rows = interleave(arith_rows(N_ARITH), gsm8k_rows(args.shared / "gsm8k_test.jsonl", N_GSM8K), ruc_rows())
    write_jsonl(rows, OUT / "mini_stratos.jsonl")
    for bench, items in eval_subsets(args.shared).items():
        write_jsonl(items, OUT / "eval" / f"{bench}.jsonl")


if __name__ == "__main__":
    main()
