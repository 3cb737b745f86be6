r"""Trains a multi-task model; the default is hard sharing on multi_digits.

  python -m experiments.train --config=experiments/configs/multi_digits.py \
      --workdir=runs/multi_digits [--config.optimizer.learning_rate=1e-3 ...]

  python -m experiments.train --print_config [--config=... --config.x=...]

Writes to the workdir: `config.json` (the current config), `runs.jsonl` (one
line per start: time, command line, devices, parallelism; the first start's
full config, then each start's changes), `metrics.jsonl`, TensorBoard events
(scalars and hyperparameters) in `tb/`, orbax checkpoints in `checkpoints/`,
`curves.png` and, at the end, `results.json` = {"steps": N, "eval":
{"<task>/<metric>": value}, "label_counts": {task: labelled training
examples}, "run": {architecture, methods, tasks, devices, ...},
"wall_time_sec": ..., ...}. "eval" is the test split's evaluation in files,
console and plots. Run again with the same workdir to resume from the latest
checkpoint. A config mistake on the command line is one line, exit code 2
(`experiments/cli.py`); `--print_config` prints the resolved config.

This file is the one place where a ConfigDict becomes explicit arguments to the
library: `check_config` validates the whole config with the library's checks
before any data is read or any parameter created, `build_experiment` turns it
into library objects, `run` trains. It holds no data building, evaluation or
model logic of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging as std_logging
import os
import sys
import time
from typing import Any, NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds

from experiments import cli
from experiments.configs import methods
from experiments.configs import pretexts as pretexts_config
from experiments.protocols import stats
from mtl_jax import aggregation as aggregation_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.data import build as data_build
from mtl_jax.data import mixture as mixture_lib
from mtl_jax.data import pipeline
from mtl_jax.data import sources as data_sources
from mtl_jax.models import build as models_build
from mtl_jax.pretext import cluster as cluster_lib
from mtl_jax.training import checkpoint as checkpoint_lib
from mtl_jax.training import checks
from mtl_jax.training import distributed
from mtl_jax.training import evaluate as evaluate_lib
from mtl_jax.training import loop
from mtl_jax.training import parallel as parallel_lib
from mtl_jax.training import run_config
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib
from mtl_jax.training import transfer as transfer_lib
from mtl_jax.training import writers

DEFAULT_CONFIG = "experiments/configs/multi_digits.py"
if __name__ == "__main__":  # before the flag reads sys.argv's overrides
  cli.check_command_line(sys.argv, "config", DEFAULT_CONFIG)
_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG,
    "Experiment config file (ml_collections); override fields with "
    "--config.<field>=<value>. --print_config lists the fields and their "
    "values (after the overrides) and exits.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (the --config file "
    "with its --config.<field> overrides) as JSON and exit without training.")
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
              "parallelism", "sharding", "mesh.data", "allow_task_change")
# What may also change with config.allow_task_change: the task set and what
# only concerns it (transfer.continue_state carries the rest over).
TASK_CHANGE_MAY_DIFFER = ("tasks", "task_weights.*", "pretext.*",
                          "data.label_fractions.*", "data.drop_unlabelled",
                          "data.mixture.*")
# Written to the workdir: how the run started (`init_from`) and each change of
# its task set (`allow_task_change`); results.json repeats both.
INIT_FROM_FILE = "init_from.json"
# Model selection's best state (`config.select_by`), and the split name of the
# evaluations on the validation rows.
BEST_DIR = "best"
VALIDATION = "validation"
TASK_CHANGES_FILE = "task_changes.json"
# config.tasks value for no supervised task (e.g. pre-training on pretexts).
NO_TASKS = "none"

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
  encode_decode: bool
  train_mixture: mixture_lib.Mixture
  eval_stream: mixture_lib.EvalStream
  label_counts: dict[str, int]
  param_counts: dict[str, Any]
  num_train_examples: int
  num_unlabelled: int
  parallel: parallel_lib.DataParallel
  validation_stream: mixture_lib.EvalStream | None = None
  validation_counts: dict[str, int] = dataclasses.field(default_factory=dict)
  gradient_cosines: bool = False

  def step_kwargs(self) -> dict[str, Any]:
    """`make_train_step`'s keyword arguments (but `schedule`, `axis_name`)."""
    return dict(aggregator=self.aggregator, rep_grad=self.rep_grad,
                gradient_cosines=self.gradient_cosines,
                chunk_size=self.chunk_size, jacobian=self.jacobian,
                grad_norm_path=self.grad_norm_path,
                pass_task_presence=self.pass_task_presence,
                encode_decode=self.encode_decode)


