"""Tests for mtl_jax.data.sources."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mtl_jax.data import sources


# --------------------------------------------------------------------------
# ArraySource.


def _array_source(n=6):
  return sources.ArraySource("toy", {
      "id": np.arange(n, dtype=np.int64),
      "x": np.arange(n * 3, dtype=np.float32).reshape(n, 3),
      "attrs": {"a": np.arange(n) * 10, "b": {"c": np.arange(n) % 2 == 0}},
  })


def test_array_source_len_and_read_gathers_rows():
  source = _array_source()
  assert len(source) == 6
  assert source.name == "toy"
  got = source.read(np.array([4, 0, 4]))
  np.testing.assert_array_equal(got["id"], [4, 0, 4])
  assert got["id"].dtype == np.int64
  np.testing.assert_array_equal(got["x"], [[12, 13, 14], [0, 1, 2],
                                           [12, 13, 14]])
  np.testing.assert_array_equal(got["attrs"]["a"], [40, 0, 40])
  np.testing.assert_array_equal(got["attrs"]["b"]["c"], [True, True, True])
  # A list of ints is accepted too; empty reads give leading size 0.
  np.testing.assert_array_equal(source.read([5, 1])["id"], [5, 1])
  assert source.read(np.zeros(0, np.int64))["x"].shape == (0, 3)


def test_array_source_read_does_not_alias_storage():
  source = _array_source()
  got = source.read(np.array([1]))
  got["x"][:] = -1
  np.testing.assert_array_equal(source.read(np.array([1]))["x"], [[3, 4, 5]])


@pytest.mark.parametrize("indices,match", [
    (np.array([0, 6]), r"'toy'.*\[0, 6\).*\[0, 6\]"),
    (np.array([-1, 2]), r"'toy'.*\[0, 6\).*\[-1, 2\]"),
    (np.array([0.0, 1.0]), r"'toy'.*1-D integer.*float64"),
    (np.array([[0, 1]]), r"'toy'.*1-D integer.*\(1, 2\)"),
])
def test_array_source_bad_indices(indices, match):
  with pytest.raises(ValueError, match=match):
    _array_source().read(indices)


def test_array_source_mismatched_lengths():
  with pytest.raises(ValueError, match=r"'bad'.*different leading sizes"):
    sources.ArraySource("bad", {"a": np.zeros(3), "b": {"c": np.zeros(4)}})


def test_array_source_scalar_and_empty():
  with pytest.raises(ValueError, match=r"'bad'.*\['s'\] is a scalar"):
    sources.ArraySource("bad", {"a": np.zeros(3), "s": np.float32(1)})
  with pytest.raises(ValueError, match=r"'bad'.*no leaves"):
    sources.ArraySource("bad", {})


def test_check_indices_returns_int64():
  got = sources.check_indices(np.array([2, 0], np.int32), 3, "s")
  assert got.dtype == np.int64
  np.testing.assert_array_equal(got, [2, 0])
  assert sources.check_indices([], 3, "s").dtype == np.int64


# --------------------------------------------------------------------------
# stack_records.


def test_stack_records_equal_shapes_stack():
  records = [{"x": np.full((2, 2), i, np.uint8), "y": i} for i in range(3)]
  got = sources.stack_records(records)
  assert got["x"].shape == (3, 2, 2)
  assert got["x"].dtype == np.uint8
  np.testing.assert_array_equal(got["x"][:, 0, 0], [0, 1, 2])
  np.testing.assert_array_equal(got["y"], [0, 1, 2])


def test_stack_records_ragged_become_object_arrays():
  records = [{"tokens": np.arange(n, dtype=np.int32)} for n in (3, 1, 2)]
  got = sources.stack_records(records)["tokens"]
  assert got.dtype == object
  assert got.shape == (3,)
  for n, value in zip((3, 1, 2), got):
    assert value.dtype == np.int32
    np.testing.assert_array_equal(value, np.arange(n))


def test_stack_records_nested_dicts():
  records = [{"attributes": {"smiling": i % 2 == 0, "young": bool(i)},
              "id": i} for i in range(4)]
  got = sources.stack_records(records)
  assert set(got) == {"attributes", "id"}
  np.testing.assert_array_equal(got["attributes"]["smiling"],
                                [True, False, True, False])
  np.testing.assert_array_equal(got["attributes"]["young"],
                                [False, True, True, True])
  np.testing.assert_array_equal(got["id"], [0, 1, 2, 3])


def test_stack_records_empty():
  with pytest.raises(ValueError, match="at least one record"):
    sources.stack_records([])


# --------------------------------------------------------------------------
# TfdsSource.


def test_tfds_source_reads_mock_mnist():
  with tfds.testing.mock_data(num_examples=5):
    source = sources.TfdsSource("mnist", "train")
    assert source.name == "mnist/train"
    assert len(source) == 5
    got = source.read(np.array([0, 3]))
    assert set(got) == {"image", "label"}
    assert got["image"].shape == (2, 28, 28, 1)
    assert got["image"].dtype == np.uint8
    assert got["label"].shape == (2,)
    assert np.all((got["label"] >= 0) & (got["label"] < 10))
    # Reading again (alone or in another batch) gives identical values.
    again = source.read(np.array([3, 0, 3]))
    np.testing.assert_array_equal(again["image"][[1, 0]], got["image"])
    np.testing.assert_array_equal(again["label"][[1, 0]], got["label"])
    np.testing.assert_array_equal(again["image"][2], got["image"][1])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
      source.read(np.array([5]))
    with pytest.raises(ValueError, match="at least one index"):
      source.read(np.zeros(0, np.int64))


def test_tfds_source_feature_selection():
  with tfds.testing.mock_data(num_examples=5):
    source = sources.TfdsSource("mnist", "train", features=["image"])
    got = source.read(np.array([1, 2, 4]))
    assert set(got) == {"image"}
    assert got["image"].shape == (3, 28, 28, 1)
    with pytest.raises(ValueError,
                       match=r"unknown feature\(s\) \['nope'\].*image, label"):
      sources.TfdsSource("mnist", "train", features=["image", "nope"])


def test_tfds_source_not_prepared(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    sources.TfdsSource("mnist", "train", data_dir=str(tmp_path))
  message = str(info.value)
  assert "tfds build mnist" in message
  assert "array_record" in message
  assert str(tmp_path) in message
  assert sources.prepare_command("mnist", None) == (
      "tfds build mnist --file_format=array_record")
