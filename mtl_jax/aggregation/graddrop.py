"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020).

"Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
Dropout", https://arxiv.org/abs/2010.06808 (reference implementation: LibMTL's
`GradDrop`). Per coordinate, the gradient positive sign purity

  P = 0.5 (1 + sum_i g_i / sum_i |g_i|)      # in [0, 1]

is the probability of keeping the positive parts: with one uniform draw U per
coordinate, task i keeps its value if (P > U and g_i > 0) or (P < U and
g_i < 0), and the direction is

  sum_i (leak_i + (1 - leak_i) M_i) g_i.

So coordinates where all tasks agree are always kept, and conflicting ones keep
one sign, chosen with probability proportional to its mass. Costs a few fused
elementwise passes over `[K, P]` (no Gram matrix).

Deviations:
* the paper applies GradDrop to activation gradients and first sums over the
  batch, weighting each example by the sign of the layer's input. The
  aggregator sees a `[K, P]` matrix, so every column is its own coordinate:
  with `rep_grad=True` that is one (example, feature) entry of the
  representation, i.e. the purity is per example, without the input-sign
  batch reduction; on parameter gradients it is per parameter.
* where every task's gradient is 0, `P = 0.5` (LibMTL adds 1e-7 to the
  denominator instead, which is not scale-invariant).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.aggregation.base import Aggregator, EmptyState, present_mask

_HIGHEST = jax.lax.Precision.HIGHEST
# Up to this many tasks the sums over tasks are unrolled into one fused pass.
_UNROLL_TASKS = 16


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_uniforms(rng: jax.Array, shape: Sequence[int],
                  offset: int | jax.Array = 0) -> jax.Array:
  """float32 draws from U[0, 1) on a 2^-24 grid, one per coordinate.

  The draw of flat coordinate j is a function of `rng` and `offset + j`
  only: `hash_uniforms(rng, (n,), o)` is `hash_uniforms(rng, (o + n,))[o:]`,
  so a block of a leaf's coordinates gets the draws of the whole leaf.

  A counter-based generator: two 32-bit words drawn from `rng` (threefry)
  key two rounds of MurmurHash3's finalizer over the coordinate index. One
  fused elementwise pass, where `jax.random.uniform` runs threefry's 20
  rounds per pair of draws, a sizeable share of a train step for a model's
  worth of coordinates. Good enough for
  coin flips (tested for uniformity and independence across coordinates
  and keys), not for cryptography.
  """
  size = int(np.prod(shape))
  if size >= 2 ** 32:
    raise ValueError(f"hash_uniforms draws at most 2^32 - 1 values, got {size}")
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, size) + jnp.asarray(offset).astype(
      jnp.uint32)
  x = index * jnp.uint32(0x9E3779B9) + seed[0]
  x = _fmix32(_fmix32(x) ^ seed[1])
  u = (x >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)
  return u.reshape(tuple(shape))


