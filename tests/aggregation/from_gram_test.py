"""Tests of `Aggregator.from_gram` (base.py: Gram-based methods).

For every aggregator but GradDrop, `update(grads)` must be `from_gram`'s
weights applied to the rows with absent tasks zeroed, and `from_gram` must
give the same direction and state for the Gram matrix of `grads / s` with any
power of two `s` (the train step's Gram engine may pick another one than
`base.scaled_gram`).
"""

import functools

import jax
import numpy as np
import pytest

from mtl_jax import aggregation
from mtl_jax.aggregation import base

P = 50
# Powers of two other than scaled_gram's (4 for these gradients), with
# `gram(g / s)` still well inside float32 range (diagonal ~4e-17 to ~6e13).
SCALES = [2.0**-20, 1.0, 2.0**5, 2.0**30]
# The absent task's row: zero_absent must drop it before anything reads it.
GARBAGE = np.array([np.nan, np.inf, -np.inf, 3e38, -1e30] * (P // 5),
                   np.float32)
# The registry's defaults, and the settings whose weights depend on `scale`
# (mgda "l2", nash_mtl "none") or skip the solve (nash_mtl every 2 steps).
CASES = {name: factory() for name, factory in aggregation.AGGREGATORS.items()
         if name != "graddrop"}
CASES.update({
    "mgda_l2": aggregation.get_aggregator("mgda", normalization="l2"),
    "nash_mtl_exact": aggregation.get_aggregator(
        "nash_mtl", gram_normalization="none"),
    "nash_mtl_every2": aggregation.get_aggregator(
        "nash_mtl", update_weights_every=2),
})


# One K per case (3, 4, 5 in turn): one compilation per case keeps the file
# fast, and every K is covered by several methods.
NUM_TASKS = {name: 3 + i % 3 for i, name in enumerate(sorted(CASES))}
SCALED_GRAM = jax.jit(base.scaled_gram)
GRAM_OVER = jax.jit(lambda g, s: base.gram(g / s))  # gram(g / s)


@functools.cache
def _jitted(name):
  """`(update, from_gram)` of `CASES[name]`, jitted."""
  agg = CASES[name]
  return jax.jit(agg.update), jax.jit(agg.from_gram)


def _assert_same_state(actual, expected, rtol):
  """Same structure and leaves (integers exactly; floats near 0 to rtol/10)."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol,
                               atol=rtol / 10)


def test_every_method_but_graddrop_has_from_gram():
  lacking = [name for name, factory in aggregation.AGGREGATORS.items()
             if factory().from_gram is None]
  assert lacking == ["graddrop"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_update_is_from_gram_at_any_power_of_two(name):
  update, from_gram = _jitted(name)
  num_tasks = NUM_TASKS[name]
  rng = np.random.default_rng(num_tasks)
  state = CASES[name].init(num_tasks)
  # Two steps (the second with task 1 absent) from the initial state, so
  # that stateful methods also start from a state they wrote themselves.
  for step, absent in enumerate([None, 1]):
    grads = rng.normal(size=(num_tasks, P)).astype(np.float32)
    counts = rng.integers(1, 5, num_tasks).astype(np.float32)
    if absent is not None:
      counts[absent] = 0.0
      grads[absent] = GARBAGE
    present = counts > 0
    zeroed = np.where(present[:, None], grads, 0.0).astype(np.float32)
    kwargs = dict(losses=rng.uniform(0.5, 2.0, num_tasks).astype(np.float32),
                  counts=counts, rng=jax.random.key(10 * num_tasks + step))
    direction, new_state = update(grads, state, **kwargs)
    direction = np.asarray(direction, np.float64)
    assert np.all(np.isfinite(direction))
    top = np.abs(direction).max()

    # update = from_gram's weights @ rows, with scaled_gram's matrix and
    # scale; with another power of two s and the Gram matrix of zeroed / s,
    # the same direction (not the same weights: mgda "l2" and nash_mtl
    # "none" scale them by 1 / s) and the same state.
    grams = [SCALED_GRAM(zeroed)] + [
        (GRAM_OVER(zeroed, np.float32(s)), np.float32(s)) for s in SCALES]
    for i, (gram, scale) in enumerate(grams):
      weights, gram_state = from_gram(gram, scale, state, **kwargs)
      weights = np.asarray(weights, np.float64)
      assert np.all(weights[~present] == 0.0), scale
      rtol = 1e-6 if i == 0 else 1e-5
      np.testing.assert_allclose(weights @ zeroed.astype(np.float64),
                                 direction, rtol=rtol, atol=rtol * top,
                                 err_msg=f"scale {scale}")
      _assert_same_state(gram_state, new_state, rtol)
    state = new_state
