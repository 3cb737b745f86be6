"""Tests of Nash-MTL: the bargaining equation, clipping, the update schedule,
absent tasks and the state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.aggregation.nash_mtl import NashMTLState
from mtl_jax.aggregation.nash_mtl import nash_mtl

P = 16
EXACT = nash_mtl(max_norm=0.0, gram_normalization="none")
OFFICIAL = nash_mtl()  # Frobenius-normalised Gram matrix, max_norm = 1
UNCLIPPED = nash_mtl(max_norm=0.0)
EVERY3 = nash_mtl(update_weights_every=3, max_norm=0.0)
UPDATES = {id(agg): jax.jit(agg.update)
           for agg in (EXACT, OFFICIAL, UNCLIPPED, EVERY3)}


def _run(agg, grads, state=None, counts=None):
  grads = np.asarray(grads, np.float32)
  k = grads.shape[0]
  state = agg.init(k) if state is None else state
  counts = np.ones(k) if counts is None else counts
  direction, state = UPDATES[id(agg)](
      jnp.asarray(grads), state, losses=jnp.ones(k, jnp.float32),
      counts=jnp.asarray(counts, jnp.float32), rng=jax.random.key(0))
  direction = np.asarray(direction, np.float64)
  assert np.all(np.isfinite(direction))
  return direction, state


def _grads(seed, k, p=P):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, p)) * rng.uniform(0.5, 2.0, size=(k, 1))
  return (g + rng.normal() * rng.normal(size=(1, p))).astype(np.float32)


def test_exact_weights_solve_the_bargaining_equation():
  g = _grads(0, 4)
  d, state = _run(EXACT, g)
  alpha = np.asarray(state.alpha, np.float64)
  assert np.all(alpha > 0)
  np.testing.assert_allclose(d, alpha @ g, rtol=1e-6, atol=1e-7)
  # Each task's utility g_k . d is exactly 1 / alpha_k; hence |d|^2 = K.
  np.testing.assert_allclose(alpha * (g @ d), 1.0, atol=1e-5)
  np.testing.assert_allclose(d @ d, 4.0, rtol=1e-5)
  # The exact solution does not depend on the gradients' scale.
  for c in (1e-8, 1e8):
    np.testing.assert_allclose(_run(EXACT, g * c)[0], d, rtol=1e-5,
                               atol=1e-5 * np.abs(d).max())
  perm = np.array([2, 0, 3, 1])
  np.testing.assert_allclose(_run(EXACT, g[perm])[0], d, atol=1e-6)


def test_official_normalisation_and_clipping():
  g = _grads(1, 4)
  d, state = _run(UNCLIPPED, g)
  alpha = np.asarray(state.alpha, np.float64)
  gram = np.float64(g) @ np.float64(g).T
  fro = np.linalg.norm(gram)
  # The weights solve the bargaining equation for G G^T / |G G^T|_F.
  np.testing.assert_allclose(alpha * (gram @ alpha) / fro, 1.0, atol=1e-5)
  np.testing.assert_allclose(d, alpha @ g, rtol=1e-6)
  # The direction is linear in the gradients' scale.
  for c in (1e-8, 1e8):
    np.testing.assert_allclose(_run(UNCLIPPED, g * c)[0] / c, d, rtol=1e-5,
                               atol=1e-5 * np.abs(d).max())
  # max_norm = 1 clips as torch's clip_grad_norm_: d / (|d| + 1e-6).
  norm = np.linalg.norm(d)
  assert norm > 1
  clipped, _ = _run(OFFICIAL, g)
  np.testing.assert_allclose(clipped, d / (norm + 1e-6), rtol=1e-5)
  small, _ = _run(OFFICIAL, g * 1e-3)
  np.testing.assert_allclose(small, d * 1e-3, rtol=1e-5)


def test_single_task():
  # One present task among absent ones (the native K = 1 layout is tested
  # in solvers_test). Exact: alpha = 1 / |g|, d = g / |g|;
  # Frobenius-normalised: alpha = 1, d = g.
  g = np.zeros((4, P), np.float32)
  g[2] = _grads(2, 1)[0]
  counts = [0, 0, 3, 0]
  np.testing.assert_allclose(_run(EXACT, g, counts=counts)[0],
                             g[2] / np.linalg.norm(g[2]), rtol=1e-6)
  np.testing.assert_allclose(_run(UNCLIPPED, g, counts=counts)[0], g[2],
                             rtol=1e-6)


def test_weights_recomputed_every_three_steps():
  state = EVERY3.init(3)
  np.testing.assert_array_equal(state.alpha, [1.0, 1.0, 1.0])
  alphas = []
  for step in range(5):
    g = _grads(10 + step, 3)
    d, new_state = _run(EVERY3, g, state)
    assert int(new_state.step) == step + 1
    if step % 3:
      # Stored weights reused on the new gradients.
      np.testing.assert_array_equal(new_state.alpha, state.alpha)
      np.testing.assert_allclose(d, np.asarray(state.alpha) @ g, rtol=1e-6)
    else:
      # Recomputed: the same as a fresh solve.
      fresh, fresh_state = _run(UNCLIPPED, g)
      np.testing.assert_allclose(new_state.alpha, fresh_state.alpha,
                                 rtol=1e-6)
      np.testing.assert_allclose(d, fresh, rtol=1e-6)
    alphas.append(np.asarray(new_state.alpha))
    state = new_state
  assert not np.allclose(alphas[0], alphas[3])


def test_absent_and_zero_gradient_tasks_keep_their_weight():
  g = _grads(3, 4)
  sub_d, sub_state = _run(UNCLIPPED, g[[0, 2, 3]])
  state = NashMTLState(alpha=jnp.array([1.0, 7.0, 1.0, 1.0]),
                       step=jnp.zeros((), jnp.int32))
  absent = g.copy()
  absent[1] = 0.0
  d, new_state = _run(UNCLIPPED, absent, state, counts=[2, 0, 1, 4])
  np.testing.assert_allclose(d, sub_d, rtol=1e-6, atol=1e-7)
  assert float(new_state.alpha[1]) == 7.0
  np.testing.assert_allclose(np.asarray(new_state.alpha)[[0, 2, 3]],
                             sub_state.alpha, rtol=1e-6)
  # A present task with an exactly zero gradient has no bargaining solution:
  # it is left out and keeps its weight too.
  d, new_state = _run(UNCLIPPED, absent, state)
  np.testing.assert_allclose(d, sub_d, rtol=1e-6, atol=1e-7)
  assert float(new_state.alpha[1]) == 7.0
  # All gradients zero: direction 0, weights unchanged, no NaN.
  d, new_state = _run(UNCLIPPED, np.zeros((4, P)), state)
  np.testing.assert_array_equal(d, 0.0)
  np.testing.assert_array_equal(new_state.alpha, state.alpha)


def test_errors():
  assert not OFFICIAL.rep_grad_ok
  with pytest.raises(ValueError, match="update_weights_every must be an "
                     "integer >= 1"):
    nash_mtl(update_weights_every=0)
  with pytest.raises(ValueError, match="max_norm must be finite and >= 0"):
    nash_mtl(max_norm=-1.0)
  with pytest.raises(ValueError, match="unknown gram_normalization 'l2'; "
                     "valid: frobenius, none"):
    nash_mtl(gram_normalization="l2")
