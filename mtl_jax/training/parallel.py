"""Data parallelism: one pure train step, run with jit + sharding or with pmap.

`DataParallel` places the train state and batches on a device `Mesh` with one
`data` axis and compiles the pure step of `mtl_jax.training.step` for it:

* `parallelism="jit"` (default): `jax.jit` with explicit in/out shardings and a
  donated state. The global batch is sharded over `data`. With
  `sharding="replicated"` params and optimizer state are copied on every device;
  with `sharding="fsdp"` each array of the state is split over `data` along its
  largest divisible axis (arrays with no such axis stay replicated), so a model
  needs 1/N of the memory per device. XLA inserts the gathers; the numbers are the
  same either way.
* `parallelism="pmap"`: `jax.pmap` over this process's devices with the axis name
  `data`; the step `psum`s the per-task `(loss_sum, count)` over the axis before
  dividing, so task losses are global masked means, and `psum`s the gradients.

Both work across several processes (hosts): each process feeds only its own rows
of every global batch (`host_batch_size` of them, in process order), and global
arrays are assembled with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

AXIS = "data"
PARALLELISMS = ("jit", "pmap")
SHARDINGS = ("replicated", "fsdp")


def make_mesh(num_devices: int = -1, axis: str = AXIS) -> Mesh:
  """A 1-D mesh named `axis` over the first `num_devices` devices (-1: all).

  Raises:
    ValueError: more devices asked for than exist, or a subset of the devices in
      a multi-process run (every process must take part).
  """
  devices = jax.devices()
  if num_devices == -1:
    num_devices = len(devices)
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"mesh of {num_devices} devices asked for, but there are "
                     f"{len(devices)} ({jax.default_backend()})")
  if jax.process_count() > 1 and num_devices != len(devices):
    raise ValueError("a multi-process run must use all devices "
                     f"({len(devices)}), not {num_devices}")
  return Mesh(np.array(devices[:num_devices]), (axis,))


def fsdp_spec(shape: tuple[int, ...], num_shards: int, axis: str = AXIS) -> P:
  """Shards the largest axis divisible by `num_shards` (ties: the first)."""
  candidates = [i for i, d in enumerate(shape)
                if d >= num_shards and d % num_shards == 0]
  if not candidates:
    return P()
  best = max(candidates, key=lambda i: (shape[i], -i))
  spec = [None] * len(shape)
  spec[best] = axis
  return P(*spec)


def _host_array(x: Any) -> np.ndarray:
  """A process-local numpy copy of a fully replicated (or host) value."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_shards[0].data)
  return np.asarray(x)


