"""variational/analysis/show.py: one question joined across literal stage tables (the pure view, its text in 100
columns, why a trace is not eligible), and the same read back from a run written through the store, with the
CLI's one-line errors for an unknown run, prompt_idx or round."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from variational.analysis.show import ShowError, format_view, question_view, show_question, why_not
from variational.cli import main
from variational.pipeline.runs import begin_run, record_stage
from variational.pipeline.store import StageStore

RUN = "showtest"
QUESTION = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
    "egg. How much in dollars does she make every day at the farmers' market?"
)


def frames(round_: int = 1) -> dict[str, pl.DataFrame]:
    """Prompt 3 with K=3 traces: 0 eligible and selected, 1 too long a think, 2 never closed its thought."""
    keys = {"prompt_idx": [3, 3, 3], "sample_idx": [0, 1, 2], "round": [round_] * 3}
    think = ["She has 16 - 3 - 4 = 9 eggs left, and 9 * 2 = 18 dollars. " * 4, "Long. " * 50, "Hmm"]
    logp_keys = {"prompt_idx": [3] * 5, "sample_idx": [0, 0, 0, 1, 1], "round": [round_] * 5}
    roll_keys = {"prompt_idx": [3] * 4, "sample_idx": [0, 0, 1, 1], "rollout_idx": [0, 1, 0, 1]}
    return {
        "problems": pl.DataFrame(
            {"prompt_idx": [3], "source": ["gsm8k/gsm8k-test-0"], "kind": ["math"], "question": [QUESTION]}
        ).with_columns(gold=pl.Series([["18"]]), tests=pl.lit(None, pl.String)),
        "posterior_samples": pl.DataFrame(
            keys
            | {"think": think, "think_len": [60, 30000, 1], "format_ok": [True, True, False]}
            | {"finish_reason": ["stop", "stop", "length"]}
        ),
        "logps": pl.DataFrame(
            logp_keys
            | {"model": ["pi_theta0", "q_phi", "pi_theta0", "pi_theta0", "q_phi"]}
            | {
                "span": ["think", "think", "answer", "think", "think"],
                "logp_mean": [-1.5, -1.2, -0.3, -2.0, -1.0],
            }
            | {"n_tokens": [60, 60, 9, 30000, 30000]}
        ),
        "rollouts": pl.DataFrame(
            roll_keys | {"round": [round_] * 4, "n_tokens": [12, 15, 11, 40]}
        ).with_columns(finish_reason=pl.lit("stop")),
        "verdicts": pl.DataFrame(
            roll_keys
            | {
                "round": [round_] * 4,
                "extracted": ["18", "16", "18", "18"],
                "correct": [True, False, True, True],
            }
            | {"status": ["ok", "wrong", "ok", "ok"]}
        ),
        "weights": pl.DataFrame(
            keys
            | {"estimator": ["acc"] * 3, "source": ["gsm8k/gsm8k-test-0"] * 3, "think_len": [60, 30000, 1]}
            | {"log_ratio_mean": [-0.3, -1.0, None], "accuracy": [0.5, 1.0, None]}
            | {"answer_logp_mean": [-0.3, None, None], "eligible": [True, False, False]}
            | {
                "log_rho": [-0.993, None, None],
                "rho_tilde": [1.0, None, None],
                "selected": [True, False, False],
            }
        ),
        "train": pl.DataFrame(
            {"row": [3, 12], "prompt_idx": [3, 3], "origin": [-2, 0], "weight": [1.0, 1.0]}
        ),
    }


def test_the_view_joins_every_table_of_one_question() -> None:
    view = question_view(frames(), 3, 1, max_think_tokens=28000)
    assert (view["prompt_idx"], view["question"], view["gold"], view["selected"]) == (3, QUESTION, ["18"], 0)
    t0, t1, t2 = view["traces"]
    assert {k: t0[k] for k in ("sample_idx", "eligible", "log_rho", "rho_tilde", "accuracy", "selected")} == {
        "sample_idx": 0, "eligible": True, "log_rho": -0.993, "rho_tilde": 1.0, "accuracy": 0.5, "selected": True,
    }  # fmt: skip
    assert (t0["logp_pi_theta0"], t0["logp_q_phi"], t0["delta"]) == (-1.5, -1.2, -0.3)
    assert [(r["rollout_idx"], r["correct"], r["status"]) for r in t0["rollouts"]] == [
        (0, True, "ok"),
        (1, False, "wrong"),
    ]
    assert t0["train"] == [{"row": 12, "origin": 0, "weight": 1.0}] and t0["think_start"].startswith(
        "She has 16"
    )
    assert t1["why_not"] == "think_len 30000 >= weights.max_think_tokens 28000" and t1["train"] == []
    assert t2["why_not"] == "the thought never closed: no rollouts" and t2["rollouts"] == []
    assert view["train"][0] == {"row": 3, "origin": -2, "weight": 1.0}
    assert json.loads(json.dumps(view, allow_nan=False)) == view  # plain JSON: no NaN, no polars types


def test_the_text_fits_a_100_column_terminal() -> None:
    text = format_view(question_view(frames(), 3, 1, max_think_tokens=28000), run="tiny")
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0] == "run tiny · prompt_idx 3 · round 1 · gsm8k/gsm8k-test-0 · math"
    assert "gold: 18" in lines and "selected trace 0" in text
    assert "in train: row 3 (original trace, weight 1), row 12 (trace 0, weight 1)" in lines
    table = text[text.index("trace  think") :].splitlines()
    assert table[1].split() == [
        "0",
        "60",
        "-1.500",
        "-1.200",
        "-0.300",
        "0.50",
        "yes",
        "-0.993",
        "1.000",
        "selected",
        "row",
        "12",
    ]
    assert "trace 1 (stop) · not eligible: think_len 30000 >= weights.max_think_tokens 28000" in text
    assert '  rollouts 0: right, ok "18" | 1: wrong, wrong "16"' in lines
    assert all(line == line.rstrip() for line in lines)


@pytest.mark.parametrize(
    ("trace", "estimator", "reason"),
    [
        ({"eligible": False, "accuracy": 0.0, "delta": -0.1, "format_ok": True}, "acc", "no correct rollout (accuracy 0)"),
        ({"eligible": False, "accuracy": None, "delta": -0.1, "format_ok": True}, "acc", "no verified rollout"),
        ({"eligible": False, "accuracy": 0.5, "delta": None, "format_ok": True}, "acc", "no log ratio: a model did not score the think"),
        ({"eligible": False, "delta": -0.1, "answer_logp_mean": None, "format_ok": True}, "gml", "no answer log-prob under pi_theta0"),
        ({"eligible": True, "accuracy": 0.0}, "acc", "eligible through the ruc fallback to GML (no correct rollout)"),
        ({"eligible": True, "accuracy": 0.25}, "acc", None),
    ],
)  # fmt: skip
def test_why_a_trace_is_not_eligible(trace: dict, estimator: str, reason: str | None) -> None:
    assert why_not(trace, estimator, 28000) == reason


def test_a_question_without_traces_says_so() -> None:
    only = {"problems": frames()["problems"]}
    view = question_view(only, 3, 1)
    assert view["traces"] == [] and view["selected"] is None
    assert "no posterior traces for this question in this round" in format_view(view)
    with pytest.raises(ShowError, match="prompt_idx 4 is not in the problems table"):
        question_view({"problems": only["problems"].clear()}, 4, 1)


# ---------------------------------------------------------------- a run on disk, and the CLI


def write_run(root: Path, rounds: tuple[int, ...] = (1,)) -> Path:
    begin_run(root, RUN, {"weights": {"max_think_tokens": 28000}})
    for r in rounds:
        for table, df in frames(r).items():
            if table == "problems" and r > 1:
                continue
            store = StageStore(root, RUN, table, f"{table}-r{r}")
            store.write_shard(
                0,
                df
                if table == "problems"
                else pl.concat([df, df.with_columns(prompt_idx=pl.lit(5, pl.Int64))]),
            )
            record_stage(root, RUN, store.finish(round_=r), computed=True)
    return root


def test_show_reads_one_question_of_a_run(tmp_path: Path) -> None:
    root = write_run(tmp_path)
    assert show_question(root, RUN, 3) == question_view(frames(), 3, 1, max_think_tokens=28000)
    with pytest.raises(
        ShowError, match=r"run 'showtest' has no prompt_idx 99 \(its 1 problems have prompt_idx 3..3\)"
    ):
        show_question(root, RUN, 99)
    with pytest.raises(FileNotFoundError, match="no run 'nope'"):
        show_question(root, "nope", 3)


def test_the_last_round_is_shown_unless_one_is_asked_for(tmp_path: Path) -> None:
    root = write_run(tmp_path, rounds=(1, 2))
    assert show_question(root, RUN, 3)["round"] == 2
    view = show_question(root, RUN, 3, round_=1)
    assert view["round"] == 1 and [len(t["rollouts"]) for t in view["traces"]] == [2, 2, 0]
    with pytest.raises(ShowError, match=r"has no round 3; its rounds are \[1, 2\]"):
        show_question(root, RUN, 3, round_=3)


def test_cli_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(write_run(tmp_path))
    assert main(["show", RUN, "3", "--data-root", root, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_idx"] == 3 and [t["selected"] for t in out["traces"]] == [True, False, False]
    assert main(["show", RUN, "3", "--data-root", root]) == 0
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 100
    for args, message in (
        ([RUN, "99"], "error: run 'showtest' has no prompt_idx 99"),
        (["nope", "3"], "error: no run 'nope' under"),
        ([RUN, "3", "--round", "2"], "error: run 'showtest' has no round 2"),
    ):
        assert main(["show", *args, "--data-root", root]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
