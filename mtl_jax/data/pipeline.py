"""Deterministic in-memory batching of numpy pytrees.

Training batches come from `ArrayBatcher`, which is stateless by step: the
batch at step `s` is a pure function of `(seed, s)`, so a restarted run resumes
its data stream exactly by knowing only the step it restored. Evaluation
batches come from `eval_batches`, which walks a split once, in order, padding
the last batch with rows whose masks are 0 so shapes never change.

Both work on any pytree of numpy arrays sharing a leading axis N (typically the
DESIGN.md batch format of a whole split) and return numpy arrays: putting them
on devices and sharding them is the training loop's job.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

PyTree = Any


def _num_rows(arrays: PyTree) -> int:
  """The common leading-axis length of every leaf.

  Raises:
    ValueError: no leaves, a scalar leaf, or leaves of different lengths.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(arrays)
  if not leaves:
    raise ValueError("arrays has no leaves.")
  lengths = {}
  for path, leaf in leaves:
    if np.ndim(leaf) == 0:
      raise ValueError(f"Leaf {jax.tree_util.keystr(path)} is a scalar; every "
                       "leaf needs a leading example axis.")
    lengths[jax.tree_util.keystr(path)] = np.shape(leaf)[0]
  if len(set(lengths.values())) != 1:
    raise ValueError(f"Leaves have different leading sizes: {lengths}.")
  return next(iter(lengths.values()))


def _check_host_shards(batch_size: int, num_host_shards: int,
                       host_index: int) -> None:
  if num_host_shards < 1:
    raise ValueError(f"num_host_shards must be >= 1, got {num_host_shards}.")
  if not 0 <= host_index < num_host_shards:
    raise ValueError(f"host_index must be in [0, {num_host_shards}), got "
                     f"{host_index}.")
  if batch_size % num_host_shards:
    raise ValueError(f"Global batch_size {batch_size} is not divisible by "
                     f"num_host_shards {num_host_shards}.")


