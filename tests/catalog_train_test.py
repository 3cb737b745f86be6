"""Every catalog config trains a few steps through experiments/train.py.

Runs under `tfds.testing.mock_data` (random examples with the real feature
specs), with each config shrunk only in size (steps, batch, image size, model
width), so that what is exercised is the config itself: its dataset options,
its mixture, its task set and its trunk.
"""

import importlib
import json
import math
import os

import pytest
import tensorflow_datasets as tfds

from experiments import train

NUM_MOCK = 12
CONFIGS = ("celeb_a", "smallnorb", "dsprites", "shapes3d", "mnist_family",
           "conll2003")


def _small(config):
  config.num_steps = 3
  config.batch_size = 8
  config.eval_batch_size = 8
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = 2
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
def test_config_trains_under_mock_data(name, tmp_path):
  module = importlib.import_module(f"experiments.configs.{name}")
  config = _small(module.get_config())
  if name == "celeb_a":  # 41 heads compile slowly; catalog_test covers all 41
    config.tasks = "Smiling,Male,landmarks"
  workdir = str(tmp_path / name)
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    exp = train.build_experiment(config)
    results = train.run(config, workdir)
  assert results["steps"] == 3
  tasks = exp.tasks.names
  # Mock splits hold NUM_MOCK examples; each train source labels its own tasks
  # fully (label_fractions empty), so every task has NUM_MOCK labelled rows.
  assert results["label_counts"] == {t: NUM_MOCK for t in tasks}
  assert results["num_train_examples"] == NUM_MOCK * len(
      exp.train_mixture.components)
  assert results["num_unlabelled"] == 0
  # Every task was evaluated on the held-out components with finite metrics:
  # per-example tasks once per held-out example of their source.
  for task in tasks:
    if exp.tasks.get(task).label_shape == () or name != "conll2003":
      assert results["eval"][f"{task}/count"] == NUM_MOCK, task
    else:  # per-token counts: at least one real token per sentence
      assert results["eval"][f"{task}/count"] >= NUM_MOCK, task
    assert all(math.isfinite(v) for k, v in results["eval"].items()
               if k.startswith(f"{task}/")), task
  # The data iterator position was saved with each checkpoint.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  train_lines = [l for l in lines if l.get("split") == "train"]
  assert [l["step"] for l in train_lines] == [1, 2, 3]
  data_state = os.path.join(workdir, "checkpoints", "3", "data")
  assert os.path.isdir(data_state)
