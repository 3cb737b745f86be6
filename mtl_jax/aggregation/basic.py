"""The plain baselines: the mean and the sum of the present tasks' gradients.

Both are linear in the gradients, cost one pass over `[K, P]`, and are
valid on representation gradients (the chain rule through the trunk is
linear, so aggregating there gives the same parameter update). Their weights
depend on the counts only, so `from_gram` ignores the Gram matrix.
"""

from __future__ import annotations

import jax.numpy as jnp

from mtl_jax.aggregation.base import Aggregator, scale_invariant


def mean() -> Aggregator:
  """The mean of the present tasks' gradients.

  Divides by the number of PRESENT tasks (tasks with `counts > 0`), so an
  absent task does not shrink the step; with no task present the direction
  is zero.

  Returns:
    A stateless `Aggregator` with `rep_grad_ok=True` and `from_gram`
    (weights `1 / n` on the n present tasks, 0 on absent ones).
  """

  def weights(gram_matrix, present):  # [K]
    del gram_matrix
    return present.astype(jnp.float32) / jnp.maximum(present.sum(), 1)

  return scale_invariant(weights, rep_grad_ok=True)


def sum() -> Aggregator:  # pylint: disable=redefined-builtin
  """The sum of the present tasks' gradients (plain linear scalarization).

  Returns:
    A stateless `Aggregator` with `rep_grad_ok=True` and `from_gram`
    (weights 1 on present tasks, 0 on absent ones).
  """

  return scale_invariant(lambda _, present: present.astype(jnp.float32),
                         rep_grad_ok=True)
