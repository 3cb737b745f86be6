"""Every catalog config builds its experiment and trains a few steps.

Runs under `tfds.testing.mock_data` (random examples with the real feature
specs), with each config shrunk only in size (steps, batch, image size, model
width), so that what is exercised is the config itself: its dataset options,
its mixture, its task set and its trunk. The experiment comes from
`experiments.train.build_experiment` and trains with the library calls that
`train.run` makes (a compiled step, the whole held-out evaluation); what
`train.run` adds on top (the loop, logs, checkpoints, results.json) is the
same for every dataset and is tested once, in `tests/train_test.py`.
"""

import importlib
import json
import math

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import train

import train_testing  # tests/train_testing.py

NUM_MOCK = 12
NUM_STEPS = 3
CONFIGS = ("celeb_a", "smallnorb", "dsprites", "shapes3d", "mnist_family",
           "conll2003")


def _small(config):
  config.num_steps = NUM_STEPS
  config.batch_size = 8
  config.eval_batch_size = 8
  config.optimizer.warmup_steps = 1
  config.model.head_hidden_sizes = ()
  if config.model.trunk == "tagger":
    config.data.options.max_length = 12
    config.model.tagger.embed_dim = 8
    config.model.tagger.feature_size = 8
    config.model.tagger.num_layers = 1
  else:
    config.model.trunk = "mlp"
    config.model.hidden_sizes = (16,)
    if "image_size" in config.data.options:
      config.data.options.image_size = 16
  return config


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_under_mock_data(name):
  module = importlib.import_module(f"experiments.configs.{name}")
  config = _small(module.get_config())
  if name == "celeb_a":  # 41 heads compile slowly; catalog_test covers all 41
    config.tasks = "Smiling,Male,landmarks"
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    exp = train.build_experiment(config)
    history, final_eval, iterator = train_testing.train_and_evaluate(
        exp, config.seed, NUM_STEPS)
    # The iterator's position (what a checkpoint stores) is plain JSON, and
    # an iterator restored from it continues with the same batches.
    data_state = json.loads(json.dumps(iterator.get_state()))
    restored = exp.train_mixture.iterator(data_state)
    jax.tree.map(np.testing.assert_array_equal, next(restored), next(iterator))
  assert data_state["step"] == NUM_STEPS
  tasks = exp.tasks.names
  # Mock splits hold NUM_MOCK examples; each train source labels its own tasks
  # fully (label_fractions empty), so every task has NUM_MOCK labelled rows.
  assert exp.label_counts == {t: NUM_MOCK for t in tasks}
  assert exp.num_train_examples == NUM_MOCK * len(
      exp.train_mixture.components)
  assert exp.num_unlabelled == 0
  # Every step trained on finite losses; the counts are the batch's labels.
  for metrics, batch in history:
    assert metrics["nonfinite"] == 0.0
    assert math.isfinite(metrics["loss"])
    for task in tasks:
      assert metrics[f"{task}/count"] == float(np.sum(batch["masks"][task]))
      assert math.isfinite(metrics[f"{task}/loss"]), task
  # Every task was evaluated on the held-out components with finite metrics:
  # per-example tasks once per held-out example of their source.
  for task in tasks:
    if exp.tasks.get(task).label_shape == () or name != "conll2003":
      assert final_eval[f"{task}/count"] == NUM_MOCK, task
    else:  # per-token counts: at least one real token per sentence
      assert final_eval[f"{task}/count"] >= NUM_MOCK, task
    assert all(math.isfinite(v) for k, v in final_eval.items()
               if k.startswith(f"{task}/")), task

