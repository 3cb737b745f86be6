"""Tests of the dataset catalog under `tfds.testing.mock_data`.

Mock data has the real feature specs (shapes, dtypes, class counts) with
random values, and every split (slices included) has `NUM_EXAMPLES` rows.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from mtl_jax import weighting
from mtl_jax.data import catalog
from mtl_jax.data import mixture
from mtl_jax.data.catalog import celeb_a
from mtl_jax.data.catalog import conll2003
from mtl_jax.data.catalog import mnist_family
from mtl_jax.models import build
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

NUM_EXAMPLES = 6
B = 8  # > NUM_EXAMPLES: the eval batch is padded
L = 16  # conll2003 max_length in tests

# name -> (options, input shape, input dtype, {task: (label shape, dtype)})
EXPECTED = {
    "celeb_a": ({"image_size": 32}, (32, 32, 3), np.float32, {
        **{a: ((), np.int32) for a in ("5_o_Clock_Shadow", "Smiling", "Male",
                                        "Young")},
        "landmarks": ((10,), np.float32)}),
    "smallnorb": ({}, (48, 48, 1), np.float32, {
        t: ((), np.int32) for t in ("category", "instance", "elevation",
                                    "azimuth", "lighting")}),
    "dsprites": ({}, (64, 64, 1), np.float32, {
        "shape": ((), np.int32), "scale": ((), np.float32),
        "orientation": ((2,), np.float32), "x_position": ((), np.float32),
        "y_position": ((), np.float32)}),
    "shapes3d": ({}, (64, 64, 3), np.float32, {
        t: ((), np.int32) for t in ("floor_hue", "wall_hue", "object_hue",
                                    "scale", "shape", "orientation")}),
    "mnist_family": ({}, (28, 28, 1), np.float32, {
        t: ((), np.int32) for t in ("mnist", "fashion_mnist", "kmnist")}),
    "conll2003": ({"max_length": L}, (L,), np.int32, {
        t: ((L,), np.int32) for t in ("pos", "chunk", "ner")}),
}
NUM_CLASSES = {
    "smallnorb": {"category": 5, "instance": 10, "elevation": 9,
                  "azimuth": 18, "lighting": 6},
    "dsprites": {"shape": 3},
    "shapes3d": {"floor_hue": 10, "wall_hue": 10, "object_hue": 10,
                 "scale": 8, "shape": 4, "orientation": 15},
    "mnist_family": {"mnist": 10, "fashion_mnist": 10, "kmnist": 10},
    "conll2003": {"pos": 47, "chunk": 23, "ner": 9},
}


@pytest.fixture(name="mock")
def _mock():
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    yield


def _check_batch(name, ds, batch):
  _, input_shape, input_dtype, labels = EXPECTED[name]
  assert batch["inputs"].shape == (B,) + input_shape
  assert batch["inputs"].dtype == input_dtype
  assert set(batch["labels"]) == set(ds.tasks.names)
  assert set(batch["masks"]) == set(ds.tasks.names)
  for task in ds.tasks:
    label, mask = batch["labels"][task.name], batch["masks"][task.name]
    assert label.shape == (B,) + task.label_shape
    assert label.dtype == np.dtype(task.label_dtype)
    assert mask.dtype == np.float32
    assert mask.shape == ((B, L) if name == "conll2003" else (B,))
    if task.name in labels:
      assert (label.shape[1:], label.dtype) == labels[task.name]
  ds.tasks.validate_batch(batch)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dataset_batches_have_the_task_shapes(mock, name):
  del mock
  options = EXPECTED[name][0]
  ds = catalog.get_dataset(name, **options)
  assert ds.name == name
  assert set(EXPECTED[name][3]) <= set(ds.tasks.names)
  for task, c in NUM_CLASSES.get(name, {}).items():
    assert ds.tasks.get(task).num_classes == c
  assert [c.name for c in ds.train] == [c.name for c in ds.eval]

  train = mixture.Mixture(ds.train, ds.tasks, batch_size=B, seed=0)
  it = train.iterator()
  for _ in range(2):
    batch = next(it)
    _check_batch(name, ds, batch)
  if name not in ("mnist_family", "conll2003"):  # rows label every task
    for t in ds.tasks.names:
      np.testing.assert_array_equal(batch["masks"][t], 1.0)

  stream = mixture.EvalStream(ds.eval, ds.tasks, batch_size=B)
  batches = list(stream)
  num_eval = NUM_EXAMPLES * len(ds.eval)
  assert len(batches) == -(-num_eval // B)
  for batch in batches:
    _check_batch(name, ds, batch)
  last = batches[-1]
  pad = B * len(batches) - num_eval
  for t in ds.tasks.names:  # padding rows are unlabelled
    assert not np.any(last["masks"][t][B - pad:])


def test_dataset_info():
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    assert catalog.get_dataset("smallnorb").info == {}
    ds = catalog.get_dataset("conll2003", max_length=L)
  assert ds.info["vocab_size"] == len(ds.info["vocab"]) > 2
  assert ds.info["max_length"] == L
  assert len(ds.tasks) == 3


def test_celeb_a_tasks_and_landmark_frame(mock):
  del mock
  ds = catalog.get_dataset("celeb_a", image_size=celeb_a.CROP_SIZE)
  assert len(ds.tasks) == 41 and ds.tasks.names[-1] == "landmarks"
  assert "Smiling" in ds.tasks.names

  source = ds.eval[0].source
  raw = source.read(np.arange(NUM_EXAMPLES))
  batch = next(iter(mixture.EvalStream(ds.eval, ds.tasks, batch_size=B)))
  # Inputs: rows 20..197 of the 218x178 image, every column, scaled to [0, 1]
  # (no resize at image_size 178): the frame the landmarks are moved into.
  np.testing.assert_allclose(batch["inputs"][:NUM_EXAMPLES],
                             raw["image"][:, 20:198] / 255.0, rtol=1e-6)
  lm = raw["landmarks"]
  for i in range(NUM_EXAMPLES):
    expected = []
    for point in ("lefteye", "righteye", "nose", "leftmouth", "rightmouth"):
      expected += [lm[f"{point}_x"][i] / 178.0,
                   (lm[f"{point}_y"][i] - 20.0) / 178.0]
    np.testing.assert_allclose(batch["labels"]["landmarks"][i], expected,
                               rtol=1e-6)
    assert batch["labels"]["Smiling"][i] == int(raw["attributes"]["Smiling"][i])


def test_celeb_a_landmark_transform_by_hand():
  lm = {f"{p}_{a}": np.array([0]) for p in celeb_a.LANDMARK_POINTS
        for a in "xy"}
  lm.update(lefteye_x=np.array([0]), lefteye_y=np.array([20]),  # crop corner
            righteye_x=np.array([178]), righteye_y=np.array([198]),  # far one
            nose_x=np.array([89]), nose_y=np.array([109]))  # centre of image
  got = celeb_a.landmark_targets(lm)[0]
  np.testing.assert_allclose(got[:6], [0, 0, 1, 1, 0.5, 0.5])
  np.testing.assert_allclose(got[6:], [0, -20 / 178, 0, -20 / 178])


def test_dsprites_inputs_are_binary_and_orientation_on_circle(mock):
  del mock
  ds = catalog.get_dataset("dsprites")
  raw = ds.eval[0].source.read(np.arange(NUM_EXAMPLES))
  batch = next(iter(mixture.EvalStream(ds.eval, ds.tasks, batch_size=B)))
  x = batch["inputs"][:NUM_EXAMPLES]
  assert set(np.unique(x)) <= {0.0, 1.0}
  np.testing.assert_array_equal(x, (raw["image"] > 0).astype(np.float32))
  angle = raw["value_orientation"]
  np.testing.assert_allclose(batch["labels"]["orientation"][:NUM_EXAMPLES],
                             np.stack([np.sin(angle), np.cos(angle)], -1),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(batch["labels"]["x_position"][:NUM_EXAMPLES],
                             raw["value_x_position"])


def test_mnist_family_masks_are_one_hot_by_source(mock):
  del mock
  ds = catalog.get_dataset("mnist_family")
  assert [c.name for c in ds.train] == list(mnist_family.MEMBERS)
  train = mixture.Mixture(ds.train, ds.tasks, batch_size=B, seed=3,
                          rates=mixture.mixing_rates(
                              {c.name: c.num_rows for c in ds.train},
                              "uniform"))
  state = train.initial_state()
  seen = set()
  for _ in range(4):
    comp, rows, _ = train.plan(state)
    batch, state = train.batch(state)
    masks = np.stack([batch["masks"][t] for t in mnist_family.MEMBERS], -1)
    np.testing.assert_array_equal(masks, np.eye(3)[comp])
    for j, (i, row) in enumerate(zip(comp, rows)):
      task = mnist_family.MEMBERS[i]
      raw = ds.train[i].source.read(np.array([row]))
      assert batch["labels"][task][j] == raw["label"][0]
      np.testing.assert_allclose(batch["inputs"][j], raw["image"][0] / 255.0)
      for other in mnist_family.MEMBERS:
        if other != task:
          assert batch["labels"][other][j] == 0
    seen.update(comp.tolist())
  assert seen == {0, 1, 2}


def test_conll2003_masks_cover_tokens_with_tags(mock):
  del mock
  ds = catalog.get_dataset("conll2003", max_length=L)
  vocab = ds.info["vocab"]
  raw = ds.eval[0].source.read(np.arange(NUM_EXAMPLES))
  batch = next(iter(mixture.EvalStream(ds.eval, ds.tasks, batch_size=B)))
  tags = {"pos": "pos", "chunk": "chunks", "ner": "ner"}
  for i in range(NUM_EXAMPLES):
    n_tok = min(len(raw["tokens"][i]), L)
    ids = batch["inputs"][i]
    np.testing.assert_array_equal(ids[:n_tok],
                                  vocab.encode(raw["tokens"][i])[:n_tok])
    assert np.all(ids[:n_tok] > 0) and np.all(ids[n_tok:] == 0)
    for task, feature in tags.items():
      n = min(n_tok, len(raw[feature][i]))
      expected_mask = np.zeros(L, np.float32)
      expected_mask[:n] = 1.0
      np.testing.assert_array_equal(batch["masks"][task][i], expected_mask)
      np.testing.assert_array_equal(batch["labels"][task][i][:n],
                                    raw[feature][i][:n])
      assert np.all(batch["labels"][task][i][n:] == 0)
      # Never labelled where there is no token (padding).
      assert not np.any(batch["masks"][task][i][ids == 0])
  for task in tags:  # the padding row of the eval batch
    assert not np.any(batch["masks"][task][NUM_EXAMPLES:])


def test_conll2003_vocabulary_comes_from_train_tokens(mock):
  del mock
  ds = catalog.get_dataset("conll2003", max_length=L, max_vocab=5)
  assert ds.info["vocab_size"] == 5
  with pytest.raises(ValueError, match="max_vocab"):
    catalog.get_dataset("conll2003", max_vocab=1)


def test_unknown_dataset_and_option():
  with pytest.raises(ValueError, match="celeb_a.*conll2003.*dsprites"):
    catalog.get_dataset("imagenet")
  with pytest.raises(ValueError, match="image_size"):
    catalog.get_dataset("smallnorb", imagesize=32)
  with pytest.raises(ValueError, match="image_size"):
    catalog.get_dataset("smallnorb", image_size=0)


def test_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build smallnorb"):
    catalog.get_dataset("smallnorb", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match="--imports=tensorflow_datasets.text.conll2003"):
    catalog.get_dataset("conll2003", data_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["conll2003", "dsprites"])
def test_two_train_steps(mock, name):
  del mock
  if name == "conll2003":
    ds = catalog.get_dataset(name, max_length=L)
    trunk = build.make_trunk("tagger", vocab_size=ds.info["vocab_size"],
                             embed_dim=8, num_layers=1, feature_size=8)
  else:
    ds = catalog.get_dataset(name, image_size=16)
    trunk = build.make_trunk("cnn", channels=(4,), strides=(4,),
                             feature_size=8)
  model = build.make_hard_sharing_model(ds.tasks, trunk)
  k = len(ds.tasks)
  tx = optax.adam(1e-3)
  weights = weighting.get_weighting("equal", num_tasks=k)
  it = mixture.Mixture(ds.train, ds.tasks, batch_size=B, seed=0).iterator()
  first = next(it)
  params = state_lib.init_params(model, first["inputs"][:1],
                                 jax.random.PRNGKey(0))
  state = state_lib.create_train_state(params, tx, weights, k,
                                       jax.random.PRNGKey(1))
  step = jax.jit(step_lib.make_train_step(model.apply, ds.tasks, tx, weights))
  for batch in (first, next(it)):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    for t in ds.tasks.names:
      assert np.isfinite(float(metrics[f"{t}/loss"]))
      assert float(metrics[f"{t}/count"]) == float(np.sum(batch["masks"][t]))
      assert float(metrics[f"{t}/count"]) > 0
  assert int(state.step) == 2
