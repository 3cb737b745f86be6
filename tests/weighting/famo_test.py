"""Tests of FAMO (Liu et al. 2023) against the official implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import weighting


class OfficialFAMO:
  """A numpy transcription of github.com/Cranial-XIX/FAMO `famo.py`: `FAMO`.

  `torch.optim.Adam(lr, weight_decay=gamma)` is written out: L2 decay is added
  to the gradient, then Adam with betas (0.9, 0.999) and eps 1e-8.
  """

  def __init__(self, n_tasks, gamma, w_lr, min_losses=None):
    self.min_losses = (np.zeros(n_tasks) if min_losses is None
                       else np.asarray(min_losses, np.float64))
    self.w = np.zeros(n_tasks)
    self.gamma, self.lr = gamma, w_lr
    self.m, self.v, self.t = np.zeros(n_tasks), np.zeros(n_tasks), 0

  def get_weighted_loss_weights(self, losses):
    """The gradient of the official loss w.r.t. each L_k."""
    self.prev_loss = losses
    z = np.exp(self.w) / np.exp(self.w).sum()      # F.softmax(self.w)
    d = losses - self.min_losses + 1e-8            # D
    c = (z / d).sum()                              # c (detached)
    # loss = sum(log(D) * z / c)  =>  d loss / d L_k = z_k / (c D_k)
    return z / (c * d)

  def update(self, curr_loss):
    delta = (np.log(self.prev_loss - self.min_losses + 1e-8) -
             np.log(curr_loss - self.min_losses + 1e-8))
    z = np.exp(self.w) / np.exp(self.w).sum()
    # autograd.grad(softmax(w), w, grad_outputs=delta) = J^T delta with
    # J = diag(z) - z z^T:  z * (delta - z . delta)
    d = z * (delta - np.dot(z, delta))
    # torch Adam step with weight_decay (L2 added to the gradient)
    g = d + self.gamma * self.w
    self.t += 1
    self.m = 0.9 * self.m + 0.1 * g
    self.v = 0.999 * self.v + 0.001 * g * g
    m_hat = self.m / (1 - 0.9**self.t)
    v_hat = self.v / (1 - 0.999**self.t)
    self.w = self.w - self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)


def test_matches_the_official_code_for_three_steps():
  losses = [np.array([2.0, 0.5, 1.0]), np.array([1.5, 0.45, 1.1]),
            np.array([1.2, 0.44, 0.8])]
  new_losses = [np.array([1.5, 0.45, 1.1]), np.array([1.2, 0.44, 0.8]),
                np.array([1.0, 0.43, 0.9])]
  official = OfficialFAMO(3, gamma=1e-3, w_lr=0.025, min_losses=[0.1, 0, 0.2])
  w = weighting.get_weighting("famo", learning_rate=0.025, gamma=1e-3,
                              min_losses=[0.1, 0.0, 0.2])
  update, post_update = jax.jit(w.update), jax.jit(w.post_update)
  state = w.init(3)
  for l, new_l in zip(losses, new_losses):
    expected = official.get_weighted_loss_weights(l)
    weights, state = update(jnp.asarray(l, jnp.float32), jnp.ones(3), state)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    official.update(new_l)
    state = post_update(jnp.asarray(new_l, jnp.float32), jnp.ones(3), state)
    np.testing.assert_allclose(state.logits, official.w, rtol=1e-4,
                               atol=1e-7)
  assert np.abs(official.w).max() > 0.04  # the logits did move


def test_first_step_by_hand():
  # xi = 0: z = [1/2, 1/2]; L = [2, 1] (min_losses 0): l = L + 1e-8;
  # c = sum z / l = 0.25 + 0.5 = 0.75; w = z / (c l) = [1/3, 2/3].
  w = weighting.famo()
  weights, state = jax.jit(w.update)(jnp.array([2.0, 1.0]), jnp.ones(2),
                                     w.init(2))
  np.testing.assert_allclose(weights, [1 / 3, 2 / 3], rtol=1e-6)
  # New losses [1, 1]: delta = log(l) - log(l') = [log 2, 0];
  # grad = z * (delta - z.delta) = 0.5 * [log2 / 2, -log2 / 2] = [+.17, -.17];
  # the first Adam step (weight decay on xi = 0 adds nothing) is
  # -0.025 * sign(grad).
  state = jax.jit(w.post_update)(jnp.array([1.0, 1.0]), jnp.ones(2), state)
  np.testing.assert_allclose(state.logits, [-0.025, 0.025], rtol=1e-5)


def test_weights_give_the_gradient_of_the_official_loss():
  xi = jnp.array([0.3, -0.2, 0.5])
  losses = jnp.array([0.7, 2.0, 0.1])
  w = weighting.famo()
  state = w.init(3)._replace(logits=xi)
  weights, _ = jax.jit(w.update)(losses, jnp.ones(3), state)

  def official_loss(l):
    z = jax.nn.softmax(xi)
    d = l + 1e-8
    c = jax.lax.stop_gradient(jnp.sum(z / d))
    return jnp.sum(jnp.log(d) * z / c)

  np.testing.assert_allclose(weights, jax.jit(jax.grad(official_loss))(losses),
                             rtol=1e-5)
  # w_k = z_k / (l_k sum_j z_j / l_j) sum to 1.
  np.testing.assert_allclose(jnp.sum(weights), 1.0, rtol=1e-5)


def test_absent_task_state_is_unchanged_and_others_unaffected():
  w3, w2 = weighting.famo(), weighting.famo()
  s3, s2 = w3.init(3), w2.init(2)
  up3, post3 = jax.jit(w3.update), jax.jit(w3.post_update)
  up2, post2 = jax.jit(w2.update), jax.jit(w2.post_update)
  counts = jnp.array([0.0, 3.0, 1.0])
  rng = np.random.default_rng(1)
  for _ in range(3):
    l = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32) * counts
    new_l = l * jnp.asarray(rng.uniform(0.7, 1.1, 3), jnp.float32)
    weights3, mid = up3(l, counts, s3)
    new_s3 = post3(new_l, counts, mid)
    for new, old in zip(jax.tree.leaves(new_s3), jax.tree.leaves(s3)):
      np.testing.assert_array_equal(new[0], old[0])
    assert weights3[0] == 0.0
    weights2, s2 = up2(l[1:], counts[1:], s2)
    s2 = post2(new_l[1:], counts[1:], s2)
    np.testing.assert_allclose(weights3[1:], weights2, rtol=1e-6)
    np.testing.assert_allclose(new_s3.logits[1:], s2.logits, rtol=1e-6)
    s3 = new_s3
  np.testing.assert_array_equal(s3.logits[0], 0.0)


def test_bad_hyperparameters():
  with pytest.raises(ValueError, match="2 min_losses for 3 tasks"):
    weighting.famo(min_losses=[0.0, 0.0]).init(3)
  with pytest.raises(ValueError, match="eps must be > 0"):
    weighting.famo(eps=0.0)
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    weighting.famo(learning_rate=0.0)


def test_custom_optimizer_sgd():
  w = weighting.famo(optimizer=optax.sgd(1.0))
  _, state = jax.jit(w.update)(jnp.array([2.0, 1.0]), jnp.ones(2), w.init(2))
  state = jax.jit(w.post_update)(jnp.array([1.0, 1.0]), jnp.ones(2), state)
  # grad = [log2 / 4, -log2 / 4] (see test_first_step_by_hand); xi = -grad.
  np.testing.assert_allclose(state.logits, [-np.log(2) / 4, np.log(2) / 4],
                             rtol=1e-5)


@pytest.mark.parametrize("gamma", [1e-3, 0.0])
def test_decay_outweighs_a_small_logit_gradient(gamma):
  # xi = [-1, 1]; task 0's loss fell by delta_0 = 1e-4 in log, task 1's not:
  # grad = z * (delta - z . delta) = z0 z1 1e-4 * [1, -1] (~1.05e-5), which
  # alone moves the logits apart. The decay adds gamma * xi = 1e-3 * [-1, 1]
  # and, bigger, flips the sign: Adam's first step is
  # -lr * g / (|g| + 1e-8), toward 0 with gamma = 1e-3, away from it with 0.
  w = weighting.famo(gamma=gamma)
  xi = np.array([-1.0, 1.0])
  state = w.init(2)._replace(logits=jnp.asarray(xi, jnp.float32))
  losses = np.array([1.0, 1.0], np.float32)
  new_losses = np.array([np.exp(-1e-4), 1.0], np.float32)
  _, state = jax.jit(w.update)(jnp.asarray(losses), jnp.ones(2), state)
  state = jax.jit(w.post_update)(jnp.asarray(new_losses), jnp.ones(2), state)
  delta = (np.log(losses.astype(np.float64) + 1e-8) -
           np.log(new_losses.astype(np.float64) + 1e-8))
  z = np.exp(xi) / np.exp(xi).sum()
  g = z * (delta - z @ delta) + gamma * xi
  np.testing.assert_allclose(g, [-9.9e-4, 9.9e-4] if gamma else
                             [1.05e-5, -1.05e-5], rtol=0.01)
  np.testing.assert_allclose(state.logits,
                             xi - 0.025 * g / (np.abs(g) + 1e-8), rtol=1e-5)
  # Toward 0 by ~0.025 with the decay, apart by ~0.025 without.
  np.testing.assert_allclose(np.abs(state.logits),
                             [0.975, 0.975] if gamma else [1.025, 1.025],
                             rtol=1e-3)


def test_loss_below_min_losses_takes_the_weight_and_freezes_its_logit():
  # L = [-1, 2] with min_losses 0: l = [eps, 2 + eps]; with z = [1/2, 1/2],
  # w = (1/l) / sum(1/l) = [1 / (1 + eps / 2), (eps / 2) / (1 + eps / 2)].
  w = weighting.famo()
  weights, state = jax.jit(w.update)(jnp.array([-1.0, 2.0]), jnp.ones(2),
                                     w.init(2))
  np.testing.assert_allclose(weights, [1.0, 5e-9], rtol=1e-6)
  # Both losses below 0, before and after the step: l = l' = eps, so w = z,
  # delta = 0 and the gradient is 0, and so is Adam's first step (m = v = 0).
  weights, state = jax.jit(w.update)(jnp.array([-1.0, -2.0]), jnp.ones(2),
                                     state)
  np.testing.assert_allclose(weights, [0.5, 0.5], rtol=1e-6)
  state = jax.jit(w.post_update)(jnp.array([-3.0, -0.5]), jnp.ones(2), state)
  np.testing.assert_array_equal(state.logits, [0.0, 0.0])
