"""The aggregator interface and helpers shared by gradient-level methods.

An aggregator combines per-task gradients of the shared parameters into one
update direction, in optax's style:

  state = aggregator.init(num_tasks)
  direction, state = aggregator.update(grads, state, losses=losses,
                                       counts=counts, rng=rng)

* `grads` is a `[K, P]` matrix: row k is task k's gradient of its (already
  loss-weighted) loss w.r.t. the shared parameters, flattened. The train step
  flattens pytrees (`flatten_task_grads`) and unflattens the direction.
* `losses [K]` and `counts [K]` are the per-task losses and label counts over the
  global batch; `rng` is a PRNG key (raw uint32 [2] or typed) for stochastic
  methods. All three are always passed; methods ignore what they do not need.
* A task with `counts[k] == 0` is ABSENT: its row is zero, and the method must
  return exactly what it returns for the sub-matrix of present tasks, and leave
  every statistic of the absent task (and of pairs involving it) unchanged.
* Every `update` is pure and jit-able (no host callbacks, no data-dependent
  shapes): absent tasks are handled with masks, never by slicing.

`Aggregator.rep_grad_ok` says whether the method is valid on gradients w.r.t.
the shared representation (MGDA-UB style) instead of the shared parameters.

Gram-based methods. Every method except GradDrop returns a linear combination
of the task gradients, `d = w @ G`, with weights that depend on the gradients
only through their Gram matrix `G G^T`. Such a method also provides
`from_gram(gram, scale, state, *, losses, counts, rng) -> (w [K], state)`:

* `gram` is the `[K, K]` Gram matrix of `zero_absent(grads) / scale`
  (rows and columns of absent tasks zero), `scale > 0` a power of two that
  keeps it in range (`scaled_gram`), both in `float_dtype(grads)`: float64
  for float64 gradients (with `jax_enable_x64`), float32 otherwise; methods that are not
  scale-invariant recover the plain Gram matrix as `gram * scale**2`;
* the direction is `w @ zero_absent(grads)`, and `update` is exactly that
  (`gram_based` builds it from `from_gram`).

The train step can then compute the Gram matrix without ever forming the
`[K, P]` Jacobian (from per-layer activations and output gradients,
`mtl_jax.gradients.gram`) and the direction as one backward pass of
`sum_k w_k L_k`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


class Aggregator(NamedTuple):
  """A gradient-level aggregation method.

  Attributes:
    init: `init(num_tasks) -> state`.
    update: `update(grads [K, P], state, *, losses [K], counts [K], rng)
      -> (direction [P], state)`.
    rep_grad_ok: True if the method may be applied to representation
      gradients (one backward pass through the trunk) instead of parameter
      gradients.
    from_gram: for Gram-based methods, `from_gram(gram [K, K], scale, state,
      *, losses, counts, rng) -> (weights [K], state)` (see the module
      docstring); None for methods that need the gradients themselves.
    columnwise: True if coordinate j of the direction depends only on column
      j of `grads` (and on `rng` and j), and the method is stateless: the
      train step may then call `update` on each parameter leaf's columns
      alone, with a different key per leaf, or on a block of them:
      `update(..., column_offset=o)` takes `grads`' columns to be the leaf's
      columns `o, o + 1, ...` (GradDrop).
  """

  init: Callable[[int], Any]
  update: Callable[..., tuple[jax.Array, Any]]
  rep_grad_ok: bool = False
  from_gram: Callable[..., tuple[jax.Array, Any]] | None = None
  columnwise: bool = False


class EmptyState(NamedTuple):
  """State of stateless aggregators."""


def stateless(fn: Callable[..., jax.Array], *, rep_grad_ok: bool = False
              ) -> Aggregator:
  """Wraps `fn(grads, *, losses, counts, rng) -> direction` as an Aggregator."""

  def init(num_tasks: int) -> EmptyState:
    del num_tasks
    return EmptyState()

  def update(grads, state, *, losses=None, counts=None, rng=None):
    return fn(grads, losses=losses, counts=counts, rng=rng), state

  return Aggregator(init, update, rep_grad_ok)


def gram_based(init: Callable[[int], Any],
               from_gram: Callable[..., tuple[jax.Array, Any]], *,
               rep_grad_ok: bool = False) -> Aggregator:
  """An Aggregator whose `update` is `from_gram`'s weights applied to the rows.

  `update(grads)` zeroes the rows of absent tasks, computes
  `scaled_gram`, calls `from_gram` and returns `w @ grads`: the same
  direction the train step's Gram engine gets without the `[K, P]` matrix.
  """

  def update(grads, state, *, losses=None, counts=None, rng=None):
    present = present_mask(counts, grads.shape[0])
    g = zero_absent(grads, present)  # [K, P]
    m, scale = scaled_gram(g)  # [K, K], gram(g / scale)
    weights, state = from_gram(m, scale, state, losses=losses, counts=counts,
                               rng=rng)
    return combine(weights, g), state

  return Aggregator(init, update, rep_grad_ok, from_gram)


def stateless_gram_based(fn: Callable[..., jax.Array], *,
                         rep_grad_ok: bool = False) -> Aggregator:
  """`gram_based` for `fn(gram, scale, *, losses, counts, rng) -> weights`."""

  def init(num_tasks: int) -> EmptyState:
    del num_tasks
    return EmptyState()

  def from_gram(gram_matrix, scale, state, *, losses=None, counts=None,
                rng=None):
    return fn(gram_matrix, scale, losses=losses, counts=counts,
              rng=rng), state

  return gram_based(init, from_gram, rep_grad_ok=rep_grad_ok)


def scale_invariant(weights_fn: Callable[[jax.Array, jax.Array], jax.Array],
                    *, rep_grad_ok: bool = False) -> Aggregator:
  """A stateless Gram-based Aggregator with `weights_fn(gram, present)`.

  For methods whose weights depend on the Gram matrix only up to a positive
  factor (and on nothing but task presence): `scale`, `losses` and `rng` are
  not needed.
  """

  def fn(gram_matrix, scale, *, losses=None, counts=None, rng=None):
    del scale, losses, rng
    return weights_fn(gram_matrix, present_mask(counts, gram_matrix.shape[0]))

  return stateless_gram_based(fn, rep_grad_ok=rep_grad_ok)


def float_dtype(x: jax.Array) -> jnp.dtype:
  """The dtype the K x K maths runs in: float64 for float64 input, float32
  for everything else (bfloat16 and float16 gradients included)."""
  return (jnp.dtype(jnp.float64) if jnp.result_type(x) == jnp.float64
          else jnp.dtype(jnp.float32))


def combine(weights: jax.Array, grads: jax.Array) -> jax.Array:
  """`weights @ grads` `[P]` at full precision."""
  return jnp.matmul(weights.astype(grads.dtype), grads,
                    precision=jax.lax.Precision.HIGHEST)


def present_mask(counts: jax.Array | None, num_tasks: int) -> jax.Array:
  """`bool [K]`: which tasks have at least one label (all, if counts is None)."""
  if counts is None:
    return jnp.ones((num_tasks,), bool)
  return jnp.asarray(counts) > 0


def zero_absent(grads: jax.Array, present: jax.Array) -> jax.Array:
  """Sets the rows of absent tasks to exactly zero."""
  return jnp.where(present[:, None], grads, 0.0)


def gram(grads: jax.Array) -> jax.Array:
  """`G G^T` `[K, K]` at full precision (no TF32/bf16 passes on GPU)."""
  return jnp.matmul(grads, grads.T, precision=jax.lax.Precision.HIGHEST)


def power_of_two_scale(grads: jax.Array) -> jax.Array:
  """A power of two `s` with `max|grads| / s` in `[1, 2)` (1 if all zero).

  Scale-invariant methods compute their Gram matrix on `grads / s`: the
  division is exact, and `G G^T` then neither overflows (|g| >~ 1e19 in
  float32) nor underflows to zero (|g| <~ 1e-19), which would give NaN or a
  zero direction for gradients that are merely large or small.
  """
  dtype = float_dtype(grads)
  amax = jnp.max(jnp.abs(grads)).astype(dtype)
  _, exponent = jnp.frexp(amax)
  ok = jnp.isfinite(amax) & (amax > 0)
  # 2^(exponent - 1) <= max|grads| is finite even for max|grads| ~ 3e38.
  return jnp.where(ok, jnp.ldexp(jnp.ones((), dtype), exponent - 1),
                   jnp.ones((), dtype))


def scaled_gram(grads: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(gram(grads / s), s)` for a power of two `s` that keeps it in range.

  Scale-invariant methods need the Gram matrix only up to a positive factor,
  but `G G^T` overflows in float32 for |g| >~ 1e19 and underflows to zero for
  |g| <~ 1e-19. The plain product is computed first; if it is finite and its
  largest diagonal entry is a normal number far from underflow, `s` comes
  from that diagonal (no extra pass over the gradients). Only otherwise (rare)
  is the Gram matrix recomputed from `grads / power_of_two_scale(grads)`.
  Divisions by a power of two are exact. On the fast path a row whose norm is
  below ~1e-19 (float32) next to rows above ~1e-9 has Gram entries below the
  smallest normal number, which the CPU flushes to zero: such a row counts as
  a zero gradient (its weight could change the direction by at most its own
  norm).

  Returns:
    `[K, K]` and the scalar `s`, in `float_dtype(grads)`.
  """
  dtype = float_dtype(grads)

  def rescaled():
    s = power_of_two_scale(grads)
    return gram(grads / s.astype(grads.dtype)).astype(dtype), s

  return scale_gram(gram(grads).astype(dtype), rescaled)


