"""Shared trunks (feature extractors): an MLP, a small CNN and a small ResNet.

All trunks map `inputs [B, ...]` to features `[B, D]` and take `train` so that
dropout is active only in training. Each names its last layer "features": that
is the "last shared layer" of methods such as GradNorm. Normalisation is GroupNorm/LayerNorm, never
BatchNorm: batch statistics would mix labelled and unlabelled examples, differ
between one device and several, and add a mutable collection to every step.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """A multi-layer perceptron on flattened inputs.

  Attributes:
    hidden_sizes: width of each hidden layer; the last is the feature size.
    dropout_rate: dropout after each hidden layer (training only).
  """

  hidden_sizes: Sequence[int] = (256, 256)
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1)  # [B, D_in]
    for i, width in enumerate(self.hidden_sizes):
      last = i == len(self.hidden_sizes) - 1
      x = nn.relu(nn.Dense(width, name="features" if last else None)(x))
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x  # [B, hidden_sizes[-1]]


class ConvNet(nn.Module):
  """A small CNN: 3x3 conv stages, then a dense feature layer.

  Features are flattened rather than globally pooled so that they keep *where*
  things are: multi_digits asks which digit is on the left and which on the
  right, which a global average pool would throw away.

  Attributes:
    channels: output channels of each conv layer.
    strides: stride of each conv layer (same length as `channels`).
    feature_size: width of the final dense layer (the feature size).
    dropout_rate: dropout on the features (training only).
  """

  channels: Sequence[int] = (32, 64, 64)
  strides: Sequence[int] = (1, 2, 1)
  feature_size: int = 256
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if len(self.channels) != len(self.strides):
      raise ValueError(f"ConvNet: channels {tuple(self.channels)} and strides "
                       f"{tuple(self.strides)} differ in length")
    for c, s in zip(self.channels, self.strides):
      x = nn.relu(nn.Conv(c, (3, 3), strides=(s, s))(x))  # [B, H', W', c]
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.feature_size, name="features")(x))
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x  # [B, feature_size]


class ResidualBlock(nn.Module):
  """A pre-activation basic block (GroupNorm, ReLU, 3x3 conv, twice)."""

  channels: int
  stride: int = 1
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    groups = min(self.groups, x.shape[-1])
    y = nn.relu(nn.GroupNorm(num_groups=groups)(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.channels:
      shortcut = nn.Conv(self.channels, (1, 1), strides=(self.stride,) * 2,
                         use_bias=False)(y)
    y = nn.Conv(self.channels, (3, 3), strides=(self.stride,) * 2,
                use_bias=False)(y)
    y = nn.relu(nn.GroupNorm(num_groups=min(self.groups, self.channels))(y))
    # Zero-initialised last conv: every block starts as the identity.
    y = nn.Conv(self.channels, (3, 3), use_bias=False,
                kernel_init=nn.initializers.zeros)(y)
    return shortcut + y


class ResNet(nn.Module):
  """A small ResNet for small images.

  Attributes:
    stage_sizes: number of residual blocks per stage.
    widths: channels per stage; stages after the first halve the resolution.
    feature_size: width of the final dense layer.
    pool: "flatten" keeps spatial layout (default), "mean" global-average-pools.
  """

  stage_sizes: Sequence[int] = (1, 1)
  widths: Sequence[int] = (32, 64)
  feature_size: int = 256
  pool: str = "flatten"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # no dropout or batch statistics
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError("ResNet: stage_sizes and widths differ in length")
    if self.pool not in ("flatten", "mean"):
      raise ValueError(f"ResNet: unknown pool {self.pool!r}; valid: flatten, mean")
    x = nn.Conv(self.widths[0], (3, 3))(x)
    for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(blocks):
        x = ResidualBlock(width, stride=2 if (i > 0 and j == 0) else 1)(x)
    x = nn.relu(nn.GroupNorm(num_groups=min(8, x.shape[-1]))(x))
    x = jnp.mean(x, axis=(1, 2)) if self.pool == "mean" else x.reshape(
        x.shape[0], -1)
    return nn.relu(nn.Dense(self.feature_size, name="features")(x))  # [B, F]
