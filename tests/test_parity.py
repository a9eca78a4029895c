"""variational/parity.py: the one switch. Which stages follow it (their fingerprints, on the real DAG), what
each mode resolves to, and that the list of differences is the README's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.recipe import dag
from tasks.score import LOGPS
from variational import parity
from variational.config import RunConfig, load_config
from variational.pipeline.stage import Inputs

REPO = Path(__file__).resolve().parents[1]
# what the switch changes (the stages that ask parity.py, and those below them) and what it leaves alone
RECOMPUTED = {"rollouts", "verdicts", "weights", "train", "pi_theta", "eval"}
REUSED = {"problems", "contamination", "base_model", "pi_theta0", "q_phi", "posterior_samples", "logps"}


def fingerprints(config: str, *overrides: str) -> dict[str, str]:
    return {call.stage.name: call.fingerprint for call in dag(config, list(overrides))}


@pytest.mark.parametrize("config", ["tiny", "full-17k"])
def test_switching_parity_recomputes_only_the_stages_that_ask(config: str) -> None:
    strict, official = fingerprints(config), fingerprints(config, "parity=official")
    assert set(strict) == RECOMPUTED | REUSED
    assert {name for name in strict if strict[name] != official[name]} == RECOMPUTED
    assert fingerprints(config, "parity=strict") == strict  # the default is strict


def test_the_official_config_is_full_17k_with_the_switch_on() -> None:
    official = load_config("full-17k-official").model_dump()
    full = load_config("full-17k").model_dump()
    assert official.pop("parity") == "official" and full.pop("parity") == "strict"
    assert official.pop("name") == "full-17k-official"
    full.pop("name")
    # the only other change: AIME25 from the fork's hub copy, as the official harness reads it
    assert official["eval"]["benchmarks"].pop("aime25")["path"] == "zhouxiangxin/AIME2025"
    full["eval"]["benchmarks"].pop("aime25")
    assert official == full


def test_verify_rules_per_mode() -> None:
    conf = RunConfig(name="t", base_model="m")
    strict = parity.verify_rules(conf)
    assert (strict.grader, strict.code_timeout_s, strict.code_problem_timeout_s, strict.code_quirks) == (
        "strict", 10.0, 60.0, False,
    )  # fmt: skip
    # the official checker: 4 s per test, 11 s per problem, np.all over errors; our limits are not read
    conf.verify.code_timeout_s = 30.0
    official = parity.verify_rules(conf.model_copy(update={"parity": "official"}))
    assert (official.grader, official.code_timeout_s, official.code_problem_timeout_s) == (
        "official",
        4.0,
        11.0,
    )
    assert official.code_quirks
    # the quirks flag alone: the official verdict rule in a strict run, our time limits and grader
    conf.verify.code_official_quirks = True
    quirks = parity.verify_rules(conf)
    assert (quirks.grader, quirks.code_timeout_s, quirks.code_quirks) == ("strict", 30.0, True)


def test_rollout_weights_and_eval_rules_per_mode() -> None:
    strict = RunConfig(name="t", base_model="m")
    official = strict.model_copy(update={"parity": "official"})
    assert parity.rollout_rules(strict) == parity.RolloutRules(unclosed_traces=False, shared_seed=False)
    assert parity.rollout_rules(official) == parity.RolloutRules(unclosed_traces=True, shared_seed=True)
    assert not parity.think_cap_on_scored_length(strict) and parity.think_cap_on_scored_length(official)
    assert parity.eval_prompts(strict) == parity.STRICT_PROMPTS
    prompts = parity.eval_prompts(official)
    assert prompts.frame == "chat_template" and prompts.question_first == ("aime25",)
    assert not prompts.starter_code and prompts.gpqa_order == "harness"


def test_a_stage_cannot_read_the_switch_without_declaring_it() -> None:
    """logps does not change with parity: it does not declare it, so it cannot ask (its fingerprint stays)."""
    inputs = Inputs(LOGPS, RunConfig(name="t", base_model="m", parity="official"), {}, 1)
    with pytest.raises(AttributeError, match="'parity' is not declared"):
        parity.official(inputs.conf)


def test_parity_is_read_in_one_module() -> None:
    """No `if conf.parity == ...` scattered over the stages: they ask parity.py's helpers."""
    offenders = []
    for pkg in ("variational", "tasks", "flows", "trainers"):
        for path in (REPO / pkg).rglob("*.py"):
            if path.name in ("parity.py", "config.py"):
                continue
            if re.search(r"conf\.parity\b|\bparity\s*[=!]=", path.read_text()):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def items(doc: str) -> list[str]:
    return re.findall(r"^- ([^:\n]+):", doc.split("The differences", 1)[1], flags=re.MULTILINE)


def test_every_difference_is_in_the_readme() -> None:
    listed = items(parity.__doc__ or "")
    assert len(listed) >= 14, listed
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Differences from the official code", 1)[1].split("\n## ", 1)[0]
    missing = [item for item in listed if f"**{item}**".lower() not in section.lower()]
    assert missing == [], f"README 'Differences from the official code' lacks {missing}"
