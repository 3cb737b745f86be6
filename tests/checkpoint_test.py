"""Tests of checkpoint round trips, exact resume and damaged checkpoints."""

import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.data import mixture
from mtl_jax.models import build
from mtl_jax.training import checkpoint as checkpoint_lib
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASKS = tasks_lib.TaskSet([tasks_lib.classification_task("a", 3),
                           tasks_lib.regression_task("b")])


def _setup(seed):
  model = build.make_hard_sharing_model(
      TASKS, build.make_trunk("mlp", hidden_sizes=(8,), dropout_rate=0.2))
  tx = optax.adam(1e-2)
  w = weighting.equal(2)
  params = state_lib.init_params(model, np.zeros((1, 4), np.float32),
                                 jax.random.PRNGKey(seed))
  state = state_lib.create_train_state(params, tx, w, 2,
                                       jax.random.PRNGKey(seed + 100))
  step = jax.jit(step_lib.make_train_step(model.apply, TASKS, tx, w))
  rng = np.random.default_rng(0)
  arrays = {"inputs": rng.normal(size=(64, 4)).astype(np.float32),
            "labels": {"a": rng.integers(0, 3, 64).astype(np.int32),
                       "b": rng.normal(size=64).astype(np.float32)},
            "masks": {"a": (rng.random(64) < 0.5).astype(np.float32),
                      "b": (rng.random(64) < 0.3).astype(np.float32)}}
  batches = mixture.Mixture([mixture.array_component("train", arrays)], TASKS,
                            batch_size=16, seed=3, composition="fixed")
  return state, step, batches


# Compiled once for the tests of damaged checkpoints (states are immutable).
_cached_setup = functools.lru_cache(_setup)


def _run(state, step, batches, start, stop):
  """Steps start..stop-1; the data position is the step (one component)."""
  data = {"step": start, "positions": {"train": 16 * start},
          "mixture": batches.fingerprint()}
  it = batches.iterator(data)
  for _ in range(start, stop):
    state, _ = step(state, next(it))
  return state


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_every_leaf(tmp_path):
  state, step, batcher = _setup(0)
  state = _run(state, step, batcher, 0, 3)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(3, state, wait=True)
  fresh, _, _ = _setup(1)  # different values, same structure
  restored = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt")).restore(fresh)
  _assert_trees_equal(restored, state)  # params, adam moments, step, rng
  assert int(restored.step) == 3


def test_resume_equals_uninterrupted(tmp_path):
  state, step, batcher = _setup(0)
  straight = _run(state, step, batcher, 0, 10)  # crosses an epoch (4 steps/epoch)

  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  first = _run(state, step, batcher, 0, 6)
  ckpt.save(6, first, wait=True)
  ckpt.close()
  fresh, step2, batcher2 = _setup(7)  # a new process would start from scratch
  resumed = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt")).restore(fresh)
  resumed = _run(resumed, step2, batcher2, int(resumed.step), 10)
  assert int(resumed.step) == 10
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               resumed.params, straight.params)


def test_keeps_the_newest_and_reports_latest(tmp_path):
  state, _, _ = _setup(0)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), max_to_keep=2)
  for s in (1, 2, 3):
    ckpt.save(s, state.replace(step=state.step + s))
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  assert int(ckpt.restore(state).step) == 3
  assert int(ckpt.restore(state, step=2).step) == 2


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
  state, _, _ = _setup(0)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    checkpoint_lib.Checkpointer(str(tmp_path / "empty")).restore(state)


def test_read_returns_numpy_without_a_template(tmp_path):
  state, step, batcher = _setup(0)
  state = _run(state, step, batcher, 0, 2)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"))
  ckpt.save(2, state, wait=True)
  raw = ckpt.read()
  assert int(raw["step"]) == 2
  jax.tree.map(np.testing.assert_array_equal, raw["params"],
               jax.device_get(state.params))


# ----------------------------------------------------------------------------
# Damaged and interrupted checkpoints.

