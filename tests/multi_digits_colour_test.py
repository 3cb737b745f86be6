"""Tests for the colour configs of mtl_jax.data.multi_digits.

The colour variant must leave the grey data untouched, share its labels, keep
the digits recognisable in luminance, and make colour predictable from the
grey image (what colourisation pretraining needs).
"""

import hashlib
import itertools

import numpy as np
import pytest

from mtl_jax.data import catalog
from mtl_jax.data import mixture
from mtl_jax.data import multi_digits as md

LUMA = np.asarray(md.LUMA_WEIGHTS)
# sha256 over the arrays of grey `generate_split` (keys sorted), recorded
# before the colour configs existed.
GREY_SHA256 = {
    ("train", 300, 0):
        "068d87a6ddf2c4f3e9b83386416b5c033f38062a5375fb97a1b6b54d85f0ab43",
    ("test", 200, 3):
        "a82eaeb3e0382888d85ee50d52bc2d2dada59b2fbc5408b09f675784c0d37451",
}


@pytest.fixture(scope="module")
def colour_dir(tmp_path_factory):
  """One TFDS prepare of the "colour_small" config, shared by the module."""
  data_dir = str(tmp_path_factory.mktemp("tfds_colour"))
  md.prepare(data_dir, "colour_small")
  return data_dir


def _luminance(image: np.ndarray) -> np.ndarray:
  """BT.601 luminance, float64 [..., H, W], of uint8 RGB images."""
  return image.astype(np.float64) @ LUMA


def _canvases(ex):
  """Each digit alone on its grey canvas, uint8 [N, 12, 16] (left, right)."""
  images, _ = md.source_digits()
  paste = md._paste  # pylint: disable=protected-access
  return (paste(images[ex["left_id"]], ex["left_offset"]),
          paste(images[ex["right_id"]], ex["right_offset"]))


# -- shapes, table and determinism ------------------------------------------


def test_colour_shapes_dtypes_and_range():
  grey = md.generate_split("test", 7)
  ex = md.generate_split("test", 7, colour=True)
  assert ex.keys() == grey.keys()
  for k in ex:
    expected = (7, 12, 16, 3) if k == "image" else grey[k].shape
    assert (ex[k].dtype, ex[k].shape) == (grey[k].dtype, expected), k
  assert md.generate_split("train", 0, colour=True)["image"].shape == (
      0, 12, 16, 3)
  assert md.image_shape("colour") == md.image_shape("colour_small") == (
      12, 16, 3)
  assert md.image_shape("default") == md.image_shape("small") == (12, 16, 1)
  assert md.CONFIG_SIZES["colour"] == md.CONFIG_SIZES["default"]
  assert md.CONFIG_SIZES["colour_small"] == md.CONFIG_SIZES["small"]
  # Luminance lies between the background's (37.9) and the strokes' (150).
  luma = _luminance(md.generate_split("train", 500, colour=True)["image"])
  assert 37 <= luma.min() and luma.max() <= 151


def test_colour_table_isoluminant_distinct_and_far_from_background():
  table_luma = md.CLASS_COLOURS @ LUMA
  np.testing.assert_allclose(table_luma, 150, atol=0.5)
  chroma = md.CLASS_COLOURS - table_luma[:, None]
  gaps = [np.linalg.norm(chroma[i] - chroma[j])
          for i, j in itertools.combinations(range(10), 2)]
  assert min(gaps) > 60  # measured 66.2
  bg_luma = md.background() @ LUMA  # [12, 16]
  assert 37.8 < bg_luma.min() and bg_luma.max() < 39.3
  # The dimmest stroke (brightness 0.85) is still 3.3x the background.
  assert 0.85 * table_luma.min() / bg_luma.max() > 3.2
  # Sky on top (blue > red), ground at the bottom (red > blue).
  top, bottom = md.background()[0, 0], md.background()[-1, 0]
  assert top[2] > top[0] and bottom[0] > bottom[2]


def test_colour_deterministic_and_seeded():
  a = md.generate_split("train", 200, seed=4, colour=True)
  b = md.generate_split("train", 200, seed=4, colour=True)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  c = md.generate_split("train", 200, seed=5, colour=True)
  assert not np.array_equal(a["image"], c["image"])
  t = md.generate_split("test", 200, seed=4, colour=True)
  assert not np.array_equal(a["image"], t["image"])


@pytest.mark.parametrize("key", sorted(GREY_SHA256))
def test_grey_unchanged_and_labels_shared(key):
  split, n, seed = key
  grey = md.generate_split(split, n, seed)
  digest = hashlib.sha256()
  for k in sorted(grey):
    digest.update(np.ascontiguousarray(grey[k]).tobytes())
  assert digest.hexdigest() == GREY_SHA256[key]
  colour = md.generate_split(split, n, seed, colour=True)
  for k in grey:
    if k != "image":
      np.testing.assert_array_equal(colour[k], grey[k], err_msg=k)


