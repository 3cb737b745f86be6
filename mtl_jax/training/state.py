"""The training state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mtl_jax.aggregation.base import Aggregator
from mtl_jax.weighting import Weighting


class TrainState(flax.struct.PyTreeNode):
  """Pure data: no functions, so it checkpoints and shards as a plain pytree.

  Attributes:
    step: number of updates applied so far (int32 scalar).
    params: `{"shared": ..., "tasks": {task: ...}}`.
    opt_state: the optax optimizer state.
    weighting_state: the loss-weighting method's state.
    aggregation_state: the gradient aggregator's state (`()` without one).
    rng: base PRNG key (raw uint32 `[2]`); the step folds in `step`, so the key
      used at step s is the same whether or not the run was resumed.
    nonfinite_streak: how many consecutive steps up to now had a NaN/Inf loss
      or update and were skipped (int32 scalar; see `guard.skip_nonfinite`).
    task_state: `{task: state}` of the tasks that carry state across steps
      (the clustering tasks' k-means centroids and feature banks,
      `mtl_jax.pretext.cluster`); `{}` without such tasks.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  weighting_state: Any
  aggregation_state: Any
  rng: jax.Array
  nonfinite_streak: jax.Array
  task_state: Any = flax.struct.field(default_factory=dict)


def create_train_state(params: Any, optimizer: optax.GradientTransformation,
                       weighting: Weighting, num_tasks: int,
                       rng: jax.Array, aggregator: Aggregator | None = None,
                       task_state: Any = None) -> TrainState:
  """The state at step 0 (`task_state`: `cluster.init_task_state`)."""
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=optimizer.init(params),
      weighting_state=weighting.init(num_tasks),
      aggregation_state=aggregator.init(num_tasks) if aggregator else (),
      rng=rng, nonfinite_streak=jnp.zeros((), jnp.int32),
      task_state=task_state or {})


def init_params(model: Any, sample_inputs: Any, rng: jax.Array) -> Any:
  """Initialises a linen model's params from one (host) sample batch."""
  variables = jax.jit(lambda r, x: model.init(r, x, train=False))(
      rng, sample_inputs)
  # Sown outputs (auxiliary losses, intermediates) are not state.
  unexpected = sorted(set(variables) - {"params", "aux_losses", "intermediates"})
  if unexpected:
    raise ValueError(f"model has non-param collections {unexpected}; the train "
                     "step only carries 'params'")
  params = variables["params"]
  missing = sorted({"shared", "tasks"} - set(params))
  if missing:
    raise ValueError(f"model params lack {missing}: multi-task models must split "
                     "params as {'shared': ..., 'tasks': {task: ...}}")
  return params

