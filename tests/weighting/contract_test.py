"""Properties every registered weighting method must have.

For random losses, label counts and gradient norms over a few steps: the
jitted `update` (and `post_update`) return finite, non-negative `[K]` weights,
every leaf of the state has a leading task axis, and a task with count 0 keeps
its entries of every leaf exactly. The methods also run inside `jax.grad`, as
in the train step.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import weighting

K = 3
METHODS = sorted(set(weighting.WEIGHTINGS) - {"equal", "static"})


@functools.cache
def jitted(name):
  w = weighting.get_weighting(name)
  post = jax.jit(w.post_update) if w.post_update is not None else None
  return w, jax.jit(w.update), post


def per_task_rows(state, k):
  return [np.asarray(leaf)[k] for leaf in jax.tree.leaves(state)]


step_inputs = st.tuples(
    st.lists(st.floats(0.0625, 10.0, width=32), min_size=K, max_size=K),
    st.lists(st.sampled_from([0.0, 1.0, 5.0]), min_size=K, max_size=K),
    st.lists(st.floats(0.0625, 10.0, width=32), min_size=K, max_size=K),
    st.floats(0.5, 1.0, width=32))


@pytest.mark.parametrize("name", METHODS)
@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(steps=st.lists(step_inputs, min_size=1, max_size=4),
                  seed=st.integers(0, 2**31 - 1))
def test_absent_tasks_keep_their_state(name, steps, seed):
  w, update, post_update = jitted(name)
  state = w.init(K)
  for leaf in jax.tree.leaves(state):
    assert leaf.shape[:1] == (K,)  # every entry belongs to one task
  for t, (losses, counts, norms, decay) in enumerate(steps):
    counts = jnp.asarray(counts, jnp.float32)
    # An absent task's loss and gradient are 0, as the train step makes them.
    losses = jnp.asarray(losses, jnp.float32) * (counts > 0)
    norms = jnp.asarray(norms, jnp.float32) * (counts > 0)
    weights, new_state = update(losses, counts, state,
                                rng=jax.random.key(seed + t), grad_norms=norms)
    if post_update is not None:
      new_state = post_update(losses * decay, counts, new_state)
    assert weights.shape == (K,) and weights.dtype == jnp.float32
    assert np.all(np.isfinite(weights)) and np.all(np.asarray(weights) >= 0)
    for k in np.flatnonzero(np.asarray(counts) == 0):
      for new, old in zip(per_task_rows(new_state, k),
                          per_task_rows(state, k)):
        np.testing.assert_array_equal(new, old)
    for leaf in jax.tree.leaves(new_state):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
    state = new_state


@pytest.mark.parametrize("name", METHODS)
def test_runs_inside_grad_like_the_train_step(name):
  w = weighting.get_weighting(name)
  counts = jnp.array([2.0, 0.0, 1.0])

  @jax.jit
  def step(params, state):
    def objective(p):
      losses = jnp.square(p - jnp.array([1.0, 2.0, 3.0])) * (counts > 0)
      weights, new_state = w.update(
          jax.lax.stop_gradient(losses), counts, state,
          rng=jax.random.key(0), grad_norms=2 * jnp.abs(p))
      weights = jax.lax.stop_gradient(weights)
      return jnp.sum(weights * losses), (weights, new_state)

    grads, (weights, new_state) = jax.grad(objective, has_aux=True)(params)
    return grads, weights, new_state

  params = jnp.zeros(3)
  grads, weights, _ = step(params, w.init(3))
  # d/dp_k of w_k (p_k - c_k)^2 = -2 w_k c_k at p = 0 (0 for the absent task).
  np.testing.assert_allclose(grads, -2 * weights * jnp.array([1.0, 0.0, 3.0]),
                             rtol=1e-6)
