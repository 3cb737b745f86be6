"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020).

"Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
Dropout", https://arxiv.org/abs/2010.06808 (reference implementation: LibMTL's
`GradDrop`). Per coordinate, the gradient positive sign purity

  P = 0.5 (1 + sum_i g_i / sum_i |g_i|)      # in [0, 1]

is the probability of keeping the positive parts: with one uniform draw U per
coordinate, task i keeps its value if (P > U and g_i > 0) or (P < U and
g_i < 0), and the direction is

  sum_i (leak_i + (1 - leak_i) M_i) g_i.

So coordinates where all tasks agree are always kept, and conflicting ones keep
one sign, chosen with probability proportional to its mass. Costs a few fused
elementwise passes over `[K, P]` (no Gram matrix).

Deviations:
* the paper applies GradDrop to activation gradients and first sums over the
  batch, weighting each example by the sign of the layer's input. The
  aggregator sees a `[K, P]` matrix, so every column is its own coordinate:
  with `rep_grad=True` that is one (example, feature) entry of the
  representation, i.e. the purity is per example, without the input-sign
  batch reduction; on parameter gradients it is per parameter.
* where every task's gradient is 0, `P = 0.5` (LibMTL adds 1e-7 to the
  denominator instead, which is not scale-invariant).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.aggregation.base import Aggregator, present_mask, stateless

_HIGHEST = jax.lax.Precision.HIGHEST


def sign_dropout(grads: jax.Array, present: jax.Array, uniforms: jax.Array,
                 leak: jax.Array | float) -> jax.Array:
  """GradDrop's direction for given uniform draws.

  Args:
    grads: `[K, P]` per-task gradients.
    present: `bool [K]`, which tasks are present (absent rows are ignored).
    uniforms: `[P]` draws from U[0, 1).
    leak: scalar or `[K]`: the fraction of each task's gradient that passes
      whatever the mask.

  Returns:
    The direction `[P]`.
  """
  # The sums over tasks are matrix-vector products with the presence mask:
  # they skip absent rows (zero, hence finite, by contract) and run as one
  # BLAS pass, where XLA's CPU reduction over the leading axis is >10x slower.
  weights = present.astype(grads.dtype)  # [K]
  total = jnp.matmul(weights, grads, precision=_HIGHEST)  # [P]
  mass = jnp.matmul(weights, jnp.abs(grads), precision=_HIGHEST)  # [P]
  ratio = jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1.0), 0.0)
  purity = 0.5 * (1.0 + ratio)  # [P]
  keep = (((purity > uniforms)[None, :] & (grads > 0)) |
          ((purity < uniforms)[None, :] & (grads < 0)))  # [K, P]
  leak = jnp.broadcast_to(jnp.asarray(leak, grads.dtype), (grads.shape[0],))
  scale = leak[:, None] + (1.0 - leak[:, None]) * keep.astype(grads.dtype)
  return jnp.matmul(weights, grads * scale, precision=_HIGHEST)


def graddrop(leak: float | Sequence[float] = 0.0) -> Aggregator:
  """GradDrop (Chen et al., 2020).

  Args:
    leak: in [0, 1], one value or one per task: the part of each task's
      gradient that bypasses the sign dropout (0: pure GradDrop; 1: the sum).

  Returns:
    A stateless `Aggregator` with `rep_grad_ok=True` (the paper applies it to
    activation gradients). The update draws one uniform per coordinate from
    `rng` (required; ValueError at trace time without it). The direction is
    equivariant to positive scalings of the gradients for the same draws; a
    negative scaling maps P to 1 - P, so it is equivariant only in
    distribution.

  Raises:
    ValueError: a leak outside [0, 1], or (in `init`, and at trace time) a
      per-task leak of the wrong length.
  """
  leaks = np.asarray(leak, dtype=np.float32)
  if leaks.ndim > 1 or not np.all((leaks >= 0) & (leaks <= 1)):
    raise ValueError(f"graddrop leak must be in [0, 1] (one value or one per "
                     f"task), got {leak}")

  def check_tasks(num_tasks: int) -> None:
    if leaks.ndim == 1 and leaks.shape[0] != num_tasks:
      raise ValueError(f"graddrop has {leaks.shape[0]} leaks for {num_tasks} "
                       "tasks")

  def fn(grads, *, losses=None, counts=None, rng=None):
    del losses
    if rng is None:
      raise ValueError("graddrop needs an rng key (sign dropout draws)")
    num_tasks = grads.shape[0]
    check_tasks(num_tasks)
    uniforms = jax.random.uniform(rng, grads.shape[1:], grads.dtype)  # [P]
    return sign_dropout(grads, present_mask(counts, num_tasks), uniforms, leaks)

  aggregator = stateless(fn, rep_grad_ok=True)
  stateless_init = aggregator.init

  def init(num_tasks: int):
    check_tasks(num_tasks)
    return stateless_init(num_tasks)

  return aggregator._replace(init=init)
