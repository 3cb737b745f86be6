"""Learnability reports: a head that learned a predictable cell beats the
trivial baselines by far there and not at all on a noise cell; the baselines
are exact where they must be; pretext_quality matches its baselines for
identity predictors; the JSON and PNG are written; bad input is rejected."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import metrics
from mtl_jax.pretext import learnability
from mtl_jax.pretext import vision

KEY = jax.random.PRNGKey(3)
GRID = (2, 2)


def _synthetic(n, seed):
  """8x8x1 images on a 2x2 grid of 4x4 cells (row-major cells 0..3).

  Cell 0: smooth random content (3 low-frequency cosines, random weights).
  Cell 1: the left-right mirror of cell 0 (a deterministic function of it).
  Cell 2: the up-down mirror of cell 0 plus uniform noise in +-0.05 (mostly
    predictable).
  Cell 3: i.i.d. uniform noise in [0, 1) (unpredictable).
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.arange(4) + 0.5, np.arange(4) + 0.5, indexing="ij")
  basis = np.stack([np.cos(np.pi * u * yy / 4) * np.cos(np.pi * v * xx / 4)
                    for u, v in ((0, 1), (1, 0), (1, 1))])  # [3, 4, 4]
  smooth = 0.5 + 0.15 * np.einsum("nk,khw->nhw", rng.uniform(-1, 1, (n, 3)),
                                  basis)  # [n, 4, 4], in [0.05, 0.95]
  images = np.empty((n, 8, 8, 1))
  images[:, :4, :4, 0] = smooth
  images[:, :4, 4:, 0] = smooth[:, :, ::-1]
  images[:, 4:, :4, 0] = smooth[:, ::-1, :] + rng.uniform(-0.05, 0.05,
                                                          (n, 4, 4))
  images[:, 4:, 4:, 0] = rng.uniform(0, 1, (n, 4, 4))
  return images.astype(np.float32)


def _ridge_predictors(train, grid, lam=1e-3):
  """One closed-form ridge regression per cell: flattened view (that cell
  blanked with 0) -> flattened cell, fitted on `train`. The "trained head"."""
  rows, cols = grid
  predictors = []
  for cell in range(rows * cols):
    views, target, _ = vision.grid_mask(grid, cell=cell).transform(KEY, train)
    x = np.asarray(views, np.float64).reshape(len(train), -1)  # [n, HWC]
    y = np.asarray(target, np.float64).reshape(len(train), -1)  # [n, hwc]
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    weights = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]),
                              xc.T @ (y - y_mean))  # [HWC, hwc]
    cell_shape = target.shape[1:]

    def predict(v, weights=weights, x_mean=x_mean, y_mean=y_mean,
                cell_shape=cell_shape):
      flat = np.asarray(v, np.float64).reshape(v.shape[0], -1)
      return ((flat - x_mean) @ weights + y_mean).reshape(v.shape[0],
                                                          *cell_shape)

    predictors.append(predict)
  return predictors


@pytest.fixture(scope="module")
def synthetic_result():
  train, test = _synthetic(2000, seed=0), _synthetic(500, seed=1)
  predictors = _ridge_predictors(train, GRID)
  return learnability.grid_cell_quality(
      predictors, test, GRID, reference=train.mean(axis=0), batch_size=128)


def test_predictable_cells_gain_far_more_than_the_noise_cell(
    synthetic_result):
  gain = np.asarray(synthetic_result["gain_db"])  # [2, 2]
  model = np.asarray(synthetic_result["model"]["psnr"])
  # Cells 0 and 1 are exact functions of each other: far above any baseline
  # (measured: model ~99.8 dB, gains ~77 and ~79 dB).
  assert model[0, 0] > 90 and model[0, 1] > 90
  assert gain[0, 0] > 20 and gain[0, 1] > 20
  # Cell 2 is predictable up to +-0.05 noise: a clear but bounded gain.
  assert 3 < gain[1, 0] < gain[0, 0]
  # Cell 3 is noise: nothing beats the mean image.
  assert abs(gain[1, 1]) < 1
  assert synthetic_result["best_baseline"][1][1] == "mean_image"
  order = [r["cell"] for r in synthetic_result["ranking"]]
  assert set(order[:2]) == {0, 1} and order[2:] == [2, 3]
  assert [r["gain_db"] for r in synthetic_result["ranking"]] == sorted(
      gain.ravel().tolist(), reverse=True)


