"""Tests of Random Loss Weighting (Lin et al. 2021)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import weighting

LOSSES = jnp.array([1.0, 2.0, 3.0, 4.0])
ALL = jnp.ones(4)


def test_normal_weights_are_softmax_of_normal_draws():
  w = weighting.rlw()
  update = jax.jit(w.update)
  key = jax.random.key(3)
  weights, state = update(LOSSES, ALL, w.init(4), rng=key)
  # w = softmax(z), z ~ N(0, 1)^K drawn from the key as given.
  z = np.asarray(jax.random.normal(key, (4,)), np.float64)
  np.testing.assert_allclose(weights, np.exp(z) / np.exp(z).sum(), rtol=1e-5)
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
  assert state == weighting.RLWState()


@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet"])
def test_deterministic_per_key_and_different_across_keys(distribution):
  w = weighting.rlw(distribution)
  update = jax.jit(w.update)
  state = w.init(4)
  a, _ = update(LOSSES, ALL, state, rng=jax.random.key(0))
  b, _ = update(LOSSES, ALL, state, rng=jax.random.key(0))
  c, _ = update(LOSSES, ALL, state, rng=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4
  np.testing.assert_allclose(a.sum(), 1.0, rtol=1e-6)
  assert np.all(np.asarray(a) > 0)


def test_uniform_and_dirichlet_draws():
  key = jax.random.key(7)
  u, _ = jax.jit(weighting.rlw("uniform").update)(LOSSES, ALL, (), rng=key)
  z = np.asarray(jax.random.uniform(key, (4,)), np.float64)
  np.testing.assert_allclose(u, np.exp(z) / np.exp(z).sum(), rtol=1e-5)
  d, _ = jax.jit(weighting.rlw("dirichlet").update)(LOSSES, ALL, (), rng=key)
  # Dirichlet(1) = Gamma(1) = Exponential(1) draws normalised to sum 1, then
  # the softmax.
  g = np.asarray(jax.random.exponential(key, (4,)), np.float64)
  z = g / g.sum()
  np.testing.assert_allclose(d, np.exp(z) / np.exp(z).sum(), rtol=1e-5)


def test_absent_tasks_get_zero_and_present_ones_renormalise():
  key = jax.random.key(5)
  counts = jnp.array([2.0, 0.0, 1.0, 0.0])
  weights, _ = jax.jit(weighting.rlw().update)(LOSSES * (counts > 0), counts,
                                               (), rng=key)
  z = np.asarray(jax.random.normal(key, (4,)), np.float64)[[0, 2]]
  expected = np.exp(z) / np.exp(z).sum()
  np.testing.assert_allclose(weights, [expected[0], 0, expected[1], 0],
                             rtol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match="unknown rlw distribution 'beta'; "
                     "valid: dirichlet, normal, uniform"):
    weighting.rlw("beta")
  with pytest.raises(ValueError, match="needs rng"):
    weighting.rlw().update(LOSSES, ALL, ())
