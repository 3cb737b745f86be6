"""Static weights: the total loss is `sum_k w_k * L_k` with fixed `w_k`."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from mtl_jax.weighting.base import Weighting


class StaticState(NamedTuple):
  """Static weighting keeps no statistics."""


def static(weights: Sequence[float]) -> Weighting:
  """Fixed per-task weights, in task order.

  Args:
    weights: one finite, non-negative weight per task.

  Raises:
    ValueError: a weight is negative or not finite.
  """
  w = np.asarray(weights, dtype=np.float32)
  if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(f"static weights must be a list of finite values >= 0, "
                     f"got {list(weights)}")

  def init(num_tasks: int) -> StaticState:
    if num_tasks != w.shape[0]:
      raise ValueError(f"static weighting has {w.shape[0]} weights for "
                       f"{num_tasks} tasks")
    return StaticState()

  def update(losses, counts, state, *, rng=None, grad_norms=None):
    del losses, counts, rng, grad_norms
    return jnp.asarray(w), state

  return Weighting(init, update)


def equal(num_tasks: int | None = None) -> Weighting:
  """Equal weighting (weight 1 per task), the default of the literature.

  Args:
    num_tasks: optional; when given, `init` checks the number of tasks
      against it. Without it the weights are ones of the losses' shape, for
      any number of tasks.
  """
  if num_tasks is not None:
    return static([1.0] * num_tasks)

  def init(num_tasks: int) -> StaticState:
    del num_tasks
    return StaticState()

  def update(losses, counts, state, *, rng=None, grad_norms=None):
    del counts, rng, grad_norms
    return jnp.ones(jnp.shape(losses), jnp.float32), state

  return Weighting(init, update)
