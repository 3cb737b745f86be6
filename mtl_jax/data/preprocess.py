"""Vectorised host-side image preprocessing to a common input spec.

A data mixture draws images from sources with different sizes, channel counts
and value ranges. `ImageSpec` brings a batch from any of them to one spec:
an optional central crop, a channel conversion, a resize and a normalisation,
each also available as a function here.

Everything is pure numpy on a batch `[N, H, W, C]` and returns numpy: it runs
on the host inside the input pipeline, before batches are put on devices.
Resizing matches `jax.image.resize` ("nearest" exactly, "linear" with or
without antialiasing to float32 rounding) but needs no accelerator: linear
resizes are two small interpolation matrices applied with one einsum, cached
per (input size, output size, method, antialias).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools

import numpy as np

RESIZE_METHODS = ("nearest", "linear")

# ITU-R BT.601 luma weights for (R, G, B).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _check_batch(images: np.ndarray, name: str = "images") -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"{name} must be a batch [N, H, W, C], got shape "
                     f"{images.shape}.")
  return images


def _check_size(size: Sequence[int], name: str = "size") -> tuple[int, int]:
  """`size` as a pair of positive ints.

  Raises:
    ValueError: not a pair, or a non-positive entry.
  """
  size = tuple(size)
  if len(size) != 2 or any(int(s) != s or s <= 0 for s in size):
    raise ValueError(f"{name} must be a pair (h, w) of positive ints, got "
                     f"{size}.")
  return int(size[0]), int(size[1])


def _float(images: np.ndarray) -> np.ndarray:
  """`images` as float32 unless already a floating dtype."""
  if np.issubdtype(images.dtype, np.floating):
    return images
  return images.astype(np.float32)


def central_crop(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """The central `size` window of every image.

  The window starts at `((H - h) // 2, (W - w) // 2)`, so when the margin is
  odd the extra row/column is dropped at the bottom/right.

  Args:
    images: [N, H, W, C].
    size: (h, w), the crop size, at most (H, W).

  Returns:
    [N, h, w, C], a view of `images` with its dtype.

  Raises:
    ValueError: `images` is not 4-D, or `size` is not positive or is larger
      than the images.
  """
  images = _check_batch(images)
  h, w = _check_size(size)
  height, width = images.shape[1:3]
  if h > height or w > width:
    raise ValueError(f"Crop size {(h, w)} is larger than the images "
                     f"{(height, width)}.")
  top, left = (height - h) // 2, (width - w) // 2
  return images[:, top:top + h, left:left + w]


@functools.lru_cache(maxsize=256)
def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Input pixel `floor((i + 0.5) * in / out)` for each output pixel i.

  Computed in float32, in the same order as `jax.image.resize`, so the picks
  match it exactly.
  """
  src = ((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) *
         np.float32(in_size) / np.float32(out_size))
  indices = np.floor(src).astype(np.intp)
  indices.flags.writeable = False
  return indices


@functools.lru_cache(maxsize=256)
def _resize_matrix(in_size: int, out_size: int, method: str,
                   antialias: bool) -> np.ndarray:
  """The [out_size, in_size] float32 matrix resizing one axis.

  Linear follows `jax.image.scale_and_translate` with a triangle kernel and no
  translation: output pixel i samples input coordinate
  `s_i = (i + 0.5) * in / out - 0.5`; the weight of input pixel j is
  `max(0, 1 - |s_i - j| / k)` with `k = max(in / out, 1)` when antialiasing
  (`k = 1` otherwise), each row normalised to sum 1. Nearest is the 0/1
  matrix selecting `_nearest_indices`.
  """
  if method == "nearest":
    matrix = np.zeros((out_size, in_size), np.float32)
    matrix[np.arange(out_size), _nearest_indices(in_size, out_size)] = 1.0
  else:
    inv_scale = in_size / out_size
    kernel_scale = max(inv_scale, 1.0) if antialias else 1.0
    sample = (np.arange(out_size) + 0.5) * inv_scale - 0.5
    dist = np.abs(sample[:, None] - np.arange(in_size)[None, :]) / kernel_scale
    weights = np.maximum(0.0, 1.0 - dist)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.where(np.abs(total) > 1000 * np.finfo(np.float32).eps,
                       weights / np.where(total != 0, total, 1), 0.0)
    inside = (sample >= -0.5) & (sample <= in_size - 0.5)
    matrix = np.where(inside[:, None], weights, 0.0).astype(np.float32)
  matrix.flags.writeable = False
  return matrix


