"""variational/analysis/report.py: literal tables for every stage -> report.md + valid PNGs with the right numbers."""

from __future__ import annotations

import struct
from pathlib import Path

import polars as pl
import pytest

from variational.analysis import report
from variational.pipeline.orchestration import publish_markdown
from variational.pipeline.store import StageStore, record_stage

RUN = "toy"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def problems() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "prompt_idx": [0, 1, 2, 3],
            "source": ["numina/0", "numina/1", "ruc/2", "apps/3"],
            "kind": ["math", "math", "math", "code"],
            "question": ["q0", "q1", "q2", "q3"],
            # reference traces: only prompt 0 mentions its gold early (the chance baseline)
            "think_ref": ["42 is what I guess" + "x" * 60, "y" * 80, "z" * 80, "w" * 80],
            "solution_ref": ["\\boxed{42}", "\\boxed{7}", "B", "print(1)"],
            "gold": [["42"], ["7", "7.0"], ["B"], []],
        }
    )


def posterior_samples() -> pl.DataFrame:
    # 2 samples per prompt; the gold shows up in the first quarter for (0,0) and (1,1) only;
    # (1,0) has "7" in its last quarter, which must not count as a leak
    thinks = {
        (0, 0): "42" + "a" * 98,
        (0, 1): "b" * 100,
        (1, 0): "c" * 90 + "7" + "c" * 9,
        (1, 1): "d" * 10 + "7.0" + "d" * 87,
        (2, 0): "e" * 100,
        (2, 1): "f" * 100,
        (3, 0): "g" * 100,
        (3, 1): "h" * 100,
    }
    return pl.DataFrame(
        [
            {
                "prompt_idx": p,
                "sample_idx": s,
                "round": 1,
                "seed": s,
                "prompt": f"prompt {p}",
                "response": think + "<|end_of_thought|>",
                "think": think,
                "think_len": 25,
                "format_ok": True,
                "finish_reason": "stop",
            }
            for (p, s), think in thinks.items()
        ]
    )


def logps() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "prompt_idx": [0],
            "sample_idx": [0],
            "round": [1],
            "model": ["pi_theta0"],
            "span": ["think"],
            "token_logps": [[-0.5, -1.0]],
            "logp_sum": [-1.5],
            "logp_mean": [-0.75],
            "n_tokens": [2],
        },
        schema_overrides={"token_logps": pl.List(pl.Float32)},
    )


def verdicts() -> pl.DataFrame:
    # numina: 3 of 4 rollouts correct; ruc: 0 of 2; apps: 1 of 2
    rows = [
        (0, 0, 0, True),
        (0, 0, 1, True),
        (1, 0, 0, True),
        (1, 1, 0, False),
        (2, 0, 0, False),
        (2, 1, 0, False),
        (3, 0, 0, True),
        (3, 1, 0, False),
    ]
    return pl.DataFrame(
        [
            {
                "prompt_idx": p,
                "sample_idx": s,
                "rollout_idx": r,
                "extracted": "x",
                "correct": ok,
                "status": "ok" if ok else "wrong",
                "verifier": "math",
                "elapsed_ms": 1.0,
            }
            for p, s, r, ok in rows
        ]
    )


def rollouts() -> pl.DataFrame:
    return (
        verdicts()
        .select("prompt_idx", "sample_idx", "rollout_idx", text=pl.lit("_thought|>..."), n_tokens=pl.lit(3))
        .with_columns(finish_reason=pl.lit("stop"))
    )


def weights() -> pl.DataFrame:
    # per-question ESS: prompt 0 -> 1/(0.5²+0.5²) = 2, prompt 1 -> 1, prompt 2 no eligible sample; mean 1.5
    return pl.DataFrame(
        {
            "prompt_idx": [0, 0, 1, 1, 2, 2],
            "sample_idx": [0, 1, 0, 1, 0, 1],
            "estimator": ["acc"] * 6,
            "think_len": [25] * 6,
            "log_ratio_mean": [-0.1] * 6,
            "accuracy": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
            "eligible": [True, True, True, False, False, False],
            "log_rho": [-0.1, -0.1, -0.1, None, None, None],
            "rho_tilde": [0.5, 0.5, 1.0, None, None, None],
            "selected": [True, False, True, False, False, False],
        }
    )


