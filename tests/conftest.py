"""Test set-up: 8 virtual CPU devices, fast compilation, and the small
multi_digits config.

XLA_FLAGS must be set before JAX is imported anywhere, hence at the top of the
conftest. Single-device code still runs on device 0; the parallelism tests use
all 8.

The suite's time is XLA compilation of many small programs, not their
execution, so the tests compile with LLVM's code generation at -O0
(`--xla_backend_optimization_level=0`: the HLO passes are unchanged, only the
machine code is less optimised), unless XLA_FLAGS already sets a level, and
with the CPU backend's older elemental emitters for fusions
(`--xla_cpu_use_fusion_emitters=false`: 2-4x faster to compile the train
steps here; the same programs, compiled another way), unless XLA_FLAGS
already sets it. Tests that launch processes give them these flags
(`MTL_JAX_TEST_XLA_FLAGS`) and their own device count.

Identical programs compiled by different tests, by both xdist workers and by
the processes the tests launch (experiments/train.py runs inherit the
environment) are compiled once: a persistent compilation cache in a temporary
directory made for the session (by the pytest process that imports this file
first; the xdist workers and launched processes inherit the variable) and
removed at its end, caching every program however small and quick to
compile. Set JAX_COMPILATION_CACHE_DIR to use a directory of your own.
"""

import atexit
import os
import shutil
import tempfile

NUM_DEVICES = 8
_FAST_COMPILE = {"xla_backend_optimization_level": "0",
                 "xla_cpu_use_fusion_emitters": "false"}
_flags = os.environ.get("XLA_FLAGS", "")
for _name, _value in _FAST_COMPILE.items():
  if _name not in _flags:
    _flags += f" --{_name}={_value}"
# For the processes a test launches, which set their own device count.
os.environ["MTL_JAX_TEST_XLA_FLAGS"] = _flags.strip()
os.environ["XLA_FLAGS"] = (
    _flags + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _CACHE_DIR = tempfile.mkdtemp(prefix="mtl_jax_test_jit_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
from _pytest import nodes as nodes_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """`--dist loadgroup`: tests marked `xdist_group` go to one worker.

  pytest-xdist 3.8 groups them by suffixing `item._nodeid` with `@<group>`,
  which pytest 9.2 no longer reads (the node id is `item._id`): without
  this, the groups were split over both workers and their shared fixtures
  (reference runs) made twice.
  """
  if not getattr(config.option, "loadgroup", False):
    return
  for item in items:
    names = sorted({str(m.args[0] if m.args else m.kwargs.get("name",
                                                              "default"))
                    for m in item.iter_markers("xdist_group")})
    nodeid = item.nodeid
    if names and nodeid.rfind("@") <= nodeid.rfind("]"):
      item._id = nodes_lib.coerce_node_id(f"{nodeid}@{'_'.join(names)}")  # pylint: disable=protected-access
