"""Text trunks: a convolutional token tagger for per-token (sequence-labelling) tasks.

A text trunk maps int32 token ids `[B, L]` (id 0 = padding, see
`mtl_jax.data.text`) to position-wise features `[B, L, F]`; `Head` then applies
each task's layers per token, so a per-token task (`classification_task(...,
positions=(L,))`) gets logits `[B, L, C]`. Like the image trunks, the last layer
is named "features" (the last shared layer of GradNorm) and `train` switches
dropout on.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

PAD_ID = 0


class ConvBlock(nn.Module):
  """A pre-norm residual 1-D convolution block, blind to padding positions.

  `x + dropout(gelu(conv(layer_norm(x) * mask)))`, then padding zeroed. The
  normalised input is masked before the convolution because LayerNorm maps an
  all-zero padding vector to its bias, which the convolution would otherwise
  carry into the real neighbours of a padding position.

  Attributes:
    kernel_size: width of the convolution window (tokens).
    dropout_rate: dropout on the block's residual branch (training only).
  """

  kernel_size: int = 3
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool = False
               ) -> jax.Array:
    """Applies the block.

    Args:
      x: `[B, L, D]` features, zero at padding positions.
      mask: `[B, L, 1]` float, 1.0 at real tokens and 0.0 at padding.
      train: enables dropout.

    Returns:
      `[B, L, D]` features, zero at padding positions.
    """
    y = nn.LayerNorm()(x) * mask  # [B, L, D]
    y = nn.Conv(x.shape[-1], (self.kernel_size,), padding="SAME")(y)
    y = nn.gelu(y)
    if self.dropout_rate:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return (x + y) * mask  # [B, L, D]


class Tagger(nn.Module):
  """Token embedding, residual 1-D conv blocks, then a per-token dense layer.

  Padding (id 0) never influences a real token: its embedding is zeroed before
  the first block and its activations after every block, so each real token's
  features depend only on the real tokens within `num_layers * (kernel_size -
  1) / 2` positions of it. The output features at padding positions are zero.

  Attributes:
    vocab_size: number of token ids (`len(vocab)`, padding and unknown included).
    embed_dim: embedding and convolution width.
    num_layers: number of residual conv blocks.
    kernel_size: convolution window width (tokens).
    feature_size: width of the final per-token "features" layer.
    dropout_rate: dropout in each block (training only).
  """

  vocab_size: int
  embed_dim: int = 128
  num_layers: int = 2
  kernel_size: int = 3
  feature_size: int = 128
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps token ids `[B, L]` to per-token features `[B, L, feature_size]`.

    Args:
      x: int token ids `[B, L]`, `PAD_ID` (0) at padding positions.
      train: enables dropout.

    Returns:
      `[B, L, feature_size]` features, zero at padding positions.

    Raises:
      ValueError: if `x` is not an integer `[B, L]` array, or a hyperparameter
        is out of range.
    """
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"Tagger: inputs must be integer token ids [B, L], got "
                       f"shape {x.shape} and dtype {x.dtype}")
    if self.vocab_size < 2:
      raise ValueError(f"Tagger: vocab_size must be >= 2 (padding and unknown "
                       f"ids included), got {self.vocab_size}")
    if self.kernel_size < 1 or self.num_layers < 0:
      raise ValueError(f"Tagger: need kernel_size >= 1 and num_layers >= 0, got "
                       f"{self.kernel_size} and {self.num_layers}")
    mask = (x != PAD_ID).astype(jnp.float32)[..., None]  # [B, L, 1]
    h = nn.Embed(self.vocab_size, self.embed_dim)(x) * mask  # [B, L, E]
    for _ in range(self.num_layers):
      h = ConvBlock(self.kernel_size, self.dropout_rate)(h, mask, train=train)
    h = nn.relu(nn.Dense(self.feature_size, name="features")(h))
    return h * mask  # [B, L, feature_size]
