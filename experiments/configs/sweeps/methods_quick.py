"""A quick version of `methods.py`: three methods, 1000 steps, three seeds.

Equal weighting, uncertainty weighting and UPGrad against the single-task
models (about 30 minutes on 2 CPU cores).

  python -m experiments.sweep --sweep=experiments/configs/sweeps/methods_quick.py \
      --root=runs/sweep_methods_quick
"""

from experiments.configs.sweeps import methods

KEEP = ("equal", "uncertainty", "upgrad")


def get_config():
  sweep = methods.get_config()
  sweep.overrides.num_steps = 1000
  sweep.overrides.eval_every = 200
  sweep.overrides.checkpoint_every = 500
  for name in list(sweep.axes.method.keys()):
    if name not in KEEP:
      del sweep.axes.method[name]
  return sweep
