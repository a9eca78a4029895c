"""Config schema: the shipped configs validate; bad keys and values name the key and the allowed values."""

from __future__ import annotations

import pytest

from variational.config import ConfigError, apply_overrides, load_config


@pytest.mark.parametrize("name", ["tiny", "subset-1k", "full-17k"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.name == name
    assert cfg.K >= 1 and cfg.M >= 1


def test_full_17k_matches_method_hyperparameters() -> None:
    cfg = load_config("configs/full-17k.yaml")
    assert cfg.base_model == "Qwen/Qwen3-4B-Base"
    assert cfg.data.dataset == "bespokelabs/Bespoke-Stratos-17k"
    assert (cfg.K, cfg.M) == (8, 8)
    assert (cfg.pi_theta0.batch_size, cfg.pi_theta0.epochs, cfg.pi_theta0.learning_rate) == (96, 3, 1e-5)
    assert (cfg.q_phi.batch_size, cfg.q_phi.epochs, cfg.q_phi.adam_beta2, cfg.q_phi.weight_decay) == (
        16,
        10,
        0.95,
        1e-4,
    )
    assert cfg.final.batch_size == 192
    assert cfg.posterior_sampling.temperature == 0.7 and cfg.posterior_sampling.max_tokens == 32764
    assert cfg.weights.max_think_tokens == 28000 and cfg.select.mode == "17k-mix"
    assert cfg.eval.benchmarks["aime24"].k == 32 and cfg.eval.benchmarks["math500"].k == 2


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"q_phi\.learning_rat: unknown key"):
        load_config("configs/tiny.yaml", ["q_phi.learning_rat=1e-4"])


def test_bad_literal_lists_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"weights\.estimator: must be one of 'acc', 'gml' or 'likelihood'"):
        load_config("configs/tiny.yaml", ["weights.estimator=mle"])
    with pytest.raises(ConfigError, match=r"select\.mode: must be one of '17k-mix' or 'all-k'"):
        load_config("configs/tiny.yaml", ["select.mode=best"])
    with pytest.raises(ConfigError, match=r"posterior_template"):
        load_config("configs/tiny.yaml", ["posterior_template=PC"])


def test_bad_numbers_are_named() -> None:
    with pytest.raises(ConfigError, match=r"K: .*greater than or equal to 1"):
        load_config("configs/tiny.yaml", ["K=0"])
    with pytest.raises(ConfigError, match=r"posterior_sampling\.top_p"):
        load_config("configs/tiny.yaml", ["posterior_sampling.top_p=1.5"])


def test_overrides_parse_yaml_values() -> None:
    data = apply_overrides({}, ["K=4", "eval.enabled=false", "eval.models=[pi_theta]", "name=x"])
    assert data == {"K": 4, "eval": {"enabled": False, "models": ["pi_theta"]}, "name": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["K"])


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


def test_cross_field_rule() -> None:
    with pytest.raises(ConfigError, match="question_weighting"):
        load_config("configs/tiny.yaml", ["weights.question_weighting=grpo"])
    cfg = load_config("configs/tiny.yaml", ["weights.question_weighting=grpo", "select.mode=all-k"])
    assert cfg.weights.question_weighting == "grpo"
