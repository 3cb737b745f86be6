"""smallNORB: object category, instance, elevation, azimuth and lighting.

Five classification tasks (`mtl_jax/data/catalog/factors.py`) from the left
camera's 96x96 grey image, resized to `data.options.image_size`. The test
split holds object instances never seen in training, so the "instance" task
is only meaningful on a slice of train (e.g.
`--config.data.options.train_split='train[:90%]'
--config.data.options.eval_split='train[90%:]'`).

Prepare the data once (array_record, for random access):
  tfds build smallnorb --file_format=array_record

Train:
  python -m experiments.train --config=experiments/configs/smallnorb.py \
    --workdir=runs/smallnorb --config.weighting.name=uncertainty
"""

import ml_collections

from experiments.configs import multi_digits


def get_config() -> ml_collections.ConfigDict:
  config = multi_digits.get_config()
  config.data.name = "smallnorb"
  config.data.options = ml_collections.ConfigDict({
      "image_size": 48, "train_split": "train", "eval_split": "test"})
  config.data.label_fractions = ml_collections.ConfigDict()  # all labels
  config.data.mixture = ml_collections.ConfigDict({
      "method": "proportional", "temperature": 1.0,
      "rates": ml_collections.ConfigDict(), "size_cap": 0,
      "composition": "sampled"})

  config.tasks = ""  # category, instance, elevation, azimuth, lighting
  config.task_weights = ml_collections.ConfigDict()  # 1.0 each

  config.model.trunk = "cnn"
  config.model.channels = (32, 64, 128)  # 48x48 -> 6x6
  config.model.strides = (2, 2, 2)
  config.model.feature_size = 256
  config.model.dropout_rate = 0.1

  config.optimizer.learning_rate = 1e-3
  config.batch_size = 128
  config.num_steps = 10000
  config.eval_every = 1000
  return config
