"""Shared helper of the aggregator tests: one call on zero-padded gradients.

Each test file pads its `[K, p]` gradients to a fixed width so that the jitted
`update` compiles once per K, and checks that the padding columns of the
direction stay exactly zero (an aggregator acts on rows, never on columns).
"""

import jax
import jax.numpy as jnp
import numpy as np


def run_padded(update, state, grads, *, width, counts=None, losses=None,
               rng=None):
  """`update` on `grads` zero-padded to `width` columns.

  Args:
    update: a (jitted) `Aggregator.update`.
    state: its state for K = len(grads) tasks.
    grads: `[K, p]` with p <= width.
    width: padded width P.
    counts, losses: per-task values (default all ones).
    rng: the key (default `jax.random.key(0)`).

  Returns:
    `(direction [p] float64, new_state)`; asserts the direction is finite
    and zero on the padding.
  """
  grads = np.asarray(grads, np.float32)
  k, p = grads.shape
  padded = np.zeros((k, width), np.float32)
  padded[:, :p] = grads
  counts = np.ones(k) if counts is None else counts
  losses = np.ones(k) if losses is None else losses
  direction, state = update(
      jnp.asarray(padded), state, losses=jnp.asarray(losses, jnp.float32),
      counts=jnp.asarray(counts, jnp.float32),
      rng=jax.random.key(0) if rng is None else rng)
  direction = np.asarray(direction, np.float64)
  assert np.all(np.isfinite(direction))
  np.testing.assert_array_equal(direction[p:], 0.0)
  return direction[:p], state
