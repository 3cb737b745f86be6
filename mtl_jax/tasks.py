"""Task specs, the task set, batch validation and the masked per-task losses.

A `Task` says everything the rest of the code needs to know about one prediction
problem: its kind, the shape and dtype of one example's label, the head that
predicts it (its output shape), its masked loss and metrics, and its static weight.
A `TaskSet` is an ordered, immutable collection of tasks; the order fixes the task
axis `[K]` used by weighting and aggregation methods.

Batches follow the batch contract of docs/design.md:

  {"inputs": [B, ...],
   "labels": {task: [B, *label_shape]},   # zeros where the example has no label
   "masks":  {task: [B] or [B, *dense]}}  # 1.0 where labelled, 0.0 where not

`TaskSet.validate_batch` checks a host (numpy) batch against the specs so that a
user's mistake fails with a message naming the task and the problem before anything
is compiled.

**Pretext tasks** (self-supervised) carry a `pretext` (a
`mtl_jax.pretext.Pretext`): their labels are not in the batch but made inside
the train step from the inputs (`mtl_jax.pretext.views.add_views`). Every task
reads a **view**: `"inputs"` (the batch's inputs, the default) or a view that a
pretext task defines, named by its `view` field (by default the pretext task's
own name; an identity pretext, such as `reconstruct`, reads `"inputs"`).
Tasks on the same view share one trunk pass, so pretext tasks that name the
same view must apply the same corruption (`Pretext.view_id`). A pretext task's
`rows` say which rows it trains on: "all" (default), "labelled" (rows labelled
for some supervised task) or "unlabelled" (the pool).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import losses as losses_lib
from mtl_jax import metrics as metrics_lib

LossFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

KINDS = ("classification", "multilabel", "regression")
# `Pretext.view_id` of a pretext whose view is its inputs unchanged.
IDENTITY_VIEW = "identity"
# The view of the batch's own inputs.
INPUTS_VIEW = "inputs"
# Which rows a pretext task trains on.
ROWS = ("all", "labelled", "unlabelled")


@dataclasses.dataclass(frozen=True)
class Task:
  """One supervised prediction problem.

  Attributes:
    name: unique task name; the key of the task in batches, params and metrics.
    kind: one of `KINDS`.
    output_shape: shape of the head's prediction for one example (e.g. `(10,)`
      logits for a 10-class task, `()` for a scalar regression).
    label_shape: shape of one example's label (`()` for a class index).
    label_dtype: "int32" for class indices, "float32" otherwise.
    loss: masked loss `(prediction, label, mask) -> (loss_sum, count)`.
    metrics: metrics reported by evaluation, each over labelled examples only.
    weight: static loss weight (used by the `static` weighting method).
    num_classes: number of classes for classification tasks (label range check).
    pretext: for a self-supervised task, the `mtl_jax.pretext.Pretext` whose
      transform makes its view, label and mask in the step; None for a task
      labelled in the batch.
    view: the view the task reads: "inputs" or the view of a pretext task.
    rows: a pretext task's rows: one of `ROWS` ("all" for supervised tasks).
  """

  name: str
  kind: str
  output_shape: tuple[int, ...]
  label_shape: tuple[int, ...]
  label_dtype: str
  loss: LossFn
  metrics: tuple[metrics_lib.Metric, ...]
  weight: float = 1.0
  num_classes: int | None = None
  pretext: Any = None
  view: str = INPUTS_VIEW
  rows: str = "all"

  def __post_init__(self):
    if not self.name or "/" in self.name:
      raise ValueError(f"invalid task name {self.name!r}: must be non-empty, no '/'")
    if not self.view or "/" in self.view:
      raise ValueError(f"task {self.name!r}: invalid view name {self.view!r}: "
                       "must be non-empty, no '/'")
    if self.rows not in ROWS:
      raise ValueError(f"task {self.name!r}: unknown rows {self.rows!r}; "
                       f"valid: {', '.join(ROWS)}")
    if self.pretext is None and self.rows != "all":
      raise ValueError(f"task {self.name!r}: rows={self.rows!r} is for pretext "
                       "tasks; a supervised task trains on its labelled rows")
    if self.kind not in KINDS:
      raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}; "
                       f"valid: {', '.join(KINDS)}")
    if not np.isfinite(self.weight) or self.weight < 0:
      raise ValueError(f"task {self.name!r}: weight must be finite and >= 0, "
                       f"got {self.weight}")
    names = [m.name for m in self.metrics]
    if len(set(names)) != len(names):
      raise ValueError(f"task {self.name!r}: duplicate metric names {names}")

  @property
  def is_pretext(self) -> bool:
    """True when the step makes the task's labels (not the batch)."""
    return self.pretext is not None

  @property
  def output_dim(self) -> int:
    """Number of scalars the head outputs per example (its last Dense width)."""
    return int(np.prod(self.output_shape, dtype=np.int64))


