"""3D Shapes: floor, wall and object hue, scale, shape and orientation.

Six classification tasks (`mtl_jax/data/catalog/factors.py`) on 64x64 RGB
renders. The single TFDS split is sliced into train (first 90%) and held-out
(last 10%) parts.

Prepare the data once (array_record, for random access):
  tfds build shapes3d --file_format=array_record

Train:
  python -m experiments.train --config=experiments/configs/shapes3d.py \
    --workdir=runs/shapes3d --config.tasks=object_hue,shape,orientation

Self-supervised (pretext) tasks next to the supervised ones (options in
`experiments/configs/pretexts.py`; `tests/pretext/catalog_pretext_test.py`
builds this command line): every vision pretext runs on the square RGB
renders.
  python -m experiments.train --config=experiments/configs/shapes3d.py \
    --workdir=runs/shapes3d_ssl --config.tasks=object_hue,shape,orientation \
    --config.pretext.names=grid_mask,colourise,rotate,super_resolve,denoise \
    '--config.pretext.grid_mask.grid=(4,4)' \
    --config.pretext.super_resolve.factor=4

Their shapes at `image_size` s (64 by default, always square): grid_mask's
grid (rows, cols) must divide s (the default (2, 2) predicts a 32x32x3 cell
at 64, (4, 4) a 16x16x3 one; (3, 3) or (5, 5) fail at 64); blur_region's
region (8x8 by default) and super_resolve's factor must be at most s;
colourise needs the 3 channels it has; rotate needs the square images it
has. These are checked against the real inputs when the experiment is
built, before any parameter is made, with an error naming the pretext.
colourise, super_resolve, denoise and reconstruct predict the whole
64x64x3 image, each with a head of 256 -> 128 -> 12288 (1.6M parameters,
twice the 0.77M-parameter trunk). Pretexts train on every row (rows=all):
the renders are fully labelled, so there is no unlabelled pool for
rows=unlabelled unless data.label_fractions hides labels and
data.drop_unlabelled=False mixes the rest in.
"""

import ml_collections

from experiments.configs import multi_digits


def get_config() -> ml_collections.ConfigDict:
  config = multi_digits.get_config()
  config.data.name = "shapes3d"
  config.data.options = ml_collections.ConfigDict({
      "image_size": 64, "train_split": "train[:90%]",
      "eval_split": "train[90%:]"})
  config.data.label_fractions = ml_collections.ConfigDict()  # all labels
  config.data.mixture = ml_collections.ConfigDict({
      "method": "proportional", "temperature": 1.0,
      "rates": ml_collections.ConfigDict(), "size_cap": 0,
      "composition": "sampled"})

  config.tasks = ""  # floor_hue, wall_hue, object_hue, scale, shape, orientation
  config.task_weights = ml_collections.ConfigDict()  # 1.0 each

  config.model.trunk = "cnn"
  config.model.channels = (32, 64, 128, 128)  # 64x64 -> 4x4
  config.model.strides = (2, 2, 2, 2)
  config.model.feature_size = 256
  config.model.dropout_rate = 0.0

  config.optimizer.learning_rate = 1e-3
  config.batch_size = 128
  config.num_steps = 10000
  config.eval_every = 1000
  return config
