"""MGDA: the multiple-gradient descent algorithm (Sener & Koltun, NeurIPS 2018).

The update is the minimum-norm point of the convex hull of the task gradients,
`d = sum_k alpha_k g_k` with `alpha = argmin_{alpha in simplex} |G^T alpha|^2`.
It is a descent direction for every task (`d . g_k >= |d|^2`) and zero at a
Pareto-stationary point. `alpha` is computed on the `[K, K]` Gram matrix by
`solvers.min_norm_simplex`, an active-set method in the cosine basis whose
KKT conditions hold to rounding whatever the spread of the gradient norms
(the paper's code runs a Frank-Wolfe solver for at most 250 iterations).

Gradient normalisation (`gradient_normalizers` of the paper's code
github.com/isl-org/MultiObjectiveOptimization, "optional and not included in
the paper"): the min-norm weights are computed on `g_k / n_k` with

  "none":  n_k = 1
  "l2":    n_k = |g_k|
  "loss":  n_k = L_k
  "loss+": n_k = L_k |g_k|

Where the weights are applied (`apply_to`) is a choice the paper's code makes
one way and its re-implementations the other:

* "normalized" (default): `d = sum_k alpha_k g_k / n_k`, the min-norm point
  of the normalised gradients themselves. It keeps MGDA's guarantee
  (`d . g_k > 0` for every task unless d = 0), and is what LibMTL does on
  parameter gradients.
* "raw": `d = sum_k alpha_k g_k`, as in the paper's training script (the
  weights scale the raw losses before the final backward pass). This
  reweights the hull point and loses the no-conflict guarantee when the n_k
  differ.

Both coincide for "none". MGDA is valid on gradients w.r.t. the shared
representation (MGDA-UB, the paper's Theorem 1), so `rep_grad_ok=True`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.aggregation import base
from mtl_jax.aggregation import solvers

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
APPLY_TO = ("normalized", "raw")


def gradient_normalizers(sq_norms: jax.Array, losses: jax.Array | None,
                         normalization: str) -> jax.Array:
  """`n [K]` of the paper's code, made safe for zero norms and losses.

  A zero gradient keeps norm factor 1 (its row stays zero rather than
  0/0), and a loss that is not positive keeps factor 1: dividing by a
  negative loss would flip the gradient, by a zero loss blow it up.

  Args:
    sq_norms: `[K]` squared gradient norms (the Gram matrix's diagonal).
    losses: `[K]` task losses (needed by "loss" and "loss+").
    normalization: one of `NORMALIZATIONS`.

  Returns:
    `[K]` positive divisors, in `sq_norms`' float dtype.
  """
  dtype = solvers.float_dtype(sq_norms)
  ones = jnp.ones_like(sq_norms, dtype)
  norms = jnp.sqrt(jnp.maximum(sq_norms.astype(dtype), 0.0))
  norms = jnp.where(norms > 0, norms, 1.0)
  if normalization == "none":
    return ones
  if normalization == "l2":
    return norms
  losses = jnp.asarray(losses, dtype)
  losses = jnp.where(losses > 0, losses, 1.0)
  if normalization == "loss":
    return losses
  return losses * norms  # "loss+"


def mgda(normalization: str = "none", apply_to: str = "normalized"
         ) -> base.Aggregator:
  """MGDA (Sener & Koltun, 2018) as an Aggregator.

  Args:
    normalization: "none" (default, the paper), "l2", "loss" or "loss+", see
      the module docstring.
    apply_to: "normalized" (default) or "raw": whether `alpha` multiplies the
      normalised or the raw gradients, see the module docstring.

  Returns:
    A stateless Aggregator with `rep_grad_ok=True` and `from_gram`. Absent
    tasks get weight 0; a single present task gives its (normalised)
    gradient; if any present gradient is zero, or 0 is otherwise in the
    hull, the direction is 0.

  Raises:
    ValueError: unknown `normalization` or `apply_to`.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"mgda: unknown normalization {normalization!r}; valid: "
                     f"{', '.join(NORMALIZATIONS)}")
  if apply_to not in APPLY_TO:
    raise ValueError(f"mgda: unknown apply_to {apply_to!r}; valid: "
                     f"{', '.join(APPLY_TO)}")
  needs_losses = normalization in ("loss", "loss+")

  def weights_fn(gram_matrix, scale, *, losses=None, counts=None, rng=None
                 ) -> jax.Array:
    del rng
    if needs_losses and losses is None:
      raise ValueError(f"mgda(normalization={normalization!r}) needs losses")
    present = base.present_mask(counts, gram_matrix.shape[0])  # [K]
    # alpha is invariant to the scale of the Gram matrix of G / s.
    n = gradient_normalizers(jnp.diagonal(gram_matrix), losses,
                             normalization)  # [K]
    # Gram matrix of the normalised gradients, without forming them.
    alpha = solvers.min_norm_simplex(gram_matrix / jnp.outer(n, n),
                                     present)  # [K]
    weights = alpha / n if apply_to == "normalized" else alpha
    if apply_to == "normalized" and normalization in ("l2", "loss+"):
      weights = weights / scale  # n holds the norms of G / s, not of G
    return weights

  return base.stateless_gram_based(weights_fn, rep_grad_ok=True)