def classification_task(name: str, num_classes: int, *, weight: float = 1.0,
                        label_smoothing: float = 0.0,
                        positions: Sequence[int] = ()) -> Task:
  """A single-label classification task: logits `[C]`, integer label, CE loss.

  With `positions`, the task classifies every position of a grid instead of the
  whole example: a per-token task over `[L]` sequences has `positions=(L,)`,
  logits `[L, C]`, labels `[L]` and a dense `[B, L]` mask (1.0 on labelled
  tokens, 0.0 on padding, e.g. from `mtl_jax.data.text.pad_sequences`); the
  loss and accuracy then average over labelled tokens and `count` is their
  number. (A `[B]` mask is also valid, but the loss would then average each
  example over all `L` positions, padding included.)

  Args:
    name: the task name.
    num_classes: number of classes `C` (>= 2).
    weight: static loss weight.
    label_smoothing: label smoothing of the cross-entropy, in `[0, 1]`.
    positions: shape `P` of the positions classified per example (`()`: one
      label per example).

  Returns:
    The `Task`, with `label_shape=P` and `output_shape=(*P, C)`.

  Raises:
    ValueError: if `num_classes < 2` or a position size is not >= 1.
  """
  if num_classes < 2:
    raise ValueError(f"task {name!r}: num_classes must be >= 2, got {num_classes}")
  positions = tuple(int(d) for d in positions)
  if any(d < 1 for d in positions):
    raise ValueError(f"task {name!r}: positions must be sizes >= 1 (e.g. (L,) "
                     f"for a per-token task), got {positions}")
  return Task(
      name=name, kind="classification", output_shape=positions + (num_classes,),
      label_shape=positions, label_dtype="int32",
      loss=losses_lib.get_loss("softmax_cross_entropy",
                               label_smoothing=label_smoothing),
      metrics=(metrics_lib.accuracy(),), weight=weight, num_classes=num_classes)


def multilabel_task(name: str, num_labels: int, *, weight: float = 1.0) -> Task:
  """A multi-label task: one sigmoid logit per label, binary CE, micro F1."""
  if num_labels < 1:
    raise ValueError(f"task {name!r}: num_labels must be >= 1, got {num_labels}")
  return Task(
      name=name, kind="multilabel", output_shape=(num_labels,),
      label_shape=(num_labels,), label_dtype="float32",
      loss=losses_lib.get_loss("sigmoid_binary_cross_entropy"),
      metrics=(metrics_lib.binary_f1(),),
      weight=weight)


def regression_task(name: str, shape: Sequence[int] = (), *, loss: str = "mse",
                    weight: float = 1.0, **loss_kwargs: Any) -> Task:
  """A regression task with targets of `shape` per example (`()`: a scalar)."""
  shape = tuple(int(d) for d in shape)
  return Task(
      name=name, kind="regression", output_shape=shape, label_shape=shape,
      label_dtype="float32", loss=losses_lib.get_loss(loss, **loss_kwargs),
      metrics=(metrics_lib.mean_absolute_error(),
               metrics_lib.root_mean_squared_error()),
      weight=weight)


class TaskSet(Sequence[Task]):
  """An ordered, immutable set of tasks with unique names.

  `allow_empty=True` admits no task: the supervised part of a run that trains
  pretexts only (its data carries inputs and no labels); a model and a step
  need at least one task.
  """

  def __init__(self, tasks: Sequence[Task], *, allow_empty: bool = False):
    tasks = tuple(tasks)
    if not tasks and not allow_empty:
      raise ValueError("a TaskSet needs at least one task")
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise ValueError(f"duplicate task names: {dupes}")
    self._tasks = tasks
    self._by_name = {t.name: t for t in tasks}
    _check_views(tasks)

  def __len__(self) -> int:
    return len(self._tasks)

  def __getitem__(self, key):  # int index or task name
    if isinstance(key, str):
      return self.get(key)
    return self._tasks[key]

  def __iter__(self) -> Iterator[Task]:
    return iter(self._tasks)

  def __repr__(self) -> str:
    return f"TaskSet({', '.join(self.names)})"

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self._tasks)

  @property
  def static_weights(self) -> tuple[float, ...]:
    return tuple(t.weight for t in self._tasks)

  @property
  def supervised(self) -> tuple[Task, ...]:
    """The tasks labelled in the batch, in task order."""
    return tuple(t for t in self._tasks if not t.is_pretext)

  @property
  def pretexts(self) -> tuple[Task, ...]:
    """The pretext tasks (labels made in the step), in task order."""
    return tuple(t for t in self._tasks if t.is_pretext)

  @property
  def view_names(self) -> tuple[str, ...]:
    """The distinct views the tasks read: "inputs" first if any task reads
    it, then the others in task order. The step runs one trunk pass each."""
    views = [t.view for t in self._tasks]
    ordered = [INPUTS_VIEW] if INPUTS_VIEW in views else []
    return tuple(dict.fromkeys(ordered + views))

  def check_pretexts(self, input_shape: Sequence[int]) -> None:
    """Checks every pretext task against one example's input shape.

    Each pretext's own check runs (a grid that does not divide the image,
    colourisation of a greyscale image, a down-sampling factor larger than the
    image, ...), and its target must fit the task's label and head shapes.

    Raises:
      ValueError: naming the task and the problem.
    """
    input_shape = tuple(int(d) for d in input_shape)
    for task in self.pretexts:
      try:
        task.pretext.check(input_shape)
        target = tuple(task.pretext.target_shape(input_shape))
      except ValueError as e:
        raise ValueError(f"pretext task {task.name!r}: {e}") from None
      head = target + ((task.num_classes,) if task.kind == "classification"
                       else ())
      if task.label_shape != target or task.output_shape != head:
        raise ValueError(
            f"pretext task {task.name!r}: the {task.pretext.name} target of "
            f"inputs {input_shape} has shape {target}, which does not fit the "
            f"task's label shape {task.label_shape} and head output shape "
            f"{task.output_shape} (expected {head}); build the task for these "
            "inputs (mtl_jax.pretext.pretext_task)")

  def get(self, name: str) -> Task:
    """Returns the task called `name`; raises KeyError listing the valid names."""
    try:
      return self._by_name[name]
    except KeyError:
      raise KeyError(f"unknown task {name!r}; valid tasks: "
                     f"{', '.join(self.names)}") from None

  def select(self, names: Sequence[str]) -> "TaskSet":
    """The sub-set of tasks called `names`, in that order."""
    return TaskSet([self.get(n) for n in names])

  def validate_batch(self, batch: Mapping[str, Any]) -> None:
    """Checks a host batch against the task specs.

    Run it on the first batch of every data stream (it reads values, so keep it
    out of jit). It checks that labels and masks exist for exactly this set of
    tasks, their batch sizes agree, label shapes and dtypes match the specs, each
    mask's shape is a prefix of its label's (per-example `[B]` or dense), masks are
    finite and in [0, 1], class labels lie in `[0, num_classes)`, and float labels
    and inputs are finite.

    Raises:
      ValueError: naming the task, the field and what was expected.
    """
    for key in ("inputs", "labels", "masks"):
      if key not in batch:
        raise ValueError(f"batch has no {key!r} entry; expected keys "
                         "'inputs', 'labels', 'masks'")
    batch_size = _check_inputs(batch["inputs"])
    supervised = [t.name for t in self.supervised]
    pretexts = [t.name for t in self.pretexts]
    for field in ("labels", "masks"):
      given = set(batch[field])
      made = sorted(given & set(pretexts))
      unknown = sorted(given - set(self.names))
      missing = [n for n in supervised if n not in given]
      if made:
        raise ValueError(f"batch[{field!r}] has entries for pretext task(s) "
                         f"{made}: their labels and masks are made in the "
                         "train step from the inputs, not read from the batch")
      if unknown:
        raise ValueError(f"batch[{field!r}] has unknown task(s) {unknown}; "
                         f"tasks: {', '.join(self.names)}")
      if missing:
        raise ValueError(f"batch[{field!r}] is missing task(s) {missing}: every "
                         "task needs an entry in every batch (mask 0 where "
                         "unlabelled)")
    if "valid" in batch:
      _check_valid(np.asarray(batch["valid"]), batch_size)
    for task in self.supervised:
      label = np.asarray(batch["labels"][task.name])
      mask = np.asarray(batch["masks"][task.name])
      _check_label(task, label, batch_size)
      _check_mask(task, mask, label.shape)
    if self.pretexts:
      inputs = batch["inputs"]
      if not hasattr(inputs, "shape"):
        raise ValueError(f"pretext tasks {pretexts} need image inputs "
                         "[B, H, W, C]; batch['inputs'] is a "
                         f"{type(inputs).__name__}")
      self.check_pretexts(np.shape(inputs)[1:])


