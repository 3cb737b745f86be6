"""Tests of the Geometric Loss Strategy (Chennupati et al. 2019)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import weighting


def test_weights_by_hand():
  losses = jnp.array([1.0, 4.0, 2.0])
  weights, state = jax.jit(weighting.gls().update)(losses, jnp.ones(3),
                                                   weighting.gls().init(3))
  # GLS = (1 * 4 * 2)^(1/3) = 2; w_k = GLS / (K L_k) = 2 / (3 * [1, 4, 2]).
  np.testing.assert_allclose(weights, [2 / 3, 1 / 6, 1 / 3], rtol=1e-6)
  assert state == weighting.GLSState()


def test_weights_are_the_gradient_of_the_geometric_mean():
  losses = jnp.array([0.3, 1.7, 0.05, 12.0])
  weights, _ = jax.jit(weighting.gls().update)(losses, jnp.ones(4), ())
  grad = jax.jit(jax.grad(lambda l: jnp.prod(l)**(1 / 4)))(losses)
  np.testing.assert_allclose(weights, grad, rtol=1e-5)
  # Hence sum_k w_k L_k = GLS (the objective is 1-homogeneous).
  np.testing.assert_allclose(jnp.sum(weights * losses),
                             jnp.prod(losses)**(1 / 4), rtol=1e-5)


def test_absent_tasks_are_left_out_of_the_product():
  losses = jnp.array([1.0, 0.0, 4.0])  # an absent task's loss is 0
  weights, _ = jax.jit(weighting.gls().update)(losses, jnp.array([1, 0, 1]),
                                               ())
  # GLS = (1 * 4)^(1/2) = 2; w = 2 / (2 * [1, 4]) = [1, 0.25].
  np.testing.assert_allclose(weights, [1.0, 0.0, 0.25], rtol=1e-6)
  grad = jax.jit(jax.grad(lambda l: jnp.sqrt(l[0] * l[1])))(losses[::2])
  np.testing.assert_allclose(weights[::2], grad, rtol=1e-6)
  none, _ = jax.jit(weighting.gls().update)(losses, jnp.zeros(3), ())
  np.testing.assert_array_equal(none, np.zeros(3))


def test_zero_loss_is_clipped_to_eps():
  weights, _ = jax.jit(weighting.gls(eps=1e-4).update)(
      jnp.array([0.0, 1e-4]), jnp.ones(2), ())
  # Both losses count as 1e-4: GLS = 1e-4, w = 1e-4 / (2 * 1e-4) = 0.5.
  np.testing.assert_allclose(weights, [0.5, 0.5], rtol=1e-5)
  with pytest.raises(ValueError, match="eps must be > 0"):
    weighting.gls(eps=0.0)
