"""GradVac: Gradient Vaccine (Wang et al., ICLR 2021).

"Gradient Vaccine: Investigating and Improving Multi-task Optimization in
Massively Multilingual Models", https://arxiv.org/abs/2010.05874. There is no
official code; this follows the paper's Algorithm 1 (LibMTL's `GradVac` is the
usual reference implementation; differences below).

PCGrad only acts on negative cosines; GradVac keeps a per-pair target
similarity `phi_hat[i, j]` (an EMA of the observed cosine, initialised to 0)
and pulls `g_i'` towards it. For each task i, starting from `g_i' = g_i`, and
each other task j in a random order:

  phi = cos(g_i', g_j)
  if phi < phi_hat[i, j]:
    g_i' += ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
            / (||g_j|| sqrt(1 - phi_hat^2)) g_j
  phi_hat[i, j] <- (1 - beta) phi_hat[i, j] + beta phi

and the direction is the sum of the `g_i'`. The adjustment makes
`cos(g_i', g_j) == phi_hat[i, j]` exactly (for the pre-update target).

As in PCGrad, `g_i' = C[i] @ G` stays in the span of the original gradients and
every quantity is a Gram entry, so the loop runs on `[K, K]` coefficients:
one O(K^2 P) Gram, O(K^3) for the loop, one O(K P) final combination.

Choices and deviations:
* the EMA update is UNCONDITIONAL (paper, Algorithm 1 and Eq. 3: the target
  tracks the observed similarity). LibMTL (and the Aligned-MTL repository's
  copy) update it only inside the `if`, so there the target can only ever
  decrease from 0.
* `phi` is the cosine between the CURRENT, partially adjusted `g_i'` and the
  original `g_j`, both in the test and in the EMA (paper, LibMTL). The EMA
  therefore depends on the random order.
* the target is a single whole-model `phi_hat` per pair (LibMTL's default
  `group_type=0`); the paper's per-layer variant is not implemented.
* no `1e-8` in the denominators (LibMTL): cosines and weights are computed with
  exact guarded divisions, which keeps the method scale-equivariant. A pair
  where either gradient has zero norm (cosine undefined), or an absent task,
  neither adjusts nor moves `phi_hat`; a target of exactly +-1 cannot be
  reached and does not adjust.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.aggregation.base import Aggregator, gram_based, present_mask
from mtl_jax.aggregation.pcgrad import random_task_orders

_HIGHEST = jax.lax.Precision.HIGHEST


class GradVacState(NamedTuple):
  """EMA targets `phi_hat [K, K]`: row i, column j is task i's target cosine
  with task j (the diagonal is unused and stays 0)."""
  phi_hat: jax.Array


def gradvac_coefficients(gram_matrix: jax.Array, present: jax.Array,
                         orders: jax.Array, phi_hat: jax.Array, beta: float
                         ) -> tuple[jax.Array, jax.Array]:
  """GradVac's adjustments on the span of the gradients.

  Args:
    gram_matrix: `[K, K]` Gram matrix `G G^T` of the task gradients.
    present: `bool [K]`, which tasks are present.
    orders: `int [K, T]`: task i visits `orders[i, 0]`, `orders[i, 1]`, ...;
      entries equal to i and absent tasks are skipped.
    phi_hat: `[K, K]` EMA targets before this step.
    beta: the EMA rate.

  Returns:
    `(C [K, K], phi_hat [K, K])`: the adjusted gradients are `g_i' = C[i] @ G`,
    and the updated targets (pairs with an absent task unchanged).
  """
  num_tasks = gram_matrix.shape[0]
  rows = jnp.arange(num_tasks)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_matrix), 0.0))  # [K]

  def adjust(carry, targets):  # targets [K]: the j of each i
    coefs, phi_hat = carry  # [K, K], [K, K]
    # ||g_i'||^2 = C[i] Gram C[i]^T; clamp the rounding below zero.
    norm_i = jnp.sqrt(jnp.maximum(
        jnp.einsum("ik,kl,il->i", coefs, gram_matrix, coefs,
                   precision=_HIGHEST), 0.0))  # [K]
    norm_j = norms[targets]  # [K]
    dots = jnp.sum(coefs * gram_matrix[targets], axis=1)  # [K]: g_i' . g_j
    valid = (present & present[targets] & (targets != rows) &
             (norm_i > 0) & (norm_j > 0))
    denom = jnp.where(valid, norm_i * norm_j, 1.0)
    phi = jnp.clip(jnp.where(valid, dots / denom, 0.0), -1.0, 1.0)
    target = phi_hat[rows, targets]  # [K]
    sin_target = jnp.sqrt(jnp.maximum(1.0 - target**2, 0.0))
    sin_phi = jnp.sqrt(jnp.maximum(1.0 - phi**2, 0.0))
    below = valid & (phi < target) & (sin_target > 0)
    weight = jnp.where(
        below,
        norm_i * (target * sin_phi - phi * sin_target)
        / jnp.where(below, norm_j * sin_target, 1.0),
        0.0)  # [K]
    coefs = coefs + weight[:, None] * jax.nn.one_hot(targets, num_tasks,
                                                     dtype=coefs.dtype)
    # The pairs (i, targets[i]) are distinct, so the scatter has no clashes.
    new_target = jnp.where(valid, (1.0 - beta) * target + beta * phi, target)
    phi_hat = phi_hat.at[rows, targets].set(new_target)
    return (coefs, phi_hat), None

  init = (jnp.eye(num_tasks, dtype=gram_matrix.dtype),
          phi_hat.astype(gram_matrix.dtype))
  (coefs, phi_hat), _ = jax.lax.scan(adjust, init, orders.T)
  return coefs, phi_hat


def gradvac(beta: float = 0.5) -> Aggregator:
  """Gradient Vaccine (Wang et al., 2021).

  Args:
    beta: EMA rate of the target similarities, in [0, 1] (LibMTL's default
      0.5; the paper uses 1e-2 for its large-scale runs).

  Returns:
    A stateful `Aggregator` (`GradVacState`) with `from_gram` and
    `rep_grad_ok=False`. The update needs `rng` (the random visiting orders)
    and raises ValueError (at trace time) without it. With the same orders
    it is equivariant to any scaling of the gradients, negative scales
    included.

  Raises:
    ValueError: beta outside [0, 1].
  """
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"gradvac beta must be in [0, 1], got {beta}")

  def init(num_tasks: int) -> GradVacState:
    return GradVacState(phi_hat=jnp.zeros((num_tasks, num_tasks), jnp.float32))

  def from_gram(gram_matrix, scale, state, *, losses=None, counts=None,
                rng=None):
    del losses
    if rng is None:
      raise ValueError("gradvac needs an rng key (random adjustment orders)")
    num_tasks = gram_matrix.shape[0]
    if state.phi_hat.shape != (num_tasks, num_tasks):
      raise ValueError(f"gradvac state is for {state.phi_hat.shape[0]} tasks, "
                       f"grads for {num_tasks}")
    present = present_mask(counts, num_tasks)  # [K]
    # The plain Gram matrix G G^T, not the scaled one: the result
    # depends on it only up to a positive factor, but where G G^T overflows
    # (|g| >~ 1e19) or underflows no gradient is adjusted. Multiplying by s
    # twice overflows only where G G^T does.
    coefs, phi_hat = gradvac_coefficients(
        gram_matrix * scale * scale, present,
        random_task_orders(rng, num_tasks), state.phi_hat, beta)
    weights = jnp.where(present, coefs.T, 0.0).sum(axis=1)  # [K]
    # Only valid pairs were written; `where` makes "unchanged" exact for pairs
    # with an absent task whatever the dtype round trip does.
    mask2 = present[:, None] & present[None, :]
    phi_hat = jnp.where(mask2, phi_hat.astype(state.phi_hat.dtype),
                        state.phi_hat)
    return weights, GradVacState(phi_hat=phi_hat)

  return gram_based(init, from_gram, rep_grad_ok=False)