class ArrayBatcher:
  """Shuffled, epoch-based batches of a numpy pytree, addressed by step.

  With `R = len(indices)` rows and global batch size `B`, an epoch has
  `steps_per_epoch = R // B` steps (the last `R % B` rows of each epoch's
  permutation are dropped, a different set every epoch). The batch at `step`
  uses epoch `e = step // steps_per_epoch`, the permutation
  `np.random.default_rng([seed, e]).permutation(R)` (identity order when
  `shuffle=False`) and its slice `[(step % steps_per_epoch) * B, ... + B)`.
  Each host then takes rows `[h * B / H, (h + 1) * B / H)` of that global
  batch, so the H hosts together see exactly the global batch, disjointly.

  The object holds no iteration state: `batch_at` is pure and the
  iterator's position is just the step, which makes checkpoint resume exact.

  Attributes:
    batch_size: global batch size B (all hosts).
    per_host_batch_size: B // num_host_shards, the leading size returned.
    steps_per_epoch: R // B.
    num_rows: R, the number of rows drawn from.
  """

  def __init__(self, arrays: PyTree, *, batch_size: int, seed: int,
               shuffle: bool = True,
               indices: Sequence[int] | np.ndarray | None = None,
               num_host_shards: int = 1, host_index: int = 0):
    """Builds the batcher.

    Args:
      arrays: pytree of numpy arrays with a common leading axis N.
      batch_size: global batch size B.
      seed: non-negative integer; with the step it fixes every batch.
      shuffle: reshuffle every epoch; if False, every epoch walks `indices`
        in order.
      indices: int [R] rows of `arrays` to draw from (e.g. all but the
        unlabelled pool); default all N rows. Repeats are allowed and are
        then drawn as many times per epoch as they appear.
      num_host_shards: H, the number of hosts sharing each global batch.
      host_index: this host's position h in [0, H).

    Raises:
      ValueError: inconsistent leaf sizes, indices out of range or not 1-D,
        a batch larger than the rows available, a negative seed, or a host
        layout that does not divide the batch.
    """
    n = _num_rows(arrays)
    if indices is None:
      indices = np.arange(n)
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (indices.size == 0 or
                                 np.issubdtype(indices.dtype, np.integer)):
      raise ValueError(f"indices must be a 1-D integer array, got dtype "
                       f"{indices.dtype} and shape {indices.shape}.")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      raise ValueError(f"indices must lie in [0, {n}), got values in "
                       f"[{indices.min()}, {indices.max()}].")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if batch_size > len(indices):
      raise ValueError(f"batch_size {batch_size} is larger than the "
                       f"{len(indices)} rows available to draw from.")
    if seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    _check_host_shards(batch_size, num_host_shards, host_index)

    self._arrays = arrays
    self._indices = indices.astype(np.int64)
    self._seed = int(seed)
    self._shuffle = shuffle
    self._host_slice = slice(host_index * batch_size // num_host_shards,
                             (host_index + 1) * batch_size // num_host_shards)
    self.batch_size = batch_size
    self.per_host_batch_size = batch_size // num_host_shards
    self.num_rows = len(self._indices)
    self.steps_per_epoch = self.num_rows // batch_size
    # (epoch, row order) of the last epoch asked for. A cache only: results
    # never depend on it. One tuple, swapped whole, so that concurrent
    # callers (a prefetch thread) cannot pair one epoch with another's order.
    self._cache = (None, None)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    """Rows of `arrays` in the order epoch `epoch` visits them. int64 [R]."""
    cached_epoch, order = self._cache
    if cached_epoch != epoch:
      if self._shuffle:
        perm = np.random.default_rng([self._seed, epoch]).permutation(
            self.num_rows)
        order = self._indices[perm]
      else:
        order = self._indices
      self._cache = (epoch, order)
    return order

  def rows_at(self, step: int) -> np.ndarray:
    """The row indices (into `arrays`) of this host's batch at `step`.

    Args:
      step: non-negative global training step.

    Returns:
      int64 [B // H].

    Raises:
      ValueError: negative step.
    """
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    epoch, position = divmod(int(step), self.steps_per_epoch)
    start = position * self.batch_size
    rows = self._epoch_order(epoch)[start:start + self.batch_size]  # [B]
    return rows[self._host_slice]

  def batch_at(self, step: int) -> PyTree:
    """This host's batch at `step`: `arrays` gathered at `rows_at(step)`.

    Args:
      step: non-negative global training step.

    Returns:
      A pytree like `arrays` with leading size B // H.

    Raises:
      ValueError: negative step.
    """
    rows = self.rows_at(step)
    return jax.tree.map(lambda a: a[rows], self._arrays)

  def iterate(self, start_step: int = 0) -> Iterator[PyTree]:
    """Yields `batch_at(start_step)`, `batch_at(start_step + 1)`, ... forever.

    Args:
      start_step: the step to resume from (the restored training step).

    Yields:
      Batches as from `batch_at`.
    """
    step = start_step
    while True:
      yield self.batch_at(step)
      step += 1

  def __iter__(self) -> Iterator[PyTree]:
    return self.iterate(0)


def eval_batches(arrays: PyTree, batch_size: int, *, num_host_shards: int = 1,
                 host_index: int = 0) -> Iterator[PyTree]:
  """Walks a whole split once, in order, in fixed-shape batches.

  The last batch is padded to `batch_size` with all-zero rows. Because their
  masks are 0, masked sums and counts over the batches count every real
  example exactly once and the padding never. With several hosts, each
  global batch is split as in `ArrayBatcher` (host h takes rows
  `[h * B / H, (h + 1) * B / H)`), and all hosts yield the same number of
  batches.

  Args:
    arrays: batch-format pytree of numpy arrays with leading axis N; it must
      hold a non-empty "masks" dict, since the masks are what mark padding.
    batch_size: global batch size B.
    num_host_shards: H, hosts sharing each global batch.
    host_index: this host's h in [0, H).

  Returns:
    An iterator over `ceil(N / B)` pytrees like `arrays`, each with leading
    size B // H.

  Raises:
    ValueError: no "masks" entry, inconsistent leaf sizes, batch_size < 1,
      or a host layout that does not divide the batch.
  """
  if not isinstance(arrays, dict) or not arrays.get("masks"):
    raise ValueError("eval_batches needs batch-format arrays with a non-empty "
                     "'masks' dict, so that padding rows can be masked out.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  _check_host_shards(batch_size, num_host_shards, host_index)
  n = _num_rows(arrays)
  per_host = batch_size // num_host_shards
  host_slice = slice(host_index * per_host, (host_index + 1) * per_host)

  def take(a: np.ndarray, start: int) -> np.ndarray:
    chunk = a[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + a.shape[1:], a.dtype)])
    return chunk[host_slice]

  # A nested generator so that the checks above run at the call, not at the
  # first `next`.
  def batches() -> Iterator[PyTree]:
    for start in range(0, n, batch_size):
      yield jax.tree.map(lambda a, s=start: take(np.asarray(a), s), arrays)

  return batches()