def test_result_fields_are_consistent(synthetic_result):
  r = synthetic_result
  assert r["grid"] == [2, 2] and r["cell_shape"] == [4, 4, 1]
  assert r["num_images"] == 500 and r["reference"] == "given by the caller"
  for i in range(2):
    for j in range(2):
      base = {k: r["baselines"][k]["psnr"][i][j]
              for k in ("mean_image", "interpolate")}
      assert r["best_baseline_psnr"][i][j] == max(base.values())
      assert base[r["best_baseline"][i][j]] == max(base.values())
      assert math.isclose(r["gain_db"][i][j], r["model"]["psnr"][i][j]
                          - r["best_baseline_psnr"][i][j])


def test_psnr_matches_the_metric():
  rng = np.random.default_rng(0)
  pred = rng.uniform(0, 2, (5, 3, 4, 2)).astype(np.float32)
  label = rng.uniform(0, 2, (5, 3, 4, 2)).astype(np.float32)
  label[0] = pred[0]  # one exact example: at the cap
  metric = metrics.psnr(max_value=2.0)
  expected = metric.finalize(metric.stats(pred, label, jnp.ones(5)))
  mse, psnr = learnability.psnr_per_example(pred, label, max_value=2.0)
  assert psnr[0] == pytest.approx(learnability.PSNR_CAP_DB)
  assert psnr.mean() == pytest.approx(expected, abs=1e-4)
  assert mse == pytest.approx(((pred - label) ** 2).reshape(5, -1).mean(1))


def test_constant_images_make_both_baselines_exact():
  images = np.full((3, 8, 6, 2), 0.3, np.float32)
  result = learnability.grid_cell_quality(
      lambda v: np.zeros((v.shape[0], 4, 3, 2)), images, (2, 2))
  cap = learnability.PSNR_CAP_DB
  for name in ("mean_image", "interpolate"):
    assert np.allclose(result["baselines"][name]["psnr"], cap)
  model = 10 * math.log10(1 / 0.3 ** 2)
  assert np.allclose(result["model"]["psnr"], model, atol=1e-4)
  assert np.allclose(result["gain_db"], model - cap, atol=1e-4)
  assert result["reference"].startswith("mean of the evaluated images")


def test_interpolation_restores_a_linear_ramp_in_an_interior_hole():
  rng = np.random.default_rng(0)
  yy, xx = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
  slopes = rng.uniform(-0.03, 0.03, (4, 2, 1, 1))
  images = (0.5 + slopes[:, 0] * yy + slopes[:, 1] * xx)[..., None]
  filled = learnability.harmonic_fill(images, [4] * 4, [4] * 4, (4, 4))
  np.testing.assert_allclose(filled, images[:, 4:8, 4:8], atol=1e-12)
  result = learnability.grid_cell_quality(
      lambda v: np.zeros((v.shape[0], 4, 4, 1)), images, (3, 3))
  interp = np.asarray(result["baselines"]["interpolate"]["psnr"])
  assert interp[1, 1] > 99  # the centre cell: (near-)exact
  assert interp[0, 0] < interp[1, 1]  # a border cell: the Neumann border


