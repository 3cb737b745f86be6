"""K-means: recovers separated blobs with the hand-computed inertia, is
deterministic for a key, seeds with distinct rows of weight > 0, follows the
documented empty-cluster rule without NaN, warm-starts to a fixed point,
ignores rows of weight 0, runs under jit with static k/num_iters, and rejects
bad input with a message naming the problem."""

import itertools

import jax
import numpy as np
import pytest

from mtl_jax.pretext import kmeans as km

KEY = jax.random.PRNGKey(0)
BLOB_MEANS = np.array([[0., 0.], [10., 0.], [0., 10.], [10., 10.]], np.float32)

kmeans_jit = jax.jit(km.kmeans, static_argnames=("k", "num_iters"))
plus_plus_jit = jax.jit(km.kmeans_plus_plus, static_argnames=("k",))


def _blobs(means=BLOB_MEANS, per_blob=50, std=0.5, seed=0):
  """`(x [B * per_blob, D] float32, labels [B * per_blob])`, blobs in order."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(len(means)), per_blob)
  noise = rng.normal(0.0, std, (len(labels), means.shape[1]))
  return (means[labels] + noise).astype(np.float32), labels


def _permutation(assignments, labels):
  """The map label -> cluster id, asserting it is one-to-one and exact."""
  assignments = np.asarray(assignments)
  mapping = {}
  for label in np.unique(labels):
    ids = np.unique(assignments[labels == label])
    assert len(ids) == 1, (label, ids)
    mapping[int(label)] = int(ids[0])
  assert len(set(mapping.values())) == len(mapping), mapping
  return mapping


def _row_index(x, point):
  """The indices of the rows of `x` equal to `point`."""
  return np.flatnonzero(np.all(np.asarray(x) == np.asarray(point), axis=1))


def test_init_state_has_the_structure_of_a_fit():
  state = km.init_state(4, 2)
  x, _ = _blobs()
  fitted, _ = kmeans_jit(KEY, x, k=4)
  assert (jax.tree.structure(state) == jax.tree.structure(fitted))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(fitted)):
    assert a.shape == b.shape and a.dtype == b.dtype
  assert state.centroids.shape == (4, 2)
  assert state.centroids.dtype == np.float32
  assert state.counts.shape == (4,) and state.inertia.shape == ()
  assert state.num_fits.dtype == np.int32 and int(state.num_fits) == 0
  assert not np.any(np.asarray(state.centroids)) and not state.inertia
  assert int(fitted.num_fits) == 1


def test_recovers_separated_blobs():
  x, labels = _blobs()
  state, assignments = kmeans_jit(KEY, x, k=4)
  assert assignments.dtype == np.int32 and assignments.shape == (200,)
  mapping = _permutation(assignments, labels)
  np.testing.assert_array_equal(state.counts, np.full(4, 50.0))
  empirical = np.stack([x[labels == b].mean(0) for b in range(4)])  # [4, 2]
  for label, cluster in mapping.items():
    np.testing.assert_allclose(state.centroids[cluster], empirical[label],
                               atol=1e-5)
    np.testing.assert_allclose(state.centroids[cluster], BLOB_MEANS[label],
                               atol=0.2)
  inertia = np.sum((x.astype(np.float64) - empirical[labels]) ** 2)
  np.testing.assert_allclose(float(state.inertia), inertia, rtol=1e-5)


def test_deterministic_for_a_key_and_same_partition_across_keys():
  x, labels = _blobs()
  first = kmeans_jit(KEY, x, k=4)
  second = kmeans_jit(KEY, x, k=4)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(plus_plus_jit(KEY, x, k=4),
                                plus_plus_jit(KEY, x, k=4))
  seeds = [np.asarray(plus_plus_jit(jax.random.PRNGKey(s), x, k=4))
           for s in range(5)]
  assert any(not np.array_equal(a, b)
             for a, b in itertools.combinations(seeds, 2))
  for s in range(5):
    _, assignments = kmeans_jit(jax.random.PRNGKey(s), x, k=4)
    _permutation(assignments, labels)  # the true partition, up to ids


def test_kmeans_plus_plus_picks_k_distinct_rows():
  x = np.random.default_rng(1).normal(size=(30, 3)).astype(np.float32)
  for seed in range(3):
    centroids = plus_plus_jit(jax.random.PRNGKey(seed), x, k=10)
    assert centroids.shape == (10, 3) and centroids.dtype == np.float32
    rows = [_row_index(x, c) for c in np.asarray(centroids)]
    assert all(len(r) == 1 for r in rows), rows
    assert len({int(r[0]) for r in rows}) == 10


def test_kmeans_plus_plus_never_picks_a_row_with_weight_zero():
  rng = np.random.default_rng(2)
  # Far outliers would be D^2 sampling's favourites if they counted.
  x = np.concatenate([rng.normal(size=(20, 2)),
                      rng.normal(1000.0, 1.0, (5, 2))]).astype(np.float32)
  weights = np.concatenate([np.ones(20), np.zeros(5)]).astype(np.float32)
  for seed in range(10):
    centroids = plus_plus_jit(jax.random.PRNGKey(seed), x, k=8,
                              weights=weights)
    rows = [_row_index(x, c) for c in np.asarray(centroids)]
    assert all(len(r) == 1 and r[0] < 20 for r in rows), rows
    assert len({int(r[0]) for r in rows}) == 8


def test_kmeans_plus_plus_with_fewer_distinct_points_than_k():
  points = np.array([[0., 0.], [1., 0.], [0., 1.]], np.float32)
  x = np.repeat(points, [10, 20, 30], axis=0)
  centroids = np.asarray(plus_plus_jit(KEY, x, k=5))
  # The first three are the three points; the rest repeat some of them.
  assert {tuple(c) for c in centroids[:3]} == {tuple(p) for p in points}
  assert all(tuple(c) in {tuple(p) for p in points} for c in centroids)


def test_fewer_distinct_points_than_k_leaves_exact_empty_clusters():
  points = np.array([[0., 0.], [1., 0.], [0., 1.]], np.float32)
  x = np.repeat(points, [10, 20, 30], axis=0)
  labels = np.repeat(np.arange(3), [10, 20, 30])
  for seed in range(3):
    state, assignments = kmeans_jit(jax.random.PRNGKey(seed), x, k=5)
    assert np.all(np.isfinite(state.centroids))
    np.testing.assert_array_equal(np.sort(state.counts), [0, 0, 10, 20, 30])
    assert float(np.sum(state.counts)) == 60.0
    assert float(state.inertia) == 0.0
    mapping = _permutation(assignments, labels)
    for label, cluster in mapping.items():
      np.testing.assert_array_equal(state.centroids[cluster], points[label])


def _expected_step(x, init):
  """One Lloyd iteration with the documented rule, in float64 numpy."""
  x64 = x.astype(np.float64)
  sq = ((x64[:, None, :] - init[None, :, :]) ** 2).sum(-1)  # [N, k]
  assignments = sq.argmin(1)
  dist = sq.min(1)  # [N]
  centroids = init.astype(np.float64).copy()
  for j in range(len(init)):
    if np.any(assignments == j):
      centroids[j] = x64[assignments == j].mean(0)
  for j in range(len(init)):  # empty clusters in id order
    if not np.any(assignments == j) and dist.max() > 0:
      row = int(dist.argmax())
      centroids[j] = x64[row]
      dist = np.minimum(dist, ((x64 - x64[row]) ** 2).sum(-1))
  return centroids


def test_empty_clusters_move_to_the_farthest_rows_in_id_order():
  means = BLOB_MEANS[:3]
  x, labels = _blobs(means)
  # Cluster 1 sits between blobs 1 and 2; clusters 2 and 3 are far from all.
  init = np.array([[0., 0.], [5., 5.], [1000., 1000.], [-1000., 50.]],
                  np.float32)
  state, _ = kmeans_jit(KEY, x, k=4, num_iters=1, init=init)
  expected = _expected_step(x, init)
  np.testing.assert_allclose(state.centroids[:2], expected[:2], atol=1e-5)
  # The relocated centroids are exactly the chosen rows.
  np.testing.assert_array_equal(state.centroids[2:],
                                expected[2:].astype(np.float32))
  assert not np.array_equal(state.centroids[2], state.centroids[3])
  # Iterating on: the three blobs, plus the 4th cluster splitting one of them.
  state, assignments = kmeans_jit(KEY, x, k=4, num_iters=20, init=init)
  assert np.all(np.isfinite(state.centroids))
  assert np.all(state.counts > 0) and float(np.sum(state.counts)) == 150.0
  np.testing.assert_array_equal(
      state.counts, np.bincount(np.asarray(assignments), minlength=4))


def test_at_least_k_distinct_points_end_in_k_nonempty_clusters():
  points = np.array([[0., 0.], [4., 0.], [0., 4.], [4., 4.], [8., 8.],
                     [-3., 5.]], np.float32)
  multiplicities = [3, 5, 7, 11, 13, 2]
  x = np.repeat(points, multiplicities, axis=0)
  # All centroids start on one spot: five empty clusters at the first step.
  init = np.zeros((6, 2), np.float32)
  state, assignments = kmeans_jit(KEY, x, k=6, num_iters=10, init=init)
  np.testing.assert_array_equal(np.sort(state.counts), sorted(multiplicities))
  _permutation(assignments, np.repeat(np.arange(6), multiplicities))
  assert float(state.inertia) == 0.0


def test_warm_start_from_converged_centroids_is_a_fixed_point():
  x, labels = _blobs()
  state, assignments = kmeans_jit(KEY, x, k=4)
  again, again_assignments = kmeans_jit(jax.random.PRNGKey(7), x, k=4,
                                        num_iters=5, init=state.centroids)
  np.testing.assert_array_equal(again.centroids, state.centroids)
  np.testing.assert_array_equal(again_assignments, assignments)
  np.testing.assert_array_equal(again.counts, state.counts)


def test_refit_seeds_once_then_warm_starts_with_stable_ids():
  x, labels = _blobs()
  refit = jax.jit(km.refit, static_argnames=("num_iters",))
  first, assignments = refit(KEY, km.init_state(4, 2), x)
  expected, expected_assignments = kmeans_jit(KEY, x, k=4)
  np.testing.assert_array_equal(first.centroids, expected.centroids)
  np.testing.assert_array_equal(assignments, expected_assignments)
  assert int(first.num_fits) == 1
  # New features of the same rows, shifted: the ids stay those of the last fit.
  second, moved = refit(jax.random.PRNGKey(3), first, x + 0.3)
  assert int(second.num_fits) == 2
  np.testing.assert_array_equal(moved, assignments)
  np.testing.assert_allclose(second.centroids, first.centroids + 0.3,
                             atol=1e-5)


def test_assign_matches_brute_force_numpy():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(64, 5)).astype(np.float32)
  centroids = rng.normal(size=(7, 5)).astype(np.float32)
  assignments, sq = jax.jit(km.assign)(x, centroids)
  brute = ((x.astype(np.float64)[:, None] - centroids[None]) ** 2).sum(-1)
  assert assignments.dtype == np.int32
  np.testing.assert_array_equal(assignments, brute.argmin(1))
  np.testing.assert_allclose(sq, brute.min(1), rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(sq) >= 0)


def test_rows_with_weight_zero_do_not_influence_the_fit():
  x, labels = _blobs(BLOB_MEANS[:3], per_blob=20, seed=5)
  junk = np.random.default_rng(6).normal(50.0, 20.0, (15, 2))
  order = np.random.default_rng(7).permutation(75)
  x_full = np.concatenate([x, junk]).astype(np.float32)[order]
  weights = (order < 60).astype(np.float32)  # the junk rows have weight 0
  init = np.asarray(km.kmeans_plus_plus(KEY, x, 3))
  sub, sub_assignments = kmeans_jit(KEY, x, k=3, init=init)
  full, full_assignments = kmeans_jit(KEY, x_full, k=3, init=init,
                                      weights=weights)
  np.testing.assert_allclose(full.centroids, sub.centroids, atol=1e-5)
  np.testing.assert_array_equal(full.counts, sub.counts)
  np.testing.assert_allclose(full.inertia, sub.inertia, rtol=1e-5)
  np.testing.assert_array_equal(full_assignments[weights > 0],
                                sub_assignments[order[order < 60]])
  # An empty cluster is relocated to the farthest row of weight > 0, not to
  # the (farther) junk.
  far = np.array([[0., 0.], [10., 0.], [1000., 1000.]], np.float32)
  sub, _ = kmeans_jit(KEY, x, k=3, num_iters=1, init=far)
  full, _ = kmeans_jit(KEY, x_full, k=3, num_iters=1, init=far,
                       weights=weights)
  assert len(_row_index(x, sub.centroids[2])) == 1
  np.testing.assert_allclose(full.centroids, sub.centroids, atol=1e-5)
  # Seeded by k-means++ with the weights: the blobs, never the junk.
  seeded, assignments = kmeans_jit(KEY, x_full, k=3, weights=weights)
  _permutation(np.asarray(assignments)[weights > 0], labels[order[order < 60]])
  assert float(np.sum(seeded.counts)) == 60.0


def test_k_and_num_iters_must_be_static_under_jit():
  x, _ = _blobs()
  with pytest.raises(TypeError, match="k must be a static Python int"):
    jax.jit(km.kmeans)(KEY, x, 4)
  state, _ = kmeans_jit(KEY, x, k=4, num_iters=3)
  assert state.centroids.shape == (4, 2)


@pytest.mark.parametrize("call, message", [
    (lambda x: km.kmeans(KEY, x[:, 0], 2), r"x must be a matrix \[N, D\]"),
    (lambda x: km.kmeans(KEY, x.astype(np.int32), 2), "x must be float"),
    (lambda x: km.kmeans(KEY, x, 0), "k must be >= 1"),
    (lambda x: km.kmeans(KEY, x, 201), "k=201 clusters need at least k rows"),
    (lambda x: km.kmeans(KEY, x, 2, num_iters=0), "num_iters must be >= 1"),
    (lambda x: km.kmeans(KEY, x, 2, init=np.zeros((3, 2), np.float32)),
     r"init must be \[k, D\] = \(2, 2\)"),
    (lambda x: km.kmeans(KEY, x, 2, weights=np.ones(5)),
     r"weights must be \[N\] = \(200,\)"),
    (lambda x: km.kmeans(KEY, x, 2, weights=-np.ones(200)),
     "weights must be finite and >= 0"),
    (lambda x: km.kmeans_plus_plus(KEY, x, 3, weights=np.eye(200)[0]),
     "k=3 clusters need at least k rows with weight > 0, got 1"),
    (lambda x: km.assign(x, np.zeros((3, 5), np.float32)),
     r"centroids must be \[k, D\] = \('k', 2\)"),
    (lambda x: km.init_state(0, 2), "k must be >= 1"),
])
def test_bad_input_is_rejected_with_a_message(call, message):
  x, _ = _blobs()
  with pytest.raises(ValueError, match=message):
    call(x)
