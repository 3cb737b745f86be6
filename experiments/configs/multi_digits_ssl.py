"""multi_digits with self-supervised tasks on the labelled rows AND the pool.

The supervised tasks of `multi_digits.py` (same label fractions, model and
budget) plus two pretexts that learn from every training row, the unlabelled
pool included (`data.drop_unlabelled=False`):

  grid_mask  one cell of a 2 x 2 grid is blanked; its head reconstructs the
             cell (MSE, PSNR);
  rotate     the image is turned by 0 or 180 degrees (the 12 x 16 canvas is
             not square, so half turns only); its head predicts the turn.

Each batch draws half of its rows from the labelled rows and half from the
pool (`data.mixture.method=uniform`: one rate per component), as S4L (Zhai et
al., ICCV 2019) mixes labelled and unlabelled minibatches. Each pretext reads
its own view: three trunk passes per step (inputs, masked, rotated).

  python -m experiments.train --config=experiments/configs/multi_digits_ssl.py \
    --workdir=runs/multi_digits_ssl
"""

import ml_collections

from experiments.configs import multi_digits


def get_config() -> ml_collections.ConfigDict:
  config = multi_digits.get_config()
  config.data.drop_unlabelled = False
  config.data.mixture.method = "uniform"
  config.pretext.names = "grid_mask,rotate"
  config.pretext.grid_mask.grid = (2, 2)
  config.pretext.rotate.half_turns_only = True
  return config
