"""The training loop: steps, logging, evaluation, checkpoints.

The loop owns no model logic: it calls a compiled `train_step` on the batches of
a checkpointable iterator (`get_state()`, e.g. a `Prefetcher` over a
`MixtureIterator`), saves the iterator's state with every checkpoint (so a
resumed run sees exactly the batches an uninterrupted one would), and hands
metrics to a `MetricWriter`.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from mtl_jax.training import optim
from mtl_jax.training import writers
from mtl_jax.training.checkpoint import Checkpointer
from mtl_jax.training.parallel import DataParallel
from mtl_jax.training.state import TrainState
from mtl_jax.training.step import COSINE_PREFIX


# Checkpoint metadata key: the learning-rate schedule's cycle ends
# (`optim.make_schedule`'s `horizons`), recorded when the run starts and each
# time it is extended.
HORIZONS_KEY = "schedule_horizons"


def schedule_horizons(checkpoint_dir: str, total_steps: int) -> list[int]:
  """The schedule's cycle ends for a run (re)started to `total_steps`.

  A new run (no checkpoint in `checkpoint_dir`): `[total_steps]`. A resumed
  one: the horizons recorded with its newest readable checkpoint (item
  `HORIZONS_KEY` of its metadata), with a cycle over the added steps when
  `total_steps` is larger (`optim.extend_horizons`). Every process of a run
  reads the same checkpoint, so all build the same schedule. A checkpoint
  saved without the record (an older version) gives `[total_steps]`, the
  old behaviour, with a warning. Opens nothing when there is no checkpoint.
  """
  if not any(d.isdigit() for d in (os.listdir(checkpoint_dir)
                                   if os.path.isdir(checkpoint_dir) else ())):
    return [int(total_steps)]
  reader = Checkpointer(checkpoint_dir)
  try:
    for step in reversed(reader.all_steps()):
      try:
        meta = reader.metadata(step)
      except Exception:  # pylint: disable=broad-except  # damaged: older one
        continue
      if isinstance(meta, dict) and HORIZONS_KEY in meta:
        horizons = optim.extend_horizons(meta[HORIZONS_KEY], total_steps)
        if len(horizons) > len(meta[HORIZONS_KEY]):
          logging.warning(
              "extending the run from %d to %d steps: the learning-rate "
              "schedule starts a new cycle over steps %d-%d (warm restart "
              "at the peak learning rate; steps before %d keep their "
              "learning rates)", horizons[-2], total_steps, horizons[-2],
              total_steps, horizons[-2])
        return horizons
      break
  finally:
    reader.close()
  logging.warning("the checkpoints in %s record no schedule horizon (an older "
                  "version): the schedule is built over %d steps",
                  checkpoint_dir, total_steps)
  return [int(total_steps)]


def _local(value: Any) -> np.ndarray:
  """A replicated step output (also across processes) as a host array."""
  if isinstance(value, jax.Array):
    return np.asarray(value.addressable_shards[0].data)
  return np.asarray(value)


def _mean(key: str, values: Sequence[Any]) -> float:
  """The mean over steps; a gradient cosine over the steps where it is
  defined (NaN where a task had no labels)."""
  if not values:
    return float("nan")
  values = np.asarray(values, np.float64)
  if key.startswith(COSINE_PREFIX):
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")
  return float(values.mean())


def summarize_train_metrics(history: Sequence[Mapping[str, Any]],
                            task_names: Sequence[str]) -> dict[str, float]:
  """Averages per-step train metrics over a logging interval.

  Steps skipped for a non-finite loss or update (metric "nonfinite" = 1) are
  left out of every average and counted in "nonfinite_steps". A gradient
  cosine (`grad_cos/...`) is averaged over the steps where it is defined. A task's loss is
  averaged over the steps in which it had labels (a step without labels
  reports loss 0, which is no measurement); its count is summed.
  """
  history = [{k: _local(v) for k, v in h.items()} for h in history]
  skipped = np.array([float(h.get("nonfinite", 0.0)) for h in history]) > 0
  kept = [h for h, s in zip(history, skipped) if not s]
  keys = [k for k in history[0].keys()
          if k not in ("nonfinite", "nonfinite_streak")
          and not k.endswith("/nonfinite")]
  out = {k: _mean(k, [h[k] for h in kept]) for k in keys}
  for name in task_names:
    counts = np.array([h[f"{name}/count"] for h in kept])
    losses = np.array([h[f"{name}/loss"] for h in kept])
    present = counts > 0
    out[f"{name}/count"] = float(counts.sum())
    out[f"{name}/loss"] = (float(losses[present].mean()) if present.any()
                           else float("nan"))
  if "nonfinite" in history[0]:
    out["nonfinite_steps"] = float(skipped.sum())
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


class Preempted(Exception):
  """The run got SIGTERM; a checkpoint of `step` was saved before stopping."""

  def __init__(self, step: int):
    super().__init__(f"preempted (SIGTERM): saved a checkpoint at step {step};"
                     " run the same command again to resume")
    self.step = step


class _SigtermFlag:
  """Sets a flag on SIGTERM while active (main thread, one process only).

  Multi-process runs instead ask JAX's preemption service, which every
  process reaches at the same step (`reached_preemption_sync_point`).
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None

  def __enter__(self) -> "_SigtermFlag":
    if (jax.process_count() == 1 and
        threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM,
                                     lambda *_: self._flag.set())
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # no preemption service in this cluster set-up
        return False
    return self._flag.is_set()


