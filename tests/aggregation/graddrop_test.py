"""Tests of GradDrop with hand-computed draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Names, not modules: the package re-exports `graddrop` the function, which
# shadows the submodule attribute.
from mtl_jax.aggregation.graddrop import graddrop
from mtl_jax.aggregation.graddrop import hash_uniforms
from mtl_jax.aggregation.graddrop import sign_dropout

SIGN_DROPOUT = jax.jit(sign_dropout)
AGG = graddrop()
UPDATE = jax.jit(AGG.update)

# Columns: both positive; mixed with more negative mass (P = 1/3); mixed with
# more positive mass (P = 3/4); all zero.
G = np.array([[1.0, -2.0, 3.0, 0.0],
              [2.0, 1.0, -1.0, 0.0]], np.float32)
ALL = np.ones(2, bool)


def _drop(grads, uniforms, leak=0.0, present=ALL):
  return np.asarray(SIGN_DROPOUT(jnp.asarray(grads), jnp.asarray(present),
                                 jnp.asarray(uniforms, jnp.float32),
                                 jnp.asarray(leak, jnp.float32)))


def _run(agg_update, grads, counts, key):
  k = grads.shape[0]
  direction, _ = agg_update(jnp.asarray(grads, jnp.float32), AGG.init(k),
                            losses=jnp.ones(k, jnp.float32),
                            counts=jnp.asarray(counts, jnp.float32), rng=key)
  return np.asarray(direction)


def test_draws_by_hand():
  # U below P keeps the positive parts, above P the negative ones; agreeing
  # columns are kept whatever U, a zero column stays 0.
  np.testing.assert_allclose(_drop(G, [0.99, 0.2, 0.5, 0.3]), [3, 1, 3, 0])
  np.testing.assert_allclose(_drop(G, [0.0, 0.9, 0.8, 0.3]), [3, -2, -1, 0])


def test_leak():
  u = [0.5, 0.2, 0.5, 0.3]
  # leak 0.5: a dropped value still passes half of itself.
  np.testing.assert_allclose(_drop(G, u, 0.5), [3.0, 1.0 - 1.0, 3.0 - 0.5, 0])
  # leak 1: the plain sum; per-task leaks: task 0 bypasses, task 1 does not.
  np.testing.assert_allclose(_drop(G, u, 1.0), G.sum(0))
  np.testing.assert_allclose(_drop(G, u, [1.0, 0.0]), [3.0, -2.0 + 1.0, 3.0, 0])
  np.testing.assert_allclose(_drop(G, u, [0.0, 1.0]), [3.0, 1.0, 3.0 - 1.0, 0])


def test_update_uses_one_uniform_per_coordinate_from_rng():
  key = jax.random.key(7)
  uniforms = hash_uniforms(key, (G.shape[1],))
  np.testing.assert_allclose(_run(UPDATE, G, [1.0, 1.0], key),
                             _drop(G, uniforms))
  # Over many keys the mixed columns take both outcomes, the others do not.
  outcomes = {tuple(_run(UPDATE, G, [1.0, 1.0], jax.random.key(s)))
              for s in range(40)}
  assert {o[1] for o in outcomes} == {1.0, -2.0}
  assert {o[2] for o in outcomes} == {3.0, -1.0}
  assert {o[0] for o in outcomes} == {3.0} and {o[3] for o in outcomes} == {0.0}


def test_a_block_of_columns_gets_the_draws_of_the_whole_leaf():
  """Draws depend on the coordinate's index only: a block at offset o (a
  Python int or a traced one) gets the leaf's draws o, o + 1, ..., and the
  update of a block of columns is that block of the leaf's update."""
  key = jax.random.key(3)
  whole = np.asarray(hash_uniforms(key, (40,)))
  np.testing.assert_array_equal(hash_uniforms(key, (3, 4), 17),
                                whole[17:29].reshape(3, 4))
  traced = jax.jit(lambda o: hash_uniforms(key, (6,), o))
  np.testing.assert_array_equal(traced(jnp.int32(30)), whole[30:36])
  grads = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32)
  counts = jnp.ones(3, jnp.float32)
  full = _run(UPDATE, grads, counts, key)
  block, _ = UPDATE(jnp.asarray(grads[:, 25:33]), AGG.init(3),
                    losses=jnp.ones(3), counts=counts, rng=key,
                    column_offset=jnp.int32(25))
  np.testing.assert_array_equal(block, full[25:33])
  # Mixed signs in the block: a wrong offset would draw other coin flips.
  shifted, _ = UPDATE(jnp.asarray(grads[:, 25:33]), AGG.init(3),
                      losses=jnp.ones(3), counts=counts, rng=key,
                      column_offset=24)
  assert np.any(np.asarray(shifted) != full[25:33])


