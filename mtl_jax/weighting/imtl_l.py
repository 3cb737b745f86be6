"""IMTL-L, the loss-balancing half of Impartial MTL (Liu et al., ICLR 2021).

Each task has a learnable scale parameter `s_k` and the joint objective is

  sum_k exp(s_k) * L_k - s_k,

so the model sees the weights `w_k = exp(s_k)`, and `s` descends

  d/ds_k = exp(s_k) * L_k - 1,

whose fixed point `exp(s_k) L_k = 1` makes every scaled loss equal to 1.

Conventions and deviations:
* The paper updates `s` with the model's optimizer; here `s` has its own optax
  optimizer (default `adam(1e-4)`, LibMTL's default model learning rate). Set
  `learning_rate` to the model's to match it.
* The weights returned are those of the current `s`, before its update (the
  model and `s` take their gradient steps from the same point).
* Only IMTL-L: IMTL-G (the gradient-level closed form) is an aggregator.
* Absent tasks (count 0) keep `s_k` and its optimizer state exactly.
* The gradient of `s` is clipped to +-2^60 before the optimizer, so that a
  huge loss (`e^s L - 1` ~ 1e30) cannot overflow Adam's second moment (see
  `masking`); smaller gradients are untouched.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.weighting import masking
from mtl_jax.weighting.base import Weighting


class IMTLLState(NamedTuple):
  """The learnable log-scales.

  Attributes:
    log_scales: `[K]` learnable `s_k` (the weight is `exp(s_k)`), init 0.
    opt_state: their per-task optimizer state (see `masking`).
  """

  log_scales: jax.Array
  opt_state: Any


def imtl_l(learning_rate: float = 1e-4,
           optimizer: optax.GradientTransformation | None = None
           ) -> Weighting:
  """IMTL-L weighting, `w_k = exp(s_k)` with `s` learned on `e^s L - s`.

  Args:
    learning_rate: learning rate of the default `optax.adam` on `s`.
    optimizer: an elementwise optax transformation for `s`; replaces the
      default `adam(learning_rate)` when given.

  Returns:
    The `Weighting`; its state is an `IMTLLState`.

  Raises:
    ValueError: `learning_rate` is not positive.
  """
  if optimizer is None:
    if not learning_rate > 0:
      raise ValueError(f"imtl_l learning_rate must be > 0, got {learning_rate}")
    optimizer = optax.adam(learning_rate)

  def init(num_tasks: int) -> IMTLLState:
    s = jnp.zeros([num_tasks], jnp.float32)  # [K]
    return IMTLLState(s, masking.init_optimizer(optimizer, s))

  def update(losses, counts, state, *, rng=None, grad_norms=None):
    del rng, grad_norms
    present = masking.present_mask(counts)  # [K]
    s = state.log_scales  # [K]
    weights = jnp.exp(s)  # [K]
    grads = jnp.where(present, weights * losses - 1.0, 0.0)  # [K]
    s, opt_state = masking.masked_step(optimizer, grads, state.opt_state, s,
                                       present)
    return weights, IMTLLState(s, opt_state)

  return Weighting(init, update)
