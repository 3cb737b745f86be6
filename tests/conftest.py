"""Test set-up: 8 virtual CPU devices, and the small multi_digits config.

XLA_FLAGS must be set before JAX is imported anywhere, hence at the top of the
conftest. Single-device code still runs on device 0; the parallelism tests use
all 8.
"""

import os

NUM_DEVICES = 8
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") +
    f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from mtl_jax.data import multi_digits  # pylint: disable=g-import-not-at-top,wrong-import-position



def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: launches processes (multi-host, crash and signal "
      "tests, a script's exit status); `make test` runs them, "
      "`pytest -m \"not slow\"` skips them for a quick run.")


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_small"))
  multi_digits.prepare(data_dir, config="small")
  return data_dir
