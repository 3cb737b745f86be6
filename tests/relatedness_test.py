"""mtl_jax/relatedness.py against hand-computed cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import relatedness


def test_lookahead_affinity_of_two_quadratic_tasks_by_hand():
  """L1 = (w - 1)^2 / 2, L2 = (w - 2)^2 / 2 (+ a head h that the lookahead
  leaves alone), w = 0, lr = 0.5.
  Step on task 1: w' = 0 - 0.5 * (0 - 1) = 0.5: L1 = 0.125 (was 0.5),
  L2 = 1.125 (was 2): Z = 1 - 0.125/0.5 = 0.75, 1 - 1.125/2 = 0.4375.
  Step on task 2: w' = 0 - 0.5 * (0 - 2) = 1: L1 = 0, L2 = 0.5: Z = 1, 0.75.
  """
  def losses(p):
    w, h = p["shared"]["w"], p["tasks"]["h"]
    return jnp.stack([0.5 * (w - 1.0) ** 2 + 0.0 * h,
                      0.5 * (w - 2.0) ** 2])

  params = {"shared": {"w": jnp.float32(0.0)},
            "tasks": {"h": jnp.float32(3.0)}}
  z = relatedness.lookahead_affinity(losses, params, 0.5)
  np.testing.assert_allclose(z, [[0.75, 0.4375], [1.0, 0.75]], rtol=1e-6)
  # Opposite targets: a step on one hurts the other (negative affinity).
  def opposed(p):
    w = p["shared"]["w"]
    return jnp.stack([0.5 * (w - 1.0) ** 2, 0.5 * (w + 1.0) ** 2])

  z = relatedness.lookahead_affinity(opposed, params, 0.5)
  # Step on 1: w' = 0.5: L2 = 1.125 vs 0.5 -> Z = 1 - 2.25 = -1.25.
  np.testing.assert_allclose(z[0, 1], -1.25, rtol=1e-6)


def test_gram_cosines():
  g = jnp.array([[4.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  cos = relatedness.gram_cosines(g)
  np.testing.assert_allclose(cos[:2, :2], [[1.0, 1.0], [1.0, 1.0]])
  assert np.isnan(cos[2]).all() and np.isnan(cos[:, 2]).all()
  g = jnp.array([[1.0, -0.5], [-0.5, 4.0]])
  np.testing.assert_allclose(relatedness.gram_cosines(g)[0, 1], -0.25)


def test_best_grouping_by_hand():
  # Tasks 0 and 1 help each other (0.5, 0.3), task 2 is hurt by both and
  # hurts them; with two groups: {0, 1}, {2} scores 0.3 + 0.5 = 0.8.
  z = np.array([[0.0, 0.5, -0.2],
                [0.3, 0.0, -0.1],
                [-0.4, -0.3, 0.0]])
  groups, score = relatedness.best_grouping(z, 2)
  assert groups == [[0, 1], [2]] and score == pytest.approx(0.8)
  # One group: every task gets the mean of the others' affinities onto it:
  # task 0: (0.3 - 0.4)/2, task 1: (0.5 - 0.3)/2, task 2: (-0.2 - 0.1)/2.
  groups, score = relatedness.best_grouping(z, 1)
  assert groups == [[0, 1, 2]]
  assert score == pytest.approx(-0.05 + 0.1 - 0.15)
  assert relatedness.grouping_score(z, [[0], [1], [2]]) == 0.0
  with pytest.raises(ValueError, match="NaN"):
    relatedness.best_grouping(np.full((2, 2), np.nan), 1)
