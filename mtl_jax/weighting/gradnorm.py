"""GradNorm (Chen et al., ICML 2018).

Learnable task weights `w` (init 1) are tuned so that the weighted tasks'
gradient norms at the last shared layer `W` train at a common rate. With
`g_k = ||grad_W L_k||` (of the UNWEIGHTED loss, computed by the train step:
`needs = {"grad_norms"}`):

  G_k      = w_k * g_k                          (= ||grad_W w_k L_k||)
  Gbar     = mean_k G_k
  r_k      = (L_k / L0_k) / mean_j (L_j / L0_j)  (relative inverse train rate)
  target_k = Gbar * r_k^alpha                   (held constant)
  L_grad   = sum_k |G_k - target_k|
  dL_grad/dw_k = sign(G_k - target_k) * g_k

`w` takes one step of its optimizer on that gradient and is then renormalised
so that `sum_k w_k = K`.

Conventions and deviations:
* The returned weights are the CURRENT `w` (before this step's update), as in
  the paper's algorithm and LibMTL: the model's loss `sum_k w_k L_k` and
  `L_grad` are both evaluated at the current `w`.
* `L0_k` is the task's loss at the first step where it was present (the paper
  uses `L_k(0)` at step 0; with partially labelled tasks a task may be absent
  there). A task's ratio is 1 at that first step, and also whenever `L0_k == 0`
  where it is undefined.
* The means, the renormalisation (to sum `K'`) and `L_grad` run over the
  present tasks only, so the present tasks behave as in GradNorm with `K'`
  tasks; absent tasks keep `w_k`, `L0_k` and their optimizer state exactly.
* `w` is clipped at 0 before the renormalisation: a negative weight would
  make the model ascend its task's loss. With 0, `G_k = 0 <= target_k`, so the
  next gradient pushes `w_k` back up. (The paper does not mention it.)
* LibMTL parametrises `w = K * softmax(logits)` instead of renormalising,
  updates them with the model's optimizer, uses equal weights during the first
  epoch and that epoch's mean loss as `L0`; here `w` follows the paper and has
  its own optimizer (default `adam(0.025)`).
* Losses are assumed non-negative (`r_k^alpha` of a negative ratio is NaN).
* The gradient of `w` is clipped to +-2^60 before the optimizer, so that a
  huge gradient norm (`+-g_k` ~ 1e30) cannot overflow Adam's second moment
  (see `masking`); smaller gradients are untouched.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.weighting import masking
from mtl_jax.weighting.base import Weighting


def _divide_by_peak(x: jax.Array, peak: jax.Array) -> jax.Array:
  """`x / peak` for `0 < peak <= float32 max`, entries at most 1 in magnitude.

  XLA rewrites a division by a broadcast scalar as a multiplication by its
  reciprocal, and `1 / peak` is subnormal, flushed to 0, for `peak > 2^126`
  (~8.5e37): `3e38 / 3e38` would give 0. Scaling both by 2^-64 first (exact)
  keeps the reciprocal normal; a ratio that then underflows is below 2^-126.
  """
  scale = jnp.where(peak > 2.0**64, 2.0**-64, 1.0)
  return (x * scale) / (peak * scale)


class GradNormState(NamedTuple):
  """The learnable weights and each task's initial loss.

  Attributes:
    weights: `[K]` learnable task weights `w`, init 1.
    initial_losses: `[K]` `L0_k`, each task's loss at its first present step
      (0 until then).
    seen: `[K]` bool, whether `L0_k` is recorded.
    opt_state: the per-task optimizer state of `w` (see `masking`).
  """

  weights: jax.Array
  initial_losses: jax.Array
  seen: jax.Array
  opt_state: Any


def gradnorm(alpha: float = 1.5, learning_rate: float = 0.025,
             optimizer: optax.GradientTransformation | None = None
             ) -> Weighting:
  """GradNorm weighting.

  Args:
    alpha: the strength of the restoring force towards a common train rate
      (0 equalises the gradient norms).
    learning_rate: learning rate of the default `optax.adam` on `w`.
    optimizer: an elementwise optax transformation for `w`; replaces the
      default `adam(learning_rate)` when given.

  Returns:
    The `Weighting`, with `needs={"grad_norms"}`; its state is a
    `GradNormState`.

  Raises:
    ValueError: `alpha` is negative or `learning_rate` not positive.
  """
  if not alpha >= 0:
    raise ValueError(f"gradnorm alpha must be >= 0, got {alpha}")
  if optimizer is None:
    if not learning_rate > 0:
      raise ValueError(f"gradnorm learning_rate must be > 0, "
                       f"got {learning_rate}")
    optimizer = optax.adam(learning_rate)

  def init(num_tasks: int) -> GradNormState:
    w = jnp.ones([num_tasks], jnp.float32)  # [K]
    return GradNormState(w, jnp.zeros([num_tasks], jnp.float32),
                         jnp.zeros([num_tasks], bool),
                         masking.init_optimizer(optimizer, w))

  def update(losses, counts, state, *, rng=None, grad_norms=None):
    del rng
    if grad_norms is None:
      raise ValueError("gradnorm needs grad_norms (the norm of each task's "
                       "unweighted loss gradient at the last shared layer)")
    present = masking.present_mask(counts)  # [K]
    w = state.weights  # [K]
    first = present & ~state.seen
    initial_losses = jnp.where(first, losses, state.initial_losses)  # [K]
    seen = state.seen | present

    known = initial_losses != 0
    train_rate = jnp.where(
        known, losses / jnp.where(known, initial_losses, 1.0), 1.0)  # [K]
    # Only ratios of train rates matter: divide by the largest (capped at the
    # largest float, as L / L0 overflows for e.g. 1e30 / 1e-30) so that the
    # mean cannot overflow and inf / inf cannot make NaN weights.
    train_rate = jnp.minimum(train_rate, jnp.finfo(jnp.float32).max)
    peak = jnp.max(jnp.where(present, train_rate, 0.0))
    train_rate = _divide_by_peak(train_rate, jnp.where(peak > 0, peak, 1.0))
    mean_rate = masking.masked_mean(train_rate, present)
    inverse_rate = train_rate / jnp.where(mean_rate != 0, mean_rate, 1.0)
    inverse_rate = jnp.where(present, inverse_rate, 1.0)  # [K]

    # Only the signs of G_k - target_k are used, and they do not depend on the
    # norms' scale: compare G_k / max_j g_j, whose mean cannot overflow.
    peak_norm = jnp.max(jnp.where(present, grad_norms, 0.0))
    norms = w * _divide_by_peak(grad_norms,
                                jnp.where(peak_norm > 0, peak_norm, 1.0))  # [K]
    target = masking.masked_mean(norms, present) * inverse_rate**alpha  # [K]
    grads = jnp.where(present, jnp.sign(norms - target) * grad_norms, 0.0)
    new_w, opt_state = masking.masked_step(optimizer, grads, state.opt_state,
                                           w, present)
    new_w = jnp.maximum(new_w, 0.0)
    total = jnp.sum(jnp.where(present, new_w, 0.0))
    scale = jnp.where(total > 0, masking.num_present(present) / total, 1.0)
    new_w = jnp.where(present, jnp.where(total > 0, new_w * scale, 1.0), w)
    return w, GradNormState(new_w, initial_losses, seen, opt_state)

  return Weighting(init, update, needs=frozenset({"grad_norms"}))