def test_harmonic_fill_is_the_discrete_laplace_solution():
  rng = np.random.default_rng(1)
  views = rng.uniform(0, 1, (2, 6, 7, 3))
  top, left, size = np.array([0, 2]), np.array([3, 0]), (3, 4)
  filled = learnability.harmonic_fill(views, top, left, size)
  for b in range(2):
    image = views[b].copy()
    t, l = top[b], left[b]
    image[t:t + 3, l:l + 4] = filled[b]
    for y in range(t, t + 3):
      for x in range(l, l + 4):
        nbrs = [image[y + dy, x + dx] for dy, dx in
                ((-1, 0), (1, 0), (0, -1), (0, 1))
                if 0 <= y + dy < 6 and 0 <= x + dx < 7]
        np.testing.assert_allclose(image[y, x], np.mean(nbrs, 0), atol=1e-12)


def test_a_whole_image_hole_has_no_interpolation_baseline(tmp_path):
  images = np.random.default_rng(0).uniform(0, 1, (4, 4, 4, 1))
  result = learnability.grid_cell_quality(
      lambda v: np.zeros((v.shape[0], 4, 4, 1)), images, 1)
  assert result["baselines"]["interpolate"]["psnr"] == [[None]]
  assert result["best_baseline"] == [["mean_image"]]
  learnability.write_json(result, str(tmp_path / "r.json"))
  learnability.plot_cell_heatmaps(result, str(tmp_path / "r.png"))


def test_json_round_trips_and_png_is_written(synthetic_result, tmp_path):
  path = str(tmp_path / "out" / "cells.json")
  learnability.write_json(synthetic_result, path)
  with open(path) as f:
    assert json.load(f) == synthetic_result
  assert not (tmp_path / "out" / "cells.json.tmp").exists()
  png = tmp_path / "plots" / "cells.png"
  learnability.plot_cell_heatmaps(json.load(open(path)), str(png))
  data = png.read_bytes()
  assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_denoise_identity_predictor_equals_the_identity_baseline():
  images = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 3))
  result = learnability.pretext_quality(
      lambda v: v, images, vision.denoise(0.1), KEY, batch_size=5)
  assert result["model"] == result["baselines"]["identity"]
  # Noise of std 0.1: PSNR about 20 dB.
  assert result["model"]["psnr"] == pytest.approx(20, abs=0.5)
  assert result["best_baseline"] == "identity" and result["gain_db"] == 0
  json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("pretext", [
    vision.colourise(target="rgb"), vision.super_resolve(2),
    vision.reconstruct()])
def test_whole_image_pretexts_identity_baseline(pretext):
  images = np.random.default_rng(0).uniform(0, 1, (6, 8, 8, 3))
  view, _, _ = pretext.transform(KEY, jnp.asarray(images, jnp.float32))
  result = learnability.pretext_quality(lambda v: v, images, pretext, KEY)
  assert result["model"] == result["baselines"]["identity"]
  _, psnr = learnability.psnr_per_example(view, images.astype(np.float32))
  assert result["baselines"]["identity"]["psnr"] == pytest.approx(psnr.mean())
  if pretext.name == "reconstruct":
    assert result["model"]["psnr"] == learnability.PSNR_CAP_DB


def test_region_pretexts_regenerate_positions():
  images = np.random.default_rng(0).uniform(0, 1, (12, 8, 8, 1))
  for pretext in (vision.blur_region((3, 4), sigma=1.5),
                  vision.grid_mask((2, 2)), vision.grid_mask((2, 2), cell=1)):
    _, target, _ = pretext.transform(KEY, jnp.asarray(images, jnp.float32))
    # An oracle head: exact, so its PSNR is at the cap.
    oracle = lambda v, t=target: np.asarray(t)[:v.shape[0]]
    result = learnability.pretext_quality(oracle, images, pretext, KEY)
    assert result["model"]["psnr"] == learnability.PSNR_CAP_DB
    assert set(result["baselines"]) == {"mean_image", "identity",
                                        "interpolate"}
    assert json.loads(json.dumps(result, allow_nan=False)) == result
  # A fixed cell agrees with grid_cell_quality's numbers for that cell.
  cells = learnability.grid_cell_quality(
      lambda v: np.zeros((v.shape[0], 4, 4, 1)), images, (2, 2))
  for name in ("mean_image", "interpolate"):
    assert result["baselines"][name]["psnr"] == pytest.approx(
        cells["baselines"][name]["psnr"][0][1])


