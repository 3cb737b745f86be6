"""Tests of GradNorm (Chen et al. 2018)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import weighting

ALL = jnp.ones(2)


def test_two_sgd_steps_by_hand():
  w = weighting.gradnorm(alpha=1.5, optimizer=optax.sgd(0.1))
  assert w.needs == frozenset({"grad_norms"})
  update = jax.jit(w.update)
  # Step 0: L = [2, 1] become L0; unweighted gradient norms g = [1, 3].
  weights, state = update(jnp.array([2.0, 1.0]), ALL, w.init(2),
                          grad_norms=jnp.array([1.0, 3.0]))
  np.testing.assert_array_equal(weights, [1.0, 1.0])  # the current w
  np.testing.assert_array_equal(state.initial_losses, [2.0, 1.0])
  # L/L0 = [1, 1] -> r = [1, 1]; G = w g = [1, 3]; target = mean(G) r^a = 2;
  # grad = sign(G - 2) g = [-1, 3]; w = 1 - 0.1 grad = [1.1, 0.7] (sum 1.8)
  # renormalised to sum 2: [1.1, 0.7] * 2 / 1.8.
  w1 = np.array([1.1, 0.7]) * 2 / 1.8
  np.testing.assert_allclose(state.weights, w1, rtol=1e-6)

  # Step 1: L = [1, 1] -> L/L0 = [0.5, 1], mean 0.75, r = [2/3, 4/3]; g = [2, 1].
  weights, state = update(jnp.array([1.0, 1.0]), ALL, state,
                          grad_norms=jnp.array([2.0, 1.0]))
  np.testing.assert_allclose(weights, w1, rtol=1e-6)
  g = np.array([2.0, 1.0])
  big_g = w1 * g                                      # [2.444, 0.778]
  target = big_g.mean() * np.array([2 / 3, 4 / 3])**1.5  # [0.877, 2.481]
  grad = np.sign(big_g - target) * g                  # [+2, -1]
  np.testing.assert_array_equal(grad, [2.0, -1.0])
  w2 = w1 - 0.1 * grad
  w2 = w2 * 2 / w2.sum()
  np.testing.assert_allclose(state.weights, w2, rtol=1e-6)
  np.testing.assert_array_equal(state.initial_losses, [2.0, 1.0])


def test_default_adam_first_step_is_lr_times_sign():
  w = weighting.get_weighting("gradnorm", learning_rate=0.025)
  _, state = jax.jit(w.update)(jnp.array([2.0, 1.0]), ALL, w.init(2),
                               grad_norms=jnp.array([1.0, 3.0]))
  # grad = [-1, 3] (above); Adam moves w by -0.025 sign(grad): [1.025, 0.975],
  # which already sums to 2.
  np.testing.assert_allclose(state.weights, [1.025, 0.975], rtol=1e-5)


def test_absent_task_state_is_unchanged_and_others_unaffected():
  w3 = weighting.gradnorm(optimizer=optax.sgd(0.1))
  w2 = weighting.gradnorm(optimizer=optax.sgd(0.1))
  up3, up2 = jax.jit(w3.update), jax.jit(w2.update)
  s3, s2 = w3.init(3), w2.init(2)
  rng = np.random.default_rng(0)
  counts = jnp.array([1.0, 0.0, 1.0])
  for _ in range(4):
    losses = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32) * counts
    norms = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32) * counts
    weights3, new_s3 = up3(losses, counts, s3, grad_norms=norms)
    for new, old in zip(jax.tree.leaves(new_s3), jax.tree.leaves(s3)):
      np.testing.assert_array_equal(new[1], old[1])
    # Tasks 0 and 2 follow GradNorm with 2 tasks (renormalised to sum 2).
    weights2, s2 = up2(losses[::2], counts[::2], s2, grad_norms=norms[::2])
    np.testing.assert_allclose(weights3[::2], weights2, rtol=1e-6)
    np.testing.assert_allclose(new_s3.weights[::2], s2.weights, rtol=1e-6)
    s3 = new_s3
  np.testing.assert_allclose(s3.weights[::2].sum(), 2.0, rtol=1e-6)
  assert s3.weights[1] == 1.0 and not s3.seen[1]
  # When task 1 first appears, its loss becomes its L0 and w sums to 3.
  _, s3 = up3(jnp.array([1.0, 0.7, 1.0]), jnp.ones(3), s3,
              grad_norms=jnp.ones(3))
  assert s3.initial_losses[1] == np.float32(0.7) and s3.seen[1]
  np.testing.assert_allclose(s3.weights.sum(), 3.0, rtol=1e-6)


def test_needs_grad_norms_and_checks_hyperparameters():
  w = weighting.gradnorm()
  with pytest.raises(ValueError, match="needs grad_norms"):
    w.update(jnp.ones(2), ALL, w.init(2))
  with pytest.raises(ValueError, match="alpha must be >= 0"):
    weighting.gradnorm(alpha=-1.0)
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    weighting.gradnorm(learning_rate=0.0)


def test_huge_gradient_norm_keeps_the_adam_state_finite():
  # L = L0 = [1, 1], g = [3e38, 1]: G / max g = [1, ~3e-39], target = 0.5,
  # grad = sign(G - target) g = [3e38, -1], clipped to [2^60, -1]. Adam's
  # first step is -0.025 sign(grad): w = [0.975, 1.025] (sum 2), and
  # v = 1e-3 grad^2 = [1e-3 * 2^120, 1e-3] stays finite.
  w = weighting.gradnorm(learning_rate=0.025)
  _, state = jax.jit(w.update)(jnp.array([1.0, 1.0]), ALL, w.init(2),
                               grad_norms=jnp.array([3e38, 1.0]))
  np.testing.assert_allclose(state.weights, [0.975, 1.025], rtol=1e-5)
  np.testing.assert_allclose(state.opt_state[0].nu, [1e-3 * 2.0**120, 1e-3],
                             rtol=1e-6)
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(leaf))


def test_loss_ratio_near_float32_max_raises_that_tasks_weight():
  # Step 1: L = L0 = [1, 1], g = [1, 1]: a tie, grad 0, w stays [1, 1].
  # Step 2: L = [3e38, 1]: L / L0 = [3e38, 1], divided by the largest
  # [1, ~3e-39], mean 0.5, r = [2, ~0]; G = [1, 1], target = [2^1.5, ~0];
  # grad = sign(G - target) g = [-1, +1]. Adam's second step (first gradient
  # 0): m_hat / sqrt(v_hat) = (0.1 / 0.19) / sqrt(1e-3 / (1 - 0.999^2)) per
  # unit gradient, so w = 1 -+ 0.025 * that (sum 2): task 0, whose loss grew,
  # gains weight.
  w = weighting.gradnorm(learning_rate=0.025)
  update = jax.jit(w.update)
  _, state = update(jnp.array([1.0, 1.0]), ALL, w.init(2),
                    grad_norms=jnp.ones(2))
  np.testing.assert_array_equal(state.weights, [1.0, 1.0])
  _, state = update(jnp.array([3e38, 1.0]), ALL, state,
                    grad_norms=jnp.ones(2))
  step = 0.025 * (0.1 / 0.19) / np.sqrt(1e-3 / (1 - 0.999**2))
  np.testing.assert_allclose(state.weights, [1 + step, 1 - step], rtol=1e-5)
