"""Tests of the absent-task helpers: masked reductions and the masked step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.weighting import masking

PRESENT = jnp.array([True, False, True])


def test_masked_mean_ignores_absent_tasks():
  # (1 + 5) / 2 present tasks; the absent 100 does not count.
  assert masking.masked_mean(jnp.array([1.0, 100.0, 5.0]), PRESENT) == 3.0
  assert masking.masked_mean(jnp.ones(3), jnp.zeros(3, bool)) == 0.0


def test_masked_softmax_is_the_softmax_of_the_present_tasks():
  logits = jnp.array([0.5, 7.0, -1.0])
  z = masking.masked_softmax(logits, PRESENT)
  e = np.exp([0.5, -1.0])
  np.testing.assert_allclose(z, [e[0] / e.sum(), 0.0, e[1] / e.sum()],
                             rtol=1e-6)
  np.testing.assert_array_equal(
      masking.masked_softmax(logits, jnp.zeros(3, bool)), np.zeros(3))


def test_masked_softmax_gradient_is_finite_and_zero_for_absent_tasks():
  # A huge absent logit must neither leak into the present gradient nor NaN.
  logits = jnp.array([0.5, 1e30, -1.0])
  cot = jnp.array([1.0, 2.0, -1.0])
  g = jax.jit(jax.grad(
      lambda x: jnp.dot(masking.masked_softmax(x, PRESENT), cot)))(logits)
  g2 = jax.jit(jax.grad(lambda x: jnp.dot(jax.nn.softmax(x), cot[::2])))(
      logits[::2])
  np.testing.assert_allclose(g, [g2[0], 0.0, g2[1]], rtol=1e-6)


def test_sgd_step_moves_present_tasks_only():
  opt = optax.sgd(0.5)
  params = jnp.array([1.0, 2.0, 3.0])
  state = masking.init_optimizer(opt, params)
  new, _ = jax.jit(masking.masked_step, static_argnums=0)(
      opt, jnp.array([1.0, 1.0, -2.0]), state, params, PRESENT)
  # 1 - 0.5 * 1, unchanged, 3 - 0.5 * (-2)
  np.testing.assert_array_equal(new, [0.5, 2.0, 4.0])


def test_adam_state_is_per_task_and_untouched_when_absent():
  opt = optax.adam(0.1)
  params = jnp.zeros(3)
  state = masking.init_optimizer(opt, params)
  step = jax.jit(masking.masked_step, static_argnums=0)
  grads = jnp.array([2.0, -3.0, -0.5])
  p1, s1 = step(opt, grads, state, params, PRESENT)
  # The first Adam step is lr * sign(g) (m_hat / sqrt(v_hat) = g / |g|), up
  # to float32 rounding of the bias correction 1 - 0.999.
  np.testing.assert_allclose(p1, [-0.1, 0.0, 0.1], rtol=1e-5)
  adam1 = s1[0]
  np.testing.assert_array_equal(adam1.count, [1, 0, 1])
  np.testing.assert_array_equal(adam1.mu[1], 0.0)
  np.testing.assert_array_equal(adam1.nu[1], 0.0)
  # Task 1 appears at the second step: its own count is 1, so its first step
  # is again lr * sign(g), as if the absent step had never happened.
  p2, s2 = step(opt, grads, s1, p1, jnp.array([False, True, False]))
  np.testing.assert_allclose(p2, [-0.1, 0.1, 0.1], rtol=1e-5)
  np.testing.assert_array_equal(s2[0].count, [1, 1, 1])


def test_gradients_beyond_the_limit_are_clipped_elementwise():
  # sgd(1) shows the gradient the optimizer receives: |g| <= 2^60, the rest
  # (1e18 < 2^60 ~ 1.15e18) passes unchanged, and infinities are clipped too.
  assert masking.GRAD_LIMIT == 2.0**60
  opt = optax.sgd(1.0)
  grads = jnp.array([3e38, 1e18, -jnp.inf], jnp.float32)
  new, _ = jax.jit(masking.masked_step, static_argnums=0)(
      opt, grads, masking.init_optimizer(opt, jnp.zeros(3)), jnp.zeros(3),
      jnp.ones(3, bool))
  np.testing.assert_array_equal(new, np.array([-2.0**60, -1e18, 2.0**60],
                                              np.float32))


def test_adam_state_stays_finite_for_a_float32_max_gradient():
  # g = 3e38 is clipped to 2^60: m = 0.1 * 2^60, v = 0.001 * 2^120 (finite;
  # 3e38^2 would be inf), and the first step is still -lr * sign(g).
  opt = optax.adam(0.1)
  params = jnp.zeros(3)
  grads = jnp.array([3e38, -3e38, 2.0], jnp.float32)
  new, state = jax.jit(masking.masked_step, static_argnums=0)(
      opt, grads, masking.init_optimizer(opt, params), params, PRESENT)
  np.testing.assert_allclose(new, [-0.1, 0.0, -0.1], rtol=1e-4)
  adam = state[0]
  np.testing.assert_allclose(adam.mu, [0.1 * 2.0**60, 0.0, 0.2], rtol=1e-6)
  np.testing.assert_allclose(adam.nu, [1e-3 * 2.0**120, 0.0, 4e-3], rtol=1e-6)