def check_pretext_view(name: str, pretext: Any, view: str) -> None:
  """Only an identity pretext may read the inputs view."""
  if view == INPUTS_VIEW and pretext.view_id != IDENTITY_VIEW:
    raise ValueError(
        f"pretext task {name!r}: the {pretext.name} pretext corrupts its "
        f"inputs, so it cannot read the {INPUTS_VIEW!r} view; give it a view "
        "of its own")


def _check_views(tasks: Sequence[Task]) -> None:
  """Every view is the inputs or made by a pretext task; the pretext tasks
  on one view apply the same corruption."""
  made: dict[str, Task] = {}
  for task in tasks:
    if not task.is_pretext:
      continue
    view_id = task.pretext.view_id
    check_pretext_view(task.name, task.pretext, task.view)
    if task.view == INPUTS_VIEW:
      continue
    first = made.setdefault(task.view, task)
    if first.pretext.view_id != view_id:
      raise ValueError(
          f"pretext tasks {first.name!r} and {task.name!r} both read view "
          f"{task.view!r} but apply different corruptions "
          f"({first.pretext.view_id} vs {view_id}); tasks share a view only "
          "if they make it the same way")
  for task in tasks:
    if task.view != INPUTS_VIEW and task.view not in made:
      raise ValueError(
          f"task {task.name!r} reads view {task.view!r}, which no pretext "
          f"task makes; views: {', '.join([INPUTS_VIEW, *made])}")


def _check_valid(valid: np.ndarray, batch_size: int) -> None:
  if valid.shape != (batch_size,) or not np.issubdtype(valid.dtype,
                                                       np.floating):
    raise ValueError(f"batch['valid'] must be float [batch] = [{batch_size}] "
                     f"(1.0 for a real row, 0.0 for padding), got "
                     f"{valid.dtype} {valid.shape}")
  if np.any((valid != 0) & (valid != 1)):
    raise ValueError("batch['valid'] values must be 0.0 or 1.0")


def _check_inputs(inputs: Any) -> int:
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError("batch['inputs'] is empty")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"batch['inputs'] arrays disagree on the batch size: {sizes}")
  for x in leaves:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
      raise ValueError("batch['inputs'] contains NaN or Inf")
  return sizes.pop()


