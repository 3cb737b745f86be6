"""The per-task Jacobian path: the `[K, P]` gradients of the shared params.

One forward pass, then one batched (vmap'd) VJP over the task axis gives
each task's gradient of the shared params; the rows are scaled by the
weights, flattened and handed to `aggregator.update` (a columnwise method,
GradDrop, gets them leaf by leaf). Task params get `sum_k w_k grad L_k`,
i.e. each head its own task's weighted gradient. This is the reference the
factored path is tested against, and the route for weightings that need
gradient norms.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from mtl_jax.aggregation.base import flatten_task_grads
from mtl_jax.gradients import spec as spec_lib
from mtl_jax.gradients.spec import Batch, Gradients, GradientSpec, MethodStates
from mtl_jax.gradients.spec import StepKeys


def gradients(spec: GradientSpec, params: Any, batch: Batch,
             states: MethodStates, keys: StepKeys) -> Gradients:
  """The aggregated direction from the `[K, P]` rows `w_k grad L_k`."""
  (sums, _), vjp_fn, (counts, aux, features) = jax.vjp(
      lambda p: spec.model.loss_sums(p, batch, keys.dropout), params,
      has_aux=True)
  losses, counts, denom = spec.global_losses(sums, counts)
  (per_task,) = spec.batched_vjp(
      lambda c: vjp_fn((c, jnp.zeros((), jnp.float32))),
      spec_lib.unit_cotangents(denom))  # {"shared": [K, ...], ...}
  grad_norms = (spec.grad_norms(per_task["shared"]) if spec.needs_norms
                else None)
  weights, weighting_state = spec.weigh(losses, counts, states.weighting,
                                        keys.weighting, grad_norms)
  shared_rows = spec.psum(per_task["shared"])  # global, unweighted
  rows = spec_lib.scale_rows(shared_rows, weights)
  direction, aggregation_state = aggregate_rows(
      spec, rows, states.aggregation, losses, counts, keys.aggregator)
  grads = others_and_aux(spec, vjp_fn, weights, denom, bool(aux))
  grads["shared"] = spec_lib.add_trees(direction, grads.get("shared"))
  return Gradients(grads, losses, counts, weights,
                   MethodStates(weighting_state, aggregation_state),
                   spec.global_aux(aux), features,
                   task_gram(shared_rows))


def task_gram(per_task: Any) -> jax.Array:
  """`[K, K]` Gram matrix of per-task gradients (leaves `[K, ...]`)."""
  return sum(jnp.einsum("kp,jp->kj", *(leaf.reshape(leaf.shape[0], -1),) * 2,
                        precision=jax.lax.Precision.HIGHEST)
             for leaf in jax.tree.leaves(per_task))


def aggregate_rows(spec: GradientSpec, rows: Any, state: Any,
                   losses: jax.Array, counts: jax.Array, key: jax.Array
                   ) -> tuple[Any, Any]:
  """The direction (shaped like `params["shared"]`) from the rows `[K, ...]`.

  A columnwise aggregator is applied to each leaf alone (no `[K, P]`
  matrix) with its own key `fold_in(key, i)` for leaf i, read in the leaf's
  own layout, so this path and the factored one draw the same uniforms for
  the same coordinate.
  """
  aggregator = spec.aggregator
  if aggregator.columnwise:
    leaves, treedef = jax.tree.flatten(rows)
    out = []
    for i, leaf in enumerate(leaves):
      d, state = aggregator.update(
          leaf.reshape(leaf.shape[0], -1), state, losses=losses,
          counts=counts, rng=jax.random.fold_in(key, i))
      out.append(d.reshape(leaf.shape[1:]))
    return jax.tree.unflatten(treedef, out), state
  matrix, unflatten = flatten_task_grads(rows)  # [K, P]
  direction, state = aggregator.update(matrix, state, losses=losses,
                                       counts=counts, rng=key)
  return unflatten(direction), state


def others_and_aux(spec: GradientSpec, vjp_fn: Callable, weights: jax.Array,
                   denom: jax.Array, has_aux: bool) -> dict[str, Any]:
  """Global gradients of everything outside "shared" (`sum_k w_k grad L_k`
  plus the auxiliary losses'), and under "shared" the auxiliary losses'
  gradient if the model has any (else no "shared" entry).

  `vjp_fn` is the VJP of `params -> (loss_sums [K], aux total)`. Task
  params only see their own task's loss, so the weighted sum gives each head
  exactly its task's weighted gradient; without auxiliary losses XLA prunes
  the unused backward pass through the shared layers.
  """
  (grads,) = vjp_fn((weights / denom, spec.aux_scale()))
  grads = dict(grads)
  if has_aux:
    (aux_grads,) = vjp_fn((jnp.zeros_like(weights), spec.aux_scale()))
    grads["shared"] = aux_grads["shared"]
  else:
    del grads["shared"]
  return spec.psum(grads)
