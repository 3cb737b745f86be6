"""Vision pretext transforms: pure, jit-able `(rng, images) -> (view, target, mask)`.

A pretext makes a label from the inputs themselves: it corrupts a batch of
images `[B, H, W, C]` (float32) into a *view* that the shared trunk reads in
place of the inputs, and returns the *target* that the pretext's head
predicts, with a `[B]` float32 mask of ones (the train step restricts the rows
later: labelled only, unlabelled only, or all).

Every transform
  - keeps the view's shape equal to the images' shape, so the trunk reads it
    unchanged;
  - gives a target of a fixed shape per example (`Pretext.target_shape`);
  - draws its randomness only from `rng` (batched draws of `B` values), so it is
    deterministic for a key and runs inside `jax.jit` (all shapes are static);
  - calls its `check` on the static image shape at trace time, so bad
    configurations fail before any computation, with a message naming the
    problem.

Pretexts (`get_pretext(name, **hyperparams)`, the names in `PRETEXTS`):
  grid_mask      one cell of an r x c grid per example is set to `fill`; the
                 target is the original cell `[H/r, W/c, C]`.
  blur_region    an h x w region per example is replaced by its Gaussian-blurred
                 version; the target is the original region `[h, w, C]`.
  colourise      the view is the BT.601 luminance replicated to 3 channels; the
                 target is the colour the view lacks, the chroma `image -
                 view` (per channel, so that `view + target` is the colour
                 image and the error of the target is the error of the
                 colour image), or with `target="rgb"` the colour image.
  super_resolve  the view is the image average-pooled by `factor` and repeated
                 back to the input size; the target is the image. When H or W
                 is not a multiple of `factor`, the divisible top-left part is
                 pooled and repeated and the remaining rows/columns repeat the
                 last pooled row/column (edge padding).
  denoise        the view is the image plus Gaussian noise; target the image.
  reconstruct    the view and the target are the image (an autoencoder); its
                 view is the inputs unchanged (`view_id == "identity"`), so
                 it shares the supervised tasks' trunk pass.
  rotate         each example is rotated by k * 90 degrees (counter-clockwise,
                 as `np.rot90` on the H, W axes), k in {0, 1, 2, 3}; the target
                 is k (int32, a 4-way classification). Non-square images are
                 rejected by `check` unless `half_turns_only=True`, which draws
                 k in {0, 2} only (a 180-degree turn keeps the shape; the label
                 stays in the 4-way space).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp

from mtl_jax.tasks import IDENTITY_VIEW

Shape = tuple[int, ...]
Transform = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array,
                                                  jax.Array]]

# ITU-R BT.601 luma weights (R, G, B).
BT601 = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class Pretext:
  """One pretext task: its transform, target shape, input check, loss, metrics.

  Attributes:
    name: the pretext's name (a key of `PRETEXTS`).
    transform: `(rng, images [B, H, W, C]) -> (view, target, mask)`, pure and
      jit-able; `view` has the images' shape, `target` is `[B, *target_shape]`,
      `mask` is `[B]` float32 ones.
    target_shape: `(H, W, C) -> shape` of one example's target.
    check: `(H, W, C) -> None`; raises ValueError naming the problem when the
      pretext cannot run on images of that shape. `transform` calls it too.
    loss: the loss name of the head: "mse", "l1" or "softmax_ce".
    metrics: the metric names: ("psnr",) or ("accuracy",).
    num_classes: the number of classes for a classification pretext, else None.
    target_dtype: the target's dtype.
    hyperparams: the hyperparameters it was built with (for logs/configs).
    view_id: what identifies the view the transform makes: pretext tasks may
      share a view (one trunk pass) only if their view ids are equal, i.e. the
      same key gives the same view. Defaults to the name and hyperparameters;
      `"identity"` for a pretext whose view is its inputs unchanged.
    residual: the target is the image minus the view (colourise's chroma),
      so a head that outputs 0 leaves the view as it is.
    from_features: False: the labels come from the transform (a clustering
      task's come from the shared features; `mtl_jax.pretext.cluster`).
  """
  name: str
  transform: Transform
  target_shape: Callable[[Shape], Shape]
  check: Callable[[Shape], None]
  loss: str
  metrics: tuple[str, ...]
  num_classes: int | None = None
  target_dtype: Any = jnp.float32
  hyperparams: dict[str, Any] = dataclasses.field(default_factory=dict)
  view_id: Any = None
  residual: bool = False
  from_features: ClassVar[bool] = False

  def __post_init__(self):
    if self.view_id is None:
      object.__setattr__(self, "view_id", (self.name, tuple(
          sorted((k, repr(v)) for k, v in self.hyperparams.items()))))

  def __call__(self, rng, images):
    return self.transform(rng, images)


def _image_shape(images) -> Shape:
  if images.ndim != 4:
    raise ValueError(
        f"vision pretexts take a batch of images [B, H, W, C]; got shape "
        f"{tuple(images.shape)}")
  return tuple(int(d) for d in images.shape[1:])


def _ones_mask(images):
  return jnp.ones((images.shape[0],), jnp.float32)


def _check_image_shape(name: str, image_shape: Shape) -> tuple[int, int, int]:
  if len(image_shape) != 3:
    raise ValueError(
        f"{name}: expected one image's shape (H, W, C), got {image_shape}")
  h, w, c = image_shape
  if min(h, w, c) < 1:
    raise ValueError(f"{name}: empty image shape {image_shape}")
  return h, w, c


def _pair(value, what: str) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2:
    raise ValueError(f"{what} must be an int or a pair (rows, cols), got "
                     f"{value}")
  return int(value[0]), int(value[1])


def _crop(images, top, left, size: tuple[int, int]):
  """Per-example crop `[B, h, w, C]` at the per-example corners `top, left`."""
  c = images.shape[-1]

  def one(image, y, x):
    return jax.lax.dynamic_slice(image, (y, x, 0), (size[0], size[1], c))

  return jax.vmap(one)(images, top, left)


def _region_mask(shape_hw, top, left, size):
  """`[B, H, W, 1]` bool: True inside each example's h x w region."""
  h, w = shape_hw
  ys = jnp.arange(h)[None, :]
  xs = jnp.arange(w)[None, :]
  in_y = (ys >= top[:, None]) & (ys < top[:, None] + size[0])
  in_x = (xs >= left[:, None]) & (xs < left[:, None] + size[1])
  return (in_y[:, :, None] & in_x[:, None, :])[..., None]


# ----------------------------------------------------------------------------
# Grid-cell masking.


def grid_cells(rng, batch: int, grid, cell: int | None = None):
  """The cell index per example `[B]` int32 that `grid_mask` blanks for `rng`.

  Row-major: cell `i` is at grid row `i // cols`, column `i % cols`.
  """
  rows, cols = _pair(grid, "grid")
  if cell is not None:
    return jnp.full((batch,), cell, jnp.int32)
  return jax.random.randint(rng, (batch,), 0, rows * cols, dtype=jnp.int32)


def grid_mask(grid=(2, 2), cell: int | None = None,
              fill: float = 0.0) -> Pretext:
  """Blank one grid cell per example; the head reconstructs that cell.

  Args:
    grid: `(rows, cols)` (or an int for a square grid); H and W must be
      multiples of rows and cols.
    cell: a fixed row-major cell index for every example, or None for a
      uniformly random cell per example (from `rng`).
    fill: the value written into the blanked cell.
  """
  rows, cols = _pair(grid, "grid")
  if rows < 1 or cols < 1:
    raise ValueError(f"grid_mask: grid {(rows, cols)} must be at least 1 x 1")
  if cell is not None and not 0 <= cell < rows * cols:
    raise ValueError(
        f"grid_mask: cell {cell} is outside the {rows} x {cols} grid "
        f"(cells 0..{rows * cols - 1})")

  def check(image_shape):
    h, w, _ = _check_image_shape("grid_mask", image_shape)
    if h % rows or w % cols:
      raise ValueError(
          f"grid_mask: grid {rows} x {cols} does not divide the image "
          f"(H, W, C) = {tuple(image_shape)}: H % rows = {h % rows}, "
          f"W % cols = {w % cols}")

  def target_shape(image_shape):
    check(image_shape)
    h, w, c = image_shape
    return (h // rows, w // cols, c)

  def transform(rng, images):
    image_shape = _image_shape(images)
    check(image_shape)
    h, w, _ = image_shape
    ch, cw = h // rows, w // cols
    idx = grid_cells(rng, images.shape[0], (rows, cols), cell)
    top, left = (idx // cols) * ch, (idx % cols) * cw
    inside = _region_mask((h, w), top, left, (ch, cw))
    view = jnp.where(inside, jnp.asarray(fill, images.dtype), images)
    target = _crop(images, top, left, (ch, cw))
    return view, target, _ones_mask(images)

  return Pretext("grid_mask", transform, target_shape, check, loss="mse",
                 metrics=("psnr",),
                 hyperparams=dict(grid=(rows, cols), cell=cell, fill=fill))


# ----------------------------------------------------------------------------
# Region blurring.


def gaussian_kernel(sigma: float, radius: int | None = None):
  """A normalised 1-D Gaussian kernel of `2 * radius + 1` taps (radius defaults
  to ceil(3 sigma))."""
  if radius is None:
    radius = max(1, int(math.ceil(3.0 * sigma)))
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * (x / sigma) ** 2)
  return k / jnp.sum(k)


def gaussian_blur(images, sigma: float):
  """Separable Gaussian blur of `[B, H, W, C]` images, edge-padded borders."""
  kernel = gaussian_kernel(sigma)
  radius = (kernel.shape[0] - 1) // 2
  h, w = images.shape[1], images.shape[2]
  padded = jnp.pad(images, ((0, 0), (radius, radius), (0, 0), (0, 0)),
                   mode="edge")
  out = sum(kernel[i] * padded[:, i:i + h] for i in range(kernel.shape[0]))
  padded = jnp.pad(out, ((0, 0), (0, 0), (radius, radius), (0, 0)),
                   mode="edge")
  return sum(kernel[i] * padded[:, :, i:i + w] for i in range(kernel.shape[0]))


def blur_region(size=(8, 8), sigma: float = 2.0) -> Pretext:
  """Blur a random `size` region per example; the head restores it.

  The whole image is blurred (separably, edge-padded) and the blurred pixels
  replace the originals inside the region only. The region's top-left corner
  is uniform over the positions where it fits in the image.
  """
  rh, rw = _pair(size, "size")
  if rh < 1 or rw < 1:
    raise ValueError(f"blur_region: size {(rh, rw)} must be at least 1 x 1")
  if not sigma > 0:
    raise ValueError(f"blur_region: sigma must be > 0, got {sigma}")

  def check(image_shape):
    h, w, _ = _check_image_shape("blur_region", image_shape)
    if rh > h or rw > w:
      raise ValueError(
          f"blur_region: region {rh} x {rw} is larger than the image "
          f"(H, W, C) = {tuple(image_shape)}")

  def target_shape(image_shape):
    check(image_shape)
    return (rh, rw, image_shape[2])

  def transform(rng, images):
    image_shape = _image_shape(images)
    check(image_shape)
    h, w, _ = image_shape
    b = images.shape[0]
    ky, kx = jax.random.split(rng)
    top = jax.random.randint(ky, (b,), 0, h - rh + 1, dtype=jnp.int32)
    left = jax.random.randint(kx, (b,), 0, w - rw + 1, dtype=jnp.int32)
    blurred = gaussian_blur(images, sigma)
    inside = _region_mask((h, w), top, left, (rh, rw))
    view = jnp.where(inside, blurred, images)
    target = _crop(images, top, left, (rh, rw))
    return view, target, _ones_mask(images)

  return Pretext("blur_region", transform, target_shape, check, loss="mse",
                 metrics=("psnr",),
                 hyperparams=dict(size=(rh, rw), sigma=sigma))


# ----------------------------------------------------------------------------
# Colourisation.


def luminance(images):
  """BT.601 luminance `[..., 1]` of RGB images `[..., 3]`."""
  weights = jnp.asarray(BT601, images.dtype)
  return jnp.sum(images * weights, axis=-1, keepdims=True)


def _image_target_pretext(name: str, corrupt: Callable[[jax.Array, jax.Array],
                                                        jax.Array],
                          check_shape: Callable[[int, int, int], None] | None
                          = None, view_id: Any = None,
                          **hyperparams: Any) -> Pretext:
  """A pretext whose target is the whole image: the view is
  `corrupt(rng, images)`, `check_shape(h, w, c)` adds its own input checks
  to the common ones."""

  def check(image_shape):
    h, w, c = _check_image_shape(name, image_shape)
    if check_shape is not None:
      check_shape(h, w, c)

  def target_shape(image_shape):
    check(image_shape)
    return tuple(image_shape)

  def transform(rng, images):
    check(_image_shape(images))
    return corrupt(rng, images), images, _ones_mask(images)

  return Pretext(name, transform, target_shape, check, loss="mse",
                 metrics=("psnr",), hyperparams=hyperparams, view_id=view_id)


COLOUR_TARGETS = ("chroma", "rgb")


def colourise(target: str = "chroma") -> Pretext:
  """See the luminance (replicated to 3 channels), predict the colour.

  Args:
    target: "chroma": the colour image minus the view (what the grey image
      lacks; a head that outputs 0 reproduces the grey image, so it learns
      only the colour, as colourisers predict chrominance given lightness);
      "rgb": the colour image itself.
  """
  if target not in COLOUR_TARGETS:
    raise ValueError(f"colourise: unknown target {target!r}; valid: "
                     f"{', '.join(COLOUR_TARGETS)}")

  def check_shape(h, w, c):
    if c != 3:
      raise ValueError(
          f"colourise: colourisation needs RGB images (C = 3); got C = {c} "
          f"in (H, W, C) = {(h, w, c)} (greyscale inputs have no colour to "
          f"predict)")

  grey = lambda x: jnp.repeat(luminance(x), 3, axis=-1)
  if target == "rgb":
    return _image_target_pretext("colourise", lambda rng, x: grey(x),
                                 check_shape, target=target)
  pretext = _image_target_pretext("colourise", lambda rng, x: grey(x),
                                  check_shape, target=target)

  def transform(rng, images):
    view, image, mask = pretext.transform(rng, images)
    return view, image - view, mask

  return dataclasses.replace(pretext, transform=transform, residual=True)


def unchanged_target(pretext: Pretext, view: jax.Array) -> jax.Array:
  """The target of a whole-image pretext that leaves the view as it is:
  the view itself, or zeros where the target is a residual over the view
  (`Pretext.residual`). The "identity" baseline of `learnability`."""
  return jnp.zeros_like(view) if pretext.residual else view


# ----------------------------------------------------------------------------
# Super-resolution.


def downsample_upsample(images, factor: int):
  """Average-pool by `factor`, repeat back to the input size.

  Non-divisible H or W: the top-left `(H // f) * f` x `(W // f) * f` part is
  pooled and repeated; the remaining rows/columns are edge-padded (they repeat
  the last pooled row/column).
  """
  b, h, w, c = images.shape
  hp, wp = h // factor, w // factor
  cropped = images[:, :hp * factor, :wp * factor]
  pooled = cropped.reshape(b, hp, factor, wp, factor, c).mean(axis=(2, 4))
  up = jnp.repeat(jnp.repeat(pooled, factor, axis=1), factor, axis=2)
  pad_h, pad_w = h - hp * factor, w - wp * factor
  if pad_h or pad_w:
    up = jnp.pad(up, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
  return up


def super_resolve(factor: int = 2) -> Pretext:
  """See the image down-sampled by `factor` (brought back to the input size),
  predict the original."""
  if not isinstance(factor, int) or factor < 1:
    raise ValueError(
        f"super_resolve: factor must be an integer >= 1, got {factor!r}")

  def check_shape(h, w, c):
    if factor > h or factor > w:
      raise ValueError(
          f"super_resolve: down-sampling factor {factor} is larger than the "
          f"image (H, W, C) = {(h, w, c)}")

  return _image_target_pretext(
      "super_resolve", lambda rng, x: downsample_upsample(x, factor),
      check_shape, factor=factor)


# ----------------------------------------------------------------------------
# Denoising and reconstruction.


def denoise(noise_std: float = 0.1) -> Pretext:
  """See the image plus N(0, noise_std^2) noise, predict the image."""
  if not noise_std >= 0:
    raise ValueError(f"denoise: noise_std must be >= 0, got {noise_std}")
  return _image_target_pretext(
      "denoise", lambda rng, x: x + jax.random.normal(rng, x.shape, x.dtype)
      * noise_std, noise_std=noise_std)


def reconstruct() -> Pretext:
  """An autoencoder: the view and the target are the image."""
  return _image_target_pretext("reconstruct", lambda rng, x: x,
                               view_id=IDENTITY_VIEW)


# ----------------------------------------------------------------------------
# Rotation prediction.


def rotate(half_turns_only: bool = False) -> Pretext:
  """Rotate each example by k * 90 degrees; the head predicts k (4 classes).

  The rotation is counter-clockwise in the (H, W) plane, as `np.rot90(image,
  k)`. The view must keep the images' shape, which a quarter turn of a
  non-square image cannot: `check` rejects H != W unless `half_turns_only`,
  which draws k in {0, 2} only (labels still in the 4-way space).
  """

  def check(image_shape):
    h, w, _ = _check_image_shape("rotate", image_shape)
    if h != w and not half_turns_only:
      raise ValueError(
          f"rotate: 90-degree rotation of a non-square image (H, W, C) = "
          f"{tuple(image_shape)} changes its shape; use square images or "
          f"rotate(half_turns_only=True) for 0/180 degrees only")

  def target_shape(image_shape):
    check(image_shape)
    return ()

  def transform(rng, images):
    check(_image_shape(images))
    b = images.shape[0]
    if half_turns_only:
      k = 2 * jax.random.randint(rng, (b,), 0, 2, dtype=jnp.int32)
      turns = (0, 2)
    else:
      k = jax.random.randint(rng, (b,), 0, 4, dtype=jnp.int32)
      turns = (0, 1, 2, 3)
    view = images
    for t in turns[1:]:
      rotated = jnp.rot90(images, t, axes=(1, 2))
      view = jnp.where((k == t)[:, None, None, None], rotated, view)
    return view, k, _ones_mask(images)

  return Pretext("rotate", transform, target_shape, check, loss="softmax_ce",
                 metrics=("accuracy",), num_classes=4, target_dtype=jnp.int32,
                 hyperparams=dict(half_turns_only=half_turns_only))


# ----------------------------------------------------------------------------
# Name table.

PRETEXTS: dict[str, Callable[..., Pretext]] = {
    "grid_mask": grid_mask,
    "blur_region": blur_region,
    "colourise": colourise,
    "super_resolve": super_resolve,
    "denoise": denoise,
    "reconstruct": reconstruct,
    "rotate": rotate,
}


def get_pretext(name: str, **hyperparams) -> Pretext:
  """The pretext `name` built with `hyperparams` (see `PRETEXTS`)."""
  if name not in PRETEXTS:
    raise ValueError(
        f"unknown pretext {name!r}; valid pretexts: {sorted(PRETEXTS)}")
  return PRETEXTS[name](**hyperparams)


def pretext_names() -> Sequence[str]:
  return sorted(PRETEXTS)
