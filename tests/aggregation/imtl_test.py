"""Tests of IMTL-G: the equal-projection property and the closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.aggregation import imtl

from agg_testing import run_padded

AGG = imtl.imtl_g()
UPDATE = jax.jit(AGG.update)
P = 8  # inputs are zero-padded to P columns: one compilation per K


def _run(grads, counts=None):
  return run_padded(UPDATE, AGG.init(len(grads)), grads, width=P,
                    counts=counts)[0]


def _reference(grads):
  """LibMTL's closed form (task 0 as reference, explicit inverse), float64."""
  grads = np.asarray(grads, np.float64)
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  d = grads[0] - grads[1:]
  u = units[0] - units[1:]
  alpha = grads[0] @ u.T @ np.linalg.inv(d @ u.T)
  return np.concatenate([[1 - alpha.sum()], alpha]) @ grads


def _projections(direction, grads):
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  return units.astype(np.float64) @ direction


def test_two_tasks_by_hand():
  # u1 - u2 = (1, -1); alpha_2 = g1.(u1-u2) / (g1-g2).(u1-u2) = 1/3.
  grads = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
  np.testing.assert_allclose(_run(grads), [2 / 3, 2 / 3], rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_equal_projections_and_reference(k):
  grads = np.random.default_rng(k).normal(size=(k, P)).astype(np.float32)
  direction = _run(grads)
  proj = _projections(direction, grads)
  np.testing.assert_allclose(proj, proj[0], rtol=1e-5)
  np.testing.assert_allclose(direction, _reference(grads), rtol=1e-4, atol=1e-5)
  # The weights sum to one.
  gram = jnp.asarray(grads @ grads.T)
  alpha = np.asarray(jax.jit(imtl.imtl_g_weights)(gram, jnp.ones(k, bool)))
  np.testing.assert_allclose(alpha.sum(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(alpha @ grads, direction, rtol=1e-5, atol=1e-6)


def test_permutation_invariant():
  grads = np.random.default_rng(0).normal(size=(5, P)).astype(np.float32)
  perm = np.array([3, 1, 4, 0, 2])
  np.testing.assert_allclose(_run(grads[perm]), _run(grads), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("scale", [-3.0, 1e-8, 1e8])
def test_scale_equivariant(scale):
  grads = np.random.default_rng(1).normal(size=(5, P)).astype(np.float32)
  np.testing.assert_allclose(_run(scale * grads), scale * _run(grads),
                             rtol=1e-5, atol=1e-5 * abs(scale))


@pytest.mark.parametrize("absent", [0, 2])  # the reference task, or not
def test_absent_task_equals_submatrix(absent):
  grads = np.random.default_rng(2).normal(size=(5, P)).astype(np.float32)
  grads[absent] = 0.0
  counts = np.ones(5)
  counts[absent] = 0.0
  expected = _reference(np.delete(grads, absent, axis=0))
  np.testing.assert_allclose(_run(grads, counts), expected, rtol=1e-4,
                             atol=1e-5)


def test_degenerate_inputs_are_finite():
  # Zero gradients, a single task, identical gradients, a zero row among
  # present tasks, collinear opposite gradients: no NaN, sensible values.
  np.testing.assert_array_equal(_run(np.zeros((2, 3))), 0.0)
  np.testing.assert_array_equal(_run(np.zeros((2, 3)), counts=[0.0, 0.0]), 0.0)
  np.testing.assert_allclose(_run(np.array([[1.0, -2.0]])), [1.0, -2.0])
  g = np.array([1.0, 2.0, 3.0], np.float32)
  np.testing.assert_allclose(_run(np.stack([g, g])), g, rtol=1e-6)
  out = _run(np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.5, 1.0]]))
  assert np.all(np.isfinite(out))
  # Opposite gradients: every alpha gives a multiple of g, and d.u_1 = d.u_2
  # forces it to 0.
  np.testing.assert_allclose(_run(np.stack([g, -2 * g])), 0.0, atol=1e-5)


def test_rep_grad_ok():
  assert AGG.rep_grad_ok


def test_task_order_does_not_matter_when_norms_differ():
  # Norms 1e-2, 1, 1e2: solving the paper's closed form (task 1 as the
  # reference) with a relative cutoff drops a real singular value, and two
  # orders of the same tasks give opposite directions (cosine -0.9996). The
  # direction must be the same, and its projections on the unit gradients
  # equal.
  rng = np.random.default_rng(278)
  g = rng.normal(size=(3, 4))
  g = g / np.linalg.norm(g, axis=1, keepdims=True) * np.array(
      [[1e-2], [1.0], [1e2]])
  g = g.astype(np.float32)
  d = _run(g)
  for order in ([2, 1, 0], [1, 2, 0], [0, 2, 1]):
    d_perm = _run(g[order])
    cos = d @ d_perm / np.linalg.norm(d) / np.linalg.norm(d_perm)
    assert cos > 1 - 1e-6, (order, cos)
    # The cosines' system has condition ~1e3 here: float32 weights carry
    # ~1e-4 relative error, whatever the order.
    np.testing.assert_allclose(d_perm, d, atol=1e-3 * np.linalg.norm(d))
  proj = _projections(d, g)
  np.testing.assert_allclose(proj, proj[0], rtol=1e-3)
  # The float64 closed form of the paper (exact in float64 at this spread).
  np.testing.assert_allclose(d, _reference(g), atol=1e-3 * np.linalg.norm(d))
