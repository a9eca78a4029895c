"""Build the shipped evaluation sets that are not plain copies of a math benchmark (deterministic; rerun).

Out (variational/data/eval/):
- heldout-tiny.jsonl: 50 problems the tiny run evaluates on, {id, problem, answer, source}: 26 bare and
  one-step arithmetic items written here (arith-eval/<i>) and the 24 next-easiest GSM8K test items (fewest
  solution steps, then the shortest question) after the 24 that scripts/make_mini_dataset.py trains on.
  Every question is checked to be absent from variational/data/mini_stratos.jsonl (by whitespace-collapsed
  text) so the tiny evaluation is held out.
- mmlu_pro-2000.jsonl: the stratified MMLU-Pro test subset of shared/data, unchanged.
- mmlu_pro-tiny.jsonl: 8 of those rows, one per category for the 8 largest categories, the shortest question.
- minerva-full.jsonl, gsm8k-full.jsonl: every row of Minerva-Math and the GSM8K test split, {id, problem,
  answer, source} as in shared/data (text verbatim): benchmark sets the decontamination checks
  (variational/data/decontamination.py); no shipped config evaluates them.

Usage: python scripts/make_eval_sets.py [--shared /work/shared/data]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# scripts/ is this script's sys.path[0]: the ranking, the prefix and the writer are the training set's own
from make_mini_dataset import BOXED_PREFIX, REPO, ranked_gsm8k, write_jsonl

EVAL = REPO / "variational" / "data" / "eval"
MINI = REPO / "variational" / "data" / "mini_stratos.jsonl"
N_ARITH, N_GSM8K, SKIP_GSM8K, N_MMLU_TINY = 26, 24, 24, 8

# (question template, answer formula) with a, b, c drawn per item; worded unlike the mini training set
ARITH = [
    ("What is {a} + {b}?", "a + b"),
    ("What is {s} - {b}?", "s - b"),
    ("What is {a} times {b}?", "a * b"),
    ("Compute {a} + {b} + {c}.", "a + b + c"),
    ("A farmer has {a} cows and buys {b} more. How many cows does the farmer have?", "a + b"),
    ("There are {s} birds on a fence. {b} fly away. How many birds are still on the fence?", "s - b"),
    ("Each bag has {a} candies. How many candies are in {b} bags?", "a * b"),
    ("A shelf has {a} books on top and {b} books on the bottom. How many books are on the shelf?", "a + b"),
    ("Kim baked {p} cookies and put them into {b} equal boxes. How many cookies are in each box?", "p // b"),
    ("A car park has {a} rows of {b} cars. How many cars are there?", "a * b"),
    ("Leo had {s} coins and spent {b}. How many coins does he have left?", "s - b"),
    ("A class has {a} girls and {b} boys. How many children are in the class?", "a + b"),
    ("What is double {a}?", "2 * a"),
]


def arith_items(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        template, formula = ARITH[i % len(ARITH)]
        a, b, c = rng.randint(3, 15), rng.randint(2, 9), rng.randint(1, 9)
        nums = dict(a=a, b=b, c=c, s=a + b, p=a * b)
        answer = eval(formula, {}, nums)  # formulas are the literals above
        items.append(
            {
                "id": f"arith-eval/{i}",
                "problem": template.format(**nums),
                "answer": str(answer),
                "source": "arith-eval",
            }
        )
    return items


def gsm8k_items(path: Path, skip: int, n: int) -> list[dict]:
    """GSM8K test items skip..skip+n in the order make_mini_dataset.py trains on the head of."""
    items = ranked_gsm8k(path)
    return [
        {
            "id": it["id"],
            "problem": " ".join(it["problem"].split()),
            "answer": it["answer"],
            "source": "gsm8k",
        }
        for it in items[skip : skip + n]
    ]


def training_questions() -> set[str]:
    rows = [json.loads(line) for line in MINI.read_text().splitlines()]
    users = [r["conversations"][0]["value"].removeprefix(BOXED_PREFIX) for r in rows]
    return {" ".join(u.split()) for u in users}


def mmlu_tiny(rows: list[dict], n: int) -> list[dict]:
    by_category: dict[str, list[dict]] = {}
    for r in rows:
        by_category.setdefault(r["category"], []).append(r)
    largest = sorted(by_category, key=lambda c: (-len(by_category[c]), c))[:n]
    picks = [min(by_category[c], key=lambda r: (len(r["question"]), r["question_id"])) for c in largest]
    return sorted(picks, key=lambda r: r["question_id"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    heldout = arith_items(N_ARITH) + gsm8k_items(args.shared / "gsm8k_test.jsonl", SKIP_GSM8K, N_GSM8K)
    seen = training_questions()
    if leaked := [it["id"] for it in heldout if " ".join(it["problem"].split()) in seen]:
        raise SystemExit(f"held-out items also in mini_stratos.jsonl: {leaked}")
    write_jsonl(heldout, EVAL / "heldout-tiny.jsonl")
    mmlu = [
        json.loads(line)
        for line in (args.shared / "mmlu_pro_test_stratified2000.jsonl").read_text().splitlines()
    ]
    write_jsonl(mmlu, EVAL / "mmlu_pro-2000.jsonl")
    write_jsonl(mmlu_tiny(mmlu, N_MMLU_TINY), EVAL / "mmlu_pro-tiny.jsonl")
    for bench, name in (("minerva", "minerva_math"), ("gsm8k", "gsm8k_test")):
        items = [json.loads(line) for line in (args.shared / f"{name}.jsonl").read_text().splitlines()]
        keep = [{k: it[k] for k in ("id", "problem", "answer", "source")} for it in items]
        write_jsonl(keep, EVAL / f"{bench}-full.jsonl")


if __name__ == "__main__":
    main()
