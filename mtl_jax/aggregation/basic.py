"""The plain baselines: the mean and the sum of the present tasks' gradients.

Both are linear in the gradients, cost one pass over `[K, P]`, and are
valid on representation gradients (the chain rule through the trunk is
linear, so aggregating there gives the same parameter update).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.aggregation.base import Aggregator, present_mask, stateless


def _present_weights(counts: jax.Array | None, num_tasks: int,
                     dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """`(presence as weights [K], number of present tasks [])`."""
  present = present_mask(counts, num_tasks)  # [K]
  return present.astype(dtype), present.sum()


def _combine(weights: jax.Array, grads: jax.Array) -> jax.Array:
  # A matrix-vector product rather than `sum(axis=0)`: one BLAS pass, where
  # XLA's CPU reduction over the leading axis is >10x slower. Absent rows
  # get weight 0 (they are zero, hence finite, by contract).
  return jnp.matmul(weights, grads, precision=jax.lax.Precision.HIGHEST)


def mean() -> Aggregator:
  """The mean of the present tasks' gradients.

  Divides by the number of PRESENT tasks (tasks with `counts > 0`), so an
  absent task does not shrink the step; with no task present the direction
  is zero.

  Returns:
    A stateless `Aggregator` with `rep_grad_ok=True`.
  """

  def fn(grads, *, losses=None, counts=None, rng=None):
    del losses, rng
    weights, num_present = _present_weights(counts, grads.shape[0], grads.dtype)
    return _combine(weights / jnp.maximum(num_present, 1).astype(grads.dtype),
                    grads)

  return stateless(fn, rep_grad_ok=True)


def sum() -> Aggregator:  # pylint: disable=redefined-builtin
  """The sum of the present tasks' gradients (plain linear scalarization).

  Returns:
    A stateless `Aggregator` with `rep_grad_ok=True`.
  """

  def fn(grads, *, losses=None, counts=None, rng=None):
    del losses, rng
    weights, _ = _present_weights(counts, grads.shape[0], grads.dtype)
    return _combine(weights, grads)

  return stateless(fn, rep_grad_ok=True)
