"""Task mixtures: several labelled sources and unlabelled pools, one batch stream.

In multi-task learning each supervised task often has its own, small labelled
dataset, while unlabelled data of the same modality is plentiful. A `Mixture`
turns such sources into one stream of fixed-shape batches in the batch format
of docs/design.md: every batch has a label and a mask for every task, and an example
carries mask 1 only for the tasks its source labels (the others are filled with
zeros and mask 0).

Pieces:
  * `Component`: a source (`sources.Source`), the conversion of its raw features
    to `{"inputs", "labels", "masks"}` for the tasks it labels (per-source
    preprocessing to the common input spec happens here, e.g. with
    `preprocess.ImageSpec`), optionally a subset of its rows and, for
    semi-supervised studies, which labels to keep (`label_fraction_masks`).
  * `mixing_rates`: explicit, proportional to size, uniform, or
    temperature-scaled rates (T5's `rate ∝ min(n, cap) ** (1 / T)`).
  * `Mixture`: draws each global batch from the components by the rates,
    deterministically for a seed. Its position is a small JSON-able state
    (`{"step", "positions"}`) that is saved with the model and restored exactly.
  * `EvalStream`: walks the rows of some components once, in order, in
    fixed-shape batches padded with mask-0 rows.

Sampling. Component i has `n_i` rows and rate `p_i`; it is read as an endless
stream of epochs, each a fresh permutation of its rows seeded by
`(seed, crc32(name), epoch)`, so within an epoch no row repeats and adding or
removing another component never changes a component's own order. The global
batch at `step` takes `c_i` examples from component i, the next `c_i` of its
stream, where
  * composition "sampled": `c ~ Multinomial(B, p)` (independent per batch);
  * composition "fixed": `c_i = floor(B p_i)` plus one of the `B - sum floor`
    remaining slots with probability `frac(B p_i)` (systematic sampling), so
    every batch holds `B p_i` examples of component i up to one, and
    `E[c_i] = B p_i` exactly in both modes.
The B examples are then shuffled (seeded by `(seed, step)`), and host h of H
takes slots `[h B / H, (h + 1) B / H)`: hosts see disjoint parts that together
are exactly the global batch, and each host reads only its own examples. The
state is the same on every host, and a run may resume on a different number
of hosts.

This follows grain's random-access design (a position, not a buffer, is the
state), but vectorises each batch's gathers and conversions in numpy instead of
calling Python per example.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import sources as sources_lib

Batch = dict[str, Any]
Converter = Callable[[sources_lib.Features], Batch]

RATE_METHODS = ("explicit", "proportional", "uniform", "temperature")
COMPOSITIONS = ("sampled", "fixed")


# --------------------------------------------------------------------------
# Components, rates and label fractions.


@dataclasses.dataclass(frozen=True, eq=False)
class Component:
  """One source of a mixture and how its examples become batch rows.

  Attributes:
    name: unique within a mixture; seeds the component's order and names it in
      errors and in the iterator state.
    source: the rows (`sources.ArraySource`, `sources.TfdsSource`, ...).
    convert: raw features of n rows -> `{"inputs": [n, ...], "labels": {task:
      [n, ...]}, "masks": {task: [n] or [n, ...]}}` for the tasks this source
      labels (possibly none: an unlabelled pool returns empty dicts). Inputs of
      all components of a mixture must share one spec (shape and dtype).
    indices: rows of `source` to draw from (default: all). A row listed twice
      is drawn twice per epoch.
    label_keep: task -> bool/0-1 array over ALL rows of `source`: where it is
      0 the task's mask is set to 0 (see `label_fraction_masks`).
  """

  name: str
  source: sources_lib.Source
  convert: Converter
  indices: np.ndarray | None = None
  label_keep: Mapping[str, np.ndarray] | None = None

  def __post_init__(self):
    if not self.name:
      raise ValueError("a mixture component needs a non-empty name")
    size = len(self.source)
    rows = (np.arange(size, dtype=np.int64) if self.indices is None else
            sources_lib.check_indices(self.indices, size, self.name))
    object.__setattr__(self, "indices", rows)
    keep = {}
    for task, k in (self.label_keep or {}).items():
      k = np.asarray(k)
      if k.shape != (size,):
        raise ValueError(f"component {self.name!r}: label_keep[{task!r}] has "
                         f"shape {k.shape}, expected ({size},), one entry per "
                         "row of the source")
      keep[task] = k > 0
    object.__setattr__(self, "label_keep", keep)

  @property
  def num_rows(self) -> int:
    return len(self.indices)


def _identity(raw):
  return raw


def array_component(name: str, arrays: Mapping[str, Any],
                    indices: np.ndarray | None = None) -> Component:
  """A component over in-memory arrays already in the batch format.

  Args:
    name: the component's name.
    arrays: `{"inputs": [N, ...], "labels": {task: ...}, "masks": {task:
      ...}}` numpy arrays (e.g. a whole split).
    indices: rows to draw from (default all).
  """
  return Component(name, sources_lib.ArraySource(name, arrays), _identity,
                   indices=indices)


def mixing_rates(sizes: Mapping[str, int], method: str = "proportional", *,
                 temperature: float = 1.0,
                 rates: Mapping[str, float] | None = None,
                 size_cap: int | None = None) -> dict[str, float]:
  """Sampling rates of mixture components, normalised to sum to 1.

  Args:
    sizes: component name -> number of rows.
    method: "explicit" (`rates`, normalised), "proportional" (`n_i`),
      "uniform" (equal), or "temperature" (`min(n_i, size_cap) ** (1 / T)`,
      as in T5: T=1 is proportional, T -> inf uniform).
    temperature: T > 0, for "temperature".
    rates: name -> non-negative rate for "explicit" (every component named).
    size_cap: caps each size before "proportional"/"temperature" (T5's K).

  Returns:
    name -> rate, in the order of `sizes`.

  Raises:
    ValueError: unknown method, missing or unknown names, negative, non-finite
      or all-zero rates, temperature <= 0, size_cap < 1.
  """
  if method not in RATE_METHODS:
    raise ValueError(f"unknown mixing method {method!r}; valid: "
                     f"{', '.join(RATE_METHODS)}")
  if not sizes:
    raise ValueError("mixing_rates needs at least one component")
  names = list(sizes)
  if size_cap is not None and size_cap < 1:
    raise ValueError(f"size_cap must be >= 1, got {size_cap}")
  if method == "explicit":
    rates = dict(rates or {})
    unknown = sorted(set(rates) - set(names))
    missing = [n for n in names if n not in rates]
    if unknown or missing:
      raise ValueError(f"explicit rates must name every component exactly: "
                       f"unknown {unknown}, missing {missing}; components: "
                       f"{', '.join(names)}")
    raw = np.array([float(rates[n]) for n in names])
  else:
    n = np.array([float(sizes[k]) for k in names])
    if size_cap is not None:
      n = np.minimum(n, size_cap)
    if method == "uniform":
      raw = np.ones_like(n)
    elif method == "proportional":
      raw = n
    else:
      if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
      raw = n ** (1.0 / temperature)
  if not np.all(np.isfinite(raw)) or np.any(raw < 0) or raw.sum() <= 0:
    raise ValueError(f"rates must be finite, >= 0 and not all 0, got "
                     f"{dict(zip(names, raw.tolist()))}")
  raw = raw / raw.sum()
  return {k: float(v) for k, v in zip(names, raw)}


def label_fraction_masks(num_examples: int, fractions: Mapping[str, float],
                         seed: int) -> dict[str, np.ndarray]:
  """Chooses, per task, which examples keep that task's label.

  Task `t` with fraction `f` keeps exactly `round(f * N)` examples (Python's
  round: halves go to the even integer), the first ones of the permutation
  `np.random.default_rng([seed, crc32(t)]).permutation(N)`. The subset depends
  only on (seed, task name, f, N): adding, removing or changing another task
  leaves it unchanged, different tasks get different overlapping subsets, and
  raising `f` only adds examples (the subsets are nested).

  Args:
    num_examples: N, the number of examples (rows of a source).
    fractions: task name -> kept fraction in [0, 1].
    seed: non-negative integer seed.

  Returns:
    task name -> float32 [N], 1.0 where the label is kept.

  Raises:
    ValueError: a fraction outside [0, 1] (or NaN), negative N or seed.
  """
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}")
  if seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed}")
  masks = {}
  for task, fraction in fractions.items():
    if not 0.0 <= fraction <= 1.0:  # also rejects NaN
      raise ValueError(f"label fraction for task {task!r} must be in [0, 1], "
                       f"got {fraction!r}")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])
    chosen = rng.permutation(num_examples)[:int(round(fraction * num_examples))]
    mask = np.zeros(num_examples, dtype=np.float32)
    mask[chosen] = 1.0
    masks[task] = mask
  return masks


def unlabelled_indices(masks: Mapping[str, np.ndarray]) -> np.ndarray:
  """Sorted int64 indices of the examples that no mask labels.

  Raises:
    ValueError: no masks, or masks of different lengths.
  """
  if not masks:
    raise ValueError("unlabelled_indices needs at least one task mask")
  lengths = {task: np.shape(m)[0] for task, m in masks.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"masks have different lengths: {lengths}")
  labelled = np.any(np.stack([np.asarray(m) > 0 for m in masks.values()]),
                    axis=0)
  return np.flatnonzero(~labelled).astype(np.int64)


def labelled_tasks(component: Component) -> tuple[str, ...]:
  """The tasks `component` labels (read from its first row)."""
  if not component.num_rows:
    return ()
  part = component.convert(component.source.read(component.indices[:1]))
  return tuple(part.get("labels", {}))


def restrict(component: Component, task_names: Sequence[str]) -> Component:
  """`component` labelling only the tasks in `task_names` (others dropped).

  Catalog datasets label all of their tasks; an experiment that trains a
  subset restricts every component to it.
  """
  keep_names = set(task_names)

  def convert(raw):
    part = component.convert(raw)
    return {"inputs": part["inputs"],
            "labels": {t: v for t, v in part["labels"].items()
                       if t in keep_names},
            "masks": {t: v for t, v in part["masks"].items()
                      if t in keep_names}}

  return dataclasses.replace(
      component, convert=convert,
      label_keep={t: k for t, k in component.label_keep.items()
                  if t in keep_names})


def split_by_label_fraction(component: Component,
                            fractions: Mapping[str, float], seed: int
                            ) -> tuple[Component, Component]:
  """Keeps each task's labels on a seeded fraction of `component`'s rows.

  For every task the component labels, `label_fraction_masks` over the
  SOURCE's rows chooses where the label is kept (tasks not in `fractions`
  keep all labels); a task the component does not label may be named too and
  is ignored (one fractions dict serves every component of a mixture). The
  rows of `component.indices` where no task keeps a label become a second,
  unlabelled component (same source and inputs, no labels) named
  `"<name>/unlabelled"`.

  Returns:
    `(labelled, unlabelled)`; either may have no rows.

  Raises:
    ValueError: a fraction outside [0, 1].
  """
  for task, fraction in fractions.items():
    if not 0.0 <= fraction <= 1.0:  # also rejects NaN
      raise ValueError(f"label fraction for task {task!r} must be in [0, 1], "
                       f"got {fraction!r}")
  provided = labelled_tasks(component)
  size = len(component.source)
  chosen = label_fraction_masks(
      size, {t: f for t, f in fractions.items() if t in provided}, seed)
  keep = {t: np.ones(size, bool) for t in provided}
  keep.update({t: m > 0 for t, m in chosen.items()})
  for t, k in component.label_keep.items():
    keep[t] = keep[t] & k
  any_label = (np.any(np.stack(list(keep.values())), axis=0) if keep
               else np.zeros(size, bool))
  rows = component.indices
  labelled = dataclasses.replace(component, indices=rows[any_label[rows]],
                                 label_keep=keep)

  def inputs_only(raw):
    return {"inputs": component.convert(raw)["inputs"], "labels": {},
            "masks": {}}

  unlabelled = Component(name=f"{component.name}/unlabelled",
                         source=component.source, convert=inputs_only,
                         indices=rows[~any_label[rows]])
  return labelled, unlabelled


# --------------------------------------------------------------------------
# Converting and assembling rows.


def _leaf_spec(x: np.ndarray) -> tuple[tuple[int, ...], np.dtype]:
  return tuple(x.shape[1:]), x.dtype


def _zero_unlabelled(label: np.ndarray, mask: np.ndarray) -> np.ndarray:
  keep = (mask > 0).reshape(mask.shape + (1,) * (label.ndim - mask.ndim))
  return np.where(keep, label, np.zeros((), label.dtype))


class _Assembler:
  """Reads and converts component rows into full, validated batches.

  Built once per set of components: converting a couple of rows of each one
  fixes the common input spec and each task's mask shape, and checks every
  component against the task set, so a mismatched source fails before any
  compilation with a message naming it.
  """

  def __init__(self, components: Sequence[Component], tasks: tasks_lib.TaskSet):
    if not components:
      raise ValueError("a mixture needs at least one component")
    names = [c.name for c in components]
    if len(set(names)) != len(names):
      raise ValueError(f"component names must be unique, got {names}")
    self.components = tuple(components)
    self.tasks = tasks
    self.input_spec = None  # pytree of (shape, dtype) per example
    self._input_source = None
    self.mask_shapes: dict[str, tuple[int, ...]] = {}
    self.provides: dict[str, tuple[str, ...]] = {}
    for c in self.components:
      unknown = sorted(set(c.label_keep) - set(tasks.names))
      if unknown:
        raise ValueError(f"component {c.name!r}: label_keep names unknown "
                         f"task(s) {unknown}; tasks: {', '.join(tasks.names)}")
      if not c.num_rows:
        continue
      self.convert(c, c.indices[:2])  # sets and checks the specs
    if self.input_spec is None:
      raise ValueError(f"every component is empty: {names}")
    unlabelled = [t for t in tasks.names if t not in self.mask_shapes]
    if unlabelled:
      raise ValueError(
          f"task(s) {unlabelled} are labelled by no component; components "
          "label: " + "; ".join(f"{c}: {list(p) or 'none'}"
                                 for c, p in self.provides.items()))

  def convert(self, component: Component, rows: np.ndarray) -> Batch:
    """Converted, checked rows of one component (tasks it labels only)."""
    part = component.convert(component.source.read(rows))
    where = f"source {component.name!r}"
    if not isinstance(part, Mapping) or set(part) != {"inputs", "labels",
                                                      "masks"}:
      raise ValueError(f"{where}: convert must return a dict with keys "
                       "'inputs', 'labels', 'masks'; got "
                       f"{sorted(part) if isinstance(part, Mapping) else type(part)}")
    labels, masks = dict(part["labels"]), dict(part["masks"])
    provided = tuple(labels)
    if set(masks) != set(labels):
      raise ValueError(f"{where}: labels are given for {sorted(labels)} but "
                       f"masks for {sorted(masks)}; they must name the same "
                       "tasks")
    unknown = sorted(set(provided) - set(self.tasks.names))
    if unknown:
      raise ValueError(f"{where}: labels for unknown task(s) {unknown}; "
                       f"tasks: {', '.join(self.tasks.names)}")
    missing_keep = sorted(set(component.label_keep) - set(provided))
    if missing_keep:
      raise ValueError(f"{where}: label_keep names task(s) {missing_keep} that "
                       "the component does not label")
    self._check_inputs(component, part["inputs"], len(rows))
    # Canonical dtypes, so that every source's labels stack into one array.
    for t in provided:
      task = self.tasks.get(t)
      label, mask = np.asarray(labels[t]), np.asarray(masks[t])
      if task.label_dtype == "int32" and np.issubdtype(label.dtype,
                                                        np.integer):
        label = label.astype(np.int32)
      elif task.label_dtype == "float32" and (
          np.issubdtype(label.dtype, np.floating) or label.dtype == bool):
        label = label.astype(np.float32)
      if mask.dtype == bool:
        mask = mask.astype(np.float32)
      if t in component.label_keep:
        keep = component.label_keep[t][rows].astype(mask.dtype)
        mask = mask * keep.reshape(keep.shape + (1,) * (mask.ndim - 1))
      labels[t], masks[t] = label, mask
    try:
      if provided:
        self.tasks.select(provided).validate_batch(
            {"inputs": part["inputs"], "labels": labels, "masks": masks})
      elif not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(
          part["inputs"]) if np.issubdtype(np.asarray(x).dtype, np.floating)):
        raise ValueError("batch['inputs'] contains NaN or Inf")
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    for t in provided:
      shape = tuple(masks[t].shape[1:])
      if self.mask_shapes.setdefault(t, shape) != shape:
        raise ValueError(f"{where}: task {t!r} has per-example mask shape "
                         f"{shape}, but another source gives "
                         f"{self.mask_shapes[t]}")
      labels[t] = _zero_unlabelled(labels[t], masks[t])
    self.provides[component.name] = provided
    return {"inputs": part["inputs"], "labels": labels, "masks": masks}

  def _check_inputs(self, component: Component, inputs: Any, n: int) -> None:
    spec = jax.tree.map(lambda x: _leaf_spec(np.asarray(x)), inputs)
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(inputs)}
    if sizes != {n}:
      raise ValueError(f"source {component.name!r}: inputs have leading sizes "
                       f"{sorted(sizes)} for {n} rows")
    if self.input_spec is None:
      self.input_spec, self._input_source = spec, component.name
    elif spec != self.input_spec:
      raise ValueError(
          f"source {component.name!r}: field 'inputs' has per-example "
          f"(shape, dtype) {spec}, but the mixture's input spec is "
          f"{self.input_spec} (from source {self._input_source!r}); "
          "preprocess every source to the same spec in its convert function")

  def assemble(self, comp: np.ndarray, rows: np.ndarray,
               valid: bool = False) -> Batch:
    """A batch whose slot j holds row `rows[j]` of component `comp[j]`.

    Slots with `comp[j] == -1` are padding: zero inputs, zero labels, mask 0
    (and `batch["valid"]` 0.0 with `valid`, 1.0 on the real rows, so that
    tasks whose labels are made from the inputs can leave padding out).
    """
    b = len(comp)
    inputs = jax.tree.map(lambda s: np.zeros((b,) + s[0], s[1]),
                          self.input_spec, is_leaf=lambda s: isinstance(s, tuple)
                          and len(s) == 2 and isinstance(s[1], np.dtype))
    labels = {t.name: np.zeros((b,) + t.label_shape, t.label_dtype)
              for t in self.tasks}
    masks = {t: np.zeros((b,) + self.mask_shapes[t], np.float32)
             for t in self.tasks.names}
    for i, component in enumerate(self.components):
      slots = np.flatnonzero(comp == i)
      if not slots.size:
        continue
      part = self.convert(component, rows[slots])
      jax.tree.map(lambda out, x: out.__setitem__(slots, x), inputs,
                   part["inputs"])
      for t in part["labels"]:
        labels[t][slots] = part["labels"][t]
        masks[t][slots] = part["masks"][t]
    batch = {"inputs": inputs, "labels": labels, "masks": masks}
    if valid:
      batch["valid"] = (comp >= 0).astype(np.float32)
    return batch


def _check_hosts(batch_size: int, num_host_shards: int, host_index: int):
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if num_host_shards < 1:
    raise ValueError(f"num_host_shards must be >= 1, got {num_host_shards}")
  if not 0 <= host_index < num_host_shards:
    raise ValueError(f"host_index must be in [0, {num_host_shards}), got "
                     f"{host_index}")
  if batch_size % num_host_shards:
    raise ValueError(f"global batch_size {batch_size} is not divisible by "
                     f"num_host_shards {num_host_shards}")


# --------------------------------------------------------------------------
# The training stream.


class Mixture:
  """An endless, deterministic stream of batches drawn from components by rate.

  See the module docstring for the sampling scheme. The mixture is immutable;
  `batch(state)` is a pure function of the state, and `iterator()` wraps it
  with `get_state` / `set_state` for checkpoints.

  Args:
    components: the sources and their conversions (unique names).
    tasks: the task set every batch carries labels and masks for.
    batch_size: global batch size B (all hosts).
    seed: non-negative integer; fixes every batch together with the state.
    rates: component name -> rate (from `mixing_rates`; normalised here);
      default proportional to the components' sizes.
    composition: "sampled" (multinomial counts per batch) or "fixed" (counts
      `B * rate` up to one).
    num_host_shards, host_index: this host's share of every global batch.

  Raises:
    ValueError: anything inconsistent (names, rates, sizes, host layout), and
      any component whose converted rows do not fit the task set or the
      common input spec (the message names the source and the field).
  """

  def __init__(self, components: Sequence[Component],
               tasks: tasks_lib.TaskSet, *, batch_size: int, seed: int,
               rates: Mapping[str, float] | None = None,
               composition: str = "sampled", num_host_shards: int = 1,
               host_index: int = 0):
    _check_hosts(batch_size, num_host_shards, host_index)
    if seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if composition not in COMPOSITIONS:
      raise ValueError(f"unknown composition {composition!r}; valid: "
                       f"{', '.join(COMPOSITIONS)}")
    self._assembler = _Assembler(components, tasks)
    self.components = self._assembler.components
    sizes = {c.name: c.num_rows for c in self.components}
    rates = mixing_rates(sizes, "proportional" if rates is None else
                         "explicit", rates=rates)
    empty = [n for n, r in rates.items() if r > 0 and sizes[n] == 0]
    if empty:
      raise ValueError(f"component(s) {empty} have a positive rate but no rows")
    self.rates = rates
    self._p = np.array([rates[c.name] for c in self.components])
    self.batch_size = batch_size
    self.seed = int(seed)
    self.composition = composition
    self.per_host_batch_size = batch_size // num_host_shards
    self._host_slice = slice(host_index * self.per_host_batch_size,
                             (host_index + 1) * self.per_host_batch_size)
    self._stream_seed = [zlib.crc32(c.name.encode("utf-8"))
                         for c in self.components]
    self._orders: dict[tuple[int, int], np.ndarray] = {}

  @property
  def tasks(self) -> tasks_lib.TaskSet:
    return self._assembler.tasks

  @property
  def input_spec(self) -> Any:
    """Pytree of (per-example shape, dtype) of `batch["inputs"]`."""
    return self._assembler.input_spec

  def fingerprint(self) -> dict[str, Any]:
    """What a saved state is only valid for (host layout excluded)."""
    return {"seed": self.seed, "batch_size": self.batch_size,
            "composition": self.composition,
            "components": {c.name: c.num_rows for c in self.components},
            "rates": {k: round(v, 12) for k, v in self.rates.items()}}

  def initial_state(self) -> dict[str, Any]:
    return {"step": 0, "positions": {c.name: 0 for c in self.components},
            "mixture": self.fingerprint()}

  def state_at(self, step: int) -> dict[str, Any]:
    """The iterator state before batch `step` of an uninterrupted run from
    `initial_state()` (the batches' counts are a pure function of the step),
    e.g. to continue a run at its step after its mixture changed."""
    positions = np.zeros(len(self.components), np.int64)
    for s in range(int(step)):
      positions += self.counts(s)
    return {"step": int(step),
            "positions": {c.name: int(p) for c, p in
                          zip(self.components, positions)},
            "mixture": self.fingerprint()}

  def check_state(self, state: Mapping[str, Any]) -> None:
    """Raises ValueError if `state` was not produced by an equal mixture."""
    if not isinstance(state, Mapping) or set(state) != {"step", "positions",
                                                        "mixture"}:
      raise ValueError(f"not a mixture iterator state: {state!r}")
    saved, now = dict(state["mixture"]), self.fingerprint()
    if saved != now:
      diff = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
      raise ValueError("the data mixture differs from the one that wrote this "
                       f"iterator state: (saved, now) = {diff}")

  def counts(self, step: int) -> np.ndarray:
    """int64 [S]: how many examples each component gives batch `step`."""
    rng = np.random.default_rng([self.seed, int(step), 0])
    b = self.batch_size
    if self.composition == "sampled":
      return rng.multinomial(b, self._p).astype(np.int64)
    expected = b * self._p
    base = np.floor(expected).astype(np.int64)
    frac = expected - base
    extra = b - int(base.sum())
    if extra:
      points = rng.random() + np.arange(extra)  # systematic sampling
      owner = np.searchsorted(np.cumsum(frac), points, side="right")
      base += np.bincount(np.minimum(owner, len(base) - 1),
                          minlength=len(base))
    return base

  def _stream(self, i: int, start: int, count: int) -> np.ndarray:
    """Rows at positions [start, start + count) of component i's stream."""
    component = self.components[i]
    n = component.num_rows
    out, pos = [], start
    while pos < start + count:
      epoch, offset = divmod(pos, n)
      key = (i, epoch)
      if key not in self._orders:
        if len(self._orders) > 2 * len(self.components):
          self._orders.clear()  # a cache only; results never depend on it
        perm = np.random.default_rng(
            [self.seed, self._stream_seed[i], epoch]).permutation(n)
        self._orders[key] = component.indices[perm]
      take = min(n - offset, start + count - pos)
      out.append(self._orders[key][offset:offset + take])
      pos += take
    return np.concatenate(out) if out else np.zeros(0, np.int64)

  def plan(self, state: Mapping[str, Any]
           ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Which rows the GLOBAL batch at `state` holds, and the next state.

    Returns:
      `(comp, rows, next_state)`: int64 [B] component index and source row
      of every slot of the global batch (before the host split).
    """
    step = int(state["step"])
    counts = self.counts(step)
    comp = np.repeat(np.arange(len(self.components)), counts)
    positions = dict(state["positions"])
    rows = np.empty(self.batch_size, np.int64)
    for i, c in enumerate(self.components):
      if counts[i]:
        rows[comp == i] = self._stream(i, positions[c.name], int(counts[i]))
        positions[c.name] += int(counts[i])
    order = np.random.default_rng([self.seed, step, 1]).permutation(
        self.batch_size)
    next_state = {"step": step + 1, "positions": positions,
                  "mixture": state["mixture"]}
    return comp[order], rows[order], next_state

  def batch(self, state: Mapping[str, Any]) -> tuple[Batch, dict[str, Any]]:
    """This host's batch at `state` and the state after it (pure)."""
    comp, rows, next_state = self.plan(state)
    return (self._assembler.assemble(comp[self._host_slice],
                                     rows[self._host_slice]), next_state)

  def iterator(self, state: Mapping[str, Any] | None = None
               ) -> "MixtureIterator":
    """An iterator from `state` (default: the start)."""
    it = MixtureIterator(self)
    if state is not None:
      it.set_state(state)
    return it


class MixtureIterator(Iterator[Batch]):
  """Iterates a `Mixture`; `get_state` / `set_state` make it checkpointable.

  The state is a small JSON-able dict, identical on every host:
  `{"step": batches produced, "positions": {component: examples drawn},
  "mixture": fingerprint}`.
  """

  def __init__(self, mixture: Mixture):
    self.mixture = mixture
    self._state = mixture.initial_state()

  def __next__(self) -> Batch:
    batch, self._state = self.mixture.batch(self._state)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self._state["step"],
            "positions": dict(self._state["positions"]),
            "mixture": dict(self._state["mixture"])}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from `state` (from `get_state`, possibly via JSON).

    Raises:
      ValueError: the state belongs to a different mixture.
    """
    self.mixture.check_state(state)
    self._state = {"step": int(state["step"]),
                   "positions": {k: int(v) for k, v in
                                 state["positions"].items()},
                   "mixture": self.mixture.fingerprint()}


# --------------------------------------------------------------------------
# Evaluation.


class EvalStream:
  """Every row of some components once, in order, in fixed-shape batches.

  The rows of the components are concatenated (component order, then each
  component's `indices` order) and cut into global batches of `batch_size`;
  the last is padded with zero rows whose masks are 0, so masked sums count
  every real example exactly once; `batch["valid"]` is 1.0 on real rows and
  0.0 on padding (pretext tasks, whose masks are made in the step, read it). Host h takes slots `[h B / H, (h+1) B / H)`
  of each global batch, and every host yields the same number of batches.
  Iterating again walks the data again.

  Raises:
    ValueError: as for `Mixture`.
  """

  def __init__(self, components: Sequence[Component],
               tasks: tasks_lib.TaskSet, *, batch_size: int,
               num_host_shards: int = 1, host_index: int = 0):
    _check_hosts(batch_size, num_host_shards, host_index)
    self._assembler = _Assembler(components, tasks)
    self.components = self._assembler.components
    self.batch_size = batch_size
    per_host = batch_size // num_host_shards
    self._host_slice = slice(host_index * per_host, (host_index + 1) * per_host)
    self._comp = np.concatenate([np.full(c.num_rows, i, np.int64)
                                 for i, c in enumerate(self.components)])
    self._rows = np.concatenate([c.indices for c in self.components])
    self.num_examples = len(self._rows)
    self.num_batches = math.ceil(self.num_examples / batch_size)

  @property
  def tasks(self) -> tasks_lib.TaskSet:
    return self._assembler.tasks

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[Batch]:
    b = self.batch_size
    for start in range(0, self.num_examples, b):
      comp = np.full(b, -1, np.int64)
      rows = np.zeros(b, np.int64)
      chunk = slice(start, min(start + b, self.num_examples))
      comp[:chunk.stop - start] = self._comp[chunk]
      rows[:chunk.stop - start] = self._rows[chunk]
      yield self._assembler.assemble(comp[self._host_slice],
                                     rows[self._host_slice], valid=True)
