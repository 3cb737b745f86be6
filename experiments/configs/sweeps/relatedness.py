"""Task relatedness on multi_digits (`experiments/relatedness.py`).

One reference run of the four tasks (seed `reference_seed`, a checkpoint
every `measure_every` steps, all kept) is measured at step 0 and at each
checkpoint on `num_batches` training batches: the cosines of the task
gradients and the lookahead affinities (Fifty et al. 2021). The grouping of
the tasks into at most `max_groups` groups that the averaged affinities
suggest is then checked: per seed, one model per group against one model
of all tasks, same budget (1000 steps of batch 128, a validation split of
10% of the labelled rows selecting the step by the static-weighted
validation loss).

  python -m experiments.relatedness \
      --protocol=experiments/configs/sweeps/relatedness.py \
      --root=runs/relatedness [--mode=run|commands|collect]
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.base = "experiments/configs/multi_digits.py"
  config.tasks = "left,right,present,sum"
  # Every run, the reference and the check runs (nested like the experiment
  # config).
  config.overrides = ml_collections.ConfigDict({
      "data": {"data_dir": "data/tfds", "validation_fraction": 0.1},
      "select_by": "loss", "num_steps": 1000, "eval_every": 250,
      "optimizer": {"warmup_steps": 50}})
  # The reference run's checkpoints (its measured steps, with step 0) and
  # the training batches measured at each.
  config.measure_every = 200
  config.num_batches = 4
  config.reference_seed = 0
  # The groupings into 1 .. max_groups groups are reported; the one into at
  # most max_groups groups is checked, with these seeds.
  config.max_groups = 2
  config.seeds = (0, 1, 2)
  return config
