"""Transfer between runs: restore part of a params tree, freeze by pattern.

Params split as `{"shared": ..., "tasks": {task: ...}}` (plus, for some
architectures, other top-level collections), so a model of one task set can
start from another run's params:

  params, report = transfer.merge_params(fresh_params, checkpoint_params)
  # report.restored:    paths taken from the checkpoint (shared, common heads)
  # report.initialised: paths kept from `fresh_params` (new tasks' heads)
  # report.unused:      checkpoint paths with no place in the new model

Everything outside "tasks" must fit exactly (same paths, shapes and dtypes):
a trunk of another architecture or width is an error naming the first path
that differs and both shapes. A head is restored when its task is in both
trees; a task's head whose shapes differ (e.g. another number of classes) is
an error too, since silently re-initialising it would hide a mistake; drop
it from the checkpoint's tree first (`drop_tasks`) to start it afresh.

`freeze(optimizer, params, patterns)` leaves the params whose path matches a
pattern unchanged (`optax.multi_transform` with `optax.set_to_zero`), e.g.
`freeze(tx, params, ["shared/*"])` for a linear probe.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import optax

from mtl_jax.training import checkpoint as checkpoint_lib

TASKS = "tasks"
# Where experiments/train.py keeps a run's checkpoints inside its workdir.
CHECKPOINT_DIR = "checkpoints"


class TransferReport(NamedTuple):
  """Which param paths (`"a/b/c"`) a merge took from where."""

  restored: tuple[str, ...]
  initialised: tuple[str, ...]
  unused: tuple[str, ...]


def _leaves(tree: Any) -> dict[str, Any]:
  """`{"a/b/c": leaf}` of a nested mapping."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
  return out


def _check_fits(path: str, fresh: Any, source: Any) -> None:
  fresh_shape, source_shape = np.shape(fresh), np.shape(source)
  if fresh_shape != source_shape:
    raise ValueError(
        f"checkpoint param {path!r} has shape {source_shape}, the model's "
        f"{fresh_shape}: the checkpoint was made with another architecture "
        "or other widths")
  fresh_dtype, source_dtype = np.dtype(fresh.dtype), np.dtype(source.dtype)
  if fresh_dtype != source_dtype:
    raise ValueError(f"checkpoint param {path!r} has dtype {source_dtype}, "
                     f"the model's {fresh_dtype}")


def _check_same_paths(part: str, fresh: dict[str, Any],
                      source: dict[str, Any]) -> None:
  missing = sorted(set(fresh) - set(source))
  extra = sorted(set(source) - set(fresh))
  if missing or extra:
    first = (missing or extra)[0]
    where = "missing from the checkpoint" if missing else "not in the model"
    raise ValueError(
        f"checkpoint params under {part!r} do not fit the model: first "
        f"difference at {first!r} ({where}); the checkpoint was made with "
        "another architecture")


def merge_params(fresh: Mapping[str, Any], source: Mapping[str, Any]
                 ) -> tuple[dict[str, Any], TransferReport]:
  """`fresh` with every part that `source` has for it (module docstring).

  Args:
    fresh: the new model's initialised params (`{"shared", "tasks", ...}`).
    source: a checkpoint's params, e.g. `Checkpointer.read()["params"]`.

  Returns:
    `(params, report)`: params shaped like `fresh`, as numpy/jax arrays.

  Raises:
    ValueError: a part outside "tasks" that does not fit, or a common task's
      head of other shapes; the message names the first path and shapes.
  """
  params: dict[str, Any] = {}
  restored: list[str] = []
  initialised: list[str] = []
  unused: list[str] = []
  for part, fresh_part in fresh.items():
    if part == TASKS or part not in source:
      continue
    fresh_leaves, source_leaves = _leaves(fresh_part), _leaves(source[part])
    _check_same_paths(part, fresh_leaves, source_leaves)
    for path, leaf in fresh_leaves.items():
      _check_fits(f"{part}/{path}", leaf, source_leaves[path])
    params[part] = jax.tree.map(lambda _, s: s, fresh_part, source[part])
    restored += [f"{part}/{p}" for p in fresh_leaves]
  for part, fresh_part in fresh.items():
    if part != TASKS and part not in source:
      params[part] = fresh_part
      initialised += [f"{part}/{p}" for p in _leaves(fresh_part)]
  unused += [f"{part}/{p}" for part in source if part not in fresh
             for p in _leaves(source[part])]
  if TASKS in fresh:
    params[TASKS], report = _merge_heads(fresh[TASKS], source.get(TASKS, {}))
    restored += report.restored
    initialised += report.initialised
    unused += report.unused
  return params, TransferReport(tuple(restored), tuple(initialised),
                                tuple(unused))


