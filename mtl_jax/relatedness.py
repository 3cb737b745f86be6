"""How related tasks are: gradient cosines and lookahead affinities.

Two measures that the relatedness protocol (`experiments/relatedness.py`)
averages over training:

* **Gradient cosine** of tasks i and j on the shared params,
  `cos_ij = G_ij / sqrt(G_ii G_jj)` from the Gram matrix `G = J J^T` of the
  per-task gradients (`gram_cosines`). A task without a gradient (absent from
  the batch) has NaN cosines.
* **Lookahead inter-task affinity** (Fifty et al., "Efficiently Identifying
  Task Groupings for Multi-Task Learning", NeurIPS 2021): how a step on task
  i's loss alone, applied to the shared params, changes task j's loss on the
  same batch,

    Z_{i->j} = 1 - L_j(theta_s - lr * grad_s L_i, theta_j) / L_j(theta),

  positive when the step on i also lowers j's loss (`lookahead_affinity`).

`best_grouping` then finds the split of the tasks into at most `n` groups
with the largest total affinity onto each task from the others of its group
(TAG's criterion; exhaustive over set partitions, fine for K <= 10).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def gram_cosines(gram: jax.Array) -> jax.Array:
  """`[K, K]` cosines of the task gradients whose Gram matrix is `gram`."""
  norms = jnp.sqrt(jnp.diagonal(gram))
  denominator = norms[:, None] * norms[None, :]
  return jnp.where(denominator > 0, gram / jnp.where(denominator > 0,
                                                     denominator, 1.0),
                   jnp.nan)


def lookahead_affinity(task_losses: Callable[[Any], jax.Array], params: Any,
                       learning_rate: float, shared: str = "shared"
                       ) -> jax.Array:
  """`Z[i, j]`: the relative change of task j's loss after a plain gradient
  step of size `learning_rate` on task i's loss, applied to `params[shared]`
  only (the heads stay as they are).

  Args:
    task_losses: `params -> [K]` per-task losses on one batch (e.g. masked
      means; a task absent from the batch should give 0 loss: its row and
      column are then NaN).
    params: `{shared: ..., ...}`.
    learning_rate: the lookahead step size (the run's learning rate).
    shared: the key of the shared params.

  Returns:
    float `[K, K]`, row i = the task stepped on, column j = the task
    measured.
  """
  base = task_losses(params)  # [K]
  grads = jax.jacrev(lambda s: task_losses({**params, shared: s}))(
      params[shared])  # leaves [K, ...]

  def after(i):
    stepped = jax.tree.map(lambda p, g: p - learning_rate * g[i],
                           params[shared], grads)
    return task_losses({**params, shared: stepped})

  post = jax.vmap(after)(jnp.arange(base.shape[0]))  # [K, K]
  # An absent task (0 loss) has no step to take (its row) and no loss to
  # change (its column): NaN for both, not a spurious 0 row.
  present = base > 0
  return jnp.where(present[:, None] & present[None, :],
                   1.0 - post / jnp.where(present[None, :], base[None, :],
                                          1.0), jnp.nan)


def grouping_score(affinity: np.ndarray, groups: Sequence[Sequence[int]]
                   ) -> float:
  """TAG's total affinity of a grouping: for each task i in a group G of
  two or more, the mean over j in G, j != i, of `affinity[j, i]` (what the
  others' steps do for i); tasks alone add 0."""
  total = 0.0
  for group in groups:
    for i in group:
      others = [j for j in group if j != i]
      if others:
        total += float(np.mean([affinity[j, i] for j in others]))
  return total


def _partitions(items: list[int]):
  if not items:
    yield []
    return
  first, rest = items[0], items[1:]
  for partition in _partitions(rest):
    yield [[first]] + partition
    for k in range(len(partition)):
      yield partition[:k] + [[first] + partition[k]] + partition[k + 1:]


def best_grouping(affinity: np.ndarray, max_groups: int
                  ) -> tuple[list[list[int]], float]:
  """The partition of the K tasks into at most `max_groups` groups with the
  largest `grouping_score` (ties: the first found); exhaustive.

  Raises:
    ValueError: `affinity` not square, `max_groups` < 1, or NaN entries.
  """
  affinity = np.asarray(affinity, np.float64)
  if affinity.ndim != 2 or affinity.shape[0] != affinity.shape[1]:
    raise ValueError(f"affinity must be [K, K], got {affinity.shape}")
  if max_groups < 1:
    raise ValueError(f"max_groups must be >= 1, got {max_groups}")
  if np.isnan(affinity).any():
    raise ValueError("affinity has NaN entries (a task never present?)")
  best, best_score = None, -np.inf
  for partition in _partitions(list(range(affinity.shape[0]))):
    if len(partition) > max_groups:
      continue
    groups = sorted(sorted(g) for g in partition)
    score = grouping_score(affinity, groups)
    if score > best_score + 1e-12:
      best, best_score = groups, score
  return best, best_score


__all__ = ["best_grouping", "gram_cosines", "grouping_score",
           "lookahead_affinity"]