class _Checked(NamedTuple):
  """What the config gives before any data is read (`check_config`)."""

  architecture: models_build.ArchitectureSpec
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  aggregator: aggregation_lib.Aggregator | None
  parallel: parallel_lib.DataParallel


def _task_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(n.strip() for n in config.tasks.split(",") if n.strip())


def _param_groups(o: ml_collections.ConfigDict) -> list[tuple[str, float]]:
  """`(pattern, lr scale)` of config.optimizer.freeze (scale 0) and
  config.optimizer.lr_scales ("pattern=scale,..."), freeze first."""
  groups = [(p.strip(), 0.0) for p in o.freeze.split(",") if p.strip()]
  for item in o.lr_scales.split(","):
    if not item.strip():
      continue
    pattern, sep, scale = item.partition("=")
    try:
      value = float(scale)
    except ValueError:
      value = None
    if not sep or not pattern.strip() or value is None or not value >= 0:
      raise ValueError(
          f"config.optimizer.lr_scales: {item.strip()!r} is not "
          "'pattern=scale' with a scale >= 0 (e.g. 'shared/*=0.1')")
    groups.append((pattern.strip(), value))
  return groups


def _check_fields(config: ml_collections.ConfigDict) -> None:
  """The dataset's name and options, and the ranges of plain numbers."""
  d = config.data
  data_build.check_dataset_options(d.name, dict(d.options))
  for key in ("batch_size", "eval_batch_size"):
    checks.check_positive_int(f"config.{key}", config[key])
  checks.check_loop_options(
      num_steps=config.num_steps, log_every=config.log_every,
      eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
      max_checkpoints_to_keep=config.max_checkpoints_to_keep,
      max_nonfinite_streak=config.max_nonfinite_streak, prefix="config.")
  checks.check_count("config.seed", config.seed, 0, "a non-negative integer")
  checks.check_number("config.data.validation_fraction",
                      d.validation_fraction, lambda v: 0 <= v < 1, "in [0, 1)")
  checks.check_count("config.data.validation_seed", d.validation_seed, 0,
                     "a non-negative integer")
  if config.select_by and not d.validation_fraction:
    raise ValueError(
        f"config.select_by={config.select_by!r} selects on the validation "
        "split: set config.data.validation_fraction > 0 (the test split "
        "never selects)")
  if config.select_by and config.select_by != "loss" and (
      "/" not in config.select_by):
    raise ValueError(f"config.select_by={config.select_by!r}: expected "
                     "'loss' or a '<task>/<metric>' key, e.g. 'left/accuracy'")
  checks.check_count("config.init_from_step", config.init_from_step, -1,
                     "a step >= 0, or -1 for the latest")
  if config.init_from_step >= 0 and not config.init_from:
    raise ValueError(f"config.init_from_step={config.init_from_step} needs "
                     "config.init_from (the run to start from)")
  checks.check_count("config.data.label_seed", d.label_seed, 0,
                     "a non-negative integer")
  checks.check_count("config.data.prefetch", d.prefetch, 1, "an integer >= 1")
  checks.check_number("config.model.dropout_rate", config.model.dropout_rate,
                      lambda v: 0 <= v < 1, "in [0, 1)")
  data_build.check_label_fractions(dict(d.label_fractions), d.label_seed,
                                   "config.data.label_fractions")
  data_build.check_mixing_options(
      d.mixture.method, composition=d.mixture.composition,
      temperature=d.mixture.temperature, size_cap=d.mixture.size_cap)
  for name, (spec, options) in pretexts_config.make_pretexts(
      config.pretext).items():
    if name == pretexts_config.CLUSTER and spec.bank_size < config.batch_size:
      raise ValueError(
          f"config.pretext.cluster.bank_size={spec.bank_size} must hold at "
          f"least one batch (config.batch_size={config.batch_size})")
    if options["rows"] == "unlabelled" and d.drop_unlabelled:
      raise ValueError(
          f"config.pretext.{name}.rows='unlabelled' trains on the unlabelled "
          "pool, which config.data.drop_unlabelled=True leaves out; set "
          "config.data.drop_unlabelled=False")


def _make_weighting(config: ml_collections.ConfigDict,
                    static_weights: list[float]) -> weighting_lib.Weighting:
  kwargs = methods.method_kwargs(config.weighting, weighting_lib.WEIGHTINGS,
                                 "weighting")
  if config.weighting.name == "static":
    kwargs["weights"] = static_weights
  return weighting_lib.get_weighting(config.weighting.name, **kwargs)


