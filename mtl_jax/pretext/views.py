"""Pretext tasks as tasks: their `Task` spec and the views the step makes.

A pretext task is a `mtl_jax.tasks.Task` with a `pretext`: its label and mask
are not in the batch but made inside the jitted train (and eval) step by
`add_views`, from the batch's inputs and the step's key, so they are
deterministic for a step and identical after a resume. To the weighting
methods and the aggregators it is a task like any other.

  task = pretext_task("masked_cell", vision.grid_mask(grid=(2, 2)),
                      input_shape=(12, 16, 1), rows="all")
  tasks = TaskSet([*supervised_tasks, task])
  ...
  batch = add_views(tasks, batch, key)   # inside the step
  # batch["views"] = {"masked_cell": [B, 12, 16, 1]}
  # batch["labels"]["masked_cell"] = [B, 6, 8, 1]; batch["masks"][...] = [B]

**Keys.** Each view draws from `fold_in(key, crc32(view name))`, and each
row from that folded with its GLOBAL row index (`row_offset` + its position;
under `pmap` the device's offset). A row's corruption therefore does not
depend on how the global batch is split over devices or hosts: `pmap`, a
sharded `jit` and one device make the same views. Pretext tasks that share a
view draw from the same keys, so they see the same view (their pretexts have
equal `view_id`s, which `TaskSet` checks).

**Rows.** A pretext task's mask is the transform's mask times
  - the row selection of `task.rows`: every row ("all"), the rows labelled
    for at least one supervised task of the batch ("labelled"), or the rows
    labelled for none, the unlabelled pool ("unlabelled");
  - `batch["valid"]` when present (1.0 for a real row, 0.0 for the padding
    rows of an evaluation stream's last batch).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence
import zlib

import jax
import jax.numpy as jnp

from mtl_jax import losses as losses_lib
from mtl_jax import metrics as metrics_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax.pretext.vision import Pretext

Batch = Mapping[str, Any]
# Losses a pretext with an image target may use.
IMAGE_LOSSES = ("mse", "l1")
# The key of the eval step's views: fixed, so that every evaluation sees the
# same corruptions and numbers are comparable across steps and runs.
EVAL_SEED = 0


def pretext_task(name: str, pretext: Pretext, input_shape: Sequence[int], *,
                 rows: str = "all", view: str | None = None,
                 weight: float = 1.0, loss: str | None = None,
                 max_value: float = 1.0) -> tasks_lib.Task:
  """The `Task` of `pretext` on inputs of one example's shape `input_shape`.

  An image target (reconstruct a cell, a region, the colour image, ...)
  makes a regression task whose head outputs the target's shape, with the
  `loss` ("mse", the pretext's default, or "l1") and the metrics PSNR
  (for images in `[0, max_value]`) and MAE; a class target (rotation) makes
  a classification task with cross-entropy and accuracy.

  Args:
    name: the task's name.
    pretext: the pretext (`mtl_jax.pretext.get_pretext`).
    input_shape: one example's input shape `(H, W, C)`.
    rows: "all", "labelled" or "unlabelled" (module docstring).
    view: the view it reads; None: the task's name, or "inputs" for an
      identity pretext (it then shares the supervised tasks' trunk pass).
    weight: static loss weight.
    loss: "mse" or "l1" for an image target; None: the pretext's own.
    max_value: the inputs' peak value, for PSNR.

  Raises:
    ValueError: the pretext cannot run on `input_shape` (named by the
      pretext's check), or an unknown loss.
  """
  input_shape = tuple(int(d) for d in input_shape)
  try:
    pretext.check(input_shape)
  except ValueError as e:
    raise ValueError(f"pretext task {name!r}: {e}") from None
  target = tuple(pretext.target_shape(input_shape))
  if view is None:
    view = (tasks_lib.INPUTS_VIEW
            if pretext.view_id == tasks_lib.IDENTITY_VIEW else name)
  common = dict(name=name, weight=weight, pretext=pretext, view=view,
                rows=rows)
  tasks_lib.check_pretext_view(name, pretext, view)
  if pretext.loss == "softmax_ce":
    if loss is not None:
      raise ValueError(f"pretext task {name!r}: the {pretext.name} pretext "
                       f"is a classification; loss={loss!r} does not apply")
    return tasks_lib.Task(
        kind="classification", output_shape=target + (pretext.num_classes,),
        label_shape=target, label_dtype="int32",
        loss=losses_lib.get_loss("softmax_cross_entropy"),
        metrics=(metrics_lib.accuracy(),), num_classes=pretext.num_classes,
        **common)
  loss = loss or pretext.loss
  if loss not in IMAGE_LOSSES:
    raise ValueError(f"pretext task {name!r}: unknown loss {loss!r} for an "
                     f"image target; valid: {', '.join(IMAGE_LOSSES)}")
  return tasks_lib.Task(
      kind="regression", output_shape=target, label_shape=target,
      label_dtype="float32", loss=losses_lib.get_loss(loss),
      metrics=(metrics_lib.psnr(max_value),
               metrics_lib.mean_absolute_error()), **common)


def view_key(key: jax.Array, view: str) -> jax.Array:
  """The key of one view: `fold_in(key, crc32(view))`."""
  return jax.random.fold_in(key, zlib.crc32(view.encode()) & 0x7FFFFFFF)


def per_row(pretext: Pretext, key: jax.Array, row_ids: jax.Array,
            images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`pretext`'s `(view, target, mask)` with row b drawn from
  `fold_in(key, row_ids[b])`: independent of the batch's split."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(row_ids)  # [B, 2]

  def one(k, image):
    view, target, mask = pretext.transform(k, image[None])
    return view[0], target[0], mask[0]

  return jax.vmap(one)(keys, images)


def row_selection(tasks: tasks_lib.TaskSet, batch: Batch, rows: str
                  ) -> jax.Array:
  """`[B]` float32: 1.0 on the rows that `rows` selects (module docstring)."""
  size = jax.tree.leaves(batch["inputs"])[0].shape[0]
  valid = jnp.asarray(batch.get("valid", jnp.ones((size,), jnp.float32)),
                      jnp.float32)
  if rows == "all":
    return valid
  names = [t.name for t in tasks.supervised]
  labelled = (tasks_lib.task_presence(batch["masks"], names).max(axis=1)
              if names else jnp.zeros((size,), jnp.float32))  # [B]
  if rows == "labelled":
    return valid * labelled
  if rows == "unlabelled":
    return valid * (1.0 - labelled)
  raise ValueError(f"unknown rows {rows!r}; valid: "
                   f"{', '.join(tasks_lib.ROWS)}")


def add_views(tasks: tasks_lib.TaskSet, batch: Batch, key: jax.Array, *,
              row_offset: jax.Array | int = 0,
              every_row: bool = False) -> dict[str, Any]:
  """The batch with every pretext task's view, label and mask.

  Args:
    tasks: the tasks; only the pretext tasks are read.
    batch: the batch of the batch contract (supervised labels and masks,
      optional `valid`).
    key: the step's pretext key.
    row_offset: global index of the batch's first row (under `pmap`, the
      device index times the per-device batch).
    every_row: ignore the tasks' `rows` and mask every valid row (the eval
      step: a pretext is scored on every held-out row, whichever rows it
      trains on).

  Returns:
    The batch plus `"views": {view: [B, ...]}` (the views other than
    "inputs") and the pretext tasks' `labels` and `masks`. A batch without
    pretext tasks is returned as is.
  """
  if not tasks.pretexts:
    return dict(batch)
  images = batch["inputs"]
  row_ids = row_offset + jnp.arange(images.shape[0], dtype=jnp.int32)
  views = dict(batch.get("views", {}))
  labels, masks = dict(batch["labels"]), dict(batch["masks"])
  for task in tasks.pretexts:
    rows = "all" if every_row else task.rows
    if task.pretext.from_features:
      # Labelled from the shared features in the forward pass
      # (`mtl_jax.pretext.cluster`); here only its rows.
      labels[task.name] = jnp.zeros(images.shape[:1], jnp.int32)
      masks[task.name] = row_selection(tasks, batch, rows)
      continue
    view, target, mask = per_row(task.pretext, view_key(key, task.view),
                                 row_ids, images)
    if task.view != tasks_lib.INPUTS_VIEW:
      views.setdefault(task.view, view)
    labels[task.name] = target
    masks[task.name] = mask * row_selection(tasks, batch, rows)
  return {**batch, "views": views, "labels": labels, "masks": masks}


def batch_views(tasks: tasks_lib.TaskSet, batch: Batch) -> dict[str, Any]:
  """`{view: inputs}` for every view the tasks read (after `add_views`)."""
  made = batch.get("views", {})
  out = {}
  for view in tasks.view_names:
    if view == tasks_lib.INPUTS_VIEW:
      out[view] = batch["inputs"]
    elif view in made:
      out[view] = made[view]
    else:
      raise ValueError(f"batch has no view {view!r}; views are made by "
                       "mtl_jax.pretext.add_views inside the step")
  return out
