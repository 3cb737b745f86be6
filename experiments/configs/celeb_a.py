"""CelebA: 40 face attributes and 5 landmarks, hard parameter sharing.

41 tasks (`mtl_jax/data/catalog/celeb_a.py`): each binary attribute is a
2-class task named as in TFDS ("Smiling", ...), and "landmarks" regresses the
10 landmark coordinates in the cropped, resized frame. Images are the central
178x178 square resized to `data.options.image_size`.

Prepare the data once (array_record, for random access):
  tfds build celeb_a --file_format=array_record

Train (any field can be overridden on the command line):
  python -m experiments.train --config=experiments/configs/celeb_a.py \
    --workdir=runs/celeb_a --config.tasks=Smiling,Male,landmarks \
    --config.data.options.eval_split=validation

Self-supervised (pretext) tasks next to the supervised ones (options in
`experiments/configs/pretexts.py`; `tests/pretext/catalog_pretext_test.py`
builds this command line): every vision pretext runs on celeb_a's square
RGB inputs.
  python -m experiments.train --config=experiments/configs/celeb_a.py \
    --workdir=runs/celeb_a_ssl --config.tasks=Smiling,Male,landmarks \
    --config.pretext.names=grid_mask,colourise,rotate,blur_region,denoise \
    '--config.pretext.grid_mask.grid=(4,4)'

Their shapes at `image_size` s (64 by default, always square): grid_mask's
grid (rows, cols) must divide s (the default (2, 2) predicts a 32x32x3 cell
at 64, (4, 4) a 16x16x3 one; (3, 3) or (5, 5) fail at 64); blur_region's
region (8x8 by default) and super_resolve's factor (2) must be at most s;
colourise needs the 3 channels it has; rotate needs the square images it
has. These are checked against the real inputs when the experiment is
built, before any parameter is made, with an error naming the pretext.
colourise, super_resolve, denoise and reconstruct predict the whole
64x64x3 image, each with a linear head of 256 x 12288 (3.2M parameters,
four times the 0.77M-parameter trunk). Pretexts train on every row
(rows=all): celeb_a is fully labelled, so there is no unlabelled pool for
rows=unlabelled unless data.label_fractions hides labels and
data.drop_unlabelled=False mixes the rest in.
"""

import ml_collections

from experiments.configs import multi_digits


def get_config() -> ml_collections.ConfigDict:
  config = multi_digits.get_config()
  config.data.name = "celeb_a"
  config.data.options = ml_collections.ConfigDict({
      "image_size": 64, "train_split": "train", "eval_split": "test"})
  config.data.label_fractions = ml_collections.ConfigDict()  # all labels
  config.data.mixture = ml_collections.ConfigDict({
      "method": "proportional", "temperature": 1.0,
      "rates": ml_collections.ConfigDict(), "size_cap": 0,
      "composition": "sampled"})

  config.tasks = ""  # all 41 tasks
  config.task_weights = ml_collections.ConfigDict()  # 1.0 each

  config.model.trunk = "cnn"
  config.model.channels = (32, 64, 128, 128)  # 64x64 -> 4x4
  config.model.strides = (2, 2, 2, 2)
  config.model.feature_size = 256
  config.model.dropout_rate = 0.1
  config.model.head_hidden_sizes = ()  # linear heads on shared features

  config.optimizer.learning_rate = 1e-3
  config.batch_size = 128
  config.num_steps = 20000
  config.eval_every = 2000
  config.checkpoint_every = 2000
  return config
