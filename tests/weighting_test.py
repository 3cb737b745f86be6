"""Tests of the weighting registry and static weighting."""

import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import weighting


def test_static_weights_and_state():
  w = weighting.get_weighting("static", weights=[1.0, 0.5, 2.0])
  state = w.init(3)
  weights, new_state = w.update(jnp.array([1.0, 2.0, 3.0]),
                                jnp.array([4.0, 0.0, 1.0]), state)
  np.testing.assert_array_equal(weights, [1.0, 0.5, 2.0])
  assert new_state == state


def test_equal_is_ones():
  w = weighting.equal(4)
  weights, _ = w.update(jnp.ones(4), jnp.ones(4), w.init(4))
  np.testing.assert_array_equal(weights, np.ones(4))


def test_equal_needs_no_task_count():
  w = weighting.get_weighting("equal")
  for k in (1, 3):
    weights, state = w.update(jnp.arange(k, dtype=jnp.float32),
                              jnp.zeros(k), w.init(k))
    np.testing.assert_array_equal(weights, np.ones(k))
    assert state == w.init(k)
  # With a count, a wrong number of tasks is an error, as for `static`.
  with pytest.raises(ValueError, match="3 weights for 2 tasks"):
    weighting.equal(3).init(2)


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown weighting method 'nope'; valid: dwa, equal, famo, gls, gradnorm, imtl_l, rlw, static, uncertainty"):
    weighting.get_weighting("nope")
  with pytest.raises(ValueError, match="finite values >= 0"):
    weighting.static([1.0, -1.0])
  with pytest.raises(ValueError, match="2 weights for 3 tasks"):
    weighting.static([1.0, 1.0]).init(3)
