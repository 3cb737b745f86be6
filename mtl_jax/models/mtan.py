"""Multi-Task Attention Network, MTAN (Liu, Johns, Davison 2019).

A shared backbone of conv blocks is the "global feature pool"; each task selects
features from it with its own soft attention mask at every block. For block j
with intermediate shared feature u_j (after the block's first conv) and output
p_j (after its last conv):

  a_k^j  = sigmoid(conv1x1(relu(norm(conv1x1([u_j ; t_k^{j-1}])))))  # task k
  ahat_k^j = a_k^j * p_j                                          # elementwise
  t_k^j  = maxpool(relu(norm(conv3x3(ahat_k^j))))                 # to block j+1

where `[ ; ]` concatenates channels (block 0 has only u_0) and the 3x3 conv
f^j maps block j's channels to block j+1's. Task k's head reads `ahat_k^{J-1}`
of the last block, flattened (or globally averaged, `pool="mean"`).

Params: `{"shared": {"block_<j>": {"conv_0", "norm_0", "conv_1", "norm_1"},
                     "transfer_<j>": {"conv", "norm"}},      # f^j, j < J-1
          "tasks": {task: {"attention_<j>": {"conv_0", "norm", "mask_logits"},
                           "head": <Head params>}}}`.
The transfer convs f^j are shared by all tasks, as in the authors' code
(`encoder_block_att` in github.com/lorenmt/mtan); the masks' g and h convs are
per task.

Differences from the paper: the encoder half only (the SegNet decoder and its
attention modules for dense prediction are left out; dense outputs come from
the `Head`); GroupNorm instead of BatchNorm (see trunks.py for why); and no
normalisation before the mask's sigmoid, so that `mask_logits` (a plain 1x1
conv) fixes the mask and e.g. a large bias forces it to 1. Each block has two
3x3 convs and blocks are joined by 2x2 max pooling.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models import heads as heads_lib


def _pool(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2 (`[B, H, W, C] -> [B, H/2, W/2, C]`)."""
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class ConvBlock(nn.Module):
  """Two 3x3 conv + GroupNorm + ReLU layers; returns both activations.

  Attributes:
    channels: output channels of both convs.
    groups: GroupNorm groups (capped at `channels`).
  """

  channels: int
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    groups = min(self.groups, self.channels)
    u = nn.relu(nn.GroupNorm(num_groups=groups, name="norm_0")(
        nn.Conv(self.channels, (3, 3), name="conv_0")(x)))  # [B, H, W, C]
    p = nn.relu(nn.GroupNorm(num_groups=groups, name="norm_1")(
        nn.Conv(self.channels, (3, 3), name="conv_1")(u)))  # [B, H, W, C]
    return u, p


class Transfer(nn.Module):
  """f^j: 3x3 conv + GroupNorm + ReLU, then 2x2 max pool to the next block."""

  channels: int
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.channels, (3, 3), name="conv")(x)
    x = nn.GroupNorm(num_groups=min(self.groups, self.channels), name="norm")(x)
    return _pool(nn.relu(x))  # [B, H/2, W/2, channels]


class AttentionMask(nn.Module):
  """g then h: 1x1 conv + GroupNorm + ReLU, then 1x1 conv + sigmoid.

  Attributes:
    channels: channels of the mask (those of the shared feature it gates).
    groups: GroupNorm groups (capped at `channels`).
  """

  channels: int
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.channels, (1, 1), name="conv_0")(x)
    x = nn.relu(nn.GroupNorm(num_groups=min(self.groups, self.channels),
                             name="norm")(x))
    return nn.sigmoid(nn.Conv(self.channels, (1, 1), name="mask_logits")(x))


class _SharedNet(nn.Module):
  """The backbone blocks and the transfer convs f^j."""

  channels: Sequence[int]
  groups: int

  def setup(self):
    self.blocks = [ConvBlock(c, self.groups, name=f"block_{j}")
                   for j, c in enumerate(self.channels)]
    self.transfers = [Transfer(c, self.groups, name=f"transfer_{j}")
                      for j, c in enumerate(self.channels[1:])]

  def encode(self, x: jax.Array) -> jax.Array:
    """The backbone alone: the last block's output p_{J-1}."""
    for j, block in enumerate(self.blocks):
      if j:
        x = _pool(x)
      _, x = block(x)
    return x


