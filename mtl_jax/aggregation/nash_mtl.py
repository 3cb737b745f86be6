"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022).

The update is `d = sum_k alpha_k g_k` with the Nash bargaining weights
`alpha > 0` solving `alpha_k (G G^T alpha)_k = 1` for every task k (each
task's utility `log(g_k . d)` is balanced against its weight), computed by
`solvers.nash_bargaining` to rounding precision (in the cosine basis, so
gradient norms spread over many orders of magnitude cost no accuracy). The official code
(github.com/AvivNavon/nash-mtl, `methods/weight_methods.py`) instead runs at
most 20 convex-concave iterations of cvxpy/ECOS from the previous weights and
stops once `|G^T G alpha - 1/alpha| < 1e-3`; the fixed point is the same.

As in the official code:

* `gram_normalization="frobenius"` (default): the Gram matrix is divided by
  its Frobenius norm before solving, and the resulting weights are used as
  they are. With `n = |G G^T|_F` they are `sqrt(n)` times the exact
  bargaining weights, so `|d| = sqrt(K n)` follows the gradients' scale
  (the direction is linear in G). `"none"` uses the exact weights of the
  paper's equation, for which `|d|^2 = sum_k alpha_k g_k . d = K` whatever
  the gradients' scale.
* The weights are recomputed only on steps where
  `step % update_weights_every == 0` (counting from 0); other steps reuse
  the stored weights.
* `max_norm > 0` clips the direction to that Euclidean norm, as the official
  `backward` does with `torch.nn.utils.clip_grad_norm_(shared_parameters,
  max_norm)` after `loss.backward()` (same formula: scale by
  `min(1, max_norm / (|d| + 1e-6))`; here `|d|` comes from the Gram matrix,
  `|d|^2 = w^T G G^T w` for the weights w of d, plus a bound on its float32
  rounding, see `_direction_norm_bound`). It acts on the aggregated direction
  of the shared parameters only; task-specific parameters are not clipped.

Absent tasks (count 0) get weight 0 in the direction and keep their stored
weight. A present task whose gradient is exactly zero has no bargaining
solution (its utility is `log 0`); it is left out of the bargaining problem
and keeps its stored weight (the official cvxpy solve fails in that case and
also keeps the previous weights); its zero row contributes nothing to d.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.aggregation import base
from mtl_jax.aggregation import solvers

GRAM_NORMALIZATIONS = ("frobenius", "none")
_HIGHEST = jax.lax.Precision.HIGHEST


class NashMTLState(NamedTuple):
  """Nash-MTL state.

  Attributes:
    alpha: `[K]` float32, the last bargaining weights (ones before the first
      solve, as in the official code).
    step: int32 scalar, the number of updates so far.
  """

  alpha: jax.Array
  step: jax.Array


def _frobenius(m: jax.Array) -> jax.Array:
  """`|m|_F`, computed on `m / max|m|` so that it neither under- nor
  overflows in float32 for gradients of any scale."""
  top = jnp.max(jnp.abs(m))
  safe = jnp.where(top > 0, top, 1.0)
  return safe * jnp.sqrt(jnp.sum(jnp.square(m / safe)))


def _direction_norm_bound(weights: jax.Array, gram_matrix: jax.Array,
                          scale: jax.Array) -> jax.Array:
  """Upper bound on the norm of `weights @ G` after rounding, from the Gram matrix.

  `M = gram_matrix` is the Gram matrix of `G / scale`, so `|d|^2 = scale^2
  w^T M w`. When d is short next to `t = sum_k |w_k| |g_k| / scale`
  (conflicting gradients with large weights, e.g. `g_2 = -g_1`, where no
  bargaining solution exists), `w^T M w` loses its accuracy to cancellation
  and the computed `w @ G` is mostly rounding noise, up to ~K eps t. Their
  rounding bounds, `K eps t^2` and `K eps t`, are added, so that such a
  direction is clipped too (its exact norm may be 0). On well-conditioned
  weights this changes the norm by ~K^2 eps relative; a short d (`|d| / t`
  below ~sqrt(K eps)) is clipped more than its own norm would ask. w is
  divided by a power of two first so that nothing overflows (which would clip
  the direction to 0) or underflows.

  Args:
    weights: `[K]` weights of the direction.
    gram_matrix: `[K, K]` Gram matrix of `G / scale`.
    scale: the power of two `scale`.

  Returns:
    A scalar, at least `|d|` up to rounding.
  """
  wscale = base.power_of_two_scale(weights)
  wn = weights / wscale  # [K]
  sq_norm = jnp.dot(wn, jnp.matmul(gram_matrix, wn, precision=_HIGHEST),
                    precision=_HIGHEST)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_matrix), 0.0))  # [K]
  t = jnp.dot(jnp.abs(wn), norms, precision=_HIGHEST)
  tol = weights.shape[0] * jnp.finfo(gram_matrix.dtype).eps
  norm = jnp.sqrt(jnp.maximum(sq_norm, 0.0) + tol * t * t) + tol * t
  return wscale * norm * scale


