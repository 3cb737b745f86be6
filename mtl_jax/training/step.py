"""The pure multi-task train step and eval step.

`make_train_step` returns `step(state, batch) -> (state, metrics)`:

1. the step's keys are drawn from `fold_in(state.rng, state.step)`; the
   pretext tasks' views, labels and masks are made from the inputs
   (`mtl_jax.pretext.add_views`);
2. a gradient path (`mtl_jax.gradients`, chosen once when the step is
   built) runs the forward pass, reduces each task's masked loss sum and
   label count over the GLOBAL batch (the task loss is `sum / max(count, 1)`,
   never a mean of per-device means), calls the weighting method for the `[K]`
   weights (gradients stopped) and forms the gradient: a weighted sum without
   an aggregator; with one, the aggregated per-task gradients of the shared
   params (factored from the dense layers' factors by default, or the `[K, P]`
   Jacobian, or the gradients w.r.t. the shared representation with
   `rep_grad`); task params get their own task's weighted gradient;
3. the optax update is applied; methods that learn from the loss change
   (FAMO) see the losses of the updated model on the same batch;
4. by default (`skip_nonfinite=True`) a step whose losses, new params or new
   method states are not finite changes nothing but the step counter
   (`mtl_jax.training.guard.skip_nonfinite`); its metrics then also hold
   `nonfinite`, `nonfinite_streak` and `<task>/nonfinite`.

A task with no label in the batch (count 0) has loss 0 and zero gradient, and
neither the weighting nor the aggregator lets it move any state.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from mtl_jax import gradients
from mtl_jax import metrics as metrics_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax.aggregation.base import Aggregator
from mtl_jax.gradients import forward as forward_lib
from mtl_jax.pretext import cluster as cluster_lib
from mtl_jax.pretext import views as views_lib
from mtl_jax.relatedness import gram_cosines
from mtl_jax.training import guard
from mtl_jax.training.state import TrainState
from mtl_jax.weighting import Weighting

Batch = Mapping[str, Any]
JACOBIAN_MODES = gradients.JACOBIAN_MODES
AUX_LOSSES = forward_lib.AUX_LOSSES
# The trunks name their last shared layer "features" (GradNorm's W).
DEFAULT_GRAD_NORM_PATH = ("features",)
batched_vjp = gradients.batched_vjp


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


def check_step_options(aggregator: Aggregator | None, *, rep_grad: bool,
                       encode_decode: bool, jacobian: str,
                       chunk_size: int | None,
                       gradient_cosines: bool = False,
                       prefix: str = "") -> None:
  """Raises a ValueError naming the option that cannot work.

  Called by `make_train_step`; also usable up front (before any data is
  read) by a script that validates a whole experiment.
  """
  if rep_grad and aggregator is None:
    raise ValueError("rep_grad=True needs a gradient aggregator")
  if rep_grad and not aggregator.rep_grad_ok:
    raise ValueError("this aggregator is not valid on representation "
                     "gradients; use rep_grad=False")
  if rep_grad and not encode_decode:
    raise ValueError("rep_grad=True needs a model with one shared "
                     "representation: encode/decode methods "
                     "(encode_decode=True, e.g. hard sharing)")
  if jacobian not in JACOBIAN_MODES:
    raise ValueError(f"unknown jacobian mode {jacobian!r}; valid: "
                     f"{', '.join(JACOBIAN_MODES)}")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1 (or None: all tasks in one "
                     f"vmap), got {chunk_size}")
  if gradient_cosines:
    why = None
    if aggregator is None:
      why = ("the weighted-sum step (no aggregator) never forms per-task "
             "gradients; choose an aggregator (e.g. aggregation.name=mean) or "
             "measure them apart (experiments/relatedness.py)")
    elif rep_grad:
      why = "rep_grad aggregates representation gradients, not the params'"
    elif aggregator.columnwise and jacobian != "full":
      why = ("a columnwise aggregator (GradDrop) forms no Gram matrix on the "
             "factored path; use jacobian='full'")
    if why:
      raise ValueError(f"{prefix}gradient_cosines=True: {why}")


def make_train_step(apply_fn: Callable[..., Any], tasks: tasks_lib.TaskSet,
                    optimizer: optax.GradientTransformation,
                    weighting: Weighting, *,
                    aggregator: Aggregator | None = None,
                    rep_grad: bool = False,
                    chunk_size: int | None = None,
                    jacobian: str = "auto",
                    encode_decode: bool = False,
                    grad_norm_path: Sequence[str] = DEFAULT_GRAD_NORM_PATH,
                    pass_task_presence: bool = False,
                    schedule: optax.Schedule | None = None,
                    axis_name: str | None = None,
                    gradient_cosines: bool = False,
                    skip_nonfinite: bool = True
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Builds the pure train step.

  Args:
    apply_fn: a linen `model.apply`, called as
      `apply_fn({"params": p}, inputs, train=True, rngs={"dropout": key},
      mutable=["aux_losses"])` and returning `{task: prediction}`.
    tasks: the tasks, in the order of the weighting's task axis.
    optimizer: the optax transformation for all params.
    weighting: the loss-level weighting method.
    aggregator: a gradient-level method acting on the per-task gradients of
      `params["shared"]`; None for a plain weighted sum.
    rep_grad: aggregate gradients w.r.t. the shared representation instead of
      the shared params (needs an aggregator with `rep_grad_ok` and
      `encode_decode`).
    chunk_size: map the per-task VJP over chunks of this many tasks (the
      factored Gram products are bounded to the same memory); None: one vmap
      over all tasks.
    jacobian: how an aggregator gets the per-task gradients of the shared
      params. "auto": factored (`mtl_jax.gradients.factored`) for a
      Gram-based or columnwise aggregator, each dense layer where that is
      cheaper than its rows; "factored": every shared dense layer; "full":
      the `[K, P]` matrix and `aggregator.update` (also what rep_grad and
      weightings that need gradient norms use). All give the same update up
      to float rounding.
    encode_decode: the model has `encode`/`decode` methods and `decode`
      applies one head module `tasks/<task>` per task to the features (as
      `HardSharingModel`); enables rep_grad and the two-stage factored route.
      The architecture's spec (`mtl_jax.models.build`) says whether it does.
    grad_norm_path: path of the last shared layer inside `params["shared"]`,
      for weightings that need per-task gradient norms (GradNorm).
    pass_task_presence: call the model with `task_presence=[B, K]` (1 where
      the example is labelled for the task), for models that use it (the
      adversarial task discriminator).
    schedule: the learning-rate schedule, only to report `learning_rate`.
    axis_name: the `pmap` axis to reduce over; None under `jit` (sharded or not).
    gradient_cosines: also report `grad_cos/<a>,<b>` for every pair of tasks
      a before b: the cosine of their gradients of the shared params, from
      the Gram matrix that the aggregator's path forms anyway (no extra
      backward pass; NaN where a task has no labels in the batch or a zero
      weight). Needs an aggregator, not rep_grad, and for a columnwise one
      jacobian="full".
    skip_nonfinite: skip a step whose task losses, total loss, new params or
      new optimizer/method states hold a NaN or Inf: the state is kept but
      for `step` (which advances) and `nonfinite_streak` (which counts the
      consecutive skipped steps), inside the compiled step
      (`guard.skip_nonfinite`). False: the bare step, which applies whatever
      update it computes (NaN included).

  Returns:
    `step(state, batch) -> (new_state, metrics)`, with metrics `loss` (the
    weighted objective plus auxiliary losses), `grad_norm`, `aux/<name>` for
    every auxiliary loss the model sows, `learning_rate` with a schedule, and
    `<task>/loss`, `<task>/count`, `<task>/weight` for every task (and
    `grad_cos/<a>,<b>` with `gradient_cosines`); with `skip_nonfinite` also
    `nonfinite` (1.0 for a skipped step), `nonfinite_streak` and
    `<task>/nonfinite` (1.0 where that task's loss was not finite).

  Raises:
    ValueError: rep_grad without an aggregator, with one that is not valid
      on representation gradients, or without `encode_decode`; an unknown
      jacobian mode; chunk_size < 1; gradient_cosines where no Gram matrix
      is formed.
  """
  check_step_options(aggregator, rep_grad=rep_grad,
                     encode_decode=encode_decode, jacobian=jacobian,
                     chunk_size=chunk_size, gradient_cosines=gradient_cosines)
  spec = gradients.GradientSpec(
      model=gradients.Forward(apply_fn, tasks, encode_decode=encode_decode,
                              pass_task_presence=pass_task_presence),
      weighting=weighting, aggregator=aggregator, chunk_size=chunk_size,
      jacobian=jacobian, grad_norm_path=tuple(grad_norm_path),
      axis_name=axis_name)
  path = gradients.select_path(spec, use_rep_grad=rep_grad)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    check_state_matches(state, optimizer, weighting, aggregator, len(tasks))
    keys = step_keys(state, axis_name)
    batch = with_task_inputs(tasks, state, batch, keys, axis_name)
    result = path(spec, state.params, batch,
                  gradients.MethodStates(state.weighting_state,
                                         state.aggregation_state), keys)
    new_state, metrics = apply_gradients(spec, optimizer, state, batch,
                                         result, keys, schedule)
    if gradient_cosines:
      metrics.update(cosine_metrics(tasks.names, result.gram))
    return update_task_state(tasks, state, new_state, metrics, result, batch,
                             keys, axis_name)

  if skip_nonfinite:
    return guard.skip_nonfinite(step, tasks.names)
  return step


