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
here `cagrad_weights` solves the same problem jit-natively (see its
docstring; it agrees with SLSQP run to `ftol=1e-12` to ~1e-7). `|g0|` and
`|g_w|` are also taken from the Gram matrix (the official code computes
`|g_w|` from the vector), so that `from_gram` gives the whole direction as
weights on the task gradients; float32 cancellation in `w^T M w` can make a
short `g_w`'s length less accurate than the vector's norm would be.

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
_HIGHEST = jax.lax.Precision.HIGHEST
# FISTA stops once a step moves no weight by more than this.
_STEP_TOL = 5e-7
# Candidate steps per FISTA iteration: last step * 4, 2, 1, 1/2, ...
_NUM_STEPS = 24


def _mv(m, x):
  return jnp.matmul(m, x, precision=_HIGHEST)


def cagrad_weights(m: jax.Array, present: jax.Array | None = None, *,
                   c: float = 0.4, iters: int = 1000) -> jax.Array:
  """Solves CAGrad's dual `min_{w in simplex} w^T M b + r sqrt(w^T M w)`.

  Here `b` is the uniform weight vector over present tasks (so `M b` holds
  the `g_k . g0`) and `r = c sqrt(b^T M b) = c |g0|`. The objective is convex
  (linear plus a norm) and smooth away from `g_w = 0`, where its curvature is
  bounded by `r M / |g_w|`. It is minimised in two phases on the
  normalised Gram matrix (`M / max diag`):

  1. FISTA with adaptive restart over the simplex (at most `iters`
     iterations), each step chosen as the longest of `t * 4, t * 2, t, t / 2,
     ...` (`t` the last step, all candidates evaluated at once) for which the
     quadratic upper bound `f(y) + grad f(y) . D + |D|^2 / (2 step)` provably
     holds on the segment `D`, using the exact minimum of `|g_w|` along it
     (no float32 cancellation in the test).
  2. Up to four Newton steps on the face of the identified support,
     `[H_SS, 1; 1^T, 0] [dw; nu] = [-grad_S; 0]` with the Hessian
     `H = r / q (M - M w w^T M / q^2)`, `q = |g_w|`, each kept only if it stays
     in the simplex, is finite and does not increase f. They take the weights
     from FISTA's ~1e-6 to float32 precision.

  Args:
    m: `[K, K]` symmetric PSD Gram matrix, any scale.
    present: `bool [K]` (default: all). Absent tasks get weight 0 and are left
      out of `g0`.
    c: CAGrad's `c >= 0` (called `alpha` in the official code).
    iters: maximum number of FISTA iterations.

  Returns:
    `w [K]` float32 on the simplex of present tasks. When `g_w` can be 0 at
    the optimum (0 in the convex hull of the gradients) the weights are not
    unique and any minimiser may be returned.
  """
  k = m.shape[-1]
  present = (jnp.ones((k,), bool) if present is None
             else jnp.asarray(present, bool))
  mn, _, _ = solvers.normalised_gram(m, present)
  num_present = jnp.maximum(jnp.sum(present), 1)
  b = present.astype(jnp.float32) / num_present  # [K]
  lin = _mv(mn, b)  # [K] g_k . g0, normalised
  r = c * jnp.sqrt(jnp.maximum(jnp.vdot(b, lin), 0.0))
  tiny = 1e-30

  def sq_norm(w):
    return jnp.maximum(jnp.vdot(w, _mv(mn, w)), 0.0)

  def objective(w):
    return jnp.vdot(w, lin) + r * jnp.sqrt(sq_norm(w))

  def grad(w):
    mw = _mv(mn, w)
    q = jnp.sqrt(jnp.maximum(jnp.vdot(w, mw), 0.0))
    return lin + r * mw / jnp.maximum(q, tiny)

  project = jax.vmap(lambda y: solvers.project_simplex(y, present))
  scales = 2.0 ** (2.0 - jnp.arange(_NUM_STEPS, dtype=jnp.float32))  # [J]

  def cond(carry):
    i, _, _, _, _, done = carry
    return (i < iters) & ~done

  def body(carry):
    i, x, y, t, step, _ = carry
    steps = step * scales  # [J]
    cand = project(y[None, :] - steps[:, None] * grad(y)[None, :])  # [J, K]
    d = cand - y[None, :]  # [J, K]
    md = jnp.matmul(d, mn, precision=_HIGHEST)  # [J, K]
    dmd = jnp.maximum(jnp.sum(d * md, axis=1), 0.0)  # [J]
    ymd = _mv(md, y)  # [J]
    ymy = sq_norm(y)
    # Smallest |g_w| on the segment y -> y + d bounds the curvature there.
    s = jnp.clip(-ymd / jnp.maximum(dmd, tiny), 0.0, 1.0)
    qmin = jnp.sqrt(jnp.maximum(ymy + 2.0 * s * ymd + s * s * dmd, 0.0))
    ok = steps * r * dmd <= qmin * jnp.sum(d * d, axis=1)  # [J]
    first = jnp.argmax(ok)  # longest acceptable step
    any_ok = jnp.any(ok)
    x_new = jnp.where(any_ok, cand[first], y)
    step_new = jnp.where(any_ok, steps[first], step)
    done = ~any_ok | (jnp.max(jnp.abs(x_new - y)) <= _STEP_TOL)
    restart = jnp.vdot(y - x_new, x_new - x) > 0
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    y_new = jnp.where(restart, x_new,
                      x_new + ((t - 1.0) / t_new) * (x_new - x))
    t_new = jnp.where(restart, 1.0, t_new)
    return i + 1, x_new, y_new, t_new, step_new, done

  x0 = b
  # First step: the inverse curvature bound at the start.
  step0 = jnp.sqrt(sq_norm(x0)) / jnp.maximum(r, tiny)
  step0 = jnp.clip(step0, 1e-6, 1e6)
  one = jnp.ones((), jnp.float32)
  init = (jnp.zeros((), jnp.int32), x0, x0, one, step0, jnp.zeros((), bool))
  x = jax.lax.while_loop(cond, body, init)[1]

  def newton(_, w):
    mw = _mv(mn, w)
    q = jnp.sqrt(jnp.maximum(jnp.vdot(w, mw), 0.0))
    g = lin + r * mw / jnp.maximum(q, tiny)
    hess = (r / jnp.maximum(q, tiny)) * (
        mn - jnp.outer(mw, mw) / jnp.maximum(q * q, tiny))
    support = present & (w > 0)
    sf = support.astype(jnp.float32)
    a = jnp.where(support[:, None] & support[None, :], hess, 0.0)
    a = a + jnp.diag(1.0 - sf)
    kkt = jnp.block([[a, sf[:, None]], [sf[None, :], jnp.zeros((1, 1))]])
    rhs = jnp.concatenate([-jnp.where(support, g, 0.0), jnp.zeros((1,))])
    delta = jnp.where(support, jnp.linalg.solve(kkt, rhs)[:k], 0.0)
    w_new = w + delta
    # Rounding makes f flat at the optimum: allow a change of float32 size.
    slack = 1e-6 * (jnp.abs(jnp.vdot(w, lin)) + r * q) + 1e-12
    keep = (jnp.all(jnp.isfinite(w_new)) & jnp.all(w_new >= 0)
            & (objective(w_new) <= objective(w) + slack))
    return jnp.where(keep, w_new, w)

  return jax.lax.fori_loop(0, 4, newton, x)


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
    b = present.astype(jnp.float32) / num_present  # [K]
    # |g0 / s| and |g_w / s| from the Gram matrix, without forming them.
    g0_norm = jnp.sqrt(jnp.maximum(b @ gram_matrix @ b, 0.0))
    gw_norm = jnp.sqrt(jnp.maximum(w @ gram_matrix @ w, 0.0))
    lam = jnp.where(gw_norm > 0, c * g0_norm / jnp.where(gw_norm > 0,
                                                         gw_norm, 1.0), 0.0)
    # d = (g0 + lam g_w) / divisor in one pass over the gradients.
    return (b + lam * w) / divisor  # [K]

  return base.stateless_gram_based(weights_fn, rep_grad_ok=False)
