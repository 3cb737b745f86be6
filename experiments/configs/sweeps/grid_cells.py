"""Which grid cells help: each cell of a 2 x 2 grid_mask as the pretext.

`experiments/grid_cells.py`'s protocol, a sweep (`experiments/sweep.py`) on
the small-data setting of multi_digits (5% of each task's training labels,
the rest the unlabelled pool), 600 steps, three seeds; a validation split of
10% of the labelled rows selects the step (static-weighted validation loss).
The method axis "pretext":

  none     supervised only: the labelled rows (`data.drop_unlabelled`);
  cell<k>  the labelled rows and the pool, with grid_mask on a 2 x 2 grid
           blanking the fixed cell k (row-major: 0 top-left, 1 top-right,
           2 bottom-left, 3 bottom-right) of every example;
  random   the same with a uniformly random cell per example.

Δm% of every arm is taken against "none" (the reference); `score` sets how
each pretext run's grid_mask head is scored (`grid_cell_quality` on the
first `num_images` test images, the mean-image baseline's reference from
`reference_batches` training batches).

  python -m experiments.grid_cells \
      --protocol=experiments/configs/sweeps/grid_cells.py --root=runs/grid_cells
"""

import ml_collections

TASKS = ("left", "right", "present", "sum")
LABEL_FRACTION = 0.05
GRID = (2, 2)
# The pretext arms: the pool mixed in, half of each batch drawn uniformly
# over the mixture's components.
_POOL = {"drop_unlabelled": False, "mixture": {"method": "uniform"}}


def _grid_mask(cell=None):
  block = {"grid": GRID}
  if cell is not None:
    block["cell"] = cell
  return {"data": dict(_POOL),
          "pretext": {"names": "grid_mask", "grid_mask": block}}


def get_config() -> ml_collections.ConfigDict:
  sweep = ml_collections.ConfigDict()
  sweep.base = "experiments/configs/multi_digits.py"
  sweep.overrides = ml_collections.ConfigDict({
      "tasks": ",".join(TASKS),
      "data": {"data_dir": "data/tfds", "validation_fraction": 0.1,
               "label_fractions": {t: LABEL_FRACTION for t in TASKS}},
      "select_by": "loss", "num_steps": 600, "eval_every": 150,
      "optimizer": {"warmup_steps": 50}})
  sweep.method_axis = "pretext"
  arms = {"none": {"data": {"drop_unlabelled": True}}}
  arms.update({f"cell{k}": _grid_mask(k) for k in range(GRID[0] * GRID[1])})
  arms["random"] = _grid_mask()
  sweep.axes = ml_collections.ConfigDict({"pretext": arms})
  sweep.reference = "none"
  sweep.seeds = (0, 1, 2)
  sweep.baselines = False
  # How each pretext run's grid_mask head is scored (experiments/grid_cells.py).
  sweep.score = ml_collections.ConfigDict(
      {"num_images": 256, "reference_batches": 8})
  return sweep