class _TaskAttention(nn.Module):
  """One task's attention masks (one per block) and head."""

  output_shape: tuple[int, ...]
  channels: Sequence[int]
  head_hidden_sizes: Sequence[int]
  groups: int

  def setup(self):
    self.masks = [AttentionMask(c, self.groups, name=f"attention_{j}")
                  for j, c in enumerate(self.channels)]
    self.head = heads_lib.Head(output_shape=tuple(self.output_shape),
                               hidden_sizes=tuple(self.head_hidden_sizes))


class _Tasks(nn.Module):
  """Holds one `_TaskAttention` per task, each named after its task."""

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  channels: Sequence[int]
  head_hidden_sizes: Sequence[int]
  groups: int

  def setup(self):
    self.attention = {
        name: _TaskAttention(tuple(shape), self.channels,
                             self.head_hidden_sizes, self.groups, name=name)
        for name, shape in self.tasks_output_shapes.items()}


class MTANModel(nn.Module):
  """A shared conv backbone with per-task attention masks at every block.

  Params are `{"shared": {"block_<j>", "transfer_<j>"}, "tasks": {task:
  {"attention_<j>", "head"}}}` (see the module docstring). No auxiliary losses.

  Attributes:
    tasks_output_shapes: `{task_name: output_shape}` in task order, e.g.
      `{"left": (10,), "sum": ()}`.
    channels: channels of each backbone block; blocks after the first halve
      the resolution (2x2 max pooling).
    head_hidden_sizes: hidden widths of each task's `Head`.
    pool: how a head reads the last task feature `[B, H, W, C]`: "flatten"
      (keeps the spatial layout, as trunks.ConvNet does) or "mean" (global
      average pooling).
    groups: GroupNorm groups (capped at each layer's channels; must divide
      them).
  """

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  channels: Sequence[int] = (16, 32, 64)
  head_hidden_sizes: Sequence[int] = ()
  pool: str = "flatten"
  groups: int = 8

  def setup(self):
    heads_lib.check_tasks("MTANModel", self.tasks_output_shapes)
    if not self.channels:
      raise ValueError("MTANModel: channels is empty; give one entry per block")
    if self.pool not in ("flatten", "mean"):
      raise ValueError(f"MTANModel: unknown pool {self.pool!r}; valid: "
                       "flatten, mean")
    channels = tuple(self.channels)
    self.shared = _SharedNet(channels, self.groups)
    self.tasks = _Tasks(self.tasks_output_shapes, channels,
                        tuple(self.head_hidden_sizes), self.groups)

  def _readout(self, x: jax.Array) -> jax.Array:
    """`[B, H, W, C]` -> `[B, D]` head input."""
    if self.pool == "mean":
      return jnp.mean(x, axis=(1, 2))
    return x.reshape(x.shape[0], -1)

  def __call__(self, inputs: jax.Array, *, train: bool = False
               ) -> dict[str, jax.Array]:
    """Returns `{task: prediction [B, *output_shape]}`.

    Args:
      inputs: images `[B, H, W, C]`.
      train: unused (no dropout or normalisation statistics); kept for the
        common model signature.

    Raises:
      ValueError: if `inputs` are not `[B, H, W, C]`.
    """
    del train
    if inputs.ndim != 4:
      raise ValueError(f"MTANModel: inputs must be images [B, H, W, C], got "
                       f"shape {inputs.shape}")
    shared, tasks = self.shared, self.tasks.attention
    num_blocks = len(self.channels)
    task_features = {name: None for name in tasks}  # t_k^{j-1}
    x = inputs
    for j in range(num_blocks):
      if j:
        x = _pool(x)
      u, p = shared.blocks[j](x)  # [B, H_j, W_j, C_j] each
      for name, attention in tasks.items():
        prev = task_features[name]
        mask_in = u if prev is None else jnp.concatenate([u, prev], axis=-1)
        selected = attention.masks[j](mask_in) * p  # ahat_k^j
        task_features[name] = (shared.transfers[j](selected)
                               if j < num_blocks - 1 else selected)
      x = p
    return {name: attention.head(self._readout(task_features[name]))
            for name, attention in tasks.items()}

  def encode(self, inputs: jax.Array) -> jax.Array:
    """The shared backbone's last feature map `[B, H', W', C_last]`.

    With every attention mask equal to 1 each task's head reads exactly this
    (flattened or averaged).
    """
    return self.shared.encode(inputs)
