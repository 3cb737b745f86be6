"""The factored path: Gram-based and columnwise aggregators without `[K, P]`.

For a Gram-based aggregator (`Aggregator.from_gram`) the Gram matrix of the
rows `w_k grad L_k` comes from the shared dense layers' inputs `A` and
per-task output gradients `D_k` (`mtl_jax.gradients.gram`, for each layer
where that costs less than forming its rows; other shared leaves keep their
per-task gradients), and the direction from the same factors: the `[K, P]`
matrix is never formed. A columnwise aggregator (GradDrop) gets each
kernel's rows `A^T D_k` formed from the factors, in blocks.

The factors come from one of two differentiations of the model:

* **two-stage** (a model with `encode`/`decode`, called without task
  presence, that sows no auxiliary loss): the trunk's VJP, one VJP through
  the heads whose input perturbations' cotangents are every task's feature
  gradient, then the batched VJP through the trunk only. Through the whole
  model as a black box each task's cotangent would also go back through the
  other `K - 1` heads: `K^2` head passes;
* **one-stage** (every other model): one VJP of the whole model, then the
  batched VJP of every task.

`jacobian="auto"` factors a layer where the cost model says so,
`"factored"` every shared dense layer.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.gradients import forward as forward_lib
from mtl_jax.gradients import gram as gram_lib
from mtl_jax.gradients import jacobian as jacobian_lib
from mtl_jax.gradients import spec as spec_lib
from mtl_jax.gradients.spec import Batch, Gradients, GradientSpec, MethodStates
from mtl_jax.gradients.spec import StepKeys


class Factors(NamedTuple):
  """The per-task gradients of one forward pass, factored.

  Attributes:
    sums, counts: `[K]` this device's loss sums, global label counts.
    denom: `[K]` `max(counts, 1)`.
    aux: this device's auxiliary losses.
    jac: the per-task gradients of the shared params.
    others_grads: `weights -> grads` of everything outside "shared" (global),
      plus under "shared" the auxiliary losses' gradient if there are any.
    features: the kept features (`Forward.kept_features`).
  """

  sums: jax.Array
  counts: jax.Array
  denom: jax.Array
  aux: dict[str, jax.Array]
  jac: gram_lib.FactoredJacobian
  others_grads: Callable[[jax.Array], dict[str, Any]]
  features: Any = None


def gradients(spec: GradientSpec, params: Any, batch: Batch,
             states: MethodStates, keys: StepKeys) -> Gradients:
  """The aggregated direction from the factored per-task gradients."""
  aggregator = spec.aggregator
  sites = gram_lib.find_dense_sites(
      lambda: spec.model.predict(params, batch, keys.dropout), params,
      num_tasks=spec.num_tasks, num_devices=spec.num_devices(),
      # A columnwise aggregator gets every row: formed from the factors
      # (same multiply-adds as the VJP's weight gradients), whatever the
      # Gram cost.
      every=spec.jacobian == "factored" or aggregator.columnwise)
  eps = gram_lib.perturbations(sites)
  factors = None
  if spec.model.encode_decode and not spec.model.pass_task_presence:
    factors = two_stage_factors(spec, params, batch, sites, eps, keys.dropout)
  if factors is None:
    factors = one_stage_factors(spec, params, batch, sites, eps, keys.dropout)
  losses = spec.psum(factors.sums) / factors.denom  # [K] global task losses
  counts = factors.counts
  weights, weighting_state = spec.weigh(losses, counts, states.weighting,
                                        keys.weighting)
  grads = factors.others_grads(weights)
  present = counts > 0
  gram_matrix = None
  if aggregator.columnwise:
    shared = _columnwise_direction(spec, factors.jac, weights, present,
                                   states.aggregation, losses, counts,
                                   keys.aggregator)
    aggregation_state = states.aggregation  # columnwise: stateless
  else:
    shared, aggregation_state, gram_matrix = _gram_direction(
        spec, factors.jac, weights, present, states.aggregation, losses,
        counts, keys.aggregator)
  shared = jax.tree.map(lambda g, p: g.astype(p.dtype), shared,
                        params["shared"])
  grads["shared"] = spec_lib.add_trees(shared, grads.get("shared"))
  return Gradients(grads, losses, counts, weights,
                   MethodStates(weighting_state, aggregation_state),
                   spec.global_aux(factors.aux), factors.features,
                   gram_matrix)


def _gram_direction(spec, jac, weights, present, state, losses, counts, key):
  """`sum_k c_k w_k grad L_k` with `c` from the aggregator's `from_gram`
  (which sees the Gram matrix of the rows `w_k grad L_k`, as on the
  Jacobian path), the new state and that Gram matrix (of the rows scaled by
  a common power of two)."""
  gram_matrix, scale = gram_lib.scaled_gram(jac, weights, present,
                                            spec.axis_name, spec.chunk_size)
  alpha, state = spec.aggregator.from_gram(gram_matrix, scale, state,
                                           losses=losses, counts=counts,
                                           rng=key)
  coeffs = jnp.where(present, alpha * weights, 0.0)
  return spec.psum(gram_lib.combine(jac, coeffs)), state, gram_matrix


def _columnwise_direction(spec, jac, weights, present, state, losses, counts,
                          key):
  """Each leaf's rows formed from the factors, in blocks of ~chunk_size
  tasks' memory (one block per leaf without chunks), with the key of the
  leaf and the draws of the block's coordinates (as the Jacobian path's
  `aggregate_rows` on the full rows)."""
  def direction(i, rows, offset):
    return spec.aggregator.update(
        rows, state, losses=losses, counts=counts,
        rng=jax.random.fold_in(key, i), column_offset=offset)[0]

  return gram_lib.columnwise_blocks(
      jac, jnp.where(present, weights, 0.0), direction,
      spec.chunk_size or spec.num_tasks, spec.psum)


def two_stage_factors(spec: GradientSpec, params: Any, batch: Batch, sites,
                      eps, key: jax.Array) -> Factors | None:
  """Stage 1: the trunk's VJP, one per view; stage 2: one VJP through the
  heads, whose input perturbations' cotangents are the per-task feature
  gradients; stage 3: per view, the batched VJP of that view's trunk pass
  over the tasks that read it only (K trunk backward passes in all, not K
  per view). None if the model sows auxiliary losses (found at trace time;
  the one-stage route handles them)."""
  model = spec.model
  encoded = [_encode_view(model, params, batch, key, sites, eps, view, i,
                          len(model.view_names()))
             for i, view in enumerate(model.view_names())]
  features = {e.view: e.features for e in encoded}
  encode_aux = {k: v for e in encoded for k, v in e.aux.items()}
  others = {k: v for k, v in params.items() if k != "shared"}
  views = model.task_views()

  def heads(others, head_eps):
    predictions, aux = model.decode({**others, "shared": params["shared"]},
                                    features, batch, key, head_eps=head_eps)
    sums, counts = model.task_sums(predictions, batch, features)
    return sums, (counts, aux)

  head_eps = {name: jnp.zeros_like(features[views[name]])
              for name in model.tasks.names}
  sums, heads_vjp, (counts, heads_aux) = jax.vjp(heads, others, head_eps,
                                                 has_aux=True)
  if encode_aux or heads_aux:
    return None
  counts = spec.psum(counts)
  denom = jnp.maximum(counts, 1.0)
  # Head k feeds loss k only: its input's cotangent is grad_z L_k.
  head_cts, z_cts = heads_vjp(1.0 / denom)
  shared_cts, eps_cts, inputs = _trunk_cotangents(spec, encoded, z_cts, views)
  jac = gram_lib.factor(sites, inputs, eps_cts, shared_cts)

  def others_grads(weights):
    # Task k's head params get w_k grad L_k (each sees one loss only).
    scaled = {name: jax.tree.map(lambda g, w=weights[k]: g * w,
                                 head_cts["tasks"][name])
              for k, name in enumerate(model.tasks.names)}
    return spec.psum({**head_cts, "tasks": scaled})

  return Factors(sums, counts, denom, {}, jac, others_grads,
                 model.kept_features(features))


class _Encoded(NamedTuple):
  """One view's trunk pass: its features, VJP, recorded dense inputs and
  auxiliary losses."""

  view: str
  features: jax.Array
  vjp: Callable[..., Any]
  inputs: dict[str, list[jax.Array]]
  aux: dict[str, jax.Array]


def _encode_view(model, params, batch, key, sites, eps, view: str,
                 index: int, num_views: int) -> _Encoded:
  """The trunk on one view, with the perturbations of that view's calls
  (each view's pass calls every site equally often, in view order)."""
  def view_eps(calls):
    per_view, rest = divmod(len(calls), num_views)
    if rest:
      raise ValueError(f"a shared dense layer is called {len(calls)} times "
                       f"over {num_views} views: every view's trunk pass "
                       "must call it equally often")
    return calls[index * per_view:(index + 1) * per_view]

  def encode(shared, eps):
    inputs: dict[str, list[jax.Array]] = {}
    with gram_lib.intercepting(sites, eps, inputs):
      features, aux = model.encode({**params, "shared": shared}, batch, key,
                                   views=(view,))
    return features[view], (inputs, aux)

  features, vjp, (inputs, aux) = jax.vjp(
      encode, params["shared"], {k: view_eps(v) for k, v in eps.items()},
      has_aux=True)
  return _Encoded(view, features, vjp, inputs, aux)


def _trunk_cotangents(spec: GradientSpec, encoded: list[_Encoded],
                      z_cts: dict[str, jax.Array], views: dict[str, str]):
  """`([K, ...] shared cotangents, {site: [[K, ...] per call]}, {site:
  [inputs per call]})`: each view's batched VJP over its own tasks, placed
  in the task rows (zero rows for the tasks of other views)."""
  names = spec.model.tasks.names
  num_tasks = len(names)
  shared_cts, eps_cts, inputs = None, {}, {}
  for e in encoded:
    rows = [k for k, name in enumerate(names) if views[name] == e.view]
    if not rows:  # a view read by no task (never: views come from tasks)
      continue
    z = jnp.stack([z_cts[names[k]] for k in rows])  # [K_v, B, ...]
    view_shared, view_eps = spec.batched_vjp(e.vjp, z)
    index = jnp.asarray(rows)

    def place(x):  # [K_v, ...] -> [K, ...]
      return jnp.zeros((num_tasks,) + x.shape[1:], x.dtype).at[index].set(x)

    placed = jax.tree.map(place, view_shared)
    shared_cts = spec_lib.add_trees(placed, shared_cts)
    for key, calls in view_eps.items():
      eps_cts.setdefault(key, []).extend(place(c) for c in calls)
      inputs.setdefault(key, []).extend(e.inputs.get(key, []))
  return shared_cts, eps_cts, inputs


def one_stage_factors(spec: GradientSpec, params: Any, batch: Batch, sites,
                      eps, key: jax.Array) -> Factors:
  """One VJP of the whole model, then the batched VJP of every task."""
  def sums_fn(p, eps):
    inputs: dict[str, list[jax.Array]] = {}
    with gram_lib.intercepting(sites, eps, inputs):
      out, (counts, aux, features) = spec.model.loss_sums(p, batch, key)
    return out, (counts, aux, features, inputs)

  (sums, _), vjp_fn, (counts, aux, features, inputs) = jax.vjp(
      sums_fn, params, eps, has_aux=True)
  counts = spec.psum(counts)
  denom = jnp.maximum(counts, 1.0)
  # The per-task VJP of each task's global mean loss, from one forward pass.
  param_cts, eps_cts = spec.batched_vjp(
      lambda c: vjp_fn((c, jnp.zeros((), jnp.float32))),
      spec_lib.unit_cotangents(denom))
  jac = gram_lib.factor(sites, inputs, eps_cts, param_cts["shared"])
  params_vjp = lambda ct: (vjp_fn(ct)[0],)
  return Factors(
      sums, counts, denom, aux, jac,
      lambda weights: jacobian_lib.others_and_aux(spec, params_vjp, weights,
                                                  denom, bool(aux)),
      features)
