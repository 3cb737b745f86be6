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

  Features may be per example, `[B, F]`, or position-wise, `[B, *P, F]` (e.g.
  `[B, L, F]` token features for a per-token task). Position-wise features get
  the same Dense layers at every position (weights shared across positions), and
  `output_shape` must then start with `P`: each position predicts
  `output_shape[len(P):]` (e.g. `[C]` logits for `output_shape=(L, C)`).

  Attributes:
    output_shape: shape of one example's prediction.
    hidden_sizes: widths of the task-specific hidden layers.
  """

  output_shape: tuple[int, ...]
  hidden_sizes: Sequence[int] = ()

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
    """Predicts `[B, *output_shape]` from `[B, F]` or `[B, *P, F]` features.

    Args:
      features: per-example `[B, F]` or position-wise `[B, *P, F]` features.
      train: unused (no dropout); accepted for a uniform module signature.

    Returns:
      The prediction, `[B, *output_shape]`.

    Raises:
      ValueError: if `features` has no feature axis, or if position-wise
        features' positions `P` are not the leading axes of `output_shape`.
    """
    del train
    output_shape = tuple(self.output_shape)
    if features.ndim < 2:
      raise ValueError(f"Head: features shape {features.shape} must be [B, F] "
                       "or position-wise [B, *positions, F]")
    positions = tuple(features.shape[1:-1])  # P; () for [B, F] features
    if output_shape[:len(positions)] != positions:
      raise ValueError(
          f"Head: position-wise features {features.shape} have positions "
          f"{positions}, but output_shape {output_shape} does not start with "
          f"them; a per-position task needs output_shape = (*positions, ...), "
          f"e.g. {positions + (2,)} for 2-class per-position logits, or "
          "per-example [B, F] features")
    per_position = output_shape[len(positions):]
    x = features
    for width in self.hidden_sizes:
      x = nn.relu(nn.Dense(width)(x))
    out_dim = int(np.prod(per_position, dtype=np.int64))
    x = nn.Dense(out_dim)(x)  # [B, *P, out_dim]
    return x.reshape(x.shape[:-1] + per_position)  # [B, *output_shape]


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
