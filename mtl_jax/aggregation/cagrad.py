"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021).

CAGrad looks for the update `d` that maximises the worst task's improvement
`min_k g_k . d` within a ball around the average gradient,
`|d - g0| <= c |g0|`. Its dual, solved by the official code
(github.com/Cranial-XIX/CAGrad, function `cagrad`), is

  w* = argmin_{w in simplex} g_w . g0 + sqrt(phi) |g_w|,
  g_w = sum_k w_k g_k,  phi = c^2 |g0|^2,
  d  = g0 + sqrt(phi) / |g_w| * g_w,

followed by a rescaling: `rescale=0` returns d, `1` returns `d / (1 + c^2)`
(the official default), `2` returns `d / (1 + c)`.

The official code solves for w with scipy's SLSQP on the K x K Gram matrix;
here `cagrad_weights` solves the same problem jit-natively and exactly
(`solvers.cagrad_dual`: an active-set Newton method in the cosine basis, so
that norm spreads of 1e12 cost no accuracy; it agrees with SLSQP run to
`ftol=1e-12` on well-scaled problems). `|g0|` and
`|g_w|` are also taken from the Gram matrix, in the cosine basis (the
official code computes `|g_w|` from the vector), so that `from_gram` gives the
whole direction as weights on the task gradients; cancellation in `w^T M w`
can make a short `g_w`'s length less accurate than the vector's norm would be.

Deviations: the official code adds 1e-8 to `|g0|^2`, `c |g0|` and `|g_w|` to
avoid divisions by zero; these absolute constants are not scale-invariant,
so here exact zeros are handled instead (`g_w = 0` gives `d = g0`, as the
official `lambda * g_w = 0` does). d is on the scale of the MEAN gradient,
as the official `cagrad` returns it; the official NYUv2 training script then
multiplies it by K "to match the sum loss" before the optimizer step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.aggregation import base
from mtl_jax.aggregation import solvers

_RESCALES = (0, 1, 2)


def cagrad_weights(m: jax.Array, present: jax.Array | None = None, *,
                   c: float = 0.4, return_info: bool = False):
  """CAGrad's dual weights `w [K]` on the simplex of present tasks.

  `min_{w in simplex} w^T M b + c |g0| sqrt(w^T M w)`, solved exactly (KKT
  certified, in the cosine basis, whatever the spread of gradient norms) by
  `solvers.cagrad_dual`; see there for the degenerate cases.

  Args:
    m: `[K, K]` symmetric PSD Gram matrix, any scale.
    present: `bool [K]` (default: all).
    c: CAGrad's `c >= 0`.
    return_info: also return the solver's `SolverInfo`.
  """
  return solvers.cagrad_dual(m, present, c=c, return_info=return_info)


def cagrad(c: float = 0.4, rescale: int = 1) -> base.Aggregator:
  """CAGrad (Liu et al., 2021) as an Aggregator.

  The direction is `d = g0 + c |g0| / |g_w| * g_w` (see the module docstring),
  divided by 1, `1 + c^2` or `1 + c` for `rescale` 0, 1, 2. `g0` is the mean
  gradient of the present tasks; absent tasks are left out entirely. A
  single task gives `(1 + c) g` before rescaling. Only valid on parameter
  gradients (`rep_grad_ok=False`).

  Args:
    c: radius of the ball around `g0`, relative to `|g0|` (`c >= 0`; 0 gives
      the mean gradient). Called `alpha` in the official code; the paper
      uses 0.4 on NYUv2/Cityscapes and 0.9 on Meta-World MT10.
    rescale: 0, 1 or 2, as in the official code (default 1).

  Returns:
    A stateless Aggregator with `from_gram`.

  Raises:
    ValueError: `c` is negative or not finite, or `rescale` is not 0, 1, 2.
  """
  c = float(c)
  if not c >= 0 or c == float("inf"):
    raise ValueError(f"cagrad: c must be a finite value >= 0, got {c}")
  if rescale not in _RESCALES:
    raise ValueError(f"cagrad: rescale must be one of {_RESCALES}, got "
                     f"{rescale!r}")
  divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]

  def weights_fn(gram_matrix, scale, *, losses=None, counts=None, rng=None
                 ) -> jax.Array:
    del scale, losses, rng
    # d is positively homogeneous in G: the weights and the ratio of norms
    # come from the Gram matrix of G / s whatever the power of two s.
    present = base.present_mask(counts, gram_matrix.shape[0])  # [K]
    w = cagrad_weights(gram_matrix, present, c=c)  # [K]
    num_present = jnp.maximum(jnp.sum(present), 1)
    b = present.astype(w.dtype) / num_present  # [K]
    # |g0| and |g_w| in the cosine basis, accurate whatever the norm spread.
    basis = solvers.cosine_basis(gram_matrix, present)
    g0_norm = solvers.combination_norm(basis, b)
    gw_norm = solvers.combination_norm(basis, w)
    lam = jnp.where(gw_norm > 0, c * g0_norm / jnp.where(gw_norm > 0,
                                                         gw_norm, 1.0), 0.0)
    # d = (g0 + lam g_w) / divisor in one pass over the gradients.
    return (b + lam * w) / divisor  # [K]

  return base.stateless_gram_based(weights_fn, rep_grad_ok=False)