# -- how the colour is made -------------------------------------------------


def test_background_and_stroke_colours_by_construction():
  ex = md.generate_split("train", 300, seed=1, colour=True)
  left_canvas, right_canvas = _canvases(ex)
  image = ex["image"].astype(np.float64)
  empty = (left_canvas == 0) & (right_canvas == 0)
  bg = np.broadcast_to(np.rint(md.background()), image.shape)
  np.testing.assert_array_equal(image[empty], bg[empty])

  # Where the left digit is at full intensity and not beaten by the right,
  # the pixel is the left class's colour, jittered: same hue (chroma
  # direction), luminance 150 * [0.85, 1], chroma norm shrunk by s * v.
  full = (left_canvas == 255) & (right_canvas <= left_canvas)
  pixels = image[full]  # [P, 3]
  table = md.CLASS_COLOURS[np.broadcast_to(ex["left"][:, None, None],
                                           full.shape)[full]]
  luma = pixels @ LUMA
  assert 0.85 * 150 - 1 <= luma.min() and luma.max() <= 150.5
  chroma = pixels - luma[:, None]
  table_chroma = table - (table @ LUMA)[:, None]
  cosine = np.sum(chroma * table_chroma, 1) / (
      np.linalg.norm(chroma, axis=1) * np.linalg.norm(table_chroma, axis=1))
  assert cosine.min() > 0.98
  shrink = np.linalg.norm(chroma, axis=1) / np.linalg.norm(table_chroma, axis=1)
  assert 0.7 * 0.85 - 0.03 <= shrink.min() and shrink.max() <= 1.03


def test_overlap_takes_the_brighter_digit():
  n = 3000  # the digits overlap at full intensity in few pixels
  ex = md.generate_split("train", n, seed=2, colour=True)
  left_canvas, right_canvas = _canvases(ex)
  # Pixels where one digit is at full intensity and the other present but
  # fainter carry the full one's class hue.
  overlap = (left_canvas > 0) & (right_canvas > 0)
  right_wins = overlap & (right_canvas == 255) & (left_canvas < 255)
  left_wins = overlap & (left_canvas == 255) & (right_canvas < 255)
  assert right_wins.sum() > 100 and left_wins.sum() > 50
  table = md.CLASS_COLOURS - (md.CLASS_COLOURS @ LUMA)[:, None]
  rows = np.broadcast_to(np.arange(n)[:, None, None], overlap.shape)
  for wins, winner in ((right_wins, ex["right"]), (left_wins, ex["left"])):
    pixels = ex["image"].astype(np.float64)[wins]
    chroma = pixels - (pixels @ LUMA)[:, None]
    cosine = chroma @ table.T / np.linalg.norm(table, axis=1)
    np.testing.assert_array_equal(np.argmax(cosine, 1), winner[rows[wins]])


def test_luminance_is_a_recognisable_digit_canvas():
  grey = md.generate_split("train", 300, seed=0)["image"][..., 0]
  luma = _luminance(md.generate_split("train", 300, seed=0,
                                      colour=True)["image"])
  corr = [np.corrcoef(g.ravel(), y.ravel())[0, 1] for g, y in zip(grey, luma)]
  # Measured: min 0.992, mean 0.998 (brightness jitter and the two digits'
  # different brightness are all that separate them).
  assert min(corr) > 0.98 and np.mean(corr) > 0.995


# -- colour is learnable from the grey image --------------------------------


def _left_crop_luminance(ex) -> np.ndarray:
  """Luminance of the 8x8 window holding the left digit, [N, 64] in [0, 1]."""
  luma = _luminance(ex["image"]) / 255.0
  n, span = len(luma), np.arange(8)
  rows = ex["left_offset"][:, 0, None, None] + span[None, :, None]
  cols = ex["left_offset"][:, 1, None, None] + span[None, None, :]
  return luma[np.arange(n)[:, None, None], rows, cols].reshape(n, 64)


def _left_stroke_chroma(ex) -> np.ndarray:
  """Mean chroma (RGB - luminance) of the left digit's strong strokes, [N, 3].

  Strong strokes: the left digit's intensity >= 192 and >= the right's, so
  the pixel is mostly the left digit's colour.
  """
  left_canvas, right_canvas = _canvases(ex)
  strokes = ((left_canvas >= 192) & (left_canvas >= right_canvas))[..., None]
  image = ex["image"].astype(np.float64)
  chroma = image - _luminance(ex["image"])[..., None]
  return (chroma * strokes).sum((1, 2)) / strokes.sum((1, 2))


