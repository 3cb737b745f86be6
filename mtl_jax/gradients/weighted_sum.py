"""The gradient without an aggregator: one backward pass of `sum_k w_k L_k`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax.gradients import spec as spec_lib
from mtl_jax.gradients.spec import Batch, Gradients, GradientSpec, MethodStates
from mtl_jax.gradients.spec import StepKeys


def gradients(spec: GradientSpec, params: Any, batch: Batch,
                 states: MethodStates, keys: StepKeys) -> Gradients:
  """`grad (sum_k w_k L_k + aux)` of every param.

  A weighting that needs gradient norms (GradNorm) also gets the per-task
  gradients of the last shared layer, from a batched VJP of the same forward
  pass (XLA prunes the other layers' per-task gradients).
  """
  (sums, _), vjp_fn, (counts, aux, features) = jax.vjp(
      lambda p: spec.model.loss_sums(p, batch, keys.dropout), params,
      has_aux=True)
  losses, counts, denom = spec.global_losses(sums, counts)
  grad_norms = None
  if spec.needs_norms:
    (per_task,) = spec.batched_vjp(
        lambda c: vjp_fn((c, jnp.zeros((), jnp.float32))),
        spec_lib.unit_cotangents(denom))
    grad_norms = spec.grad_norms(per_task["shared"])
  weights, weighting_state = spec.weigh(losses, counts, states.weighting,
                                        keys.weighting, grad_norms)
  (grads,) = vjp_fn((weights / denom, spec.aux_scale()))
  return Gradients(spec.psum(grads), losses, counts, weights,
                   MethodStates(weighting_state, states.aggregation),
                   spec.global_aux(aux), features)
