"""Tests of the Task spec, TaskSet lookup and batch validation."""

import numpy as np
import pytest

from mtl_jax import tasks as tasks_lib


def _tasks():
  return tasks_lib.TaskSet([
      tasks_lib.classification_task("cls", 3),
      tasks_lib.multilabel_task("ml", 4),
      tasks_lib.regression_task("reg", weight=0.5),
  ])


def _batch(b=5):
  return {
      "inputs": np.zeros((b, 2, 2, 1), np.float32),
      "labels": {"cls": np.array([0, 1, 2, 0, 1], np.int32)[:b],
                 "ml": np.zeros((b, 4), np.float32),
                 "reg": np.linspace(0, 1, b).astype(np.float32)},
      "masks": {"cls": np.ones(b, np.float32), "ml": np.ones(b, np.float32),
                "reg": np.ones(b, np.float32)},
  }


def test_taskset_order_names_and_weights():
  ts = _tasks()
  assert ts.names == ("cls", "ml", "reg")
  assert ts.static_weights == (1.0, 1.0, 0.5)
  assert ts["ml"].output_shape == (4,)
  assert ts[0].num_classes == 3
  assert ts.select(["reg", "cls"]).names == ("reg", "cls")


def test_unknown_task_lists_valid_names():
  with pytest.raises(KeyError, match=r"unknown task 'foo'; valid tasks: cls, ml, reg"):
    _tasks().get("foo")


def test_duplicate_and_invalid_specs():
  with pytest.raises(ValueError, match="duplicate task names"):
    tasks_lib.TaskSet([tasks_lib.regression_task("a"),
                       tasks_lib.regression_task("a")])
  with pytest.raises(ValueError, match="weight must be finite"):
    tasks_lib.regression_task("a", weight=-1.0)
  with pytest.raises(ValueError, match="num_classes must be >= 2"):
    tasks_lib.classification_task("a", 1)


def test_valid_batch_passes():
  _tasks().validate_batch(_batch())


def test_dense_mask_prefix_is_accepted():
  ts = tasks_lib.TaskSet([tasks_lib.regression_task("img", (3, 3))])
  batch = {"inputs": np.zeros((2, 3), np.float32),
           "labels": {"img": np.zeros((2, 3, 3), np.float32)},
           "masks": {"img": np.ones((2, 3), np.float32)}}
  ts.validate_batch(batch)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b["labels"].pop("ml"), r"batch\['labels'\] is missing task\(s\) \['ml'\]"),
    (lambda b: b["masks"].update(extra=np.ones(5, np.float32)),
     r"batch\['masks'\] has unknown task\(s\) \['extra'\]"),
    (lambda b: b["labels"].update(cls=np.zeros((5, 1), np.int32)),
     r"task 'cls': label shape \(5, 1\) does not match .* \(5,\)"),
    (lambda b: b["labels"].update(cls=np.array([0, 1, 3, 0, 1], np.int32)),
     r"task 'cls': class label 3 out of range \[0, 3\)"),
    (lambda b: b["labels"].update(cls=np.array([0, -1, 0, 0, 1], np.int32)),
     r"task 'cls': class label -1 out of range"),
    (lambda b: b["labels"].update(cls=np.zeros(5, np.float32)),
     r"task 'cls': labels must be integer"),
    (lambda b: b["masks"].update(reg=np.ones(4, np.float32)),
     r"task 'reg': mask shape \(4,\) must be the batch shape \(5,\)"),
    (lambda b: b["masks"].update(ml=np.ones((5, 3), np.float32)),
     r"task 'ml': mask shape \(5, 3\)"),
    (lambda b: b["masks"].update(reg=np.full(5, 2.0, np.float32)),
     r"task 'reg': mask values must lie in \[0, 1\]"),
    (lambda b: b["labels"].update(reg=np.array([0, np.nan, 0, 0, 0], np.float32)),
     r"task 'reg': labels contain NaN"),
    (lambda b: b["labels"].update(ml=np.full((5, 4), 2.0, np.float32)),
     r"task 'ml': multi-label targets must lie in \[0, 1\]"),
    (lambda b: b.update(inputs=np.full((5, 2), np.inf, np.float32)),
     r"inputs.*NaN or Inf"),
    (lambda b: b.pop("masks"), r"batch has no 'masks' entry"),
])
def test_bad_batches_name_the_problem(mutate, message):
  batch = _batch()
  mutate(batch)
  with pytest.raises(ValueError, match=message):
    _tasks().validate_batch(batch)


def test_task_loss_sums_match_hand_computation():
  import jax.numpy as jnp
  ts = tasks_lib.TaskSet([tasks_lib.classification_task("c", 2),
                          tasks_lib.regression_task("r")])
  # logits [0, ln 3] -> p(class 1) = 3/4; CE(label 1) = -ln(3/4).
  preds = {"c": jnp.array([[0.0, np.log(3.0)], [0.0, 0.0]]),
           "r": jnp.array([1.0, 3.0])}
  batch = {"labels": {"c": jnp.array([1, 0]), "r": jnp.array([0.0, 1.0])},
           "masks": {"c": jnp.array([1.0, 0.0]), "r": jnp.array([1.0, 1.0])}}
  sums, counts = tasks_lib.task_loss_sums(ts, preds, batch)
  np.testing.assert_allclose(sums, [-np.log(0.75), 1.0 + 4.0], rtol=1e-6)
  np.testing.assert_array_equal(counts, [1.0, 2.0])
