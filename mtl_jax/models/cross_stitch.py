"""Cross-stitch networks (Misra, Shrivastava, Gupta, Hebert 2016).

One column of layers per task; after every layer a cross-stitch unit mixes the
K task activations with a learnable K x K matrix alpha:

  x_i' = sum_j alpha_ij x_j        (i, j over tasks, one alpha per layer)

then each task's head reads its own column's last (mixed) activation. With alpha
the identity (the default initialisation) the model is K independent networks;
off-diagonal entries let a task borrow another task's features.

Params: `{"shared": {"cross_stitch_<l>": {"alpha": [K, K]}},
          "tasks": {task: {"layers_<l>": <conv or dense>, "head": <head>}}}`.
Row and column order of alpha is the order of `tasks_output_shapes`.

Columns are 3x3 convolutions (`conv_channels`, `conv_strides`) followed by dense
layers (`hidden_sizes`), each with a ReLU; activations are flattened before the
first dense layer (or before the head if there is none). A cross-stitch unit
follows every layer, conv and dense alike.

Differences from the paper: alpha is one scalar per task pair and layer (as in
the paper's main experiments), but the columns here are small CNN/MLP stacks
trained from scratch rather than ImageNet-pretrained AlexNets; the paper's
larger learning rate for the alphas is an optimiser choice left to the caller
(e.g. `optax.multi_transform` on `params["shared"]`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models import heads as heads_lib


def stitch_init(alpha_self: float, alpha_other: float
                ) -> nn.initializers.Initializer:
  """Returns an initialiser of `[K, K]` alphas.

  Misra et al. found (alpha_self, alpha_other) = (0.9, 0.1) works well for two
  tasks; (1, 0) starts from independent columns.

  Args:
    alpha_self: value on the diagonal.
    alpha_other: value off the diagonal.

  Returns:
    An initialiser `(key, shape, dtype) -> [K, K]` (deterministic).
  """
  def init(key, shape, dtype=jnp.float32):
    del key  # deterministic
    if len(shape) != 2 or shape[0] != shape[1]:
      raise ValueError(
          f"stitch_init: expected a square [K, K] shape, got {shape}")
    eye = jnp.eye(shape[0], dtype=dtype)
    return alpha_self * eye + alpha_other * (1 - eye)
  return init


class CrossStitchUnit(nn.Module):
  """Mixes stacked task activations `[K, B, ...]` with a learnable alpha.

  `out[i] = sum_j alpha[i, j] * xs[j]`, alpha `[K, K]`.

  Attributes:
    alpha_self: initial diagonal entries (a task's weight on itself).
    alpha_other: initial off-diagonal entries.
  """

  alpha_self: float = 1.0
  alpha_other: float = 0.0

  @nn.compact
  def __call__(self, xs: jax.Array) -> jax.Array:
    k = xs.shape[0]
    alpha = self.param("alpha", stitch_init(self.alpha_self, self.alpha_other),
                       (k, k))  # [K, K]
    # HIGHEST: the identity initialisation must reproduce the columns exactly
    # (default TPU/GPU matmul precision would round activations to bf16).
    return jnp.einsum("ij,j...->i...", alpha, xs,
                      precision=jax.lax.Precision.HIGHEST)  # [K, B, ...]


class Column(nn.Module):
  """One task's column of layers and its head, callable layer by layer.

  `__call__` runs the column alone (no stitching): the network a task would
  have with identity cross-stitch units.

  Attributes:
    output_shape: the task's prediction shape per example.
    conv_channels: channels of each 3x3 conv layer.
    conv_strides: stride of each conv layer.
    hidden_sizes: widths of the dense layers after the convs.
    head_hidden_sizes: hidden widths of the task's `Head`.
  """

  output_shape: tuple[int, ...]
  conv_channels: Sequence[int] = ()
  conv_strides: Sequence[int] = ()
  hidden_sizes: Sequence[int] = (64, 64)
  head_hidden_sizes: Sequence[int] = ()

  def setup(self):
    convs = [nn.Conv(c, (3, 3), strides=(s, s))
             for c, s in zip(self.conv_channels, self.conv_strides)]
    self.layers = convs + [nn.Dense(w) for w in self.hidden_sizes]
    self.head = heads_lib.Head(output_shape=tuple(self.output_shape),
                               hidden_sizes=tuple(self.head_hidden_sizes))

  @property
  def num_layers(self) -> int:
    return len(self.conv_channels) + len(self.hidden_sizes)

  def layer(self, index: int, x: jax.Array) -> jax.Array:
    """Applies layer `index` (then ReLU) to `x`."""
    if index >= len(self.conv_channels):  # dense layers see flat features
      x = x.reshape(x.shape[0], -1)
    return nn.relu(self.layers[index](x))

  def predict(self, x: jax.Array) -> jax.Array:
    """The head on the column's last activation."""
    return self.head(x.reshape(x.shape[0], -1))

  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = self.layer(i, x)
    return self.predict(x)


class _Columns(nn.Module):
  """Holds one `Column` per task, each named after its task."""

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  conv_channels: Sequence[int]
  conv_strides: Sequence[int]
  hidden_sizes: Sequence[int]
  head_hidden_sizes: Sequence[int]

  def setup(self):
    self.columns = {
        name: Column(tuple(shape), self.conv_channels, self.conv_strides,
                     self.hidden_sizes, self.head_hidden_sizes, name=name)
        for name, shape in self.tasks_output_shapes.items()}


class _Units(nn.Module):
  """Holds the cross-stitch units, `cross_stitch_<l>` after column layer l."""

  num_layers: int
  alpha_self: float
  alpha_other: float

  def setup(self):
    self.units = [CrossStitchUnit(self.alpha_self, self.alpha_other,
                                  name=f"cross_stitch_{l}")
                  for l in range(self.num_layers)]


class CrossStitchModel(nn.Module):
  """Per-task columns mixed after every layer by cross-stitch units.

  Params are `{"shared": {"cross_stitch_<l>": {"alpha": [K, K]}}, "tasks":
  {task: {"layers_<l>": ..., "head": ...}}}`. The alphas are the only shared
  params; they receive every task's gradient. No auxiliary losses.

  Attributes:
    tasks_output_shapes: `{task_name: output_shape}` in task order (the order
      of alpha's rows and columns), e.g. `{"left": (10,), "sum": ()}`.
    hidden_sizes: widths of each column's dense layers.
    conv_channels: channels of each column's 3x3 conv layers (before the dense
      ones; inputs must then be images `[B, H, W, C]`).
    conv_strides: stride of each conv layer (same length as `conv_channels`).
    head_hidden_sizes: hidden widths of each task's `Head`.
    alpha_self: initial diagonal of every alpha (1.0: identity, independent
      columns at initialisation).
    alpha_other: initial off-diagonal entries (e.g. 0.1 / (K - 1) with
      alpha_self 0.9 keeps rows summing to 1).
  """

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  hidden_sizes: Sequence[int] = (64, 64)
  conv_channels: Sequence[int] = ()
  conv_strides: Sequence[int] = ()
  head_hidden_sizes: Sequence[int] = ()
  alpha_self: float = 1.0
  alpha_other: float = 0.0

  def setup(self):
    heads_lib.check_tasks("CrossStitchModel", self.tasks_output_shapes)
    if len(self.conv_channels) != len(self.conv_strides):
      raise ValueError(f"CrossStitchModel: conv_channels "
                       f"{tuple(self.conv_channels)} and conv_strides "
                       f"{tuple(self.conv_strides)} differ in length")
    num_layers = len(self.conv_channels) + len(self.hidden_sizes)
    if num_layers == 0:
      raise ValueError("CrossStitchModel: no layers to stitch; give "
                       "hidden_sizes and/or conv_channels")
    self.shared = _Units(num_layers, self.alpha_self, self.alpha_other)
    self.tasks = _Columns(self.tasks_output_shapes, tuple(self.conv_channels),
                          tuple(self.conv_strides), tuple(self.hidden_sizes),
                          tuple(self.head_hidden_sizes))

  def __call__(self, inputs: jax.Array, *, train: bool = False
               ) -> dict[str, jax.Array]:
    """Returns `{task: prediction [B, *output_shape]}`.

    Args:
      inputs: `[B, ...]` (`[B, H, W, C]` if there are conv layers).
      train: unused (no dropout or normalisation statistics); kept for the
        common model signature.
    """
    del train
    columns = self.tasks.columns
    names = list(self.tasks_output_shapes)
    xs = [inputs] * len(names)
    for l, unit in enumerate(self.shared.units):
      hs = jnp.stack([columns[n].layer(l, x) for n, x in zip(names, xs)])
      xs = list(unit(hs))  # K arrays [B, ...]
    return {n: columns[n].predict(x) for n, x in zip(names, xs)}
