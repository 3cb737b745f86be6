"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021).

"Towards Impartial Multi-task Learning",
https://openreview.net/forum?id=IMPnRXEWpvr (reference implementation:
LibMTL's `IMTL`, gradient half). IMTL-G finds the direction
`d = sum_i alpha_i g_i` with `sum_i alpha_i = 1` whose projections onto all
unit task gradients `u_i = g_i / ||g_i||` are equal.

The paper's closed form takes task 1 as reference (`D = [g_1 - g_i]_{i>1}`,
`U = [u_1 - u_i]_{i>1}`, `alpha_{2..K} = g_1 U^T (D U^T)^{-1}`); `D U^T`
mixes gradients of different norms, so with norms spread over a few orders
of magnitude its small singular values are lost to rounding and the answer
depends on which task is the reference. Here the same conditions are solved
symmetrically in the cosine basis: with `C = U U^T` (the cosines), `s_i =
alpha_i ||g_i||` and the common projection `p`,

  C s - p 1 = 0,     sum_i s_i / ||g_i|| = 1,

a `(K+1) x (K+1)` system whose entries are cosines and ratios of norms
(norms divided by the smallest, so the last row is in (0, 1]). It is as well
conditioned as C, treats every task alike (a permutation of the tasks
permutes its rows and columns) and is solved with a truncated-SVD
pseudo-inverse (relative cutoff `10 (K + 1) eps`), so degenerate inputs
(collinear or repeated gradients, K > P) give the minimum-norm solution
instead of NaN. The certificate of a solution is the spread of the
projections `max_i u_i . d - min_i u_i . d` relative to `|d|`, which is at
rounding level whenever the system is consistent. Costs one O(K^2 P) Gram,
a (K+1) x (K+1) SVD and one O(K P) combination.

Absent tasks, and present tasks whose gradient is exactly zero (they have no
unit vector, so no projection to equalise), get weight 0 through identity
rows and columns; the weights of the others sum to 1. IMTL-L (the learnable
loss scales of the full IMTL) is a loss weighting and is not part of this
aggregator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.aggregation import solvers
from mtl_jax.aggregation.base import Aggregator, scale_invariant

_HIGHEST = jax.lax.Precision.HIGHEST


def _pinv(a: jax.Array, rtol: float) -> jax.Array:
  """Truncated-SVD pseudo-inverse of a small square matrix."""
  u, s, vt = jnp.linalg.svd(a)
  keep = s > rtol * s[0]  # s is sorted descending
  s_inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
  return jnp.matmul(vt.T * s_inv[None, :], u.T, precision=_HIGHEST)


def imtl_g_weights(gram_matrix: jax.Array, present: jax.Array, *,
                   return_info: bool = False):
  """IMTL-G's weights `alpha [K]` (zero for absent tasks, summing to 1).

  Args:
    gram_matrix: `[K, K]` Gram matrix of the gradients (absent rows/cols 0).
    present: `bool [K]`, which tasks are present.
    return_info: also return a `solvers.SolverInfo` whose residual is the
      spread of the projections, `(max_i - min_i) u_i . d` over tasks with a
      nonzero gradient, relative to the size of d's terms `sum_i |alpha_i|
      ||g_i||` (d itself may be 0, e.g. for `g_1 = -g_2`). It is at rounding
      level when the equal-projection system is consistent; where it is not
      (K > P or dependent gradients with no common projection) the weights
      are the minimum-norm least-squares solution and `converged` is False.

  Returns:
    `alpha [K]` (and the info); the direction is `alpha @ G`. With no present
    task with a nonzero gradient, zeros.
  """
  k = gram_matrix.shape[0]
  basis = solvers.cosine_basis(gram_matrix, present)
  cos, nonzero = basis.cos, basis.nonzero
  dtype = cos.dtype
  r = jnp.where(nonzero, 1.0 / basis.norms, 0.0)  # [K] in (0, 1]
  nz = nonzero.astype(dtype)
  a = jnp.block([[cos + jnp.diag(1.0 - nz), -nz[:, None]],
                 [r[None, :], jnp.zeros((1, 1), dtype)]])  # [K+1, K+1]
  rhs = jnp.zeros((k + 1,), dtype).at[k].set(1.0)
  rtol = 10.0 * (k + 1) * float(jnp.finfo(dtype).eps)
  x = jnp.matmul(_pinv(a, rtol), rhs, precision=_HIGHEST)  # [K+1]
  alpha = jnp.where(nonzero, x[:k] * r, 0.0)
  # The last equation makes the weights sum to 1 up to rounding; make it
  # exact (a single task then gets exactly its gradient).
  total = jnp.sum(alpha)
  alpha = jnp.where(total > 0, alpha / jnp.where(total > 0, total, 1.0), alpha)
  if not return_info:
    return alpha
  # u_i . d in units of the smallest norm: C (N alpha).
  s = jnp.where(nonzero, basis.norms * alpha, 0.0)
  proj = jnp.matmul(cos, s, precision=_HIGHEST)  # [K]
  # Relative to the size of d's terms (d itself may be 0: g_1 = -g_2).
  terms = jnp.sum(jnp.abs(s))
  spread = (jnp.max(jnp.where(nonzero, proj, -jnp.inf))
            - jnp.min(jnp.where(nonzero, proj, jnp.inf)))
  residual = jnp.where(terms > 0, spread / jnp.where(terms > 0, terms, 1.0),
                       0.0)
  tol = 64 * (k + 1) * float(jnp.finfo(dtype).eps)
  return alpha, solvers.SolverInfo(jnp.ones((), jnp.int32), residual,
                                   residual <= tol)


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
