"""Uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018).

Each task has a learnable log-variance `s_k = log sigma_k^2` and the joint
objective is

  sum_k 0.5 * exp(-s_k) * L_k + 0.5 * s_k,

so the model sees the weights `w_k = 0.5 * exp(-s_k)` and `s` descends

  d/ds_k = 0.5 - 0.5 * exp(-s_k) * L_k.

Conventions and deviations:
* The paper weights classification losses by `1/sigma^2` and regression losses
  by `1/(2 sigma^2)`; like LibMTL (`UW`) every task here uses `1/(2 sigma^2)`
  and the regulariser `log sigma = s/2`.
* The paper (and LibMTL) update `s` with the model's optimizer; here `s` has
  its own optax optimizer (default `adam(1e-4)`, LibMTL's default model
  learning rate). Set `learning_rate` to the model's to match them.
* The weights returned are those of the current `s`, before its update: the
  model and `s` take their gradient steps from the same point, as in the joint
  objective.
* LibMTL initialises `s = -0.5`; the default here is `s = 0` (`sigma = 1`).
* Absent tasks (count 0) keep `s_k` and its optimizer state exactly.
* The gradient of `s` is clipped to +-2^60 before the optimizer, so that a
  huge loss (`0.5 - w L` ~ -1e30) cannot overflow Adam's second moment
  (see `masking`); smaller gradients are untouched.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.weighting import masking
from mtl_jax.weighting.base import Weighting


class UncertaintyState(NamedTuple):
  """The learnable log-variances.

  Attributes:
    log_vars: `[K]` learnable `s_k = log sigma_k^2`.
    opt_state: their per-task optimizer state (see `masking`).
  """

  log_vars: jax.Array
  opt_state: Any


def uncertainty(learning_rate: float = 1e-4, init_log_var: float = 0.0,
                optimizer: optax.GradientTransformation | None = None
                ) -> Weighting:
  """Homoscedastic-uncertainty weighting, `w_k = 0.5 * exp(-s_k)`.

  Args:
    learning_rate: learning rate of the default `optax.adam` on `s`.
    init_log_var: the initial `s_k` of every task.
    optimizer: an elementwise optax transformation for `s`; replaces the
      default `adam(learning_rate)` when given.

  Returns:
    The `Weighting`; its state is an `UncertaintyState`.

  Raises:
    ValueError: `learning_rate` is not positive or `init_log_var` not finite.
  """
  if optimizer is None:
    if not learning_rate > 0:
      raise ValueError(f"uncertainty learning_rate must be > 0, "
                       f"got {learning_rate}")
    optimizer = optax.adam(learning_rate)
  if not math.isfinite(init_log_var):
    raise ValueError(f"uncertainty init_log_var must be finite, "
                     f"got {init_log_var}")

  def init(num_tasks: int) -> UncertaintyState:
    log_vars = jnp.full([num_tasks], init_log_var, jnp.float32)  # [K]
    return UncertaintyState(log_vars,
                            masking.init_optimizer(optimizer, log_vars))

  def update(losses, counts, state, *, rng=None, grad_norms=None):
    del rng, grad_norms
    present = masking.present_mask(counts)  # [K]
    s = state.log_vars  # [K]
    weights = 0.5 * jnp.exp(-s)  # [K]
    grads = jnp.where(present, 0.5 - weights * losses, 0.0)  # [K]
    log_vars, opt_state = masking.masked_step(optimizer, grads,
                                              state.opt_state, s, present)
    return weights, UncertaintyState(log_vars, opt_state)

  return Weighting(init, update)