def check_config(config: ml_collections.ConfigDict,
                 horizons: tuple[int, ...] = ()) -> _Checked:
  """Validates the whole config in one pass, before any data is read or any
  parameter created, with the library's checks; returns what needs no data.

  Task names are checked against the dataset's tasks by `build_experiment`,
  right after the dataset is opened and before any mixture is built.
  `horizons`: the learning-rate schedule's recorded cycles when resuming
  (`loop.schedule_horizons`; empty: one cycle over config.num_steps).

  Raises:
    ValueError: an unknown name or an out-of-range value; the message names
      the field.
  """
  _check_fields(config)
  m, o, a = config.model, config.optimizer, config.aggregation
  arch_kwargs = dict(m[m.architecture]) if m.architecture in m else {}
  spec = models_build.check_model_options(
      m.architecture, m.trunk, hyperparameters=arch_kwargs,
      trunk_kwargs=models_build.trunk_kwargs(m.trunk, m.to_dict()))
  optimizer, schedule = checks.build_optimizer(
      o.name, o.learning_rate, schedule=o.schedule,
      total_steps=config.num_steps, warmup_steps=o.warmup_steps,
      momentum=o.momentum, weight_decay=o.weight_decay,
      grad_clip_norm=o.grad_clip_norm, param_groups=_param_groups(o),
      horizons=horizons, prefix="config.optimizer.",
      steps_field="config.num_steps")
  # Static weights are the tasks' (known with the dataset); their values are
  # checked here.
  weighting = _make_weighting(config, [float(w) for w in
                                       dict(config.task_weights).values()])
  aggregator = None
  if a.name != "none":
    aggregator = aggregation_lib.get_aggregator(a.name, **methods.method_kwargs(
        a, aggregation_lib.AGGREGATORS, "aggregation"))
  checks.check_step_options(
      aggregator=aggregator, aggregator_name=a.name, rep_grad=a.rep_grad,
      jacobian=a.get("jacobian", "auto"), chunk_size=a.chunk_size,
      gradient_cosines=a.get("gradient_cosines", False),
      prefix="config.aggregation.")
  if (pretexts_config.CLUSTER in pretexts_config.pretext_names(config.pretext)
      and not spec.step_kwargs(m.input_trunk)["encode_decode"]):
    raise ValueError(
        f"config.pretext.names: the cluster task reads the shared features, "
        f"which architecture {m.architecture!r} does not expose (it needs "
        "encode/decode, e.g. hard_sharing)")
  spec.check_step_options(
      input_trunk=m.input_trunk, rep_grad=a.rep_grad,
      grad_norms_for=(config.weighting.name
                      if "grad_norms" in weighting.needs else None))
  return _Checked(spec, optimizer, schedule, aggregator, make_parallel(config))


def _make_model(config: ml_collections.ConfigDict, tasks: tasks_lib.TaskSet,
                dataset_info: dict[str, Any]) -> Any:
  m = config.model
  return models_build.make_model(
      m.architecture, tasks,
      models_build.make_trunk(m.trunk, **models_build.trunk_kwargs(
          m.trunk, m.to_dict(), dataset_info)),
      head_hidden_sizes=tuple(m.head_hidden_sizes), input_trunk=m.input_trunk,
      **(dict(m[m.architecture]) if m.architecture in m else {}))


def _param_counts(config: ml_collections.ConfigDict, model: Any,
                  tasks: tasks_lib.TaskSet, dataset_info: dict[str, Any],
                  sample: Any) -> dict[str, Any]:
  """This model's parameter counts against one single-task model per task."""
  single = {t.name: models_build.count_params(models_build.abstract_params(
      _make_model(config, tasks.select([t.name]), dataset_info), sample))
            for t in tasks}
  return models_build.param_report(
      models_build.abstract_params(model, sample), single)


