"""Skipping train steps whose losses or update are not finite.

A NaN or Inf in one task's loss (a bad label, an overflow) or in the update
would otherwise poison the params for the rest of the run. `skip_nonfinite`
wraps a pure train step (`make_train_step` applies it itself unless built
with `skip_nonfinite=False`): inside the compiled step it checks every task loss,
the total loss and every floating leaf of the new params and method states,
and where anything is not finite it keeps the previous params, optimizer,
weighting and aggregation states (the step counter still advances, so the
data stream and the per-step random keys move on exactly as in a clean run).
It reports, per step:

  nonfinite          1.0 if the update was skipped, else 0.0
  nonfinite_streak   consecutive skipped steps up to and including this one
  <task>/nonfinite   1.0 if that task's loss was NaN/Inf

The training loop stops the run once the streak reaches a limit, naming the
tasks (`loop.train_loop(max_nonfinite_streak=...)`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mtl_jax.training.state import TrainState

# Set on a guarded step function: `skip_nonfinite` does not wrap it again.
GUARDED = "skips_nonfinite"
StepFn = Callable[[TrainState, Any], tuple[TrainState, dict]]


def all_finite(tree: Any) -> jax.Array:
  """True iff every floating-point leaf of `tree` is free of NaN and Inf."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def skip_nonfinite(train_step: StepFn, task_names: Sequence[str]) -> StepFn:
  """Wraps `train_step` so that a non-finite step changes nothing but `step`.

  Args:
    train_step: a pure `(state, batch) -> (state, metrics)` whose metrics hold
      "loss" and "<task>/loss" for every task (as `make_train_step`'s do).
    task_names: the tasks, to flag which one had the non-finite loss.

  Returns:
    A pure step with the same signature (jit/pmap it as the original) whose
    metrics also hold "nonfinite", "nonfinite_streak" and "<task>/nonfinite";
    `train_step` itself if it is already guarded (a default
    `make_train_step`), so wrapping twice changes nothing.
  """
  if getattr(train_step, GUARDED, False):
    return train_step
  task_names = tuple(task_names)

  def step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
    new, metrics = train_step(state, batch)
    task_bad = {t: ~jnp.isfinite(metrics[f"{t}/loss"]) for t in task_names}
    carried = ("params", "opt_state", "weighting_state", "aggregation_state")
    new_parts = tuple(getattr(new, f) for f in carried)
    bad = ~(all_finite(new_parts) & jnp.isfinite(metrics["loss"]))
    for flag in task_bad.values():
      bad = bad | flag
    kept = jax.tree.map(lambda n, o: jnp.where(bad, o, n), new_parts,
                        tuple(getattr(state, f) for f in carried))
    streak = jnp.where(bad, state.nonfinite_streak + 1, 0).astype(jnp.int32)
    new = new.replace(nonfinite_streak=streak, **dict(zip(carried, kept)))
    metrics = dict(metrics)
    metrics["nonfinite"] = bad.astype(jnp.float32)
    metrics["nonfinite_streak"] = streak
    for t, flag in task_bad.items():
      metrics[f"{t}/nonfinite"] = flag.astype(jnp.float32)
    return new, metrics

  setattr(step, GUARDED, True)
  return step
