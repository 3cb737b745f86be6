"""UPGrad and DualProj (Quinton & Rey, 2024, "Jacobian descent for
multi-objective optimization"; TorchJD).

Both project onto the dual cone `{x : g_k . x >= 0 for every present k}` of
the task gradients, so the update conflicts with no task:

* UPGrad projects each task gradient `g_i` onto the cone and combines the
  projections with the preference weights (default: their mean).
* DualProj projects the preference-weighted combination (default: the mean
  gradient) onto the cone (the projection of GEM, Lopez-Paz & Ranzato 2017).

By Proposition 1 of the paper, the projection of `G^T u` is `G^T w` with
`w = argmin_{w >= u} w^T (G G^T) w`, a small QP on the Gram matrix solved
here by `solvers.project_to_dual_cone` (exactly, with its KKT conditions
certified, whatever the spread of the gradient norms). UPGrad's weights are
`sum_i w(p_i e_i)`, DualProj's `w(p)`.

Deviations from TorchJD: TorchJD divides the Gram matrix by its trace (and
returns 0 when the trace is below `norm_eps=1e-4`) and adds `reg_eps=1e-4`
times the identity so that quadprog sees a positive-definite matrix; that
changes the result by ~1e-4 relative and makes it scale-dependent. Here the
QP is solved without the ridge (projection exact to rounding), and
both methods are exactly positively homogeneous: `A(c G) = c A(G)` for c > 0.
Neither is valid on representation gradients (`rep_grad_ok=False`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.aggregation import base
from mtl_jax.aggregation import solvers


def _check_pref(pref_vector, name):
  if pref_vector is None:
    return None
  pref = np.asarray(pref_vector, np.float32)
  if pref.ndim != 1 or pref.size == 0 or not np.all(np.isfinite(pref)):
    raise ValueError(f"{name}: pref_vector must be a non-empty list of "
                     f"finite values, got {pref_vector!r}")
  return pref


def _pref_weights(pref, present, name):
  """`[K]` preference weights of the present tasks (0 on absent ones).

  The default is the mean over present tasks; an explicit vector is used as
  given (not renormalised), as TorchJD does, so that a task's absence does
  not change the others' preference.
  """
  k = present.shape[0]
  if pref is None:
    return present.astype(jnp.float32) / jnp.maximum(jnp.sum(present), 1)
  if pref.shape[0] != k:
    raise ValueError(f"{name}: pref_vector has {pref.shape[0]} entries for "
                     f"{k} tasks")
  return jnp.where(present, jnp.asarray(pref), 0.0)


def _make(pref_vector, name, weights_fn):
  pref = _check_pref(pref_vector, name)

  def init(num_tasks: int) -> base.EmptyState:
    if pref is not None and pref.shape[0] != num_tasks:
      raise ValueError(f"{name}: pref_vector has {pref.shape[0]} entries for "
                       f"{num_tasks} tasks")
    return base.EmptyState()

  def from_gram(gram_matrix, scale, state, *, losses=None, counts=None,
                rng=None):
    del losses, rng
    present = base.present_mask(counts, gram_matrix.shape[0])
    # The weights are invariant to the Gram matrix's scale.
    p = _pref_weights(pref, present, name).astype(gram_matrix.dtype)  # [K]
    return weights_fn(p, gram_matrix, present), state  # [K]

  return base.gram_based(init, from_gram, rep_grad_ok=False)


def upgrad_weights(pref: jax.Array, m: jax.Array, present: jax.Array
                   ) -> jax.Array:
  """UPGrad's weights `sum_i w(p_i e_i)` for the Gram matrix `m [K, K]`."""
  rows = jnp.diag(pref)  # [K, K]: row i is p_i e_i
  project = jax.vmap(solvers.project_to_dual_cone, in_axes=(0, None, None))
  return jnp.sum(project(rows, m, present), axis=0)


def dualproj_weights(pref: jax.Array, m: jax.Array, present: jax.Array
                     ) -> jax.Array:
  """DualProj's weights `w(p)` for the Gram matrix `m [K, K]`."""
  return solvers.project_to_dual_cone(pref, m, present)


def upgrad(pref_vector: Sequence[float] | None = None) -> base.Aggregator:
  """UPGrad: the mean of the task gradients projected onto the dual cone.

  Args:
    pref_vector: optional `[K]` weights combining the projected gradients
      (default: 1/n over the n present tasks). Used as given, restricted to
      present tasks.

  Returns:
    A stateless Aggregator (`rep_grad_ok=False`) with `from_gram`. The
    direction satisfies `d . g_k >= 0` for every present task, equals g for
    a single task, is 0 when all gradients are 0, and is linear under
    positive scaling of G.

  Raises:
    ValueError: `pref_vector` is not a list of finite values, or (at `init`)
      its length differs from the number of tasks.
  """
  return _make(pref_vector, "upgrad", upgrad_weights)


def dualproj(pref_vector: Sequence[float] | None = None) -> base.Aggregator:
  """DualProj: the mean gradient projected onto the dual cone.

  Args:
    pref_vector: optional `[K]` weights of the combination to project
      (default: the mean over present tasks). Used as given, restricted to
      present tasks.

  Returns:
    A stateless Aggregator (`rep_grad_ok=False`) with `from_gram`, with the
    same guarantees as `upgrad`.

  Raises:
    ValueError: as for `upgrad`.
  """
  return _make(pref_vector, "dualproj", dualproj_weights)
