"""Orbax checkpoints of the TrainState in a run's workdir.

Orbax writes each step into a temporary directory and renames it when complete
(and marks it committed), so a crash during a save never damages an earlier
checkpoint; `latest_step` only ever sees finished ones. Each step directory holds
two items: `state` (the TrainState, any sharding) and `data` (the data
iterator's JSON state, e.g. `MixtureIterator.get_state()`), written together, so
a restored run continues with exactly the batches an uninterrupted one would see.

A committed checkpoint can still be damaged afterwards (a truncated or deleted
file, a disk error). Restoring the latest checkpoint therefore falls back to the
next older one, with a warning naming the step and the error, down to the
oldest; resume with `restore_with_data`, which takes the state and the data
state from the same step.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, TypeVar

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

_T = TypeVar("_T")


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be restored.

  Attributes:
    failures: `{step: exception}` for each step tried, newest first.
  """

  def __init__(self, directory: str, failures: dict[int, BaseException],
               note: str = ""):
    self.failures = dict(failures)
    lines = [f"no checkpoint in {directory} could be restored{note}"]
    lines += [f"  step {s}: {type(e).__name__}: {_short(e)}"
              for s, e in failures.items()]
    if any(isinstance(e, ValueError) and "structure" in str(e).lower()
           for e in failures.values()):
      lines.append("The saved state has another structure than this run's: "
                   "the checkpoints were written by another model, config or "
                   "mtl_jax version. Resume them with that, or use a new "
                   "--workdir.")
    super().__init__("\n".join(lines))


def _short(error: BaseException, limit: int = 300) -> str:
  """The first line of an error message, cut to `limit` characters."""
  text = (str(error).strip().splitlines() or [""])[0]
  return text if len(text) <= limit else text[:limit] + "..."


