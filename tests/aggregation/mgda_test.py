"""Tests of MGDA: two-task closed form, no conflict, invariances, absences."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.aggregation.mgda import gradient_normalizers
from mtl_jax.aggregation.mgda import mgda

from agg_testing import run_padded

P = 16  # gradients are zero-padded to P columns: one compilation per K
AGG = mgda()
UPDATE = jax.jit(AGG.update)
SETTINGS = hypothesis.settings(max_examples=20, deadline=None)


def _run(grads, counts=None, losses=None, agg=AGG, update=UPDATE):
  return run_padded(update, agg.init(len(grads)), grads, width=P,
                    counts=counts, losses=losses)[0]


def _grads(seed, k, p=P):
  """Random gradients with a shared component of random sign and size, so
  that some draws conflict and some do not."""
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, p)) * rng.uniform(0.3, 3.0, size=(k, 1))
  return (g + rng.normal(scale=2.0) * rng.normal(size=(1, p))).astype(
      np.float32)


def _closed_form(g1, g2):
  g1, g2 = np.float64(g1), np.float64(g2)
  a = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2)**2), 0.0, 1.0)
  return a * g1 + (1 - a) * g2


@SETTINGS
@hypothesis.given(st.integers(0, 2**31 - 1))
def test_two_tasks_match_closed_form(seed):
  g = _grads(seed, 2)
  d = _run(g)
  scale = np.abs(g).max()
  np.testing.assert_allclose(d, _closed_form(g[0], g[1]), atol=1e-6 * scale)


def test_hand_computed_two_tasks():
  # Orthogonal unit gradients: the midpoint. Aligned: the shorter one.
  np.testing.assert_allclose(_run([[1.0, 0.0], [0.0, 1.0]]), [0.5, 0.5],
                             atol=1e-7)
  np.testing.assert_allclose(_run([[1.0, 1.0], [3.0, 3.0]]), [1.0, 1.0],
                             atol=1e-6)
  # Opposite gradients: 0 is in the hull.
  np.testing.assert_allclose(_run([[1.0, 2.0], [-2.0, -4.0]]), [0.0, 0.0],
                             atol=1e-6)


@SETTINGS
@hypothesis.given(st.integers(0, 2**31 - 1))
def test_no_conflict_and_permutation_invariance(seed):
  g = _grads(seed, 4)
  d = _run(g)
  scale = np.max(np.sum(np.float64(g)**2, axis=1))
  # The min-norm point d satisfies d.g_k >= |d|^2 for every task.
  assert np.all(g @ d >= d @ d - 1e-6 * scale)
  perm = np.random.default_rng(seed).permutation(4)
  np.testing.assert_allclose(_run(g[perm]), d, atol=1e-6 * np.abs(g).max())


@pytest.mark.parametrize("c", [1e-8, 1e8])
def test_scaled_gradients(c):
  g = _grads(1, 4)
  d = _run(g)
  np.testing.assert_allclose(_run(g * c) / c, d, rtol=1e-5,
                             atol=1e-5 * np.abs(d).max())


def test_zero_gradients_and_single_task():
  # All zero, or one zero gradient among others: 0 is in the hull.
  np.testing.assert_array_equal(_run(np.zeros((4, 5))), np.zeros(5))
  g = _grads(2, 4)
  g[1] = 0.0
  np.testing.assert_allclose(_run(g), np.zeros(P), atol=1e-7)
  # A single task gives its gradient, natively and with three absent tasks.
  g1 = _grads(3, 1)
  np.testing.assert_allclose(_run(g1), g1[0], rtol=1e-6)
  np.testing.assert_allclose(
      _run(np.concatenate([np.zeros((2, P)), g1, np.zeros((1, P))]),
           counts=[0, 0, 5, 0]), g1[0], rtol=1e-6)


def test_absent_tasks_equal_sub_matrix():
  g = _grads(4, 4)
  sub = _run(g[[0, 2]])
  absent = g.copy()
  absent[[1, 3]] = 0.0
  np.testing.assert_allclose(_run(absent, counts=[3, 0, 1, 0]), sub,
                             atol=1e-6 * np.abs(g).max())
  # Even a (contract-breaking) non-zero row of an absent task is ignored.
  np.testing.assert_allclose(_run(g, counts=[3, 0, 1, 0]), sub,
                             atol=1e-6 * np.abs(g).max())


def test_gradient_normalizers_of_the_paper_code():
  sq_norms = jnp.array([4.0, 0.0, 9.0])
  losses = jnp.array([2.0, 0.5, -1.0])
  np.testing.assert_array_equal(
      gradient_normalizers(sq_norms, losses, "none"), [1.0, 1.0, 1.0])
  # Zero norms and non-positive losses keep factor 1.
  np.testing.assert_array_equal(
      gradient_normalizers(sq_norms, losses, "l2"), [2.0, 1.0, 3.0])
  np.testing.assert_array_equal(
      gradient_normalizers(sq_norms, losses, "loss"), [2.0, 0.5, 1.0])
  np.testing.assert_array_equal(
      gradient_normalizers(sq_norms, losses, "loss+"), [4.0, 0.5, 3.0])


def test_l2_normalization_applied_to_normalized_or_raw_gradients():
  g = np.array([[3.0, 0.0], [0.0, 1.0]], np.float32)
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  # On unit vectors e1, e2 the min-norm weights are 1/2, 1/2.
  for apply_to, expected in [("normalized", 0.5 * (u[0] + u[1])),
                             ("raw", 0.5 * (g[0] + g[1]))]:
    agg = mgda("l2", apply_to=apply_to)
    np.testing.assert_allclose(
        _run(g, agg=agg, update=jax.jit(agg.update)), expected, rtol=1e-6)
  # "loss+" with losses (2, 4): g_k / (L_k |g_k|) = e1 / 2, e2 / 4; for
  # orthogonal a, b the min-norm weight of a is |b|^2 / (|a|^2 + |b|^2) = 0.2.
  agg = mgda("loss+")
  d = _run(g, losses=[2.0, 4.0], agg=agg, update=jax.jit(agg.update))
  np.testing.assert_allclose(d, 0.2 * u[0] / 2 + 0.8 * u[1] / 4, rtol=1e-6)


def test_interface_and_errors():
  assert AGG.rep_grad_ok
  assert AGG.init(3) == ()
  with pytest.raises(ValueError, match="unknown normalization 'l1'; valid: "
                     "none, l2, loss, loss\\+"):
    mgda("l1")
  with pytest.raises(ValueError, match="unknown apply_to 'x'"):
    mgda(apply_to="x")
  with pytest.raises(ValueError, match="needs losses"):
    mgda("loss").update(jnp.ones((2, 3)), (), losses=None, counts=None)