def build_experiment(config: ml_collections.ConfigDict,
                     horizons: tuple[int, ...] = ()) -> Experiment:
  """Turns the config into explicit library objects, validating it first.

  Raises:
    ValueError: an unknown name (dataset, task, trunk, architecture,
      optimizer, schedule, weighting, aggregation) or an out-of-range value;
      the message names the field. All but the task names are checked before
      the dataset is opened; those right after, before any mixture is built.
  """
  checked = check_config(config, horizons)
  d, a = config.data, config.aggregation
  dataset = data_build.load_dataset(d.name, data_dir=d.data_dir or None,
                                    options=dict(d.options))
  if config.tasks.strip() == NO_TASKS:
    supervised = tasks_lib.TaskSet([], allow_empty=True)
    if not config.pretext.names.strip():
      raise ValueError(f"config.tasks={NO_TASKS!r} trains no supervised "
                       "task: name pretexts in config.pretext.names")
  else:
    supervised = data_build.select_tasks(dataset.tasks, _task_names(config),
                                         dict(config.task_weights),
                                         weights_field="config.task_weights")
  data_build.check_task_names(dict(d.label_fractions), dataset.tasks.names,
                              "config.data.label_fractions")
  data = data_build.build_data(
      dataset, supervised, batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, seed=config.seed,
      label_fractions=dict(d.label_fractions), label_seed=d.label_seed,
      drop_unlabelled=d.drop_unlabelled, mixing_method=d.mixture.method,
      temperature=d.mixture.temperature, rates=dict(d.mixture.rates),
      size_cap=d.mixture.size_cap, composition=d.mixture.composition,
      fractions_field="config.data.label_fractions",
      validation_fraction=d.validation_fraction,
      validation_seed=d.validation_seed)
  mixture = data.train_mixture
  sample = mixture.batch(mixture.initial_state())[0]["inputs"][:1]
  tasks = _with_pretexts(config, supervised, sample)
  weighting = _make_weighting(config, tasks.static_weights)
  model = _make_model(config, tasks, dataset.info)
  abstract = models_build.abstract_params(model, sample)
  transfer_lib.check_patterns(
      abstract, [p for p, s in _param_groups(config.optimizer) if s == 0],
      "config.optimizer.freeze pattern")
  transfer_lib.check_patterns(
      abstract, [p for p, _ in _param_groups(config.optimizer)],
      "config.optimizer.lr_scales pattern")
  return Experiment(
      tasks=tasks, model=model, optimizer=checked.optimizer,
      schedule=checked.schedule, weighting=weighting,
      aggregator=checked.aggregator, rep_grad=a.rep_grad,
      chunk_size=a.chunk_size or None, jacobian=a.get("jacobian", "auto"),
      gradient_cosines=a.get("gradient_cosines", False),
      **checked.architecture.step_kwargs(config.model.input_trunk),
      train_mixture=mixture, eval_stream=data.eval_stream,
      label_counts=data.label_counts,
      param_counts=_param_counts(config, model, tasks, dataset.info, sample),
      num_train_examples=data.num_train_examples,
      num_unlabelled=data.num_unlabelled, parallel=checked.parallel,
      validation_stream=data.validation_stream,
      validation_counts=data.validation_counts)


def _with_pretexts(config: ml_collections.ConfigDict,
                   supervised: tasks_lib.TaskSet, sample: Any
                   ) -> tasks_lib.TaskSet:
  """The supervised tasks and the config's pretext tasks, checked against
  the inputs' shape (one example of `sample`)."""
  if not config.pretext.names.strip():
    return supervised
  clash = sorted(set(supervised.names) & set(
      pretexts_config.pretext_names(config.pretext)))
  if clash:
    raise ValueError(f"config.pretext.names: pretext task(s) {clash} have "
                     "the name of a supervised task")
  if not hasattr(sample, "shape") or sample.ndim != 4:
    raise ValueError(
        f"config.pretext.names: the vision pretexts need image inputs "
        f"[B, H, W, C]; dataset {config.data.name!r} gives "
        f"{jax.tree.map(lambda x: x.shape, sample)}")
  tasks = tasks_lib.TaskSet([*supervised, *pretexts_config.pretext_tasks(
      config.pretext, sample.shape[1:])])
  tasks.check_pretexts(sample.shape[1:])
  return tasks


def initial_state(exp: Experiment, sample_inputs: Any, seed: int,
                  params: Any = None) -> state_lib.TrainState:
  """The host train state at step 0: params from `seed` (or `params`, e.g.
  restored by `transfer.merge_params`), the methods' states and the
  clustering tasks' state (`exp.parallel.put_state` places it)."""
  rng = jax.random.PRNGKey(seed)
  if params is None:
    params = state_lib.init_params(exp.model, sample_inputs, rng)
  task_state = cluster_lib.init_task_state(
      exp.tasks, lambda x: exp.model.apply({"params": params}, x,
                                           method="encode"),
      sample_inputs)
  return state_lib.create_train_state(
      params, exp.optimizer, exp.weighting, len(exp.tasks),
      jax.random.fold_in(rng, 1), exp.aggregator, task_state)


def compile_train_step(exp: Experiment, state: Any) -> Any:
  """The run's train step, NaN/Inf guarded (`make_train_step`'s default
  `skip_nonfinite=True`), compiled for the placed `state`."""
  par = exp.parallel
  return par.compile_train_step(step_lib.make_train_step(
      exp.model.apply, exp.tasks, exp.optimizer, exp.weighting,
      schedule=exp.schedule, axis_name=par.axis_name,
      **exp.step_kwargs()), state)