def resize(images: np.ndarray, size: tuple[int, int], method: str = "linear",
           antialias: bool = True) -> np.ndarray:
  """Resizes every image to `size`, like `jax.image.resize` on [N, h, w, C].

  Args:
    images: [N, H, W, C], any real dtype.
    size: (h, w), the output size.
    method: "nearest" or "linear" (bilinear with half-pixel centres).
    antialias: when downsampling with "linear", widen the interpolation
      kernel by the scale factor so it low-pass filters, as JAX does. Ignored
      for "nearest" and when upsampling.

  Returns:
    [N, h, w, C] float32. A same-size resize returns `images` as float32
    (without copying if already float32).

  Raises:
    ValueError: `images` is not 4-D, `size` is not a pair of positive ints,
      or `method` is unknown.
  """
  images = _check_batch(images)
  h, w = _check_size(size)
  if method not in RESIZE_METHODS:
    raise ValueError(f"Unknown resize method {method!r}; valid methods are "
                     f"{RESIZE_METHODS}.")
  images = images.astype(np.float32, copy=False)
  height, width = images.shape[1:3]
  if (height, width) == (h, w):
    return images
  if method == "nearest":
    # An exact gather (also for inf/nan), rather than a 0/1 matrix product.
    return images[:, _nearest_indices(height, h)][:, :,
                                                  _nearest_indices(width, w)]
  antialias = bool(antialias)
  if height == h:
    w_mat = _resize_matrix(width, w, method, antialias)
    return np.einsum("nHWc,wW->nHwc", images, w_mat, optimize=True)
  h_mat = _resize_matrix(height, h, method, antialias)
  if width == w:
    return np.einsum("hH,nHWc->nhWc", h_mat, images, optimize=True)
  w_mat = _resize_matrix(width, w, method, antialias)
  return np.einsum("hH,nHWc,wW->nhwc", h_mat, images, w_mat, optimize=True)


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """Converts images between 1 (grey), 3 (RGB) and 4 (RGBA) channels.

  1 -> 3 repeats the grey channel; 3 -> 1 takes the ITU-R BT.601 luma
  `0.299 R + 0.587 G + 0.114 B`; 4 -> 3 drops alpha; 4 -> 1 drops alpha, then
  takes the luma.

  Args:
    images: [N, H, W, C].
    channels: the number of output channels.

  Returns:
    [N, H, W, channels]. Luma is float32 for non-float inputs (the input
    dtype for float ones); the other conversions keep the dtype. Same count
    returns `images` unchanged.

  Raises:
    ValueError: `images` is not 4-D, or the conversion is not one of the
      above.
  """
  images = _check_batch(images)
  in_channels = images.shape[-1]
  if in_channels == channels:
    return images
  if in_channels == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  if in_channels == 4 and channels in (1, 3):
    images = images[..., :3]
    in_channels = 3
    if channels == 3:
      return images
  if in_channels == 3 and channels == 1:
    images = _float(images)
    weights = np.asarray(LUMA_WEIGHTS, dtype=images.dtype)
    return np.einsum("nhwc,c->nhw", images, weights)[..., None]
  raise ValueError(f"Cannot convert {in_channels} channels to {channels}; "
                   "supported conversions are 1->3, 3->1, 4->3 and 4->1 (or "
                   "an unchanged count).")


def _per_channel(value: float | Sequence[float], num_channels: int,
                 name: str) -> np.ndarray:
  """`value` as a float32 array broadcasting over [..., C]."""
  array = np.asarray(value, dtype=np.float32)
  if array.ndim > 1 or (array.ndim == 1 and array.size not in (1, num_channels)):
    raise ValueError(f"{name} must be a scalar or have one value per channel "
                     f"({num_channels}), got {value}.")
  return array