def scale_gram(plain: jax.Array, rescaled: Callable[[], tuple[jax.Array,
                                                              jax.Array]]
               ) -> tuple[jax.Array, jax.Array]:
  """`(plain / s^2, s)` with `s` a power of two from the largest diagonal
  entry, when `plain` is finite and that entry is far from underflow;
  otherwise `rescaled()`, which recomputes the Gram matrix of the rows divided
  by a power of two that keeps it in range (see `scaled_gram`). One rule for
  every producer of Gram matrices: the `[K, P]` rows here, the factored
  engine's per-layer terms in `mtl_jax.gradients.gram`.
  """
  diag_max = jnp.max(jnp.diagonal(plain))
  safe = jnp.all(jnp.isfinite(plain)) & (diag_max >= 2.0 ** -60)

  def fast(_):
    _, exponent = jnp.frexp(jnp.sqrt(diag_max))
    s = jnp.ldexp(jnp.ones((), plain.dtype), exponent - 1)
    return plain / (s * s), s

  return jax.lax.cond(safe, fast, lambda _: rescaled(), None)


def _to_row_layout(x: jax.Array) -> jax.Array:
  """A `[K, a, b]` leaf as `[K, b, a]`; other ranks unchanged.

  The per-task gradient of a dense kernel `W [a, b]` in `y = x W` comes out of
  the batched VJP's matmul as `[K, b, a]` (`delta_k^T x`); JAX transposes it to
  `[K, a, b]`, which XLA materialises as a copy of the whole Jacobian block.
  Raveling the kernel in `[b, a]` order makes that transpose cancel: the
  Jacobian is built with one copy fewer, and only the `[P]` direction is
  transposed back. The order of coordinates inside a row is irrelevant to
  every aggregator (Gram matrices and linear combinations do not see it).
  """
  return jnp.swapaxes(x, -1, -2) if x.ndim == 3 else x


def flatten_task_grads(tree: Any) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
  """Flattens a pytree of `[K, ...]` leaves into `[K, P]`.

  Two-dimensional leaves (dense kernels) are raveled transposed (see
  `_to_row_layout`); `unflatten` undoes it.

  Returns:
    `(matrix [K, P], unflatten)`, where `unflatten(direction [P])` rebuilds a
    pytree shaped like one task's gradient.
  """
  rows = jax.tree.map(_to_row_layout, tree)
  _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], rows))
  matrix = jax.vmap(lambda t: ravel_pytree(t)[0])(rows)
  transposed = jax.tree.map(lambda x: x.ndim == 3, tree)

  def unflatten(direction: jax.Array) -> Any:
    return jax.tree.map(lambda x, t: jnp.swapaxes(x, -1, -2) if t else x,
                        unravel(direction), transposed)

  return matrix, unflatten
