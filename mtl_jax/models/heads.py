"""Task-specific heads: small MLPs from shared features to one task's output."""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np


class Head(nn.Module):
  """Hidden dense layers, then a linear output reshaped to `output_shape`.

  The same module serves classification (logits `[C]`), multi-label (one logit per
  label) and regression (`()` for a scalar, or any target shape); the task's loss
  gives the output its meaning.

  Attributes:
    output_shape: shape of one example's prediction.
    hidden_sizes: widths of the task-specific hidden layers.
  """

  output_shape: tuple[int, ...]
  hidden_sizes: Sequence[int] = ()

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    x = features
    for width in self.hidden_sizes:
      x = nn.relu(nn.Dense(width)(x))
    out_dim = int(np.prod(self.output_shape, dtype=np.int64))
    x = nn.Dense(out_dim)(x)  # [B, out_dim]
    return x.reshape((x.shape[0],) + tuple(self.output_shape))


def check_tasks(model: str, tasks_output_shapes: Mapping[str, Sequence[int]]
                ) -> None:
  """Checks the `{task_name: output_shape}` mapping of a multi-task model.

  Args:
    model: the model's name, for the error message.
    tasks_output_shapes: the mapping to check.

  Raises:
    ValueError: no task, or a task name that cannot be a param key.
  """
  if not tasks_output_shapes:
    raise ValueError(f"{model}: tasks_output_shapes is empty; it needs at "
                     "least one {task_name: output_shape} entry")
  for name in tasks_output_shapes:
    if not isinstance(name, str) or not name or "/" in name:
      raise ValueError(f"{model}: invalid task name {name!r}; names are "
                       "non-empty strings without '/'")