def with_task_inputs(tasks: tasks_lib.TaskSet, state: TrainState,
                     batch: Batch, keys: gradients.StepKeys,
                     axis_name: str | None) -> dict[str, Any]:
  """The batch with the pretext tasks' views, labels and masks, and the
  tasks' state (the clustering centroids) where there is one."""
  batch = views_lib.add_views(tasks, batch, keys.pretext,
                              row_offset=row_offset(batch, axis_name))
  if state.task_state:
    batch = {**batch, "task_state": state.task_state}
  return batch


def update_task_state(tasks: tasks_lib.TaskSet, state: TrainState,
                      new_state: TrainState, metrics: dict[str, Any],
                      result: gradients.Gradients, batch: Batch,
                      keys: gradients.StepKeys, axis_name: str | None
                      ) -> tuple[TrainState, dict[str, Any]]:
  """The clustering tasks' banks and k-means fits after the step (with
  their metrics); the state as it is without such tasks."""
  if not state.task_state:
    return new_state, metrics
  task_state = cluster_lib.update_states(
      tasks, state.task_state, result.features, batch, state.step,
      keys.pretext, axis_name)
  metrics.update(cluster_lib.metrics(tasks, task_state))
  return new_state.replace(task_state=task_state), metrics


def step_keys(state: TrainState, axis_name: str | None) -> gradients.StepKeys:
  """Weighting and aggregation see the same key on every device (they act on
  psum-ed, identical values); dropout draws per-device masks under pmap."""
  base_key = jax.random.fold_in(state.rng, state.step)
  dropout_key = base_key
  if axis_name:
    dropout_key = jax.random.fold_in(base_key, jax.lax.axis_index(axis_name))
  return gradients.StepKeys(weighting=jax.random.fold_in(base_key, 1),
                            aggregator=jax.random.fold_in(base_key, 2),
                            dropout=dropout_key,
                            pretext=jax.random.fold_in(base_key, 3))