def make_parallel(config: ml_collections.ConfigDict
                  ) -> parallel_lib.DataParallel:
  """The device mesh and parallelism of the run; checks the batch sizes."""
  par = parallel_lib.DataParallel(
      parallel_lib.make_mesh(config.mesh.data), parallelism=config.parallelism,
      sharding=config.sharding)
  par.check_batch_size(config.batch_size, "config.batch_size")
  par.check_batch_size(config.eval_batch_size, "config.eval_batch_size")
  return par


def _restore(checkpointer: checkpoint_lib.Checkpointer, exp: Experiment,
             host_state: Any, data_state: Any, workdir: str, is_main: bool,
             allow_task_change: bool) -> tuple[Any, Any]:
  """The placed state and data position to train from: the latest
  checkpoint's, carried over to a changed task set when allowed, or
  `host_state` at the start."""
  par = exp.parallel
  state = par.put_state(host_state)
  latest = checkpointer.latest_step()
  if latest is None:
    return state, data_state
  meta = checkpointer.metadata(latest)
  saved_tasks = tuple(meta["tasks"]) if meta and "tasks" in meta else None
  if saved_tasks is None and allow_task_change:  # saved without metadata
    heads = checkpointer.read(latest)["params"].get(transfer_lib.TASKS, {})
    if set(heads) != set(exp.tasks.names):
      saved_tasks = tuple(heads)
  if saved_tasks is not None and saved_tasks != exp.tasks.names:
    if not allow_task_change:
      raise ValueError(
          f"the checkpoint at step {latest} in {workdir} trains tasks "
          f"{list(saved_tasks)}, the config {list(exp.tasks.names)}; set "
          "config.allow_task_change=True to continue it with this task set")
    return _continue_with_tasks(checkpointer, exp, host_state, workdir,
                                is_main, meta is not None)
  step, restored, data_state = checkpointer.restore_with_data(
      par.for_checkpoint(state))
  state = par.from_checkpoint(restored)
  if data_state is None:
    raise ValueError(f"checkpoint {step} in {workdir} has no data iterator "
                     "state; it cannot be resumed exactly")
  if is_main:  # steps logged after the checkpoint will be logged again
    writers.truncate_jsonl(os.path.join(workdir, writers.JSONL_FILE), step)
  logging.info("resumed from checkpoint at step %d", par.step_of(state))
  return state, data_state


def _continue_with_tasks(checkpointer: checkpoint_lib.Checkpointer,
                         exp: Experiment, host_state: Any, workdir: str,
                         is_main: bool, has_order: bool) -> tuple[Any, Any]:
  """The latest checkpoint carried over to `exp`'s task set
  (`transfer.continue_state`); the data position continues, or restarts at
  the step in the changed mixture's stream (`Mixture.state_at`)."""
  step, old = checkpointer.read_latest()
  meta = checkpointer.metadata(step) if has_order else None
  old_tasks = tuple(meta["tasks"]) if meta and "tasks" in meta else None
  host, change = transfer_lib.continue_state(host_state, old, old_tasks,
                                             exp.tasks.names)
  data_state = checkpointer.data_state(step)
  mixture = exp.train_mixture
  try:
    mixture.check_state(data_state)
    data = "continued"
  except ValueError:  # the task set changed the mixture's components
    data_state = mixture.state_at(step)
    data = "the changed mixture's stream at this step"
  record = {**change.to_json(), "data_position": data}
  logging.info(
      "continued the checkpoint at step %d with task set %s: added %s, "
      "removed %s; %d param arrays restored, %d initialised; optimizer "
      "state: %d leaves continued, %d initialised; method states %s; data "
      "position: %s", step, list(exp.tasks.names), list(change.added),
      list(change.removed), len(change.params.restored),
      len(change.params.initialised), change.opt_state_continued,
      change.opt_state_initialised, change.method_states, data)
  if is_main:
    path = os.path.join(workdir, TASK_CHANGES_FILE)
    history = _read_json(path, [])
    _write_json(path, [h for h in history if h["step"] < step] + [record])
    writers.truncate_jsonl(os.path.join(workdir, writers.JSONL_FILE), step)
  return exp.parallel.put_state(host), data_state


