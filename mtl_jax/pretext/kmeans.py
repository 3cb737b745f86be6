"""K-means in pure JAX, for DeepCluster-style pseudo-labels.

Every few steps the train step fits k-means to the shared features of a sample
of training rows; the centroids are kept in the TrainState (`KMeansState`, from
`init_state` at step 0, so checkpoints have a fixed structure) and each
training row's pseudo-label is its nearest centroid (`assign`).

Everything here is jit-able with static shapes and no host callbacks: `k` and
`num_iters` are static Python ints (`jax.jit(kmeans, static_argnames=("k",
"num_iters"))`), inputs are checked at trace time, and the result is
bit-identical for the same key and inputs on one backend.

Algorithm:
  - Seeding: k-means++ (`kmeans_plus_plus`, D^2 sampling), or the given `init`
    centroids. Warm-starting from the previous fit's centroids keeps cluster
    ids stable between refits (cluster j stays near where it was), so the
    pseudo-label heads do not see their classes permuted at every refit;
    `refit` does this once a state has been fitted.
  - Lloyd iterations: exactly `num_iters` of them (`lax.fori_loop`; there is no
    early stop, so the cost is fixed and known; once assignments stop changing
    further iterations leave the centroids unchanged). Each one assigns every
    row to its nearest centroid, moves every non-empty cluster to the weighted
    mean of its rows, and relocates the empty clusters (below).
  - The result's assignments, counts and inertia are those of a final
    assignment to the returned centroids, so they are consistent with them.

Empty clusters (the rule `kmeans` follows in each Lloyd iteration): the rows
with weight > 0 are given their squared distance to their assigned centroid.
The empty clusters, in increasing id order, each take the row farthest from
its nearest centroid (the lowest row index on ties), provided that distance is
> 0: the cluster's centroid becomes that row, and the distances are updated
with the new centroid, so the next empty cluster takes a different location
(duplicate rows are never picked twice). Once every row coincides with a
centroid (fewer distinct rows than k), the remaining empty clusters keep their
previous centroid and stay empty with count 0. Hence no NaN ever (a mean is
only taken over a non-zero weight), and a fit that has converged has k
non-empty clusters whenever the rows with weight > 0 hold at least k distinct
points (an empty cluster would otherwise still be relocated).

Weights `[N]` (non-negative; 0 = row excluded, so callers may pass a padded
sample): a row's weight multiplies its contribution to the seeding
probabilities, the means, `counts` and `inertia`. Rows with weight 0 must still
be finite (0 * inf is NaN in the sums); they are still given their nearest
centroid in the returned assignments. With 0/1 weights `counts` are exact
integers (float32 sums of ones, exact below 2^24 rows).

Cost: the assignment is one `[N, D] x [D, k]` matmul and the means one
`[k, N] x [N, D]` matmul of the one-hot assignments (a matmul rather than a
scatter-add, whose float atomics on GPU would make the sums order-dependent),
so memory is O(N k). k-means++ is k sequential O(N D) steps; relocation is
one O(N D) step per empty cluster.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Squared distances and means in full float32: the default matmul precision on
# GPU/TPU (tf32/bf16 passes) would blur close distances and so assignments.
_PRECISION = jax.lax.Precision.HIGHEST


class KMeansState(NamedTuple):
  """A k-means fit, as pure data (it lives in the TrainState and checkpoints).

  Attributes:
    centroids: `[k, D]` float32; zeros before the first fit.
    counts: `[k]` float32, the (weighted) number of rows per cluster at the
      last fit; exact integers for 0/1 weights.
    inertia: float32 scalar, the weighted sum of squared distances of the rows
      to their centroids at the last fit.
    num_fits: int32 scalar, how many times k-means has run (0 = never fitted).
  """
  centroids: jax.Array
  counts: jax.Array
  inertia: jax.Array
  num_fits: jax.Array


def init_state(k: int, dim: int) -> KMeansState:
  """An unfitted state (all zeros) with the shapes and dtypes of a fit.

  Args:
    k: number of clusters (>= 1).
    dim: feature dimension D (>= 1).

  Returns:
    A `KMeansState` with `centroids [k, dim]`, `counts [k]` and `inertia` of
    float32 zeros and `num_fits` int32 0.

  Raises:
    TypeError: k or dim is not a Python int.
    ValueError: k or dim is < 1.
  """
  k = _check_int("init_state", "k", k, 1)
  dim = _check_int("init_state", "dim", dim, 1)
  return KMeansState(centroids=jnp.zeros((k, dim), jnp.float32),
                     counts=jnp.zeros((k,), jnp.float32),
                     inertia=jnp.zeros((), jnp.float32),
                     num_fits=jnp.zeros((), jnp.int32))


def kmeans_plus_plus(key: jax.Array, x: jax.Array, k: int,
                     weights: jax.Array | None = None) -> jax.Array:
  """k-means++ seeding: D^2 sampling of k rows of `x`.

  The first centroid is a row drawn with probability proportional to its
  weight; each next one a row drawn with probability proportional to weight
  times its squared distance to the nearest centroid chosen so far. A chosen
  row (and any duplicate of it) has distance 0, so when the rows with weight
  > 0 hold at least k distinct points the k centroids are k distinct rows.
  With fewer, once every row coincides with a chosen centroid the remaining
  ones are drawn by weight alone (repeating points). A row with weight 0 is
  never chosen.

  Args:
    key: PRNG key; the result is deterministic for a key.
    x: `[N, D]` float rows.
    k: number of centroids, a static int with 1 <= k <= N.
    weights: optional `[N]` non-negative row weights (0 = excluded).

  Returns:
    `[k, D]` float32 centroids, each a row of `x`.

  Raises:
    TypeError: k is not a static Python int.
    ValueError: bad x, k or weights (the message names the problem).
  """
  x = _check_x("kmeans_plus_plus", x)
  k = _check_k("kmeans_plus_plus", k, x.shape[0])
  w = _check_weights("kmeans_plus_plus", weights, x.shape[0], k)
  return _plus_plus(key, x, k, w)


def assign(x: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid of every row (the pseudo-labels).

  Uses ||x||^2 - 2 x.c + ||c||^2 (one matmul), clipped at 0 since rounding can
  make it slightly negative. Ties go to the lowest cluster id.

  Args:
    x: `[N, D]` float rows.
    centroids: `[k, D]` float centroids.

  Returns:
    `(assignments [N] int32, sq_distances [N] float32)`: each row's nearest
    centroid and its squared distance to it.

  Raises:
    ValueError: x or centroids is not a float matrix, or their D differ.
  """
  x = _check_x("assign", x)
  centroids = _check_centroids("assign", "centroids", centroids, None,
                               x.shape[1])
  return _assign(x, centroids)


