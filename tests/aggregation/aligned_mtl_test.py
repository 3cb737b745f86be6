"""Tests of Aligned-MTL against the official ProcrustesSolver, in numpy."""

import jax
import numpy as np
import pytest

# A name, not the module: the package re-exports `aligned_mtl` the function,
# which shadows the submodule attribute.
from mtl_jax.aggregation.aligned_mtl import aligned_mtl

from agg_testing import run_padded

MODES = ("min", "median", "rmse")
AGGS = {mode: aligned_mtl(mode) for mode in MODES}
UPDATES = {mode: jax.jit(agg.update) for mode, agg in AGGS.items()}
P = 8  # inputs are zero-padded to P columns: one compilation per K


def _run(grads, counts=None, mode="min"):
  return run_padded(UPDATES[mode], AGGS[mode].init(len(grads)), grads,
                    width=P, counts=counts)[0]


def _official(grads, mode="min"):
  """`ProcrustesSolver.apply` + `AlignedMTLBalancer.step`, in float64."""
  grads = np.asarray(grads, np.float64).T  # [P, K], as in the official code
  cov = grads.T @ grads
  singulars, basis = np.linalg.eigh(cov)
  tol = singulars.max() * max(cov.shape) * np.finfo(np.float32).eps
  rank = int((singulars > tol).sum())
  order = np.argsort(singulars)[::-1]
  singulars, basis = singulars[order][:rank], basis[:, order][:, :rank]
  if mode == "min":
    weights = basis * np.sqrt(singulars[-1])
  elif mode == "median":
    # torch.median returns the lower of the two middle values.
    weights = basis * np.sqrt(np.sort(singulars)[(rank - 1) // 2])
  else:
    weights = basis * np.sqrt(singulars.mean())
  weights = weights / np.sqrt(singulars)[None, :]
  weights = weights @ basis.T
  return (grads @ weights).sum(-1)


@pytest.mark.parametrize("mode", MODES)
def test_orthogonal_gradients_by_hand(mode):
  # Orthogonal gradients: B = sqrt(lambda_R) diag(1 / ||g_i||), every
  # gradient is rescaled to length sqrt(lambda_R); lambda = (1, 4, 9).
  grads = np.diag([1.0, 2.0, 3.0]).astype(np.float32)
  length = {"min": 1.0, "median": 2.0, "rmse": np.sqrt(14 / 3)}[mode]
  np.testing.assert_allclose(_run(grads, mode=mode), [length] * 3, rtol=1e-5)
  # Equal norms: the plain sum, whatever the mode.
  grads = np.array([[0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
  np.testing.assert_allclose(_run(grads, mode=mode), [2.0, 2.0, 2.0], rtol=1e-5)


def test_even_count_median_is_the_lower_one():
  grads = np.diag([1.0, 2.0]).astype(np.float32)  # lambda = (1, 4)
  np.testing.assert_allclose(_run(grads, mode="median"), [1.0, 1.0], rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_matches_official_code(mode, k):
  grads = np.random.default_rng(k).normal(size=(k, P)).astype(np.float32)
  np.testing.assert_allclose(_run(grads, mode=mode), _official(grads, mode),
                             rtol=1e-4, atol=1e-5)


def test_aligned_gradients_are_orthonormal_up_to_scale():
  # The defining property: B G has orthogonal rows of length sqrt(lambda_min).
  grads = np.random.default_rng(4).normal(size=(3, P))
  lam, vecs = np.linalg.eigh(grads @ grads.T)
  b = np.sqrt(lam.min()) * (vecs / np.sqrt(lam)) @ vecs.T
  np.testing.assert_allclose((b @ grads) @ (b @ grads).T,
                             lam.min() * np.eye(3), atol=1e-10)
  np.testing.assert_allclose(_run(grads), b.sum(0) @ grads, rtol=1e-4,
                             atol=1e-5)


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


@pytest.mark.parametrize("mode", MODES)
def test_absent_task_equals_submatrix(mode):
  grads = np.random.default_rng(2).normal(size=(5, P)).astype(np.float32)
  grads[1] = 0.0
  counts = np.array([1.0, 0.0, 2.0, 1.0, 1.0])
  np.testing.assert_allclose(_run(grads, counts, mode),
                             _official(np.delete(grads, 1, axis=0), mode),
                             rtol=1e-4, atol=1e-5)


def test_degenerate_inputs_are_finite():
  np.testing.assert_array_equal(_run(np.zeros((2, 3))), 0.0)
  np.testing.assert_array_equal(_run(np.zeros((2, 3)), counts=[0.0, 0.0]), 0.0)
  np.testing.assert_allclose(_run(np.array([[1.0, -2.0]])), [1.0, -2.0],
                             rtol=1e-6)
  # Rank 1 (identical gradients): the one nonzero eigenpair is (2|g|^2,
  # (1, 1)/sqrt(2)), so B = 1/2 [[1, 1], [1, 1]], alpha = (1, 1): the sum.
  g = np.array([1.0, 2.0, 3.0], np.float32)
  np.testing.assert_allclose(_run(np.stack([g, g])), 2 * g, rtol=1e-5)
  np.testing.assert_allclose(_official(np.stack([g, g])), 2 * g, rtol=1e-12)
  # Rank 2 of 3 (g3 = g1 + g2): the float32 round-off eigenvalue is dropped.
  g12 = np.random.default_rng(3).normal(size=(2, P)).astype(np.float32)
  grads = np.concatenate([g12, g12.sum(0, keepdims=True)])
  np.testing.assert_allclose(_run(grads), _official(grads), rtol=1e-4,
                             atol=1e-5)


def test_errors_and_flags():
  with pytest.raises(ValueError, match="unknown aligned_mtl scale_mode 'max'; "
                                       "valid: min, median, rmse"):
    aligned_mtl("max")
  assert AGGS["min"].rep_grad_ok
