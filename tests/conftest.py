"""Test set-up: 8 virtual CPU devices, fast compilation, and the small
multi_digits config.

XLA_FLAGS must be set before JAX is imported anywhere, hence at the top of the
conftest. Single-device code still runs on device 0; the parallelism tests use
all 8.

The suite's time is XLA compilation of many small programs, not their
execution, so the tests compile with LLVM's code generation at -O0
(`--xla_backend_optimization_level=0`: the HLO passes are unchanged, only the
machine code is less optimised), unless XLA_FLAGS already sets a level. Tests that
launch processes give them these flags (`MTL_JAX_TEST_XLA_FLAGS`) and their
own device count.
"""

import os

NUM_DEVICES = 8
_FAST_COMPILE = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
  _flags += " " + _FAST_COMPILE
# For the processes a test launches, which set their own device count.
os.environ["MTL_JAX_TEST_XLA_FLAGS"] = _flags.strip()
os.environ["XLA_FLAGS"] = (
    _flags + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
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
