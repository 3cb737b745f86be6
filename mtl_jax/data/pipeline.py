"""Reading batches ahead of the train step, without losing the iterator position.

`Prefetcher` runs a checkpointable iterator (one with `get_state`, such as
`mixture.MixtureIterator`) in a background thread, `size` batches ahead, and
optionally transforms each batch there (e.g. putting it on the devices), so
that reading and converting the next batches overlaps the current train step.
Its own `get_state()` is the state right after the last batch it HANDED OUT,
not the position of the thread, so saving it with a checkpoint resumes exactly
at the next batch the train step would have seen.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol


class CheckpointableIterator(Protocol):
  def __next__(self) -> Any:
    ...

  def get_state(self) -> Any:
    ...


_DONE = object()


class Prefetcher(Iterator[Any]):
  """Iterates `iterator` in a background thread, `size` items ahead.

  Args:
    iterator: the source iterator; after `Prefetcher` takes it, only the
      prefetcher may advance it.
    size: how many items to read ahead (>= 1).
    transform: applied to each item in the thread (default: none).

  An exception raised by the iterator or the transform is re-raised by the
  `next` call that would have returned that item. Call `close()` (or use it as
  a context manager) to stop the thread early.
  """

  def __init__(self, iterator: CheckpointableIterator, size: int = 2,
               transform: Callable[[Any], Any] | None = None):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    self._state = iterator.get_state()
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(
        target=self._run, args=(iterator, transform), daemon=True,
        name="mtl_jax-prefetch")
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, iterator, transform) -> None:
    try:
      while not self._stop.is_set():
        try:
          item = next(iterator)
        except StopIteration:
          self._put((_DONE, None, None))
          return
        state = iterator.get_state()
        if transform is not None:
          item = transform(item)
        if not self._put((item, state, None)):
          return
    except BaseException as e:  # handed to the consumer, raised there
      self._put((None, None, e))

  def __next__(self) -> Any:
    if self._stop.is_set():
      raise StopIteration
    item, state, error = self._queue.get()
    if error is not None:
      self.close()
      raise error
    if item is _DONE:
      self.close()
      raise StopIteration
    self._state = state
    return item

  def get_state(self) -> Any:
    """The source iterator's state after the last item returned by `next`."""
    return self._state

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=10)

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
