"""Tests of the Prefetcher: same items, exact state, errors and shutdown."""

import numpy as np
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import mixture
from mtl_jax.data import pipeline


class _Counter:
  """A checkpointable iterator: yields 0, 1, 2, ...; state = next value."""

  def __init__(self, start=0, fail_at=None, stop_at=None):
    self.next_value = start
    self.fail_at, self.stop_at = fail_at, stop_at

  def __next__(self):
    if self.next_value == self.stop_at:
      raise StopIteration
    if self.next_value == self.fail_at:
      raise OSError(f"disk gone at {self.fail_at}")
    value = self.next_value
    self.next_value += 1
    return value

  def get_state(self):
    return {"next": self.next_value}


def test_items_in_order_and_state_is_after_the_last_item_handed_out():
  with pipeline.Prefetcher(_Counter(), size=3) as p:
    assert p.get_state() == {"next": 0}
    assert [next(p) for _ in range(5)] == [0, 1, 2, 3, 4]
    # The thread has read ahead, but the state is that of item 4.
    assert p.get_state() == {"next": 5}


def test_transform_runs_on_each_item():
  with pipeline.Prefetcher(_Counter(), size=2, transform=lambda x: x * 10) as p:
    assert [next(p) for _ in range(3)] == [0, 10, 20]


def test_error_is_raised_at_the_item_that_failed():
  p = pipeline.Prefetcher(_Counter(fail_at=2), size=4)
  assert next(p) == 0 and next(p) == 1
  with pytest.raises(OSError, match="disk gone at 2"):
    next(p)
  assert p.get_state() == {"next": 2}


def test_stop_iteration_ends_and_close_stops_the_thread():
  p = pipeline.Prefetcher(_Counter(stop_at=3), size=2)
  assert list(p) == [0, 1, 2]
  q = pipeline.Prefetcher(_Counter(), size=2)
  next(q)
  q.close()
  assert not q._thread.is_alive()
  with pytest.raises(ValueError, match="size"):
    pipeline.Prefetcher(_Counter(), size=0)


def test_resuming_from_prefetcher_state_continues_the_mixture_exactly():
  tasks = tasks_lib.TaskSet([tasks_lib.regression_task("y")])
  x = np.arange(40, dtype=np.float32)[:, None]
  arrays = {"inputs": x, "labels": {"y": x[:, 0]},
            "masks": {"y": np.ones(40, np.float32)}}
  mix = mixture.Mixture([mixture.array_component("a", arrays)], tasks,
                        batch_size=8, seed=1)
  straight = mix.iterator()
  expected = [next(straight)["inputs"][:, 0] for _ in range(9)]
  with pipeline.Prefetcher(mix.iterator(), size=3) as p:
    first = [next(p)["inputs"][:, 0] for _ in range(4)]
    state = p.get_state()
  resumed = mix.iterator(state)
  rest = [next(resumed)["inputs"][:, 0] for _ in range(5)]
  for got, want in zip(first + rest, expected):
    np.testing.assert_array_equal(got, want)
