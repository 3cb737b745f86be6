"""Absent tasks: reductions over the present tasks, and a masked optimizer step.

A task with count 0 is absent from the batch. Weighting methods must then act
as if it did not exist (means and softmaxes run over the present tasks only)
and leave every per-task entry of their state exactly as it was. The helpers
here implement both rules once, for all methods.

Learnable weighting parameters are one scalar per task (`[K]`). Their optax
optimizer is vmapped over the task axis, so every leaf of its state (Adam's
moments AND its step count) has a leading `[K]` axis and can be kept per task:
an absent task's parameter and moments stay bit-for-bit unchanged, and so does
its step count, so that Adam's bias correction for a task that is present in a
fraction of the batches counts that task's own updates, not the global step.
When every task is present this is exactly the unbatched optimizer, provided
the optimizer acts elementwise (sgd, adam, adamw, add_decayed_weights, ...);
transformations that couple coordinates (`clip_by_global_norm`) would act on
each task separately.

`masked_step` clips each task's gradient to `[-GRAD_LIMIT, GRAD_LIMIT]`
(2^60 ~ 1.15e18) before the optimizer. Adam's second moment is a running mean
of `g^2`, which overflows float32 to inf for `|g| > ~1.8e19`; the step
`m / sqrt(v)` is then 0 and the parameter frozen for good. Learned weights
meet such gradients from finite inputs: uncertainty's `0.5 - w L` and IMTL-L's
`e^s L - 1` for a loss ~1e30, GradNorm's `+-g_k` for a gradient norm ~1e30.
With the clip, `|m| <= 2^60` and `v <= 2^120`, 2^8 below float32's largest
value, so every leaf of the state stays finite. The limit sits far above any
gradient a trained model produces, and every gradient within it reaches the
optimizer bit for bit; beyond it Adam (invariant to the gradient's scale)
still takes its full step in the right direction. The clip is elementwise, so
each task's step stays independent of the others.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def present_mask(counts: jax.Array) -> jax.Array:
  """`[K]` bool: the tasks with at least one label in the batch."""
  return jnp.asarray(counts) > 0


def num_present(present: jax.Array) -> jax.Array:
  """The number K' of present tasks, as a float32 scalar."""
  return jnp.sum(present.astype(jnp.float32))


def masked_mean(x: jax.Array, present: jax.Array) -> jax.Array:
  """Mean of `x [K]` over the present tasks; 0 when no task is present."""
  total = jnp.sum(jnp.where(present, x, 0.0))
  return total / jnp.maximum(num_present(present), 1.0)


def masked_softmax(logits: jax.Array, present: jax.Array) -> jax.Array:
  """Softmax over the present tasks; absent tasks get probability 0.

  The present entries equal the softmax of the `K'`-task problem without the
  absent ones, and their gradients do not depend on the absent logits.

  Args:
    logits: `[K]` logits.
    present: `[K]` bool mask.

  Returns:
    `[K]` probabilities summing to 1 over the present tasks (all zeros when no
    task is present).
  """
  # The shift only guards exp against overflow; softmax is shift-invariant, so
  # its gradient is stopped.
  shift = jnp.max(jnp.where(present, logits, -jnp.inf))
  shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))
  # The inner where keeps exp (and its gradient) finite on absent entries.
  e = jnp.where(present, jnp.exp(jnp.where(present, logits - shift, 0.0)), 0.0)
  return e / jnp.maximum(jnp.sum(e), jnp.finfo(e.dtype).tiny)


def init_optimizer(optimizer: optax.GradientTransformation,
                   params: jax.Array) -> Any:
  """Per-task optimizer state for `params [K]` (every leaf has a `[K]` axis)."""
  return jax.vmap(optimizer.init)(params)


# The largest gradient magnitude handed to the optimizer (module docstring).
GRAD_LIMIT = 2.0**60


def masked_step(optimizer: optax.GradientTransformation, grads: jax.Array,
                opt_state: Any, params: jax.Array,
                present: jax.Array) -> tuple[jax.Array, Any]:
  """One optimizer step on the present tasks' parameters only.

  Args:
    optimizer: an elementwise optax transformation (see module docstring).
    grads: `[K]` gradient of the method's objective w.r.t. `params`; clipped
      to `[-GRAD_LIMIT, GRAD_LIMIT]` (an infinite entry too) before the step.
    opt_state: the state from `init_optimizer` (or a previous step).
    params: `[K]` learnable per-task parameters.
    present: `[K]` bool mask.

  Returns:
    `(params [K], opt_state)`: absent tasks' parameters and every leaf entry of
    their optimizer state are the old values, exactly.
  """
  grads = jnp.clip(grads, -GRAD_LIMIT, GRAD_LIMIT)
  updates, new_state = jax.vmap(optimizer.update)(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)

  def select(new, old):
    mask = present.reshape(present.shape + (1,) * (jnp.ndim(new) - 1))
    return jnp.where(mask, new, old)

  return (select(new_params, params),
          jax.tree.map(select, new_state, opt_state))