def nash_mtl(update_weights_every: int = 1, max_norm: float = 1.0,
             gram_normalization: str = "frobenius") -> base.Aggregator:
  """Nash-MTL (Navon et al., 2022) as an Aggregator.

  Args:
    update_weights_every: recompute the weights every this many steps
      (official default 1).
    max_norm: clip the direction to this norm; 0 disables clipping
      (official default 1.0).
    gram_normalization: "frobenius" (official code) or "none" (exact
      weights of the paper's equation), see the module docstring.

  Returns:
    An Aggregator with state `NashMTLState` (`rep_grad_ok=False`) and
    `from_gram` (the clipping included in its weights).

  Raises:
    ValueError: `update_weights_every < 1`, a negative or non-finite
      `max_norm`, or an unknown `gram_normalization`.
  """
  if int(update_weights_every) != update_weights_every or (
      update_weights_every < 1):
    raise ValueError(f"nash_mtl: update_weights_every must be an integer "
                     f">= 1, got {update_weights_every!r}")
  max_norm = float(max_norm)
  if not 0.0 <= max_norm < float("inf"):
    raise ValueError(f"nash_mtl: max_norm must be finite and >= 0 (0 = no "
                     f"clipping), got {max_norm}")
  if gram_normalization not in GRAM_NORMALIZATIONS:
    raise ValueError(f"nash_mtl: unknown gram_normalization "
                     f"{gram_normalization!r}; valid: "
                     f"{', '.join(GRAM_NORMALIZATIONS)}")
  every = int(update_weights_every)

  def init(num_tasks: int) -> NashMTLState:
    return NashMTLState(alpha=jnp.ones((num_tasks,), jnp.float32),
                        step=jnp.zeros((), jnp.int32))

  def solve(gram_matrix, scale, present, old_alpha):
    # `gram_matrix` is the Gram matrix of G / s (s an exact power of two, so
    # that it stays in float32 range); the exact weights scale as 1 / s.
    active = present & (jnp.diagonal(gram_matrix) > 0)  # [K]
    m = jnp.where(active[:, None] & active[None, :], gram_matrix, 0.0)
    if gram_normalization == "frobenius":
      fro = _frobenius(m)
      m = m / jnp.where(fro > 0, fro, 1.0)
    alpha = solvers.nash_bargaining(m, active)
    if gram_normalization != "frobenius":
      alpha = alpha / scale
    # The state keeps its float32 weights whatever the gradients' dtype.
    return jnp.where(active, alpha.astype(old_alpha.dtype), old_alpha)

  def from_gram(gram_matrix, scale, state, *, losses=None, counts=None,
                rng=None):
    del losses, rng
    present = base.present_mask(counts, gram_matrix.shape[0])  # [K]
    recompute = state.step % every == 0
    alpha = jax.lax.cond(
        recompute, lambda: solve(gram_matrix, scale, present, state.alpha),
        lambda: state.alpha)  # [K]
    weights = jnp.where(present, alpha, 0.0).astype(gram_matrix.dtype)
    if max_norm > 0:
      norm = _direction_norm_bound(weights, gram_matrix, scale)
      weights = weights * jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return weights, NashMTLState(alpha=alpha, step=state.step + 1)

  return base.gram_based(init, from_gram, rep_grad_ok=False)
