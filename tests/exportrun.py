"""A small finished run on disk for the export tests: literal upstream tables, `train` built by the real
select core (tasks/select.py), every stage written and recorded through the store as the runner leaves it.

Questions: 0 numina (a rollout answer), 1 ruc (accuracy 0: the reference solution, the Acc fallback), 2 apps
(no eligible trace: the original again, origin -1; its question holds ChatML markup), 3 numina (a rollout
answer with text between the thought and the solution section, which the Bespoke schema cannot carry).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl

from tasks.finetune import final_examples
from tasks.select import select
from variational import templates
from variational.analysis.metrics import summarize
from variational.config import load_config
from variational.pipeline.store import StageStore, begin_run, record_stage

RUN = "toy"
END = templates.END_SOLUTION
BEGIN = templates.BEGIN_SOLUTION


def problems() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "prompt_idx": [0, 1, 2, 3],
            "source": ["numina/10", "ruc/4", "apps/7", "numina/12"],
            "kind": ["math", "math", "code", "math"],
            "question": [
                "Return your final response within \\boxed{}. What is 2 + 3?",
                "Which is heavier — 1 kg of feathers or 1 kg of iron? ☺",
                "Print the line <|im_end|>\n<|im_start|>user\nhello  ",
                "Return your final response within \\boxed{}.  Compute 6 × 7.\n",
            ],
            "think_ref": [
                "I add 2 and 3.\n\nThat is 5.\n\n",
                "Both weigh 1 kg.",
                "Use print.",
                "6 × 7 = 42.",
            ],
            "solution_ref": [
                "\n\n2 + 3 = \\boxed{5}\n\n",
                "\n\nNeither: they weigh the same.\n\n",
                "\n\n```python\nprint('hello')\n```\n\n",
                "\n\n\\boxed{42}\n\n",
            ],
            "gold": [["5"], [], [], ["42"]],
            "tests": [None, None, '{"inputs": [""], "outputs": ["hello\\n"]}', None],
        }
    )


def posterior_samples() -> pl.DataFrame:
    thinks = {(p, s): f"posterior thought {p}.{s}\n\nstep two" for p in range(4) for s in range(2)}
    return pl.DataFrame(
        [
            {"prompt_idx": p, "sample_idx": s, "round": 1, "think": t, "think_len": 6, "format_ok": True}
            for (p, s), t in thinks.items()
        ]
    )


def weights() -> pl.DataFrame:
    # 0: both eligible, sample 1 selected; 1: ruc fallback, sample 0 selected with accuracy 0; 2: nothing
    # eligible; 3: sample 0 selected
    return pl.DataFrame(
        {
            "prompt_idx": [0, 0, 1, 1, 2, 2, 3, 3],
            "sample_idx": [0, 1, 0, 1, 0, 1, 0, 1],
            "round": [1] * 8,
            "estimator": ["acc"] * 8,
            "source": ["numina/10"] * 2 + ["ruc/4"] * 2 + ["apps/7"] * 2 + ["numina/12"] * 2,
            "accuracy": [0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            "eligible": [True, True, True, True, False, False, True, False],
            "log_rho": [-2.0, -1.0, -1.5, -2.5, None, None, -0.5, None],
            "rho_tilde": [0.25, 0.75, 0.6, 0.4, None, None, 1.0, None],
            "selected": [False, True, True, False, False, False, True, False],
        }
    )


def rollouts_and_verdicts() -> tuple[pl.DataFrame, pl.DataFrame]:
    texts = {
        (0, 1, 0): f"_thought|>\n\n{BEGIN}\n\nwrong \\boxed{{6}}{END}",
        (0, 1, 1): f"_thought|>\n\n{BEGIN}\n\n2 + 3 = \\boxed{{5}}\n\n{END}",
        (3, 0, 0): f"_thought|>\n\nA detour first.\n\n{BEGIN}\n\n\\boxed{{42}}",  # no stop string kept
    }
    keys = list(texts)
    rollouts = pl.DataFrame(
        {
            "prompt_idx": [k[0] for k in keys],
            "sample_idx": [k[1] for k in keys],
            "rollout_idx": [k[2] for k in keys],
        }
    ).with_columns(text=pl.Series(list(texts.values())))
    verdicts = rollouts.select("prompt_idx", "sample_idx", "rollout_idx").with_columns(
        correct=pl.Series([False, True, True]), status=pl.Series(["wrong", "ok", "ok"])
    )
    return rollouts, verdicts


def train() -> pl.DataFrame:
    rollouts, verdicts = rollouts_and_verdicts()
    return select(problems(), weights(), posterior_samples(), rollouts, verdicts, "17k-mix", "acc")


def eval_rows() -> pl.DataFrame:
    rows = [
        {
            "model": m,
            "benchmark": "heldout",
            "problem_id": f"h{p}",
            "sample": s,
            "correct": (p + s + i) % 2 == 0,
        }
        for i, m in enumerate(("base", "pi_theta0", "pi_theta"))
        for p in range(3)
        for s in range(2)
    ]
    return pl.DataFrame(rows).with_columns(status=pl.lit("ok"))


def write_stage(
    root: Path,
    name: str,
    fp: str,
    df: pl.DataFrame,
    *,
    computed: bool = True,
    model: Path | None = None,
    **extra,
) -> dict:
    """One finished stage as the runner leaves it: shard, optional model folder and side table, manifest,
    run.json entry."""
    store = StageStore(root, RUN, name, fp)
    store.write_shard(0, df)
    if model is not None:
        shutil.copytree(model, store.model_dir)
    sides = extra.pop("sides", {})
    for side, table in sides.items():
        store.write_side(side, table)
    manifest = store.finish(round_=1, extra_files=tuple(f"{s}.parquet" for s in sides), **extra)
    record_stage(root, RUN, manifest, computed=computed)
    return manifest


def build_run(root: Path, model_dir: Path) -> Path:
    """The toy run (the tiny config) under `root`, each stage in the folder of the fingerprint the flow's
    DAG gives it, so the card's lineage can say "same"; `model_dir` stands in for the trained pi_theta."""
    from flows.recipe import dag

    config = load_config("tiny", [f"name={RUN}", f"data_root={root}"]).model_dump(mode="json")
    fingerprints = {call.stage.name: call.fingerprint for call in dag(config) if call.round == 1}
    begin_run(root, RUN, config)
    rollouts, verdicts = rollouts_and_verdicts()
    the_train = train()
    tables = {
        "problems": problems(),
        "pi_theta0": pl.DataFrame({"prompt_idx": [0], "prompt": ["p"], "response": ["r"], "weight": [1.0]}),
        "q_phi": pl.DataFrame({"prompt_idx": [0], "prompt": ["p"], "response": ["r"], "weight": [1.0]}),
        "posterior_samples": posterior_samples(),
        "logps": pl.DataFrame(
            {"prompt_idx": [0], "sample_idx": [0], "model": ["q_phi"], "logp_mean": [-0.5]}
        ),
        "rollouts": rollouts,
        "verdicts": verdicts,
        "weights": weights(),
        "train": the_train,
    }
    for name, df in tables.items():
        write_stage(root, name, fingerprints[name], df, computed=name != "problems")
    metrics = {"steps": 2, "examples": the_train.height, "tokens": 900, "final_loss": 0.75}
    write_stage(
        root,
        "pi_theta",
        fingerprints["pi_theta"],
        final_examples(the_train),
        model=model_dir,
        metrics=metrics,
    )
    evals = eval_rows()
    write_stage(root, "eval", fingerprints["eval"], evals, sides={"summary": summarize(evals)})
    return root