def row_offset(batch: Batch, axis_name: str | None) -> jax.Array | int:
  """The global index of this device's first row: under pmap the device
  index times its rows; under jit the batch is the global one."""
  if not axis_name:
    return 0
  return jax.lax.axis_index(axis_name) * forward_lib.batch_size(batch)


def apply_gradients(spec: gradients.GradientSpec,
                    optimizer: optax.GradientTransformation,
                    state: TrainState, batch: Batch,
                    result: gradients.Gradients, keys: gradients.StepKeys,
                    schedule: optax.Schedule | None = None
                    ) -> tuple[TrainState, dict]:
  """The optimizer update, the post-update weighting state and the metrics."""
  updates, opt_state = optimizer.update(result.grads, state.opt_state,
                                        state.params)
  new_params = optax.apply_updates(state.params, updates)
  weighting_state = result.states.weighting
  if spec.weighting.post_update is not None:
    (new_sums, _), _ = spec.model.loss_sums(new_params, batch, keys.dropout)
    denom = jnp.maximum(result.counts, 1.0)
    weighting_state = spec.weighting.post_update(
        spec.psum(new_sums) / denom, result.counts, weighting_state)
  new_state = state.replace(step=state.step + 1, params=new_params,
                            opt_state=opt_state,
                            weighting_state=weighting_state,
                            aggregation_state=result.states.aggregation)
  return new_state, step_metrics(spec.model.tasks, state, result, schedule)


