"""End-to-end tests of experiments/train.py on the small multi_digits config."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import train
from experiments.configs import multi_digits as md_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **overrides):
  config = md_config.get_config()
  config.data.data_dir = data_dir
  config.data.builder_config = "small"
  config.model.trunk = "mlp"
  config.model.hidden_sizes = (32,)
  config.model.head_hidden_sizes = ()
  config.batch_size = 32
  config.eval_batch_size = 250
  config.num_steps = 20
  config.log_every = 5
  config.eval_every = 10
  config.checkpoint_every = 10
  config.optimizer.schedule = "constant"
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


def test_run_writes_results_metrics_events_plot_and_checkpoints(
    small_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  results = train.run(tiny_config(small_data_dir), workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results
  assert results["steps"] == 20
  # Label fractions of the default config over the 2000 small train examples.
  assert results["label_counts"] == {"left": 1000, "right": 600, "present": 400,
                                     "sum": 200}
  assert results["num_train_examples"] == 2000
  expected_keys = {f"{t}/{m}" for t, ms in [
      ("left", ("accuracy", "loss", "count")), ("right", ("accuracy", "loss", "count")),
      ("present", ("f1", "loss", "count")), ("sum", ("mae", "rmse", "loss", "count"))]
      for m in ms}
  assert set(results["eval"]) == expected_keys
  assert results["eval"]["left/count"] == 1000.0  # the whole test split
  assert all(np.isfinite(v) for v in results["eval"].values())

  records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records if r["split"] == "train"] == [5, 10, 15, 20]
  assert [r["step"] for r in records if r["split"] == "eval"] == [10, 20]
  assert records[0]["steps_per_sec"] > 0
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(workdir, "tb")))
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]


def test_resume_continues_from_saved_step_and_matches_uninterrupted(
    small_data_dir, tmp_path):
  straight = train.run(tiny_config(small_data_dir, num_steps=30),
                       str(tmp_path / "straight"))
  workdir = str(tmp_path / "resumed")
  train.run(tiny_config(small_data_dir, num_steps=20), workdir)
  resumed = train.run(tiny_config(small_data_dir, num_steps=30), workdir)
  assert resumed["steps"] == 30
  train_steps = [r["step"] for r in _read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
  assert train_steps == [5, 10, 15, 20, 25, 30]  # nothing re-run before step 20
  for key, value in straight["eval"].items():
    assert resumed["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_workdir_of_a_different_config_is_refused(small_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train.run(tiny_config(small_data_dir, num_steps=5), workdir)
  with pytest.raises(ValueError, match=r"different config \(seed: 0 -> 1\)"):
    train.run(tiny_config(small_data_dir, num_steps=5, seed=1), workdir)


@pytest.mark.parametrize("overrides, message", [
    (dict(tasks="left,colour"), r"unknown task 'colour'; valid tasks: left, right, present, sum"),
    (dict(**{"model.trunk": "vit"}), r"unknown trunk 'vit'; valid: cnn, mlp, resnet"),
    (dict(**{"optimizer.name": "lion"}), r"unknown optimizer 'lion'; valid: sgd, adam, adamw"),
    (dict(**{"weighting.name": "nope"}), r"unknown weighting method 'nope'; valid: equal, static"),
    (dict(**{"data.name": "mnist"}), r"unknown dataset 'mnist'; valid: multi_digits"),
    (dict(batch_size=0), r"config.batch_size must be a positive integer"),
    (dict(**{"data.label_fractions.left": 1.5}), r"left.*1.5"),
])
def test_bad_config_fails_before_training(small_data_dir, tmp_path, overrides,
                                          message):
  workdir = str(tmp_path / "run")
  with pytest.raises((ValueError, KeyError), match=message):
    train.run(tiny_config(small_data_dir, **overrides), workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def _cli(args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.train", *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def test_command_line_with_overrides(small_data_dir, tmp_path):
  workdir = str(tmp_path / "cli")
  proc = _cli([f"--workdir={workdir}", f"--config.data.data_dir={small_data_dir}",
               "--config.data.builder_config=small", "--config.model.trunk=mlp",
               "--config.model.hidden_sizes=(16,)", "--config.num_steps=6",
               "--config.log_every=3", "--config.eval_batch_size=200",
               "--config.optimizer.learning_rate=0.01",
               "--config.optimizer.schedule=constant"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "steps/s" in proc.stderr and "ETA" in proc.stderr
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["steps"] == 6
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["optimizer"]["learning_rate"] == 0.01
  assert saved["model"]["hidden_sizes"] == [16]


def test_command_line_rejects_unknown_config_key(tmp_path):
  proc = _cli([f"--workdir={tmp_path}", "--config.optimizer.learnig_rate=0.1"])
  assert proc.returncode != 0
  assert "learnig_rate" in proc.stderr
