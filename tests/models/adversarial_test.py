"""Tests of the adversarial shared-private model and gradient reversal."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import tasks as tasks_lib

from mtl_jax.models import adversarial, trunks

SHAPES = {"left": (10,), "sum": (), "dense": (2, 3)}
EXPECTED = {"left": (3, 10), "sum": (3,), "dense": (3, 2, 3)}
SHARED = trunks.MLP(hidden_sizes=(6, 5))
PRIVATE = trunks.MLP(hidden_sizes=(4,))
# Example 0 is labelled for left and sum, 1 for dense only, 2 for nothing.
PRESENCE = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], np.float32)


def _inputs():
  return np.random.RandomState(0).standard_normal((3, 4, 2)).astype(np.float32)


def _perturb(params, seed=2, scale=0.05):
  """Params plus small noise, as numpy (host RNG: no per-shape compilation)."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(
      lambda l: (np.asarray(l) + scale * rng.standard_normal(l.shape)
                 ).astype(np.float32), params)


def _model(**kwargs):
  kwargs = dict(dict(head_hidden_sizes=(5,), discriminator_hidden_sizes=(3,),
                     adversarial_weight=0.5, reversal_scale=0.7), **kwargs)
  return adversarial.AdversarialSharedPrivateModel(SHAPES, SHARED, PRIVATE,
                                                   **kwargs)


@functools.lru_cache(maxsize=None)
def _params():
  """Perturbed params of `_model()` (the hyperparameters add no params)."""
  # An "rbg" key: XLA compiles threefry initialisers several times slower.
  # Init sows nothing, even with every aux loss on.
  init = _model(difference_weight=0.01).init
  variables = jax.jit(lambda k, x: init(k, x, task_presence=PRESENCE))(
      jax.random.key(1, impl="rbg"), _inputs())
  assert set(variables) == {"params"}
  return _perturb(variables["params"], scale=0.1)


def _numpy_bce(logits, targets):
  logits = np.asarray(logits, np.float64)
  p = 1 / (1 + np.exp(-logits))
  return np.mean(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)))


def test_gradient_reversal():
  x = jnp.array([1.0, -2.0, 3.0])
  c = jnp.array([0.5, 1.0, -4.0])
  np.testing.assert_array_equal(adversarial.gradient_reversal(x, 0.3), x)
  g = jax.grad(lambda x: jnp.sum(adversarial.gradient_reversal(x, 0.3) * c))(x)
  np.testing.assert_allclose(g, -0.3 * c, rtol=1e-6)
  # Under jit, with a traced scale (which gets no gradient of its own).
  g, gs = jax.jit(jax.grad(
      lambda x, s: jnp.sum(adversarial.gradient_reversal(x, s) * c),
      argnums=(0, 1)))(x, 2.0)
  np.testing.assert_allclose(g, -2.0 * c, rtol=1e-6)
  assert float(gs) == 0.0


def test_shapes_split_and_gradients():
  model, x, params = _model(difference_weight=0.01), _inputs(), _params()
  assert set(params) == {"shared", "tasks"}
  assert set(params["tasks"]) == set(SHAPES)
  assert set(params["shared"]) == {"encoder", "discriminator"}
  for name in SHAPES:
    assert set(params["tasks"][name]) == {"encoder", "head"}
  assert params["shared"]["discriminator"]["Dense_1"]["kernel"].shape == (3, 3)

  apply = jax.jit(lambda p, presence: model.apply(
      {"params": p}, x, task_presence=presence, mutable=["aux_losses"]))
  out, aux = apply(params, PRESENCE)
  assert {k: v.shape for k, v in out.items()} == EXPECTED
  assert set(aux["aux_losses"]) == {"adversarial", "difference"}

  # Every parameter learns from the task losses plus the aux losses (the
  # discriminator from the adversarial loss only).
  def loss(p):
    o, a = apply(p, PRESENCE)
    return (sum(jnp.sum(jnp.sin(v) + v ** 2) for v in o.values()) +
            sum(jax.tree.leaves(a)))
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)

  # Private encoders and heads serve their own task only; the discriminator
  # is not reached by task outputs.
  def left_only(p):
    return jnp.sum(apply(p, PRESENCE)[0]["left"])
  g = jax.jit(jax.grad(left_only))(params)
  for other in ("sum", "dense"):
    assert all(np.abs(np.asarray(l)).max() == 0
               for l in jax.tree.leaves(g["tasks"][other]))
  assert all(np.abs(np.asarray(l)).max() == 0
             for l in jax.tree.leaves(g["shared"]["discriminator"]))
  assert all(np.abs(np.asarray(l)).max() > 0
             for l in jax.tree.leaves(g["shared"]["encoder"]))


