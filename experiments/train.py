r"""Trains a multi-task model; the default is hard sharing on multi_digits.

  python -m experiments.train --config=experiments/configs/multi_digits.py \
      --workdir=runs/multi_digits [--config.optimizer.learning_rate=1e-3 ...]

Writes to the workdir: `config.json`, `metrics.jsonl`, TensorBoard events in
`tb/`, orbax checkpoints in `checkpoints/`, `curves.png` and, at the end,
`results.json` = {"steps": N, "eval": {"<task>/<metric>": value}, "label_counts":
{task: labelled training examples}, ...}. Run again with the same workdir to
resume from the latest checkpoint.

This file is the one place where a ConfigDict becomes explicit arguments to the
library (`build_experiment`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
from ml_collections import config_flags
import ml_collections
import optax
import tensorflow_datasets as tfds

from experiments.configs import methods
from mtl_jax import aggregation as aggregation_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.data import catalog
from mtl_jax.data import mixture as mixture_lib
from mtl_jax.data import multi_digits
from mtl_jax.data import pipeline
from mtl_jax.models import build as models_build
from mtl_jax.training import checkpoint as checkpoint_lib
from mtl_jax.training import distributed
from mtl_jax.training import guard
from mtl_jax.training import loop
from mtl_jax.training import optim
from mtl_jax.training import parallel as parallel_lib
from mtl_jax.training import run_config
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib
from mtl_jax.training import writers

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/multi_digits.py",
    "Experiment config file (ml_collections); override fields with "
    "--config.<field>=<value>.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it "
                               "holds a run of the same config).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process run, detecting the cluster "
    "(TPU pod, SLURM, JAX_COORDINATOR_ADDRESS, ...) unless the three flags "
    "below are given.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (multi-process).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without a heartbeat after which a "
    "process counts as dead and the others stop with an error (multi-process).")

# Config fields that may change when a workdir is resumed: they change how a run
# is logged or how long it lasts, not what it computes.
# The device layout may change too (resume an 8-GPU run on 4): every layout
# computes the same numbers, up to float reduction order.
MAY_DIFFER = ("num_steps", "log_every", "eval_every", "checkpoint_every",
              "max_checkpoints_to_keep", "max_nonfinite_streak",
              "aggregation.jacobian",
              "data.data_dir", "data.prefetch",
              "eval_batch_size",
              "parallelism", "sharding", "mesh.data")

@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs, built from the config in one place."""

  tasks: tasks_lib.TaskSet
  model: Any
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  weighting: weighting_lib.Weighting
  aggregator: aggregation_lib.Aggregator | None
  rep_grad: bool
  chunk_size: int | None
  jacobian: str
  grad_norm_path: tuple[str, ...]
  pass_task_presence: bool
  train_mixture: mixture_lib.Mixture
  eval_stream: mixture_lib.EvalStream
  label_counts: dict[str, int]
  param_counts: dict[str, Any]
  num_train_examples: int
  num_unlabelled: int


def _check_positive(config: ml_collections.ConfigDict, *keys: str) -> None:
  for key in keys:
    value = config[key]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{key} must be a positive integer, got {value!r}")


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  """Range checks of the numeric config fields (names the field)."""
  def check(key, ok, what):
    value = config
    for part in key.split("."):
      value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and ok(value)):
      raise ValueError(f"config.{key} must be {what}, got {value!r}")

  check("seed", lambda v: v >= 0 and v == int(v), "a non-negative integer")
  check("optimizer.learning_rate", lambda v: v > 0, "> 0")
  check("optimizer.warmup_steps", lambda v: v >= 0, ">= 0")
  check("optimizer.momentum", lambda v: 0 <= v < 1, "in [0, 1)")
  check("optimizer.weight_decay", lambda v: v >= 0, ">= 0")
  check("optimizer.grad_clip_norm", lambda v: v >= 0, ">= 0 (0: off)")
  check("model.dropout_rate", lambda v: 0 <= v < 1, "in [0, 1)")
  for key in ("eval_every", "checkpoint_every"):
    check(key, lambda v: v >= 0 and v == int(v), "an integer >= 0 (0: never)")
  for key in ("max_checkpoints_to_keep", "max_nonfinite_streak",
              "data.prefetch"):
    check(key, lambda v: v >= 1 and v == int(v), "an integer >= 1")
  check("data.label_seed", lambda v: v >= 0 and v == int(v),
        "a non-negative integer")