def kmeans(key: jax.Array, x: jax.Array, k: int, *, num_iters: int = 20,
           init: jax.Array | None = None, weights: jax.Array | None = None
           ) -> tuple[KMeansState, jax.Array]:
  """Fits k-means (Lloyd) to the rows of `x`.

  Seeds with k-means++ (`kmeans_plus_plus(key, x, k, weights)`) unless `init`
  is given. Warm-starting from the previous fit's centroids (`init=
  state.centroids`) keeps cluster ids stable between refits; from converged
  centroids it returns them unchanged. Then runs exactly `num_iters` Lloyd
  iterations (no early stop) with the empty-cluster rule of the module
  docstring: an empty cluster moves to the row farthest from its nearest
  centroid if that distance is > 0, else keeps its centroid; never NaN.

  Args:
    key: PRNG key for the seeding (unused with `init`).
    x: `[N, D]` float rows (cast to float32).
    k: number of clusters, a static int with 1 <= k <= N (and <= the number of
      rows with weight > 0 when `weights` is concrete).
    num_iters: number of Lloyd iterations, a static int >= 1.
    init: optional `[k, D]` float initial centroids.
    weights: optional `[N]` non-negative row weights (0 = row excluded).

  Returns:
    `(state, assignments)`: a `KMeansState` with `num_fits` 1 whose counts and
    inertia are those of `assignments [N] int32`, every row's nearest returned
    centroid (rows with weight 0 included).

  Raises:
    TypeError: k or num_iters is not a static Python int.
    ValueError: bad x, k, num_iters, init or weights (the message names it).
  """
  x = _check_x("kmeans", x)
  n, dim = x.shape
  k = _check_k("kmeans", k, n)
  num_iters = _check_int("kmeans", "num_iters", num_iters, 1)
  w = _check_weights("kmeans", weights, n, k)
  if init is None:
    seeds = _plus_plus(key, x, k, w)
  else:
    seeds = _check_centroids("kmeans", "init", init, k, dim)
  return _fit(x, w, seeds, num_iters, jnp.ones((), jnp.int32))