def _check_label(task: Task, label: np.ndarray, batch_size: int) -> None:
  expected = (batch_size,) + task.label_shape
  if label.shape != expected:
    raise ValueError(f"task {task.name!r}: label shape {label.shape} does not "
                     f"match [batch, *label_shape] = {expected}")
  if task.label_dtype == "int32":
    if not np.issubdtype(label.dtype, np.integer):
      raise ValueError(f"task {task.name!r}: labels must be integer class "
                       f"indices, got dtype {label.dtype}")
    bad = (label < 0) | (label >= task.num_classes)
    if np.any(bad):
      raise ValueError(
          f"task {task.name!r}: class label {int(label[bad].flat[0])} out of "
          f"range [0, {task.num_classes})")
  else:
    if not np.issubdtype(label.dtype, np.floating):
      raise ValueError(f"task {task.name!r}: labels must be floating point, "
                       f"got dtype {label.dtype}")
    if not np.all(np.isfinite(label)):
      raise ValueError(f"task {task.name!r}: labels contain NaN or Inf")
    if task.kind == "multilabel" and np.any((label < 0) | (label > 1)):
      raise ValueError(f"task {task.name!r}: multi-label targets must lie in "
                       "[0, 1]")


def _check_mask(task: Task, mask: np.ndarray, label_shape: tuple[int, ...]):
  if mask.ndim == 0 or mask.shape != label_shape[:mask.ndim]:
    raise ValueError(f"task {task.name!r}: mask shape {mask.shape} must be the "
                     f"batch shape {label_shape[:1]} or a prefix of the label "
                     f"shape {label_shape}")
  if not np.issubdtype(mask.dtype, np.floating):
    raise ValueError(f"task {task.name!r}: mask must be floating point (1.0 "
                     f"labelled, 0.0 not), got dtype {mask.dtype}")
  if not np.all(np.isfinite(mask)) or np.any((mask < 0) | (mask > 1)):
    raise ValueError(f"task {task.name!r}: mask values must lie in [0, 1]")


def check_predictions(tasks: TaskSet, predictions: Mapping[str, Any],
                      batch_size: int) -> None:
  """Checks that a model's predictions match the task specs (at trace time)."""
  missing = [n for n in tasks.names if n not in predictions]
  if missing:
    raise ValueError(f"model has no prediction for task(s) {missing}")
  for task in tasks:
    shape = tuple(jnp.shape(predictions[task.name]))
    expected = (batch_size,) + task.output_shape
    if shape != expected:
      raise ValueError(f"task {task.name!r}: prediction shape {shape} != "
                       f"[batch, *output_shape] = {expected}")


def task_loss_sums(tasks: TaskSet, predictions: Mapping[str, jax.Array],
                   batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
  """Per-task masked loss sums and label counts, stacked in task order.

  Returns:
    `(loss_sums [K], counts [K])`; the task losses are
    `loss_sums / max(counts, 1)` once both are reduced over the global batch.
  """
  sums, counts = [], []
  for task in tasks:
    s, c = task.loss(predictions[task.name], batch["labels"][task.name],
                     batch["masks"][task.name])
    sums.append(s)
    counts.append(c)
  return jnp.stack(sums), jnp.stack(counts)  # [K], [K]


def task_metric_stats(tasks: TaskSet, predictions: Mapping[str, jax.Array],
                      batch: Mapping[str, Any]) -> dict[str, Any]:
  """Summable metric statistics per task: `{task: {metric: {stat: sum}}}`."""
  return {
      task.name: metrics_lib.compute_stats(
          task.metrics, predictions[task.name], batch["labels"][task.name],
          batch["masks"][task.name])
      for task in tasks
  }


def task_presence(masks: Mapping[str, Any], task_names: Sequence[str]
                  ) -> jax.Array:
  """Which tasks each example is labelled for, from a batch's masks.

  Args:
    masks: `{task: [B] or [B, ...]}` as in the batch contract (dense masks
      count an example as labelled if any element is).
    task_names: the model's task order.

  Returns:
    `[B, K]` float32, 1.0 where example b has a label for task k.

  Raises:
    KeyError: if a task of `task_names` has no mask (names the valid ones).
  """
  missing = [n for n in task_names if n not in masks]
  if missing:
    raise KeyError(f"no mask for task(s) {missing}; masks have "
                   f"{', '.join(sorted(masks))}")
  cols = []
  for name in task_names:
    m = jnp.asarray(masks[name])
    cols.append((m.reshape(m.shape[0], -1) > 0).any(axis=1))  # [B]
  return jnp.stack(cols, axis=1).astype(jnp.float32)  # [B, K]
