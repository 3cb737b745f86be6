"""A sweep of weighting and aggregation methods on multi_digits.

Every method trains the default multi-task model (hard sharing, cnn trunk)
with a validation split (10% of the labelled rows) for selecting the step by
the static-weighted validation loss; one single-task model per task gives
the baselines of Δm%. Three seeds.

  python -m experiments.sweep --sweep=experiments/configs/sweeps/methods.py \
      --root=runs/sweep_methods
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  sweep = ml_collections.ConfigDict()
  sweep.base = "experiments/configs/multi_digits.py"
  # Nested like the experiment config: {"data": {"data_dir": ...}} sets
  # config.data.data_dir.
  sweep.overrides = ml_collections.ConfigDict({
      "data": {"data_dir": "data/tfds", "validation_fraction": 0.1},
      "select_by": "loss",
      "num_steps": 1500,
      "eval_every": 250,
      "checkpoint_every": 500,
      "optimizer": {"warmup_steps": 50},
  })
  equal = {"name": "equal"}
  sweep.method_axis = "method"
  sweep.axes = ml_collections.ConfigDict({
      "method": {
          "static": {"weighting": {"name": "static"}},
          "equal": {"weighting": equal},
          "uncertainty": {"weighting": {"name": "uncertainty"}},
          "dwa": {"weighting": {"name": "dwa"}},
          "pcgrad": {"weighting": equal, "aggregation": {"name": "pcgrad"}},
          "mgda": {"weighting": equal, "aggregation": {"name": "mgda"}},
          "upgrad": {"weighting": equal, "aggregation": {"name": "upgrad"}},
      },
  })
  sweep.seeds = (0, 1, 2)
  sweep.baselines = True
  return sweep
