"""Orbax checkpoints of the TrainState in a run's workdir.

Orbax writes each step into a temporary directory and renames it when complete
(and marks it committed), so a crash during a save never damages an earlier
checkpoint; `latest_step` only ever sees finished ones. Each step directory holds
two items: `state` (the TrainState, any sharding) and `data` (the data
iterator's JSON state, e.g. `MixtureIterator.get_state()`), written together, so
a restored run continues with exactly the batches an uninterrupted one would see.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores `TrainState`s under `<workdir>/checkpoints`.

  Args:
    directory: where the step directories live.
    max_to_keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_state: Any = None,
           wait: bool = False) -> None:
    """Saves `state` (and the data iterator's `data_state`) as `step`.

    Asynchronous unless `wait`. `data_state` must be JSON-serialisable; None
    saves none (a run whose batches are a pure function of the step).
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    if wait:
      self._manager.wait_until_finished()

  def restore(self, state_like: Any, step: int | None = None) -> Any:
    """Restores checkpoint `step` (the latest by default) shaped like `state_like`.

    `state_like` gives the tree structure, shapes, dtypes and shardings (e.g. the
    freshly initialised state); its values are not used.

    Raises:
      FileNotFoundError: there is no checkpoint to restore.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    return self._manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract))).state

  def data_state(self, step: int | None = None) -> Any:
    """The data iterator state saved with checkpoint `step` (latest by default).

    Returns:
      The JSON value given to `save`, or None if that checkpoint has none.

    Raises:
      FileNotFoundError: there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if not os.path.isdir(os.path.join(self.directory, str(int(step)), "data")):
      return None
    return self._manager.restore(int(step), args=ocp.args.Composite(
        data=ocp.args.JsonRestore())).data

  def read(self, step: int | None = None) -> Any:
    """Reads checkpoint `step` (the latest by default) as host numpy arrays.

    Needs no template and works whatever devices or processes wrote it (e.g. to
    compare the params of two runs, or to inspect a pod run on a laptop). The
    tree comes back as nested dicts (NamedTuples of optimizer states become
    dicts).

    Raises:
      FileNotFoundError: there is no checkpoint to read.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    path = os.path.join(self.directory, str(int(step)), "state")
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        metadata)
    return jax.device_get(checkpointer.restore(path, target))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