def _check_task_keys(field: str, mapping: dict, valid: tuple[str, ...]) -> None:
  unknown = sorted(set(mapping) - set(valid))
  if unknown:
    raise ValueError(f"config.{field} names unknown task(s) {unknown}; valid "
                     f"tasks: {', '.join(valid)}")


def _load_dataset(config: ml_collections.ConfigDict) -> catalog.Dataset:
  data_dir = config.data.data_dir or None
  options = dict(config.data.options)
  if config.data.name == "multi_digits" and jax.process_count() > 1:
    # Process 0 prepares first so that processes sharing a filesystem do not
    # race on the same files; the others then find them (or, on a host-local
    # disk, prepare their own copy).
    if jax.process_index() == 0:
      multi_digits.prepare(data_dir, options.get("builder_config", "default"))
    multihost_utils.sync_global_devices("multi_digits prepared")
  return catalog.get_dataset(config.data.name, data_dir=data_dir, **options)


def _label_count(component: mixture_lib.Component, task: str) -> int:
  if task in component.label_keep:
    return int(component.label_keep[task][component.indices].sum())
  return component.num_rows


def build_data(config: ml_collections.ConfigDict, dataset: catalog.Dataset,
               tasks: tasks_lib.TaskSet):
  """The training mixture and the eval stream of the config's data block.

  Each training component keeps its labels on `config.data.label_fractions`
  of its rows (per task, seeded by `label_seed`); rows left with no label
  form an unlabelled component, dropped when `drop_unlabelled`.

  Returns:
    `(mixture, eval_stream, label_counts, num_train, num_unlabelled)`.
  """
  d = config.data
  fractions = dict(d.label_fractions)
  _check_task_keys("data.label_fractions", fractions, dataset.tasks.names)
  labelled, unlabelled = [], []
  for component in dataset.train:
    component = mixture_lib.restrict(component, tasks.names)
    kept, rest = mixture_lib.split_by_label_fraction(component, fractions,
                                                     d.label_seed)
    labelled.append(kept)
    unlabelled.append(rest)
  provided = [(c, mixture_lib.labelled_tasks(c)) for c in labelled]
  label_counts = {t: sum(_label_count(c, t) for c, p in provided if t in p)
                  for t in tasks.names}
  num_unlabelled = sum(c.num_rows for c in unlabelled)
  components = [c for c in labelled if c.num_rows]
  if not d.drop_unlabelled:
    components += [c for c in unlabelled if c.num_rows]
  if not components:
    raise ValueError("config.data.label_fractions leave no labelled training "
                     "example (and data.drop_unlabelled drops the rest)")
  m = d.mixture
  rates = mixture_lib.mixing_rates(
      {c.name: c.num_rows for c in components}, m.method,
      temperature=m.temperature, rates=dict(m.rates),
      size_cap=m.size_cap or None)
  train_mixture = mixture_lib.Mixture(
      components, tasks, batch_size=config.batch_size, seed=config.seed,
      rates=rates, composition=m.composition,
      num_host_shards=jax.process_count(), host_index=jax.process_index())
  eval_stream = mixture_lib.EvalStream(
      [mixture_lib.restrict(c, tasks.names) for c in dataset.eval], tasks,
      batch_size=config.eval_batch_size, num_host_shards=jax.process_count(),
      host_index=jax.process_index())
  num_train = sum(c.num_rows for c in labelled) + num_unlabelled
  return train_mixture, eval_stream, label_counts, num_train, num_unlabelled


