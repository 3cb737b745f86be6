"""Tests of the workdir config guard."""

import json

import pytest

from mtl_jax.training import run_config


def test_same_config_resumes_and_allowed_keys_may_change(tmp_path):
  cfg = {"seed": 0, "model": {"trunk": "cnn"}, "num_steps": 10}
  run_config.check_or_write(str(tmp_path), cfg, may_differ=("num_steps",))
  run_config.check_or_write(str(tmp_path), cfg)
  run_config.check_or_write(str(tmp_path), {**cfg, "num_steps": 20},
                            may_differ=("num_steps",))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["num_steps"] == 20


def test_different_config_names_the_keys(tmp_path):
  run_config.check_or_write(str(tmp_path), {"seed": 0, "model": {"trunk": "cnn"}})
  with pytest.raises(ValueError, match=r"different config \(model.trunk: 'cnn' -> 'mlp'; seed: 0 -> 1\)"):
    run_config.check_or_write(str(tmp_path), {"seed": 1, "model": {"trunk": "mlp"}})
  with pytest.raises(ValueError, match=r"extra: '<absent>' -> 1"):
    run_config.check_or_write(str(tmp_path),
                              {"seed": 0, "model": {"trunk": "cnn"}, "extra": 1})
