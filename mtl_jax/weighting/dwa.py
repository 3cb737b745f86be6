"""Dynamic Weight Average (Liu, Johns and Davison, CVPR 2019).

  w_k = K' * exp(r_k / T) / sum_j exp(r_j / T),   r_k = Lbar_k(t-1) / Lbar_k(t-2),

where `Lbar_k(t)` is task k's mean loss over its t-th window of `window`
steps. The paper averages over epochs (`window` = steps per epoch; the weights
of epoch t come from epochs t-1 and t-2, and are 1 for the first two epochs);
`window=1` is the per-step variant (`r_k = L_k(t-1) / L_k(t-2)`). The current
step's loss enters the statistics only after the weights are computed, as in
the paper and LibMTL (`DWA`).

Absent tasks (count 0):
* Windows are counted per task, in the steps where the task is present: an
  absent step neither adds to the window nor closes it, so every per-task
  entry of the state stays exactly as it was. When all tasks are present in
  every batch this is the paper's global window.
* A task whose two windows are not both complete yet has `r_k = 1`; so the
  weights are all 1 until two windows are complete, as in the paper.
* The softmax and `K'` run over the present tasks (absent tasks get weight
  0, which multiplies their zero loss), so the present tasks are weighted as
  if the absent ones did not exist.

`r_k` is also 1 when `Lbar_k(t-2) == 0`, where the ratio is undefined.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.weighting import masking
from mtl_jax.weighting.base import Weighting


class DWAState(NamedTuple):
  """Per-task loss history (all `[K]`).

  Attributes:
    window_sum: sum of the losses of the current, incomplete window.
    window_steps: present steps in the current window (int32).
    last: mean loss of the last complete window, `Lbar(t-1)`.
    before_last: mean loss of the window before it, `Lbar(t-2)`.
    num_windows: complete windows so far, saturating at 2 (int32).
  """

  window_sum: jax.Array
  window_steps: jax.Array
  last: jax.Array
  before_last: jax.Array
  num_windows: jax.Array


def dwa(temperature: float = 2.0, window: int = 1) -> Weighting:
  """Dynamic Weight Average.

  Args:
    temperature: the softmax temperature `T` (the paper uses 2).
    window: present steps per loss average; the number of steps per epoch
      reproduces the paper, 1 compares consecutive steps.

  Returns:
    The `Weighting`; its state is a `DWAState`.

  Raises:
    ValueError: `temperature` is not positive or `window` not an integer >= 1.
  """
  if not temperature > 0:
    raise ValueError(f"dwa temperature must be > 0, got {temperature}")
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:
    raise ValueError(f"dwa window must be an integer >= 1, got {window!r}")

  def init(num_tasks: int) -> DWAState:
    zeros = jnp.zeros([num_tasks], jnp.float32)
    izeros = jnp.zeros([num_tasks], jnp.int32)
    return DWAState(zeros, izeros, zeros, zeros, izeros)

  def update(losses, counts, state, *, rng=None, grad_norms=None):
    del rng, grad_norms
    present = masking.present_mask(counts)  # [K]
    known = (state.num_windows >= 2) & (state.before_last != 0)  # [K]
    ratio = jnp.where(known, state.last / jnp.where(known, state.before_last,
                                                    1.0), 1.0)  # [K]
    # A huge ratio (e.g. 1e30 / 1e-30) overflows to inf, and inf - inf in the
    # softmax would give NaN; the largest finite logit gives the same limit.
    logits = jnp.minimum(ratio / temperature, jnp.finfo(jnp.float32).max)
    weights = masking.num_present(present) * masking.masked_softmax(
        logits, present)  # [K]

    window_sum = jnp.where(present, state.window_sum + losses,
                           state.window_sum)
    window_steps = jnp.where(present, state.window_steps + 1,
                             state.window_steps)
    done = window_steps >= window  # only present tasks can reach it here
    new_state = DWAState(
        window_sum=jnp.where(done, 0.0, window_sum),
        window_steps=jnp.where(done, 0, window_steps),
        last=jnp.where(done, window_sum / window, state.last),
        before_last=jnp.where(done, state.last, state.before_last),
        num_windows=jnp.where(done, jnp.minimum(state.num_windows + 1, 2),
                              state.num_windows))
    return weights, new_state

  return Weighting(init, update)
