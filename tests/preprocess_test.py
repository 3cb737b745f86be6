"""Tests for mtl_jax.data.preprocess."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mtl_jax.data import preprocess

# Compared against jax.image.resize; each case costs a JAX compile, so few.
RESIZE_CASES = [
    ((218, 178), (64, 64)),  # CelebA-like down, non-integer ratios.
    ((28, 28), (12, 16)),  # Down in H and W, non-integer ratios.
    ((12, 16), (28, 28)),  # Up, non-integer ratios.
    ((10, 7), (4, 21)),  # Down in H, up in W.
]


def _random(shape, seed=0):
  return np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("in_size,out_size", RESIZE_CASES)
def test_linear_resize_matches_jax(in_size, out_size, antialias):
  # Pixel range [0, 255] and unit range [0, 1], each to atol 1e-5 relative.
  for x, atol in ((_random((2, *in_size, 3)), 1e-5 * 255),
                  (_random((2, *in_size, 3), seed=1) / 255, 1e-5)):
    got = preprocess.resize(x, out_size, "linear", antialias=antialias)
    want = jax.image.resize(x, (2, *out_size, 3), "linear",
                            antialias=antialias)
    assert got.dtype == np.float32
    assert got.shape == (2, *out_size, 3)
    np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=atol)


@pytest.mark.parametrize("in_size,out_size", RESIZE_CASES)
def test_nearest_resize_equals_jax(in_size, out_size):
  x = _random((2, *in_size, 3))
  got = preprocess.resize(x, out_size, "nearest")
  want = jax.image.resize(x, (2, *out_size, 3), "nearest")
  np.testing.assert_array_equal(got, np.asarray(want))


def test_nearest_matrix_selects_nearest_indices():
  matrix = preprocess._resize_matrix(28, 12, "nearest", False)
  np.testing.assert_array_equal(matrix.argmax(axis=1),
                                preprocess._nearest_indices(28, 12))
  np.testing.assert_array_equal(matrix.sum(axis=1), np.ones(12))


def test_linear_matrix_rows_sum_to_one_and_are_cached():
  matrix = preprocess._resize_matrix(218, 64, "linear", True)
  np.testing.assert_allclose(matrix.sum(axis=1), 1, atol=1e-6)
  assert preprocess._resize_matrix(218, 64, "linear", True) is matrix
  assert not matrix.flags.writeable


def test_single_axis_resizes_hand_computed():
  # Only W resized, 2 -> 4: samples at -0.25, 0.25, 0.75, 1.25; the edge ones
  # see a single pixel. Then only H resized, 4 -> 2 with antialias (see below).
  x = np.array([0., 4.], np.float32).reshape(1, 1, 2, 1)
  np.testing.assert_allclose(preprocess.resize(x, (1, 4)).ravel(),
                             [0., 1., 3., 4.], atol=1e-6)
  x = np.array([0., 4., 8., 12.], np.float32).reshape(1, 4, 1, 1)
  got = preprocess.resize(x, (2, 1)).ravel()
  np.testing.assert_allclose(got, [20 / 7, 64 / 7], atol=1e-5)
  # Both at once equals the two in turn.
  x = _random((2, 9, 7, 3))
  np.testing.assert_allclose(
      preprocess.resize(x, (4, 21)),
      preprocess.resize(preprocess.resize(x, (9, 21)), (4, 21)), atol=1e-3)


def test_linear_downsample_antialias_hand_computed():
  # 4 -> 2, antialias: kernel width 2, samples at 0.5 and 2.5.
  # Output 0 weights over pixels 0..2: (0.75, 0.75, 0.25) / 1.75.
  x = np.array([0., 4., 8., 12.], np.float32).reshape(1, 1, 4, 1)
  got = preprocess.resize(x, (1, 2)).ravel()
  np.testing.assert_allclose(got[0], (0.75 * 0 + 0.75 * 4 + 0.25 * 8) / 1.75,
                             atol=1e-5)
  # Without antialias, 0.5 and 2.5 are plain midpoints.
  got = preprocess.resize(x, (1, 2), antialias=False).ravel()
  np.testing.assert_allclose(got, [2., 10.], atol=1e-6)


def test_same_size_resize_returns_input():
  x = _random((2, 5, 6, 3))
  assert preprocess.resize(x, (5, 6)) is x
  u8 = np.arange(2 * 5 * 6 * 3).reshape(2, 5, 6, 3).astype(np.uint8)
  got = preprocess.resize(u8, (5, 6), "nearest")
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, u8)


def test_resize_uint8_is_float32():
  u8 = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 3), np.uint8)
  got = preprocess.resize(u8, (12, 16))
  assert got.dtype == np.float32
  want = jax.image.resize(u8.astype(np.float32), (2, 12, 16, 3), "linear")
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-3)


def test_resize_errors():
  x = np.zeros((1, 4, 4, 1), np.float32)
  with pytest.raises(ValueError, match=r"Unknown resize method 'cubic'.*"
                     r"'nearest', 'linear'"):
    preprocess.resize(x, (2, 2), "cubic")
  with pytest.raises(ValueError, match=r"size must be a pair .* got \(0, 2\)"):
    preprocess.resize(x, (0, 2))
  with pytest.raises(ValueError, match=r"batch \[N, H, W, C\].*\(4, 4, 1\)"):
    preprocess.resize(x[0], (2, 2))


def test_central_crop_picks_exact_centre():
  x = np.arange(7 * 8).reshape(1, 7, 8, 1)
  got = preprocess.central_crop(x, (3, 4))
  # Offsets (7 - 3) // 2 = 2 and (8 - 4) // 2 = 2.
  want = np.array([[18, 19, 20, 21],
                   [26, 27, 28, 29],
                   [34, 35, 36, 37]])
  np.testing.assert_array_equal(got[0, ..., 0], want)
  assert got.dtype == x.dtype
  # Odd margins drop the extra row/column at the bottom/right.
  got = preprocess.central_crop(x, (6, 7))
  np.testing.assert_array_equal(got[0, ..., 0], x[0, 0:6, 0:7, 0])
  np.testing.assert_array_equal(preprocess.central_crop(x, (7, 8)), x)


def test_central_crop_errors():
  x = np.zeros((1, 7, 8, 1))
  with pytest.raises(ValueError, match=r"Crop size \(8, 4\) is larger than "
                     r"the images \(7, 8\)"):
    preprocess.central_crop(x, (8, 4))
  with pytest.raises(ValueError, match=r"size must be a pair"):
    preprocess.central_crop(x, (3, -1))


def test_convert_channels_grey_to_rgb():
  x = np.arange(6, dtype=np.uint8).reshape(1, 2, 3, 1)
  got = preprocess.convert_channels(x, 3)
  assert got.shape == (1, 2, 3, 3) and got.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(got[..., c], x[..., 0])


def test_convert_channels_rgb_to_grey_luma():
  x = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]],
               np.uint8).reshape(1, 1, 4, 3)
  got = preprocess.convert_channels(x, 1)
  assert got.shape == (1, 1, 4, 1) and got.dtype == np.float32
  np.testing.assert_allclose(
      got.ravel(), [76.245, 149.685, 29.07, 0.299 * 10 + 0.587 * 20 + 3.42],
      rtol=1e-6)
  # Float inputs keep their dtype.
  assert preprocess.convert_channels(x.astype(np.float64), 1).dtype == (
      np.float64)


def test_convert_channels_rgba():
  x = np.array([255, 0, 0, 7], np.uint8).reshape(1, 1, 1, 4)
  rgb = preprocess.convert_channels(x, 3)
  np.testing.assert_array_equal(rgb.ravel(), [255, 0, 0])
  grey = preprocess.convert_channels(x, 1)
  np.testing.assert_allclose(grey.ravel(), [76.245], rtol=1e-6)


def test_convert_channels_same_count_unchanged():
  x = _random((1, 2, 2, 3))
  assert preprocess.convert_channels(x, 3) is x


@pytest.mark.parametrize("in_c,out_c", [(1, 4), (3, 4), (2, 3), (3, 2)])
def test_convert_channels_errors(in_c, out_c):
  x = np.zeros((1, 2, 2, in_c))
  with pytest.raises(ValueError, match=rf"Cannot convert {in_c} channels to "
                     rf"{out_c}"):
    preprocess.convert_channels(x, out_c)


def test_normalise_closed_form():
  x = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3), np.uint8)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
  got = preprocess.normalise(x, mean=mean, std=std)
  want = (x / 255.0 - np.array(mean)) / np.array(std)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got = preprocess.normalise(x, scale=2.0, mean=1.0, std=4.0)
  np.testing.assert_allclose(got, (x * 2.0 - 1.0) / 4.0, rtol=1e-6)
  np.testing.assert_allclose(preprocess.normalise(x), x / 255.0, rtol=1e-6)


def test_normalise_errors():
  x = np.zeros((1, 2, 2, 3))
  with pytest.raises(ValueError, match=r"mean must be a scalar or have one "
                     r"value per channel \(3\)"):
    preprocess.normalise(x, mean=(0.5, 0.5))
  with pytest.raises(ValueError, match=r"std must be > 0"):
    preprocess.normalise(x, std=(1.0, 0.0, 1.0))
  with pytest.raises(ValueError, match=r"std must be > 0"):
    preprocess.normalise(x, std=-1.0)


def test_image_spec_end_to_end_equals_manual():
  x = np.random.default_rng(0).integers(0, 256, (3, 218, 178, 3), np.uint8)
  spec = preprocess.ImageSpec(shape=(64, 64, 1), crop=(178, 178),
                              mean=(0.5,), std=[0.25])
  got = spec(x)
  want = preprocess.central_crop(x, (178, 178))
  want = preprocess.convert_channels(want, 1)
  want = preprocess.resize(want, (64, 64))
  want = preprocess.normalise(want, mean=(0.5,), std=(0.25,))
  assert got.shape == (3, 64, 64, 1) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert spec.std == (0.25,)


def test_image_spec_grey_without_channel_axis_to_rgb():
  x = np.random.default_rng(0).integers(0, 256, (2, 28, 28), np.uint8)
  spec = preprocess.ImageSpec(shape=(32, 32, 3), method="nearest",
                              scale=1.0, mean=(1.0, 2.0, 3.0))
  got = spec(x)
  rows = np.floor((np.arange(32) + 0.5) * 28 / 32).astype(int)
  want = x[:, rows][:, :, rows].astype(np.float32)
  assert got.shape == (2, 32, 32, 3)
  for c in range(3):
    np.testing.assert_array_equal(got[..., c], want - (c + 1))


def test_image_spec_skips_resize_at_size():
  x = _random((2, 8, 8, 3))
  spec = preprocess.ImageSpec(shape=(8, 8, 3), scale=1.0)
  np.testing.assert_array_equal(spec(x), x)


@pytest.mark.parametrize("kwargs,message", [
    (dict(shape=(8, 8)), r"shape must be \(h, w, c\) of positive ints"),
    (dict(shape=(0, 8, 3)), r"shape must be \(h, w, c\) of positive ints"),
    (dict(shape=(8, 8, 2)), r"shape channels must be 1, 3 or 4, got 2"),
    (dict(shape=(8, 8, 3), crop=(0, 4)), r"crop must be a pair"),
    (dict(shape=(8, 8, 3), method="area"),
     r"Unknown resize method 'area'; valid methods are \('nearest', "
     r"'linear'\)"),
    (dict(shape=(8, 8, 3), mean=(0.1, 0.2)),
     r"mean must be a scalar or have one value per channel \(3\)"),
    (dict(shape=(8, 8, 3), std=(1.0, -1.0, 1.0)), r"std must be > 0"),
    (dict(shape=(8, 8, 3), scale=float("inf")), r"scale must be finite"),
])
def test_image_spec_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    preprocess.ImageSpec(**kwargs)


def test_image_spec_call_errors():
  spec = preprocess.ImageSpec(shape=(8, 8, 3), crop=(10, 10))
  with pytest.raises(ValueError, match=r"got shape \(8, 8\)"):
    spec(np.zeros((8, 8)))
  with pytest.raises(ValueError, match=r"Crop size \(10, 10\) is larger"):
    spec(np.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"Cannot convert 2 channels to 3"):
    preprocess.ImageSpec(shape=(8, 8, 3))(np.zeros((1, 8, 8, 2)))
