"""Optimizers and learning-rate schedules from explicit arguments.

Param groups (`partition`): each group of params, chosen by `fnmatch`
patterns on the param path (`"shared/*"`, `"tasks/left/*"`), gets the same
optimizer with its own learning-rate scale (discriminative fine-tuning), or
no update at all (scale 0: frozen), through `optax.multi_transform`.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence

import jax
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
                   weight_decay: float = 0.0, grad_clip_norm: float = 0.0,
                   param_groups: Sequence[tuple[str, float]] = ()
                   ) -> optax.GradientTransformation:
  """An optax optimizer, optionally preceded by global-norm gradient clipping.

  Args:
    param_groups: `(pattern, scale)` pairs (`partition`): the params whose
      path matches `pattern` (first match wins) train with the learning rate
      `scale * schedule(step)`; scale 0 freezes them. Clipping stays global.

  Raises:
    ValueError: unknown name or out-of-range argument.
  """
  if weight_decay < 0 or grad_clip_norm < 0:
    raise ValueError("weight_decay and grad_clip_norm must be >= 0")
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")

  def one(lr: optax.Schedule) -> optax.GradientTransformation:
    if name == "sgd":
      tx = optax.sgd(lr, momentum=momentum or None)
    elif name == "adam":
      tx = optax.adam(lr)
    else:
      tx = optax.adamw(lr, weight_decay=weight_decay)
    if name != "adamw" and weight_decay:
      tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx

  tx = partition(one, schedule, param_groups)
  if grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx


DEFAULT_GROUP = "default"


def check_param_groups(param_groups: Sequence[tuple[str, float]],
                       field: str = "param_groups") -> None:
  """Each `(pattern, scale)` has a non-empty pattern and a scale >= 0."""
  for pattern, scale in param_groups:
    if not isinstance(pattern, str) or not pattern:
      raise ValueError(f"{field}: a pattern must be a non-empty string, got "
                       f"{pattern!r}")
    if not isinstance(scale, (int, float)) or not scale >= 0:
      raise ValueError(f"{field}: the learning-rate scale of {pattern!r} "
                       f"must be a number >= 0 (0: frozen), got {scale!r}")


def path_name(path: Sequence[Any]) -> str:
  """`"a/b/c"` of a `jax.tree_util` key path (dict keys, attributes and
  sequence indices alike)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def group_labels(params: Any, param_groups: Sequence[tuple[str, float]]
                 ) -> Any:
  """A tree like `params` of group labels: `"group<i>"` for the first
  pattern `i` that a leaf's path matches, `DEFAULT_GROUP` elsewhere."""
  patterns = [p for p, _ in param_groups]

  def label(path, _):
    name = path_name(path)
    for i, pattern in enumerate(patterns):
      if fnmatch.fnmatchcase(name, pattern):
        return f"group{i}"
    return DEFAULT_GROUP

  return jax.tree_util.tree_map_with_path(label, params)


def unmatched_patterns(params: Any, patterns: Sequence[str]) -> list[str]:
  """The patterns that match no param path of `params` (abstract or not)."""
  paths = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  return [pattern for pattern in patterns
          if not any(fnmatch.fnmatchcase(p, pattern) for p in paths)]


def partition(make: Callable[[optax.Schedule], optax.GradientTransformation],
              schedule: optax.Schedule,
              param_groups: Sequence[tuple[str, float]] = ()
              ) -> optax.GradientTransformation:
  """`make(schedule)` for all params, or one `make(scale * schedule)` per
  param group (`optax.set_to_zero()` for scale 0: frozen params keep their
  values bit for bit and have no optimizer state).

  The groups are resolved from the param paths when the optimizer state is
  created (`init`), so the optimizer can be built before the params exist.
  """
  check_param_groups(param_groups)
  if not param_groups:
    return make(schedule)
  transforms = {DEFAULT_GROUP: make(schedule)}
  for i, (_, scale) in enumerate(param_groups):
    if scale == 0:
      transforms[f"group{i}"] = optax.set_to_zero()
    elif scale == 1:
      transforms[f"group{i}"] = make(schedule)
    else:
      transforms[f"group{i}"] = make(
          lambda step, s=float(scale): s * schedule(step))
  return optax.multi_transform(
      transforms, lambda params: group_labels(params, param_groups))
