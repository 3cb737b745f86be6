"""Vision pretexts: each corruption and its target are what the spec says,
deterministic for a key, different across steps, identical under jit, and bad
input is rejected by `check` with a message naming the problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import pretext
from mtl_jax.pretext import vision

KEY = jax.random.PRNGKey(0)


def _images(b=6, h=8, w=8, c=3, seed=0):
  # Values in [0.1, 1): never equal to a fill of 0.
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(0.1, 1.0, (b, h, w, c)), jnp.float32)


def _find(image, patch):
  """The unique (top, left) where `patch` sits in `image`."""
  ph, pw = patch.shape[:2]
  hits = [(y, x)
          for y in range(image.shape[0] - ph + 1)
          for x in range(image.shape[1] - pw + 1)
          if np.array_equal(image[y:y + ph, x:x + pw], patch)]
  assert len(hits) == 1, hits
  return hits[0]


def _check_outputs(p, images, view, target, mask):
  assert view.shape == images.shape
  assert target.shape == (images.shape[0],) + p.target_shape(images.shape[1:])
  assert target.dtype == p.target_dtype
  np.testing.assert_array_equal(mask, np.ones(images.shape[0], np.float32))
  assert mask.dtype == jnp.float32


# ---------------------------------------------------------------------------
# Grid masking.


def test_grid_mask_blanks_one_cell_and_targets_the_original_cell():
  images = _images(b=6, h=8, w=12)
  p = pretext.grid_mask(grid=(2, 3), fill=0.0)
  view, target, mask = p.transform(KEY, images)
  _check_outputs(p, images, view, target, mask)
  assert target.shape == (6, 4, 4, 3)
  cells = np.asarray(pretext.grid_cells(KEY, 6, (2, 3)))
  images, view, target = map(np.asarray, (images, view, target))
  for i, cell in enumerate(cells):
    top, left = (cell // 3) * 4, (cell % 3) * 4
    inside = np.zeros((8, 12), bool)
    inside[top:top + 4, left:left + 4] = True
    assert np.all(view[i][inside] == 0.0)
    np.testing.assert_array_equal(view[i][~inside], images[i][~inside])
    np.testing.assert_array_equal(target[i],
                                  images[i, top:top + 4, left:left + 4])


def test_grid_mask_fixed_cell_and_fill():
  images = _images(b=3, h=6, w=6)
  p = pretext.grid_mask(grid=3, cell=5, fill=-1.0)  # row 1, column 2
  view, target, _ = p.transform(KEY, images)
  images, view, target = map(np.asarray, (images, view, target))
  np.testing.assert_array_equal(view[:, 2:4, 4:6], -1.0)
  np.testing.assert_array_equal(target, images[:, 2:4, 4:6])
  rest = np.ones((6, 6), bool)
  rest[2:4, 4:6] = False
  np.testing.assert_array_equal(view[:, rest], images[:, rest])


def test_grid_mask_random_cells_vary_over_the_batch():
  cells = np.asarray(pretext.grid_cells(KEY, 64, (2, 2)))
  assert set(cells.tolist()) == {0, 1, 2, 3}


# ---------------------------------------------------------------------------
# Region blurring.


def _np_blur(images, sigma):
  kernel = np.asarray(vision.gaussian_kernel(sigma))
  r = (len(kernel) - 1) // 2
  h, w = images.shape[1:3]
  p = np.pad(images, ((0, 0), (r, r), (0, 0), (0, 0)), mode="edge")
  out = sum(kernel[i] * p[:, i:i + h] for i in range(len(kernel)))
  p = np.pad(out, ((0, 0), (0, 0), (r, r), (0, 0)), mode="edge")
  return sum(kernel[i] * p[:, :, i:i + w] for i in range(len(kernel)))


def test_gaussian_blur_matches_numpy_and_keeps_constants():
  images = _images(b=2, h=7, w=9)
  np.testing.assert_allclose(vision.gaussian_blur(images, 1.5),
                             _np_blur(np.asarray(images), 1.5), atol=1e-5)
  const = jnp.full((1, 5, 5, 3), 0.7)
  np.testing.assert_allclose(vision.gaussian_blur(const, 2.0), const,
                             atol=1e-6)
  kernel = vision.gaussian_kernel(1.0)
  assert kernel.shape == (7,)
  np.testing.assert_allclose(float(kernel.sum()), 1.0, atol=1e-6)


def test_blur_region_changes_the_region_only():
  images = _images(b=5, h=10, w=12)
  p = pretext.blur_region(size=(4, 3), sigma=1.0)
  view, target, mask = p.transform(KEY, images)
  _check_outputs(p, images, view, target, mask)
  assert target.shape == (5, 4, 3, 3)
  images, view, target = map(np.asarray, (images, view, target))
  blurred = _np_blur(images, 1.0)
  for i in range(5):
    top, left = _find(images[i], target[i])
    inside = np.zeros((10, 12), bool)
    inside[top:top + 4, left:left + 3] = True
    np.testing.assert_allclose(view[i][inside], blurred[i][inside],
                               atol=1e-5)
    np.testing.assert_array_equal(view[i][~inside], images[i][~inside])
    assert not np.allclose(view[i][inside], images[i][inside])


# ---------------------------------------------------------------------------
# Colourisation.


def test_colourise_view_is_bt601_luminance_replicated():
  images = _images(b=2, h=4, w=5)
  p = pretext.colourise()
  view, target, mask = p.transform(KEY, images)
  _check_outputs(p, images, view, target, mask)
  x = np.asarray(images)
  grey = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
  for ch in range(3):
    np.testing.assert_allclose(view[..., ch], grey, rtol=1e-6)
  # The default target is the chroma: the view plus the target is the image.
  np.testing.assert_allclose(target, x - grey[..., None], atol=1e-6)
  np.testing.assert_allclose(view + target, images, atol=1e-6)
  rgb_view, rgb_target, _ = pretext.colourise(target="rgb").transform(
      KEY, images)
  np.testing.assert_array_equal(rgb_view, view)
  np.testing.assert_array_equal(rgb_target, images)
  # Only the chroma target is a residual over the view.
  assert p.residual and not pretext.colourise(target="rgb").residual
  assert not any(pretext.get_pretext(n).residual
                 for n in ("denoise", "reconstruct", "super_resolve"))
  with pytest.raises(ValueError, match=r"colourise: unknown target 'lab'; "
                     "valid: chroma, rgb"):
    pretext.colourise(target="lab")
  # Pure red, green, blue pixels give the BT.601 weights.
  rgb = jnp.eye(3, dtype=jnp.float32).reshape(1, 1, 3, 3)
  np.testing.assert_allclose(pretext.colourise().transform(KEY, rgb)[0][0, 0],
                             np.repeat([[0.299], [0.587], [0.114]], 3, 1),
                             rtol=1e-6)


# ---------------------------------------------------------------------------
# Super-resolution.


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_super_resolve_blocks_are_block_means(factor):
  images = _images(b=2, h=8, w=8, c=2)
  p = pretext.super_resolve(factor=factor)
  view, target, mask = p.transform(KEY, images)
  _check_outputs(p, images, view, target, mask)
  x, v = np.asarray(images), np.asarray(view)
  for y in range(0, 8, factor):
    for z in range(0, 8, factor):
      block = v[:, y:y + factor, z:z + factor]
      mean = x[:, y:y + factor, z:z + factor].mean(axis=(1, 2))
      np.testing.assert_allclose(block, np.broadcast_to(
          mean[:, None, None], block.shape), rtol=1e-5)
  np.testing.assert_array_equal(target, images)
  if factor > 1:
    assert not np.allclose(v, x)


def test_super_resolve_non_divisible_pads_with_edge_values():
  images = _images(b=1, h=5, w=7, c=1)
  view = np.asarray(pretext.super_resolve(factor=2).transform(KEY, images)[0])
  x = np.asarray(images)
  np.testing.assert_allclose(view[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)),
                             rtol=1e-5)
  # Last row / column repeat the last pooled row / column.
  np.testing.assert_array_equal(view[0, 4], view[0, 3])
  np.testing.assert_array_equal(view[0, :, 6], view[0, :, 5])
  np.testing.assert_allclose(view[0, 3, 5], x[0, 2:4, 4:6].mean(axis=(0, 1)),
                             rtol=1e-5)


# ---------------------------------------------------------------------------
# Denoising, reconstruction.


def test_denoise_adds_noise_of_the_given_scale():
  images = _images(b=4, h=16, w=16)
  p = pretext.denoise(noise_std=0.2)
  view, target, mask = p.transform(KEY, images)
  _check_outputs(p, images, view, target, mask)
  np.testing.assert_array_equal(target, images)
  noise = np.asarray(view - images)
  assert abs(noise.mean()) < 0.03
  assert 0.18 < noise.std() < 0.22


def test_reconstruct_is_the_identity():
  images = _images(b=2)
  p = pretext.reconstruct()
  view, target, mask = p.transform(KEY, images)
  _check_outputs(p, images, view, target, mask)
  np.testing.assert_array_equal(view, images)
  np.testing.assert_array_equal(target, images)


# ---------------------------------------------------------------------------
# Rotation.


def test_rotate_label_matches_the_rotation_applied():
  images = _images(b=16, h=5, w=5, c=2)
  p = pretext.rotate()
  view, target, mask = p.transform(KEY, images)
  _check_outputs(p, images, view, target, mask)
  assert p.num_classes == 4 and p.loss == "softmax_ce"
  labels = np.asarray(target)
  assert set(labels.tolist()) == {0, 1, 2, 3}
  for i, k in enumerate(labels):
    np.testing.assert_array_equal(view[i], np.rot90(np.asarray(images[i]), k))


def test_rotate_half_turns_on_non_square_images():
  images = _images(b=16, h=4, w=6)
  p = pretext.rotate(half_turns_only=True)
  view, target, _ = p.transform(KEY, images)
  labels = np.asarray(target)
  assert set(labels.tolist()) == {0, 2}
  for i, k in enumerate(labels):
    np.testing.assert_array_equal(view[i], np.rot90(np.asarray(images[i]), k))


# ---------------------------------------------------------------------------
# Determinism, steps, jit.

ALL = [
    ("grid_mask", dict(grid=(2, 2)), True),
    ("blur_region", dict(size=(3, 3), sigma=1.0), True),
    ("colourise", {}, False),
    ("super_resolve", dict(factor=2), False),
    ("denoise", dict(noise_std=0.1), True),
    ("reconstruct", {}, False),
    ("rotate", {}, True),
]


@pytest.mark.parametrize("name,hp,random", ALL, ids=[a[0] for a in ALL])
def test_deterministic_per_key_different_across_steps_same_under_jit(
    name, hp, random):
  images = _images(b=8, h=8, w=8)
  p = pretext.get_pretext(name, **hp)
  k1, k2 = jax.random.fold_in(KEY, 1), jax.random.fold_in(KEY, 2)
  out1 = p.transform(k1, images)
  again = p.transform(k1, images)
  jitted = jax.jit(p.transform)(k1, images)
  out2 = p.transform(k2, images)
  for a, b, c in zip(out1, again, jitted):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
  differs = any(not np.array_equal(a, b) for a, b in zip(out1, out2))
  assert differs == random


def test_spec_describes_what_the_transform_returns():
  """`target_shape` and `target_dtype` are those of the transform's target,
  the view keeps the images' shape, the mask is [B] ones: what a head and a
  loss are built from before any batch is seen."""
  images = _images(b=4, h=8, w=8, c=3)
  for name in pretext.PRETEXTS:
    p = pretext.get_pretext(name)
    view, target, mask = p.transform(KEY, images)
    assert p.name == name
    assert view.shape == images.shape, name
    assert target.shape == (4,) + tuple(p.target_shape((8, 8, 3))), name
    assert target.dtype == p.target_dtype, name
    np.testing.assert_array_equal(mask, np.ones(4, np.float32))
    assert (p.loss, p.metrics) in (("mse", ("psnr",)),
                                   ("softmax_ce", ("accuracy",))), name


# ---------------------------------------------------------------------------
# Bad input.


def test_grid_that_does_not_divide_the_image_is_rejected():
  p = pretext.grid_mask(grid=(3, 2))
  with pytest.raises(ValueError, match=r"grid 3 x 2 does not divide.*8, 8, 3"):
    p.check((8, 8, 3))
  with pytest.raises(ValueError, match="does not divide"):
    p.transform(KEY, _images(b=1))
  with pytest.raises(ValueError, match="cell 4 is outside"):
    pretext.grid_mask(grid=(2, 2), cell=4)


def test_colourisation_on_greyscale_is_rejected():
  with pytest.raises(ValueError, match="colourisation.*C = 1.*greyscale"):
    pretext.colourise().check((8, 8, 1))
  with pytest.raises(ValueError, match="greyscale"):
    pretext.colourise().transform(KEY, _images(b=1, c=1))


def test_downsampling_factor_larger_than_the_image_is_rejected():
  with pytest.raises(ValueError, match="factor 16 is larger than the image"):
    pretext.super_resolve(factor=16).check((8, 32, 3))
  with pytest.raises(ValueError, match="factor must be an integer >= 1"):
    pretext.super_resolve(factor=0)


def test_other_bad_input_is_rejected():
  with pytest.raises(ValueError, match="region 9 x 2 is larger than the image"):
    pretext.blur_region(size=(9, 2)).check((8, 8, 3))
  with pytest.raises(ValueError, match="non-square image.*4, 6, 3"):
    pretext.rotate().check((4, 6, 3))
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    pretext.reconstruct().transform(KEY, jnp.zeros((8, 8, 3)))


def test_unknown_pretext_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match="unknown pretext 'jigsaw'.*grid_mask"):
    pretext.get_pretext("jigsaw")