def _init_from(config: ml_collections.ConfigDict, exp: Experiment,
               host_state: Any, sample_inputs: Any) -> tuple[Any, Any]:
  """`host_state` with config.init_from's shared params and common heads
  (`transfer.merge_params`), and the report for `INIT_FROM_FILE`."""
  step, source = transfer_lib.read_params(
      config.init_from,
      None if config.init_from_step < 0 else config.init_from_step)
  params, report = transfer_lib.merge_params(host_state.params, source)
  state = initial_state(exp, sample_inputs, config.seed, params=params)
  record = {"path": os.path.abspath(config.init_from), "step": step,
            "restored": list(report.restored),
            "initialised": list(report.initialised),
            "unused": list(report.unused)}
  logging.info(
      "init_from %s (step %d): %d param arrays restored; initialised: %s; "
      "not used: %s", record["path"], step, len(report.restored),
      _prefixes(report.initialised) or "none", _prefixes(report.unused)
      or "none")
  return state, record


def _prefixes(paths: Any) -> str:
  """`tasks/sum (4 arrays), ...`: paths grouped by their first two parts."""
  groups: dict[str, int] = {}
  for p in paths:
    key = "/".join(p.split("/")[:2])
    groups[key] = groups.get(key, 0) + 1
  return ", ".join(f"{k} ({n} arrays)" for k, n in groups.items())


def _train(config: ml_collections.ConfigDict, exp: Experiment, state: Any,
           data_state: Any, checkpointer: checkpoint_lib.Checkpointer,
           workdir: str, is_main: bool
           ) -> tuple[Any, dict[str, float], dict[str, Any]]:
  """Runs the training loop to `config.num_steps`.

  With a validation split, the loop's evaluations use it (model selection
  by `config.select_by` keeps the best state in `<workdir>/best`) and the
  test split is evaluated once, at the end, with the selected params;
  without one, the evaluations use the test split.

  Returns:
    `(final state, test metrics, held-out record)`: the record has the last
    validation metrics and the selection (`{}` without a validation split).
  """
  par = exp.parallel
  train_step = compile_train_step(exp, state)
  writer = writers.MetricWriter(workdir, enabled=is_main)
  writer.write_hparams(hyperparameters(config))
  make = functools.partial(evaluate_lib.make_evaluate, exp.model.apply,
                           exp.tasks, parallel=par, params_like=state.params)
  evaluate_test = make(exp.eval_stream)
  validating = exp.validation_stream is not None
  watched = make(exp.validation_stream) if validating else evaluate_test
  selection = (_Selection(config.select_by, exp, workdir, par.step_of(state))
               if config.select_by else None)
  batches = pipeline.Prefetcher(exp.train_mixture.iterator(data_state),
                                size=config.data.prefetch,
                                transform=par.put_batch)
  try:
    state, last_eval = loop.train_loop(
        state=state, train_step=train_step, batches=batches,
        num_steps=config.num_steps, task_names=exp.tasks.names, writer=writer,
        evaluate=watched, checkpointer=checkpointer, log_every=config.log_every,
        eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
        parallel=par, max_nonfinite_streak=config.max_nonfinite_streak,
        eval_split=VALIDATION if validating else "eval",
        on_eval=selection.update if selection else None)
    if last_eval is None:  # resumed a finished run: evaluate its final state
      last_eval = watched(state.params)
    if not validating:
      return state, last_eval, {}
    record = {"validation": last_eval}
    params = state.params
    if selection is not None:
      record["selection"] = selection.record
      params = selection.best_params(state)
    test = evaluate_test(params)  # the only test-split evaluation
    writer.write(par.step_of(state), test, split="test")
    return state, test, record
  finally:  # also on an error or pre-emption: stop reading, flush, wait
    batches.close()
    writer.close()
    if selection is not None:
      selection.close()


class _Selection:
  """Model selection on the validation split: the state of the best
  evaluation by `select_by` so far, kept in `<workdir>/best` with its record
  (step, value, validation metrics) so that a resumed run continues it."""

  def __init__(self, select_by: str, exp: Experiment, workdir: str,
               start_step: int):
    self.select_by, self.par = select_by, exp.parallel
    self.weights = {t.name: t.weight for t in exp.tasks.supervised}
    self.lower = select_by == "loss" or stats.lower_is_better(select_by)
    self.checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, BEST_DIR), max_to_keep=1)
    self.record = None
    step = self.checkpointer.latest_step()
    if step is not None and step > start_step:
      self.checkpointer.delete(step)  # a step that the resumed run redoes
    elif step is not None:
      self.record = self.checkpointer.data_state(step)

  def _score(self, metrics: dict[str, float]) -> float:
    if self.select_by == "loss":
      return sum(w * metrics[f"{t}/loss"] for t, w in self.weights.items())
    if self.select_by not in metrics:
      raise ValueError(
          f"config.select_by={self.select_by!r} is not a validation metric; "
          f"valid: loss, {', '.join(sorted(k for k in metrics if not k.endswith('/count')))}")
    return metrics[self.select_by]

  def update(self, step: int, metrics: dict[str, float], state: Any) -> None:
    value = float(self._score(metrics))
    if not np.isfinite(value):
      return
    best = self.record
    if best is None or (value < best["value"] if self.lower
                        else value > best["value"]):
      self.record = {"step": step, "select_by": self.select_by,
                     "value": value, "validation": dict(metrics)}
      self.checkpointer.save(step, self.par.for_checkpoint(state),
                             data_state=self.record)

  def best_params(self, state_like: Any) -> Any:
    self.checkpointer.wait()
    restored = self.checkpointer.restore(self.par.for_checkpoint(state_like),
                                         step=self.record["step"])
    return self.par.from_checkpoint(restored).params

  def close(self) -> None:
    self.checkpointer.close()


