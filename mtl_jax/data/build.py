"""An experiment's data from explicit arguments: a catalog dataset, its tasks,
the training mixture (partial labels, unlabelled pool, mixing rates) and the
evaluation stream.

The checks that need no data (`check_dataset_options`, `check_label_fractions`,
`check_mixing_options`) run before anything is read; `select_tasks` and
`build_data` check the task names against the dataset's tasks, which
`load_dataset` gives before any mixture is built. Errors name the argument;
`field` arguments let a caller name it as its own config does (e.g.
"config.data.label_fractions").

  dataset = load_dataset("multi_digits", options={"builder_config": "small"})
  tasks = select_tasks(dataset.tasks, ["left", "sum"], {"sum": 0.5})
  data = build_data(dataset, tasks, batch_size=128, eval_batch_size=512,
                    seed=0, label_fractions={"left": 0.5})
  data.train_mixture, data.eval_stream, data.label_counts
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import inspect
import math
import zlib
from typing import Any, NamedTuple

import jax
from jax.experimental import multihost_utils
import numpy as np

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import catalog
from mtl_jax.data import mixture as mixture_lib
from mtl_jax.data import multi_digits


class DataSplits(NamedTuple):
  """What `build_data` returns.

  Attributes:
    train_mixture: the training `Mixture` (this host's rows of each batch).
    eval_stream: the held-out `EvalStream`.
    label_counts: `{task: labelled training examples}`.
    num_train_examples: training rows, labelled or not.
    num_unlabelled: training rows left with no label (dropped or mixed in).
    validation_stream: the validation rows carved from the labelled training
      rows (`validation_fraction`), None without.
    validation_counts: `{task: labelled validation examples}` ({} without).
  """

  train_mixture: mixture_lib.Mixture
  eval_stream: mixture_lib.EvalStream
  label_counts: dict[str, int]
  num_train_examples: int
  num_unlabelled: int
  validation_stream: mixture_lib.EvalStream | None = None
  validation_counts: dict[str, int] = {}


def split_validation(component: mixture_lib.Component, fraction: float,
                     seed: int) -> tuple[mixture_lib.Component,
                                         mixture_lib.Component]:
  """`(train, validation)`: a seeded `fraction` of `component`'s rows
  (`round(fraction * rows)`, a permutation seeded by `seed` and the
  component's name) held out, keeping their labels and label masks, so the
  validation rows of a task are labelled where its training rows would be
  (label fractions included)."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"validation fraction must be in [0, 1), got "
                     f"{fraction!r}")
  rows = component.indices
  order = np.random.default_rng(
      [seed, zlib.crc32(component.name.encode())]).permutation(len(rows))
  held = np.zeros(len(rows), bool)
  held[order[:int(round(fraction * len(rows)))]] = True
  return (dataclasses.replace(component, indices=rows[~held]),
          dataclasses.replace(component, name=component.name + "/validation",
                              indices=rows[held]))


def check_dataset_options(name: str, options: Mapping[str, Any]) -> None:
  """Checks a dataset's name and option names, reading nothing.

  Raises:
    ValueError: unknown dataset (lists the valid ones) or option.
  """
  if name not in catalog.DATASETS:
    raise ValueError(f"unknown dataset {name!r}; valid: "
                     f"{', '.join(sorted(catalog.DATASETS))}")
  fn = catalog.DATASETS[name]
  valid = [p.name for p in inspect.signature(fn).parameters.values()
           if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "data_dir"]
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f"dataset {name!r} has no option(s) {unknown}; valid: "
                     f"{', '.join(valid)}")


def check_label_fractions(fractions: Mapping[str, float], label_seed: int,
                          field: str = "label_fractions") -> None:
  """Checks the kept-label fractions (each in [0, 1]) and their seed."""
  if isinstance(label_seed, bool) or not isinstance(label_seed, int) or (
      label_seed < 0):
    raise ValueError(f"the label seed must be a non-negative integer, got "
                     f"{label_seed!r}")
  for task, fraction in fractions.items():
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or (
        not 0.0 <= fraction <= 1.0):  # also rejects NaN
      raise ValueError(f"{field}: label fraction for task {task!r} must be in "
                       f"[0, 1], got {fraction!r}")


