"""The pure multi-task train step and eval step.

`make_train_step` returns `step(state, batch) -> (state, metrics)`:

1. one forward pass gives every task's prediction;
2. each task's masked loss sum and label count are reduced over the GLOBAL batch
   (under `jax.jit` with a sharded batch the sums already are global; under
   `jax.pmap` they are `psum`-ed over `axis_name` first), and the task loss is
   `sum / max(count, 1)`, never a mean of per-device means;
3. the weighting method turns the `[K]` losses and counts into `[K]` weights
   (gradients do not flow through them);
4. the gradient:
   * without an aggregator, one backward pass of `sum_k w_k L_k`;
   * with an aggregator, one batched (vmap'd) VJP over the task axis gives the
     per-task gradients `grad(w_k L_k)` of the shared params `[K, P]` from the
     same forward pass; the aggregator turns them into one direction; task
     params get their own task's gradient. With `rep_grad=True` the per-task
     gradients are taken w.r.t. the shared REPRESENTATION instead (cheap: heads
     only), aggregated there, and sent through the trunk in one backward pass
     (MGDA-UB style). `chunk_size` bounds the memory of the batched VJP by
     mapping over chunks of tasks;
5. an optax update is applied; methods that learn from the loss change (FAMO)
   see the losses of the updated model on the same batch.

A task with no label in the batch (count 0) has loss 0 and zero gradient, and
neither the weighting nor the aggregator lets it move any state.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mtl_jax import metrics as metrics_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax.aggregation.base import Aggregator, flatten_task_grads
from mtl_jax.models import hard_sharing
from mtl_jax.training import gram as gram_lib
from mtl_jax.training.state import TrainState
from mtl_jax.weighting import Weighting

Batch = Mapping[str, Any]
JACOBIAN_MODES = ("auto", "factored", "full")

# The trunks name their last shared layer "features" (GradNorm's W).
DEFAULT_GRAD_NORM_PATH = ("features",)
# Models report auxiliary losses (penalties, adversarial losses) by sowing
# scalars into this collection; the train step adds them to the objective.
AUX_LOSSES = "aux_losses"


def _flatten_aux(collection: Mapping[str, Any]) -> dict[str, jax.Array]:
  """`{"path/name": scalar}` from a sown collection (sow keeps tuples)."""
  out = {}
  for path, value in jax.tree_util.tree_leaves_with_path(collection):
    keys = [getattr(k, "key", None) for k in path]
    name = "/".join(str(k) for k in keys if isinstance(k, str))
    out[name] = out.get(name, 0.0) + jnp.asarray(value, jnp.float32)
  return out


def _batch_size(batch: Batch) -> int:
  return jax.tree.leaves(batch["inputs"])[0].shape[0]


def batched_vjp(vjp_fn: Callable, cotangents: jax.Array,
                chunk_size: int | None = None) -> Any:
  """`vjp_fn` applied to each row of `cotangents [K, ...]`, stacked.

  One vmap'd VJP by default; with `chunk_size`, `lax.map` over chunks of that
  many tasks, so only `chunk_size` backward passes are live at a time.
  """
  if chunk_size is None or chunk_size >= cotangents.shape[0]:
    return jax.vmap(vjp_fn)(cotangents)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  return jax.lax.map(vjp_fn, cotangents, batch_size=chunk_size)


def _get_path(tree: Mapping[str, Any], path: Sequence[str], what: str) -> Any:
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(f"{what}: no entry {'/'.join(path)!r} in the shared "
                       f"params (keys: {sorted(tree)})")
    node = node[key]
  return node


def _row_norms(tree: Any) -> jax.Array:
  """`[K]` L2 norms of a pytree of `[K, ...]` leaves."""
  sq = sum(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1)
           for x in jax.tree.leaves(tree))
  return jnp.sqrt(sq)


def two_stage_heads(apply_fn: Callable[..., Any],
                    pass_task_presence: bool = False) -> bool:
  """Whether the factored step differentiates the model in two stages (heads
  once, then the trunk per task): `apply_fn` is a `HardSharingModel`'s own
  `apply` (exact type: a subclass may route features differently) and the
  model is not given task presence."""
  model = getattr(apply_fn, "__self__", None)
  return (type(model) is hard_sharing.HardSharingModel  # pylint: disable=unidiomatic-typecheck
          and not pass_task_presence)


def check_state_matches(state: TrainState,
                        optimizer: optax.GradientTransformation,
                        weighting: Weighting, aggregator: Aggregator | None,
                        num_tasks: int) -> None:
  """Raises if `state` was not created with this step's methods.

  The weighting, the aggregator and the optimizer are given both to
  `create_train_state` and to `make_train_step`; a state made with other ones
  would otherwise fail deep inside a method (or, for two stateless methods,
  run silently with the wrong one's state). Compares pytree structures and
  leaf shapes, abstractly (`jax.eval_shape`), when the step is traced.

  Raises:
    ValueError: naming the part of the state that does not match.
  """
  expected = {
      "weighting_state": (state.weighting_state,
                          lambda: weighting.init(num_tasks), "weighting"),
      "aggregation_state": (state.aggregation_state,
                            lambda: aggregator.init(num_tasks)
                            if aggregator else (), "aggregator"),
      "opt_state": (state.opt_state, lambda: optimizer.init(state.params),
                    "optimizer"),
  }
  def layout(tree):
    return (jax.tree.structure(tree),
            [tuple(jnp.shape(x)) for x in jax.tree.leaves(tree)])

  for field, (got, init, what) in expected.items():
    want = layout(jax.eval_shape(init))
    if layout(got) != want:
      raise ValueError(
          f"state.{field} does not match the step's {what}: the state was "
          f"created with another {what} (or another number of tasks); pass "
          f"the same weighting, aggregator and optimizer to "
          f"create_train_state and make_train_step (state: {layout(got)}, "
          f"step: {want})")


def make_train_step(apply_fn: Callable[..., Any], tasks: tasks_lib.TaskSet,
                    optimizer: optax.GradientTransformation,
                    weighting: Weighting, *,
                    aggregator: Aggregator | None = None,
                    rep_grad: bool = False,
                    chunk_size: int | None = None,
                    jacobian: str = "auto",
                    grad_norm_path: Sequence[str] = DEFAULT_GRAD_NORM_PATH,
                    pass_task_presence: bool = False,
                    schedule: optax.Schedule | None = None,
                    axis_name: str | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Builds the pure train step.

  Args:
    apply_fn: a linen `model.apply`, called as
      `apply_fn({"params": p}, inputs, train=True, rngs={"dropout": key})` and
      returning `{task: prediction}`. With `rep_grad`, the model must also have
      `encode` (inputs -> shared features) and `decode` (features -> `{task:
      prediction}`) methods, called through `method=`.
    tasks: the tasks, in the order of the weighting's task axis.
    optimizer: the optax transformation for all params.
    weighting: the loss-level weighting method.
    aggregator: a gradient-level method acting on the per-task gradients of
      `params["shared"]`; None for a plain weighted sum.
    rep_grad: aggregate gradients w.r.t. the shared representation instead of
      the shared params (needs an aggregator with `rep_grad_ok`).
    chunk_size: map the per-task VJP over chunks of this many tasks (the
      factored Gram products are bounded to the same memory); None: one vmap
      over all tasks. Besides bounding memory it can be faster for many
      tasks (measurements in docs/benchmarks.md).
    jacobian: how an aggregator gets the per-task gradients of the shared
      params. "auto": factored (`mtl_jax.training.gram`): for a Gram-based
      aggregator (`aggregator.from_gram`) the Gram matrix comes from the
      shared dense layers' inputs and per-task output gradients (for each
      layer where that costs less than forming its rows; other leaves keep
      their per-task gradients) and the direction from the same factors,
      never forming the `[K, P]` matrix; a columnwise aggregator (GradDrop)
      gets each kernel's rows `A^T D_k` from the same factors, leaf by leaf
      (with `chunk_size`, in blocks of input rows of the same memory).
      A `HardSharingModel` is differentiated in two stages (one VJP through
      the heads gives every task's feature gradient; the batched VJP runs
      through the trunk only) unless it sows auxiliary losses. "factored":
      the same, factoring every shared dense layer whatever the cost.
      "full": the `[K, P]` matrix and `aggregator.update` (also what the
      other modes do with `rep_grad`, and with weightings that need gradient
      norms). All give the same update up to float rounding.
    grad_norm_path: path of the last shared layer inside `params["shared"]`,
      for weightings that need per-task gradient norms (GradNorm).
    pass_task_presence: call the model with `task_presence=[B, K]` (1 where
      the example is labelled for the task), for models that use it (the
      adversarial task discriminator).
    schedule: the learning-rate schedule, only to report `learning_rate`.
    axis_name: the `pmap` axis to reduce over; None under `jit` (sharded or not).

  Returns:
    `step(state, batch) -> (new_state, metrics)`, with metrics `loss` (the
    weighted objective plus auxiliary losses), `grad_norm`, `aux/<name>` for
    every auxiliary loss the model sows, and `<task>/loss`, `<task>/count`,
    `<task>/weight` for every task.

  Raises:
    ValueError: rep_grad without an aggregator, or with one that is not valid
      on representation gradients; an unknown jacobian mode; chunk_size < 1.
  """
  if rep_grad and aggregator is None:
    raise ValueError("rep_grad=True needs a gradient aggregator")
  if rep_grad and not aggregator.rep_grad_ok:
    raise ValueError("this aggregator is not valid on representation "
                     "gradients; use rep_grad=False")
  if jacobian not in JACOBIAN_MODES:
    raise ValueError(f"unknown jacobian mode {jacobian!r}; valid: "
                     f"{', '.join(JACOBIAN_MODES)}")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1 (or None: all tasks in one "
                     f"vmap), got {chunk_size}")
  needs_norms = "grad_norms" in weighting.needs
  num_tasks = len(tasks)
  factored = (jacobian != "full" and aggregator is not None
              and (aggregator.from_gram is not None or aggregator.columnwise)
              and not rep_grad and not needs_norms)

  def psum(x):
    return jax.lax.psum(x, axis_name) if axis_name else x

  def pmean(x):
    return jax.lax.pmean(x, axis_name) if axis_name else x

  def model_kwargs(batch):
    if not pass_task_presence:
      return {}
    return {"task_presence": tasks_lib.task_presence(batch["masks"],
                                                      tasks.names)}  # [B, K]

  def forward(params, inputs, batch, key):
    return apply_fn({"params": params}, inputs, train=True,
                    rngs={"dropout": key}, mutable=[AUX_LOSSES],
                    **model_kwargs(batch))

  def loss_sums_fn(params, inputs, batch, key):
    """`((loss_sums [K], aux_total), (counts [K], aux_losses))`."""
    preds, collections = forward(params, inputs, batch, key)
    tasks_lib.check_predictions(tasks, preds, _batch_size(batch))
    sums, counts = tasks_lib.task_loss_sums(tasks, preds, batch)
    aux = _flatten_aux(collections.get(AUX_LOSSES, {}))
    aux_total = sum(aux.values(), jnp.zeros((), jnp.float32))
    return (sums, aux_total), (counts, aux)

  def finish(state, batch, grads, weights, losses, counts, denom,
             weighting_state, aggregation_state, aux_total, aux, dropout_key):
    """The optimizer update, the post-update weighting state and the metrics."""
    params = state.params
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if weighting.post_update is not None:
      (new_sums, _), _ = loss_sums_fn(new_params, batch["inputs"], batch,
                                      dropout_key)
      weighting_state = weighting.post_update(psum(new_sums) / denom, counts,
                                              weighting_state)
    new_state = state.replace(step=state.step + 1, params=new_params,
                              opt_state=opt_state,
                              weighting_state=weighting_state,
                              aggregation_state=aggregation_state)
    metrics = {"loss": jnp.sum(weights * losses) + pmean(aux_total),
               "grad_norm": optax.tree.norm(grads)}
    for name, value in aux.items():
      metrics[f"aux/{name}"] = pmean(value)
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    for k, name in enumerate(tasks.names):
      metrics[f"{name}/loss"] = losses[k]
      metrics[f"{name}/count"] = counts[k]
      metrics[f"{name}/weight"] = weights[k]
    return new_state, metrics


  def others_and_aux(vjp_fn, weights, denom, aux, aux_scale):
    """Global grads of everything outside "shared" (`sum_k w_k grad L_k`
    plus the auxiliary losses'), and under "shared" the auxiliary losses'
    gradient if there are any (else the entry is absent).

    Task params only see their own task's loss, so the weighted sum gives each
    head exactly its task's weighted gradient; XLA prunes the unused backward
    pass through the shared layers when there is no auxiliary loss.
    """
    cotangent = (weights / denom, jnp.asarray(aux_scale))
    grads = dict(vjp_fn(cotangent)[0])
    if aux:
      grads["shared"] = vjp_fn(
          (jnp.zeros_like(weights), jnp.asarray(aux_scale)))[0]["shared"]
    else:
      del grads["shared"]
    return psum(grads)

  def columnwise_update(shared, agg_state, losses, counts, key):
    """A columnwise aggregator applied to each shared leaf `[K, ...]` alone
    (no `[K, P]` matrix), with its own key per leaf: the full path's (the
    factored path forms the rows in blocks, `gram.columnwise_blocks`).
    Leaves are read in their own layout, so both Jacobian paths draw the
    same uniforms for the same coordinate."""
    leaves, treedef = jax.tree.flatten(shared)
    out = []
    for i, leaf in enumerate(leaves):
      d, agg_state = aggregator.update(
          leaf.reshape(leaf.shape[0], -1), agg_state, losses=losses,
          counts=counts, rng=jax.random.fold_in(key, i))
      out.append(d.reshape(leaf.shape[1:]))
    return jax.tree.unflatten(treedef, out), agg_state

  # A hard-sharing model (trunk, then one head per task on its features) is
  # differentiated in two stages by the factored step: one backward pass
  # through the heads gives every task's feature gradient, then the batched
  # VJP runs through the trunk only. Through the whole model as a black box,
  # each task's cotangent would also go back through the other K - 1 heads:
  # K^2 head passes, and a [K, B, D] sum per head.
  split_heads = two_stage_heads(apply_fn, pass_task_presence)

  def head_inputs_intercepting(eps):
    """Adds `eps[task]` to the input of each task's head (module
    `tasks/<task>` of a HardSharingModel)."""
    def interceptor(next_fun, args, kwargs, context):
      path = tuple(context.module.path)
      if (context.method_name == "__call__" and len(path) == 2
          and path[0] == "tasks" and path[1] in eps):
        args = (args[0] + eps[path[1]],) + tuple(args[1:])
      return next_fun(*args, **kwargs)
    return nn.intercept_methods(interceptor)

  def split_factors(params, batch, sites, eps, dropout_key):
    """Stage 1: the trunk's VJP; stage 2: one VJP through the heads, whose
    input perturbations' cotangents are the per-task feature gradients;
    stage 3: the batched VJP of the trunk. Returns what the black-box path
    does, or None if the model sows auxiliary losses."""
    def encode(shared, eps):
      inputs: dict[str, list[jax.Array]] = {}
      with gram_lib.intercepting(sites, eps, inputs):
        z, collections = apply_fn(
            {"params": {**params, "shared": shared}}, batch["inputs"],
            train=True, rngs={"dropout": dropout_key}, method="encode",
            mutable=[AUX_LOSSES])
      return z, (inputs, collections)

    z, encode_vjp, (inputs, enc_aux) = jax.vjp(encode, params["shared"], eps,
                                               has_aux=True)
    others = {k: v for k, v in params.items() if k != "shared"}

    def heads(others, head_eps):
      with head_inputs_intercepting(head_eps):
        preds, collections = apply_fn(
            {"params": {**others, "shared": params["shared"]}}, z,
            train=True, rngs={"dropout": dropout_key}, method="decode",
            mutable=[AUX_LOSSES])
      tasks_lib.check_predictions(tasks, preds, _batch_size(batch))
      sums, counts = tasks_lib.task_loss_sums(tasks, preds, batch)
      return sums, (counts, collections)

    head_eps = {name: jnp.zeros_like(z) for name in tasks.names}
    sums, heads_vjp, (counts, dec_aux) = jax.vjp(heads, others, head_eps,
                                                 has_aux=True)
    if jax.tree.leaves(enc_aux) or jax.tree.leaves(dec_aux):
      return None  # aux losses: the black-box path adds their gradients
    counts = psum(counts)  # [K] global label counts
    denom = jnp.maximum(counts, 1.0)
    # Head k feeds loss k only: its input's cotangent is grad_z L_k.
    head_cts, z_cts = heads_vjp(1.0 / denom)
    z_grads = jnp.stack([z_cts[name] for name in tasks.names])  # [K, B, D]
    shared_cts, eps_cts = batched_vjp(encode_vjp, z_grads, chunk_size)
    jac = gram_lib.factor(sites, inputs, eps_cts, shared_cts)

    def others_grads(weights):
      # Task k's head params get w_k grad L_k (each sees one loss only).
      scaled = {name: jax.tree.map(lambda g, w=weights[k]: g * w,
                                   head_cts["tasks"][name])
                for k, name in enumerate(tasks.names)}
      return psum({**head_cts, "tasks": scaled})

    return (sums, jnp.zeros((), jnp.float32), counts, {}, denom, jac,
            others_grads)

  def black_box_factors(params, batch, sites, eps, dropout_key):
    """One VJP of the whole model, then the batched VJP of every task."""
    def sums_fn(p, eps):
      inputs: dict[str, list[jax.Array]] = {}
      with gram_lib.intercepting(sites, eps, inputs):
        (sums, aux_total), (counts, aux) = loss_sums_fn(
            p, batch["inputs"], batch, dropout_key)
      return (sums, aux_total), (counts, aux, inputs)

    (sums, aux_total), vjp_fn, (counts, aux, inputs) = jax.vjp(
        sums_fn, params, eps, has_aux=True)
    aux_scale = 1.0 / jax.lax.psum(1, axis_name) if axis_name else 1.0
    counts = psum(counts)  # [K] global label counts
    denom = jnp.maximum(counts, 1.0)
    # The per-task VJP of each task's global mean loss, from one forward pass.
    param_cts, eps_cts = batched_vjp(
        lambda c: vjp_fn((c, jnp.zeros((), jnp.float32))),
        jnp.diag(1.0 / denom), chunk_size)
    jac = gram_lib.factor(sites, inputs, eps_cts, param_cts["shared"])
    others_grads = lambda weights: others_and_aux(vjp_fn, weights, denom, aux,
                                                  aux_scale)
    return sums, aux_total, counts, aux, denom, jac, others_grads

  def factored_step(state, batch, weighting_key, aggregator_key,
                    dropout_key):
    """The step of a Gram-based (or columnwise) aggregator without the
    `[K, P]` Jacobian."""
    params = state.params
    run = lambda: forward(params, batch["inputs"], batch, dropout_key)
    num_devices = jax.lax.axis_size(axis_name) if axis_name else 1
    # A columnwise aggregator gets every row: formed from the factors (same
    # multiply-adds as the VJP's weight gradients), whatever the Gram cost.
    sites = gram_lib.find_dense_sites(
        run, params, num_tasks=num_tasks, num_devices=num_devices,
        every=jacobian == "factored" or aggregator.columnwise)
    eps = gram_lib.perturbations(sites)
    factors = None
    if split_heads:
      factors = split_factors(params, batch, sites, eps, dropout_key)
    if factors is None:
      factors = black_box_factors(params, batch, sites, eps, dropout_key)
    sums, aux_total, counts, aux, denom, jac, others_grads = factors
    losses = psum(sums) / denom  # [K] global task losses
    present = counts > 0

    weights, weighting_state = weighting.update(
        losses, counts, state.weighting_state, rng=weighting_key)
    weights = jax.lax.stop_gradient(weights)  # [K]
    grads = others_grads(weights)
    if aggregator.columnwise:
      # Each leaf's rows formed from the factors, in blocks of ~chunk_size
      # tasks' memory (one block per leaf without chunks), with the key of
      # the leaf and the draws of the block's coordinates (as
      # columnwise_update on the full rows).
      def direction(i, rows, offset):
        return aggregator.update(
            rows, state.aggregation_state, losses=losses, counts=counts,
            rng=jax.random.fold_in(aggregator_key, i),
            column_offset=offset)[0]
      shared = gram_lib.columnwise_blocks(
          jac, jnp.where(present, weights, 0.0), direction,
          chunk_size or num_tasks, psum)
      aggregation_state = state.aggregation_state  # columnwise: stateless
    else:
      shared, aggregation_state = gram_direction(jac, weights, present, losses,
                                                 counts, state, aggregator_key)
    shared = jax.tree.map(lambda g, p: g.astype(p.dtype), shared,
                          params["shared"])
    grads["shared"] = (shared if not aux else
                       jax.tree.map(jnp.add, shared, grads["shared"]))
    return finish(state, batch, grads, weights, losses, counts, denom,
                  weighting_state, aggregation_state, aux_total, aux,
                  dropout_key)

  def gram_direction(jac, weights, present, losses, counts, state,
                     aggregator_key):
    """`sum_k c_k w_k grad L_k` with `c` from the aggregator's `from_gram`."""
    # The aggregator sees the rows w_k grad L_k (as with jacobian="full").
    gram_matrix, scale = gram_lib.scaled_gram(jac, weights, present, axis_name,
                                              chunk_size)
    alpha, aggregation_state = aggregator.from_gram(
        gram_matrix, scale, state.aggregation_state, losses=losses,
        counts=counts, rng=aggregator_key)
    coeffs = jnp.where(present, alpha * weights, 0.0)
    return psum(gram_lib.combine(jac, coeffs)), aggregation_state

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    check_state_matches(state, optimizer, weighting, aggregator, num_tasks)
    base_key = jax.random.fold_in(state.rng, state.step)
    # Weighting and aggregation see the same key on every device (they act on
    # psum-ed, identical values); dropout draws per-device masks under pmap.
    weighting_key = jax.random.fold_in(base_key, 1)
    aggregator_key = jax.random.fold_in(base_key, 2)
    dropout_key = base_key
    if axis_name:
      dropout_key = jax.random.fold_in(base_key, jax.lax.axis_index(axis_name))
    params = state.params

    if factored:
      return factored_step(state, batch, weighting_key, aggregator_key,
                           dropout_key)
    if rep_grad:
      features, encode_vjp = jax.vjp(
          lambda shared: apply_fn({"params": {**params, "shared": shared}},
                                  batch["inputs"], train=True,
                                  rngs={"dropout": dropout_key},
                                  method="encode"), params["shared"])

      def head_sums(z, others):
        preds, collections = apply_fn(
            {"params": {**others, "shared": params["shared"]}}, z,
            train=True, rngs={"dropout": dropout_key}, method="decode",
            mutable=[AUX_LOSSES])
        if jax.tree.leaves(collections):
          raise ValueError("rep_grad does not support models with auxiliary "
                           "losses; use rep_grad=False")
        tasks_lib.check_predictions(tasks, preds, _batch_size(batch))
        sums, counts = tasks_lib.task_loss_sums(tasks, preds, batch)
        return (sums, jnp.zeros((), jnp.float32)), (counts, {})

      others = {k: v for k, v in params.items() if k != "shared"}
      (sums, aux_total), vjp_fn, (counts, aux) = jax.vjp(
          head_sums, features, others, has_aux=True)
    else:
      (sums, aux_total), vjp_fn, (counts, aux) = jax.vjp(
          lambda p: loss_sums_fn(p, batch["inputs"], batch, dropout_key),
          params, has_aux=True)
    # Auxiliary losses (penalties, discriminators) are means over each
    # device's rows: their global value is the mean over devices.
    aux_scale = 1.0 / jax.lax.psum(1, axis_name) if axis_name else 1.0

    counts = psum(counts)  # [K] global label counts
    denom = jnp.maximum(counts, 1.0)
    losses = psum(sums) / denom  # [K] global task losses
    # Row k of the identity scaled by 1/denom_k: the VJP of this shard's share
    # of task k's global mean loss (psum over shards gives the global one).
    unit_cotangents = jnp.diag(1.0 / denom)  # [K, K]

    per_task = None
    if aggregator is not None or needs_norms:
      per_task = batched_vjp(
          lambda c: vjp_fn((c, jnp.zeros((), jnp.float32))), unit_cotangents,
          chunk_size)
      if not rep_grad:
        (per_task,) = per_task  # {"shared": [K, ...], "tasks": [K, ...]}

    grad_norms = None
    if needs_norms:
      if rep_grad:
        last = _get_path(jax.vmap(encode_vjp)(per_task[0])[0], grad_norm_path,
                         "grad_norm_path")
      else:
        last = _get_path(per_task["shared"], grad_norm_path, "grad_norm_path")
      grad_norms = _row_norms(psum(last))  # [K]; unused layers are pruned

    weights, weighting_state = weighting.update(
        losses, counts, state.weighting_state, rng=weighting_key,
        grad_norms=grad_norms)
    weights = jax.lax.stop_gradient(weights)  # [K]

    aggregation_state = state.aggregation_state
    if aggregator is None:
      grads = psum(vjp_fn((weights / denom, jnp.asarray(aux_scale)))[0])
    elif rep_grad:
      z_grads, head_grads = per_task  # [K, B, ...], {...: [K, ...]}
      z_grads = z_grads * weights.reshape((-1,) + (1,) * (z_grads.ndim - 1))
      if axis_name:  # the aggregator sees every example's representation
        z_grads = jax.lax.all_gather(z_grads, axis_name, axis=1, tiled=True)
      direction, aggregation_state = aggregator.update(
          z_grads.reshape(num_tasks, -1), state.aggregation_state,
          losses=losses, counts=counts, rng=aggregator_key)
      direction = direction.reshape(z_grads.shape[1:])
      if axis_name:  # back to this device's rows
        rows = features.shape[0]
        direction = jax.lax.dynamic_slice_in_dim(
            direction, jax.lax.axis_index(axis_name) * rows, rows)
      (shared_grads,) = encode_vjp(direction)
      grads = {"shared": psum(shared_grads),
               **psum(jax.tree.map(
                   lambda g: jnp.tensordot(weights, g, axes=1), head_grads))}
    else:
      # Global per-task gradients of the shared params, rows w_k grad L_k.
      shared = jax.tree.map(
          lambda g: g * weights.reshape((-1,) + (1,) * (g.ndim - 1)),
          psum(per_task["shared"]))
      if aggregator.columnwise:
        direction, aggregation_state = columnwise_update(
            shared, state.aggregation_state, losses, counts, aggregator_key)
      else:
        matrix, unflatten = flatten_task_grads(shared)  # [K, P]
        direction, aggregation_state = aggregator.update(
            matrix, state.aggregation_state, losses=losses, counts=counts,
            rng=aggregator_key)
        direction = unflatten(direction)
      grads = others_and_aux(vjp_fn, weights, denom, aux, aux_scale)
      grads["shared"] = (direction if not aux else
                         jax.tree.map(jnp.add, direction, grads["shared"]))

    return finish(state, batch, grads, weights, losses, counts, denom,
                  weighting_state, aggregation_state, aux_total, aux,
                  dropout_key)

  return step


def make_eval_step(apply_fn: Callable[..., Any], tasks: tasks_lib.TaskSet, *,
                   axis_name: str | None = None
                   ) -> Callable[[Any, Batch], dict]:
  """Builds `eval_step(params, batch) -> stats` of summable statistics.

  The stats are `{"loss_sum": [K], "count": [K], "metrics": {task: {metric:
  {stat: sum}}}}`; add them over batches (`accumulate`) and turn them into
  values with `finalize`. Only labelled examples (mask > 0) count.
  """

  def eval_step(params, batch: Batch) -> dict:
    preds = apply_fn({"params": params}, batch["inputs"], train=False)
    tasks_lib.check_predictions(tasks, preds, _batch_size(batch))
    sums, counts = tasks_lib.task_loss_sums(tasks, preds, batch)
    stats = {"loss_sum": sums, "count": counts,
             "metrics": tasks_lib.task_metric_stats(tasks, preds, batch)}
    return jax.lax.psum(stats, axis_name) if axis_name else stats

  return eval_step


def accumulate(total: dict | None, stats: dict) -> dict:
  """Adds eval statistics (kept on device: no host sync per batch)."""
  return stats if total is None else jax.tree.map(jnp.add, total, stats)


def finalize(tasks: tasks_lib.TaskSet, total: dict) -> dict[str, float]:
  """Turns summed eval statistics into `{"<task>/<metric>": value}`.

  Every task also reports `<task>/loss` and `<task>/count` (labelled examples
  seen). A metric of a task with no labelled example is NaN (undefined).
  """
  total = jax.device_get(total)
  out: dict[str, float] = {}
  for k, task in enumerate(tasks):
    count = float(total["count"][k])
    out[f"{task.name}/count"] = count
    out[f"{task.name}/loss"] = (float(total["loss_sum"][k]) / count
                                if count > 0 else float("nan"))
    values = metrics_lib.finalize_all(task.metrics,
                                      total["metrics"][task.name])
    for metric_name, value in values.items():
      out[f"{task.name}/{metric_name}"] = float(value)
  return out
