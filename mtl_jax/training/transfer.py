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
`freeze(tx, params, ["shared/*"])` for a linear probe; per-group learning
rates are `optim.make_optimizer(..., param_groups=[("shared/*", 0.1)])`.

`add_heads(new_model, params, x, rng)` gives a model with more (or other)
tasks the params it shares with `params`; `continue_state` carries a whole
train state (step, optimizer and method states) over to another task set,
as `experiments/train.py` does with `config.allow_task_change`.

From a notebook:

  step, old = transfer.read_params("runs/pretrain")  # latest checkpoint
  params, report = transfer.add_heads(model, old, x, jax.random.PRNGKey(0))
  tx = optim.make_optimizer("adam", schedule, param_groups=[("shared/*", 0)])
  state = create_train_state(params, tx, weighting, len(tasks), rng)
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import optax

from mtl_jax.training import checkpoint as checkpoint_lib
from mtl_jax.training import optim
from mtl_jax.training import state as state_lib

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
  return {optim.path_name(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_fits(path: str, fresh: Any, source: Any,
                num_tasks: tuple[int, int] | None = None) -> None:
  fresh_shape, source_shape = np.shape(fresh), np.shape(source)
  if fresh_shape != source_shape:
    k_new, k_old = num_tasks or (0, 0)
    if k_new != k_old:
      raise ValueError(
          f"checkpoint param {path!r} has shape {source_shape}, the model's "
          f"{fresh_shape}: the checkpoint was made with another architecture "
          f"or other widths, or this architecture's shared params depend on "
          f"the number of tasks ({k_old} in the checkpoint, {k_new} in the "
          "model; cross_stitch, ple and adversarial do, so they cannot move "
          "to another task set)")
    raise ValueError(
          f"checkpoint param {path!r} has shape {source_shape}, the model's "
          f"{fresh_shape}: it depends on the number of tasks ({k_old} in the "
          f"checkpoint, {k_new} in the model), so this architecture's shared "
          "part cannot move to another task set (architectures whose shared "
          "params do not depend on it, e.g. hard_sharing, soft_sharing, mmoe, "
          "cgc, dselect_k, can)")
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
    num_tasks = (len(fresh.get(TASKS, {})), len(source.get(TASKS, {})))
    for path, leaf in fresh_leaves.items():
      _check_fits(f"{part}/{path}", leaf, source_leaves[path], num_tasks)
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
  steps = checkpoint_steps(directory)
  if not steps:
    raise FileNotFoundError(f"init_from path {path!r} holds no checkpoint "
                            "(neither it nor its checkpoints/ has a step)")
  if step is not None and step not in steps:
    raise ValueError(f"init_from path {path!r} has no checkpoint at step "
                     f"{step}; steps: {steps}")
  checkpointer = checkpoint_lib.Checkpointer(directory)
  try:
    if step is None:
      step, state = checkpointer.read_latest()
    else:
      state = checkpointer.read(step)
  finally:
    checkpointer.close()
  return int(step), jax.tree.map(np.asarray, state["params"])


def add_heads(model: Any, params: Mapping[str, Any], sample_inputs: Any,
              rng: jax.Array) -> tuple[dict[str, Any], TransferReport]:
  """Params for `model`, a model of another task set (e.g. the same
  architecture with tasks added): every part that `params` has for it, the
  new tasks' heads initialised from `rng` (`state.init_params`); the report
  says which is which (`merge_params`). Drop heads with `drop_tasks`."""
  fresh = state_lib.init_params(model, sample_inputs, rng)
  return merge_params(fresh, params)


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
  check_patterns(params, patterns, "freeze pattern")
  groups = optim.group_labels(params, [(p, 0.0) for p in patterns])
  return jax.tree.map(
      lambda g: "trainable" if g == optim.DEFAULT_GROUP else "frozen", groups)


def check_patterns(params: Any, patterns: Sequence[str],
                   what: str = "pattern") -> None:
  """Raises ValueError naming the first of `patterns` that matches no param
  path of `params` (abstract shapes will do)."""
  unmatched = optim.unmatched_patterns(params, patterns)
  if unmatched:
    paths = list(_leaves(params))
    raise ValueError(f"{what} {unmatched[0]!r} matches no param; params: "
                     f"{', '.join(paths[:8])}{', ...' if len(paths) > 8 else ''}")


def freeze(optimizer: optax.GradientTransformation, params: Any,
           patterns: Sequence[str]) -> optax.GradientTransformation:
  """`optimizer` for the params whose path matches none of `patterns`;
  the others get zero updates (and no optimizer state)."""
  return optax.multi_transform(
      {"trainable": optimizer, "frozen": optax.set_to_zero()},
      frozen_labels(params, patterns))


def checkpoint_steps(directory: str) -> list[int]:
  """The step directories under `directory` (none if it does not exist);
  creates nothing, unlike opening a `Checkpointer`."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _match_leaves(fresh: Any, old: Any) -> tuple[Any, int, int]:
  """`fresh` with each leaf whose path and shape `old` also has taken from
  `old`; returns `(tree, continued, initialised)` leaf counts."""
  old_leaves = _leaves(old) if old is not None else {}
  counts = [0, 0]

  def pick(path, leaf):
    source = old_leaves.get(optim.path_name(path))
    if source is not None and np.shape(source) == np.shape(leaf):
      counts[0] += 1
      return np.asarray(source, np.dtype(leaf.dtype))
    counts[1] += 1
    return leaf

  return jax.tree_util.tree_map_with_path(pick, fresh), counts[0], counts[1]


def _remap_tasks(fresh: Any, old: Any, old_tasks: Sequence[str],
                 new_tasks: Sequence[str]) -> Any:
  """A method state (`[K, ...]` leaves, `[K, K]` for pairwise ones) for
  `new_tasks`: each kept task's rows (and columns) from `old`, the new
  tasks' from `fresh`; a leaf without a task axis continues when its shape
  is unchanged."""
  old_leaves = _leaves(old) if old is not None else {}
  k_old, k_new = len(old_tasks), len(new_tasks)
  index = {t: i for i, t in enumerate(old_tasks)}
  pairs = [(j, index[t]) for j, t in enumerate(new_tasks) if t in index]
  new_idx = np.array([j for j, _ in pairs], np.int64)
  old_idx = np.array([i for _, i in pairs], np.int64)

  def pick(path, leaf):
    source = old_leaves.get(optim.path_name(path))
    out = np.array(leaf)
    if source is None:
      return out
    source = np.asarray(source, out.dtype)
    if (out.ndim >= 1 and source.shape[:1] == (k_old,)
        and out.shape[:1] == (k_new,)):
      if (out.ndim >= 2 and source.shape[:2] == (k_old, k_old)
          and out.shape[:2] == (k_new, k_new)
          and source.shape[2:] == out.shape[2:]):
        out[np.ix_(new_idx, new_idx)] = source[np.ix_(old_idx, old_idx)]
      elif source.shape[1:] == out.shape[1:]:
        out[new_idx] = source[old_idx]
      return out
    return source if source.shape == out.shape else out

  return jax.tree_util.tree_map_with_path(pick, fresh)


class Continuation(NamedTuple):
  """What `continue_state` carried over to the new task set."""

  step: int
  added: tuple[str, ...]
  removed: tuple[str, ...]
  params: TransferReport
  opt_state_continued: int  # optimizer-state leaves carried over
  opt_state_initialised: int  # those of new params (new heads)
  method_states: str  # "remapped by task" | "initialised (...)"

  def to_json(self) -> dict[str, Any]:
    return {"step": self.step, "added": list(self.added),
            "removed": list(self.removed),
            "params_restored": len(self.params.restored),
            "params_initialised": list(self.params.initialised),
            "params_unused": list(self.params.unused),
            "opt_state_continued": self.opt_state_continued,
            "opt_state_initialised": self.opt_state_initialised,
            "method_states": self.method_states}


def continue_state(fresh: Any, old: Mapping[str, Any],
                   old_tasks: Sequence[str] | None,
                   new_tasks: Sequence[str]) -> tuple[Any, Continuation]:
  """Continues a run's train state with another task set.

  Args:
    fresh: the new task set's initial `TrainState` (host arrays), which
      gives every new part: the heads of added tasks and their optimizer
      state, their method-state entries and task states.
    old: a checkpoint's state as read without a template
      (`Checkpointer.read`): `{"step", "params", "opt_state", ...}`.
    old_tasks: the checkpoint's task names in the run's order (the method
      states are indexed by it); None when unknown (a checkpoint saved
      without metadata): the method states then start afresh.
    new_tasks: the new task set's names in order.

  Returns:
    `(state, report)`: the step counter, PRNG key, shared params, kept heads
    and their optimizer state continue exactly; optimizer-state leaves are
    matched by path (`.../mu/tasks/<task>/...`), so a removed task's entries
    are dropped and an added task's start from `fresh`. The weighting's and
    aggregator's per-task entries are remapped by task name.

  Raises:
    ValueError: as `merge_params` (a shared part or kept head that does not
      fit).
  """
  params, params_report = merge_params(fresh.params, old["params"])
  opt_state, continued, initialised = _match_leaves(fresh.opt_state,
                                                    old.get("opt_state"))
  task_state, _, _ = _match_leaves(fresh.task_state, old.get("task_state"))
  if old_tasks is not None:
    weighting_state = _remap_tasks(fresh.weighting_state,
                                   old.get("weighting_state"), old_tasks,
                                   new_tasks)
    aggregation_state = _remap_tasks(fresh.aggregation_state,
                                     old.get("aggregation_state"), old_tasks,
                                     new_tasks)
    method_states = "remapped by task"
  else:
    weighting_state, aggregation_state = (fresh.weighting_state,
                                          fresh.aggregation_state)
    method_states = ("initialised (the checkpoint does not record its task "
                     "order)")
  old_names = tuple(old_tasks) if old_tasks is not None else tuple(
      old["params"].get(TASKS, {}))
  state = fresh.replace(
      step=np.asarray(old["step"], np.int32),
      params=params, opt_state=opt_state, weighting_state=weighting_state,
      aggregation_state=aggregation_state,
      rng=np.asarray(old["rng"], np.dtype(fresh.rng.dtype)),
      nonfinite_streak=np.asarray(old["nonfinite_streak"], np.int32),
      task_state=task_state)
  return state, Continuation(
      step=int(old["step"]),
      added=tuple(t for t in new_tasks if t not in old_names),
      removed=tuple(t for t in old_names if t not in new_tasks),
      params=params_report, opt_state_continued=continued,
      opt_state_initialised=initialised, method_states=method_states)
