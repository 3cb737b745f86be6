"""Pre-train, fine-tune vs scratch (`experiments/pretrain_finetune.py`).

Per seed (0, 1, 2), one pre-training run of 1000 steps on all 20 000
training composites: the pretexts of `multi_digits_ssl.py` (grid_mask 2 x 2,
rotate 0/180) and the supervised tasks left and right with all their labels
(seen at pre-training). Then, at 1% and 10% of each downstream task's
labels (left, right, present, sum: present and sum unseen at pre-training),
three arms of 600 steps each: scratch, finetune (from the seed's
pre-training run) and probe (the same, shared trunk frozen). A validation
split of 10% of the labelled rows selects each run's step (static-weighted
validation loss); the test split is evaluated once per run.

  python -m experiments.pretrain_finetune \
      --protocol=experiments/configs/sweeps/pretrain_finetune.py \
      --root=runs/pretrain_finetune [--mode=run|commands|collect]
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Downstream (stage 2) runs.
  config.base = "experiments/configs/multi_digits.py"
  config.tasks = "left,right,present,sum"
  config.fractions = (0.01, 0.1)
  config.seeds = (0, 1, 2)
  # scratch (required: the baseline of Δm%), finetune, probe (and
  # finetune_lr01: the trunk at a tenth of the heads' learning rate).
  config.arms = ("scratch", "finetune", "probe")
  # Every run of both stages (nested like the experiment config); the
  # pre-training run drops the validation split and the selection (the
  # fine-tune runs start from its last step).
  config.overrides = ml_collections.ConfigDict({
      "data": {"data_dir": "data/tfds", "validation_fraction": 0.1},
      "select_by": "loss", "num_steps": 600, "eval_every": 150,
      "optimizer": {"warmup_steps": 50}})
  # Tuned for every downstream arm on the validation split ({} for none),
  # e.g. {"lr1e-3": {"optimizer": {"learning_rate": 1e-3}}, ...}.
  config.tune = ml_collections.ConfigDict()

  # Pre-training (stage 1) runs: the pretexts' config, the supervised tasks
  # seen at pre-training ("none": the pretexts only; each with
  # `pretrain_label_fraction` of its labels) and the budget.
  config.pretrain_base = "experiments/configs/multi_digits_ssl.py"
  config.pretrain_tasks = "left,right"
  config.pretrain_label_fraction = 1.0
  config.pretrain_overrides = ml_collections.ConfigDict({
      "num_steps": 1000, "eval_every": 500, "checkpoint_every": 500,
      "optimizer": {"warmup_steps": 100}})
  return config
