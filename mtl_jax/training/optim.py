"""Optimizers and learning-rate schedules from explicit arguments."""

from __future__ import annotations

import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


def make_schedule(name: str, learning_rate: float, *, total_steps: int,
                  warmup_steps: int = 0) -> optax.Schedule:
  """A learning-rate schedule.

  Args:
    name: "constant", "cosine" (decay to 0 over `total_steps`) or
      "warmup_cosine" (linear warm-up for `warmup_steps`, then cosine to 0).
    learning_rate: peak learning rate.
    total_steps: length of the run.
    warmup_steps: warm-up length for "warmup_cosine".

  Raises:
    ValueError: unknown name or out-of-range argument.
  """
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  if name == "constant":
    return optax.constant_schedule(learning_rate)
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1 for schedule {name!r}")
  if name == "cosine":
    return optax.cosine_decay_schedule(learning_rate, total_steps)
  if name == "warmup_cosine":
    if not 0 <= warmup_steps < total_steps:
      raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}),"
                       f" got {warmup_steps}")
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, total_steps)
  raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")


def make_optimizer(name: str, schedule: optax.Schedule, *, momentum: float = 0.9,
                   weight_decay: float = 0.0, grad_clip_norm: float = 0.0
                   ) -> optax.GradientTransformation:
  """An optax optimizer, optionally preceded by global-norm gradient clipping.

  Raises:
    ValueError: unknown name or out-of-range argument.
  """
  if weight_decay < 0 or grad_clip_norm < 0:
    raise ValueError("weight_decay and grad_clip_norm must be >= 0")
  if name == "sgd":
    tx = optax.sgd(schedule, momentum=momentum or None)
  elif name == "adam":
    tx = optax.adam(schedule)
  elif name == "adamw":
    tx = optax.adamw(schedule, weight_decay=weight_decay)
  else:
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
  if name != "adamw" and weight_decay:
    tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
  if grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx
