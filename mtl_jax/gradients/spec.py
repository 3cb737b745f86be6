"""What every gradient path reads, and what it returns.

A gradient path is a function

    path(spec, params, batch, states, keys) -> Gradients

with `spec` a `GradientSpec` (fixed when the step is built), `params` the
model params, `batch` this device's rows, `states` the weighting and
aggregation states and `keys` the step's random keys. It calls the weighting
method (which needs the global task losses, and for GradNorm gradient norms
that only the path can compute) and returns the global gradient of every
param plus the new method states. The train step
(`mtl_jax.training.step`) picks one path when it is built and applies the
optimizer update to what the path returns; the paths do not know about the
optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mtl_jax.aggregation.base import Aggregator
from mtl_jax.gradients.forward import Forward
from mtl_jax.weighting import Weighting

Batch = Mapping[str, Any]


class StepKeys(NamedTuple):
  """The step's keys: `fold_in(state.rng, step)` then 1 (weighting), 2
  (aggregator) and 3 (pretext views), identical on every device (the views
  fold in each row's global index instead); dropout draws per device under
  pmap (the device index folded in)."""

  weighting: jax.Array
  aggregator: jax.Array
  dropout: jax.Array
  pretext: jax.Array | None = None


class MethodStates(NamedTuple):
  weighting: Any
  aggregation: Any


class Gradients(NamedTuple):
  """What a path returns.

  Attributes:
    grads: the global gradient (a pytree shaped like the params): the
      aggregated direction under "shared" (plus the auxiliary losses'
      gradient), `w_k grad L_k` for task k's own params.
    losses, counts, weights: `[K]` global task losses, label counts, and the
      weighting's weights.
    states: the new weighting and aggregation states.
    aux: `{name: global auxiliary loss}` (the mean over devices under pmap).
    features: this device's stop-gradient `{view: features}` that the
      clustering tasks keep (`Forward.kept_features`), else None.
    gram: the `[K, K]` Gram matrix of the per-task gradients of the shared
      params where the path forms one anyway (the factored path: of the
      rows `w_k grad L_k`, up to a common scale; the Jacobian path: of the
      unweighted gradients), else None. Unused, it costs nothing under jit.
  """

  grads: Any
  losses: jax.Array
  counts: jax.Array
  weights: jax.Array
  states: MethodStates
  aux: dict[str, jax.Array]
  features: Any = None
  gram: Any = None


@dataclasses.dataclass(frozen=True)
class GradientSpec:
  """Everything a gradient path reads besides the step's arguments.

  Attributes:
    model: how to call the model (`Forward`).
    weighting: the loss-level weighting method.
    aggregator: the gradient-level method, or None.
    chunk_size: map per-task backward passes (and the factored Gram products)
      over chunks of this many tasks; None: all tasks in one vmap.
    jacobian: "auto", "factored" or "full" (the factored path's choice of
      layers; see `mtl_jax.gradients.factored`).
    grad_norm_path: the last shared layer inside `params["shared"]`, for
      weightings that need per-task gradient norms.
    axis_name: the pmap axis, or None under jit.
  """

  model: Forward
  weighting: Weighting
  aggregator: Aggregator | None = None
  chunk_size: int | None = None
  jacobian: str = "auto"
  grad_norm_path: tuple[str, ...] = ("features",)
  axis_name: str | None = None

  @property
  def num_tasks(self) -> int:
    return len(self.model.tasks)

  @property
  def needs_norms(self) -> bool:
    return "grad_norms" in self.weighting.needs

  def psum(self, x):
    return jax.lax.psum(x, self.axis_name) if self.axis_name else x

  def pmean(self, x):
    return jax.lax.pmean(x, self.axis_name) if self.axis_name else x

  def num_devices(self) -> int:
    return jax.lax.axis_size(self.axis_name) if self.axis_name else 1

  def aux_scale(self) -> jax.Array:
    """Auxiliary losses are means over each device's rows: their global
    value, and gradient, is the mean over devices."""
    return jnp.asarray(1.0 / self.num_devices(), jnp.float32)

  def global_losses(self, sums: jax.Array, counts: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(losses [K], counts [K], denom [K])` over the global batch: the
    task loss is `psum(sum) / max(psum(count), 1)`, never a mean of
    per-device means."""
    counts = self.psum(counts)
    denom = jnp.maximum(counts, 1.0)
    return self.psum(sums) / denom, counts, denom

  def weigh(self, losses: jax.Array, counts: jax.Array, state: Any,
            key: jax.Array, grad_norms: jax.Array | None = None
            ) -> tuple[jax.Array, Any]:
    """The weighting's `[K]` weights (gradients stopped) and new state."""
    kwargs = {} if grad_norms is None else {"grad_norms": grad_norms}
    weights, state = self.weighting.update(losses, counts, state, rng=key,
                                           **kwargs)
    return jax.lax.stop_gradient(weights), state

  def global_aux(self, aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: self.pmean(value) for name, value in aux.items()}

  def batched_vjp(self, vjp_fn: Callable, cotangents: jax.Array) -> Any:
    return batched_vjp(vjp_fn, cotangents, self.chunk_size)

  def grad_norms(self, per_task_shared: Any) -> jax.Array:
    """`[K]` norms of each task's gradient w.r.t. the last shared layer,
    from per-task gradients of the shared params (`[K, ...]` leaves; only
    the layer at `grad_norm_path` is read, XLA prunes the rest)."""
    last = get_path(per_task_shared, self.grad_norm_path, "grad_norm_path")
    return row_norms(self.psum(last))


def batched_vjp(vjp_fn: Callable, cotangents: Any,
                chunk_size: int | None = None) -> Any:
  """`vjp_fn` applied to each row of `cotangents` (`[K, ...]` leaves),
  stacked.

  One vmap'd VJP by default; with `chunk_size`, `lax.map` over chunks of that
  many tasks, so only `chunk_size` backward passes are live at a time.
  """
  if chunk_size is None or chunk_size >= jax.tree.leaves(cotangents)[0].shape[0]:
    return jax.vmap(vjp_fn)(cotangents)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  return jax.lax.map(vjp_fn, cotangents, batch_size=chunk_size)


def unit_cotangents(denom: jax.Array) -> jax.Array:
  """`[K, K]`: row k is the cotangent of this device's share of task k's
  global mean loss (the identity scaled by `1 / denom_k`; a psum over
  devices of the VJPs gives the global gradient)."""
  return jnp.diag(1.0 / denom)


def scale_rows(tree: Any, weights: jax.Array) -> Any:
  """`weights[k] * x[k]` for every `[K, ...]` leaf."""
  return jax.tree.map(
      lambda g: g * weights.reshape((-1,) + (1,) * (g.ndim - 1)), tree)


def get_path(tree: Mapping[str, Any], path: Sequence[str], what: str) -> Any:
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(f"{what}: no entry {'/'.join(path)!r} in the shared "
                       f"params (keys: {sorted(tree)})")
    node = node[key]
  return node


def row_norms(tree: Any) -> jax.Array:
  """`[K]` L2 norms of a pytree of `[K, ...]` leaves."""
  sq = sum(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1)
           for x in jax.tree.leaves(tree))
  return jnp.sqrt(sq)


def add_trees(a: Any, b: Any | None) -> Any:
  """`a + b` leaf by leaf; `a` when `b` is None."""
  return a if b is None else jax.tree.map(jnp.add, a, b)
