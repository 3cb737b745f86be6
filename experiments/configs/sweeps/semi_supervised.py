"""S4L's protocol on multi_digits (`experiments/semi_supervised.py`).

Label fractions 1% and 10% of each task's training labels (at 100% no row
is unlabelled: there is no pool to add), three seeds, 600 steps of batch 128
for both arms, a validation split of 10% of the labelled rows that selects
the step (static-weighted validation loss) and the learning rate of each arm
(two values, trained for both arms): 24 runs, about 40 minutes on 2 CPU
cores.

  python -m experiments.semi_supervised \
      --protocol=experiments/configs/sweeps/semi_supervised.py \
      --root=runs/semi_supervised
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.base = "experiments/configs/multi_digits.py"
  config.tasks = "left,right,present,sum"
  config.fractions = (0.01, 0.1)
  config.seeds = (0, 1, 2)
  # Every run (nested like the experiment config).
  config.overrides = ml_collections.ConfigDict({
      "data": {"data_dir": "data/tfds", "validation_fraction": 0.1},
      "select_by": "loss", "num_steps": 600, "eval_every": 150,
      "checkpoint_every": 300, "optimizer": {"warmup_steps": 50}})
  # The two arms: the labelled rows only, and the same rows plus the pool
  # with two pretexts on both (half of each batch from the pool).
  config.arms = ml_collections.ConfigDict({
      "supervised": {"data": {"drop_unlabelled": True}},
      "pretexts": {
          "data": {"drop_unlabelled": False, "mixture": {"method": "uniform"}},
          "pretext": {"names": "grid_mask,rotate", "grid_mask": {"grid": (2, 2)},
                      "rotate": {"half_turns_only": True}}},
  })
  # Tuned for both arms on the validation split ({} for none).
  config.tune = ml_collections.ConfigDict({
      "lr1e-3": {"optimizer": {"learning_rate": 1e-3}},
      "lr3e-3": {"optimizer": {"learning_rate": 3e-3}},
  })
  return config
