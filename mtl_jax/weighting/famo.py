"""FAMO: Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023).

Follows the official implementation (github.com/Cranial-XIX/FAMO, class
`FAMO`, methods `get_weighted_loss` and `update`). Task logits `xi` (init 0)
give `z = softmax(xi)`; with the shifted losses `l_k = L_k - min_loss_k + eps`
the model descends

  sum_k z_k log(l_k) / c,   c = sum_k z_k / l_k   (c held constant),

whose gradient is `sum_k w_k grad L_k` with the per-loss weights

  w_k = z_k / (c * l_k)                           (so that sum_k w_k = 1);

`update` returns these `w` (the official code returns `z` as its "weights").
After the model step, `post_update` gets the losses `L'` of the updated model
on the same batch and moves `xi` along

  delta_k = log l_k - log l'_k,   grad_xi = J_softmax(xi)^T delta,

with the logits' optimizer: by default, as in the official code,
`torch.optim.Adam(lr, weight_decay=gamma)`, i.e. L2 decay added to the
gradient before Adam: `optax.chain(add_decayed_weights(gamma), adam(lr))`.

Conventions and deviations:
* The softmax, `c` and the logits' gradient run over the present tasks only:
  absent tasks (count 0) get weight 0 and keep `xi_k`, their optimizer
  moments and their stored loss exactly, and the present tasks behave as FAMO
  with `K'` tasks.
* `l_k = max(L_k - min_loss_k, 0) + eps`: the official `L - min + eps` has a
  NaN log when a loss falls below its `min_loss`; both agree otherwise.
* Defaults: `gamma=1e-3` as in LibMTL (`FAMO_w_gamma`); the official `famo.py`
  defaults to 0.01 and its benchmark `methods/weight_methods.py` to 1e-5.
  `learning_rate=0.025` as both.
* The official `famo.py` `backward` also clips the shared parameters'
  gradient norm to 1; that belongs to the model's optimizer
  (`optax.clip_by_global_norm`). Its benchmark copy
  (`methods/weight_methods.py`, used by its toy) clips before
  `loss.backward()`, gradients just zeroed, so there nothing is clipped.
* If the train step never calls `post_update`, `xi` stays 0 and FAMO reduces to
  the log-loss weighting `w_k = (1/l_k) / sum_j (1/l_j)`.
* `min_losses` must bound the losses from below. A loss below its bound has
  `l_k = eps`: that task takes almost all the weight (`w_k ~ 1`) and its
  `delta_k` is 0 while it stays below.

Toy problem. On the two-objective toy of CAGrad / Nash-MTL
(`experiments/toy_pareto.py`) the defaults reach the Pareto set from 3 of the
5 starts, where the paper shows 5. The official toy script
(`experiments/toy/run.sh` and `trainer.py`) sets `gamma = 0` ("the objective
is not changing") and `min_losses = -21` (the toy's losses go down to -20),
and `gamma` is what decides it. There the logits' gradient
`J_softmax^T delta` is ~5e-5 per step (the model's Adam, lr 1e-3, moves the
shifted losses by 2e-4 to 8e-4 relative per step), smaller than the decay
`gamma * xi` once `|xi| > 0.05`: with `gamma = 1e-3` the logits stay within
+-3 and the two runs that start on the upper plateau stall where the weighted
gradients cancel, as `mean` does. With `gamma = 0` Adam turns the tiny
gradient into steps of `learning_rate`, the logits reach +-5 within 3000
steps, and all 5 runs reach the set. The official algorithm transcribed in
float64 (with `min_losses = -21`; it has NaN logs without) gives the same 3/5
with `gamma = 1e-3` and 5/5 with `gamma = 0`, its final points within 0.15 of
ours, and with `gamma = 0` its trajectories agree with ours to 1e-4 over the
first 3000 steps. The toy's other differences do not change the counts: 3/5
with `gamma = 1e-3` and 5/5 with `gamma = 0` in each of the 16 combinations
of the official toy's scale 0.1 on the first loss (or none), its start (0, 0)
(or CAGrad's (-8.5, -5)), 50k or 100k steps, and `min_losses` -21 or 0. The
last only moves where the runs end: with -21 in the middle part of the set
(x1 from -3.7 to 0.8 of -7 to 7), with 0 mostly at its two ends (both losses
are negative there, so `xi` freezes).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.weighting import masking
from mtl_jax.weighting.base import Weighting


class FAMOState(NamedTuple):
  """The learnable task logits and the losses before the model update.

  Attributes:
    logits: `[K]` task logits `xi`, init 0.
    prev_losses: `[K]` each task's loss at its last `update` where it was
      present (the official `prev_loss`), read by `post_update`.
    opt_state: the per-task optimizer state of `xi` (see `masking`).
  """

  logits: jax.Array
  prev_losses: jax.Array
  opt_state: Any


def famo(learning_rate: float = 0.025, gamma: float = 1e-3,
         min_losses: Sequence[float] | None = None, eps: float = 1e-8,
         optimizer: optax.GradientTransformation | None = None) -> Weighting:
  """FAMO weighting, with a `post_update` that learns the task logits.

  Args:
    learning_rate: Adam learning rate of the logits (default optimizer).
    gamma: the logits' L2 weight decay (default optimizer).
    min_losses: a lower bound of each task's loss, in task order (the
      official `set_min_losses`); zeros when None.
    eps: added to the shifted losses before the log.
    optimizer: an elementwise optax transformation for the logits; replaces
      the default `chain(add_decayed_weights(gamma), adam(learning_rate))`.

  Returns:
    The `Weighting`, with `post_update`; its state is a `FAMOState`.

  Raises:
    ValueError: a hyperparameter is out of range; `init` raises if
      `min_losses` does not have one entry per task.
  """
  if optimizer is None:
    if not learning_rate > 0:
      raise ValueError(f"famo learning_rate must be > 0, got {learning_rate}")
    if not gamma >= 0:
      raise ValueError(f"famo gamma must be >= 0, got {gamma}")
    optimizer = optax.chain(optax.add_decayed_weights(gamma),
                            optax.adam(learning_rate))
  if not eps > 0:
    raise ValueError(f"famo eps must be > 0, got {eps}")
  if min_losses is not None:
    min_losses = np.asarray(min_losses, np.float32)
    if min_losses.ndim != 1 or not np.all(np.isfinite(min_losses)):
      raise ValueError(f"famo min_losses must be a list of finite values, got "
                       f"{min_losses.tolist()}")

  def shifted(losses, present):
    # Absent tasks get 1 (log 0), so that nothing undefined is computed.
    floor = 0.0 if min_losses is None else jnp.asarray(min_losses)
    return jnp.where(present, jnp.maximum(losses - floor, 0.0) + eps, 1.0)

  def init(num_tasks: int) -> FAMOState:
    if min_losses is not None and min_losses.shape[0] != num_tasks:
      raise ValueError(f"famo has {min_losses.shape[0]} min_losses for "
                       f"{num_tasks} tasks")
    xi = jnp.zeros([num_tasks], jnp.float32)  # [K]
    return FAMOState(xi, jnp.zeros([num_tasks], jnp.float32),
                     masking.init_optimizer(optimizer, xi))

  def update(losses, counts, state, *, rng=None, grad_norms=None):
    del rng, grad_norms
    present = masking.present_mask(counts)  # [K]
    l = shifted(losses, present)  # [K]
    # w_k = z_k / (c l_k) = softmax(xi - log l)_k, computed in log space: the
    # direct z / l underflows to 0 for huge losses (l ~ 3e38), and c with it.
    weights = masking.masked_softmax(state.logits - jnp.log(l), present)  # [K]
    prev_losses = jnp.where(present, losses, state.prev_losses)
    return weights, state._replace(prev_losses=prev_losses)

  def post_update(new_losses, counts, state):
    present = masking.present_mask(counts)  # [K]
    delta = jnp.where(present,
                      jnp.log(shifted(state.prev_losses, present)) -
                      jnp.log(shifted(new_losses, present)), 0.0)  # [K]
    _, softmax_vjp = jax.vjp(lambda xi: masking.masked_softmax(xi, present),
                             state.logits)
    (grads,) = softmax_vjp(delta)  # [K], 0 on absent tasks
    logits, opt_state = masking.masked_step(optimizer, grads, state.opt_state,
                                            state.logits, present)
    return FAMOState(logits, state.prev_losses, opt_state)

  return Weighting(init, update, post_update=post_update)
