"""Tests of checkpoint round trips and exact resume."""

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
