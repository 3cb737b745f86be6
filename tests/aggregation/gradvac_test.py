"""Tests of GradVac against a float64 re-implementation of Algorithm 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Names, not modules: the package re-exports the factories, which shadow the
# submodule attributes.
from mtl_jax.aggregation.gradvac import GradVacState
from mtl_jax.aggregation.gradvac import gradvac
from mtl_jax.aggregation.pcgrad import pcgrad
from mtl_jax.aggregation.pcgrad import random_task_orders

from agg_testing import run_padded

BETA = 0.5
AGG = gradvac(beta=BETA)
UPDATE = jax.jit(AGG.update)
ORDERS = jax.jit(random_task_orders, static_argnums=1)
P = 8  # inputs are zero-padded to P columns: one compilation per K


def _run(grads, phi_hat=None, counts=None, rng=jax.random.key(0)):
  state = AGG.init(len(grads))
  if phi_hat is not None:
    state = GradVacState(jnp.asarray(phi_hat, jnp.float32))
  direction, state = run_padded(UPDATE, state, grads, width=P, counts=counts,
                                rng=rng)
  return direction, np.asarray(state.phi_hat)


def _reference(grads, phi_hat, orders, present=None, beta=BETA):
  """Algorithm 1 of the paper in float64 (EMA after the test, every pair)."""
  grads = np.asarray(grads, np.float64)
  k = grads.shape[0]
  present = np.ones(k, bool) if present is None else np.asarray(present)
  phi_hat = np.array(phi_hat, np.float64)
  adjusted = grads.copy()
  for i in range(k):
    if not present[i]:
      continue
    for j in orders[i]:
      if j == i or not present[j]:
        continue
      norm_i, norm_j = np.linalg.norm(adjusted[i]), np.linalg.norm(grads[j])
      phi = adjusted[i] @ grads[j] / (norm_i * norm_j)
      target = phi_hat[i, j]
      if phi < target:
        adjusted[i] += (norm_i * (target * np.sqrt(1 - phi**2) -
                                  phi * np.sqrt(1 - target**2)) /
                        (norm_j * np.sqrt(1 - target**2))) * grads[j]
      phi_hat[i, j] = (1 - beta) * target + beta * phi
  return adjusted[present].sum(axis=0), phi_hat


def _cos(a, b):
  return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_two_tasks_by_hand():
  g1, g2 = np.array([1.0, 0.0]), np.array([1.0, 1.0])  # cos = 1/sqrt(2)
  grads = np.stack([g1, g2])
  # Step 1: targets are 0 and the cosine is positive: no adjustment, the
  # targets move to beta * cos.
  direction, phi_hat = _run(grads)
  np.testing.assert_allclose(direction, g1 + g2, rtol=1e-6)
  c = 1 / np.sqrt(2)
  np.testing.assert_allclose(phi_hat, [[0, BETA * c], [BETA * c, 0]], rtol=1e-6)
  # Step 2 with a target of 0.9 > cos: each g_i' is rotated to cos 0.9 with
  # the other task's original gradient, and the targets move half-way to cos.
  target = np.array([[0.0, 0.9], [0.9, 0.0]])
  direction, phi_hat = _run(grads, phi_hat=target)
  s = np.sqrt(1 - 0.81)
  w1 = 1.0 * (0.9 * c - c * s) / (np.sqrt(2) * s)  # ||g1|| = 1, ||g2|| = sqrt2
  w2 = np.sqrt(2) * (0.9 * c - c * s) / (1.0 * s)
  g1p, g2p = g1 + w1 * g2, g2 + w2 * g1
  assert abs(_cos(g1p, g2) - 0.9) < 1e-12 and abs(_cos(g2p, g1) - 0.9) < 1e-12
  np.testing.assert_allclose(direction, g1p + g2p, rtol=1e-5)
  np.testing.assert_allclose(phi_hat, [[0, 0.45 + c / 2], [0.45 + c / 2, 0]],
                             rtol=1e-6)


@pytest.mark.parametrize("k", [3, 4])
def test_two_steps_match_reference(k):
  rng = np.random.default_rng(k)
  base_dir = rng.normal(size=P)
  # Mostly aligned gradients: positive targets after step 1, so step 2
  # exercises the adjustment with nonzero targets.
  grads1 = (base_dir + 0.8 * rng.normal(size=(k, P))).astype(np.float32)
  grads2 = rng.normal(size=(k, P)).astype(np.float32)
  keys = [jax.random.key(10), jax.random.key(11)]
  phi_ref = np.zeros((k, k))
  phi = None
  adjusted_any = False
  for grads, key in zip([grads1, grads2], keys):
    orders = np.asarray(ORDERS(key, k))
    expected, phi_ref_new = _reference(grads, phi_ref, orders)
    adjusted_any |= not np.allclose(expected, grads.sum(0))
    direction, phi = _run(grads, phi_hat=phi, rng=key)
    np.testing.assert_allclose(direction, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(phi, phi_ref_new, atol=1e-6)
    phi_ref = phi_ref_new
  assert adjusted_any
  assert np.all(np.diag(phi) == 0)


@pytest.mark.parametrize("k", [3, 4])
def test_first_step_is_pcgrad(k):
  # With targets 0, the adjustment is exactly PCGrad's projection.
  grads = np.random.default_rng(5).normal(size=(k, P)).astype(np.float32)
  pc = pcgrad()
  key = jax.random.key(3)
  expected, _ = jax.jit(pc.update)(jnp.asarray(grads), pc.init(k),
                                   counts=jnp.ones(k, jnp.float32), rng=key)
  np.testing.assert_allclose(_run(grads, rng=key)[0], expected, rtol=1e-5,
                             atol=1e-6)


def test_absent_task_leaves_its_pairs_unchanged():
  k = 4
  rng = np.random.default_rng(9)
  grads = rng.normal(size=(k, P)).astype(np.float32)
  grads[1] = 0.0
  counts = np.array([2.0, 0.0, 1.0, 5.0])
  present = counts > 0
  phi0 = rng.uniform(-0.5, 0.5, size=(k, k)).astype(np.float32)
  np.fill_diagonal(phi0, 0.0)
  key = jax.random.key(4)
  direction, phi = _run(grads, phi_hat=phi0, counts=counts, rng=key)
  np.testing.assert_array_equal(phi[1, :], phi0[1, :])
  np.testing.assert_array_equal(phi[:, 1], phi0[:, 1])
  orders = np.asarray(ORDERS(key, k))
  expected, phi_ref = _reference(grads, phi0, orders, present)
  # The reference on the sub-matrix, same relative orders, same targets.
  idx = np.flatnonzero(present)
  remap = {int(j): n for n, j in enumerate(idx)}
  sub_orders = [[remap[j] for j in row if present[j]] for row in orders[idx]]
  sub_expected, sub_phi = _reference(grads[idx], phi0[np.ix_(idx, idx)],
                                     sub_orders)
  np.testing.assert_allclose(expected, sub_expected)
  np.testing.assert_allclose(phi_ref[np.ix_(idx, idx)], sub_phi)
  np.testing.assert_allclose(direction, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(phi, phi_ref, atol=1e-6)


@pytest.mark.parametrize("scale", [-2.0, 1e-8, 1e8])
def test_scale_equivariant(scale):
  grads = np.random.default_rng(2).normal(size=(3, P)).astype(np.float32)
  phi0 = np.full((3, 3), 0.3, np.float32)
  d, phi = _run(grads, phi_hat=phi0)
  d_scaled, phi_scaled = _run(scale * grads, phi_hat=phi0)
  np.testing.assert_allclose(d_scaled, scale * d, rtol=1e-5,
                             atol=1e-5 * abs(scale))
  np.testing.assert_allclose(phi_scaled, phi, atol=1e-6)


def test_zero_and_single_task():
  direction, phi = _run(np.zeros((3, 5)), phi_hat=np.full((3, 3), 0.5))
  np.testing.assert_array_equal(direction, 0.0)
  np.testing.assert_array_equal(phi, 0.5)  # undefined cosines move nothing
  direction, phi = _run(np.array([[2.0, -1.0]]))
  np.testing.assert_allclose(direction, [2.0, -1.0])
  np.testing.assert_array_equal(phi, 0.0)


def test_errors_and_flags():
  with pytest.raises(ValueError, match="beta must be in"):
    gradvac(beta=1.5)
  with pytest.raises(ValueError, match="rng"):
    AGG.update(jnp.ones((2, 3)), AGG.init(2), counts=jnp.ones(2))
  with pytest.raises(ValueError, match="state is for 3 tasks"):
    AGG.update(jnp.ones((2, 3)), AGG.init(3), rng=jax.random.key(0))
  assert not AGG.rep_grad_ok