def _save_steps(directory, steps, max_to_keep=5):
  """Checkpoints the state after each of `steps` training steps, with data."""
  state, step, batcher = _cached_setup(0)
  ckpt = checkpoint_lib.Checkpointer(directory, max_to_keep=max_to_keep)
  states, done = {}, 0
  for s in steps:
    state = _run(state, step, batcher, done, s)
    done = s
    states[s] = state
    ckpt.save(s, state, data_state={"step": s}, wait=True)
  ckpt.close()
  return states


def _truncate_largest_file(step_dir):
  """Halves the biggest file under `<step>/state` (the array data)."""
  files = [os.path.join(root, f)
           for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "rb") as f:
    content = f.read()
  with open(largest, "wb") as f:
    f.write(content[:len(content) // 2])


# A failed read can leave an orbax asyncio callback that reports "Event loop is
# closed" when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [
    _truncate_largest_file,
    lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    lambda d: shutil.rmtree(os.path.join(d, "state")),
], ids=["truncated_array_file", "missing_manifest", "missing_metadata",
        "missing_state"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, caplog, damage):
  directory = str(tmp_path / "ckpt")
  states = _save_steps(directory, [2, 4, 6])
  damage(os.path.join(directory, "6"))
  fresh, _, _ = _cached_setup(1)

  ckpt = checkpoint_lib.Checkpointer(directory)
  with caplog.at_level(logging.WARNING):
    step, restored, data = ckpt.restore_with_data(fresh)
  assert step == 4 and data == {"step": 4}
  _assert_trees_equal(restored, states[4])
  messages = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert any("checkpoint at step 6" in m and "cannot be restored" in m
             for m in messages), messages
  # Each entry point falls back on its own (a new Checkpointer each time).
  raw = checkpoint_lib.Checkpointer(directory).read()
  assert int(raw["step"]) == 4
  jax.tree.map(np.testing.assert_array_equal, raw["params"],
               jax.device_get(states[4].params))
  ckpt = checkpoint_lib.Checkpointer(directory)
  _assert_trees_equal(ckpt.restore(fresh), states[4])
  # The (intact) data state of step 6 no longer counts after that fallback.
  assert ckpt.latest_step() == 4 and ckpt.data_state() == {"step": 4}


def test_missing_data_item_falls_back_with_the_state(tmp_path, caplog):
  """The state and the data state always come from the same step."""
  directory = str(tmp_path / "ckpt")
  states = _save_steps(directory, [2, 4])
  shutil.rmtree(os.path.join(directory, "4", "data"))
  fresh, _, _ = _cached_setup(1)
  ckpt = checkpoint_lib.Checkpointer(directory)
  with caplog.at_level(logging.WARNING):
    step, restored, data = ckpt.restore_with_data(fresh)
  assert step == 2 and data == {"step": 2}
  _assert_trees_equal(restored, states[2])
  assert "data is missing" in caplog.text
  assert ckpt.data_state() == {"step": 2}


def test_an_explicit_step_does_not_fall_back(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [2, 4])
  _truncate_largest_file(os.path.join(directory, "4"))
  fresh, _, _ = _cached_setup(1)
  ckpt = checkpoint_lib.Checkpointer(directory)
  with pytest.raises(Exception):
    ckpt.restore(fresh, step=4)
  assert int(ckpt.restore(fresh, step=2).step) == 2


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [2, 4])
  for step in (2, 4):
    _truncate_largest_file(os.path.join(directory, str(step)))
  fresh, _, _ = _cached_setup(1)
  ckpt = checkpoint_lib.Checkpointer(directory)
  for restore in (ckpt.restore, ckpt.restore_with_data,
                  lambda _: ckpt.read()):
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match=r"(?s)no checkpoint in .* could be restored"
                       r".*step 4: .*step 2: ") as info:
      restore(fresh)
    assert sorted(info.value.failures) == [2, 4]