def train() -> pl.DataFrame:
    origins = [-2, -2, -2, -2, 0, 0, 1, -1]
    return pl.DataFrame(
        {
            "row": list(range(len(origins))),
            "prompt": ["p"] * len(origins),
            "response": ["r"] * len(origins),
            "weight": [1.0] * len(origins),
            "origin": origins,
            "prompt_idx": [0, 1, 2, 3, 0, 1, 2, 3],
        }
    )


def eval_table() -> pl.DataFrame:
    # aime: base 1/4 correct, pi_theta 3/4 -> avg@2 25.0 vs 75.0
    rows = []
    for model, oks in {"base": [True, False, False, False], "pi_theta": [True, True, True, False]}.items():
        for i, ok in enumerate(oks):
            rows.append(
                {
                    "model": model,
                    "benchmark": "aime24",
                    "problem_id": f"p{i // 2}",
                    "sample": i % 2,
                    "text": "t",
                    "extracted": "1",
                    "correct": ok,
                    "status": "ok" if ok else "wrong",
                }
            )
    return pl.DataFrame(rows)


# keyed by the stage (folder) names the flow records; sqlview maps them to the table views
TABLES = {
    "ingest": problems,
    "sample_posterior": posterior_samples,
    "score": logps,
    "answer_rollouts": rollouts,
    "verify": verdicts,
    "weights": weights,
    "select": train,
    "evaluate": eval_table,
}


def make_run(root: Path, skip: tuple[str, ...] = ()) -> None:
    for i, (stage, build) in enumerate(TABLES.items()):
        if stage in skip:
            continue
        store = StageStore(root, RUN, stage, f"fp{i:04d}")
        store.write_shard(0, build())
        record_stage(root, RUN, store.finish(round_=1), computed=True)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


EXPECTED_PNGS = [
    "rho_tilde.png",
    "rollout_accuracy.png",
    "think_length.png",
    "hint_leakage.png",
    "selection_origins.png",
    "eval_avg.png",
]


def test_full_report(tmp_path: Path) -> None:
    make_run(tmp_path)
    md_path = report.write_report(tmp_path, RUN)
    assert md_path == tmp_path / RUN / "report" / "report.md"
    md = md_path.read_text()
    for name in EXPECTED_PNGS:
        png = md_path.parent / name
        assert png.exists() and png.stat().st_size > 5000, name
        w, h = png_size(png)
        assert w >= 600 and h >= 400, (name, w, h)
        assert f"]({name})" in md
    assert "No `" not in md  # every table was there
    # weights: 3 questions, 2 with an eligible trace, mean ESS (2 + 1) / 2, 2 selected
    assert "| acc | 3 | 2 | 1.500 | 1.500 | 0.750 | 2 |" in md
    # accuracy by source
    assert "| numina | 4 | 0.750 |" in md and "| ruc | 2 | 0.000 |" in md and "| apps | 2 | 0.500 |" in md
    # leakage: q_phi 2 of 8 traces (the "7" in the last quarter does not count); reference 1 of 4
    assert "- q_φ samples: **25.0%**" in md and "- reference traces: **25.0%**" in md
    # selection origins
    assert "| -2 original | 4 |" in md and "| -1 fallback | 1 |" in md and "| k=0 | 2 |" in md
    # eval summary: base vs pi_theta side by side
    assert "| aime24 | 2 | avg@2 | 25.0 | 75.0 |" in md
    # its 95% bootstrap interval over the 2 problems (per-problem accuracies 0.5/0 and 1/0.5)
    assert "| aime24 | 2 | 95% CI | [0.0, 50.0] | [50.0, 100.0] |" in md
    # the paper's table: the run's aime24 beside the paper's 4B numbers; no Math avg without all five
    assert "| aime24 | 25.00 | 75.00 | — | 27.29 | 31.67 |" in md
    assert "| Math avg | — | — | 21.38 | 51.35 | 55.72 |" in md
    assert "q_φ think length in tokens: median 25" in md


