"""experiments/semi_supervised.py end to end on a tiny setting: both arms at
two label fractions, the curves' points equal to the runs' test metrics."""

import json
import os

import ml_collections
import pytest

from experiments import semi_supervised
from experiments import sweep as sweep_lib
from experiments import train
from experiments.configs.sweeps import semi_supervised as default_config
import train_test  # tests/train_test.py


def test_both_arms_over_label_fractions(small_data_dir, tmp_path):
  config = default_config.get_config()
  config.tasks = "left,sum"
  config.fractions = (0.5, 1.0)
  config.seeds = (0,)
  config.tune = ml_collections.ConfigDict()
  base = train_test.tiny_config(small_data_dir)
  config.overrides = ml_collections.ConfigDict({
      "data": {"data_dir": small_data_dir, "validation_fraction": 0.2,
               "options": {"builder_config": "small"}},
      "select_by": "loss", "num_steps": 4, "eval_every": 2, "log_every": 2,
      "checkpoint_every": 4, "batch_size": base.batch_size,
      "eval_batch_size": base.eval_batch_size, "mesh": {"data": 1},
      "model": {"trunk": "mlp", "hidden_sizes": (32,),
                "head_hidden_sizes": ()},
      "optimizer": {"schedule": "constant"}})
  sweep = semi_supervised.make_sweep(config, ["left", "sum"])
  root = str(tmp_path)
  runs = sweep_lib.plan(sweep, root, [])
  assert sorted((r.method, r.group) for r in runs) == [
      ("pretexts", "labels=100%"), ("pretexts", "labels=50%"),
      ("supervised", "labels=100%"), ("supervised", "labels=50%")]
  sweep_lib.run_all(sweep, runs, train.run)
  curves = semi_supervised.collect(config, runs, root)
  assert set(curves) == {"left/accuracy", "sum/mae", "sum/rmse"}
  for run in runs:
    with open(os.path.join(run.workdir, "results.json")) as f:
      results = json.load(f)
    fraction = 0.5 if run.group == "labels=50%" else 1.0
    assert results["label_counts"]["left"] > 0
    # The pretext arm trains the pretexts on labelled and pool rows.
    assert ("grid_mask/psnr" in results["eval"]) == (run.method == "pretexts")
    point = next(p for p in curves["left/accuracy"][run.method]
                 if p["fraction"] == fraction)
    assert point["mean"] == pytest.approx(results["eval"]["left/accuracy"])
  # Same labelled rows for both arms at a fraction.
  counts = {(r.method, r.group): json.load(open(os.path.join(
      r.workdir, "results.json")))["label_counts"] for r in runs}
  assert counts[("pretexts", "labels=50%")] == counts[("supervised",
                                                       "labels=50%")]
  for name in ("semi_supervised.md", "semi_supervised.png",
               "semi_supervised.json"):
    assert os.path.exists(os.path.join(root, name))
  with open(os.path.join(root, "semi_supervised.md")) as f:
    table = f.read()
  assert "| left/accuracy | 50% |" in table


def test_fractions_are_checked():
  config = default_config.get_config()
  config.fractions = (0.0, 0.5)
  with pytest.raises(ValueError, match=r"config.fractions: 0.0 is not in "
                     r"\(0, 1\]"):
    semi_supervised.make_sweep(config, ["left"])
