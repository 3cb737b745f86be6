"""ConFIG: conflict-free updates (Liu et al., ICLR 2025).

"ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
https://arxiv.org/abs/2408.11104; official code
https://github.com/tum-pbs/ConFIG
(`conflictfree.grad_operator.ConFIG_update` with its defaults: `EqualWeight`,
`ProjectionLength`). With the unit gradients as rows of `U` (`u_i = g_i /
||g_i||`), the direction is the one with EQUAL positive cosine to every task
gradient:

  x = U^+ 1,     u = x / ||x||,     d = (sum_i g_i . u) u.

`U^+ 1` is the minimum-norm least-squares solution of `U x = 1` (what the
official `torch.linalg.lstsq` returns), computed through the K x K cosine
matrix: `x = U^T (U U^T)^+ 1`. With `C = U U^T` and `z = diag(1/||g||) (C^+ 1)`,
`x = G^T z`, `||x||^2 = z^T M z` and `sum_i g_i . x = 1^T M z` (M = G G^T), so
`d = (1^T M z) / (z^T M z) * G^T z`: one O(K^2 P) Gram, a K x K `eigh`, one
O(K P) combination.

Deviations:
* the pseudo-inverse of C drops eigenvalues at most `10 * K * eps` times the
  largest. The official lstsq cuts the singular values of U (square roots of
  these eigenvalues) at `K * eps` relative; forming C squares the condition
  number, so the cutoff on C must be the square-root-scale one for float32
  noise not to be amplified. Only nearly dependent unit gradients (an
  eigenvalue of C below ~1e-6 for a few tasks) are affected.
* the official operator switches to a closed form for two tasks
  (`ConFIG_update_double`); it gives the same direction as the general form
  up to rounding, so there is one code path.
* a zero gradient (present with zero norm, or absent) gets a zero unit vector
  (the official `nan_to_num`), i.e. drops out of the least squares; absent
  tasks are also given weight 0. If no direction exists (every gradient zero)
  the result is zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.aggregation import solvers
from mtl_jax.aggregation.base import Aggregator, scale_invariant

_HIGHEST = jax.lax.Precision.HIGHEST


def config_weights(gram_matrix: jax.Array, present: jax.Array, *,
                   return_info: bool = False):
  """ConFIG's direction as weights on the task gradients.

  Args:
    gram_matrix: `[K, K]` Gram matrix (absent rows and columns zero).
    present: `bool [K]`, which tasks are present.
    return_info: also return a `solvers.SolverInfo` whose residual is the
      spread of the cosines between d and the nonzero task gradients,
      `max_i cos_i - min_i cos_i` (0 for a zero direction): at rounding level
      when `U x = 1` is solvable, and not where the unit gradients are
      dependent without an equal-cosine direction (then the least-squares
      `x` of the official lstsq is used and `converged` is False).

  Returns:
    `w [K]` (and the info) with direction `w @ G` (zero for absent tasks).
  """
  num_tasks = gram_matrix.shape[0]
  dtype = gram_matrix.dtype
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_matrix), 0.0))  # [K]
  inv_norms = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
  cos = gram_matrix * inv_norms[:, None] * inv_norms[None, :]  # [K, K]
  lam, vecs = jnp.linalg.eigh(cos)
  keep = lam > 10.0 * num_tasks * jnp.finfo(dtype).eps * jnp.max(lam)
  lam_inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
  ones = present.astype(dtype)  # EqualWeight on the present tasks
  y = jnp.matmul(vecs, lam_inv * jnp.matmul(vecs.T, ones, precision=_HIGHEST),
                 precision=_HIGHEST)  # [K]: C^+ 1
  z = jnp.where(present, y * inv_norms, 0.0)  # [K]: x = G^T z
  mz = jnp.matmul(gram_matrix, z, precision=_HIGHEST)  # [K]: G x
  sq_len = jnp.dot(z, mz, precision=_HIGHEST)  # ||x||^2
  proj = jnp.sum(jnp.where(present, mz, 0.0))  # sum_i g_i . x
  # d = (sum_i g_i . x / ||x||) x / ||x||.
  factor = jnp.where(sq_len > 0, proj / jnp.where(sq_len > 0, sq_len, 1.0), 0.0)
  w = factor * z
  if not return_info:
    return w
  basis = solvers.cosine_basis(gram_matrix, present)
  s = jnp.where(basis.nonzero, basis.norms * w, 0.0)
  cosines = jnp.matmul(basis.cos, s, precision=_HIGHEST)  # u_i . d, in units
  length = solvers.combination_norm(basis, w)
  nz = basis.nonzero
  spread = (jnp.max(jnp.where(nz, cosines, -jnp.inf))
            - jnp.min(jnp.where(nz, cosines, jnp.inf)))
  residual = jnp.where((length > 0) & jnp.any(nz),
                       spread / jnp.where(length > 0, length, 1.0), 0.0)
  tol = 64 * num_tasks * float(jnp.finfo(dtype).eps)
  return w, solvers.SolverInfo(jnp.ones((), jnp.int32), residual,
                               residual <= tol)


def config() -> Aggregator:
  """ConFIG (Liu et al., 2024): equal cosine to every task gradient.

  The direction is invariant to permutations of the tasks and equivariant to
  any scaling of the gradients (negative scales included).

  Returns:
    A stateless `Aggregator` with `from_gram` and `rep_grad_ok=False`
    (defined on parameter gradients in the paper).
  """

  # The weights are invariant to the Gram matrix's scale.
  return scale_invariant(config_weights, rep_grad_ok=False)
