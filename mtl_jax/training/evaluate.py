"""Evaluation over a whole held-out stream, in one call.

`evaluate` runs a compiled eval step (`step.make_eval_step`) over every batch
of an `EvalStream`, adds the summable statistics on device (`accumulate`) and
turns them into `{"<task>/<metric>": value}` (`finalize`), with `<task>/loss`
and `<task>/count` for every task. `make_evaluate` builds the eval step and
returns `params -> metrics`, on one device or through a `DataParallel`.

  evaluate_fn = make_evaluate(model.apply, tasks, eval_stream)
  metrics = evaluate_fn(state.params)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax

from mtl_jax import tasks as tasks_lib
from mtl_jax.training import parallel as parallel_lib
from mtl_jax.training import step as step_lib


def evaluate(eval_step: Callable[[Any, Any], dict], params: Any,
             batches: Iterable[Any], tasks: tasks_lib.TaskSet, *,
             put_batch: Callable[[Any], Any] | None = None,
             to_host: Callable[[Any], Any] | None = None) -> dict[str, float]:
  """`{"<task>/<metric>": value}` of `params` over `batches`.

  Args:
    eval_step: `(params, batch) -> stats` (`step.make_eval_step`, compiled).
    params: the model's params, as `eval_step` takes them.
    batches: host batches (an `EvalStream`: padded rows have mask 0).
    tasks: the tasks, in the eval step's order.
    put_batch: turns a host batch into the step's input (e.g.
      `DataParallel.put_batch`); default: as is.
    to_host: turns the summed statistics into host values (e.g.
      `DataParallel.to_host`); default: `jax.device_get`.

  Raises:
    ValueError: `batches` is empty.
  """
  total = None
  for batch in batches:
    if put_batch is not None:
      batch = put_batch(batch)
    total = step_lib.accumulate(total, eval_step(params, batch))
  if total is None:
    raise ValueError("evaluate: no evaluation batch")
  return step_lib.finalize(tasks, (to_host or jax.device_get)(total))


def make_evaluate(apply_fn: Callable[..., Any], tasks: tasks_lib.TaskSet,
                  batches: Iterable[Any], *,
                  parallel: parallel_lib.DataParallel | None = None,
                  params_like: Any = None
                  ) -> Callable[[Any], dict[str, float]]:
  """`params -> {"<task>/<metric>": value}` over the whole of `batches`.

  Args:
    apply_fn: a linen `model.apply` (`step.make_eval_step`).
    tasks: the tasks.
    batches: re-iterable host batches (an `EvalStream`), read in full at each
      call.
    parallel: the run's `DataParallel`; None: one device, `jax.jit`.
    params_like: params of the placed train state (their shardings), needed
      with `parallel`.
  """
  if parallel is None:
    eval_step = jax.jit(step_lib.make_eval_step(apply_fn, tasks))
    return lambda params: evaluate(eval_step, params, batches, tasks)
  if params_like is None:
    raise ValueError("make_evaluate: params_like is needed with parallel")
  eval_step = parallel.compile_eval_step(
      step_lib.make_eval_step(apply_fn, tasks, axis_name=parallel.axis_name),
      params_like)
  return lambda params: evaluate(eval_step, params, batches, tasks,
                                 put_batch=parallel.put_batch,
                                 to_host=parallel.to_host)
