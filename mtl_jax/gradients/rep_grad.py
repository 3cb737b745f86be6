"""The representation-gradient path (MGDA-UB style).

The per-task gradients are taken w.r.t. the shared REPRESENTATION (the
features `encode` returns) instead of the shared params: cheap, heads only.
They are weighted, aggregated there (under pmap gathered over devices so the
aggregator sees every example) and sent through the trunk in one backward
pass. Needs a model with `encode`/`decode` (`Forward.encode_decode`) and an
aggregator with `rep_grad_ok`.

Auxiliary losses are supported: those sown by the trunk add their gradient
in the trunk's backward pass, those sown by the heads add theirs to the
heads' params and to the features' cotangent.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax.gradients import forward as forward_lib
from mtl_jax.gradients import spec as spec_lib
from mtl_jax.gradients.spec import Batch, Gradients, GradientSpec, MethodStates
from mtl_jax.gradients.spec import StepKeys


def gradients(spec: GradientSpec, params: Any, batch: Batch,
             states: MethodStates, keys: StepKeys) -> Gradients:
  """The aggregated direction in feature space, through the trunk once."""
  model = spec.model
  zero = jnp.zeros((), jnp.float32)

  def encode(shared):
    features, aux = model.encode({**params, "shared": shared}, batch,
                                 keys.dropout)
    return (features, forward_lib.aux_total(aux)), aux

  def heads(features, others):
    predictions, aux = model.decode({**others, "shared": params["shared"]},
                                    features, batch, keys.dropout)
    sums, counts = model.task_sums(predictions, batch, features)
    return (sums, forward_lib.aux_total(aux)), (counts, aux)

  (features, _), encode_vjp, encode_aux = jax.vjp(
      encode, params["shared"], has_aux=True)
  others = {k: v for k, v in params.items() if k != "shared"}
  (sums, _), heads_vjp, (counts, heads_aux) = jax.vjp(
      heads, features, others, has_aux=True)
  losses, counts, denom = spec.global_losses(sums, counts)
  # [K, B, ...] feature gradients (a {view: ...} tree) and head gradients.
  z_grads, head_grads = spec.batched_vjp(lambda c: heads_vjp((c, zero)),
                                         spec_lib.unit_cotangents(denom))
  grad_norms = None
  if spec.needs_norms:
    (per_task,) = jax.vmap(lambda z: encode_vjp((z, zero)))(z_grads)
    grad_norms = spec.grad_norms(per_task)
  weights, weighting_state = spec.weigh(losses, counts, states.weighting,
                                        keys.weighting, grad_norms)
  direction, aggregation_state = _aggregate_features(
      spec, spec_lib.scale_rows(z_grads, weights), states.aggregation,
      losses, counts, keys.aggregator)
  others_grads = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1),
                              head_grads)
  if heads_aux:  # the heads' auxiliary losses: their params and features
    z_aux, others_aux = heads_vjp((jnp.zeros_like(sums), spec.aux_scale()))
    direction = spec_lib.add_trees(direction, z_aux)
    others_grads = spec_lib.add_trees(others_grads, others_aux)
  (shared_grads,) = encode_vjp(
      (direction, spec.aux_scale() if encode_aux else zero))
  grads = {"shared": spec.psum(shared_grads), **spec.psum(others_grads)}
  return Gradients(grads, losses, counts, weights,
                   MethodStates(weighting_state, aggregation_state),
                   spec.global_aux({**encode_aux, **heads_aux}),
                   model.kept_features(features))


def _aggregate_features(spec: GradientSpec, z_grads: Any, state: Any,
                        losses: jax.Array, counts: jax.Array, key: jax.Array
                        ) -> tuple[Any, Any]:
  """The aggregator on the weighted feature gradients `[K, B, ...]`; returns
  this device's rows of the direction."""
  axis = spec.axis_name
  if axis:  # the aggregator sees every example's representation
    z_grads = jax.tree.map(
        lambda z: jax.lax.all_gather(z, axis, axis=1, tiled=True), z_grads)
  leaves, treedef = jax.tree.flatten(z_grads)
  matrix = jnp.concatenate([z.reshape(z.shape[0], -1) for z in leaves],
                           axis=1)  # [K, B * D], in row-major order
  flat, state = spec.aggregator.update(matrix, state, losses=losses,
                                       counts=counts, rng=key)
  sizes = [z[0].size for z in leaves]
  parts = jnp.split(flat, [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)])
  direction = jax.tree.unflatten(
      treedef, [p.reshape(z.shape[1:]) for p, z in zip(parts, leaves)])
  if axis:  # back to this device's rows
    rows = jax.tree.leaves(direction)[0].shape[0] // spec.num_devices()
    direction = jax.tree.map(
        lambda d: jax.lax.dynamic_slice_in_dim(
            d, jax.lax.axis_index(axis) * rows, rows), direction)
  return direction, state
