"""`mtl_jax.data.build` (dataset, tasks, mixture and eval stream from explicit
arguments) and `mtl_jax.training.evaluate` (eval step + accumulate + finalize
over a stream, in one call). Small data, no training: seconds."""

import jax
import numpy as np
import pytest

from mtl_jax.data import build as data_build
from mtl_jax.data import mixture
from mtl_jax.models import build as models_build
from mtl_jax.training import evaluate as evaluate_lib
from mtl_jax.training import parallel
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

FRACTIONS = {"left": 0.5, "right": 0.3, "present": 0.2, "sum": 0.1}


@pytest.fixture(scope="module")
def dataset(small_data_dir):
  return data_build.load_dataset("multi_digits", data_dir=small_data_dir,
                                 options={"builder_config": "small"})


def test_build_data_labels_splits_and_streams(dataset):
  tasks = data_build.select_tasks(dataset.tasks, (), {"sum": 0.5})
  assert tasks.names == ("left", "right", "present", "sum")
  assert tuple(tasks.static_weights) == (1.0, 1.0, 1.0, 0.5)
  data = data_build.build_data(dataset, tasks, batch_size=32,
                               eval_batch_size=256, seed=0,
                               label_fractions=FRACTIONS)
  # The default config's fractions of the 2000 small training examples.
  assert data.label_counts == {"left": 1000, "right": 600, "present": 400,
                               "sum": 200}
  assert data.num_train_examples == 2000
  assert 0 < data.num_unlabelled < 2000
  # Dropped by default: the mixture holds the labelled rows only.
  assert sum(c.num_rows for c in data.train_mixture.components) == (
      2000 - data.num_unlabelled)
  kept = data_build.build_data(dataset, tasks, batch_size=32,
                               eval_batch_size=256, seed=0,
                               label_fractions=FRACTIONS,
                               drop_unlabelled=False)
  assert sum(c.num_rows for c in kept.train_mixture.components) == 2000
  batch, _ = data.train_mixture.batch(data.train_mixture.initial_state())
  tasks.validate_batch(batch)
  assert data.eval_stream.num_examples == 1000


def test_select_tasks_and_fractions_name_unknown_tasks(dataset):
  with pytest.raises(KeyError, match="unknown task 'colour'"):
    data_build.select_tasks(dataset.tasks, ["left", "colour"])
  with pytest.raises(ValueError, match=r"^task_weights names unknown task"):
    data_build.select_tasks(dataset.tasks, (), {"colour": 1.0})
  with pytest.raises(ValueError, match=r"^fr names unknown task\(s\) "
                     r"\['colour'\]; valid tasks: left"):
    data_build.build_data(dataset, dataset.tasks, batch_size=8,
                          eval_batch_size=8, seed=0,
                          label_fractions={"colour": 0.5},
                          fractions_field="fr")
  with pytest.raises(ValueError, match="leave no labelled training example"):
    data_build.build_data(dataset, dataset.tasks, batch_size=8,
                          eval_batch_size=8, seed=0,
                          label_fractions={t: 0.0 for t in FRACTIONS})


def test_evaluate_is_eval_step_accumulate_finalize(dataset):
  tasks = dataset.tasks
  stream = mixture.EvalStream(list(dataset.eval), tasks, batch_size=256)
  model = models_build.make_hard_sharing_model(
      tasks, models_build.make_trunk("mlp", hidden_sizes=(8,)))
  sample = next(iter(stream))["inputs"][:1]
  params = state_lib.init_params(model, sample, jax.random.PRNGKey(0))
  eval_step = jax.jit(step_lib.make_eval_step(model.apply, tasks))
  total = None
  for batch in stream:
    total = step_lib.accumulate(total, eval_step(params, batch))
  expected = step_lib.finalize(tasks, total)
  got = evaluate_lib.make_evaluate(model.apply, tasks, stream)(params)
  assert got == expected
  assert got["left/count"] == 1000.0
  par = parallel.DataParallel(parallel.make_mesh(-1))
  placed = par.put_state(params)
  sharded = evaluate_lib.make_evaluate(model.apply, tasks, stream,
                                       parallel=par, params_like=placed)
  for key, value in expected.items():
    np.testing.assert_allclose(sharded(placed)[key], value, rtol=1e-5,
                               err_msg=key)
  with pytest.raises(ValueError, match="no evaluation batch"):
    evaluate_lib.evaluate(eval_step, params, [], tasks)


def test_validation_rows_are_held_out_of_training_with_their_labels(dataset):
  tasks = dataset.tasks
  kwargs = dict(batch_size=32, eval_batch_size=256, seed=0,
                label_fractions=FRACTIONS)
  full = data_build.build_data(dataset, tasks, **kwargs)
  data = data_build.build_data(dataset, tasks, validation_fraction=0.1,
                               validation_seed=3, **kwargs)
  assert full.validation_stream is None and full.validation_counts == {}
  # 10% of the labelled rows (2000 - unlabelled), rounded, leave training.
  labelled_rows = 2000 - full.num_unlabelled
  held = int(round(0.1 * labelled_rows))
  assert data.validation_stream.num_examples == held
  assert data.num_train_examples == 2000 - held
  assert data.num_unlabelled == full.num_unlabelled
  # Every label is in training or validation, never both.
  for t in tasks.names:
    assert (data.label_counts[t] + data.validation_counts[t]
            == full.label_counts[t]), t
  train_rows = np.concatenate([c.indices for c in
                               data.train_mixture.components])
  val_rows = np.concatenate([c.indices for c in
                             data.validation_stream.components])
  assert not set(train_rows) & set(val_rows)
  # The held-out rows keep each task's label where training would: the
  # masks in the validation stream count the validation labels.
  counts = {t: 0.0 for t in tasks.names}
  for batch in data.validation_stream:
    for t in tasks.names:
      counts[t] += float(np.sum(batch["masks"][t]))
  assert counts == {t: float(n) for t, n in data.validation_counts.items()}
  # Seeded: the same seed gives the same rows, another seed others.
  again = data_build.build_data(dataset, tasks, validation_fraction=0.1,
                                validation_seed=3, **kwargs)
  other = data_build.build_data(dataset, tasks, validation_fraction=0.1,
                                validation_seed=4, **kwargs)
  rows = lambda d: np.concatenate([c.indices for c in
                                   d.validation_stream.components])
  np.testing.assert_array_equal(rows(again), val_rows)
  assert set(rows(other)) != set(val_rows)
  with pytest.raises(ValueError, match=r"validation fraction must be in "
                     r"\[0, 1\), got 1.0"):
    data_build.build_data(dataset, tasks, validation_fraction=1.0, **kwargs)