def _merge_heads(fresh: Mapping[str, Any], source: Mapping[str, Any]
                 ) -> tuple[dict[str, Any], TransferReport]:
  heads, restored, initialised = {}, [], []
  for task, head in fresh.items():
    names = [f"{TASKS}/{task}/{p}" for p in _leaves(head)]
    if task not in source:
      heads[task] = head
      initialised += names
      continue
    fresh_leaves, source_leaves = _leaves(head), _leaves(source[task])
    _check_same_paths(f"{TASKS}/{task}", fresh_leaves, source_leaves)
    for path, leaf in fresh_leaves.items():
      _check_fits(f"{TASKS}/{task}/{path}", leaf, source_leaves[path])
    heads[task] = jax.tree.map(lambda _, s: s, head, source[task])
    restored += names
  unused = [f"{TASKS}/{task}/{p}" for task in source if task not in fresh
            for p in _leaves(source[task])]
  return heads, TransferReport(tuple(restored), tuple(initialised),
                               tuple(unused))


def read_params(path: str, step: int | None = None) -> tuple[int, Any]:
  """`(step, params)` of a run's checkpoint, as numpy arrays.

  Args:
    path: a run's workdir (its checkpoints are in `checkpoints/`) or a
      checkpoint directory itself.
    step: the checkpoint's step; None: the latest readable one.

  Raises:
    FileNotFoundError: `path` does not exist or holds no checkpoint.
    ValueError: no checkpoint at `step` (lists the steps there are).
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"init_from path {path!r} does not exist")
  directory = os.path.join(path, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    directory = path
  # Checkpointer creates its directory: only open one that holds steps.
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
  if not steps:
    raise FileNotFoundError(f"init_from path {path!r} holds no checkpoint "
                            "(neither it nor its checkpoints/ has a step)")
  if step is not None and step not in steps:
    raise ValueError(f"init_from path {path!r} has no checkpoint at step "
                     f"{step}; steps: {steps}")
  checkpointer = checkpoint_lib.Checkpointer(directory)
  try:
    if step is None:
      step = checkpointer.latest_step()
      state = checkpointer.read()
    else:
      state = checkpointer.read(step)
  finally:
    checkpointer.close()
  return int(step), jax.tree.map(np.asarray, state["params"])


def drop_tasks(params: Mapping[str, Any], tasks: Sequence[str]
               ) -> dict[str, Any]:
  """`params` without the heads of `tasks` (each must be there)."""
  missing = sorted(set(tasks) - set(params.get(TASKS, {})))
  if missing:
    raise KeyError(f"no head for task(s) {missing}; heads: "
                   f"{', '.join(sorted(params.get(TASKS, {})))}")
  return {**params, TASKS: {t: h for t, h in params[TASKS].items()
                            if t not in tasks}}


def frozen_labels(params: Any, patterns: Sequence[str]) -> Any:
  """A tree like `params` of "frozen" where a leaf's path (`"a/b/c"`)
  matches one of the `fnmatch` patterns, "trainable" elsewhere.

  Raises:
    ValueError: a pattern that matches no param (a typo would otherwise
      freeze nothing, silently).
  """
  paths = list(_leaves(params))
  for pattern in patterns:
    if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
      raise ValueError(f"freeze pattern {pattern!r} matches no param; "
                       f"params: {', '.join(paths[:8])}"
                       f"{', ...' if len(paths) > 8 else ''}")

  def label(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    frozen = any(fnmatch.fnmatchcase(name, p) for p in patterns)
    return "frozen" if frozen else "trainable"

  return jax.tree_util.tree_map_with_path(label, params)


def freeze(optimizer: optax.GradientTransformation, params: Any,
           patterns: Sequence[str]) -> optax.GradientTransformation:
  """`optimizer` for the params whose path matches none of `patterns`;
  the others get zero updates (and no optimizer state)."""
  return optax.multi_transform(
      {"trainable": optimizer, "frozen": optax.set_to_zero()},
      frozen_labels(params, patterns))
