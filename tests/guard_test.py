"""Non-finite steps are skipped inside jit, counted, and stop a run that persists."""

import json

import jax
import numpy as np
import optax
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.data import mixture
from mtl_jax.models import build
from mtl_jax.training import guard
from mtl_jax.training import loop
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib
from mtl_jax.training import writers

TASKS = tasks_lib.TaskSet([tasks_lib.classification_task("a", 3),
                           tasks_lib.regression_task("b")])
N, B = 64, 8


def _arrays(poison_rows):
  """Regression labels of 1e30 in `poison_rows`: finite data, Inf MSE loss."""
  rng = np.random.default_rng(0)
  b = rng.normal(size=N).astype(np.float32)
  b[poison_rows] = 1e30
  return {"inputs": rng.normal(size=(N, 4)).astype(np.float32),
          "labels": {"a": rng.integers(0, 3, N).astype(np.int32), "b": b},
          "masks": {"a": np.ones(N, np.float32), "b": np.ones(N, np.float32)}}


def _setup():
  model = build.make_hard_sharing_model(
      TASKS, build.make_trunk("mlp", hidden_sizes=(8,)))
  tx = optax.sgd(0.05)
  w = weighting.equal(2)
  params = state_lib.init_params(model, np.zeros((1, 4), np.float32),
                                 jax.random.PRNGKey(0))
  state = state_lib.create_train_state(params, tx, w, 2, jax.random.PRNGKey(1))
  step = jax.jit(guard.skip_nonfinite(
      step_lib.make_train_step(model.apply, TASKS, tx, w), TASKS.names))
  return state, step


def _batches(poison_rows):
  mix = mixture.Mixture([mixture.array_component("d", _arrays(poison_rows))],
                        TASKS, batch_size=B, seed=0, composition="fixed")
  return mix.iterator()


def test_bad_step_keeps_state_advances_step_and_flags_the_task():
  state, step = _setup()
  batch = next(_batches([]))
  batch["labels"]["b"][3] = 1e30  # Inf loss for task b only
  new, metrics = step(state, batch)
  assert int(new.step) == 1 and int(new.nonfinite_streak) == 1
  assert float(metrics["nonfinite"]) == 1.0
  assert float(metrics["b/nonfinite"]) == 1.0
  assert float(metrics["a/nonfinite"]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, new.opt_state, state.opt_state)
  # A good step afterwards updates and resets the streak.
  good, metrics = step(new, next(_batches([])))
  assert int(good.nonfinite_streak) == 0 and float(metrics["nonfinite"]) == 0
  assert not np.array_equal(good.params["tasks"]["a"]["Dense_0"]["kernel"],
                            state.params["tasks"]["a"]["Dense_0"]["kernel"])


def test_clean_step_equals_the_unguarded_step():
  state, step = _setup()
  model = build.make_hard_sharing_model(
      TASKS, build.make_trunk("mlp", hidden_sizes=(8,)))
  plain = jax.jit(step_lib.make_train_step(model.apply, TASKS, optax.sgd(0.05),
                                           weighting.equal(2),
                                           skip_nonfinite=False))
  batch = next(_batches([]))
  a, _ = step(state, batch)
  b, metrics = plain(state, batch)
  assert "nonfinite" not in metrics  # the bare step
  # Equal up to float32 rounding: XLA compiles the guarded program apart.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6,
                                                       atol=1e-7),
               a.params, b.params)
  assert not all(jax.tree.leaves(jax.tree.map(
      lambda x, y: bool(np.array_equal(x, y)), state.params, a.params)))


def _loop(poison_rows, num_steps, tmp_path, limit=3):
  state, step = _setup()
  writer = writers.MetricWriter(str(tmp_path), enabled=True)
  try:
    return loop.train_loop(
        state=state, train_step=step, batches=_batches(poison_rows),
        num_steps=num_steps, task_names=TASKS.names, writer=writer,
        log_every=8, max_nonfinite_streak=limit)
  finally:
    writer.close()


def test_run_skips_poisoned_steps_and_finishes(tmp_path):
  # Fixed composition, one component: batch s holds rows of epoch s // 8.
  # Poison two rows: at most 2 bad steps per epoch, never 3 in a row.
  state, _ = _loop([5, 40], num_steps=16, tmp_path=tmp_path)
  assert int(state.step) == 16
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  lines = [l for l in open(tmp_path / "metrics.jsonl")]
  train = [json.loads(l) for l in lines if '"train"' in l]
  skipped = sum(l["nonfinite_steps"] for l in train)
  assert skipped == 4  # each poisoned row once per epoch, 2 epochs
  assert all(np.isfinite(l["b/loss"]) for l in train)  # skipped steps excluded


def test_persistent_nonfinite_loss_stops_naming_the_task(tmp_path):
  with pytest.raises(FloatingPointError,
                     match=r"3 consecutive train steps .*task\(s\) \['b'\]"):
    _loop(np.arange(N), num_steps=16, tmp_path=tmp_path)


def test_limit_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match="max_nonfinite_streak"):
    _loop([], num_steps=1, tmp_path=tmp_path, limit=0)