def test_report_says_when_code_ran_without_a_sandbox(tmp_path: Path) -> None:
    make_run(tmp_path)
    assert "WITHOUT a sandbox" not in report.write_report(tmp_path, RUN).read_text()
    unsandboxed = verdicts().with_columns(
        verifier=pl.when(pl.col("prompt_idx") == 3)
        .then(pl.lit("code_tests_unsandboxed"))
        .otherwise("verifier")
    )
    store = StageStore(tmp_path, RUN, "verify", "fp-unsandboxed")
    store.write_shard(0, unsandboxed)
    record_stage(tmp_path, RUN, store.finish(round_=1), computed=True)
    md = report.write_report(tmp_path, RUN).read_text()
    section = md.split("## Answer-rollout accuracy by source")[1].split("## ")[0]
    assert "**Warning: 2 code rows were judged WITHOUT a sandbox** (verify.sandbox: none)" in section


def test_report_without_eval_and_weights_still_renders(tmp_path: Path) -> None:
    make_run(tmp_path, skip=("evaluate", "weights", "select"))
    md = report.write_report(tmp_path, RUN, out_dir=tmp_path / "elsewhere").read_text()
    assert "_No `eval` table in this run (evaluation disabled or not run)._" in md
    assert "_No `weights` table" in md and "_No `train` table" in md
    assert (tmp_path / "elsewhere" / "hint_leakage.png").exists()
    assert not (tmp_path / "elsewhere" / "eval_avg.png").exists()


def test_report_of_a_run_with_only_problems(tmp_path: Path) -> None:
    make_run(tmp_path, skip=tuple(t for t in TABLES if t != "ingest"))
    md = report.write_report(tmp_path, RUN).read_text()
    assert "think_length.png" in md  # reference traces alone still plot
    assert "_No `verdicts` table" in md and "_No `posterior_samples` table" in md


def test_unknown_run_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no run 'nope'"):
        report.write_report(tmp_path, "nope")


def test_artifact_markdown_inlines_tables_and_names_image_folder(tmp_path: Path) -> None:
    make_run(tmp_path)
    md_path = report.write_report(tmp_path, RUN, out_dir=tmp_path / "custom")
    key, text = report.artifact_markdown(md_path)
    assert key == "report-toy"
    assert "![" not in text and f"`{md_path.parent / 'eval_avg.png'}`" in text
    assert "| aime24 | 2 | avg@2 | 25.0 | 75.0 |" in text
    assert publish_markdown(key, text, "run report") is None  # outside a flow run: nothing to publish to


def test_leak_flags_literal() -> None:
    df = pl.DataFrame(
        {
            "source": ["a", "a", "a"],
            "think": ["x1yyyyyyyy", "yyyyyyyy1x", None],
            "gold": [["1"], ["1"], ["1"]],
        }
    )
    assert report.leak_flags(df, "think").sort("_row")["leaked"].to_list() == [True, False, False]


def test_report_of_empty_tables_and_no_eligible_weights(tmp_path: Path) -> None:
    for i, (stage, build) in enumerate(TABLES.items()):
        df = build()
        df = (
            df.with_columns(eligible=False, rho_tilde=pl.lit(None, pl.Float64))
            if stage == "weights"
            else df.clear()
        )
        store = StageStore(tmp_path, RUN, stage, f"fp{i:04d}")
        store.write_shard(0, df)
        record_stage(tmp_path, RUN, store.finish(round_=1), computed=True)
    md = report.write_report(tmp_path, RUN).read_text()
    assert "| acc | 3 | — |" in md  # questions counted, none with an eligible trace
    assert "## Evaluation" in md


def test_verdicts_of_unknown_prompts_group_as_unknown(tmp_path: Path) -> None:
    make_run(tmp_path, skip=("evaluate",))
    extra = verdicts().with_columns(prompt_idx=pl.lit(99, pl.Int64))
    store = StageStore(tmp_path, RUN, "verify", "fp-extra")
    store.write_shard(0, pl.concat([verdicts(), extra]))
    record_stage(tmp_path, RUN, store.finish(round_=1), computed=True)
    md = report.write_report(tmp_path, RUN).read_text()
    assert "| unknown | 8 | 0.500 |" in md