def check_mixing_options(method: str = "proportional", *,
                         composition: str = "sampled",
                         temperature: float = 1.0, size_cap: int = 0) -> None:
  """Checks the mixing options of `build_data` (component names excepted).

  Raises:
    ValueError: unknown method or composition, temperature <= 0 (method
      "temperature"), size_cap < 0.
  """
  if method not in mixture_lib.RATE_METHODS:
    raise ValueError(f"unknown mixing method {method!r}; valid: "
                     f"{', '.join(mixture_lib.RATE_METHODS)}")
  if composition not in mixture_lib.COMPOSITIONS:
    raise ValueError(f"unknown composition {composition!r}; valid: "
                     f"{', '.join(mixture_lib.COMPOSITIONS)}")
  if method == "temperature" and not (math.isfinite(temperature)
                                      and temperature > 0):
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not isinstance(size_cap, int) or size_cap < 0:
    raise ValueError(f"size_cap must be an integer >= 0 (0: no cap), got "
                     f"{size_cap!r}")


def load_dataset(name: str, *, data_dir: str | None = None,
                 options: Mapping[str, Any] | None = None) -> catalog.Dataset:
  """Opens catalog dataset `name` (`catalog.get_dataset`).

  In a multi-process run, process 0 prepares the embedded multi_digits data
  first, so that processes sharing a filesystem do not race on the same
  files; the others then find them (or, on a host-local disk, prepare their
  own copy).
  """
  options = dict(options or {})
  check_dataset_options(name, options)
  if name == "multi_digits" and jax.process_count() > 1:
    if jax.process_index() == 0:
      multi_digits.prepare(data_dir, options.get("builder_config", "default"))
    multihost_utils.sync_global_devices("multi_digits prepared")
  return catalog.get_dataset(name, data_dir=data_dir, **options)


def check_task_names(mapping: Mapping[str, Any], valid: Sequence[str],
                     field: str) -> None:
  """Raises ValueError naming the keys of `mapping` that are not tasks."""
  unknown = sorted(set(mapping) - set(valid))
  if unknown:
    raise ValueError(f"{field} names unknown task(s) {unknown}; valid "
                     f"tasks: {', '.join(valid)}")


def select_tasks(available: tasks_lib.TaskSet, names: Sequence[str] = (),
                 weights: Mapping[str, float] | None = None, *,
                 weights_field: str = "task_weights") -> tasks_lib.TaskSet:
  """The tasks `names` of `available` (all when empty), with static weights.

  Args:
    available: the dataset's tasks.
    names: the tasks to train, in order; () for all of them.
    weights: `{task: static loss weight}`; a task not named gets 1.0.
    weights_field: how `weights` is named in errors.

  Raises:
    KeyError: an unknown task in `names` (lists the valid ones).
    ValueError: an unknown task in `weights`.
  """
  weights = dict(weights or {})
  check_task_names(weights, available.names, weights_field)
  tasks = available.select(tuple(names) or available.names)
  return tasks_lib.TaskSet([dataclasses.replace(
      t, weight=float(weights.get(t.name, 1.0))) for t in tasks])


def label_count(component: mixture_lib.Component, task: str) -> int:
  """Rows of `component` that keep their `task` label."""
  if task in component.label_keep:
    return int(component.label_keep[task][component.indices].sum())
  return component.num_rows


def _split_labels(dataset: catalog.Dataset, tasks: tasks_lib.TaskSet,
                  fractions: Mapping[str, float], label_seed: int):
  labelled, unlabelled = [], []
  for component in dataset.train:
    component = mixture_lib.restrict(component, tasks.names)
    kept, rest = mixture_lib.split_by_label_fraction(component, fractions,
                                                     label_seed)
    labelled.append(kept)
    unlabelled.append(rest)
  return labelled, unlabelled


