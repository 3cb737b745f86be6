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
# warmup_steps=AUTO_WARMUP: `auto_warmup_steps(cycle length)`, which is valid
# for every run length (an explicit count must be shorter than the cycle).
AUTO_WARMUP = -1
MAX_AUTO_WARMUP = 100


def auto_warmup_steps(cycle_steps: int) -> int:
  """The automatic warm-up of a cycle: `min(100, cycle_steps // 10)`."""
  return min(MAX_AUTO_WARMUP, cycle_steps // 10)


def resolve_warmup(warmup_steps: int, cycle_steps: int) -> int:
  """`warmup_steps`, or the automatic one for `AUTO_WARMUP`."""
  if warmup_steps == AUTO_WARMUP:
    return auto_warmup_steps(cycle_steps)
  return warmup_steps


def extend_horizons(horizons: Sequence[int], total_steps: int) -> list[int]:
  """The schedule's cycle ends after (re)starting a run with `total_steps`.

  A run's schedule is fixed when it starts: one cycle over its `total_steps`
  (`[total_steps]`). Extending it (resumed with a larger `total_steps`)
  appends a cycle over the added steps; a resume with the same or a smaller
  `total_steps` keeps the recorded cycles (a shortened run stops early,
  without a faster decay).

  Raises:
    ValueError: `horizons` not strictly increasing positive integers.
  """
  horizons = [int(h) for h in horizons]
  if any(h < 1 for h in horizons) or any(
      b <= a for a, b in zip(horizons, horizons[1:])):
    raise ValueError(f"schedule horizons must be increasing positive step "
                     f"counts, got {horizons}")
  if not horizons or total_steps > horizons[-1]:
    return [*horizons, int(total_steps)]
  return horizons


def make_schedule(name: str, learning_rate: float, *, total_steps: int,
                  warmup_steps: int = 0,
                  horizons: Sequence[int] = ()) -> optax.Schedule:
  """A learning-rate schedule.

  Args:
    name: "constant", "cosine" (decay to 0 over `total_steps`) or
      "warmup_cosine" (linear warm-up for `warmup_steps`, then cosine to 0).
    learning_rate: peak learning rate.
    total_steps: length of the run.
    warmup_steps: warm-up length for "warmup_cosine" (of every cycle);
      `AUTO_WARMUP` (-1): `min(100, cycle_steps // 10)`.
    horizons: the ends of the cycles recorded when the run started and each
      time it was extended (`extend_horizons(horizons, total_steps)` is
      used; empty: one cycle over `total_steps`). Cycle i runs the schedule
      afresh over steps `[horizons[i-1], horizons[i])` from the peak
      learning rate (a warm restart: warm-up, then cosine to 0 at
      `horizons[i]`); the learning rate at a step never depends on the
      `total_steps` of a later extension. Past the last horizon (a shortened
      run never gets there) the last value holds.

  Raises:
    ValueError: unknown name or out-of-range argument.
  """
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; valid: "
                     f"{', '.join(SCHEDULES)}")
  if name == "constant":
    return optax.constant_schedule(learning_rate)
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1 for schedule {name!r}")
  ends = extend_horizons(horizons, total_steps)
  if name == "warmup_cosine":
    check_warmup(warmup_steps, total_steps, horizons)
  starts = [0, *ends[:-1]]
  cycles = [_one_cycle(name, learning_rate, end - start, warmup_steps)
            for start, end in zip(starts, ends)]
  if len(cycles) == 1:
    return cycles[0]
  return optax.join_schedules(cycles, starts[1:])


def _one_cycle(name: str, learning_rate: float, steps: int,
               warmup_steps: int) -> optax.Schedule:
  if name == "cosine":
    return optax.cosine_decay_schedule(learning_rate, steps)
  return optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, resolve_warmup(warmup_steps, steps), steps)


def check_warmup(warmup_steps: int, total_steps: int,
                 horizons: Sequence[int] = (), *,
                 warmup_field: str = "warmup_steps",
                 steps_field: str = "total_steps") -> None:
  """Raises unless `warmup_steps` is `AUTO_WARMUP` or shorter than every
  cycle of the schedule (`make_schedule`'s `horizons`); the message names
  the fields as the caller's config does."""
  if warmup_steps == AUTO_WARMUP:
    return
  if warmup_steps < 0:
    raise ValueError(f"{warmup_field} must be >= 0 (or {AUTO_WARMUP}: "
                     f"min({MAX_AUTO_WARMUP}, steps // 10)), got "
                     f"{warmup_steps}")
  ends = extend_horizons(horizons, total_steps)
  for start, end in zip([0, *ends[:-1]], ends):
    if warmup_steps < end - start:
      continue
    if start == 0:
      where = f"{steps_field}={end}"
    else:
      where = (f"the {end - start} steps added when {steps_field} was "
               f"extended from {start} to {end} (a new warm-up + cosine "
               "cycle)")
    raise ValueError(
        f"{warmup_field}={warmup_steps} must be < {where}; lower "
        f"{warmup_field}, or set it to {AUTO_WARMUP} (automatic: "
        f"min({MAX_AUTO_WARMUP}, steps // 10))")


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
