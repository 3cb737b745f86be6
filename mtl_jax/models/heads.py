"""Task-specific heads: small MLPs from shared features to one task's output."""

from __future__ import annotations

from typing import Sequence

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
