"""mtl_jax: a JAX/Flax library for multi-task learning.

Layout (one concept per module):
  losses.py    masked losses: (prediction, label, mask) -> (loss_sum, count)
  metrics.py   masked metrics as summable sufficient statistics
  tasks.py     the Task spec, the task set, batch validation, per-task losses
  models/      trunks, heads and multi-task architectures
  weighting/   loss-level task weighting
  data/        the embedded multi_digits dataset and deterministic batching
  training/    TrainState, pure train/eval steps, loop, checkpoints, metric writers
"""

__version__ = "0.1.0"
