"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021).

"Towards Impartial Multi-task Learning",
https://openreview.net/forum?id=IMPnRXEWpvr (reference implementation:
LibMTL's `IMTL`, gradient half). IMTL-G finds the direction
`d = sum_i alpha_i g_i` with `sum_i alpha_i = 1` whose projections
onto all unit task gradients `u_i = g_i / ||g_i||` are equal. Closed form, with
task 1 as reference, `D = [g_1 - g_i]_{i>1}` and `U = [u_1 - u_i]_{i>1}`:

  alpha_{2..K} = g_1 U^T (D U^T)^{-1},   alpha_1 = 1 - sum_{i>1} alpha_i.

Every product above is a Gram entry: with `H[a, b] = g_a . u_b`,
`(D U^T)[i, j] = H[1,1] - H[1,j] - H[i,1] + H[i,j]` and
`(g_1 U^T)[j] = H[1,1] - H[1,j]`. So the method costs one O(K^2 P) Gram, a
K x K solve and one O(K P) combination.

Absent tasks, fixed shapes: the reference is the first PRESENT task, the
differences run over the other present tasks, and the K x K system has
identity rows and columns for the reference and the absent tasks (scaled like
the present block, so that the pseudo-inverse's relative cutoff is the
sub-problem's).

Deviations:
* the system is solved with a truncated-SVD pseudo-inverse (relative cutoff
  `10 * K * eps` of the largest singular value) instead of LibMTL's
  `torch.inverse`, so degenerate inputs (collinear or repeated gradients) give
  the minimum-norm solution instead of NaN or inf. A present task whose
  gradient is exactly zero gets `u_i = 0` (the ConFIG repository does the
  same); its projection cannot be equalised.
* IMTL-L (the learnable loss scales of the full IMTL) is a loss weighting and
  is not part of this aggregator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.aggregation.base import Aggregator, scale_invariant

_HIGHEST = jax.lax.Precision.HIGHEST


def _pinv(a: jax.Array, rtol: float) -> jax.Array:
  """Truncated-SVD pseudo-inverse of a small square matrix."""
  u, s, vt = jnp.linalg.svd(a)
  keep = s > rtol * s[0]  # s is sorted descending
  s_inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
  return jnp.matmul(vt.T * s_inv[None, :], u.T, precision=_HIGHEST)


def imtl_g_weights(gram_matrix: jax.Array, present: jax.Array) -> jax.Array:
  """IMTL-G's weights `alpha [K]` (zero for absent tasks, summing to 1).

  Args:
    gram_matrix: `[K, K]` Gram matrix of the gradients (absent rows/cols 0).
    present: `bool [K]`, which tasks are present.

  Returns:
    `alpha [K]`; the direction is `alpha @ G`. With no present task, zeros.
  """
  num_tasks = gram_matrix.shape[0]
  dtype = gram_matrix.dtype
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_matrix), 0.0))  # [K]
  inv_norms = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
  h = gram_matrix * inv_norms[None, :]  # [K, K]: H[a, b] = g_a . u_b
  ref = jnp.argmax(present)  # the first present task
  others = present & (jnp.arange(num_tasks) != ref)  # [K]
  # b[j] = g_ref . (u_ref - u_j),  A[i, j] = (g_ref - g_i) . (u_ref - u_j).
  b = h[ref, ref] - h[ref, :]  # [K]
  a = h[ref, ref] - h[ref, :][None, :] - h[:, ref][:, None] + h  # [K, K]
  block = others[:, None] & others[None, :]
  a = jnp.where(block, a, 0.0)
  # Pad with the identity at the block's own scale: the padded matrix's
  # largest singular value is then the block's, so the cutoff is unchanged.
  # But never below H's scale: A's entries carry rounding errors ~eps |H|, so
  # a block that is all noise (parallel gradients, where A is exactly 0) must
  # be cut, not inverted (that gave arbitrary, even ascent, directions).
  scale = jnp.maximum(jnp.max(jnp.abs(a)), jnp.max(jnp.abs(h)))
  scale = jnp.where(scale > 0, scale, 1.0)
  a = a + jnp.where(block, 0.0, scale * jnp.eye(num_tasks, dtype=dtype))
  b = jnp.where(others, b, 0.0)
  rtol = 10.0 * num_tasks * jnp.finfo(dtype).eps
  alpha = jnp.matmul(b, _pinv(a, rtol), precision=_HIGHEST)  # alpha A = b
  alpha = jnp.where(others, alpha, 0.0)
  alpha = alpha.at[ref].set(1.0 - alpha.sum())
  return jnp.where(present, alpha, 0.0)


def imtl_g() -> Aggregator:
  """IMTL-G (Liu et al., 2021): equal projection on every unit task gradient.

  The direction is invariant to permutations of the tasks and equivariant to
  any scaling of the gradients (negative scales included).

  Returns:
    A stateless `Aggregator` with `from_gram` and `rep_grad_ok=True` (IMTL
    applies it to the gradients of the shared representation).
  """

  # The weights are invariant to the Gram matrix's scale.
  return scale_invariant(imtl_g_weights, rep_grad_ok=True)
