"""flows/recipe.py: the DAG the flow builds, per config (which stage runs with which inputs, in which round).

The flow is a composition of `run(STAGE, cfg, round, **inputs)` calls; `dag` traces them (runner.trace)
without computing anything, so the wiring of Algorithm 1 (EM rounds, forward-KL q_phi) is checked in
milliseconds. The stages themselves run for real in test_pipeline.py and the per-stage tests.
"""

from __future__ import annotations

from flows.recipe import dag


def trace(*overrides: str) -> list[tuple[str, int, dict[str, str]]]:
    """(stage, round, {input: upstream stage@round}) of every stage the flow runs, nothing computed."""
    return [(c.stage.name, c.round, c.inputs) for c in dag("tiny", list(overrides))]


def test_one_round_is_the_papers_recipe() -> None:
    calls = trace()
    assert [name for name, _, _ in calls] == [
        "problems", "contamination", "base_model", "pi_theta0", "q_phi", "posterior_samples", "logps",
        "rollouts", "verdicts", "weights", "train", "pi_theta", "eval",
    ]  # fmt: skip
    by_name = {name: inputs for name, _, inputs in calls}
    assert by_name["q_phi"] == {"problems": "problems@1", "base_model": "base_model@1"}  # hinted SFT
    assert by_name["logps"]["pi_theta0"] == "pi_theta0@1" and by_name["logps"]["q_phi"] == "q_phi@1"
    assert by_name["pi_theta"] == {"train": "train@1", "base_model": "base_model@1"}
    assert by_name["eval"] == {
        "base_model": "base_model@1",
        "pi_theta0": "pi_theta0@1",
        "pi_theta": "pi_theta@1",
    }


def test_second_round_follows_algorithm_1() -> None:
    calls = trace("rounds=2", "eval.enabled=false")
    round_two = [(name, inputs) for name, r, inputs in calls if r == 2]
    names = [name for name, _ in round_two]
    assert names == [
        "prior_samples", "prior_verdicts", "q_phi", "posterior_samples", "logps", "rollouts", "verdicts",
        "weights", "train", "pi_theta",
    ]  # fmt: skip
    two = dict(round_two)
    assert two["prior_samples"]["policy"] == "pi_theta@1"  # samples from the round-1 policy
    assert two["q_phi"]["init"] == "q_phi@1" and two["q_phi"]["prior_verdicts"] == "prior_verdicts@2"
    assert two["logps"]["pi_theta0"] == "pi_theta@1"  # the last policy takes pi_theta0's place
    assert two["pi_theta"]["init"] == "pi_theta@1"
    assert "eval" not in names


def test_forward_kl_posterior_samples_the_prior_first() -> None:
    calls = trace("posterior_objective=forward_kl")
    names = [name for name, _, _ in calls]
    assert names.index("prior_samples") < names.index("prior_verdicts") < names.index("q_phi")
    q_phi = next(inputs for name, _, inputs in calls if name == "q_phi")
    assert q_phi["prior_samples"] == "prior_samples@1" and "init" not in q_phi
