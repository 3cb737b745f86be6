"""Tests of the mean and sum aggregators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.aggregation import basic

K, P = 4, 6
_RNG = np.random.default_rng(0)
G = _RNG.normal(size=(K, P)).astype(np.float32)
ALL = np.ones(K, np.float32)
KEY = jax.random.key(0)

AGGREGATORS = {"mean": basic.mean(), "sum": basic.sum()}
UPDATES = {name: jax.jit(agg.update) for name, agg in AGGREGATORS.items()}


def _run(name, grads, counts):
  agg = AGGREGATORS[name]
  grads = jnp.asarray(grads)
  direction, state = UPDATES[name](grads, agg.init(grads.shape[0]),
                                   losses=jnp.ones(grads.shape[0]),
                                   counts=jnp.asarray(counts), rng=KEY)
  assert state == agg.init(grads.shape[0])
  return np.asarray(direction, np.float64)


def test_values_by_hand():
  grads = np.array([[1.0, 2.0], [3.0, -4.0], [9.0, 9.0]], np.float32)
  counts = np.array([5.0, 1.0, 0.0], np.float32)  # the third task is absent
  np.testing.assert_allclose(_run("sum", grads, counts), [4.0, -2.0])
  # Mean over the 2 PRESENT tasks, not K = 3, even with a nonzero absent row.
  np.testing.assert_allclose(_run("mean", grads, counts), [2.0, -1.0])
  np.testing.assert_allclose(_run("mean", grads, np.ones(3)), [13 / 3, 7 / 3],
                             rtol=1e-6)


@pytest.mark.parametrize("name", ["mean", "sum"])
def test_absent_task_equals_submatrix(name):
  counts = np.array([1.0, 0.0, 2.0, 3.0], np.float32)
  grads = G.copy()
  grads[1] = 0.0
  expected = _run(name, np.delete(G, 1, axis=0), np.ones(K - 1))
  np.testing.assert_allclose(_run(name, grads, counts), expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["mean", "sum"])
@pytest.mark.parametrize("scale", [-2.5, 1e-8, 1e8])
def test_linear_under_scaling(name, scale):
  np.testing.assert_allclose(_run(name, scale * G, ALL),
                             scale * _run(name, G, ALL), rtol=1e-5)


@pytest.mark.parametrize("name", ["mean", "sum"])
def test_permutation_invariant_single_task_zero(name):
  perm = np.array([2, 0, 3, 1])
  np.testing.assert_allclose(_run(name, G[perm], ALL), _run(name, G, ALL),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_run(name, G[:1], np.ones(1)), G[0], rtol=1e-6)
  np.testing.assert_array_equal(_run(name, np.zeros_like(G), ALL), 0.0)
  # Nobody present: zero, not NaN.
  np.testing.assert_array_equal(_run(name, np.zeros_like(G), np.zeros(K)), 0.0)


def test_rep_grad_ok():
  assert basic.mean().rep_grad_ok and basic.sum().rep_grad_ok
