"""Shared fixtures: the small multi_digits config, prepared once per session."""

import pytest

from mtl_jax.data import multi_digits


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_small"))
  multi_digits.prepare(data_dir, config="small")
  return data_dir