def _marked(n):
  """Images with one bright pixel at the top-left: its corner gives k."""
  images = np.random.default_rng(0).uniform(0, 0.5, (n, 6, 6, 1))
  images[:, 0, 0] = 1.0
  return images


def _corner_logits(views):
  # np.rot90 by k moves the top-left pixel to TL, BL, BR, TR for k = 0..3.
  v = np.asarray(views)[..., 0]
  return np.stack([v[:, 0, 0], v[:, -1, 0], v[:, -1, -1], v[:, 0, -1]], -1)


def test_rotate_accuracy_against_chance():
  images = _marked(40)
  pretext = vision.rotate()
  perfect = learnability.pretext_quality(_corner_logits, images, pretext, KEY,
                                         batch_size=7)
  assert perfect["model"]["accuracy"] == 1.0
  assert perfect["chance"] == 0.25 and perfect["gain"] == 0.75
  _, k, _ = pretext.transform(KEY, jnp.asarray(images, jnp.float32))
  constant = learnability.pretext_quality(
      lambda v: np.zeros(v.shape[0], np.int32), images, pretext, KEY)
  assert constant["model"]["accuracy"] == pytest.approx(
      float(np.mean(np.asarray(k) == 0)))
  half = learnability.pretext_quality(_corner_logits, images,
                                      vision.rotate(half_turns_only=True), KEY)
  assert half["chance"] == 0.5 and half["model"]["accuracy"] == 1.0
  json.dumps(half, allow_nan=False)


def test_bad_input_is_rejected(tmp_path):
  images = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1))
  good = lambda v: np.zeros((v.shape[0], 4, 4, 1))
  with pytest.raises(ValueError, match=r"predict returned shape \(4, 4, 4\)"):
    learnability.grid_cell_quality(lambda v: np.zeros((v.shape[0], 4, 4)),
                                   images, (2, 2))
  with pytest.raises(ValueError, match="does not divide the image"):
    learnability.grid_cell_quality(good, images, (3, 2))
  with pytest.raises(ValueError, match="reference must be one image"):
    learnability.grid_cell_quality(good, images, (2, 2),
                                   reference=np.zeros((8, 8)))
  with pytest.raises(ValueError, match="sequence of 4 callables"):
    learnability.grid_cell_quality([good] * 3, images, (2, 2))
  with pytest.raises(ValueError, match="non-finite"):
    learnability.grid_cell_quality(lambda v: np.full((v.shape[0], 4, 4, 1),
                                                     np.nan), images, (2, 2))
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    learnability.grid_cell_quality(good, images[0], (2, 2))
  with pytest.raises(ValueError, match="predict returned shape"):
    learnability.pretext_quality(lambda v: v[:, :4], images,
                                 vision.denoise(), KEY)
  with pytest.raises(ValueError, match="unsupported pretext 'other'"):
    learnability.pretext_quality(
        good, images, dataclasses.replace(vision.reconstruct(), name="other"),
        KEY)
  with pytest.raises(ValueError, match="grid_cell_quality result"):
    learnability.plot_cell_heatmaps({"kind": "pretext_quality"},
                                    str(tmp_path / "x.png"))


def test_colourise_chroma_identity_baseline_is_the_grey_image():
  """With the chroma target, predicting 0 (no colour) is the identity
  baseline, and its error is the grey image's error against the colour
  image."""
  images = np.random.default_rng(0).uniform(0, 1, (6, 8, 8, 3))
  pretext = vision.colourise()
  view, _, _ = pretext.transform(KEY, jnp.asarray(images, jnp.float32))
  result = learnability.pretext_quality(jnp.zeros_like, images, pretext, KEY)
  assert result["model"] == result["baselines"]["identity"]
  _, psnr = learnability.psnr_per_example(view, images.astype(np.float32))
  assert result["baselines"]["identity"]["psnr"] == pytest.approx(
      psnr.mean(), rel=1e-5)
