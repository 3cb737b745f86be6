"""experiments/semi_supervised.py: end to end on a tiny setting (both arms
at one label fraction, the curve points equal to the runs' test metrics),
and the curves over fractions and seeds from a fake trainer."""

import json
import os

import ml_collections
import numpy as np
import pytest

from experiments import semi_supervised
from experiments import sweep as sweep_lib
from experiments import train
from experiments.configs.sweeps import semi_supervised as default_config
import train_test  # tests/train_test.py


def test_both_arms_over_label_fractions(small_data_dir, tmp_path):
  config = default_config.get_config()
  config.tasks = "left,sum"
  config.fractions = (0.5,)
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
      ("pretexts", "labels=50%"), ("supervised", "labels=50%")]
  sweep_lib.run_all(sweep, runs, train.run)
  curves = semi_supervised.collect(config, runs, root)
  assert set(curves) == {"left/accuracy", "sum/mae", "sum/rmse"}
  for run in runs:
    with open(os.path.join(run.workdir, "results.json")) as f:
      results = json.load(f)
    fraction = 0.5
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


def test_curves_over_fractions_and_seeds(tmp_path):
  """Fake runs: accuracy = 0.5 + fraction / 4 (+ 0.1 with pretexts) + 0.01
  seed; per fraction and arm the mean and CI over seeds 0, 1, 2."""
  config = default_config.get_config()
  config.tasks = "left"
  config.fractions = (0.1, 1.0)
  config.tune = ml_collections.ConfigDict()
  sweep = semi_supervised.make_sweep(config, ["left"])
  runs = sweep_lib.plan(sweep, str(tmp_path), [])
  assert len(runs) == 2 * 2 * 3

  def trainer(cfg, workdir):
    accuracy = (0.5 + cfg.data.label_fractions.left / 4 + 0.01 * cfg.seed
                + (0.1 if cfg.pretext.names else 0.0))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"eval": {"left/accuracy": accuracy, "left/count": 1.0}}, f)

  sweep_lib.run_all(sweep, runs, trainer)
  curves = semi_supervised.collect(config, runs, str(tmp_path))
  points = curves["left/accuracy"]
  half = 4.302652729749464 * 0.01 / np.sqrt(3)  # t(0.975, 2) * s / sqrt(n)
  for arm, extra in (("supervised", 0.0), ("pretexts", 0.1)):
    assert [p["fraction"] for p in points[arm]] == [0.1, 1.0]
    for p in points[arm]:
      assert p["n"] == 3
      assert p["mean"] == pytest.approx(0.51 + p["fraction"] / 4 + extra)
      assert p["upper"] - p["mean"] == pytest.approx(half)
  with open(os.path.join(str(tmp_path), "semi_supervised.md")) as f:
    table = f.read()
  assert f"| left/accuracy | 10% | {0.635:.4f} ± {half:.4f} | " in table


def test_fractions_are_checked():
  config = default_config.get_config()
  config.fractions = (0.0, 0.5)
  with pytest.raises(ValueError, match=r"config.fractions: 0.0 is not in "
                     r"\(0, 1\]"):
    semi_supervised.make_sweep(config, ["left"])
