"""Which corruptions can be learned: a trained pretext head against baselines.

A pretext head that reaches some PSNR says little alone: a blanked cell of a
flat sky is "restored" by the mean image, and a blurred region by the blurred
pixels. This module scores a head's predictions against trivial baselines that
need no training, so the gain in dB is what the model learned beyond them.

The model is a plain callable `predict(views) -> predictions` (the trained
head applied to the pretext's view; any model, or a closed-form predictor), so a
script can close over a checkpoint's parameters:

  predict = lambda views: model.apply(params, views)["grid_mask"]
  result = grid_cell_quality(predict, eval_images, (4, 4),
                             reference=train_images.mean(axis=0))
  write_json(result, "cells.json"); plot_cell_heatmaps(result, "cells.png")

Baselines (their exact definitions, also in `BASELINE_DEFINITIONS`):
  mean_image   the reference image `[H, W, C]` (the caller should pass the mean
               TRAINING image; the default, the mean of the evaluated images,
               peeks at the held-out set) cropped to the target's region.
  interpolate  harmonic (Laplace) inpainting of the hole from the view's pixels
               around it: the hole's values `u` solve, for every hole pixel p,
               `deg(p) * u_p = sum of u_q over p's 4-neighbours q in the image`,
               known pixels fixed at their view values and `deg(p)` the number
               of p's 4-neighbours inside the image (no neighbours beyond the
               image border: a zero-gradient, Neumann border). It is the
               smoothest fill; it restores any constant exactly and a linear
               ramp exactly when the hole does not touch the image border.
               Solved directly (sparse LU, once per hole geometry), not
               iterated. Undefined (None) when the hole is the whole image.
  identity     the view itself cropped to the target's region: the fill value
               for grid_mask, the blurred pixels for blur_region, the grey
               image for colourise, the upsampled image for super_resolve, the
               noisy image for denoise, the image for reconstruct. Where the
               target is a residual over the view (colourise's default chroma
               target) it is the zero residual, i.e. the grey image again,
               and `mean_image` is the reference's chroma added to the view.

PSNR is per example and averaged over examples, exactly as `metrics.psnr`:
`10 * log10(max_value^2 / max(mse_b, PSNR_MSE_FLOOR * max_value^2))`, so at
most `PSNR_CAP_DB` (100 dB); it is computed here in float64 with numpy.
`gain_db` is the model's mean PSNR minus the best baseline's mean PSNR.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.metrics import PSNR_MSE_FLOOR
from mtl_jax.pretext import vision

Predict = Callable[[jax.Array], Any]

PSNR_CAP_DB = 10.0 * math.log10(1.0 / PSNR_MSE_FLOOR)  # 100 dB

BASELINE_DEFINITIONS = {
    "mean_image": (
        "the reference image (the caller's mean training image; by default "
        "the mean of the evaluated images) cropped to the target region"),
    "interpolate": (
        "harmonic (Laplace) inpainting of the hole from the view's pixels "
        "around it: deg(p) u_p = sum of u over p's in-image 4-neighbours, "
        "known pixels fixed, no neighbours beyond the image border "
        "(zero-gradient border); solved exactly by sparse LU"),
    "identity": ("the view itself cropped to the target region (the zero "
                 "residual for colourise's chroma target: the grey image)"),
}

# The pretexts whose target is an image or an image region.
IMAGE_PRETEXTS = ("grid_mask", "blur_region", "colourise", "super_resolve",
                  "denoise", "reconstruct")
CLASS_PRETEXTS = ("rotate",)


# ----------------------------------------------------------------------------
# PSNR, as metrics.psnr.


def psnr_per_example(pred, target, max_value: float = 1.0):
  """Per-example MSE and PSNR (dB) with `metrics.psnr`'s floor.

  Args:
    pred: `[N, ...]` predictions.
    target: `[N, ...]` targets, the same shape.
    max_value: the largest possible signal value.

  Returns:
    `(mse [N], psnr [N])` float64 numpy arrays.

  Raises:
    ValueError: if the shapes differ or `max_value <= 0`.
  """
  if not max_value > 0:
    raise ValueError(f"max_value must be > 0, got {max_value}")
  pred = np.asarray(pred, np.float64)
  target = np.asarray(target, np.float64)
  if pred.shape != target.shape:
    raise ValueError(f"prediction shape {pred.shape} != target shape "
                     f"{target.shape}")
  peak_sq = float(max_value) ** 2
  sq = np.square(pred - target).reshape(pred.shape[0], -1)
  mse = sq.mean(axis=1)  # [N]
  psnr = 10.0 * np.log10(peak_sq / np.maximum(mse, PSNR_MSE_FLOOR * peak_sq))
  return mse, psnr


def _scores(pred, target, max_value: float) -> dict[str, float]:
  mse, psnr = psnr_per_example(pred, target, max_value)
  return {"mse": float(mse.mean()), "psnr": float(psnr.mean())}


# ----------------------------------------------------------------------------
# Harmonic inpainting.


@functools.lru_cache(maxsize=64)
def _harmonic_solver(h: int, w: int, at_top: bool, at_bottom: bool,
                     at_left: bool, at_right: bool):
  """The sparse LU of the h x w hole's Laplace system, or None if the hole
  has no known neighbour (it touches all four image borders)."""
  if at_top and at_bottom and at_left and at_right:
    return None
  import scipy.sparse  # pylint: disable=g-import-not-at-top
  import scipy.sparse.linalg  # pylint: disable=g-import-not-at-top
  idx = np.arange(h * w).reshape(h, w)
  # deg(p): p's 4-neighbours inside the image.
  deg = np.full((h, w), 4.0)
  for touches, rows in ((at_top, 0), (at_bottom, -1)):
    if touches:
      deg[rows, :] -= 1
  for touches, cols in ((at_left, 0), (at_right, -1)):
    if touches:
      deg[:, cols] -= 1
  # Hole-hole neighbour pairs: horizontal, then vertical.
  a = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
  b = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
  n = h * w
  adj = scipy.sparse.coo_matrix(
      (np.ones(2 * a.size), (np.concatenate([a, b]), np.concatenate([b, a]))),
      shape=(n, n))
  system = scipy.sparse.diags(deg.ravel()) - adj
  return scipy.sparse.linalg.splu(system.tocsc())


def _harmonic_one_hole(views, top: int, left: int, size: tuple[int, int]):
  """Harmonic fill `[N, h, w, C]` of one hole position shared by all views."""
  n, height, width, c = views.shape
  h, w = size
  flags = (top == 0, top + h == height, left == 0, left + w == width)
  solver = _harmonic_solver(h, w, *flags)
  if solver is None:
    return None
  at_top, at_bottom, at_left, at_right = flags
  # The right-hand side: the known 4-neighbours just outside the hole.
  rhs = np.zeros((n, h, w, c))
  if not at_top:
    rhs[:, 0] += views[:, top - 1, left:left + w]
  if not at_bottom:
    rhs[:, -1] += views[:, top + h, left:left + w]
  if not at_left:
    rhs[:, :, 0] += views[:, top:top + h, left - 1]
  if not at_right:
    rhs[:, :, -1] += views[:, top:top + h, left + w]
  flat = rhs.transpose(1, 2, 0, 3).reshape(h * w, n * c)  # [hw, N*C]
  filled = solver.solve(flat).reshape(h, w, n, c)
  return filled.transpose(2, 0, 1, 3)


def harmonic_fill(views, top, left, size):
  """Harmonic (Laplace) inpainting of an h x w hole per example.

  Only the pixels outside each example's hole are read (see the module
  docstring for the equations and the image-border rule).

  Args:
    views: `[N, H, W, C]` images; the hole's pixels are ignored.
    top: `[N]` int, each hole's top row.
    left: `[N]` int, each hole's left column.
    size: `(h, w)`, the hole's size.

  Returns:
    `[N, h, w, C]` float64 fill, or None when the hole is the whole image
    (nothing to interpolate from).

  Raises:
    ValueError: if a hole does not fit in the image.
  """
  views = np.asarray(views, np.float64)
  top, left = np.asarray(top, np.int64), np.asarray(left, np.int64)
  h, w = size
  _, height, width, c = views.shape
  if (top.min() < 0 or left.min() < 0 or top.max() + h > height
      or left.max() + w > width):
    raise ValueError(f"harmonic_fill: a {h} x {w} hole does not fit in "
                     f"{height} x {width} images at the given corners")
  out = np.zeros((views.shape[0], h, w, c))
  corners, groups = np.unique(np.stack([top, left], 1), axis=0,
                              return_inverse=True)
  for g, (y, x) in enumerate(corners):
    rows = np.nonzero(groups.ravel() == g)[0]
    filled = _harmonic_one_hole(views[rows], int(y), int(x), (h, w))
    if filled is None:
      return None
    out[rows] = filled
  return out


# ----------------------------------------------------------------------------
# Input checks and batching.


def _as_images(images) -> jax.Array:
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[0] < 1:
    raise ValueError(f"images must be a non-empty batch [N, H, W, C]; got "
                     f"shape {tuple(images.shape)}")
  if not bool(jnp.all(jnp.isfinite(images))):
    raise ValueError("images contain non-finite values")
  return images


def _reference(reference, images) -> tuple[np.ndarray, str]:
  if reference is None:
    return (np.asarray(images, np.float64).mean(axis=0),
            "mean of the evaluated images (peeks at them)")
  reference = np.asarray(reference, np.float64)
  if reference.shape != tuple(images.shape[1:]):
    raise ValueError(f"reference must be one image of shape (H, W, C) = "
                     f"{tuple(images.shape[1:])}; got {reference.shape}")
  if not np.all(np.isfinite(reference)):
    raise ValueError("reference contains non-finite values")
  return reference, "given by the caller"


def _check_common(max_value: float, batch_size: int) -> None:
  if not max_value > 0:
    raise ValueError(f"max_value must be > 0, got {max_value}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _predict_batched(predict: Predict, views, expected: tuple[int, ...],
                     batch_size: int, what: str) -> np.ndarray:
  """`predict` over `views` in batches; checks each output's shape.

  Args:
    predict: `views [n, H, W, C] -> [n, *expected]`.
    views: `[N, H, W, C]`.
    expected: the shape of one example's prediction.
    batch_size: the most views per call.
    what: names the call in error messages.

  Returns:
    `[N, *expected]` float64 predictions.

  Raises:
    ValueError: on a wrong shape or non-finite predictions.
  """
  parts = []
  for start in range(0, views.shape[0], batch_size):
    chunk = views[start:start + batch_size]
    out = np.asarray(predict(chunk), np.float64)
    want = (chunk.shape[0], *expected)
    if out.shape != want:
      raise ValueError(f"{what}: predict returned shape {out.shape} for "
                       f"views of shape {tuple(chunk.shape)}; expected {want}")
    if not np.all(np.isfinite(out)):
      raise ValueError(f"{what}: predict returned non-finite values")
    parts.append(out)
  return np.concatenate(parts, axis=0)


def _crop(images, top, left, size) -> np.ndarray:
  """Per-example crops `[N, h, w, C]` of `images` (numpy)."""
  images = np.asarray(images)
  h, w = size
  ys = np.asarray(top)[:, None] + np.arange(h)[None, :]  # [N, h]
  xs = np.asarray(left)[:, None] + np.arange(w)[None, :]  # [N, w]
  rows = np.arange(images.shape[0])[:, None, None]
  return images[rows, ys[:, :, None], xs[:, None, :]]


def _best(baselines: dict[str, dict[str, float] | None]):
  """The name and PSNR of the baseline with the highest PSNR."""
  scored = {k: v["psnr"] for k, v in baselines.items() if v is not None}
  name = max(scored, key=lambda k: (scored[k], k))
  return name, scored[name]


# ----------------------------------------------------------------------------
# Every grid cell.


def _one_cell(predict: Predict, images, grid, cell: int, fill: float,
              reference, max_value: float, batch_size: int):
  """Model and baseline scores for blanking `cell` of every image."""
  rows, cols = grid
  n, h, w, _ = images.shape
  ch, cw = h // rows, w // cols
  views, target, _ = vision.grid_mask(grid, cell=cell, fill=fill).transform(
      jax.random.PRNGKey(0), images)  # the key is unused for a fixed cell
  pred = _predict_batched(predict, views, tuple(target.shape[1:]), batch_size,
                          f"grid_cell_quality (cell {cell})")
  top = np.full((n,), (cell // cols) * ch)
  left = np.full((n,), (cell % cols) * cw)
  mean_pred = _crop(np.broadcast_to(reference, images.shape), top, left,
                    (ch, cw))
  interp = harmonic_fill(views, top, left, (ch, cw))
  baselines = {
      "mean_image": _scores(mean_pred, target, max_value),
      "interpolate": (None if interp is None else
                      _scores(interp, target, max_value)),
  }
  return _scores(pred, target, max_value), baselines


def _grid_pair(grid) -> tuple[int, int]:
  if isinstance(grid, int):
    return grid, grid
  grid = tuple(grid)
  if len(grid) != 2 or not all(isinstance(g, (int, np.integer)) for g in grid):
    raise ValueError(f"grid must be an int or a pair of ints (rows, cols), "
                     f"got {grid}")
  return int(grid[0]), int(grid[1])


def _as_predictors(predict, num_cells: int) -> list[Predict]:
  if callable(predict):
    return [predict] * num_cells
  predictors = list(predict)
  if len(predictors) != num_cells or not all(map(callable, predictors)):
    raise ValueError(
        f"predict must be a callable or a sequence of {num_cells} callables "
        f"(one per cell, row-major); got {len(predictors)} items")
  return predictors


def grid_cell_quality(predict: Predict | Sequence[Predict], images, grid, *,
                      fill: float = 0.0, reference=None,
                      max_value: float = 1.0,
                      batch_size: int = 256) -> dict[str, Any]:
  """Scores a grid_mask head on every cell against the trivial baselines.

  For each cell i (row-major) of the r x c grid, cell i of every image is
  blanked with `vision.grid_mask(grid, cell=i, fill=fill)`, `predict` maps the
  views to the cell, and its MSE and mean PSNR are compared with the
  `mean_image` and `interpolate` baselines (module docstring).

  Args:
    predict: `views [n, H, W, C] -> [n, H/r, W/c, C]`, the trained head on
      the view; or a sequence of r * c such callables, one per cell.
    images: `[N, H, W, C]` held-out images.
    grid: `(rows, cols)`, or an int for a square grid.
    fill: the value written into the blanked cell (as in training).
    reference: the mean TRAINING image `[H, W, C]`. Pass it: the default, the
      mean of `images`, lets the mean-image baseline peek at the held-out set.
    max_value: the largest possible pixel value (PSNR's peak).
    batch_size: the most views per `predict` call.

  Returns:
    A JSON-serialisable dict: `grid`, shapes, `model` and `baselines` (each
    `{"mse", "psnr"}` as r x c nested lists; None entries where a baseline is
    undefined), `best_baseline` and `best_baseline_psnr`, `gain_db` (model PSNR
    minus best baseline PSNR), and `ranking` (cells by gain, highest first).

  Raises:
    ValueError: on a grid that does not divide the images, a bad `reference`,
      `predict` of the wrong shape or non-finite output, or bad arguments.
  """
  _check_common(max_value, batch_size)
  images = _as_images(images)
  rows, cols = _grid_pair(grid)
  spec = vision.grid_mask((rows, cols), fill=fill)
  spec.check(tuple(images.shape[1:]))
  reference, ref_note = _reference(reference, images)
  predictors = _as_predictors(predict, rows * cols)
  cells = [_one_cell(predictors[i], images, (rows, cols), i, fill, reference,
                     max_value, batch_size) for i in range(rows * cols)]
  return _cell_report(cells, images, (rows, cols), fill, max_value, ref_note)


def _cell_report(cells, images, grid, fill, max_value, ref_note):
  """Arranges per-cell `(model, baselines)` scores into the result dict."""
  rows, cols = grid

  def as_grid(values):
    return [list(values[r * cols:(r + 1) * cols]) for r in range(rows)]

  def field(scores_of, key):
    return as_grid([None if scores_of(i) is None else scores_of(i)[key]
                    for i in range(len(cells))])

  best = [_best(b) for _, b in cells]
  gains = [m["psnr"] - p for (m, _), (_, p) in zip(cells, best)]
  ranking = sorted(range(len(cells)), key=lambda i: (-gains[i], i))
  n, h, w, c = images.shape
  return {
      "kind": "grid_cell_quality",
      "grid": [rows, cols],
      "image_shape": [h, w, c],
      "cell_shape": [h // rows, w // cols, c],
      "num_images": n,
      "fill": float(fill),
      "max_value": float(max_value),
      "psnr_cap_db": PSNR_CAP_DB,
      "reference": ref_note,
      "model": {k: field(lambda i: cells[i][0], k) for k in ("mse", "psnr")},
      "baselines": {
          name: {k: field(lambda i, name=name: cells[i][1][name], k)
                 for k in ("mse", "psnr")}
          for name in ("mean_image", "interpolate")},
      "best_baseline": as_grid([name for name, _ in best]),
      "best_baseline_psnr": as_grid([p for _, p in best]),
      "gain_db": as_grid(gains),
      "ranking": [{"cell": i, "row": i // cols, "col": i % cols,
                   "gain_db": gains[i], "model_psnr": cells[i][0]["psnr"],
                   "best_baseline": best[i][0],
                   "best_baseline_psnr": best[i][1]} for i in ranking],
      "baseline_definitions": {k: BASELINE_DEFINITIONS[k]
                               for k in ("mean_image", "interpolate")},
  }


# ----------------------------------------------------------------------------
# One pretext, as drawn by a key.


def _blur_region_corners(key, batch: int, image_hw, size):
  """The corners `blur_region`'s transform draws for `key`.

  Replicates `vision.blur_region`'s draw (split the key, then one randint
  each for the top and the left), which the transform does not return;
  `_region_corners` checks the result against the target.
  """
  (h, w), (rh, rw) = image_hw, size
  ky, kx = jax.random.split(key)
  top = jax.random.randint(ky, (batch,), 0, h - rh + 1, dtype=jnp.int32)
  left = jax.random.randint(kx, (batch,), 0, w - rw + 1, dtype=jnp.int32)
  return np.asarray(top), np.asarray(left)


def _region_corners(pretext: vision.Pretext, key, images, target):
  """Per-example `(top, left, (h, w))` of a region pretext's target.

  Raises:
    RuntimeError: if the corners do not reproduce the transform's target
      (vision.py's draw changed and this module was not updated).
  """
  n, h, w, _ = images.shape
  size = tuple(int(d) for d in target.shape[1:3])
  if pretext.name == "grid_mask":
    rows, cols = pretext.hyperparams["grid"]
    # The transform's own helper: the same draw for the same key.
    idx = np.asarray(vision.grid_cells(key, n, (rows, cols),
                                       pretext.hyperparams["cell"]))
    top, left = (idx // cols) * size[0], (idx % cols) * size[1]
  else:
    top, left = _blur_region_corners(key, n, (h, w), size)
  if not np.array_equal(_crop(images, top, left, size), np.asarray(target)):
    raise RuntimeError(
        f"pretext_quality: the {pretext.name} region positions regenerated "
        f"from the key do not match the transform's target; "
        f"mtl_jax/pretext/vision.py's draw changed and learnability.py's "
        f"replication must follow it")
  return top, left, size


def _image_quality(predict, pretext, key, images, reference, max_value,
                   batch_size) -> dict[str, Any]:
  """Model vs mean-image, identity (and interpolation for regions)."""
  view, target, _ = pretext.transform(key, images)
  pred = _predict_batched(predict, view, tuple(target.shape[1:]), batch_size,
                          f"pretext_quality ({pretext.name})")
  view_np = np.asarray(view)
  full_ref = np.broadcast_to(reference, images.shape)
  if pretext.name in ("grid_mask", "blur_region"):
    top, left, size = _region_corners(pretext, key, np.asarray(images),
                                      target)
    interp = harmonic_fill(view_np, top, left, size)
    baselines = {
        "mean_image": _scores(_crop(full_ref, top, left, size), target,
                              max_value),
        "identity": _scores(_crop(view_np, top, left, size), target,
                            max_value),
        "interpolate": (None if interp is None else
                        _scores(interp, target, max_value)),
    }
    region = "a region per example (positions regenerated from the key)"
  else:
    unchanged = np.asarray(vision.unchanged_target(pretext, view))
    # The reference as the target sees it: the image itself, or (residual
    # targets) the reference's own residual, e.g. its chroma.
    mean_target = np.asarray(pretext.transform(key, jnp.asarray(
        full_ref, jnp.float32))[1]) if pretext.residual else full_ref
    baselines = {"mean_image": _scores(mean_target, target, max_value),
                 "identity": _scores(unchanged, target, max_value)}
    region = "the whole image"
  model = _scores(pred, target, max_value)
  best_name, best_psnr = _best(baselines)
  return {"metric": "psnr", "target": region, "model": model,
          "baselines": baselines, "best_baseline": best_name,
          "best_baseline_psnr": best_psnr,
          "gain_db": model["psnr"] - best_psnr,
          "psnr_cap_db": PSNR_CAP_DB, "max_value": float(max_value),
          "baseline_definitions": {k: BASELINE_DEFINITIONS[k]
                                   for k in baselines}}


def _class_quality(predict, pretext, key, images,
                   batch_size) -> dict[str, Any]:
  """Accuracy of `predict` (logits `[n, K]` or labels `[n]`) vs chance."""
  view, target, _ = pretext.transform(key, images)
  k = pretext.num_classes
  what = f"pretext_quality ({pretext.name})"
  first = np.asarray(predict(view[:1]))
  expected = (k,) if first.ndim == 2 else ()
  out = _predict_batched(predict, view, expected, batch_size, what)
  labels = out.argmax(axis=-1) if expected else out
  if not expected and not np.array_equal(labels, np.round(labels)):
    raise ValueError(f"{what}: predict returned [n] non-integer values; "
                     f"return logits [n, {k}] or integer labels [n]")
  accuracy = float(np.mean(labels.astype(np.int64) == np.asarray(target)))
  # half_turns_only draws k in {0, 2} only: chance is 1/2, not 1/4.
  drawn = ([0, 2] if pretext.hyperparams.get("half_turns_only")
           else list(range(k)))
  chance = 1.0 / len(drawn)
  return {"metric": "accuracy", "model": {"accuracy": accuracy},
          "num_classes": k, "labels_drawn": drawn, "chance": chance,
          "gain": accuracy - chance}


def _json_value(value):
  if isinstance(value, (tuple, list)):
    return [_json_value(v) for v in value]
  return value


def pretext_quality(predict: Predict, images, pretext: vision.Pretext, key, *,
                    reference=None, max_value: float = 1.0,
                    batch_size: int = 256) -> dict[str, Any]:
  """Scores a pretext head on the pretext as drawn by `key`.

  Applies `pretext.transform(key, images)`, calls `predict(view)` and scores
  it against the target. Image pretexts (`IMAGE_PRETEXTS`) are compared with
  the `mean_image` and `identity` baselines, and the region pretexts
  (grid_mask, blur_region) also with `interpolate`; the region positions,
  which the transforms do not return, are regenerated from `key` (grid_mask
  via `vision.grid_cells`, blur_region by replicating its draw) and checked
  against the target. For every grid cell separately, use
  `grid_cell_quality`. Classification pretexts (rotate) report accuracy
  against chance, 1 / (the number of labels the pretext draws).

  Args:
    predict: the trained head on the view: `view [n, H, W, C] -> [n,
      *target_shape]`; for rotate, logits `[n, num_classes]` or labels `[n]`.
    images: `[N, H, W, C]` held-out images.
    pretext: a `vision.Pretext` (e.g. `vision.get_pretext(name, ...)`).
    key: the PRNG key of the corruption.
    reference: the mean TRAINING image `[H, W, C]`; the default, the mean of
      `images`, peeks at the held-out set.
    max_value: the largest possible pixel value (PSNR's peak).
    batch_size: the most views per `predict` call.

  Returns:
    A JSON-serialisable dict: `pretext`, `hyperparams`, `num_images`,
    `metric`, and for image pretexts `model` and `baselines` (`{"mse",
    "psnr"}` each), `best_baseline`, `best_baseline_psnr`, `gain_db`; for
    classification `model` (`{"accuracy"}`), `chance` and `gain`.

  Raises:
    ValueError: on an unsupported pretext, images the pretext rejects, a bad
      `reference`, or `predict` of the wrong shape or non-finite output.
  """
  _check_common(max_value, batch_size)
  if pretext.name not in IMAGE_PRETEXTS + CLASS_PRETEXTS:
    raise ValueError(f"pretext_quality: unsupported pretext {pretext.name!r}; "
                     f"supported: {IMAGE_PRETEXTS + CLASS_PRETEXTS}")
  images = _as_images(images)
  pretext.check(tuple(images.shape[1:]))
  head = {"kind": "pretext_quality", "pretext": pretext.name,
          "hyperparams": {k: _json_value(v)
                          for k, v in pretext.hyperparams.items()},
          "num_images": int(images.shape[0])}
  if pretext.name in CLASS_PRETEXTS:
    return {**head, **_class_quality(predict, pretext, key, images,
                                     batch_size)}
  reference, ref_note = _reference(reference, images)
  return {**head, "reference": ref_note,
          **_image_quality(predict, pretext, key, images, reference,
                           max_value, batch_size)}


# ----------------------------------------------------------------------------
# Output.


def _annotate(ax, values, labels=None) -> None:
  for r, row in enumerate(values):
    for c, value in enumerate(row):
      text = f"{value:.1f}"
      if labels is not None:
        text += f"\n{labels[r][c]}"
      ax.text(c, r, text, ha="center", va="center", fontsize=8,
              color="black",
              bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.7))


def plot_cell_heatmaps(result: dict[str, Any], path: str) -> None:
  """Writes a PNG of model PSNR, best-baseline PSNR and gain per grid cell.

  Args:
    result: a `grid_cell_quality` result (or its JSON round trip).
    path: the PNG's path; its directory is created if missing.

  Raises:
    ValueError: if `result` is not a grid_cell_quality result.
  """
  if not isinstance(result, dict) or result.get("kind") != "grid_cell_quality":
    raise ValueError("plot_cell_heatmaps takes a grid_cell_quality result "
                     "(a dict with kind == 'grid_cell_quality')")
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  model = np.asarray(result["model"]["psnr"], np.float64)  # [r, c]
  base = np.asarray(result["best_baseline_psnr"], np.float64)  # [r, c]
  gain = np.asarray(result["gain_db"], np.float64)  # [r, c]
  # One PSNR colour scale for the first two panels so they compare by eye.
  lo, hi = min(model.min(), base.min()), max(model.max(), base.max())
  span = max(float(np.abs(gain).max()), 1e-6)  # gain: centred on 0 dB
  rows, cols = result["grid"]
  inch = 0.9  # per grid cell
  fig, axes = plt.subplots(1, 3, figsize=(3 * (1.5 + inch * cols),
                                          1.3 + inch * rows))
  panels = ((model, "model PSNR (dB)", "viridis", lo, hi, None),
            (base, "best baseline PSNR (dB)", "viridis", lo, hi,
             result["best_baseline"]),
            (gain, "gain = model - best baseline (dB)", "RdBu", -span, span,
             None))
  for ax, (values, title, cmap, vmin, vmax, labels) in zip(axes, panels):
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
    _annotate(ax, values.tolist(), labels)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.set_xlabel("grid column", fontsize=8)
    ax.set_ylabel("grid row", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  fig.suptitle(f"grid_mask {rows} x {cols}: {result['num_images']} images",
               fontsize=10)
  fig.tight_layout()
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_json(result: dict[str, Any], path: str) -> None:
  """Writes `result` as JSON atomically (a temporary file, then os.replace).

  Raises:
    ValueError: if `result` holds NaN or infinity (not valid JSON).
  """
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  text = json.dumps(result, indent=2, allow_nan=False)
  with open(path + ".tmp", "w") as f:
    f.write(text + "\n")
  os.replace(path + ".tmp", path)