def refit(key: jax.Array, state: KMeansState, x: jax.Array, *,
          num_iters: int = 20, weights: jax.Array | None = None
          ) -> tuple[KMeansState, jax.Array]:
  """Fits k-means again, warm-started from `state` once it has been fitted.

  For the train step's periodic refits: when `state.num_fits == 0` it seeds
  with k-means++ (as `kmeans`), otherwise it starts from `state.centroids` so
  cluster ids stay stable. The choice is a `lax.cond` on the traced count.

  Args:
    key: PRNG key for the k-means++ seeding of the first fit.
    state: the current `KMeansState` (`init_state(k, D)` before any fit).
    x: `[N, D]` float rows, N >= k.
    num_iters: number of Lloyd iterations, a static int >= 1.
    weights: optional `[N]` non-negative row weights (0 = row excluded).

  Returns:
    `(new_state, assignments [N] int32)`, with `num_fits` one more than
    `state`'s.

  Raises:
    TypeError: num_iters is not a static Python int.
    ValueError: bad x, num_iters, state or weights (the message names it).
  """
  x = _check_x("refit", x)
  n, dim = x.shape
  if np.ndim(state.centroids) != 2:
    raise ValueError(f"refit: state.centroids must be [k, D], got shape "
                     f"{tuple(np.shape(state.centroids))}")
  k = _check_k("refit", int(np.shape(state.centroids)[0]), n)
  previous = _check_centroids("refit", "state.centroids", state.centroids, k,
                              dim)
  num_iters = _check_int("refit", "num_iters", num_iters, 1)
  w = _check_weights("refit", weights, n, k)
  num_fits = jnp.asarray(state.num_fits, jnp.int32)
  seeds = jax.lax.cond(num_fits > 0, lambda: previous,
                       lambda: _plus_plus(key, x, k, w))
  return _fit(x, w, seeds, num_iters, num_fits + 1)


# Internals (inputs already checked and cast to float32).


def _plus_plus(key: jax.Array, x: jax.Array, k: int,
               w: jax.Array) -> jax.Array:
  """k-means++ on checked inputs: `[N, D]` x, `[N]` weights -> `[k, D]`."""
  keys = jax.random.split(key, k)
  first = x[_sample_row(keys[0], w)]  # [D]
  centroids = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(first)
  # Direct differences, so a chosen row and its duplicates get exactly 0.
  min_sq = _sq_dist_to(x, first)  # [N]

  def body(i, carry):
    centroids, min_sq = carry
    mass = w * min_sq  # [N]
    # Zero mass: every row sits on a chosen centroid; draw by weight instead.
    probs = jnp.where(jnp.sum(mass) > 0, mass, w)
    row = x[_sample_row(keys[i], probs)]  # [D]
    return (centroids.at[i].set(row),
            jnp.minimum(min_sq, _sq_dist_to(x, row)))

  centroids, _ = jax.lax.fori_loop(1, k, body, (centroids, min_sq))
  return centroids


