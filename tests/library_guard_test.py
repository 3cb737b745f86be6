"""The library step skips non-finite steps by default, in a plain loop.

`make_train_step` (as in the README's quick-start, no experiments/train.py)
with out-of-range labels or a NaN input: the losses go NaN, the step is
skipped (params unchanged and finite, `nonfinite_streak` counting up), and a
clean step afterwards trains again. With `skip_nonfinite=False` the same
batches make the params non-finite, which shows what the switch does. On a
clean batch the guarded and the bare step give the same states (to float32
rounding).
"""

from __future__ import annotations

import jax
import numpy as np
import optax

import mtl_jax as mtl

N = 64
TASKS = mtl.TaskSet([mtl.classification_task("sign", 2),
                     mtl.regression_task("norm")])


def _arrays(rng):
  x = rng.normal(size=(N, 4)).astype(np.float32)
  return {"inputs": x,
          "labels": {"sign": (x[:, 0] > 0).astype(np.int32),
                     "norm": np.linalg.norm(x, axis=1)},
          "masks": {"sign": np.ones(N, np.float32),
                    "norm": np.ones(N, np.float32)}}


def _setup(**kwargs):
  model = mtl.make_model("hard_sharing", TASKS,
                         mtl.make_trunk("mlp", hidden_sizes=(8,)))
  optimizer = optax.sgd(0.1)
  weighting = mtl.get_weighting("equal")
  params = mtl.init_params(model, np.zeros((1, 4), np.float32),
                           jax.random.PRNGKey(0))
  state = mtl.create_train_state(params, optimizer, weighting, len(TASKS),
                                 jax.random.PRNGKey(1))
  step = jax.jit(mtl.make_train_step(model.apply, TASKS, optimizer, weighting,
                                     **kwargs))
  return state, step


def _finite(tree):
  return all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(tree))


def _poisoned(rng, how):
  batch = _arrays(rng)
  if how == "label":  # class 7 of a 2-class task: NaN cross-entropy
    batch["labels"]["sign"][0] = 7
  else:
    batch["inputs"][0, 0] = np.nan
  return batch


def test_poisoned_steps_are_skipped_by_default_and_counted():
  rng = np.random.default_rng(0)
  state, step = _setup()
  start = state
  for i, how in enumerate(["label", "input", "label"]):
    state, m = step(state, _poisoned(rng, how))
    assert int(state.step) == i + 1
    assert float(m["nonfinite"]) == 1.0
    assert int(m["nonfinite_streak"]) == i + 1 == int(state.nonfinite_streak)
    assert not np.isfinite(float(m["sign/loss"]))
    assert float(m["sign/nonfinite"]) == 1.0
    # A NaN input poisons every task; a bad label only its own.
    assert float(m["norm/nonfinite"]) == (1.0 if how == "input" else 0.0)
    jax.tree.map(np.testing.assert_array_equal, state.params, start.params)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state,
                 start.opt_state)
  assert _finite(state.params)
  state, m = step(state, _arrays(rng))  # a clean step trains and resets
  assert float(m["nonfinite"]) == 0.0 and int(state.nonfinite_streak) == 0
  assert _finite(state.params)
  assert not np.array_equal(
      state.params["tasks"]["sign"]["Dense_0"]["kernel"],
      start.params["tasks"]["sign"]["Dense_0"]["kernel"])


def test_opting_out_applies_the_nan_update():
  rng = np.random.default_rng(0)
  state, step = _setup(skip_nonfinite=False)
  state, m = step(state, _poisoned(rng, "input"))
  assert "nonfinite" not in m and "nonfinite_streak" not in m
  assert not _finite(state.params)
  assert int(state.nonfinite_streak) == 0


def test_clean_steps_equal_the_bare_step():
  rng = np.random.default_rng(1)
  state, guarded = _setup()
  _, bare = _setup(skip_nonfinite=False)
  a = b = state
  for _ in range(3):
    batch = _arrays(rng)
    a, ma = guarded(a, batch)
    b, mb = bare(b, batch)
  # The same update; XLA may fuse the two programs differently (float32
  # rounding of the last bit).
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6,
                                                       atol=1e-7), a, b)
  assert int(a.step) == int(b.step) == 3
  assert set(ma) == set(mb) | {"nonfinite", "nonfinite_streak",
                               "sign/nonfinite", "norm/nonfinite"}
  # Wrapping a guarded step again is a no-op (train.py used to do it).
  step = mtl.make_train_step(lambda *a, **k: None, TASKS, optax.sgd(0.1),
                             mtl.get_weighting("equal"))
  assert mtl.skip_nonfinite(step, TASKS.names) is step
