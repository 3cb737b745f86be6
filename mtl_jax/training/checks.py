"""Checks of a run's options from explicit arguments, before any data is read
or any parameter created.

A script calls them up front, in one pass, so that a bad value fails in
seconds with an error naming it, not after the dataset is loaded and the model
initialised; a notebook user calls them, or gets the same errors from the
functions that take these arguments. `prefix` (e.g. "config.aggregation.")
makes the messages name the option as the caller's config does.

The architecture's own checks (hyperparameter names, rep_grad and GradNorm
support) are `models.build.ArchitectureSpec`'s; the data's are in
`mtl_jax.data.build`.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any, Sequence

import optax

from mtl_jax import aggregation as aggregation_lib
from mtl_jax.aggregation import Aggregator
from mtl_jax.training import optim
from mtl_jax.training import step as step_lib


def check_number(name: str, value: Any, ok: Callable[[float], bool],
                 what: str) -> None:
  """Raises ValueError `"{name} must be {what}, got {value!r}"` unless
  `value` is a finite int or float (not a bool) for which `ok` holds."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      math.isfinite(value) and ok(value)):
    raise ValueError(f"{name} must be {what}, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_count(name: str, value: Any, minimum: int, what: str) -> None:
  """An integer-valued number >= `minimum` (what: how the message says it)."""
  check_number(name, value, lambda v: v >= minimum and v == int(v), what)


def build_optimizer(name: str, learning_rate: float, *, schedule: str,
                    total_steps: int, warmup_steps: int = 0,
                    momentum: float = 0.9, weight_decay: float = 0.0,
                    grad_clip_norm: float = 0.0,
                    param_groups: Sequence[tuple[str, float]] = (),
                    horizons: Sequence[int] = (),
                    prefix: str = "", steps_field: str = "total_steps"
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Checks the optimizer's options and returns `(optimizer, schedule)`
  (`optim.make_schedule`, `optim.make_optimizer`; `horizons`: the schedule's
  recorded cycles, `optim.extend_horizons`). `steps_field` names
  `total_steps` in messages (e.g. "config.num_steps").

  Raises:
    ValueError: an out-of-range value or unknown name (the message names it).
  """
  check_number(f"{prefix}learning_rate", learning_rate, lambda v: v > 0, "> 0")
  check_number(f"{prefix}warmup_steps", warmup_steps,
               lambda v: v >= 0 or v == optim.AUTO_WARMUP,
               f">= 0 (or {optim.AUTO_WARMUP}: automatic)")
  check_number(f"{prefix}momentum", momentum, lambda v: 0 <= v < 1,
               "in [0, 1)")
  check_number(f"{prefix}weight_decay", weight_decay, lambda v: v >= 0, ">= 0")
  check_number(f"{prefix}grad_clip_norm", grad_clip_norm, lambda v: v >= 0,
               ">= 0 (0: off)")
  if schedule == "warmup_cosine":
    optim.check_warmup(warmup_steps, total_steps, horizons,
                       warmup_field=f"{prefix}warmup_steps",
                       steps_field=steps_field)
  lr_schedule = optim.make_schedule(schedule, learning_rate,
                                    total_steps=total_steps,
                                    warmup_steps=warmup_steps,
                                    horizons=horizons)
  optimizer = optim.make_optimizer(name, lr_schedule, momentum=momentum,
                                   weight_decay=weight_decay,
                                   grad_clip_norm=grad_clip_norm,
                                   param_groups=param_groups)
  return optimizer, lr_schedule


def check_loop_options(*, num_steps: int, log_every: int, eval_every: int,
                       checkpoint_every: int, max_checkpoints_to_keep: int,
                       max_nonfinite_streak: int, prefix: str = "") -> None:
  """Checks the training loop's counts (`loop.train_loop`, `Checkpointer`).

  Raises:
    ValueError: naming the option.
  """
  check_positive_int(f"{prefix}num_steps", num_steps)
  check_positive_int(f"{prefix}log_every", log_every)
  for name, value in (("eval_every", eval_every),
                      ("checkpoint_every", checkpoint_every)):
    check_count(prefix + name, value, 0, "an integer >= 0 (0: never)")
  for name, value in (("max_checkpoints_to_keep", max_checkpoints_to_keep),
                      ("max_nonfinite_streak", max_nonfinite_streak)):
    check_count(prefix + name, value, 1, "an integer >= 1")


def rep_grad_aggregators() -> list[str]:
  """The aggregators valid on representation gradients (default options)."""
  return [n for n in sorted(aggregation_lib.AGGREGATORS)
          if aggregation_lib.get_aggregator(n).rep_grad_ok]


def check_step_options(*, aggregator: Aggregator | None,
                       aggregator_name: str = "none", rep_grad: bool = False,
                       jacobian: str = "auto", chunk_size: int | None = None,
                       gradient_cosines: bool = False,
                       prefix: str = "") -> None:
  """Checks `make_train_step`'s gradient options against the aggregator.

  The named checks below come first, then the step's own
  (`step.check_step_options`), so that whatever `make_train_step` refuses is
  refused here too. The architecture's side (rep_grad needs `encode_decode`,
  GradNorm a last shared layer) is `ArchitectureSpec.check_step_options`.

  Args:
    aggregator: the aggregator, or None for the plain weighted sum.
    aggregator_name: its name, for messages.
    rep_grad: aggregate gradients w.r.t. the shared representation.
    jacobian: a `step.JACOBIAN_MODES` mode.
    chunk_size: tasks per batched VJP; None or 0: all at once.
    prefix: prepended to the option names in messages.

  Raises:
    ValueError: naming the option.
  """
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
      chunk_size, int) or chunk_size < 0):
    raise ValueError(f"{prefix}chunk_size must be >= 0 (0: all tasks at "
                     f"once), got {chunk_size}")
  if jacobian not in step_lib.JACOBIAN_MODES:
    raise ValueError(f"unknown {prefix}jacobian {jacobian!r}; "
                     f"valid: {', '.join(step_lib.JACOBIAN_MODES)}")
  if rep_grad and (aggregator is None or not aggregator.rep_grad_ok):
    raise ValueError(
        f"{prefix}rep_grad=True is not valid for aggregation "
        f"{aggregator_name!r}; valid: {', '.join(rep_grad_aggregators())}")
  step_lib.check_step_options(aggregator, rep_grad=rep_grad,
                              encode_decode=True,  # the architecture's check
                              jacobian=jacobian, chunk_size=chunk_size or None,
                              gradient_cosines=gradient_cosines, prefix=prefix)
