"""The training loop: steps, logging, evaluation, checkpoints.

The loop owns no model logic: it calls a compiled `train_step` on the batches of
a checkpointable iterator (`get_state()`, e.g. a `Prefetcher` over a
`MixtureIterator`), saves the iterator's state with every checkpoint (so a
resumed run sees exactly the batches an uninterrupted one would), and hands
metrics to a `MetricWriter`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from mtl_jax.training import writers
from mtl_jax.training.checkpoint import Checkpointer
from mtl_jax.training.parallel import DataParallel
from mtl_jax.training.state import TrainState


def summarize_train_metrics(history: Sequence[Mapping[str, Any]],
                            task_names: Sequence[str]) -> dict[str, float]:
  """Averages per-step train metrics over a logging interval.

  A task's loss is averaged over the steps in which it had labels (a step
  without labels reports loss 0, which is no measurement); its count is summed.
  """
  # Step outputs are replicated scalars (also across processes): read the
  # local copy.
  history = [{k: np.asarray(v.addressable_shards[0].data)
              if isinstance(v, jax.Array) else np.asarray(v)
              for k, v in h.items()} for h in history]
  keys = history[0].keys()
  out = {k: float(np.mean([h[k] for h in history])) for k in keys}
  for name in task_names:
    counts = np.array([h[f"{name}/count"] for h in history])
    losses = np.array([h[f"{name}/loss"] for h in history])
    present = counts > 0
    out[f"{name}/count"] = float(counts.sum())
    out[f"{name}/loss"] = (float(losses[present].mean()) if present.any()
                           else float("nan"))
  return out


def check_finite(scalars: Mapping[str, float], task_names: Sequence[str],
                 step: int) -> None:
  """Raises FloatingPointError naming the task whose train loss is NaN/Inf."""
  bad = [n for n in task_names
         if scalars.get(f"{n}/count", 0) > 0 and not math.isfinite(
             scalars[f"{n}/loss"])]
  if bad or not math.isfinite(scalars["loss"]):
    raise FloatingPointError(
        f"non-finite training loss at step {step} for task(s) "
        f"{bad or ['<weighted total>']}; lower the learning rate or check the "
        "inputs and labels of these tasks")


def train_loop(*, state: TrainState,
               train_step: Callable[[TrainState, Any], tuple[TrainState, dict]],
               batches: Iterator[Any], num_steps: int,
               task_names: Sequence[str], writer: writers.MetricWriter,
               evaluate: Callable[[Any], dict[str, float]] | None = None,
               checkpointer: Checkpointer | None = None, log_every: int = 100,
               eval_every: int = 0, checkpoint_every: int = 0,
               parallel: DataParallel | None = None
               ) -> tuple[TrainState, dict[str, float] | None]:
  """Runs `train_step` from `state.step` up to `num_steps`.

  Args:
    state: the (fresh or restored) state; training continues from `state.step`.
    train_step: the compiled step.
    batches: the train batches from `state.step` on (device or host arrays);
      if it has `get_state()`, that state is saved with every checkpoint.
    num_steps: the total number of steps of the run.
    task_names: task order, for per-task summaries.
    writer: where train/eval scalars go.
    evaluate: `params -> {"<task>/<metric>": value}` on the test split.
    checkpointer: saves every `checkpoint_every` steps and at the end.
    log_every, eval_every, checkpoint_every: intervals in steps (0: never,
      except that the last step is always logged, evaluated and saved).
    parallel: how `state` is placed (pmap stacks a replica per device); None
      for a plain single-device state.

  Returns:
    The final state and the last evaluation (None without `evaluate`).
  """
  start = parallel.step_of(state) if parallel else int(state.step)
  progress = writers.Progress(start, num_steps)
  history: list[dict] = []
  last_eval = None
  summary_keys = ("loss",) + tuple(f"{n}/loss" for n in task_names)
  if start >= num_steps:
    logging.info("nothing to do: state is at step %d of %d", start, num_steps)
  for step in range(start, num_steps):
    state, metrics = train_step(state, next(batches))
    history.append(metrics)
    done = step + 1
    last = done == num_steps
    if last or (log_every and done % log_every == 0):
      scalars = summarize_train_metrics(history, task_names)
      history = []
      check_finite(scalars, task_names, done)
      scalars.update(progress.update(done))
      writer.write(done, scalars, split="train")
      logging.info(writers.format_progress(done, num_steps, scalars,
                                           summary_keys))
    if evaluate is not None and (last or (eval_every and done % eval_every == 0)):
      last_eval = evaluate(state.params)
      writer.write(done, last_eval, split="eval")
      logging.info("eval @ %d: %s", done, ", ".join(
          f"{k}={v:.4g}" for k, v in sorted(last_eval.items())
          if not k.endswith("/count")))
    if checkpointer is not None and (
        last or (checkpoint_every and done % checkpoint_every == 0)):
      checkpointer.save(
          done, parallel.for_checkpoint(state) if parallel else state,
          data_state=batches.get_state() if hasattr(batches, "get_state")
          else None)
  if checkpointer is not None:
    checkpointer.wait()
  return state, last_eval
