"""Tests for mtl_jax.data.pipeline."""

import itertools

import numpy as np
import pytest

from mtl_jax.data import pipeline


def _arrays(n):
  """A batch-format pytree whose `inputs` identify each row by its index."""
  return {
      "inputs": np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3)),
      "labels": {"a": np.arange(n, dtype=np.int32) * 10},
      "masks": {"a": np.ones(n, dtype=np.float32)},
  }


def _ids(batch):
  return batch["inputs"][:, 0].astype(int)


def test_batch_matches_closed_form():
  batcher = pipeline.ArrayBatcher(_arrays(10), batch_size=3, seed=7)
  assert batcher.steps_per_epoch == 3
  for step in range(8):
    epoch, pos = divmod(step, 3)
    perm = np.random.default_rng([7, epoch]).permutation(10)
    expected = perm[pos * 3:(pos + 1) * 3]
    batch = batcher.batch_at(step)
    np.testing.assert_array_equal(_ids(batch), expected)
    np.testing.assert_array_equal(batch["labels"]["a"], expected * 10)
    assert batch["masks"]["a"].shape == (3,)


def test_deterministic_and_seed_dependent():
  a = pipeline.ArrayBatcher(_arrays(20), batch_size=4, seed=0)
  b = pipeline.ArrayBatcher(_arrays(20), batch_size=4, seed=0)
  c = pipeline.ArrayBatcher(_arrays(20), batch_size=4, seed=1)
  steps = [0, 3, 4, 11, 2, 0]  # out of order on purpose: no hidden state
  for s in steps:
    np.testing.assert_array_equal(_ids(a.batch_at(s)), _ids(b.batch_at(s)))
  assert any(not np.array_equal(_ids(a.batch_at(s)), _ids(c.batch_at(s)))
             for s in range(10))


def test_each_epoch_is_a_permutation():
  n, bs = 12, 4
  batcher = pipeline.ArrayBatcher(_arrays(n), batch_size=bs, seed=3)
  orders = []
  for epoch in range(3):
    ids = np.concatenate([_ids(batcher.batch_at(epoch * 3 + k))
                          for k in range(3)])
    np.testing.assert_array_equal(np.sort(ids), np.arange(n))
    orders.append(ids)
  assert not np.array_equal(orders[0], orders[1])  # reshuffled per epoch


def test_drop_remainder():
  batcher = pipeline.ArrayBatcher(_arrays(10), batch_size=4, seed=0)
  assert batcher.steps_per_epoch == 2
  ids = np.concatenate([_ids(batcher.batch_at(k)) for k in range(2)])
  assert len(np.unique(ids)) == 8


def test_no_shuffle_walks_in_order():
  batcher = pipeline.ArrayBatcher(_arrays(6), batch_size=2, seed=0,
                                  shuffle=False)
  ids = [_ids(batcher.batch_at(s)).tolist() for s in range(4)]
  assert ids == [[0, 1], [2, 3], [4, 5], [0, 1]]


def test_indices_subset():
  indices = np.array([1, 4, 5, 8, 9, 13])
  batcher = pipeline.ArrayBatcher(_arrays(15), batch_size=2, seed=5,
                                  indices=indices)
  assert batcher.steps_per_epoch == 3
  for epoch in range(2):
    ids = np.concatenate([_ids(batcher.batch_at(epoch * 3 + k))
                          for k in range(3)])
    np.testing.assert_array_equal(np.sort(ids), indices)


def test_host_shards_partition_global_batch():
  arrays = _arrays(32)
  global_batcher = pipeline.ArrayBatcher(arrays, batch_size=8, seed=2)
  hosts = [pipeline.ArrayBatcher(arrays, batch_size=8, seed=2,
                                 num_host_shards=4, host_index=h)
           for h in range(4)]
  assert hosts[0].per_host_batch_size == 2
  for step in range(6):
    parts = [_ids(h.batch_at(step)) for h in hosts]
    assert all(len(p) == 2 for p in parts)
    assert len(np.unique(np.concatenate(parts))) == 8  # disjoint
    np.testing.assert_array_equal(np.concatenate(parts),
                                  _ids(global_batcher.batch_at(step)))


def test_iterate_resumes_exactly():
  batcher = pipeline.ArrayBatcher(_arrays(10), batch_size=3, seed=4)
  full = [_ids(b) for b in itertools.islice(batcher.iterate(), 10)]
  resumed = [_ids(b) for b in itertools.islice(batcher.iterate(6), 4)]
  for x, y in zip(full[6:], resumed):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(_ids(next(iter(batcher))), full[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=11), "batch_size 11 .* 10 rows"),
    (dict(batch_size=4, indices=[0, 1, 2]), "batch_size 4 .* 3 rows"),
    (dict(batch_size=4, indices=[0, 10]), r"\[0, 10\)"),
    (dict(batch_size=6, num_host_shards=4), "not divisible"),
    (dict(batch_size=4, num_host_shards=2, host_index=2), "host_index"),
    (dict(batch_size=2, seed=-1), "seed"),
])
def test_batcher_errors(kwargs, match):
  kwargs = {"seed": 0, **kwargs}
  with pytest.raises(ValueError, match=match):
    pipeline.ArrayBatcher(_arrays(10), **kwargs)


def test_mismatched_leaves_error():
  arrays = {"inputs": np.zeros((5, 2)), "masks": {"a": np.zeros(4)}}
  with pytest.raises(ValueError, match="different leading sizes"):
    pipeline.ArrayBatcher(arrays, batch_size=2, seed=0)


def test_eval_batches_cover_each_example_once():
  arrays = _arrays(10)
  arrays["masks"]["a"][3] = 0.0  # a real unlabelled example stays unlabelled
  batches = list(pipeline.eval_batches(arrays, batch_size=4))
  assert len(batches) == 3
  for b in batches:
    assert b["inputs"].shape == (4, 3) and b["masks"]["a"].shape == (4,)
  last = batches[-1]
  np.testing.assert_array_equal(last["masks"]["a"], [1, 1, 0, 0])
  np.testing.assert_array_equal(last["labels"]["a"], [80, 90, 0, 0])
  ids = np.concatenate([_ids(b) for b in batches])[:10]
  np.testing.assert_array_equal(ids, np.arange(10))
  count = sum(b["masks"]["a"].sum() for b in batches)
  label_sum = sum((b["labels"]["a"] * b["masks"]["a"]).sum() for b in batches)
  assert count == 9
  assert label_sum == 10 * sum(range(10)) - 30


def test_eval_batches_host_shards():
  arrays = _arrays(10)
  per_host = [list(pipeline.eval_batches(arrays, 4, num_host_shards=2,
                                         host_index=h)) for h in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == 3
  merged = [np.concatenate([_ids(per_host[0][i]), _ids(per_host[1][i])])
            for i in range(3)]
  np.testing.assert_array_equal(np.concatenate(merged)[:10], np.arange(10))
  total = sum(b["masks"]["a"].sum() for h in per_host for b in h)
  assert total == 10


def test_eval_batches_needs_masks():
  with pytest.raises(ValueError, match="masks"):
    pipeline.eval_batches({"inputs": np.zeros((3, 2))}, 2)  # eager check
