"""Tests of uncertainty weighting (Kendall et al. 2018, LibMTL convention)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import weighting

ALL = jnp.ones(3)


def test_two_sgd_steps_by_hand():
  w = weighting.uncertainty(optimizer=optax.sgd(0.1))
  update = jax.jit(w.update)
  state = w.init(3)
  losses = jnp.array([2.0, 0.5, 1.0])
  weights, state = update(losses, ALL, state)
  # s = 0: w = 0.5 * exp(0) = 0.5.
  np.testing.assert_allclose(weights, [0.5, 0.5, 0.5])
  # d/ds = 0.5 - 0.5 * exp(-s) * L = 0.5 - 0.5 * L = [-0.5, 0.25, 0];
  # s <- 0 - 0.1 * grad = [0.05, -0.025, 0].
  np.testing.assert_allclose(state.log_vars, [0.05, -0.025, 0.0], rtol=1e-6)
  weights, state = update(losses, ALL, state)
  s = np.array([0.05, -0.025, 0.0])
  np.testing.assert_allclose(weights, 0.5 * np.exp(-s), rtol=1e-6)
  grad = 0.5 - 0.5 * np.exp(-s) * np.array([2.0, 0.5, 1.0])
  np.testing.assert_allclose(state.log_vars, s - 0.1 * grad, rtol=1e-6)


def test_default_adam_first_step_is_lr_times_sign():
  w = weighting.get_weighting("uncertainty", learning_rate=0.01,
                              init_log_var=0.5)
  _, state = jax.jit(w.update)(jnp.array([4.0, 0.1]), jnp.ones(2), w.init(2))
  # grad = 0.5 - 0.5 * exp(-0.5) * L = [-0.713, +0.470]; Adam's first step
  # is -lr * sign(grad) (up to float32 rounding of the bias correction).
  np.testing.assert_allclose(state.log_vars, [0.51, 0.49], rtol=1e-5)


def test_converges_to_log_loss():
  # The objective 0.5 exp(-s) L + 0.5 s is minimal at s = log L.
  w = weighting.uncertainty(optimizer=optax.sgd(0.5))
  losses = jnp.array([3.0, 0.25])
  state = jax.lax.fori_loop(
      0, 300, lambda _, s: w.update(losses, jnp.ones(2), s)[1], w.init(2))
  np.testing.assert_allclose(state.log_vars, np.log([3.0, 0.25]), rtol=1e-4)


def test_absent_task_state_is_unchanged_and_others_unaffected():
  w = weighting.uncertainty(learning_rate=0.1)
  update = jax.jit(w.update)
  state = w.init(3)
  losses = jnp.array([2.0, 5.0, 0.5])
  counts = jnp.array([4.0, 0.0, 1.0])
  for _ in range(3):
    _, new_state = update(losses, counts, state)
    for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
      np.testing.assert_array_equal(new[1], old[1])
    state = new_state
  # Tasks 0 and 2 moved exactly as in a 2-task run without task 1.
  w2 = weighting.uncertainty(learning_rate=0.1)
  state2 = w2.init(2)
  for _ in range(3):
    _, state2 = jax.jit(w2.update)(losses[::2], counts[::2], state2)
  np.testing.assert_array_equal(state.log_vars[::2], state2.log_vars)
  np.testing.assert_array_equal(state.log_vars[1], 0.0)


def test_bad_hyperparameters():
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    weighting.uncertainty(learning_rate=0.0)
  with pytest.raises(ValueError, match="init_log_var must be finite"):
    weighting.uncertainty(init_log_var=float("nan"))


def test_huge_losses_keep_the_adam_state_finite():
  # grad = 0.5 - 0.5 exp(-s) L = [-5e29, -1.5e38, 0] is clipped to
  # [-2^60, -2^60, 0]. Adam then steps s by +lr where g < 0 and not at all
  # where g = 0; after two steps with the same clipped g: m = -0.19 * 2^60,
  # v = (0.999 + 1) * 1e-3 * 2^120, s = 2 lr (each bias-corrected step is
  # m_hat / sqrt(v_hat) = -1).
  w = weighting.uncertainty(learning_rate=1e-4)
  update = jax.jit(w.update)
  state = w.init(3)
  losses = jnp.array([1e30, 3e38, 1.0])
  for _ in range(2):
    _, state = update(losses, ALL, state)
  np.testing.assert_allclose(state.log_vars, [2e-4, 2e-4, 0.0], rtol=1e-4)
  adam = state.opt_state[0]
  np.testing.assert_allclose(adam.mu, [-0.19 * 2.0**60] * 2 + [0.0],
                             rtol=1e-6)
  np.testing.assert_allclose(adam.nu, [1.999e-3 * 2.0**120] * 2 + [0.0],
                             rtol=1e-6)
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(leaf))