def step_metrics(tasks: tasks_lib.TaskSet, state: TrainState,
                 result: gradients.Gradients,
                 schedule: optax.Schedule | None = None) -> dict[str, Any]:
  metrics = {"loss": jnp.sum(result.weights * result.losses)
                     + forward_lib.aux_total(result.aux),
             "grad_norm": optax.tree.norm(result.grads)}
  for name, value in result.aux.items():
    metrics[f"aux/{name}"] = value
  if schedule is not None:
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
  for k, name in enumerate(tasks.names):
    metrics[f"{name}/loss"] = result.losses[k]
    metrics[f"{name}/count"] = result.counts[k]
    metrics[f"{name}/weight"] = result.weights[k]
  return metrics


COSINE_PREFIX = "grad_cos/"


def cosine_metrics(names: Sequence[str], gram: jax.Array) -> dict[str, Any]:
  """`{"grad_cos/<a>,<b>": cosine}` for every pair a before b in `names`."""
  cos = gram_cosines(gram)
  return {f"{COSINE_PREFIX}{a},{b}": cos[i, j]
          for i, a in enumerate(names) for j, b in enumerate(names) if i < j}


def make_eval_step(apply_fn: Callable[..., Any], tasks: tasks_lib.TaskSet, *,
                   axis_name: str | None = None
                   ) -> Callable[[Any, Batch], dict]:
  """Builds `eval_step(params, batch) -> stats` of summable statistics.

  The stats are `{"loss_sum": [K], "count": [K], "metrics": {task: {metric:
  {stat: sum}}}}`; add them over batches (`accumulate`) and turn them into
  values with `finalize`. Only labelled examples (mask > 0) count. Pretext
  tasks are scored on every real row (whichever rows they train on), on
  views drawn from a fixed key
  (`mtl_jax.pretext.views.EVAL_SEED`), the same at every evaluation; the
  model runs once per view.
  """
  eval_key = jax.random.PRNGKey(views_lib.EVAL_SEED)

  def eval_step(params, batch: Batch) -> dict:
    batch = views_lib.add_views(tasks, batch, eval_key,
                                row_offset=row_offset(batch, axis_name),
                                every_row=True)
    # Clustering tasks' labels come from the training state: not scored.
    batch["masks"].update({t.name: jnp.zeros_like(batch["masks"][t.name])
                           for t in cluster_lib.feature_tasks(tasks)})
    outputs = {view: apply_fn({"params": params}, inputs, train=False)
               for view, inputs in views_lib.batch_views(tasks, batch).items()}
    preds = {task.name: outputs[task.view][task.name] for task in tasks
             if task.name in outputs[task.view]}
    tasks_lib.check_predictions(tasks, preds, forward_lib.batch_size(batch))
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
  Clustering tasks, whose labels come from the training state, are left
  out.
  """
  total = jax.device_get(total)
  out: dict[str, float] = {}
  unscored = {t.name for t in cluster_lib.feature_tasks(tasks)}
  for k, task in enumerate(tasks):
    if task.name in unscored:
      continue
    count = float(total["count"][k])
    out[f"{task.name}/count"] = count
    out[f"{task.name}/loss"] = (float(total["loss_sum"][k]) / count
                                if count > 0 else float("nan"))
    values = metrics_lib.finalize_all(task.metrics,
                                      total["metrics"][task.name])
    for metric_name, value in values.items():
      out[f"{task.name}/{metric_name}"] = float(value)
  return out
