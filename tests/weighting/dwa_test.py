"""Tests of Dynamic Weight Average (Liu et al. 2019)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import weighting


def run(w, losses_seq, counts_seq, num_tasks):
  update = jax.jit(w.update)
  state = w.init(num_tasks)
  all_weights = []
  for losses, counts in zip(losses_seq, counts_seq):
    weights, state = update(jnp.asarray(losses), jnp.asarray(counts), state)
    all_weights.append(np.asarray(weights))
  return all_weights, state


def dwa_by_hand(last, before_last, temperature):
  """K * softmax(r / T) with r = Lbar(t-1) / Lbar(t-2)."""
  e = np.exp(np.asarray(last) / np.asarray(before_last) / temperature)
  return len(e) * e / e.sum()


def test_per_step_weights_by_hand():
  losses = [[1.0, 2.0], [0.5, 2.0], [0.25, 3.0], [0.25, 3.0]]
  weights, _ = run(weighting.dwa(temperature=2.0), losses, [[1, 1]] * 4, 2)
  # Steps 0 and 1 have fewer than two past losses: weights 1.
  np.testing.assert_array_equal(weights[0], [1.0, 1.0])
  np.testing.assert_array_equal(weights[1], [1.0, 1.0])
  # Step 2: r = L(1) / L(0) = [0.5, 1]; w = 2 e^{r/2} / (e^{0.25} + e^{0.5})
  e = np.exp([0.25, 0.5])
  np.testing.assert_allclose(weights[2], 2 * e / e.sum(), rtol=1e-6)
  # = [0.8756, 1.1244]: the task whose loss fell fastest gets less weight.
  np.testing.assert_allclose(weights[2], [0.87564, 1.12436], atol=1e-5)
  # Step 3: r = L(2) / L(1) = [0.5, 1.5].
  np.testing.assert_allclose(weights[3], dwa_by_hand([0.25, 3], [0.5, 2], 2),
                             rtol=1e-6)


def test_windowed_weights_by_hand():
  # window=2 (two steps per "epoch"): epoch means are
  #   epoch 0: [(4+2)/2, (1+1)/2] = [3, 1],  epoch 1: [(1+2)/2, (2+2)/2] = [1.5, 2]
  losses = [[4, 1], [2, 1], [1, 2], [2, 2], [9, 9], [9, 9]]
  w, state = run(weighting.dwa(temperature=1.0, window=2), losses,
                 [[1, 1]] * 6, 2)
  for t in range(4):  # epochs 0 and 1: equal weights
    np.testing.assert_array_equal(w[t], [1.0, 1.0])
  # Epoch 2 (steps 4 and 5): r = [1.5/3, 2/1] = [0.5, 2], T = 1.
  expected = dwa_by_hand([1.5, 2.0], [3.0, 1.0], 1.0)
  np.testing.assert_allclose(w[4], expected, rtol=1e-6)
  np.testing.assert_allclose(w[5], expected, rtol=1e-6)
  np.testing.assert_allclose(expected, [2 / (1 + np.exp(1.5)),
                                        2 / (1 + np.exp(-1.5))], rtol=1e-6)
  # Epoch 2 is complete now: its mean [9, 9] is the last window.
  np.testing.assert_array_equal(state.last, [9.0, 9.0])
  np.testing.assert_array_equal(state.before_last, [1.5, 2.0])
  np.testing.assert_array_equal(state.window_steps, [0, 0])


def test_absent_task_state_is_unchanged_and_others_unaffected():
  w = weighting.dwa()
  update = jax.jit(w.update)
  state = w.init(3)
  rng = np.random.default_rng(0)
  present_steps = []
  for t in range(8):
    losses = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32)
    counts = jnp.array([1.0, float(t % 3 == 0), 1.0])  # task 1: t = 0, 3, 6
    weights, new_state = update(losses * (counts > 0), counts, state)
    if counts[1] == 0:
      for new, old in zip(new_state, state):
        np.testing.assert_array_equal(new[1], old[1])
      # Weights sum to K' = 2 over the present tasks; task 1 gets 0.
      assert weights[1] == 0.0
      np.testing.assert_allclose(weights.sum(), 2.0, rtol=1e-6)
    else:
      present_steps.append(float(losses[1]))
    state = new_state
  # Task 1's history holds only the steps where it was present (window=1).
  np.testing.assert_allclose([state.before_last[1], state.last[1]],
                             present_steps[-2:], rtol=1e-6)


def test_present_tasks_weighted_as_if_absent_ones_did_not_exist():
  losses = [[1.0, 7.0, 2.0], [0.5, 7.0, 2.5], [0.4, 7.0, 2.0]]
  counts = [[1, 0, 1]] * 3
  w3, _ = run(weighting.dwa(), losses, counts, 3)
  w2, _ = run(weighting.dwa(), [l[::2] for l in losses], [[1, 1]] * 3, 2)
  np.testing.assert_allclose(w3[-1][::2], w2[-1], rtol=1e-6)
  np.testing.assert_allclose(w2[-1], dwa_by_hand([0.5, 2.5], [1.0, 2.0], 2.0),
                             rtol=1e-6)


def test_bad_hyperparameters():
  with pytest.raises(ValueError, match="temperature must be > 0"):
    weighting.dwa(temperature=0.0)
  with pytest.raises(ValueError, match="window must be an integer >= 1"):
    weighting.dwa(window=0)
  with pytest.raises(ValueError, match="window must be an integer >= 1"):
    weighting.dwa(window=1.5)