def _raise_nonfinite(metrics: Mapping[str, Any], task_names: Sequence[str],
                     step: int, limit: int) -> None:
  tasks = [n for n in task_names
           if f"{n}/nonfinite" in metrics and _local(metrics[f"{n}/nonfinite"])]
  raise FloatingPointError(
      f"{limit} consecutive train steps up to step {step} had a non-finite "
      f"(NaN/Inf) {'loss for task(s) ' + str(tasks) if tasks else 'update'} "
      "and were skipped; lower the learning rate or check the inputs and "
      "labels of these tasks")


def train_loop(*, state: TrainState,
               train_step: Callable[[TrainState, Any], tuple[TrainState, dict]],
               batches: Iterator[Any], num_steps: int,
               task_names: Sequence[str], writer: writers.MetricWriter,
               evaluate: Callable[[Any], dict[str, float]] | None = None,
               checkpointer: Checkpointer | None = None, log_every: int = 100,
               eval_every: int = 0, checkpoint_every: int = 0,
               parallel: DataParallel | None = None,
               max_nonfinite_streak: int = 10,
               eval_split: str = "eval",
               on_eval: Callable[[int, Mapping[str, float], TrainState],
                                 None] | None = None,
               ) -> tuple[TrainState, dict[str, float] | None]:
  """Runs `train_step` from `state.step` up to `num_steps`.

  Args:
    state: the (fresh or restored) state; training continues from `state.step`.
    train_step: the compiled step. If it is wrapped by
      `guard.skip_nonfinite`, non-finite steps are skipped and the run stops
      after `max_nonfinite_streak` consecutive ones; otherwise a non-finite
      logged loss stops it.
    batches: the train batches from `state.step` on (device or host arrays);
      if it has `get_state()`, that state is saved with every checkpoint.
    num_steps: the total number of steps of the run.
    task_names: task order, for per-task summaries.
    writer: where train/eval scalars go.
    evaluate: `params -> {"<task>/<metric>": value}` on the held-out split
      the run watches (validation, or the test split without one).
    checkpointer: saves every `checkpoint_every` steps, at the end, and when
      the process gets SIGTERM (pre-emption).
    log_every, eval_every, checkpoint_every: intervals in steps (0: never,
      except that the last step is always logged, evaluated and saved).
    parallel: how `state` is placed (pmap stacks a replica per device); None
      for a plain single-device state.
    max_nonfinite_streak: consecutive skipped steps that stop the run (>= 1).
    eval_split: the `split` of the evaluations in the writer's records.
    on_eval: called as `on_eval(step, metrics, state)` after each evaluation
      (e.g. to keep the best state for model selection).

  Returns:
    The final state and the last evaluation (None without `evaluate`).

  Raises:
    FloatingPointError: too many consecutive non-finite steps (names the
      tasks).
    Preempted: SIGTERM arrived; the checkpoint of the last finished step was
      written first.
  """
  if max_nonfinite_streak < 1:
    raise ValueError(f"max_nonfinite_streak must be >= 1, got "
                     f"{max_nonfinite_streak}")
  start = parallel.step_of(state) if parallel else int(state.step)
  logger = _IntervalLogger(writer, task_names, writers.Progress(start, num_steps),
                           num_steps, max_nonfinite_streak)
  last_eval = None
  if start >= num_steps:
    logging.info("nothing to do: state is at step %d of %d", start, num_steps)

  def save(done: int) -> None:
    checkpointer.save(
        done, parallel.for_checkpoint(state) if parallel else state,
        data_state=batches.get_state() if hasattr(batches, "get_state")
        else None)

  with _SigtermFlag() as sigterm:
    for step in range(start, num_steps):
      if step == start:  # a silent wait of seconds to minutes otherwise
        logging.info("compiling the train step (first step: %d)...", step + 1)
        compile_start = time.perf_counter()
      state, metrics = train_step(state, next(batches))
      if step == start:
        jax.block_until_ready(metrics)
        logging.info("compiled the train step and ran step %d in %.1fs",
                     step + 1, time.perf_counter() - compile_start)
      done = step + 1
      last = done == num_steps
      logger.record(done, metrics,
                    flush=last or bool(log_every and done % log_every == 0))
      if evaluate is not None and (last or (eval_every and
                                            done % eval_every == 0)):
        last_eval = _evaluate(evaluate, state.params, writer, done,
                              eval_split)
        if on_eval is not None:
          on_eval(done, last_eval, state)
      if checkpointer is not None and (
          last or (checkpoint_every and done % checkpoint_every == 0)):
        save(done)
      if not last and sigterm.should_stop(done):
        logging.warning("SIGTERM at step %d: saving a checkpoint and stopping",
                        done)
        if checkpointer is not None:
          if checkpointer.latest_step() != done:
            save(done)
          checkpointer.wait()
        raise Preempted(done)
    logger.check_pending()
  if checkpointer is not None:
    checkpointer.wait()
  return state, last_eval


