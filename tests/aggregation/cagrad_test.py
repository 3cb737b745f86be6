"""Tests of CAGrad against a scipy transcription of the official algorithm."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtl_jax.aggregation.cagrad import cagrad
from mtl_jax.aggregation.cagrad import cagrad_weights

from agg_testing import run_padded

P = 16  # gradients are zero-padded to P columns: one compilation per K
AGG = cagrad()  # c = 0.4, rescale = 1
UPDATE = jax.jit(AGG.update)
WEIGHTS = jax.jit(cagrad_weights, static_argnames="c")
SETTINGS = hypothesis.settings(max_examples=20, deadline=None)


def _run(grads, counts=None, agg=AGG, update=UPDATE):
  return run_padded(update, agg.init(len(grads)), grads, width=P,
                    counts=counts)[0]


def _grads(seed, k, p=P):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, p)) * rng.uniform(0.3, 3.0, size=(k, 1))
  return (g + rng.normal(scale=2.0) * rng.normal(size=(1, p))).astype(
      np.float32)


def _official(grads, alpha=0.4, rescale=1, ftol=1e-12):
  """`cagrad` of the official code (Cranial-XIX/CAGrad), transcribed to
  numpy with `grads` as `[K, P]`; `ftol` tightened from SLSQP's default 1e-6
  so that the reference is accurate to ~1e-8."""
  grads = np.float64(grads)
  k = grads.shape[0]
  gg = grads @ grads.T
  g0_norm = np.sqrt(gg.mean() + 1e-8)
  x_start = np.ones(k) / k
  b = x_start.copy()
  c = alpha * g0_norm + 1e-8

  def objfn(x):
    return x @ gg @ b + c * np.sqrt(x @ gg @ x + 1e-8)

  res = optimize.minimize(
      objfn, x_start, bounds=[(0, 1)] * k,
      constraints={"type": "eq", "fun": lambda x: 1 - sum(x)},
      options={"ftol": ftol, "maxiter": 1000})
  gw = res.x @ grads
  lmbda = c / (np.linalg.norm(gw) + 1e-8)
  g = grads.mean(0) + lmbda * gw
  divisor = {0: 1.0, 1: 1 + alpha**2, 2: 1 + alpha}[rescale]
  return g / divisor, res.x


@SETTINGS
@hypothesis.given(st.integers(0, 2**31 - 1))
def test_matches_official_algorithm(seed):
  g = _grads(seed, 5)
  ref, w_ref = _official(g)
  d = _run(g)
  np.testing.assert_allclose(d, ref, atol=1e-5 * np.linalg.norm(ref))
  w = np.asarray(WEIGHTS(jnp.asarray(g @ g.T), c=0.4), np.float64)
  # The float32 solver's weights: the dual objective is as low as the
  # float64 reference's to float32 precision, and the weights agree to where
  # the objective's flatness allows (seed 3264680: 1.7e-5 apart while the
  # objectives differ by 6e-8 relative).
  gg = np.float64(g) @ np.float64(g).T
  b = np.full(len(g), 1.0 / len(g))
  c = 0.4 * np.sqrt(gg.mean() + 1e-8) + 1e-8

  def dual(x):
    return x @ gg @ b + c * np.sqrt(x @ gg @ x + 1e-8)

  assert dual(w) <= dual(w_ref) * (1 + 1e-6)
  np.testing.assert_allclose(w, w_ref, atol=1e-4)


def test_two_tasks_official_and_c_zero():
  for seed in range(5):
    g = _grads(seed, 2)
    ref, _ = _official(g)
    np.testing.assert_allclose(_run(g), ref, atol=1e-5 * np.linalg.norm(ref))
  # c = 0: the mean gradient.
  agg = cagrad(c=0.0, rescale=0)
  g = _grads(7, 2)
  np.testing.assert_allclose(_run(g, agg=agg, update=jax.jit(agg.update)),
                             g.mean(0), rtol=1e-6)


@pytest.mark.parametrize("rescale,factor", [(0, 1.4), (1, 1.4 / 1.16),
                                            (2, 1.0)])
def test_single_task_is_scaled_gradient(rescale, factor):
  # g0 = g_w = g: d = g + 0.4 |g| g / |g| = 1.4 g, then / 1, 1 + c^2, 1 + c.
  agg = AGG if rescale == 1 else cagrad(0.4, rescale=rescale)
  g = _grads(8, 1)
  update = UPDATE if rescale == 1 else jax.jit(agg.update)
  np.testing.assert_allclose(_run(g, agg=agg, update=update), factor * g[0],
                             rtol=1e-6)


def test_invariances_and_zero_gradients():
  g = _grads(9, 5)
  d = _run(g)
  atol = 1e-6 * np.abs(d).max()
  perm = np.array([3, 0, 4, 2, 1])
  np.testing.assert_allclose(_run(g[perm]), d, atol=atol)
  for c in (1e-8, 1e8):
    np.testing.assert_allclose(_run(g * c) / c, d, rtol=1e-5, atol=10 * atol)
  np.testing.assert_array_equal(_run(np.zeros((5, 3))), np.zeros(3))


def test_absent_tasks_equal_sub_matrix():
  g = _grads(10, 5)
  # The sub-matrix result, from the reference (its own shape would need
  # another compilation).
  sub, _ = _official(g[[0, 1, 3, 4]])
  absent = g.copy()
  absent[2] = 0.0
  counts = [1, 2, 0, 1, 1]
  np.testing.assert_allclose(_run(absent, counts=counts), sub,
                             atol=1e-5 * np.linalg.norm(sub))
  # Even a non-zero row of an absent task is ignored.
  np.testing.assert_allclose(_run(g, counts=counts), sub,
                             atol=1e-5 * np.linalg.norm(sub))
  # A single present task among absent ones: 1.4 g / 1.16.
  only = np.zeros_like(g)
  only[4] = g[4]
  np.testing.assert_allclose(_run(only, counts=[0, 0, 0, 0, 1]),
                             1.4 / 1.16 * g[4], rtol=1e-6)


def test_errors():
  assert not AGG.rep_grad_ok
  with pytest.raises(ValueError, match="c must be a finite value >= 0"):
    cagrad(c=-0.1)
  with pytest.raises(ValueError, match="rescale must be one of"):
    cagrad(rescale=3)