def test_reversal_flips_encoder_gradient_of_discriminator_loss():
  weight, scale = 0.5, 0.7
  model, x, params = _model(), _inputs(), _params()

  def through_model(p):  # the sowed loss, through the reversal layer
    _, aux = model.apply({"params": p}, x, task_presence=PRESENCE,
                         mutable=["aux_losses"])
    (loss,) = aux["aux_losses"]["adversarial"]
    return loss

  def without_reversal(p):  # the same loss, composed without reversal
    features = model.apply({"params": p}, x, method="encode")
    logits = model.apply({"params": p}, features, method="discriminate")
    return weight * adversarial.discriminator_loss(logits, PRESENCE)

  np.testing.assert_allclose(through_model(params), without_reversal(params),
                             rtol=1e-6)
  g = jax.jit(jax.grad(through_model))(params)
  g0 = jax.jit(jax.grad(without_reversal))(params)
  # The shared encoder gets minus scale times the plain gradient (it maximises).
  assert all(np.abs(np.asarray(l)).max() > 0
             for l in jax.tree.leaves(g0["shared"]["encoder"]))
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, -scale * b, rtol=1e-5,
                                              atol=1e-8),
      g["shared"]["encoder"], g0["shared"]["encoder"])
  # The discriminator itself gets the ordinary gradient (it minimises).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               g["shared"]["discriminator"], g0["shared"]["discriminator"])
  assert all(np.abs(np.asarray(l)).max() == 0
             for l in jax.tree.leaves(g["tasks"]))


def test_sowed_losses_match_hand_computation():
  model = _model(difference_weight=0.01)
  x, params = _inputs(), _params()
  _, state = model.apply({"params": params}, x, task_presence=PRESENCE,
                         mutable=["aux_losses", "intermediates"])
  (logits,) = state["intermediates"]["discriminator_logits"]
  features = model.apply({"params": params}, x, method="encode")
  np.testing.assert_allclose(
      logits, model.apply({"params": params}, features, method="discriminate"),
      rtol=1e-6)
  assert logits.shape == (3, 3)
  (adv,) = state["aux_losses"]["adversarial"]
  np.testing.assert_allclose(adv, 0.5 * _numpy_bce(logits, PRESENCE),
                             rtol=1e-5)

  # Difference loss: 0.01 * sum_k ||S^T P_k||_F^2, by hand.
  s = np.asarray(features, np.float64)  # [B, 5]
  hand = 0.0
  for name in SHAPES:
    p = np.asarray(PRIVATE.apply(
        {"params": params["tasks"][name]["encoder"]}, x), np.float64)  # [B, 4]
    hand += np.sum((s.T @ p) ** 2)
  (diff,) = state["aux_losses"]["difference"]
  assert hand > 0
  np.testing.assert_allclose(diff, 0.01 * hand, rtol=1e-5)


def test_no_discriminator_loss_without_presence():
  x, params = _inputs(), _params()
  out, aux = _model().apply({"params": params}, x, mutable=["aux_losses"])
  assert set(out) == set(SHAPES)
  assert not aux.get("aux_losses")  # difference loss off by default too
  _, aux = _model(adversarial_weight=0.0).apply(
      {"params": params}, x, task_presence=PRESENCE, mutable=["aux_losses"])
  assert not aux.get("aux_losses")


def test_task_presence_from_masks():
  masks = {"left": np.array([1.0, 0.0, 0.0]),
           "sum": np.array([1.0, 0.0, 0.0]),
           "dense": np.zeros((3, 2, 3), np.float32)}
  masks["dense"][1, 1, 2] = 1.0  # dense mask: any labelled element counts
  presence = tasks_lib.task_presence(masks, list(SHAPES))
  np.testing.assert_array_equal(presence, PRESENCE)
  with pytest.raises(KeyError, match=r"no mask for task\(s\) \['other'\]"):
    tasks_lib.task_presence(masks, ["left", "other"])


def test_errors():
  x, params = _inputs(), _params()
  with pytest.raises(ValueError, match=r"task_presence has shape \(3, 2\); "
                     r"expected \[B, K\] = \(3, 3\)"):
    _model().apply({"params": params}, x, task_presence=PRESENCE[:, :2])
  with pytest.raises(ValueError, match="reversal_scale must be >= 0"):
    _model(reversal_scale=-1.0).init(jax.random.PRNGKey(0), x)
