"""Typed config: presets, dotted overrides, unknown keys and wrong types rejected by name."""

from __future__ import annotations

import pytest

from stepdistill.config import ConfigError, RunConfig, list_presets, load_config, save_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.max_steps=7", "teacher.guidance_scale=1.75", "algorithm.params.update_ratio=10"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.max_steps == 7
    assert cfg.teacher.guidance_scale == 1.75
    assert cfg.algorithm.params == {"update_ratio": 10}


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"'train.max_step'.*did you mean 'train.max_steps'"):
        load_config(None, ["train.max_step=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="train.max_steps: expected int"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="train.progress: expected true/false"):
        load_config(None, ["train.progress=3"])


def test_int_is_accepted_for_float_and_optional():
    cfg = load_config(None, ["train.ema_decay=1", "train.max_grad_norm=null"])
    assert cfg.train.ema_decay == 1.0 and cfg.train.max_grad_norm is None


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.max_steps"])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(lst))
    with pytest.raises(ConfigError, match="no preset or YAML file"):
        load_config("does/not/exist")


def test_base_chain_and_roundtrip(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  max_steps: 5\n  batch_size: 8\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base}\ntrain:\n  max_steps: 9\n")
    cfg = load_config(str(child))
    assert cfg.train.max_steps == 9 and cfg.train.batch_size == 8
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(str(tmp_path / "out.yaml"))
    assert again == cfg


@pytest.mark.parametrize("name", list_presets())
def test_every_bundled_preset_loads(name):
    cfg = load_config(name)
    assert cfg.description, f"preset {name} must state what it is for and the metric it reaches"
    if cfg.algorithm.name and cfg.algorithm.params:
        from stepdistill.algorithms import REGISTRY
        from stepdistill.config import from_dict

        if name.split("/")[-1] != "teacher":
            assert cfg.algorithm.name in REGISTRY
            from_dict(REGISTRY[cfg.algorithm.name].Config, cfg.algorithm.params, prefix="algorithm.params.")
