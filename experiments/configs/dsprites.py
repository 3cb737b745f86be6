"""dSprites: shape, scale, orientation and x/y position of a 2-D sprite.

Five tasks (`mtl_jax/data/catalog/factors.py`): "shape" (3 classes) and the
regressions "scale", "orientation" (as (sin, cos)), "x_position" and
"y_position", on 64x64 binary images. The single TFDS split is sliced into
train (first 90%) and held-out (last 10%) parts.

Prepare the data once (array_record, for random access):
  tfds build dsprites --file_format=array_record

Train:
  python -m experiments.train --config=experiments/configs/dsprites.py \
    --workdir=runs/dsprites --config.aggregation.name=pcgrad
"""

import ml_collections

from experiments.configs import multi_digits


def get_config() -> ml_collections.ConfigDict:
  config = multi_digits.get_config()
  config.data.name = "dsprites"
  config.data.options = ml_collections.ConfigDict({
      "image_size": 64, "train_split": "train[:90%]",
      "eval_split": "train[90%:]"})
  config.data.label_fractions = ml_collections.ConfigDict()  # all labels
  config.data.mixture = ml_collections.ConfigDict({
      "method": "proportional", "temperature": 1.0,
      "rates": ml_collections.ConfigDict(), "size_cap": 0,
      "composition": "sampled"})

  config.tasks = ""  # shape, scale, orientation, x_position, y_position
  config.task_weights = ml_collections.ConfigDict()  # 1.0 each

  config.model.trunk = "cnn"
  config.model.channels = (32, 32, 64, 64)  # 64x64 -> 4x4
  config.model.strides = (2, 2, 2, 2)
  config.model.feature_size = 256
  config.model.dropout_rate = 0.0

  config.optimizer.learning_rate = 1e-3
  config.batch_size = 128
  config.num_steps = 10000
  config.eval_every = 1000
  return config