def test_resumed_run_replaces_the_damaged_checkpoints(tmp_path):
  """After a fallback, saving the skipped steps again works and they restore."""
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [2, 4, 6], max_to_keep=3)
  _truncate_largest_file(os.path.join(directory, "6"))
  fresh, step_fn, batcher = _cached_setup(1)
  ckpt = checkpoint_lib.Checkpointer(directory, max_to_keep=3)
  step, state, _ = ckpt.restore_with_data(fresh)
  assert step == 4 and ckpt.latest_step() == 4  # the damaged 6 no longer counts
  state = _run(state, step_fn, batcher, 4, 5)
  ckpt.save(5, state, data_state={"step": 5}, wait=True)  # deletes the old 6
  state = _run(state, step_fn, batcher, 5, 6)
  ckpt.save(6, state, data_state={"step": 6}, wait=True)
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["4", "5", "6"]
  again = checkpoint_lib.Checkpointer(directory)
  step, restored, data = again.restore_with_data(fresh)
  assert step == 6 and data == {"step": 6}
  _assert_trees_equal(restored, state)


_SAVE_SCRIPT = r"""
import sys
import numpy as np
from mtl_jax.training import checkpoint as checkpoint_lib

directory, size = sys.argv[1], int(sys.argv[2])
ckpt = checkpoint_lib.Checkpointer(directory)
ckpt.save(1, {"x": np.arange(10, dtype=np.float32), "step": np.int32(1)},
          data_state={"step": 1}, wait=True)
big = np.random.default_rng(0).random(size, dtype=np.float32)  # incompressible
print("saving 2", flush=True)
ckpt.save(2, {"x": big, "step": np.int32(2)}, data_state={"step": 2},
          wait=True)
print("saved 2", flush=True)
"""


def _kill_during_save(directory, size):
  """Runs `_SAVE_SCRIPT`; SIGKILLs it once the temporary dir of step 2 shows.

  Returns:
    Whether the temporary directory was seen (and the process killed in time).
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen([sys.executable, "-c", _SAVE_SCRIPT, directory,
                           str(size)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  tmp_dir = re.compile(r"^2\.orbax-checkpoint-tmp")
  seen = False
  deadline = time.monotonic() + 120
  try:
    while proc.poll() is None and time.monotonic() < deadline:
      if os.path.isdir(directory) and any(
          tmp_dir.match(n) for n in os.listdir(directory)):
        os.kill(proc.pid, signal.SIGKILL)
        seen = True
        break
      time.sleep(0.002)
  finally:
    if proc.poll() is None:
      proc.kill()
    _, stderr = proc.communicate()
  if proc.returncode not in (0, -signal.SIGKILL):
    raise AssertionError(stderr.decode()[-3000:])
  # Too late if the save was committed between the poll and the kill.
  return seen and not os.path.isdir(os.path.join(directory, "2"))


@pytest.mark.slow  # launches a process
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
  size = 75_000_000  # 300 MB of float32: the write takes a while
  for attempt in range(3):
    directory = str(tmp_path / f"ckpt{attempt}")
    if _kill_during_save(directory, size):
      break
    size *= 2
  else:
    pytest.fail("the save of step 2 finished before the process was killed "
                "in every attempt")
  leftovers = [n for n in os.listdir(directory) if n.startswith("2.")]
  assert leftovers, "the partial save of step 2 should have left a tmp dir"

  ckpt = checkpoint_lib.Checkpointer(directory)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  like = {"x": np.zeros(10, np.float32), "step": np.zeros((), np.int32)}
  step, restored, data = ckpt.restore_with_data(like)
  assert step == 1 and data == {"step": 1}
  np.testing.assert_array_equal(restored["x"], np.arange(10, dtype=np.float32))
  assert int(restored["step"]) == 1
  np.testing.assert_array_equal(ckpt.read()["x"], restored["x"])
  # A resumed run saves step 2 again next to the leftover.
  ckpt.save(2, {"x": np.ones(10, np.float32), "step": np.int32(2)},
            data_state={"step": 2}, wait=True)
  assert ckpt.latest_step() == 2
  assert int(ckpt.restore(like)["step"]) == 2


def test_a_state_of_another_structure_names_the_likely_cause(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, {"w": np.ones(3, np.float32)}, wait=True)
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"(?s)step 1:.*another model, config or mtl_jax "
                     r"version"):
    ckpt.restore({"w": np.ones(3, np.float32), "b": np.zeros(2, np.float32)})
  assert ckpt.latest_step() == 1  # nothing was deleted
