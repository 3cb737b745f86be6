"""Geometric Loss Strategy (Chennupati et al., CVPR Workshops 2019).

The objective is the geometric mean of the present tasks' losses,

  GLS = (prod_k L_k)^(1/K'),

whose gradient is `sum_k w_k grad L_k` with

  w_k = dGLS/dL_k = GLS / (K' * L_k);

these are the weights returned (the train step stops their gradient, so the
model follows exactly the gradient of GLS).

Conventions and deviations:
* The product and the mean run over the present tasks (K' of them); absent
  tasks (count 0, loss 0, which would make the product 0) get weight 0. GLS
  keeps no state.
* `GLS` is computed as `exp(mean log L)` so that many small losses do not
  underflow the product.
* Losses are clipped below at `eps`: `dGLS/dL_k` grows without bound as
  `L_k -> 0`, and is undefined for `L_k <= 0` (GLS needs positive losses). A
  loss under `eps` is treated as `eps`.
* LibMTL (`GLS`) back-propagates the same objective with all K tasks but
  reports `L_k / (K prod L)` as weights; the weights here are the effective
  ones.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from mtl_jax.weighting import masking
from mtl_jax.weighting.base import Weighting


class GLSState(NamedTuple):
  """The geometric loss strategy keeps no statistics."""


def gls(eps: float = 1e-8) -> Weighting:
  """Geometric loss strategy, `w_k = GLS / (K' L_k)`.

  Args:
    eps: the smallest loss value used (see module docstring).

  Returns:
    The `Weighting`; its state is an empty `GLSState`.

  Raises:
    ValueError: `eps` is not positive.
  """
  if not eps > 0:
    raise ValueError(f"gls eps must be > 0, got {eps}")

  def init(num_tasks: int) -> GLSState:
    del num_tasks
    return GLSState()

  def update(losses, counts, state, *, rng=None, grad_norms=None):
    del rng, grad_norms
    present = masking.present_mask(counts)  # [K]
    safe = jnp.where(present, jnp.maximum(losses, eps), 1.0)  # [K]
    geometric_mean = jnp.exp(masking.masked_mean(jnp.log(safe), present))
    k = jnp.maximum(masking.num_present(present), 1.0)
    weights = jnp.where(present, geometric_mean / (k * safe), 0.0)  # [K]
    return weights, state

  return Weighting(init, update)
