"""The run record of experiments/train.py survives a resume under another
layout.

A 4-step run under pmap on 2 of the 8 virtual devices is extended to 6 steps
under jit on one: runs.jsonl keeps both starts (the first with its full
config, the second with exactly the keys it changed), config.json is the
current config, results.json summarises the run (method, architecture,
layout, wall time, number of starts) and TensorBoard holds the
hyperparameters. Tiny model (an MLP of 8 units), small multi_digits data.
"""

import json
import os

from tensorboard.backend.event_processing import event_accumulator

from experiments import train
from experiments.configs import multi_digits as md_config
from mtl_jax.training import run_config


def _config(data_dir, **overrides):
  config = md_config.get_config()
  config.data.data_dir = data_dir
  config.data.options.builder_config = "small"
  config.tasks = "left,right"
  config.model.trunk = "mlp"
  config.model.hidden_sizes = (8,)
  config.model.head_hidden_sizes = ()
  config.batch_size = 16
  config.eval_batch_size = 500
  config.log_every = 2
  config.eval_every = 0
  config.checkpoint_every = 2
  config.optimizer.schedule = "constant"
  config.update_from_flattened_dict(overrides)
  return config


def test_resume_under_another_layout_keeps_the_history(small_data_dir,
                                                        tmp_path):
  workdir = str(tmp_path / "run")
  first = _config(small_data_dir, num_steps=4, parallelism="pmap",
                  **{"mesh.data": 2})
  results = train.run(first, workdir, command_line=["--config.num_steps=4"])
  assert results["starts"] == 1
  second = _config(small_data_dir, num_steps=6, parallelism="jit",
                   **{"mesh.data": 1})
  results = train.run(second, workdir)

  history = run_config.read_history(workdir)
  assert [(h["start_step"], h["num_steps"], h["parallelism"],
           h["num_devices"], h["mesh_data"], h["num_processes"])
          for h in history] == [(0, 4, "pmap", 2, 2, 1),
                                (4, 6, "jit", 1, 1, 1)]
  assert [h["command_line"] for h in history] == [["--config.num_steps=4"],
                                                  None]
  assert history[0]["config"] == json.loads(json.dumps(first.to_dict()))
  assert "changed" not in history[0] and "config" not in history[1]
  assert history[1]["changed"] == {"mesh.data": [2, 1],
                                   "num_steps": [4, 6],
                                   "parallelism": ["pmap", "jit"]}
  for h in history:
    assert h["architecture"] == "hard_sharing" and h["trunk"] == "mlp"
    assert h["tasks"] == ["left", "right"] and h["device_kind"] == "cpu"
  with open(os.path.join(workdir, run_config.CONFIG_FILE)) as f:
    assert json.load(f) == json.loads(json.dumps(second.to_dict()))

  assert results["steps"] == 6 and results["starts"] == 2
  assert results["first_start"] == history[0]["time"]
  assert results["run"] == {
      "dataset": "multi_digits", "architecture": "hard_sharing",
      "trunk": "mlp", "weighting": "static", "aggregation": "none",
      "tasks": ["left", "right"], "num_devices": 1, "device_kind": "cpu",
      "num_processes": 1, "parallelism": "jit", "sharding": "replicated"}
  assert 0 < results["wall_time_sec"] < 600

  events = event_accumulator.EventAccumulator(
      os.path.join(workdir, "tb"), size_guidance={"tensors": 0})
  events.Reload()
  assert "hparams/text_summary" in events.Tags()["tensors"]
  table = events.Tensors("hparams/text_summary")[-1].tensor_proto
  text = table.string_val[0].decode()
  assert "| optimizer.learning_rate | 0.002 |" in text
  assert "| parallelism | jit |" in text
  assert "| weighting.name | static |" in text
  assert "aggregation.cagrad.c" not in text  # only the chosen method's block
