"""Tests of IMTL-L (Liu et al. 2021): w = exp(s), s learned on e^s L - s."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import weighting


def test_two_sgd_steps_by_hand():
  w = weighting.imtl_l(optimizer=optax.sgd(0.1))
  update = jax.jit(w.update)
  losses = jnp.array([2.0, 0.5, 1.0])
  weights, state = update(losses, jnp.ones(3), w.init(3))
  # s = 0: w = exp(0) = 1.
  np.testing.assert_allclose(weights, [1.0, 1.0, 1.0])
  # d/ds = exp(s) L - 1 = [1, -0.5, 0]; s <- -0.1 * grad.
  np.testing.assert_allclose(state.log_scales, [-0.1, 0.05, 0.0], rtol=1e-6)
  weights, state = update(losses, jnp.ones(3), state)
  s = np.array([-0.1, 0.05, 0.0])
  np.testing.assert_allclose(weights, np.exp(s), rtol=1e-6)
  grad = np.exp(s) * np.array([2.0, 0.5, 1.0]) - 1.0
  np.testing.assert_allclose(state.log_scales, s - 0.1 * grad, rtol=1e-6)


def test_default_adam_first_step_is_lr_times_sign():
  w = weighting.get_weighting("imtl_l", learning_rate=0.02)
  _, state = jax.jit(w.update)(jnp.array([3.0, 0.2]), jnp.ones(2), w.init(2))
  # grad = L - 1 = [2, -0.8]; Adam's first step: s = -0.02 * sign(grad).
  np.testing.assert_allclose(state.log_scales, [-0.02, 0.02], rtol=1e-5)


def test_converges_to_balanced_scaled_losses():
  # e^s L - s is minimal at s = -log L, where every scaled loss e^s L is 1.
  w = weighting.imtl_l(optimizer=optax.sgd(0.2))
  losses = jnp.array([3.0, 0.25])
  state = jax.lax.fori_loop(
      0, 300, lambda _, s: w.update(losses, jnp.ones(2), s)[1], w.init(2))
  np.testing.assert_allclose(state.log_scales, -np.log([3.0, 0.25]),
                             rtol=1e-4)


def test_absent_task_state_is_unchanged_and_others_unaffected():
  w = weighting.imtl_l(learning_rate=0.1)
  update = jax.jit(w.update)
  state = w.init(3)
  losses = jnp.array([2.0, 5.0, 0.5])
  counts = jnp.array([0.0, 2.0, 1.0])
  for _ in range(3):
    _, new_state = update(losses, counts, state)
    for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
      np.testing.assert_array_equal(new[0], old[0])
    state = new_state
  w2 = weighting.imtl_l(learning_rate=0.1)
  state2 = w2.init(2)
  for _ in range(3):
    _, state2 = jax.jit(w2.update)(losses[1:], counts[1:], state2)
  # Equal up to the last bit only: XLA's CPU exp rounds some entries of a
  # length-3 array differently from the same values in a length-2 one (1 ulp),
  # so w = exp(s), and the steps that use it, may differ by ~1e-7 relative.
  np.testing.assert_allclose(state.log_scales[1:], state2.log_scales,
                             rtol=1e-6)


def test_bad_learning_rate():
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    weighting.imtl_l(learning_rate=-1.0)


def test_huge_losses_keep_the_adam_state_finite_and_tasks_independent():
  # grad = e^0 L - 1 = [3e38, 1e30, -0.5] is clipped to [2^60, 2^60, -0.5]:
  # Adam's first step is -lr * sign(g), v = 1e-3 g^2 stays finite.
  w = weighting.imtl_l(learning_rate=1e-4)
  losses = jnp.array([3e38, 1e30, 0.5])
  _, state = jax.jit(w.update)(losses, jnp.ones(3), w.init(3))
  np.testing.assert_allclose(state.log_scales, [-1e-4, -1e-4, 1e-4],
                             rtol=1e-4)
  np.testing.assert_allclose(state.opt_state[0].nu,
                             [1e-3 * 2.0**120] * 2 + [2.5e-4], rtol=1e-6)
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(leaf))
  # The clip is per task: with task 0 absent, tasks 1 and 2 step exactly as
  # in the two-task problem without it.
  _, state3 = jax.jit(w.update)(losses, jnp.array([0.0, 1.0, 1.0]), w.init(3))
  _, state2 = jax.jit(w.update)(losses[1:], jnp.ones(2), w.init(2))
  np.testing.assert_array_equal(state3.log_scales[1:], state2.log_scales)
  np.testing.assert_array_equal(state3.opt_state[0].nu[1:],
                                state2.opt_state[0].nu)