def normalise(images: np.ndarray, *, scale: float = 1 / 255,
              mean: float | Sequence[float] | None = None,
              std: float | Sequence[float] | None = None) -> np.ndarray:
  """`(images * scale - mean) / std`, per channel, in float32.

  Args:
    images: [..., C].
    scale: multiplies the raw values first (1/255 maps uint8 to [0, 1]).
    mean: subtracted after scaling; a scalar or one value per channel. None
      is 0.
    std: divides last; a scalar or one value per channel, all > 0. None is 1.

  Returns:
    float32 array of the shape of `images`.

  Raises:
    ValueError: `mean` or `std` has the wrong length, or `std` is not
      positive.
  """
  images = np.asarray(images)
  num_channels = images.shape[-1] if images.ndim else 1
  out = images.astype(np.float32) * np.float32(scale)
  if mean is not None:
    out -= _per_channel(mean, num_channels, "mean")
  if std is not None:
    std = _per_channel(std, num_channels, "std")
    if np.any(std <= 0):
      raise ValueError(f"std must be > 0, got {std.tolist()}.")
    out /= std
  return out


def _as_tuple(value, name: str, num_channels: int) -> tuple[float, ...] | None:
  if value is None:
    return None
  values = tuple(float(v) for v in np.ravel(np.asarray(value, dtype=float)))
  if np.ndim(value) > 1 or len(values) not in (1, num_channels):
    raise ValueError(f"{name} must be a scalar or have one value per channel "
                     f"({num_channels}), got {value}.")
  return values


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """A common input spec, and the preprocessing that produces it.

  Calling the spec on a batch applies, in order: the central crop (if any),
  the channel conversion to `c`, the resize to `(h, w)` (skipped when already
  that size) and the normalisation.

  Attributes:
    shape: (h, w, c), the output image shape.
    crop: (h, w) central crop applied first, or None.
    method: resize method, one of RESIZE_METHODS.
    antialias: antialias when downsampling with "linear".
    scale: multiplies raw values before mean/std.
    mean: per-channel (or single) mean subtracted after scaling, or None.
    std: per-channel (or single) std divided by last, or None.
  """

  shape: tuple[int, int, int]
  crop: tuple[int, int] | None = None
  method: str = "linear"
  antialias: bool = True
  scale: float = 1 / 255
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  def __post_init__(self):
    shape = tuple(self.shape)
    if len(shape) != 3 or any(int(s) != s or s <= 0 for s in shape):
      raise ValueError(f"shape must be (h, w, c) of positive ints, got "
                       f"{self.shape}.")
    shape = tuple(int(s) for s in shape)
    if shape[2] not in (1, 3, 4):
      raise ValueError(f"shape channels must be 1, 3 or 4, got {shape[2]}.")
    object.__setattr__(self, "shape", shape)
    if self.crop is not None:
      object.__setattr__(self, "crop", _check_size(self.crop, "crop"))
    if self.method not in RESIZE_METHODS:
      raise ValueError(f"Unknown resize method {self.method!r}; valid methods "
                       f"are {RESIZE_METHODS}.")
    if not np.isfinite(self.scale):
      raise ValueError(f"scale must be finite, got {self.scale}.")
    object.__setattr__(self, "mean", _as_tuple(self.mean, "mean", shape[2]))
    std = _as_tuple(self.std, "std", shape[2])
    if std is not None and min(std) <= 0:
      raise ValueError(f"std must be > 0, got {std}.")
    object.__setattr__(self, "std", std)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Preprocesses a batch to this spec.

    Args:
      images: [N, H, W, C] or [N, H, W] (one channel), any real dtype.

    Returns:
      [N, h, w, c] float32.

    Raises:
      ValueError: `images` is not 3-D or 4-D, the crop is larger than the
        images, or their channels cannot be converted to `c`.
    """
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    elif images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C] or [N, H, W], got shape "
                       f"{images.shape}.")
    h, w, c = self.shape
    if self.crop is not None:
      images = central_crop(images, self.crop)
    images = convert_channels(images, c)
    if images.shape[1:3] != (h, w):
      images = resize(images, (h, w), self.method, self.antialias)
    return normalise(images, scale=self.scale, mean=self.mean, std=self.std)