def _evaluate(evaluate: Callable[[Any], dict[str, float]], params: Any,
              writer: writers.MetricWriter, done: int, split: str
              ) -> dict[str, float]:
  result = evaluate(params)
  writer.write(done, result, split=split)
  logging.info("%s @ %d: %s", split, done, ", ".join(
      f"{k}={v:.4g}" for k, v in sorted(result.items())
      if not k.endswith("/count")))
  return result


class _IntervalLogger:
  """Collects per-step metrics and writes their averages every interval.

  The non-finite streak of a step is checked one step late (when the next
  step has been dispatched), so that logging never waits for the device,
  except at the end of an interval.
  """

  def __init__(self, writer: writers.MetricWriter, task_names: Sequence[str],
               progress: writers.Progress, num_steps: int,
               max_nonfinite_streak: int):
    self.writer, self.task_names = writer, tuple(task_names)
    self.progress, self.num_steps = progress, num_steps
    self.limit = max_nonfinite_streak
    self.history: list[dict] = []
    self.pending = None  # (step, metrics) not yet checked
    self.summary_keys = ("loss",) + tuple(f"{n}/loss" for n in task_names)

  def check_pending(self) -> None:
    if self.pending is not None:
      _check_streak(*self.pending, self.task_names, self.limit)
      self.pending = None

  def record(self, done: int, metrics: Mapping[str, Any], flush: bool
             ) -> None:
    self.check_pending()
    self.pending = (done, metrics)
    self.history.append(metrics)
    if not flush:
      return
    self.check_pending()
    scalars = summarize_train_metrics(self.history, self.task_names)
    self.history = []
    if "nonfinite" not in metrics:
      check_finite(scalars, self.task_names, done)
    scalars.update(self.progress.update(done))
    self.writer.write(done, scalars, split="train")
    logging.info(writers.format_progress(done, self.num_steps, scalars,
                                         self.summary_keys))


def _check_streak(step: int, metrics: Mapping[str, Any],
                  task_names: Sequence[str], limit: int) -> None:
  """Warns about a skipped step; raises once `limit` are consecutive."""
  if "nonfinite_streak" not in metrics:
    return
  streak = int(_local(metrics["nonfinite_streak"]))
  if not streak:
    return
  if streak >= limit:
    _raise_nonfinite(metrics, task_names, step, limit)
  tasks = [n for n in task_names if _local(metrics[f"{n}/nonfinite"])]
  logging.warning("step %d: non-finite %s; update skipped (%d in a row)",
                  step, f"loss for task(s) {tasks}" if tasks else "update",
                  streak)
