"""The pure multi-task train step and eval step.

`make_train_step` returns `step(state, batch) -> (state, metrics)`:

1. one forward pass gives every task's prediction;
2. each task's masked loss sum and label count are reduced over the GLOBAL batch
   (under `jax.jit` with a sharded batch the sums already are global; under
   `jax.pmap` they are `psum`-ed over `axis_name` first), and the task loss is
   `sum / max(count, 1)`, never a mean of per-device means;
3. the weighting method turns the `[K]` losses and counts into `[K]` weights
   (gradients do not flow through them), the objective is `sum_k w_k L_k`;
4. an optax update is applied.

A task with no label in the batch (count 0) has loss 0 and zero gradient.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from mtl_jax import metrics as metrics_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax.training.state import TrainState
from mtl_jax.weighting import Weighting

Batch = Mapping[str, Any]


def _batch_size(batch: Batch) -> int:
  return jax.tree.leaves(batch["inputs"])[0].shape[0]


def make_train_step(apply_fn: Callable[..., Any], tasks: tasks_lib.TaskSet,
                    optimizer: optax.GradientTransformation,
                    weighting: Weighting, *,
                    schedule: optax.Schedule | None = None,
                    axis_name: str | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Builds the pure train step.

  Args:
    apply_fn: a linen `model.apply`, called as
      `apply_fn({"params": p}, inputs, train=True, rngs={"dropout": key})` and
      returning `{task: prediction}`.
    tasks: the tasks, in the order of the weighting's task axis.
    optimizer: the optax transformation for all params.
    weighting: the loss-level weighting method.
    schedule: the learning-rate schedule, only to report `learning_rate`.
    axis_name: the `pmap` axis to reduce over; None under `jit` (sharded or not).

  Returns:
    `step(state, batch) -> (new_state, metrics)`, with metrics `loss` (the
    weighted objective), `grad_norm`, and `<task>/loss`, `<task>/count`,
    `<task>/weight` for every task.
  """

  def psum(x):
    return jax.lax.psum(x, axis_name) if axis_name else x

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)
    if axis_name:
      # Under pmap each device draws its own dropout masks for its own rows
      # (the same key everywhere would repeat one mask pattern per device).
      # Under jit the key is global and sharded random bits equal unsharded
      # ones, so jit matches one device bit for bit even with dropout; pmap
      # matches it in distribution only.
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))

    def objective(params):
      preds = apply_fn({"params": params}, batch["inputs"], train=True,
                       rngs={"dropout": key})
      tasks_lib.check_predictions(tasks, preds, _batch_size(batch))
      sums, counts = tasks_lib.task_loss_sums(tasks, preds, batch)  # [K], [K]
      counts = psum(counts)
      denom = jnp.maximum(counts, 1.0)
      losses = psum(jax.lax.stop_gradient(sums)) / denom  # global task losses
      weights, weighting_state = weighting.update(
          losses, counts, state.weighting_state, rng=key, grad_norms=None)
      weights = jax.lax.stop_gradient(weights)
      # This shard's share of the global weighted loss: gradients summed over
      # shards (psum below) give exactly the gradient of the global objective.
      local = jnp.sum(weights * sums / denom)
      return local, (losses, counts, weights, weighting_state)

    grads, (losses, counts, weights, weighting_state) = jax.grad(
        objective, has_aux=True)(state.params)
    grads = psum(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state,
                              weighting_state=weighting_state)
    metrics = {"loss": jnp.sum(weights * losses),
               "grad_norm": optax.tree.norm(grads)}
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    for k, name in enumerate(tasks.names):
      metrics[f"{name}/loss"] = losses[k]
      metrics[f"{name}/count"] = counts[k]
      metrics[f"{name}/weight"] = weights[k]
    return new_state, metrics

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
