"""Config schema: the shipped configs validate; bad keys and values name the key and the allowed values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from variational.config import ConfigError, apply_overrides, load_config


@pytest.mark.parametrize("name", ["tiny", "subset-1k", "full-17k", "full-17k-official"])
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


def test_subset_1k_has_the_sources_and_the_paper_step_counts() -> None:
    """method.md §6: Ours-1K trains on all K traces (weighted, no mix) with the batch scaled to keep the 1K
    baseline's step count; the sources are full-17k's, so code questions keep their tests."""
    cfg, full = load_config("configs/subset-1k.yaml"), load_config("configs/full-17k.yaml")
    assert (cfg.data.source_dataset, cfg.data.aux) == (full.data.source_dataset, full.data.aux)
    assert cfg.select.mode == "all-k" and (cfg.data.limit, cfg.K) == (1000, 8)
    baseline = (cfg.pi_theta0.batch_size, cfg.pi_theta0.epochs, cfg.pi_theta0.max_length)
    assert baseline == (16, 5, 32768) and cfg.pi_theta0.adam_beta2 == 0.95
    assert cfg.final.batch_size == cfg.K * cfg.pi_theta0.batch_size

    def steps(examples: int, train) -> int:  # trainers/sft.py: ceil(epochs x ceil(examples / batch))
        return math.ceil(train.epochs * math.ceil(examples / train.batch_size))

    assert steps(cfg.K * 1000, cfg.final) == steps(1000, cfg.pi_theta0) == 315


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


def test_every_allowed_value_is_typeable_as_printed(tmp_path: Path) -> None:
    """YAML 1.1 reads no/off/yes/on as booleans: `--set final.mixed_precision=no` was refused with an error
    that listed 'no' among the allowed values (issue 11 item 2)."""
    cfg = load_config("configs/tiny.yaml", ["final.mixed_precision=no", "data.split=on"])
    assert cfg.final.mixed_precision == "no" and cfg.data.split == "on"
    cfg = load_config("configs/tiny.yaml", ["eval.enabled=off", "score.compile=yes"])
    assert cfg.eval.enabled is False and cfg.score.compile is True  # bool fields still take yes/no/on/off
    assert apply_overrides({}, ["a=no", "b=true", "c=False", "d=1.0e-4"]) == {
        "a": "no",
        "b": True,
        "c": False,
        "d": 1e-4,
    }
    path = tmp_path / "run.yaml"
    path.write_text("name: x\nbase_model: m\nfinal:\n  mixed_precision: no\neval:\n  enabled: off\n")
    cfg = load_config(path)
    assert cfg.final.mixed_precision == "no" and cfg.eval.enabled is False


def test_bad_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nK: [1, 2\nM: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML: .* at line 3, column 2$"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^--set K=\[1: not valid YAML"):
        apply_overrides({}, ["K=[1"])