def sign_dropout(grads: jax.Array, present: jax.Array, uniforms: jax.Array,
                 leak: jax.Array | float) -> jax.Array:
  """GradDrop's direction for given uniform draws.

  With one draw per coordinate shared by all tasks, the direction is

    sum_i l_i g_i + [P > U] sum_i (1 - l_i) max(g_i, 0)
                  + [P < U] sum_i (1 - l_i) min(g_i, 0),

  and P itself is a function of `pos = sum_i max(g_i, 0)` and `neg = sum_i
  min(g_i, 0)` (`P = pos / (pos - neg)`): a few sums over the task axis,
  computed in one pass over `[K, P]` (two more with per-task leaks).

  Args:
    grads: `[K, P]` per-task gradients.
    present: `bool [K]`, which tasks are present (absent rows are ignored).
    uniforms: `[P]` draws from U[0, 1).
    leak: scalar or `[K]`: the fraction of each task's gradient that passes
      whatever the mask.

  Returns:
    The direction `[P]`.
  """
  num_tasks = grads.shape[0]
  g = jnp.where(present[:, None], grads, 0.0)  # absent rows are ignored
  if num_tasks <= _UNROLL_TASKS:
    # Sums over tasks written out: one fused elementwise pass.
    def task_sum(weights, fn):
      terms = [fn(g[k]) if weights is None else weights[k] * fn(g[k])
               for k in range(num_tasks)]
      return sum(terms[1:], terms[0])
  else:
    # XLA's CPU reduction over the leading axis is much slower than a BLAS
    # matrix-vector product.
    def task_sum(weights, fn):
      w = jnp.ones((num_tasks,), g.dtype) if weights is None else weights
      return jnp.matmul(w, fn(g), precision=_HIGHEST)
  positive = lambda x: jnp.maximum(x, 0.0)
  negative = lambda x: jnp.minimum(x, 0.0)
  pos, neg = task_sum(None, positive), task_sum(None, negative)  # [P]
  leaks = None if isinstance(leak, jax.core.Tracer) else np.asarray(leak)
  if leaks is not None and leaks.ndim == 0:
    # One leak for all tasks (pure GradDrop: 0): no further sums.
    l = float(leaks)
    leak_pos, leak_neg = (l * pos, l * neg) if l else (0.0, 0.0)
  else:
    l = jnp.broadcast_to(jnp.asarray(leak, g.dtype), (num_tasks,))
    leak_pos, leak_neg = task_sum(l, positive), task_sum(l, negative)
  mass = pos - neg
  ratio = jnp.where(mass > 0, (pos + neg) / jnp.where(mass > 0, mass, 1.0), 0.0)
  purity = 0.5 * (1.0 + ratio)  # [P]
  kept_pos = leak_pos + jnp.where(purity > uniforms, pos - leak_pos, 0.0)
  kept_neg = leak_neg + jnp.where(purity < uniforms, neg - leak_neg, 0.0)
  # The last sum is a matrix-vector product: it bounds the fusion, so the
  # pass over [K, P] runs once, in the rows' own layout. Fused into the
  # optimizer's update instead (an elementwise sum, or behind
  # lax.optimization_barrier, which XLA's CPU pipeline drops), it would run
  # once per consumer and read the kernels' rows transposed, several times
  # slower in the train step.
  return jnp.matmul(jnp.ones((2,), g.dtype), jnp.stack([kept_pos, kept_neg]),
                    precision=_HIGHEST)


def graddrop(leak: float | Sequence[float] = 0.0) -> Aggregator:
  """GradDrop (Chen et al., 2020).

  Args:
    leak: in [0, 1], one value or one per task: the part of each task's
      gradient that bypasses the sign dropout (0: pure GradDrop; 1: the sum).

  Returns:
    A stateless `Aggregator` with `rep_grad_ok=True` (the paper applies it to
    activation gradients) and `columnwise=True` (the train step applies it
    to each parameter leaf alone, with its own key). The update draws one
    uniform per coordinate from `rng` with `hash_uniforms` (required;
    ValueError at trace time without it). The direction is
    equivariant to positive scalings of the gradients for the same draws; a
    negative scaling maps P to 1 - P, so it is equivariant only in
    distribution.

  Raises:
    ValueError: a leak outside [0, 1], or (in `init`, and at trace time) a
      per-task leak of the wrong length.
  """
  leaks = np.asarray(leak, dtype=np.float32)
  if leaks.ndim > 1 or not np.all((leaks >= 0) & (leaks <= 1)):
    raise ValueError(f"graddrop leak must be in [0, 1] (one value or one per "
                     f"task), got {leak}")

  def check_tasks(num_tasks: int) -> None:
    if leaks.ndim == 1 and leaks.shape[0] != num_tasks:
      raise ValueError(f"graddrop has {leaks.shape[0]} leaks for {num_tasks} "
                       "tasks")

  def init(num_tasks: int) -> EmptyState:
    check_tasks(num_tasks)
    return EmptyState()

  def update(grads, state, *, losses=None, counts=None, rng=None,
             column_offset=0):
    del losses
    if rng is None:
      raise ValueError("graddrop needs an rng key (sign dropout draws)")
    num_tasks = grads.shape[0]
    check_tasks(num_tasks)
    uniforms = hash_uniforms(rng, grads.shape[1:], column_offset).astype(
        grads.dtype)  # [P]
    return sign_dropout(grads, present_mask(counts, num_tasks), uniforms,
                        leaks), state

  # Columnwise: the train step applies it to each parameter leaf's columns
  # (with a key per leaf), or to blocks of them (`column_offset`), instead
  # of the concatenated [K, P] matrix.
  return Aggregator(init, update, rep_grad_ok=True, columnwise=True)
