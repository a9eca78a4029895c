"""tasks/decontaminate.py: the `contamination` and `clean_problems` stages through the runner on a dataset with
a planted AIME24 problem (found, queryable as `contamination`, dropped with `drop`), where they sit in the DAG,
and what their fingerprints follow (the settings recompute `contamination` alone in flag mode)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from flows.recipe import dag
from tasks.decontaminate import CLEAN_PROBLEMS, CONTAMINATION, drop_contaminated, training_texts
from tasks.ingest import PROBLEMS
from variational.analysis.sql import run_sql
from variational.cli import main
from variational.config import load_config
from variational.data.benchmarks import EMBEDDED_EVAL_DIR
from variational.data.raw import embedded_path
from variational.pipeline.runner import run_stage
from variational.pipeline.store import read_stage
from variational.templates import PI_SYSTEM

LEAD_IN = "My teacher gave us this one as homework, and I am stuck on it. "


def planted_dataset(path: Path) -> Path:
    """Five rows of the mini set (not its GSM8K test items), then a row whose question is the AIME24 problem
    aime24-65 under a lead-in."""
    mini = [json.loads(line) for line in embedded_path("embedded:mini_stratos").read_text().splitlines()]
    mini = [r for r in mini if not r["source"].startswith("gsm8k/")][:5]
    aime = [json.loads(line) for line in (EMBEDDED_EVAL_DIR / "aime24-full.jsonl").read_text().splitlines()]
    problem = next(r["problem"] for r in aime if r["id"] == "aime24-65")
    answer = "<|begin_of_thought|>\n\nEqual distances.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n"
    answer += "$\\boxed{104}$\n\n<|end_of_solution|>"
    planted = {
        "system": PI_SYSTEM,
        "conversations": [
            {"from": "user", "value": LEAD_IN + problem},
            {"from": "assistant", "value": answer},
        ],
        "source": "planted/0",
    }
    path.write_text("".join(json.dumps(r) + "\n" for r in [*mini, planted]))
    return path


def test_training_texts_are_questions_and_reference_solutions() -> None:
    problems = pl.DataFrame(
        {"prompt_idx": [3, 4], "question": ["q3", "q4"], "solution_ref": ["s3", "  "]}, schema_overrides={}
    )
    assert training_texts(problems).rows() == [
        (3, "question", "q3"),
        (4, "question", "q4"),
        (3, "solution", "s3"),
    ]


def test_the_stages_find_the_planted_problem_and_drop_it(tmp_path: Path) -> None:
    dataset = planted_dataset(tmp_path / "planted.jsonl")
    cfg = load_config("tiny", [f"data_root={tmp_path}", f"data.dataset={dataset}"]).model_dump(mode="json")
    problems = run_stage(PROBLEMS, cfg, {})
    found_ref = run_stage(CONTAMINATION, cfg, {"problems": problems})
    found = read_stage(tmp_path, found_ref)
    assert found.select("prompt_idx", "benchmark", "problem_id", "field", "n").rows() == [
        (5, "aime24", "aime24-65", "question", 13)
    ]
    assert found_ref["contaminated_rows"] == 1 and found_ref["references"]["aime24"] == 30
    assert "gsm8k" not in found_ref["references"]  # tiny leaves GSM8K out (configs/tiny.yaml)
    assert {"heldout", "mmlu_pro-tiny"} <= set(found_ref["references"])  # its eval benchmarks
    assert "| aime24 | 30 | 0 | 1 | 1 |" in found_ref["summary"]
    view = run_sql(tmp_path, "tiny", "select prompt_idx, benchmark, overlap from contamination")
    assert view.rows() == [(5, "aime24", 1.0)]
    clean_ref = run_stage(CLEAN_PROBLEMS, cfg, {"problems": problems, "contamination": found_ref})
    clean = read_stage(tmp_path, clean_ref)
    assert clean["prompt_idx"].to_list() == [0, 1, 2, 3, 4] and clean_ref["dropped"] == 1
    assert clean.columns == read_stage(tmp_path, problems).columns
    off = load_config("tiny", [f"data_root={tmp_path}", f"data.dataset={dataset}", "eval.enabled=false"])
    unevaluated = run_stage(CONTAMINATION, off.model_dump(mode="json"), {"problems": problems})
    assert set(found_ref["references"]) - set(unevaluated["references"]) == {"heldout", "mmlu_pro-tiny"}


def test_dropping_every_row_is_an_error() -> None:
    problems = pl.DataFrame({"prompt_idx": [0, 1]})
    with pytest.raises(ValueError, match="drop removed all 2 problems"):
        drop_contaminated(problems, pl.DataFrame({"prompt_idx": [1, 0, 0]}))
    assert drop_contaminated(problems, pl.DataFrame({"prompt_idx": [1]}))["prompt_idx"].to_list() == [0]


def fingerprints(*overrides: str) -> dict[str, str]:
    return {call.key: call.fingerprint for call in dag("tiny", list(overrides))}


def test_flag_settings_recompute_the_contamination_stage_alone() -> None:
    base = fingerprints()
    for change in ("data.decontamination.min_overlap=0.6", "data.decontamination.ngrams=[8]"):
        after = fingerprints(change)
        assert {k for k in base if after[k] != base[k]} == {"contamination@1"}, change
    after = fingerprints("eval.benchmarks.heldout.k=2", "eval.benchmarks.heldout.limit=3")
    assert after["contamination@1"] == base["contamination@1"]  # the rows checked did not change
    after = fingerprints("eval.enabled=false")  # the evaluated sets are no longer checked
    assert after["contamination@1"] != base["contamination@1"] and after["problems@1"] == base["problems@1"]
    off = fingerprints("data.decontaminate=off")
    assert "contamination@1" not in off and off == {k: v for k, v in base.items() if k != "contamination@1"}


def test_drop_hands_every_stage_the_clean_problems() -> None:
    calls = dag("tiny", ["data.decontaminate=drop"])
    names = [c.stage.name for c in calls]
    assert names[:3] == ["problems", "contamination", "clean_problems"]
    readers = {c.stage.name: c.inputs["problems"] for c in calls if "problems" in c.inputs}
    assert readers.pop("contamination") == readers.pop("clean_problems") == "problems@1"
    assert set(readers) >= {
        "pi_theta0",
        "q_phi",
        "posterior_samples",
        "logps",
        "rollouts",
        "weights",
        "train",
    }
    assert set(readers.values()) == {"clean_problems@1"}
    flag, drop = fingerprints(), {c.key: c.fingerprint for c in calls}
    assert drop["problems@1"] == flag["problems@1"] and drop["pi_theta0@1"] != flag["pi_theta0@1"]


# ---------------------------------------------------------------- `variational data check`


def test_data_check_lists_the_planted_row_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = str(planted_dataset(tmp_path / "planted.jsonl"))
    assert main(["data", "check", dataset, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["rows"], out["accepted"], out["rejected"]) == (6, 6, [])
    assert [{k: c[k] for k in ("index", "benchmark", "problem", "overlap")} for c in out["contaminated"]] == [
        {"index": 5, "benchmark": "aime24", "problem": "aime24-65", "overlap": 1.0}
    ]
    assert main(["data", "check", dataset]) == 1
    text = capsys.readouterr().out
    assert text.startswith(f"{dataset}: 6 rows, 6 accepted, 0 rejected, 1 contaminated")
    assert "  row 5: question overlaps aime24 aime24-65 (13-gram share 1.00)" in text
    assert main(["data", "check", dataset, "--against", "none"]) == 0  # nothing to check against
    capsys.readouterr()


def test_data_check_of_the_mini_set(capsys: pytest.CaptureFixture) -> None:
    """Clean against the benchmarks tiny evaluates and every shipped set but GSM8K; its gsm8k/ rows are GSM8K
    test items, which the default (every shipped set) reports."""
    assert main(["data", "check", "embedded:mini_stratos", "--config", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["contaminated"] == []
    assert main(["data", "check", "embedded:mini_stratos", "--json"]) == 1
    found = json.loads(capsys.readouterr().out)["contaminated"]
    assert len(found) == 24 and {c["benchmark"] for c in found} == {"gsm8k"}
    assert main(["data", "check", "embedded:mini_stratos", "--against", "gsm8k,bogus"]) == 2
    assert "unknown --against ['bogus']" in capsys.readouterr().err


def test_data_check_names_a_benchmark_it_cannot_load(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    conf = load_config("tiny").model_dump(mode="json")
    conf["eval"]["benchmarks"]["mine"] = {"path": str(tmp_path / "missing.jsonl")}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(conf))
    assert main(["data", "check", "embedded:mini_stratos", "--config", str(tmp_path / "my.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: decontamination: benchmark 'mine'") and err.count("\n") == 1
