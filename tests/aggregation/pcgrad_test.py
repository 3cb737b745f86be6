"""Tests of PCGrad against hand-computed values and the naive algorithm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Names, not modules: the package re-exports `pcgrad` the function, which
# shadows the submodule attribute.
from mtl_jax.aggregation.base import gram
from mtl_jax.aggregation.pcgrad import pcgrad
from mtl_jax.aggregation.pcgrad import pcgrad_coefficients
from mtl_jax.aggregation.pcgrad import random_task_orders

from agg_testing import run_padded

AGG = pcgrad()
UPDATE = jax.jit(AGG.update)
ORDERS = jax.jit(random_task_orders, static_argnums=1)
KEY = jax.random.key(42)
P = 8  # inputs are zero-padded to P columns: one compilation per K


def _run(grads, counts=None, rng=KEY):
  return run_padded(UPDATE, AGG.init(len(grads)), grads, width=P,
                    counts=counts, rng=rng)[0]


def _naive(grads, orders, present=None):
  """The official algorithm in float64; task i visits `orders[i]`."""
  grads = np.asarray(grads, np.float64)
  k = grads.shape[0]
  present = np.ones(k, bool) if present is None else np.asarray(present)
  projected = grads.copy()
  for i in range(k):
    if not present[i]:
      continue
    for j in orders[i]:
      if j == i or not present[j]:
        continue
      dot = projected[i] @ grads[j]
      if dot < 0:
        projected[i] -= dot / (grads[j] @ grads[j]) * grads[j]
  return projected[present].sum(axis=0)


def test_two_conflicting_tasks_by_hand():
  grads = np.array([[1.0, 0.0], [-1.0, 1.0]], np.float32)
  # g1' = g1 - (g1.g2)/|g2|^2 g2 = g1 + g2/2 = (0.5, 0.5);
  # g2' = g2 - (g2.g1)/|g1|^2 g1 = g2 + g1 = (0, 1).
  np.testing.assert_allclose(_run(grads), [0.5, 1.5], atol=1e-6)
  coefs = np.asarray(jax.jit(pcgrad_coefficients)(
      gram(jnp.asarray(grads)), jnp.ones(2, bool),
      jnp.array([[0, 1], [1, 0]])))
  projected = coefs @ grads
  np.testing.assert_allclose(projected, [[0.5, 0.5], [0.0, 1.0]], atol=1e-6)
  # Each projected gradient is orthogonal to the other ORIGINAL gradient.
  assert abs(projected[0] @ grads[1]) < 1e-6
  assert abs(projected[1] @ grads[0]) < 1e-6


def test_non_conflicting_gradients_are_summed():
  grads = np.array([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0], [0.0, 3.0, 1.0]],
                   np.float32)
  np.testing.assert_allclose(_run(grads), grads.sum(0), rtol=1e-6)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_matches_naive_algorithm_with_the_same_orders(k):
  grads = np.random.default_rng(k).normal(size=(k, P)).astype(np.float32)
  seen_orders = set()
  for seed in range(4):
    key = jax.random.key(seed)
    orders = np.asarray(ORDERS(key, k))
    assert all(sorted(row) == list(range(k)) for row in orders)
    np.testing.assert_allclose(_run(grads, rng=key), _naive(grads, orders),
                               rtol=1e-5, atol=1e-5)
    seen_orders.add(orders.tobytes())
  assert len(seen_orders) > 1  # the rng drives the orders


def test_order_matters_and_follows_the_rng():
  # Task 0 conflicts with both others: projecting on g1 or on g2 first gives
  # different results.
  grads = np.array([[1.0, 0.0], [-1.0, 1.0], [-1.0, -2.0]], np.float32)
  seen = set()
  for seed in range(6):
    key = jax.random.key(seed)
    got = _run(grads, rng=key)
    np.testing.assert_allclose(got, _naive(grads, np.asarray(ORDERS(key, 3))),
                               rtol=1e-5, atol=1e-6)
    seen.add(tuple(np.round(got, 4)))
  assert len(seen) > 1


def test_absent_task_is_skipped():
  grads = np.random.default_rng(7).normal(size=(4, P)).astype(np.float32)
  grads[2] = 0.0
  counts = np.array([3.0, 1.0, 0.0, 2.0])
  present = counts > 0
  for seed in range(3):
    key = jax.random.key(seed)
    orders = np.asarray(ORDERS(key, 4))
    # The sub-problem of the present tasks, visited in the same relative order.
    remap = {0: 0, 1: 1, 3: 2}
    sub_orders = [[remap[j] for j in row if j != 2] for row in orders[present]]
    expected = _naive(grads[present], sub_orders)
    np.testing.assert_allclose(_naive(grads, orders, present), expected)
    np.testing.assert_allclose(_run(grads, counts, rng=key), expected,
                               rtol=1e-5, atol=1e-5)
  # With two present tasks the order cannot matter: equal to the 2-task case.
  grads3 = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]], np.float32)
  np.testing.assert_allclose(_run(grads3, counts=[1.0, 0.0, 1.0]), [0.5, 1.5],
                             atol=1e-6)


@pytest.mark.parametrize("scale", [-3.0, 1e-8, 1e8])
def test_scale_equivariant(scale):
  grads = np.random.default_rng(1).normal(size=(4, P)).astype(np.float32)
  np.testing.assert_allclose(_run(scale * grads), scale * _run(grads),
                             rtol=1e-5, atol=1e-5 * abs(scale))


def test_zero_and_single_task():
  np.testing.assert_array_equal(_run(np.zeros((3, 4))), 0.0)
  # A zero gradient among others: no NaN, nothing to project on.
  grads = np.array([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5]], np.float32)
  np.testing.assert_allclose(_run(grads), _naive(grads[[0, 2]], [[1], [0]]),
                             rtol=1e-6)
  np.testing.assert_allclose(_run(np.array([[3.0, -1.0]])), [3.0, -1.0])


def test_raw_and_typed_keys_agree():
  raw, typed = jax.random.PRNGKey(5), jax.random.key(5)
  np.testing.assert_array_equal(ORDERS(raw, 3), ORDERS(typed, 3))


def test_needs_rng():
  with pytest.raises(ValueError, match="rng"):
    AGG.update(jnp.ones((2, 3)), AGG.init(2), counts=jnp.ones(2))
  assert not AGG.rep_grad_ok
