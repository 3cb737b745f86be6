"""Tests for mtl_jax.data.multi_digits."""

import os

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from mtl_jax.data import mixture
from mtl_jax.data import multi_digits as md


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
  """One TFDS prepare of the "small" config, shared by the module."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  md.prepare(data_dir, "small")
  return data_dir


# -- source digits and pools ------------------------------------------------


def test_source_digits_scaling():
  images, labels = md.source_digits()
  raw = sk_datasets.load_digits()
  assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, raw.target)
  # 0 -> 0, 8 -> round(127.5) = 128 (half to even), 16 -> 255.
  for v, expected in [(0, 0), (1, 16), (8, 128), (16, 255)]:
    assert np.all(images[raw.images == v] == expected)


def test_pools_disjoint_stratified_and_complete():
  train_ids, test_ids = md.source_pools()
  _, labels = md.source_digits()
  assert not set(train_ids) & set(test_ids)
  np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, test_ids])),
                                np.arange(1797))
  assert (len(train_ids), len(test_ids)) == (1198, 599)
  for c in range(10):
    n_c = np.sum(labels == c)
    assert np.sum(labels[train_ids] == c) == round(2 / 3 * n_c)


def test_no_pixel_identical_digit_across_pools():
  images, _ = md.source_digits()
  train_ids, test_ids = md.source_pools()
  train_bytes = {images[i].tobytes() for i in train_ids}
  assert not any(images[i].tobytes() in train_bytes for i in test_ids)


# -- generate_split ---------------------------------------------------------


def test_generate_split_deterministic_and_seeded():
  a = md.generate_split("train", 300, seed=0)
  b = md.generate_split("train", 300, seed=0)
  c = md.generate_split("train", 300, seed=1)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], c["image"])
  # Train and test draw from different streams for the same seed.
  t = md.generate_split("test", 300, seed=0)
  assert not np.array_equal(a["left_id"], t["left_id"])


def test_generate_split_shapes_and_dtypes():
  ex = md.generate_split("test", 7)
  expected = {
      "image": (np.uint8, (7, 12, 16, 1)), "left": (np.int64, (7,)),
      "right": (np.int64, (7,)), "present": (np.float32, (7, 10)),
      "sum": (np.float32, (7,)), "left_id": (np.int64, (7,)),
      "right_id": (np.int64, (7,)), "left_offset": (np.int64, (7, 2)),
      "right_offset": (np.int64, (7, 2)),
  }
  assert {k: (v.dtype.type, v.shape) for k, v in ex.items()} == expected
  assert md.generate_split("train", 0)["image"].shape == (0, 12, 16, 1)


def test_no_leakage_between_split_composites():
  train = md.generate_split("train", 5000, seed=0)
  test = md.generate_split("test", 2000, seed=3)
  train_pool, test_pool = map(set, md.source_pools())
  train_used = set(train["left_id"]) | set(train["right_id"])
  test_used = set(test["left_id"]) | set(test["right_id"])
  assert not train_used & test_used
  assert train_used <= train_pool and test_used <= test_pool
  images, _ = md.source_digits()
  train_pool_bytes = {images[i].tobytes() for i in train_pool}
  assert not any(images[i].tobytes() in train_pool_bytes for i in test_used)


def test_composite_reconstruction():
  ex = md.generate_split("train", 50, seed=2)
  images, labels = md.source_digits()
  for i in range(50):
    canvas = np.zeros((12, 16), np.uint8)
    for side in ("left", "right"):
      r, c = ex[f"{side}_offset"][i]
      digit = images[ex[f"{side}_id"][i]]
      canvas[r:r + 8, c:c + 8] = np.maximum(canvas[r:r + 8, c:c + 8], digit)
    np.testing.assert_array_equal(ex["image"][i, :, :, 0], canvas)
    assert ex["left"][i] == labels[ex["left_id"][i]]
    assert ex["right"][i] == labels[ex["right_id"][i]]


def test_offsets_cover_their_ranges():
  ex = md.generate_split("train", 2000, seed=0)
  lo, ro = ex["left_offset"], ex["right_offset"]
  assert set(lo[:, 0]) == set(range(5)) and set(lo[:, 1]) == {0, 1, 2}
  assert set(ro[:, 0]) == set(range(5)) and set(ro[:, 1]) == {6, 7, 8}


def test_labels_present_and_sum():
  ex = md.generate_split("train", 20000, seed=0)
  n = 20000
  rows = np.arange(n)
  assert np.all(ex["present"][rows, ex["left"]] == 1)
  assert np.all(ex["present"][rows, ex["right"]] == 1)
  np.testing.assert_array_equal(ex["present"].sum(1),
                                1 + (ex["left"] != ex["right"]))
  np.testing.assert_array_equal(ex["sum"], ex["left"] + ex["right"])
  # Class balance: 2000 expected per class, binomial sd ~42.
  for side in ("left", "right"):
    counts = np.bincount(ex[side], minlength=10)
    assert counts.min() > 1750 and counts.max() < 2250, counts


@pytest.mark.parametrize("call, match", [
    (lambda: md.generate_split("val", 3), "valid splits"),
    (lambda: md.generate_split("train", -1), "num_examples"),
    (lambda: md.generate_split("train", 3, seed=-2), "seed"),
    (lambda: md.prepare("/nonexistent", "huge"), "valid configs"),
])
def test_generate_and_config_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# -- TFDS builder -----------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_tfds_round_trip_equals_generate_split(small_dir, split):
  loaded = md.load_split(split, data_dir=small_dir, config="small")
  expected = md.generate_split(split, md.CONFIG_SIZES["small"][split], seed=0)
  assert loaded.keys() == expected.keys()
  for k in expected:
    assert loaded[k].dtype == expected[k].dtype, k
    np.testing.assert_array_equal(loaded[k], expected[k], err_msg=k)


def test_prepare_is_idempotent(small_dir):
  record = os.path.join(small_dir, "multi_digits", "small", "1.0.0",
                        "multi_digits-train.array_record-00000-of-00001")
  mtime = os.path.getmtime(record)
  md.prepare(small_dir, "small")
  assert os.path.getmtime(record) == mtime
  loaded = md.load_or_prepare("test", data_dir=small_dir, config="small")
  assert loaded["image"].shape == (1000, 12, 16, 1)


def test_load_split_unprepared_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="prepare") as info:
    md.load_split("train", data_dir=str(tmp_path), config="small")
  assert str(tmp_path) in str(info.value)
  assert not os.listdir(tmp_path)  # nothing generated behind the user's back


# -- to_batch_arrays --------------------------------------------------------


def test_to_batch_arrays_zeroes_unlabelled():
  ex = md.generate_split("train", 200, seed=0)
  masks = mixture.label_fraction_masks(200, {"left": 0.3, "right": 0.6, "present": 0.5,
                               "sum": 0.2}, seed=0)
  batch = md.to_batch_arrays(ex, masks, md.TASK_NAMES)
  assert batch["inputs"].dtype == np.float32
  assert batch["inputs"].shape == (200, 12, 16, 1)
  assert batch["inputs"].min() == 0.0 and batch["inputs"].max() == 1.0
  np.testing.assert_allclose(batch["inputs"] * 255, ex["image"], atol=1e-4)
  expected = {"left": (np.int32, (200,)), "right": (np.int32, (200,)),
              "present": (np.float32, (200, 10)), "sum": (np.float32, (200,))}
  for task, (dtype, shape) in expected.items():
    label, mask = batch["labels"][task], batch["masks"][task]
    assert label.dtype == dtype and label.shape == shape
    assert mask.dtype == np.float32 and mask.shape == (200,)
    np.testing.assert_array_equal(mask, masks[task])
    unl, lab = mask == 0, mask == 1
    assert np.all(label[unl] == 0)
    np.testing.assert_array_equal(label[lab], ex[task][lab].astype(dtype))


def test_to_batch_arrays_all_labelled_and_task_subset():
  ex = md.generate_split("test", 20)
  batch = md.to_batch_arrays(ex, None, ["sum", "left"])
  assert set(batch["labels"]) == set(batch["masks"]) == {"sum", "left"}
  np.testing.assert_array_equal(batch["masks"]["sum"], np.ones(20))
  np.testing.assert_array_equal(batch["labels"]["left"], ex["left"])


@pytest.mark.parametrize("masks, tasks, match", [
    (None, ["left", "digits"], r"'digits'.*valid tasks"),
    ({"left": np.ones(5)}, ["left", "sum"], "No mask for task"),
    ({"left": np.ones(5), "lft": np.ones(5)}, ["left"], "unknown task"),
    ({"left": np.ones(4)}, ["left"], "shape"),
])
def test_to_batch_arrays_errors(masks, tasks, match):
  ex = md.generate_split("test", 5)
  with pytest.raises(ValueError, match=match):
    md.to_batch_arrays(ex, masks, tasks)
