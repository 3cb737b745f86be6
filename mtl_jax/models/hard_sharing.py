"""Hard parameter sharing: one shared trunk, one head per task."""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax


class TaskHeads(nn.Module):
  """Applies one head per task; each head's params live under its task name."""

  heads: Mapping[str, nn.Module]

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool = False
               ) -> dict[str, jax.Array]:
    # Cloning with name=task makes the param tree {"left": ..., "right": ...}
    # instead of linen's default "heads_left" names for dict attributes.
    return {name: head.clone(parent=self, name=name)(features, train=train)
            for name, head in self.heads.items()}


class HardSharingModel(nn.Module):
  """Shared layers near the input, task-specific layers near the output.

  Params are `{"shared": <trunk params>, "tasks": {task: <head params>}}`.

  Attributes:
    trunk: the shared feature extractor, `inputs [B, ...] -> features [B, D]`.
    heads: `{task_name: head}`, each `features [B, D] -> prediction [B, ...]`.
  """

  trunk: nn.Module
  heads: Mapping[str, nn.Module]

  def setup(self):
    self.shared = self.trunk.clone()
    self.tasks = TaskHeads(self.heads)

  def __call__(self, inputs: jax.Array, *, train: bool = False
               ) -> dict[str, jax.Array]:
    return self.tasks(self.shared(inputs, train=train), train=train)

  def encode(self, inputs: jax.Array, *, train: bool = False) -> jax.Array:
    """The shared representation `[B, D]` (for representation-level methods)."""
    return self.shared(inputs, train=train)

  def decode(self, features: jax.Array, *, train: bool = False
             ) -> dict[str, jax.Array]:
    """Task predictions from shared features."""
    return self.tasks(features, train=train)
