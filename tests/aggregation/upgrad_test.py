"""Tests of UPGrad and DualProj against hand-computed projections and NNLS."""

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from scipy import optimize

from mtl_jax.aggregation.upgrad import dualproj
from mtl_jax.aggregation.upgrad import upgrad

from agg_testing import run_padded

P = 16  # gradients are zero-padded to P columns: one compilation per K
UPGRAD = upgrad()
DUALPROJ = dualproj()
UPDATES = {"upgrad": jax.jit(UPGRAD.update),
           "dualproj": jax.jit(DUALPROJ.update)}
AGGS = {"upgrad": UPGRAD, "dualproj": DUALPROJ}
SETTINGS = hypothesis.settings(max_examples=15, deadline=None)


def _run(name, grads, counts=None, agg=None, update=None):
  agg = AGGS[name] if agg is None else agg
  update = UPDATES[name] if update is None else update
  return run_padded(update, agg.init(len(grads)), grads, width=P,
                    counts=counts)[0]


def _grads(seed, k, p=P):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, p)) * rng.uniform(0.3, 3.0, size=(k, 1))
  return (g + rng.normal(scale=2.0) * rng.normal(size=(1, p))).astype(
      np.float32)


def _nnls_projection(g, u):
  """Projection of g^T u onto {x : g x >= 0}: g^T w, w = u + argmin_{s >= 0}
  |g^T (u + s)| (Proposition 1 of Quinton & Rey), solved by scipy's NNLS."""
  g = np.float64(g)
  s, _ = optimize.nnls(g.T, -g.T @ u, maxiter=1000)
  return g.T @ (u + s)


def _halfspace(x, a):
  """Projection of x onto {y : a . y >= 0}."""
  return x - min(0.0, x @ a) / (a @ a) * a


def test_hand_computed_two_tasks():
  # TorchJD's DualProj example: mean [1, 1, 1] conflicts with g1 only.
  g = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
  np.testing.assert_allclose(_run("dualproj", g), [5 / 9, 10 / 9, 10 / 9],
                             rtol=1e-6)
  # UPGrad, two tasks: each g_i is projected onto the half-space of the
  # other (the two gradients conflict), then the projections are averaged.
  expected = 0.5 * (_halfspace(g[0], g[1]) + _halfspace(g[1], g[0]))
  np.testing.assert_allclose(_run("upgrad", g), expected, atol=6e-6)
  # Without conflict both are the mean gradient.
  g = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
  for name in ("upgrad", "dualproj"):
    np.testing.assert_allclose(_run(name, g), g.mean(0), rtol=1e-6)


@SETTINGS
@hypothesis.given(st.integers(0, 2**31 - 1))
def test_two_task_closed_form(seed):
  g = np.float64(_grads(seed, 2))
  expected = 0.5 * (_halfspace(g[0], g[1]) + _halfspace(g[1], g[0]))
  np.testing.assert_allclose(_run("upgrad", g), expected,
                             atol=1e-6 * np.abs(g).max())


@SETTINGS
@hypothesis.given(st.integers(0, 2**31 - 1))
def test_match_nnls_no_conflict_and_permutation(seed):
  g = _grads(seed, 5)
  k = len(g)
  scale = np.max(np.sum(np.float64(g)**2, axis=1))
  refs = {
      "upgrad": sum(_nnls_projection(g, np.eye(k)[i] / k) for i in range(k)),
      "dualproj": _nnls_projection(g, np.full(k, 1.0 / k)),
  }
  perm = np.random.default_rng(seed).permutation(k)
  for name, ref in refs.items():
    d = _run(name, g)
    atol = 1e-6 * np.sqrt(scale)
    np.testing.assert_allclose(d, ref, atol=atol)
    # In the dual cone: no conflict with any task.
    assert np.all(g @ d >= -1e-6 * scale)
    np.testing.assert_allclose(_run(name, g[perm]), d, atol=atol)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_linear_under_positive_scaling(name):
  g = _grads(1, 5)
  d = _run(name, g)
  for c in (1e-8, 0.37, 1e8):
    np.testing.assert_allclose(_run(name, g * c) / c, d, rtol=1e-5,
                               atol=1e-5 * np.abs(d).max())


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_single_task_zero_gradients_and_absent_tasks(name):
  g = _grads(2, 5)
  # A single present task gives its own gradient.
  only = np.zeros_like(g)
  only[3] = g[3]
  np.testing.assert_allclose(_run(name, only, counts=[0, 0, 0, 2, 0]), g[3],
                             rtol=1e-6)
  np.testing.assert_array_equal(_run(name, np.zeros((5, 4))), np.zeros(4))
  # Absent tasks: the result of the sub-matrix (here checked against NNLS on
  # it, since its own shape would need another compilation).
  absent = g.copy()
  absent[[1, 4]] = 0.0
  sub = g[[0, 2, 3]]
  u = np.eye(3) / 3
  ref = (sum(_nnls_projection(sub, u[i]) for i in range(3))
         if name == "upgrad" else _nnls_projection(sub, u.sum(0)))
  d = _run(name, absent, counts=[1, 0, 1, 1, 0])
  np.testing.assert_allclose(d, ref, atol=1e-6 * np.abs(g).max())
  # Even non-zero rows of absent tasks are ignored.
  np.testing.assert_allclose(_run(name, g, counts=[1, 0, 1, 1, 0]), d,
                             atol=1e-6 * np.abs(g).max())


def test_pref_vector():
  g = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], np.float32)
  pref = [0.2, 0.8]
  agg = dualproj(pref)
  d = _run("dualproj", g, agg=agg, update=jax.jit(agg.update))
  np.testing.assert_allclose(d, _nnls_projection(g, np.array(pref)),
                             atol=1e-6)
  agg = upgrad(pref)
  d = _run("upgrad", g, agg=agg, update=jax.jit(agg.update))
  expected = 0.2 * _halfspace(g[0], g[1]) + 0.8 * _halfspace(g[1], g[0])
  np.testing.assert_allclose(d, expected, rtol=1e-6)


def test_errors():
  assert not UPGRAD.rep_grad_ok and not DUALPROJ.rep_grad_ok
  with pytest.raises(ValueError, match="upgrad: pref_vector has 2 entries "
                     "for 3 tasks"):
    upgrad([0.5, 0.5]).init(3)
  with pytest.raises(ValueError, match="dualproj: pref_vector must be a "
                     "non-empty list of finite values"):
    dualproj([float("nan")])