def build_data(dataset: catalog.Dataset, tasks: tasks_lib.TaskSet, *,
               batch_size: int, eval_batch_size: int, seed: int,
               label_fractions: Mapping[str, float] | None = None,
               label_seed: int = 0, drop_unlabelled: bool = True,
               mixing_method: str = "proportional", temperature: float = 1.0,
               rates: Mapping[str, float] | None = None, size_cap: int = 0,
               composition: str = "sampled",
               fractions_field: str = "label_fractions",
               validation_fraction: float = 0.0,
               validation_seed: int = 0) -> DataSplits:
  """The training mixture and the eval stream of `tasks` on `dataset`.

  Each training component keeps its labels on `label_fractions` of its rows
  (per task, seeded by `label_seed`); rows left with no label form an
  unlabelled component, dropped when `drop_unlabelled`. This process reads
  its share of every global batch (`jax.process_index()` of
  `jax.process_count()`).

  Args:
    dataset: a catalog dataset (`load_dataset`).
    tasks: the tasks to train (`select_tasks`), a subset of the dataset's.
    batch_size, eval_batch_size: global batch sizes.
    seed: the mixture's sampling seed.
    label_fractions: `{task: kept fraction in [0, 1]}`; a task not named keeps
      all its labels.
    label_seed: seed of the kept subsets.
    drop_unlabelled: leave the rows with no label out of the mixture.
    mixing_method, temperature, rates, size_cap: `mixture.mixing_rates`'s
      method and options (size_cap 0: no cap).
    composition: "sampled" or "fixed" (`mixture.Mixture`).
    fractions_field: how `label_fractions` is named in errors.
    validation_fraction: the share of each labelled training component held
      out as the validation stream (`split_validation`; 0: none). The
      unlabelled pool keeps all its rows.
    validation_seed: seed of the held-out rows.

  Raises:
    ValueError: an unknown task in `label_fractions`, a bad option, or no
      training example left.
  """
  fractions = dict(label_fractions or {})
  check_task_names(fractions, dataset.tasks.names, fractions_field)
  check_label_fractions(fractions, label_seed, fractions_field)
  check_mixing_options(mixing_method, composition=composition,
                       temperature=temperature, size_cap=size_cap)
  labelled, unlabelled = _split_labels(dataset, tasks, fractions, label_seed)
  validation = []
  if validation_fraction:
    pairs = [split_validation(c, validation_fraction, validation_seed)
             for c in labelled]
    labelled = [train for train, _ in pairs]
    validation = [held for _, held in pairs if held.num_rows]
  provided = [(c, mixture_lib.labelled_tasks(c)) for c in labelled]
  label_counts = {t: sum(label_count(c, t) for c, p in provided if t in p)
                  for t in tasks.names}
  num_unlabelled = sum(c.num_rows for c in unlabelled)
  components = [c for c in labelled if c.num_rows]
  if not drop_unlabelled:
    components += [c for c in unlabelled if c.num_rows]
  if not components:
    raise ValueError(f"{fractions_field} leave no labelled training example "
                     "(and drop_unlabelled drops the rest)")
  mixing = mixture_lib.mixing_rates(
      {c.name: c.num_rows for c in components}, mixing_method,
      temperature=temperature, rates=dict(rates or {}),
      size_cap=size_cap or None)
  hosts = dict(num_host_shards=jax.process_count(),
               host_index=jax.process_index())
  train_mixture = mixture_lib.Mixture(
      components, tasks, batch_size=batch_size, seed=seed, rates=mixing,
      composition=composition, **hosts)
  eval_stream = mixture_lib.EvalStream(
      [mixture_lib.restrict(c, tasks.names) for c in dataset.eval], tasks,
      batch_size=eval_batch_size, **hosts)
  num_train = sum(c.num_rows for c in labelled) + num_unlabelled
  validation_stream, validation_counts = None, {}
  if validation:
    validation_stream = mixture_lib.EvalStream(
        validation, tasks, batch_size=eval_batch_size, **hosts)
    validation_counts = {
        t: sum(label_count(c, t) for c in validation
               if t in mixture_lib.labelled_tasks(c)) for t in tasks.names}
  return DataSplits(train_mixture, eval_stream, label_counts, num_train,
                    num_unlabelled, validation_stream, validation_counts)