class Checkpointer:
  """Saves and restores `TrainState`s under `<workdir>/checkpoints`.

  Args:
    directory: where the step directories live.
    max_to_keep: how many of the newest checkpoints to keep.
    metadata: a JSON value saved with every checkpoint (item "meta"), e.g.
      the run's task names in order, which a raw `read` cannot recover;
      `metadata(step)` reads it back.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3,
               metadata: Any = None):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    # Steps newer than the one a fallback restored: unreadable, and replaced by
    # the resumed run (deleted at its next save).
    self._superseded: list[int] = []
    self._metadata = metadata

  def latest_step(self) -> int | None:
    """The newest checkpoint's step (None if none).

    After a `restore` that fell back past unreadable checkpoints, those no
    longer count: this is the restored step until the next save.
    """
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """The steps of the checkpoints, oldest first."""
    return sorted(s for s in self._manager.all_steps()
                  if s not in self._superseded)

  def save(self, step: int, state: Any, *, data_state: Any = None,
           wait: bool = False) -> None:
    """Saves `state` (and the data iterator's `data_state`) as `step`.

    Asynchronous unless `wait`. `data_state` must be JSON-serialisable; None
    saves none (a run whose batches are a pure function of the step). The
    first save after a `restore` that fell back deletes the unreadable newer
    checkpoints it skipped (the resumed run replaces them).
    """
    self._delete_superseded(int(step))
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    if self._metadata is not None:
      items["meta"] = ocp.args.JsonSave(self._metadata)
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    if wait:
      self._manager.wait_until_finished()

  def restore(self, state_like: Any, step: int | None = None) -> Any:
    """Restores checkpoint `step` (the latest readable by default).

    `state_like` gives the tree structure, shapes, dtypes and shardings (e.g. the
    freshly initialised state); its values are not used. Without `step`, a
    checkpoint that fails to restore (corrupt or partial files) is skipped with
    a warning for the next older one. To resume a run, use `restore_with_data`.

    Raises:
      FileNotFoundError: there is no checkpoint to restore.
      CheckpointError: no checkpoint could be restored (lists each failure).
    """
    abstract = _abstract(state_like)
    if step is not None:
      return self._restore_state(int(step), abstract)
    _, state = self._restore_latest(
        lambda s: self._restore_state(s, abstract), collective=True)
    return state

  def restore_with_data(self, state_like: Any,
                        step: int | None = None) -> tuple[int, Any, Any]:
    """Restores the state and the data iterator state of one checkpoint.

    Without `step`, the newest checkpoint whose state and data state both
    restore is used (older ones are tried, with a warning, when the latest is
    corrupt or partial), so the data state always belongs to the restored
    state. In a multi-process run every process restores the same step.

    Args:
      state_like: as for `restore`.
      step: a checkpoint to restore exactly (no fallback); None for the latest
        readable one.

    Returns:
      `(step, state, data_state)`; `data_state` is None for a checkpoint saved
      without one.

    Raises:
      FileNotFoundError: there is no checkpoint to restore.
      CheckpointError: no checkpoint could be restored (lists each failure).
    """
    abstract = _abstract(state_like)

    def load(s: int) -> tuple[Any, Any]:
      items = {"state": ocp.args.StandardRestore(abstract)}
      has_data = self._has_data(s)
      if has_data:
        items["data"] = ocp.args.JsonRestore()
      restored = self._manager.restore(s, args=ocp.args.Composite(**items))
      return restored.state, restored.data if has_data else None

    if step is not None:
      return (int(step),) + load(int(step))
    found, (state, data) = self._restore_latest(load, collective=True)
    return found, state, data

  def data_state(self, step: int | None = None) -> Any:
    """The data iterator state saved with checkpoint `step` (latest by default).

    Without `step`: the latest readable one, not counting the checkpoints a
    `restore` fell back past; to be sure that it belongs to the restored
    state, use `restore_with_data`.

    Returns:
      The JSON value given to `save`, or None if that checkpoint has none.

    Raises:
      FileNotFoundError: there is no checkpoint.
      CheckpointError: no checkpoint's data state could be read.
    """
    if step is not None:
      return self._read_data(int(step))
    return self._restore_latest(self._read_data, collective=False)[1]

  def read(self, step: int | None = None) -> Any:
    """Reads checkpoint `step` (the latest readable by default) as numpy arrays.

    Needs no template and works whatever devices or processes wrote it (e.g. to
    compare the params of two runs, or to inspect a pod run on a laptop). The
    tree comes back as nested dicts (NamedTuples of optimizer states become
    dicts). Without `step`, an unreadable checkpoint is skipped with a warning
    for the next older one.

    Raises:
      FileNotFoundError: there is no checkpoint to read.
      CheckpointError: no checkpoint could be read (lists each failure).
    """
    if step is not None:
      return self._read_state(int(step))
    return self._restore_latest(self._read_state, collective=False)[1]

  def read_latest(self) -> tuple[int, Any]:
    """`(step, tree)` of the latest readable checkpoint (as `read()`).

    Raises:
      FileNotFoundError, CheckpointError: as `read`.
    """
    return self._restore_latest(self._read_state, collective=False)

  def metadata(self, step: int) -> Any:
    """The `metadata` saved with checkpoint `step`; None if it has none
    (saved without, or by an older version)."""
    if not os.path.isdir(os.path.join(self._step_dir(int(step)), "meta")):
      return None
    return self._manager.restore(int(step), args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta

  def delete(self, step: int) -> None:
    """Deletes checkpoint `step`."""
    self._manager.wait_until_finished()
    self._manager.delete(int(step))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  # Internals.

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _restore_state(self, step: int, abstract: Any) -> Any:
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract))).state

  def _has_data(self, step: int) -> bool:
    """Whether checkpoint `step` has a data state.

    Raises:
      FileNotFoundError: orbax's metadata lists a `data` item that is missing.
    """
    path = self._step_dir(step)
    if os.path.isdir(os.path.join(path, "data")):
      return True
    try:
      with open(os.path.join(path, "_CHECKPOINT_METADATA")) as f:
        items = json.load(f).get("item_handlers") or {}
    except (OSError, ValueError, AttributeError):
      return False  # no (readable) record of the items: trust the listing
    if "data" in items:
      raise FileNotFoundError(f"checkpoint {step} was saved with a data state "
                              f"but {path}/data is missing")
    return False

  def _read_data(self, step: int) -> Any:
    if not self._has_data(step):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore())).data

  def _read_state(self, step: int) -> Any:
    path = os.path.join(self._step_dir(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    try:
      metadata = checkpointer.metadata(path).item_metadata
      if metadata is None:
        raise FileNotFoundError(f"no readable metadata in {path}")
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          metadata)
      return jax.device_get(checkpointer.restore(path, target))
    finally:
      checkpointer.close()

  def _restore_latest(self, load: Callable[[int], _T], *,
                      collective: bool) -> tuple[int, _T]:
    """`(step, load(step))` for the newest step that loads.

    A step whose `load` raises is logged and skipped. With `collective` (every
    process calls this), the processes agree on the oldest step any of them
    found, and the skipped newer steps are superseded.
    """
    steps = self.all_steps()[::-1]  # not the steps a fallback skipped
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures: dict[int, BaseException] = {}
    found, result = None, None
    for step in steps:
      try:
        result = load(step)
      except Exception as e:  # pylint: disable=broad-except
        failures[step] = e
        logging.warning(
            "checkpoint at step %d in %s cannot be restored (%s: %s); %s",
            step, self.directory, type(e).__name__, _short(e),
            "trying the next older one" if step != steps[-1] else
            "it is the oldest")
        continue
      found = step
      break
    if collective and jax.process_count() > 1:
      agreed = _agree_on_step(found)
      if agreed is None:
        raise CheckpointError(self.directory, failures,
                              note=" by every process")
      if agreed != found:  # another process could not read a newer one
        logging.warning("restoring checkpoint %d, the newest one every process"
                        " can read", agreed)
        found, result = agreed, load(agreed)
    if found is None:
      raise CheckpointError(self.directory, failures)
    if failures:
      logging.warning("restored checkpoint at step %d in %s, skipping "
                      "unreadable step(s) %s", found, self.directory,
                      sorted(failures))
    if collective:
      self._superseded = sorted(set(self._superseded).union(
          s for s in steps if s > found))
    return found, result

  def _delete_superseded(self, step: int) -> None:
    """Deletes the unreadable steps a fallback skipped (all processes)."""
    superseded, self._superseded = self._superseded, []
    existing = set(self._manager.all_steps())
    for s in superseded:
      if s in existing:
        logging.warning("deleting unreadable checkpoint at step %d in %s: the "
                        "run resumed from an older step and saves step %d",
                        s, self.directory, step)
        self._manager.delete(s)


def _abstract(state_like: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)


def _agree_on_step(step: int | None) -> int | None:
  """The smallest of the processes' steps; None if any process has None."""
  steps = multihost_utils.process_allgather(
      np.asarray(-1 if step is None else step, np.int64))
  steps = np.asarray(steps).reshape(-1)
  return None if (steps < 0).any() else int(steps.min())