def _sample_row(key: jax.Array, probs: jax.Array) -> jax.Array:
  """A row index drawn with probability proportional to `probs [N]` (>= 0)."""
  positive = probs > 0
  # -inf logits are never drawn: rows with zero probability are excluded.
  logits = jnp.where(positive, jnp.log(jnp.where(positive, probs, 1.0)),
                     -jnp.inf)
  return jax.random.categorical(key, logits)


def _sq_dist_to(x: jax.Array, point: jax.Array) -> jax.Array:
  """Squared distance of every row of `x [N, D]` to `point [D]`: `[N]`."""
  return jnp.sum(jnp.square(x - point[None, :]), axis=1)


def _assign(x: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  x_sq = jnp.sum(jnp.square(x), axis=1, keepdims=True)  # [N, 1]
  c_sq = jnp.sum(jnp.square(centroids), axis=1)  # [k]
  cross = jnp.matmul(x, centroids.T, precision=_PRECISION)  # [N, k]
  sq = jnp.maximum(x_sq - 2.0 * cross + c_sq[None, :], 0.0)  # [N, k]
  return jnp.argmin(sq, axis=1).astype(jnp.int32), jnp.min(sq, axis=1)


def _weighted_one_hot(assignments: jax.Array, w: jax.Array,
                      k: int) -> jax.Array:
  """`[N, k]`: row i has its weight in column assignments[i], else 0."""
  return jax.nn.one_hot(assignments, k, dtype=jnp.float32) * w[:, None]


def _lloyd_step(x: jax.Array, w: jax.Array, centroids: jax.Array) -> jax.Array:
  """One Lloyd iteration with the empty-cluster rule: `[k, D] -> [k, D]`."""
  k = centroids.shape[0]
  assignments, _ = _assign(x, centroids)
  one_hot = _weighted_one_hot(assignments, w, k)  # [N, k]
  counts = jnp.sum(one_hot, axis=0)  # [k]
  sums = jnp.matmul(one_hot.T, x, precision=_PRECISION)  # [k, D]
  nonempty = counts > 0
  # Divide only by a non-zero weight: empty clusters keep their centroid here.
  means = sums / jnp.where(nonempty, counts, 1.0)[:, None]
  moved = jnp.where(nonempty[:, None], means, centroids)
  return _relocate_empty(x, w, centroids, assignments, nonempty, moved)


def _relocate_empty(x: jax.Array, w: jax.Array, old: jax.Array,
                    assignments: jax.Array, nonempty: jax.Array,
                    moved: jax.Array) -> jax.Array:
  """Moves each empty cluster (by id) to the farthest row, while one is > 0.

  `old [k, D]` are the centroids the rows were assigned to, `moved [k, D]` the
  new centroids of the non-empty clusters (empty ones still hold `old`).
  """
  # Direct differences: exactly 0 for a row on its centroid, so rows already
  # covered are never picked (the matmul expansion leaves rounding noise).
  dist = jnp.sum(jnp.square(x - old[assignments]), axis=1)  # [N]
  dist = jnp.where(w > 0, dist, -1.0)  # weight-0 rows are never picked
  # Empty cluster ids first, in increasing order (stable sort of 0/1 keys).
  empty_ids = jnp.argsort(nonempty.astype(jnp.int32), stable=True)  # [k]
  num_empty = jnp.sum(~nonempty)

  def cond(carry):
    i, dist, _ = carry
    return (i < num_empty) & (jnp.max(dist) > 0)

  def body(carry):
    i, dist, centroids = carry
    row = x[jnp.argmax(dist)]  # [D]; argmax takes the lowest index on ties
    centroids = centroids.at[empty_ids[i]].set(row)
    # Weight-0 rows stay at -1; rows at this location drop to 0.
    return i + 1, jnp.minimum(dist, _sq_dist_to(x, row)), centroids

  _, _, centroids = jax.lax.while_loop(cond, body, (0, dist, moved))
  return centroids


def _fit(x: jax.Array, w: jax.Array, seeds: jax.Array, num_iters: int,
         num_fits: jax.Array) -> tuple[KMeansState, jax.Array]:
  """Lloyd iterations from `seeds [k, D]`, then the final assignment."""
  k = seeds.shape[0]
  centroids = jax.lax.fori_loop(
      0, num_iters, lambda _, c: _lloyd_step(x, w, c), seeds)
  assignments, _ = _assign(x, centroids)
  counts = jnp.sum(_weighted_one_hot(assignments, w, k), axis=0)  # [k]
  # Direct differences: more accurate than the expansion for the inertia.
  sq = jnp.sum(jnp.square(x - centroids[assignments]), axis=1)  # [N]
  state = KMeansState(centroids=centroids, counts=counts,
                      inertia=jnp.sum(w * sq),
                      num_fits=jnp.asarray(num_fits, jnp.int32))
  return state, assignments


# Trace-time input checks.


def _check_int(fn: str, name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(
        f"{fn}: {name} must be a static Python int (mark it static under "
        f"jax.jit), got {type(value).__name__} {value!r}")
  if value < minimum:
    raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
  return int(value)


def _check_k(fn: str, k: Any, num_rows: int) -> int:
  k = _check_int(fn, "k", k, 1)
  if k > num_rows:
    raise ValueError(f"{fn}: k={k} clusters need at least k rows, x has "
                     f"{num_rows}")
  return k


def _check_x(fn: str, x: Any) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{fn}: x must be a matrix [N, D], got shape "
                     f"{tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{fn}: x must be float, got dtype {x.dtype}")
  if min(x.shape) < 1:
    raise ValueError(f"{fn}: x must have N >= 1 rows and D >= 1 columns, got "
                     f"shape {tuple(x.shape)}")
  return x.astype(jnp.float32)


def _check_centroids(fn: str, name: str, centroids: Any, k: int | None,
                     dim: int) -> jax.Array:
  centroids = jnp.asarray(centroids)
  expected = (k if k is not None else "k", dim)
  if (centroids.ndim != 2 or centroids.shape[1] != dim
      or (k is not None and centroids.shape[0] != k)
      or centroids.shape[0] < 1):
    raise ValueError(f"{fn}: {name} must be [k, D] = {expected} (D from x), "
                     f"got shape {tuple(centroids.shape)}")
  if not jnp.issubdtype(centroids.dtype, jnp.floating):
    raise ValueError(f"{fn}: {name} must be float, got dtype "
                     f"{centroids.dtype}")
  return centroids.astype(jnp.float32)


def _check_weights(fn: str, weights: Any, num_rows: int, k: int) -> jax.Array:
  """`[N]` float32 weights (ones when None); values checked when concrete."""
  if weights is None:
    return jnp.ones((num_rows,), jnp.float32)
  concrete = not isinstance(weights, jax.core.Tracer)
  weights = jnp.asarray(weights)
  if weights.shape != (num_rows,):
    raise ValueError(f"{fn}: weights must be [N] = ({num_rows},), got shape "
                     f"{tuple(weights.shape)}")
  if not (jnp.issubdtype(weights.dtype, jnp.floating)
          or jnp.issubdtype(weights.dtype, jnp.integer)
          or weights.dtype == jnp.bool_):
    raise ValueError(f"{fn}: weights must be real numbers, got dtype "
                     f"{weights.dtype}")
  if concrete:  # Under jit the values are unknown: the caller's contract.
    values = np.asarray(weights, np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
      raise ValueError(f"{fn}: weights must be finite and >= 0")
    positive = int(np.sum(values > 0))
    if positive < k:
      raise ValueError(f"{fn}: k={k} clusters need at least k rows with "
                       f"weight > 0, got {positive}")
  return weights.astype(jnp.float32)
