"""Tests of ConFIG: equal cosines, projection length, official reference."""

import jax
import numpy as np
import pytest

from mtl_jax.aggregation import conflict_free

from agg_testing import run_padded

AGG = conflict_free.config()
UPDATE = jax.jit(AGG.update)
P = 8  # inputs are zero-padded to P columns: one compilation per K


def _run(grads, counts=None):
  return run_padded(UPDATE, AGG.init(len(grads)), grads, width=P,
                    counts=counts)[0]


def _official(grads):
  """`ConFIG_update` with its defaults (lstsq, ProjectionLength), float64.

  `rcond` is torch's default for the official float32 inputs (float32 eps
  times max(m, n)), so that round-off singular values are dropped as there.
  """
  grads = np.asarray(grads, np.float64)
  norms = np.linalg.norm(grads, axis=1, keepdims=True)
  with np.errstate(invalid="ignore"):
    units = np.nan_to_num(grads / norms, nan=0.0)
  best = np.linalg.lstsq(units, np.ones(len(grads)),
                         rcond=np.finfo(np.float32).eps * max(units.shape))[0]
  unit = best / np.linalg.norm(best)
  return np.sum(grads @ unit) * unit


def test_two_tasks_by_hand():
  # Unit gradients e1 and e2: equal cosine along (1, 1)/sqrt2; the length is
  # the sum of projections, 1/sqrt2 + 3/sqrt2.
  grads = np.array([[1.0, 0.0], [0.0, 3.0]], np.float32)
  np.testing.assert_allclose(_run(grads), [2.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_equal_positive_cosines_and_projection_length(k):
  grads = np.random.default_rng(k).normal(size=(k, P)).astype(np.float32)
  direction = _run(grads)
  unit = direction / np.linalg.norm(direction)
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  cosines = units @ unit
  assert np.all(cosines > 0)
  np.testing.assert_allclose(cosines, cosines[0], rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(direction), np.sum(grads @ unit),
                             rtol=1e-5)
  np.testing.assert_allclose(direction, _official(grads), rtol=1e-4, atol=1e-5)


def test_conflicting_pair_gets_a_conflict_free_direction():
  grads = np.array([[1.0, 0.2], [-1.0, 0.3]], np.float32)
  direction = _run(grads)
  assert np.all(grads @ direction > 0)  # the plain sum conflicts with neither
  np.testing.assert_allclose(direction, _official(grads), rtol=1e-5)


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


def test_absent_task_equals_submatrix():
  grads = np.random.default_rng(2).normal(size=(5, P)).astype(np.float32)
  grads[3] = 0.0
  counts = np.array([1.0, 2.0, 1.0, 0.0, 1.0])
  expected = _official(np.delete(grads, 3, axis=0))
  np.testing.assert_allclose(_run(grads, counts), expected, rtol=1e-4,
                             atol=1e-5)


def test_degenerate_inputs_are_finite():
  np.testing.assert_array_equal(_run(np.zeros((2, 3))), 0.0)
  np.testing.assert_array_equal(_run(np.zeros((2, 3)), counts=[0.0, 0.0]), 0.0)
  np.testing.assert_allclose(_run(np.array([[1.0, -2.0]])), [1.0, -2.0],
                             rtol=1e-6)
  g = np.array([1.0, 2.0, 3.0], np.float32)
  np.testing.assert_allclose(_run(np.stack([g, g])), 2 * g, rtol=1e-5)
  # A present zero gradient drops out of the least squares (the official
  # nan_to_num).
  grads = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
  np.testing.assert_allclose(_run(grads), [2.0, 2.0, 0.0], rtol=1e-5)
  # Rank 2 of 3 (g3 = g1 + g2): U x = 1 has no exact solution; the least
  # squares one (float32 round-off singular value dropped) is used.
  g12 = np.random.default_rng(3).normal(size=(2, P)).astype(np.float32)
  grads = np.concatenate([g12, g12.sum(0, keepdims=True)])
  np.testing.assert_allclose(_run(grads), _official(grads), rtol=1e-3,
                             atol=1e-4)


def test_rep_grad_ok():
  assert not AGG.rep_grad_ok
