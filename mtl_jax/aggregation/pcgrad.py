"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020).

"Gradient Surgery for Multi-Task Learning", https://arxiv.org/abs/2001.06782;
official code https://github.com/tianheyu927/PCGrad. For each task i, starting
from `g_i' = g_i`, visit the other tasks j in a random order and, whenever
`g_i' . g_j < 0`, remove from `g_i'` its component along the ORIGINAL `g_j`:

  g_i' <- g_i' - (g_i' . g_j) / ||g_j||^2 g_j.

The direction is the SUM of the projected gradients (official code, LibMTL).

Every `g_i'` stays in the span of the original gradients, `g_i' = C[i] @ G`,
and every quantity the algorithm needs is an inner product with an original
gradient, `g_i' . g_j = C[i] @ (G G^T)[:, j]`. So the projections run on the
`[K, K]` coefficient matrix `C` with the Gram matrix: one O(K^2 P) pass for the
Gram, O(K^3) for the K projection rounds, and one O(K P) pass for the final
combination, instead of O(K^2) passes over P.

Deviations from the official code:
* task i is never projected onto itself. The paper's Algorithm 1 draws j from
  the OTHER tasks; the official code (and LibMTL) shuffle all K tasks, which
  differs only when some partially projected `g_i' . g_i < 0` (possible with
  three or more tasks), where they would also remove `g_i'`'s own component.
* each task gets its own random order (paper, LibMTL, the PyTorch port); the
  official TF code shuffles once and shares the order between tasks.
* a target `g_j` with zero norm is skipped (there is nothing to project on;
  the official code would divide 0 by 0).
* absent tasks (count 0) are neither projected nor used as targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.aggregation.base import (Aggregator, present_mask,
                                     stateless_gram_based)


def random_task_orders(rng: jax.Array, num_tasks: int) -> jax.Array:
  """`int32 [K, K]`: row i is an independent random permutation of the tasks.

  Row i is the order in which task i visits the others (it also contains i,
  which the methods skip, so that the shape does not depend on i). Each row is
  the argsort of K random 32-bit keys: one small sort, far cheaper to compile
  than K `jax.random.permutation`s; ties (probability < K^2 / 2^33) are broken
  by position.

  Args:
    rng: a PRNG key (raw `uint32 [2]` or typed).
    num_tasks: K.
  """
  keys = jax.random.bits(rng, (num_tasks, num_tasks), jnp.uint32)
  return jnp.argsort(keys, axis=1).astype(jnp.int32)


def pcgrad_coefficients(gram_matrix: jax.Array, present: jax.Array,
                        orders: jax.Array) -> jax.Array:
  """PCGrad's projections on the span of the gradients.

  Args:
    gram_matrix: `[K, K]` Gram matrix `G G^T` of the task gradients.
    present: `bool [K]`, which tasks are present.
    orders: `int [K, T]`: task i projects onto `orders[i, 0]`, then
      `orders[i, 1]`, ...; entries equal to i and absent tasks are skipped.

  Returns:
    `C [K, K]` with projected gradient `g_i' = C[i] @ G` (rows of absent tasks
    stay the identity's).
  """
  num_tasks = gram_matrix.shape[0]
  rows = jnp.arange(num_tasks)
  sq_norms = jnp.diagonal(gram_matrix)  # [K]

  def project(coefs, targets):  # coefs [K, K], targets [K]: the j of each i
    # g_i' . g_j; the Gram is symmetric, so row j is column j.
    dots = jnp.sum(coefs * gram_matrix[targets], axis=1)  # [K]
    target_sq = sq_norms[targets]  # [K]
    conflict = (present & present[targets] & (targets != rows) &
                (target_sq > 0) & (dots < 0))
    step = jnp.where(conflict, dots / jnp.where(conflict, target_sq, 1.0), 0.0)
    coefs = coefs - step[:, None] * jax.nn.one_hot(targets, num_tasks,
                                                   dtype=coefs.dtype)
    return coefs, None

  coefs, _ = jax.lax.scan(project, jnp.eye(num_tasks, dtype=gram_matrix.dtype),
                          orders.T)
  return coefs


def pcgrad() -> Aggregator:
  """PCGrad (Yu et al., 2020): sum of pairwise-deconflicted gradients.

  The update needs `rng` (the random visiting orders) and raises ValueError
  (at trace time) without it. With the same orders it is equivariant to any
  scaling of the gradients, negative scales included.

  Returns:
    A stateless `Aggregator` with `from_gram` and `rep_grad_ok=False` (the
    projections are defined on parameter gradients; LibMTL refuses
    representation gradients).
  """

  def fn(gram_matrix, scale, *, losses=None, counts=None, rng=None
         ) -> jax.Array:
    del losses
    if rng is None:
      raise ValueError("pcgrad needs an rng key (random projection orders)")
    num_tasks = gram_matrix.shape[0]
    present = present_mask(counts, num_tasks)  # [K]
    # The plain Gram matrix G G^T, not the scaled one: the result
    # depends on it only up to a positive factor, but where G G^T overflows
    # (|g| >~ 1e19) or underflows no projection is made. Multiplying by s
    # twice overflows only where G G^T does.
    coefs = pcgrad_coefficients(gram_matrix * scale * scale, present,
                                random_task_orders(rng, num_tasks))
    return jnp.where(present, coefs.T, 0.0).sum(axis=1)  # [K]

  return stateless_gram_based(fn, rep_grad_ok=False)
