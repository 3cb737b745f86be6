"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023).

"Independent Component Alignment for Multi-Task Learning",
https://arxiv.org/abs/2305.19000; official code
https://github.com/SamsungLabs/MTL (`code/optim/aligned/solver.py`,
`ProcrustesSolver`). The task gradients are made orthogonal and of equal
length (the condition number of the gradient system becomes 1) by the
Procrustes solution: with the Gram matrix `M = G G^T = V diag(lambda) V^T`
restricted to its nonzero eigenvalues,

  B = sqrt(lambda_R) V diag(lambda)^(-1/2) V^T           # [K, K]

the aligned gradients are the rows of `B G` and the direction is their sum,
`(B 1) @ G` (LibMTL: `alpha = B.sum(0)`; B is symmetric). `lambda_R` sets the
length of the aligned gradients (`scale_mode`):

* "min": the smallest nonzero eigenvalue (the paper's default);
* "median": the median of the nonzero eigenvalues, LOWER median for an even
  count (what `torch.median` in the official code returns);
* "rmse": their mean.

Costs one O(K^2 P) Gram, a K x K `eigh`, one O(K P) combination.

Eigenvalues at most `max(lambda) * n * eps` (n: number of present tasks; the
official code uses K) are treated as zero, as in the official code, with eps
FLOAT32's epsilon whatever the dtype (the official code's precision). This
cutoff is part of the method's definition: a Gram matrix whose condition
number exceeds ~1 / (n eps) (gradient norms spread by more than ~1e3) is rank
deficient for Aligned-MTL and the directions it equalises are only the kept
ones. Fixing eps makes float32 and float64 (`jax_enable_x64`) runs compute the
same direction; float64 only resolves the kept eigenvalues more accurately.
Eigenvalues within a small factor of the cutoff are kept or dropped by
rounding: there the direction is not well defined in any precision.
Absent
tasks are given a negative diagonal entry in M (their eigenvalues are then
negative, well apart from the PSD present block's) and are dropped with the
other non-positive eigenvalues; their weights are set to 0. If every present
gradient is zero the direction is zero (the official code would fail on an
empty spectrum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.aggregation import solvers
from mtl_jax.aggregation.base import Aggregator, scale_invariant

_HIGHEST = jax.lax.Precision.HIGHEST
SCALE_MODES = ("min", "median", "rmse")


def aligned_mtl_weights(gram_matrix: jax.Array, present: jax.Array,
                        scale_mode: str = "min", *,
                        return_info: bool = False):
  """Aligned-MTL's task weights `B 1` `[K]` (zero for absent tasks).

  Args:
    gram_matrix: `[K, K]` Gram matrix (absent rows and columns zero).
    present: `bool [K]`, which tasks are present.
    scale_mode: "min", "median" or "rmse".
    return_info: also return a `solvers.SolverInfo` whose residual is the
      defining equality's: the aligned gradients `B G` are orthogonal with
      squared length `lambda_R` on the kept eigenvectors, `B M B = lambda_R
      V_R V_R^T`, residual `max |B M B - lambda_R V_R V_R^T| / lambda_R`,
      within tolerance when below `64 K eps` times the kept spectrum's
      condition number (the rounding of the eigendecomposition).

  Returns:
    `alpha [K]` (and the info); the direction is `alpha @ G`.
  """
  dtype = gram_matrix.dtype
  # Absent tasks get a NEGATIVE diagonal entry: their eigenpairs are then
  # exactly (e_k, -shift), well apart from the present block's spectrum
  # (PSD), and dropped by the `lam > tol` test below on every backend, rather
  # than relying on an eigensolver to return an exact 0 for a zero block.
  shift = jnp.maximum(jnp.trace(gram_matrix), jnp.finfo(dtype).tiny)
  lam, vecs = jnp.linalg.eigh(
      gram_matrix - jnp.diag(jnp.where(present, 0.0, shift)))  # [K], [K, K]
  num_present = present.sum()
  tol = jnp.max(lam) * num_present * jnp.finfo(jnp.float32).eps
  keep = lam > jnp.maximum(tol, 0.0)  # [K]
  rank = keep.sum()
  if scale_mode == "min":
    scale = jnp.min(jnp.where(keep, lam, jnp.inf))
  elif scale_mode == "median":
    # The kept eigenvalues, ascending, come first after sorting with +inf
    # fill; the lower median of r values is the ((r - 1) // 2)-th.
    ascending = jnp.sort(jnp.where(keep, lam, jnp.inf))
    scale = ascending[jnp.maximum(rank - 1, 0) // 2]
  elif scale_mode == "rmse":
    scale = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1)
  else:
    raise ValueError(f"unknown aligned_mtl scale_mode {scale_mode!r}; valid: "
                     f"{', '.join(SCALE_MODES)}")
  scale = jnp.where(rank > 0, scale, 0.0)
  inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
  b = jnp.sqrt(scale) * jnp.matmul(vecs * inv_sqrt[None, :], vecs.T,
                                   precision=_HIGHEST)  # [K, K]
  alpha = jnp.matmul(b, present.astype(dtype), precision=_HIGHEST)  # [K]
  alpha = jnp.where(present, alpha, 0.0)
  if not return_info:
    return alpha
  bmb = jnp.matmul(jnp.matmul(b, gram_matrix, precision=_HIGHEST), b,
                   precision=_HIGHEST)  # [K, K]
  kept = jnp.matmul(vecs * keep[None, :], vecs.T, precision=_HIGHEST)
  safe = jnp.where(scale > 0, scale, 1.0)
  residual = jnp.where(rank > 0, jnp.max(jnp.abs(bmb - scale * kept)) / safe,
                       0.0)
  # The eigendecomposition's rounding, amplified by the kept spectrum's
  # condition number through diag(lambda)^(-1/2).
  smallest = jnp.min(jnp.where(keep, lam, jnp.inf))
  cond = jnp.where(rank > 0, jnp.max(lam) / jnp.where(rank > 0, smallest, 1.0),
                   1.0)
  tol = 64 * gram_matrix.shape[0] * float(jnp.finfo(dtype).eps) * cond
  return alpha, solvers.SolverInfo(jnp.ones((), jnp.int32), residual,
                                   residual <= tol)


def aligned_mtl(scale_mode: str = "min") -> Aggregator:
  """Aligned-MTL (Senushkin et al., 2023).

  The direction is invariant to permutations of the tasks and equivariant to
  any scaling of the gradients (B is scale-invariant), negative included. For
  orthogonal gradients, `B = sqrt(lambda_R) diag(1/||g_i||)`: each gradient is
  rescaled to length `sqrt(lambda_R)`.

  Args:
    scale_mode: "min" (default), "median" or "rmse"; see the module docstring.

  Returns:
    A stateless `Aggregator` with `from_gram` and `rep_grad_ok=True`
    (Aligned-MTL-UB).

  Raises:
    ValueError: an unknown scale_mode.
  """
  if scale_mode not in SCALE_MODES:
    raise ValueError(f"unknown aligned_mtl scale_mode {scale_mode!r}; valid: "
                     f"{', '.join(SCALE_MODES)}")

  # B is invariant to the Gram matrix's scale.
  return scale_invariant(
      lambda gram_matrix, present: aligned_mtl_weights(gram_matrix, present, scale_mode),
      rep_grad_ok=True)