class DataParallel:
  """Places state and batches on a mesh and compiles steps for it.

  Args:
    mesh: a mesh with the axis `axis` (see `make_mesh`).
    parallelism: "jit" or "pmap".
    sharding: "replicated" or "fsdp" (jit only).
    axis: the data axis name.

  Raises:
    ValueError: an unknown parallelism or sharding, or fsdp with pmap.
  """

  def __init__(self, mesh: Mesh, *, parallelism: str = "jit",
               sharding: str = "replicated", axis: str = AXIS):
    if parallelism not in PARALLELISMS:
      raise ValueError(f"unknown parallelism {parallelism!r}; valid: "
                       f"{', '.join(PARALLELISMS)}")
    if sharding not in SHARDINGS:
      raise ValueError(f"unknown sharding {sharding!r}; valid: "
                       f"{', '.join(SHARDINGS)}")
    if parallelism == "pmap" and sharding != "replicated":
      raise ValueError("sharding='fsdp' needs parallelism='jit': pmap keeps a "
                       "full copy of the state on every device")
    if axis not in mesh.axis_names:
      raise ValueError(f"mesh has no axis {axis!r}: {mesh.axis_names}")
    self.mesh = mesh
    self.parallelism = parallelism
    self.sharding = sharding
    self.axis = axis
    pid = jax.process_index()
    self.local_devices = [d for d in mesh.devices.flat if d.process_index == pid]
    self._local_mesh = Mesh(np.array(self.local_devices), (axis,))

  # ---------------------------------------------------------------- sizes

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def axis_name(self) -> str | None:
    """The collective axis the step must reduce over (None under jit)."""
    return self.axis if self.parallelism == "pmap" else None

  def check_batch_size(self, batch_size: int, name: str = "batch_size") -> None:
    """Raises ValueError unless `batch_size` splits evenly over the devices."""
    if batch_size % self.num_devices:
      raise ValueError(
          f"{name}={batch_size} is not divisible by the number of devices "
          f"({self.num_devices}); use a multiple of {self.num_devices}")

  def host_batch_size(self, batch_size: int) -> int:
    """Rows of each global batch that this process feeds."""
    self.check_batch_size(batch_size)
    return batch_size // jax.process_count()

  # ------------------------------------------------------------- shardings

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(self.axis))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def state_shardings(self, state: Any) -> Any:
    """The sharding of every leaf of `state` (jit mode)."""
    if self.sharding == "replicated":
      return jax.tree.map(lambda _: self.replicated, state)
    return jax.tree.map(
        lambda x: NamedSharding(self.mesh, fsdp_spec(np.shape(x),
                                                     self.num_devices,
                                                     self.axis)), state)

  # ------------------------------------------------------------- placement

  def put_state(self, state: Any) -> Any:
    """Places a host (or replicated) state for the compiled step.

    Every process must pass the same values (as after the same seeded init).
    """
    if self.parallelism == "pmap":
      n = len(self.local_devices)
      stacked_sharding = NamedSharding(self._local_mesh, P(self.axis))
      return jax.tree.map(
          lambda x: jax.device_put(
              np.broadcast_to(_host_array(x), (n,) + np.shape(x)),
              stacked_sharding), state)
    shardings = self.state_shardings(state)

    def place(x, sharding):
      value = _host_array(x)
      return jax.make_array_from_callback(value.shape, sharding,
                                          lambda idx: value[idx])

    return jax.tree.map(place, state, shardings)

  def put_batch(self, host_batch: Any) -> Any:
    """Turns this process's rows of a global batch into step inputs."""
    if self.parallelism == "pmap":
      n = len(self.local_devices)

      def split(x):
        x = np.asarray(x)
        if x.shape[0] % n:
          raise ValueError(f"host batch of {x.shape[0]} rows does not split "
                           f"over {n} local devices")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

      return jax.tree.map(split, host_batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            self.batch_sharding, np.asarray(x)), host_batch)

  def for_checkpoint(self, state: Any) -> Any:
    """The state as global arrays that every process can save together.

    Under jit this is the state itself; under pmap, one replica as a global,
    fully replicated array (a per-device stack cannot be restored on another
    device count).
    """
    if self.parallelism == "jit":
      return state

    def one_replica(x):
      value = np.asarray(x.addressable_shards[0].data)[0]
      return jax.make_array_from_callback(value.shape, self.replicated,
                                          lambda idx: value[idx])

    return jax.tree.map(one_replica, state)

  def from_checkpoint(self, restored: Any) -> Any:
    """Inverse of `for_checkpoint`."""
    return restored if self.parallelism == "jit" else self.put_state(restored)

  def unreplicate(self, state: Any) -> Any:
    """Host numpy values of a placed state (one replica under pmap)."""
    if self.parallelism == "pmap":
      return jax.tree.map(
          lambda x: np.asarray(x.addressable_shards[0].data)[0], state)
    return self.to_host(state)

  def to_host(self, outputs: Any) -> Any:
    """Host numpy values of compiled-step outputs (metrics, eval stats).

    Compiled steps return them as global scalars in both modes, replicated over
    the processes of a multi-process run.
    """
    return jax.tree.map(_host_array, outputs)

  def step_of(self, state: Any) -> int:
    step = state.step
    if self.parallelism == "pmap":
      return int(np.asarray(step.addressable_shards[0].data)[0])
    return int(_host_array(step))

  # ------------------------------------------------------------ compilation

  def compile_train_step(self, step: Callable, state: Any) -> Callable:
    """Compiles `step(state, batch) -> (state, metrics)`; state is donated.

    `step` must have been built with `axis_name=self.axis_name`. Metrics come
    back as scalars in both modes (replica 0 under pmap).
    """
    if self.parallelism == "pmap":
      pstep = jax.pmap(step, axis_name=self.axis, donate_argnums=0)

      def run(s, b):
        s, metrics = pstep(s, b)
        return s, jax.tree.map(lambda m: m[0], metrics)

      return run
    return jax.jit(step, in_shardings=(self.state_shardings(state),
                                       self.batch_sharding),
                   out_shardings=(self.state_shardings(state), self.replicated),
                   donate_argnums=0)

  def compile_eval_step(self, eval_step: Callable, params: Any) -> Callable:
    """Compiles `eval_step(params, batch) -> stats` (stats summed globally)."""
    if self.parallelism == "pmap":
      pstep = jax.pmap(eval_step, axis_name=self.axis)
      return lambda p, b: jax.tree.map(lambda m: m[0], pstep(p, b))
    return jax.jit(eval_step, in_shardings=(self.state_shardings(params),
                                            self.batch_sharding),
                   out_shardings=self.replicated)