def summary(config: ml_collections.ConfigDict, exp: Experiment
            ) -> dict[str, Any]:
  """What a run is, in a few words: printed at its start (`--workdir`
  added), kept in results.json (`"run"`) and in every line of runs.jsonl."""
  m, a = config.model, config.aggregation
  par = exp.parallel
  return {
      "dataset": config.data.name,
      "architecture": m.architecture, "trunk": m.trunk,
      "weighting": config.weighting.name,
      "aggregation": a.name + (" (rep_grad)" if a.rep_grad else ""),
      "tasks": list(exp.tasks.names),
      "num_devices": par.num_devices,
      "device_kind": jax.devices()[0].device_kind,
      "num_processes": jax.process_count(),
      "parallelism": config.parallelism, "sharding": config.sharding,
  }


def hyperparameters(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's main hyperparameters, flattened (for TensorBoard): the
  run's size, data, model, optimizer, and the options of its weighting and
  aggregation only (not every method's block)."""
  m, w, a = config.model, config.weighting.name, config.aggregation.name
  keep = ("seed", "tasks", "batch_size", "num_steps", "parallelism",
          "sharding", "mesh.data", "data.name", "data.options.",
          "data.label_fractions.", "data.validation_fraction",
          "model.architecture", "model.trunk", "model.hidden_sizes",
          "model.head_hidden_sizes", "model.dropout_rate",
          f"model.{m.architecture}.", "optimizer.", "weighting.name",
          f"weighting.{w}.", "aggregation.name", "aggregation.rep_grad",
          f"aggregation.{a}.", "task_weights.", "pretext.names")
  return {k: v for k, v in run_config.flatten(config.to_dict()).items()
          if any(k == p or (p.endswith(".") and k.startswith(p))
                 for p in keep)}


def _start_record(config: ml_collections.ConfigDict, exp: Experiment,
                  checkpoint_dir: str, command_line: list[str] | None
                  ) -> dict[str, Any]:
  """One line of runs.jsonl (without the config or its changes)."""
  steps = transfer_lib.checkpoint_steps(checkpoint_dir)
  return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "command_line": command_line,
          "start_step": max(steps) if steps else 0,
          "num_steps": config.num_steps, "mesh_data": config.mesh.data,
          "platform": jax.devices()[0].platform, **summary(config, exp)}


def run(config: ml_collections.ConfigDict, workdir: str, *,
        command_line: list[str] | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the results dict.

  `command_line`: the arguments the run was started with, recorded in
  runs.jsonl (None: not started from the command line).
  """
  start_time = time.perf_counter()
  checkpoint_dir = os.path.join(workdir, transfer_lib.CHECKPOINT_DIR)
  # The schedule's cycles recorded by the run (a new one when extended).
  horizons = loop.schedule_horizons(checkpoint_dir, config.num_steps)
  exp = build_experiment(config, tuple(horizons))  # validates before compiling
  par = exp.parallel
  is_main = jax.process_index() == 0  # only process 0 logs and writes files
  data_state = exp.train_mixture.initial_state()
  sample, _ = exp.train_mixture.batch(data_state)
  host_state = initial_state(exp, sample["inputs"], config.seed)
  init_record = None
  if config.init_from and not transfer_lib.checkpoint_steps(checkpoint_dir):
    # Before anything is written: a bad path or a misfit fails cleanly.
    host_state, init_record = _init_from(config, exp, host_state,
                                         sample["inputs"])
  run_config.check_writable(workdir)
  changed = run_config.check_or_write(
      workdir, config.to_dict(),
      MAY_DIFFER + (TASK_CHANGE_MAY_DIFFER if config.allow_task_change
                    else ()), write=is_main)
  start = _start_record(config, exp, checkpoint_dir, command_line)
  if is_main:
    run_config.append_start(workdir, start, config.to_dict(), changed)
  logging.info(
      "run: %s on %s (%s trunk); weighting %s, aggregation %s; tasks %s; "
      "%d %s device(s), %d process(es), %s (%s); steps %d -> %d; workdir %s",
      start["dataset"], start["architecture"], start["trunk"],
      start["weighting"], start["aggregation"], ",".join(start["tasks"]),
      start["num_devices"], start["device_kind"], start["num_processes"],
      start["parallelism"], start["sharding"], start["start_step"],
      config.num_steps, os.path.abspath(workdir))
  if init_record is not None and is_main:
    _write_json(os.path.join(workdir, INIT_FROM_FILE), init_record)
  logging.info("tasks %s; labelled training examples %s; unlabelled pool %d "
               "of %d", exp.tasks.names, exp.label_counts, exp.num_unlabelled,
               exp.num_train_examples)

  checkpointer = checkpoint_lib.Checkpointer(
      checkpoint_dir, max_to_keep=config.max_checkpoints_to_keep,
      metadata={"tasks": list(exp.tasks.names),
                loop.HORIZONS_KEY: horizons})
  try:
    state, data_state = _restore(checkpointer, exp, host_state, data_state,
                                 workdir, is_main, config.allow_task_change)
    state, final_eval, held_out = _train(config, exp, state, data_state,
                                         checkpointer, workdir, is_main)
  finally:
    checkpointer.close()

  history = run_config.read_history(workdir)
  results = {
      "run": summary(config, exp),
      # This start's time, from reading the config to the results; `starts`
      # counts the run's starts (runs.jsonl holds each).
      "wall_time_sec": time.perf_counter() - start_time,
      "starts": len(history),
      "first_start": history[0]["time"] if history else None,
      "steps": par.step_of(state),
      "num_devices": par.num_devices,
      "num_processes": jax.process_count(),
      "eval": final_eval,
      "label_counts": exp.label_counts,
      # This model against K single-task models of the same backbone.
      "params": exp.param_counts,
      "num_train_examples": exp.num_train_examples,
      "num_unlabelled": exp.num_unlabelled,
      "init_from": _read_json(os.path.join(workdir, INIT_FROM_FILE), None),
      "task_changes": _read_json(os.path.join(workdir, TASK_CHANGES_FILE),
                                 []),
      **held_out,
  }
  if exp.validation_stream is not None:
    results["validation_counts"] = exp.validation_counts
  if is_main:
    _write_outputs(workdir, exp, results)
  return results


def _write_outputs(workdir: str, exp: Experiment,
                   results: dict[str, Any]) -> None:
  """results.json, curves.png and the printed test metrics."""
  final_eval = results["eval"]
  _write_json(os.path.join(workdir, "results.json"), results)
  eval_keys = tuple(k for k in sorted(final_eval)
                    if k.split("/")[1] in ("accuracy", "f1", "mae", "psnr"))
  writers.plot_curves(os.path.join(workdir, writers.JSONL_FILE),
                      os.path.join(workdir, "curves.png"), exp.tasks.names,
                      eval_keys, eval_split=VALIDATION if
                      exp.validation_stream is not None else "eval")
  print("eval metrics (test split; results.json \"eval\"):", json.dumps(
      {k: round(v, 4) for k, v in sorted(final_eval.items())}, indent=1))


def _read_json(path: str, default: Any) -> Any:
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)  # readers never see a half-written file


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _PRINT_CONFIG.value:
    print(config_json(_CONFIG.value))
    return
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
  # Orbax logs every step of every save at INFO, TFDS each dataset it opens,
  # JAX the backends it does not find (TPU), optax a constant schedule: keep
  # the console for progress; their warnings and errors still show.
  logging.get_absl_handler().addFilter(_quiet)
  try:
    run(_CONFIG.value, _WORKDIR.value, command_line=sys.argv[1:])
  except loop.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)  # 128 + SIGTERM, as if the signal had ended the process
  except data_sources.NotPreparedError as e:
    # Missing data is the user's to fix: its message (what was looked for,
    # the command that prepares it), not a traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


# Modules whose INFO lines are left off the console (`main`).
QUIET_INFO = ("orbax", "tensorflow_datasets", "xla_bridge.py", "optax")


def _quiet(record: std_logging.LogRecord) -> bool:
  """False (drop) for an INFO or DEBUG line of a `QUIET_INFO` module."""
  return record.levelno >= std_logging.WARNING or not any(
      name in record.pathname for name in QUIET_INFO)


def config_json(config: ml_collections.ConfigDict) -> str:
  """The config as `--print_config` shows it: JSON, keys sorted."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run`'s flags parser: a config mistake is one line, exit code 2."""
  return cli.parse_flags(argv, "config", DEFAULT_CONFIG)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
