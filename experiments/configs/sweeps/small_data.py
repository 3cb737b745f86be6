"""Single-task against multi-task learning as each task's labels shrink.

One multi-task model (hard sharing, the default static weights) against one
single-task model per task, at 1%, 10% and 100% of each task's training labels,
three seeds, the same budget (600 steps); a validation split of 10% of the
labelled rows selects the step. `collect` reports, per label fraction, the
multi-task model's Δm% against the single-task models with its 95% CI.

  python -m experiments.sweep --sweep=experiments/configs/sweeps/small_data.py \
      --root=runs/small_data
"""

import ml_collections

TASKS = ("left", "right", "present", "sum")
FRACTIONS = {"1%": 0.01, "10%": 0.1, "100%": 1.0}


def get_config() -> ml_collections.ConfigDict:
  sweep = ml_collections.ConfigDict()
  sweep.base = "experiments/configs/multi_digits.py"
  sweep.overrides = ml_collections.ConfigDict({
      "tasks": ",".join(TASKS),
      "data": {"data_dir": "data/tfds", "validation_fraction": 0.1},
      "select_by": "loss", "num_steps": 600, "eval_every": 150,
      "checkpoint_every": 300, "optimizer": {"warmup_steps": 50}})
  sweep.method_axis = "model"
  sweep.axes = ml_collections.ConfigDict({
      "model": {"multi_task": {}},
      "labels": {name: {"data": {"label_fractions": {t: f for t in TASKS}}}
                 for name, f in FRACTIONS.items()},
  })
  sweep.seeds = (0, 1, 2)
  sweep.baselines = True
  return sweep