def _trunk_kwargs(m: ml_collections.ConfigDict, dataset: catalog.Dataset
                  ) -> dict[str, dict[str, Any]]:
  kwargs = {
      "mlp": dict(hidden_sizes=tuple(m.hidden_sizes),
                  dropout_rate=m.dropout_rate),
      "cnn": dict(channels=tuple(m.channels), strides=tuple(m.strides),
                  feature_size=m.feature_size, dropout_rate=m.dropout_rate),
      "resnet": dict(feature_size=m.feature_size),
  }
  if "tagger" in m:
    kwargs["tagger"] = dict(m.tagger)
  if "vocab_size" in dataset.info:
    kwargs.setdefault("tagger", {})["vocab_size"] = dataset.info["vocab_size"]
  return kwargs


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Turns the config into explicit library objects, validating it first.

  Raises:
    ValueError: an unknown name (dataset, task, trunk, optimizer, schedule,
      weighting) or an out-of-range value; the message names the field.
  """
  if config.data.name not in catalog.DATASETS:
    raise ValueError(f"unknown dataset {config.data.name!r}; valid: "
                     f"{', '.join(sorted(catalog.DATASETS))}")
  _check_positive(config, "batch_size", "eval_batch_size", "num_steps",
                  "log_every")
  _check_ranges(config)
  dataset = _load_dataset(config)
  names = tuple(n.strip() for n in config.tasks.split(",") if n.strip())
  weights = dict(config.task_weights)
  _check_task_keys("task_weights", weights, dataset.tasks.names)
  tasks = dataset.tasks.select(names or dataset.tasks.names)  # KeyError: unknown
  tasks = tasks_lib.TaskSet([dataclasses.replace(t, weight=float(
      weights.get(t.name, 1.0))) for t in tasks])
  (train_mixture, eval_stream, label_counts, num_train,
   num_unlabelled) = build_data(config, dataset, tasks)

  m = config.model
  trunk_kwargs = _trunk_kwargs(m, dataset)
  if m.trunk not in trunk_kwargs:
    raise ValueError(f"unknown trunk {m.trunk!r}; valid: "
                     f"{', '.join(sorted(trunk_kwargs))}")
  arch = m.architecture
  if arch not in models_build.ARCHITECTURES:
    raise ValueError(f"unknown architecture {arch!r}; valid: "
                     f"{', '.join(sorted(models_build.ARCHITECTURES))}")
  arch_kwargs = dict(m[arch]) if arch in m else {}

  def make_model(task_set):
    return models_build.make_model(
        arch, task_set,
        models_build.make_trunk(m.trunk, **trunk_kwargs[m.trunk]),
        head_hidden_sizes=tuple(m.head_hidden_sizes),
        input_trunk=m.input_trunk, **arch_kwargs)

  model = make_model(tasks)
  sample = train_mixture.batch(train_mixture.initial_state())[0]["inputs"][:1]
  param_counts = models_build.param_report(
      models_build.abstract_params(model, sample),
      {t.name: models_build.count_params(models_build.abstract_params(
          make_model(tasks.select([t.name])), sample)) for t in tasks})

  o = config.optimizer
  schedule = optim.make_schedule(o.schedule, o.learning_rate,
                                 total_steps=config.num_steps,
                                 warmup_steps=o.warmup_steps)
  optimizer = optim.make_optimizer(o.name, schedule, momentum=o.momentum,
                                   weight_decay=o.weight_decay,
                                   grad_clip_norm=o.grad_clip_norm)
  w_kwargs = methods.method_kwargs(config.weighting, weighting_lib.WEIGHTINGS,
                                   "weighting")
  if config.weighting.name == "static":
    w_kwargs["weights"] = tasks.static_weights
  weighting = weighting_lib.get_weighting(config.weighting.name, **w_kwargs)
  aggregator = None
  if config.aggregation.name != "none":
    aggregator = aggregation_lib.get_aggregator(
        config.aggregation.name, **methods.method_kwargs(
            config.aggregation, aggregation_lib.AGGREGATORS, "aggregation"))
  if config.aggregation.chunk_size < 0:
    raise ValueError("config.aggregation.chunk_size must be >= 0 (0: all tasks"
                     f" at once), got {config.aggregation.chunk_size}")
  jacobian = config.aggregation.get("jacobian", "auto")
  if jacobian not in step_lib.JACOBIAN_MODES:
    raise ValueError(f"unknown config.aggregation.jacobian {jacobian!r}; "
                     f"valid: {', '.join(step_lib.JACOBIAN_MODES)}")
  if config.aggregation.rep_grad and (aggregator is None or
                                      not aggregator.rep_grad_ok):
    raise ValueError(
        f"config.aggregation.rep_grad=True is not valid for aggregation "
        f"{config.aggregation.name!r}; valid: " + ", ".join(
            n for n in sorted(aggregation_lib.AGGREGATORS)
            if aggregation_lib.get_aggregator(n).rep_grad_ok))
  if config.aggregation.rep_grad and arch != "hard_sharing":
    raise ValueError("config.aggregation.rep_grad=True needs one shared "
                     "representation: architecture 'hard_sharing', not "
                     f"{arch!r}")
  grad_norm_path = models_build.last_shared_layer(arch, m.input_trunk)
  if "grad_norms" in weighting.needs and grad_norm_path is None:
    raise ValueError(f"weighting {config.weighting.name!r} needs a last "
                     f"shared layer, which architecture {arch!r} does not "
                     "have (hard_sharing, adversarial, or a mixture of experts"
                     " with config.model.input_trunk=True do)")
  return Experiment(
      tasks=tasks, model=model, optimizer=optimizer, schedule=schedule,
      weighting=weighting, aggregator=aggregator,
      rep_grad=config.aggregation.rep_grad,
      chunk_size=config.aggregation.chunk_size or None,
      jacobian=jacobian,
      grad_norm_path=grad_norm_path or (),
      pass_task_presence=arch == "adversarial",
      train_mixture=train_mixture, eval_stream=eval_stream,
      label_counts=label_counts, param_counts=param_counts,
      num_train_examples=num_train, num_unlabelled=num_unlabelled)


def make_parallel(config: ml_collections.ConfigDict
                  ) -> parallel_lib.DataParallel:
  """The device mesh and parallelism of the run; checks the batch sizes."""
  par = parallel_lib.DataParallel(
      parallel_lib.make_mesh(config.mesh.data), parallelism=config.parallelism,
      sharding=config.sharding)
  par.check_batch_size(config.batch_size, "config.batch_size")
  par.check_batch_size(config.eval_batch_size, "config.eval_batch_size")
  return par


def make_evaluate(exp: Experiment, par: parallel_lib.DataParallel,
                  params_like: Any) -> Callable[[Any], dict[str, float]]:
  """`params -> {"<task>/<metric>": value}` over the whole eval split."""
  eval_step = par.compile_eval_step(
      step_lib.make_eval_step(exp.model.apply, exp.tasks,
                              axis_name=par.axis_name), params_like)

  def evaluate(params):
    total = None
    for batch in exp.eval_stream:
      total = step_lib.accumulate(total, eval_step(params, par.put_batch(batch)))
    return step_lib.finalize(exp.tasks, par.to_host(total))

  return evaluate


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the results dict."""
  exp = build_experiment(config)  # validates before anything compiles
  par = make_parallel(config)
  is_main = jax.process_index() == 0  # only process 0 logs and writes files
  run_config.check_writable(workdir)
  run_config.check_or_write(workdir, config.to_dict(), MAY_DIFFER,
                            write=is_main)
  logging.info("tasks %s; labelled training examples %s; unlabelled pool %d "
               "of %d", exp.tasks.names, exp.label_counts, exp.num_unlabelled,
               exp.num_train_examples)

  rng = jax.random.PRNGKey(config.seed)
  data_state = exp.train_mixture.initial_state()
  sample, _ = exp.train_mixture.batch(data_state)
  params = state_lib.init_params(exp.model, sample["inputs"], rng)
  state = par.put_state(state_lib.create_train_state(
      params, exp.optimizer, exp.weighting, len(exp.tasks),
      jax.random.fold_in(rng, 1), exp.aggregator))
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=config.max_checkpoints_to_keep)
  if checkpointer.latest_step() is not None:
    step, restored, data_state = checkpointer.restore_with_data(
        par.for_checkpoint(state))
    state = par.from_checkpoint(restored)
    if data_state is None:
      raise ValueError(f"checkpoint {step} in {workdir} has no data iterator "
                       "state; it cannot be resumed exactly")
    if is_main:  # steps logged after the checkpoint will be logged again
      writers.truncate_jsonl(os.path.join(workdir, writers.JSONL_FILE), step)
    logging.info("resumed from checkpoint at step %d", par.step_of(state))

  train_step = par.compile_train_step(guard.skip_nonfinite(
      step_lib.make_train_step(
          exp.model.apply, exp.tasks, exp.optimizer, exp.weighting,
          aggregator=exp.aggregator, rep_grad=exp.rep_grad,
          chunk_size=exp.chunk_size, jacobian=exp.jacobian,
          grad_norm_path=exp.grad_norm_path,
          pass_task_presence=exp.pass_task_presence, schedule=exp.schedule,
          axis_name=par.axis_name), exp.tasks.names), state)
  writer = writers.MetricWriter(workdir, enabled=is_main)
  evaluate = make_evaluate(exp, par, state.params)
  batches = pipeline.Prefetcher(exp.train_mixture.iterator(data_state),
                                size=config.data.prefetch,
                                transform=par.put_batch)
  try:
    state, final_eval = loop.train_loop(
        state=state, train_step=train_step, batches=batches,
        num_steps=config.num_steps, task_names=exp.tasks.names, writer=writer,
        evaluate=evaluate, checkpointer=checkpointer, log_every=config.log_every,
        eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
        parallel=par, max_nonfinite_streak=config.max_nonfinite_streak)
  finally:  # also on an error or pre-emption: stop reading, flush, wait
    batches.close()
    writer.close()
    checkpointer.close()
  if final_eval is None:  # resumed a finished run: evaluate its final state
    final_eval = evaluate(state.params)

  results = {
      "steps": par.step_of(state),
      "num_devices": par.num_devices,
      "num_processes": jax.process_count(),
      "eval": final_eval,
      "label_counts": exp.label_counts,
      # This model against K single-task models of the same backbone.
      "params": exp.param_counts,
      "num_train_examples": exp.num_train_examples,
      "num_unlabelled": exp.num_unlabelled,
  }
  if is_main:
    _write_json(os.path.join(workdir, "results.json"), results)
    eval_keys = tuple(k for k in sorted(final_eval)
                      if k.split("/")[1] in ("accuracy", "f1", "mae"))
    writers.plot_curves(writer.jsonl_path, os.path.join(workdir, "curves.png"),
                        exp.tasks.names, eval_keys)
    print("test metrics:", json.dumps(
        {k: round(v, 4) for k, v in sorted(final_eval.items())}, indent=1))
  return results


def _write_json(path: str, value: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)  # readers never see a half-written file


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  if _DISTRIBUTED.value or _COORDINATOR.value:
    distributed.initialize(coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value,
                           process_id=_PROCESS_ID.value,
                           heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
    if jax.process_index() != 0:
      logging.set_verbosity(logging.WARNING)  # only process 0 logs progress
  tfds.disable_progress_bar()  # dataset preparation would print a bar per split
  # Orbax logs every step of every save at INFO; keep the console for progress.
  logging.get_absl_handler().addFilter(
      lambda record: "orbax" not in record.pathname)
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except loop.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)  # 128 + SIGTERM, as if the signal had ended the process


if __name__ == "__main__":
  app.run(main)
