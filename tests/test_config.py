"""Config schema: the shipped configs validate; bad keys and values name the key and the allowed values."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import typing
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


# ---------------------------------------------------------------- hostile or careless YAML (issue 17 item 5)
def alias_bomb(levels: int, width: int = 9) -> str:
    """A config whose last key expands to width**levels strings through nested aliases."""
    lines = ["name: x", "base_model: m", "a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_in_one_short_line(tmp_path: Path) -> None:
    """5 levels x 9 (about 300 bytes, 66,000 values): the old loader built it, and the schema error listed
    every value (megabytes in one 'line')."""
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(5))
    assert len(path.read_bytes()) < 400
    with pytest.raises(
        ConfigError, match=r"bomb\.yaml: not valid YAML: aliases expand to more than 10,000"
    ) as err:
        load_config(path)
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="aliases expand"):
        apply_overrides({}, ["a=" + alias_bomb(5).replace("\n", ", ").join("{}")])


def test_an_alias_bomb_that_never_finished_is_refused_at_once(tmp_path: Path) -> None:
    """9 levels x 9 (~600 bytes, 387 million values): the old code never finished (killed after 120 s here)."""
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9))
    cmd = [sys.executable, "-m", "variational.cli", "run", str(path)]  # the config loads before anything runs
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert "aliases expand to more than 10,000 values" in out.stderr


def test_shared_anchors_and_merge_keys_still_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        "name: x\nbase_model: m\npi_theta0: &train\n  epochs: 1\n  seed: 3\n"
        "q_phi:\n  <<: *train\n  epochs: 2\nfinal: *train\n"
    )
    cfg = load_config(path)
    assert (cfg.q_phi.epochs, cfg.q_phi.seed, cfg.final.epochs, cfg.final.seed) == (2, 3, 1, 3)


def test_a_recursive_alias_and_deep_nesting_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nbase_model: m\na: &a [1, *a]\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: not valid YAML: recursive alias at line 3"):
        load_config(path)
    path.write_text("name: x\nbase_model: m\na: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: not valid YAML: nested too deeply$"):
        load_config(path)


def test_duplicate_keys_are_named_with_their_lines(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys: `K: 2 ... K: 4` silently ran with K=4."""
    path = tmp_path / "dup.yaml"
    path.write_text("name: x\nbase_model: m\nK: 2\nverify:\n  timeout_s: 3\n  timeout_s: 4\n")
    with pytest.raises(
        ConfigError, match=r"duplicate key 'timeout_s' \(first at line 5\) at line 6, column 3$"
    ):
        load_config(path)
    path.write_text("name: x\nbase_model: m\nK: 2\nM: 3\nK: 4\n")
    with pytest.raises(
        ConfigError, match=r"dup\.yaml: not valid YAML: duplicate key 'K' \(first at line 3\) at line 5"
    ):
        load_config(path)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN", "nan", "inf"])
@pytest.mark.parametrize(
    "field", ["verify.code_timeout_s", "verify.timeout_s", "pi_theta0.epochs", "engine.kv_cache_gib"]
)
def test_non_finite_numbers_are_refused_in_every_float_field(field: str, value: str) -> None:
    """`verify.code_timeout_s: .inf` passed `gt=0`, and every code verdict became `error`."""
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}: Input should be a finite number"):
        load_config("configs/tiny.yaml", [f"{field}={value}"])


def test_every_float_field_of_every_section_refuses_infinity() -> None:
    """One rule covers them all: each float field of each section, given inf, fails as not finite."""
    from pydantic import ValidationError

    from variational import config

    sections = [c for c in vars(config).values() if isinstance(c, type) and issubclass(c, config.Strict)]
    checked = 0
    for section in sections:
        for name, field in section.model_fields.items():
            if float not in (field.annotation, *typing.get_args(field.annotation)):  # float, float | None
                continue
            with pytest.raises(ValidationError) as err:
                section.model_validate({name: float("inf")})
            assert any(e["loc"] == (name,) and e["type"] == "finite_number" for e in err.value.errors()), (
                f"{section.__name__}.{name} accepts inf"
            )
            checked += 1
    assert checked >= 15


def test_a_folder_or_non_utf8_config_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "conf.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"conf\.yaml' cannot be read: Is a directory$"):
        load_config(folder)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\nbase_model: m\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_config(latin1)