def test_hash_uniforms_are_uniform_and_independent():
  """2^18 draws: bin counts pass a chi-square test, moments match U[0, 1),
  and neighbouring coordinates, other keys and other shapes are
  uncorrelated. Deterministic for a key."""
  n = 2 ** 18
  u = np.asarray(hash_uniforms(jax.random.key(0), (n,)), np.float64)
  assert u.min() >= 0.0 and u.max() < 1.0
  assert np.all(u * 2 ** 24 == np.floor(u * 2 ** 24))  # a 2^-24 grid
  counts = np.bincount((u * 256).astype(int), minlength=256)
  chi2 = np.sum((counts - n / 256) ** 2 / (n / 256))
  assert chi2 < 255 + 6 * np.sqrt(2 * 255)  # mean 255, sd 22.6: 6 sd
  assert abs(u.mean() - 0.5) < 6 * np.sqrt(1 / 12 / n)
  assert abs(u.var() - 1 / 12) < 0.002
  tol = 6 / np.sqrt(n)  # 6 sd of a correlation of independent draws
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < tol
  assert abs(np.corrcoef(u[::2], u[1::2])[0, 1]) < tol * np.sqrt(2)
  other = np.asarray(hash_uniforms(jax.random.key(1), (n,)), np.float64)
  assert abs(np.corrcoef(u, other)[0, 1]) < tol
  np.testing.assert_array_equal(
      np.asarray(hash_uniforms(jax.random.key(0), (n,))), u.astype(np.float32))
  np.testing.assert_array_equal(
      np.asarray(hash_uniforms(jax.random.key(0), (4, 8))).ravel(),
      u[:32].astype(np.float32))


def test_absent_task_equals_submatrix():
  grads = np.concatenate([G, np.zeros((1, 4), np.float32)])[[0, 2, 1]]
  for seed in range(5):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(_run(UPDATE, grads, [1.0, 0.0, 4.0], key),
                                  _run(UPDATE, G, [1.0, 4.0], key))


@pytest.mark.parametrize("scale", [3.0, 1e-8, 1e8])
def test_positive_scale_equivariant(scale):
  # (A negative scale maps P to 1 - P: equivariant only in distribution.)
  grads = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
  key = jax.random.key(1)
  np.testing.assert_allclose(_run(UPDATE, scale * grads, [1.0, 1.0], key),
                             scale * _run(UPDATE, grads, [1.0, 1.0], key),
                             rtol=1e-5)


def test_zero_and_single_task():
  key = jax.random.key(0)
  np.testing.assert_array_equal(
      _run(UPDATE, np.zeros((2, 4)), [1.0, 1.0], key), 0)
  # One task: its purity is 1 or 0 where nonzero, so everything is kept.
  g = np.array([[1.0, -2.0, 0.5, 0.0]], np.float32)
  np.testing.assert_allclose(_run(UPDATE, g, [1.0], key), g[0])


def test_errors_and_flags():
  with pytest.raises(ValueError, match="leak must be in"):
    graddrop(leak=1.5)
  with pytest.raises(ValueError, match="2 leaks for 3 tasks"):
    graddrop(leak=[0.1, 0.2]).init(3)
  with pytest.raises(ValueError, match="rng"):
    AGG.update(jnp.ones((2, 3)), AGG.init(2), counts=jnp.ones(2))
  assert AGG.rep_grad_ok