def test_colour_is_predictable_from_luminance():
  """A label-free learner predicts digit colour from grey pixels alone.

  Features: the luminance of the colour image in the left digit's 8x8 window
  (no colour, no label). Target: the mean chroma of that digit's strokes. The
  learner is 5-nearest-neighbour regression over 500 train composites,
  evaluated on 200 test composites (disjoint source digits: new
  handwriting). The strokes are isoluminant across classes, so the
  luminance tells the colour only through the digit's shape; with the train
  colours shuffled among the examples the same learner is no better than the
  mean. A linear least-squares map is much weaker (MSE ratio 0.47 on these
  crops, about 0.95 on the whole 12x16 image): the class is not a linear
  function of the pixels, so colour needs recognition, as in natural images.
  """
  train = md.generate_split("train", 500, seed=0, colour=True)
  test = md.generate_split("test", 200, seed=0, colour=True)
  x_train, x_test = _left_crop_luminance(train), _left_crop_luminance(test)
  y_train, y_test = _left_stroke_chroma(train), _left_stroke_chroma(test)

  mean_mse = np.mean((y_train.mean(0) - y_test) ** 2)
  dist = ((x_test ** 2).sum(1)[:, None] + (x_train ** 2).sum(1)[None]
          - 2 * x_test @ x_train.T)
  neighbours = np.argsort(dist, axis=1, kind="stable")[:, :5]
  knn_mse = np.mean((y_train[neighbours].mean(1) - y_test) ** 2)
  shuffled = y_train[np.random.default_rng(0).permutation(len(y_train))]
  shuffled_mse = np.mean((shuffled[neighbours].mean(1) - y_test) ** 2)
  # Floor: the per-class mean colour given the true class (what is left is
  # the saturation/brightness jitter).
  class_mean = np.stack([y_train[train["left"] == c].mean(0)
                         for c in range(10)])
  oracle_mse = np.mean((class_mean[test["left"]] - y_test) ** 2)

  # Measured: mean-colour RMSE 65.5, 5-NN 24.6 (MSE ratio 0.141), shuffled
  # control ratio 1.12, class oracle 7.8 (ratio 0.014).
  assert np.sqrt(mean_mse) > 60
  assert knn_mse / mean_mse < 0.2
  assert shuffled_mse / mean_mse > 0.9
  assert oracle_mse / mean_mse < 0.03


# -- batch format, TFDS and catalog -----------------------------------------


def test_to_batch_arrays_carries_three_channels():
  ex = md.generate_split("train", 50, seed=0, colour=True)
  batch = md.to_batch_arrays(ex, None, md.TASK_NAMES)
  assert batch["inputs"].dtype == np.float32
  assert batch["inputs"].shape == (50, 12, 16, 3)
  assert 0.0 <= batch["inputs"].min() and batch["inputs"].max() <= 1.0
  np.testing.assert_allclose(batch["inputs"] * 255, ex["image"], atol=1e-4)
  np.testing.assert_array_equal(batch["labels"]["left"], ex["left"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_tfds_round_trip_equals_generate_split(colour_dir, split):
  loaded = md.load_split(split, data_dir=colour_dir, config="colour_small")
  expected = md.generate_split(split, md.CONFIG_SIZES["colour_small"][split],
                               seed=0, colour=True)
  assert loaded.keys() == expected.keys()
  assert loaded["image"].shape == (expected["left"].shape[0], 12, 16, 3)
  for k in expected:
    assert loaded[k].dtype == expected[k].dtype, k
    np.testing.assert_array_equal(loaded[k], expected[k], err_msg=k)


def test_catalog_opens_the_colour_config(colour_dir):
  ds = catalog.get_dataset("multi_digits", data_dir=colour_dir,
                           builder_config="colour_small", prepare=False)
  assert ds.info == {"image_shape": (12, 16, 3)}
  batch = next(iter(mixture.EvalStream(ds.eval, ds.tasks, batch_size=16)))
  assert batch["inputs"].shape == (16, 12, 16, 3)
  assert batch["inputs"].dtype == np.float32


def test_catalog_grey_info(small_data_dir):
  ds = catalog.get_dataset("multi_digits", data_dir=small_data_dir,
                           builder_config="small", prepare=False)
  assert ds.info == {"image_shape": (12, 16, 1)}


def test_unknown_config_names_the_valid_ones():
  with pytest.raises(ValueError, match="colour_small"):
    md.image_shape("color")
  with pytest.raises(ValueError, match="valid configs"):
    catalog.get_dataset("multi_digits", builder_config="color")
