"""Tests of the Multi-Task Attention Network (MTAN)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.models import mtan

SHAPES = {"left": (10,), "sum": (), "dense": (2, 3)}
EXPECTED = {"left": (3, 10), "sum": (3,), "dense": (3, 2, 3)}
CHANNELS = (4, 8)


def _inputs():
  return np.random.RandomState(0).standard_normal((3, 8, 6, 1)).astype(
      np.float32)


def _perturb(params, seed=2, scale=0.05):
  """Params plus small noise, as numpy (host RNG: no per-shape compilation)."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(
      lambda l: (np.asarray(l) + scale * rng.standard_normal(l.shape)
                 ).astype(np.float32), params)


@functools.lru_cache(maxsize=None)
def _model_and_params(pool):
  """The model, its jitted apply and initial params (compiled once per pool)."""
  model = mtan.MTANModel(SHAPES, channels=CHANNELS, pool=pool)
  # An "rbg" key: XLA compiles threefry for ~60 initialisers ~5x slower.
  key = jax.random.key(1, impl="rbg")
  variables = jax.jit(model.init)(key, _inputs())
  assert set(variables) == {"params"}
  params = variables["params"]
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
  return apply, encode, params


def _force_masks(params, logit):
  """Every attention mask to sigmoid(logit): zero kernel, constant bias."""
  params = jax.tree.map(np.array, params)  # a mutable numpy copy
  for task in params["tasks"].values():
    for j in range(len(CHANNELS)):
      mask = task[f"attention_{j}"]["mask_logits"]
      mask["kernel"] = np.zeros_like(mask["kernel"])
      mask["bias"] = np.full_like(mask["bias"], logit)
  return params


def test_shapes_split_and_gradients():
  apply, encode, params = _model_and_params("flatten")
  x = _inputs()
  assert set(params) == {"shared", "tasks"}
  assert set(params["tasks"]) == set(SHAPES)
  assert set(params["shared"]) == {"block_0", "block_1", "transfer_0"}
  for name in SHAPES:
    assert set(params["tasks"][name]) == {"attention_0", "attention_1", "head"}
  out = apply(params, x)
  assert {k: v.shape for k, v in out.items()} == EXPECTED
  # 8x6 -> 4x3 after one pooling: the shared feature map the masks gate.
  assert encode(params, x).shape == (
      3, 4, 3, 8)

  # Every parameter learns: the gradient of a loss touching all outputs is
  # non-zero in every leaf.
  params = _perturb(params)
  def loss(p):
    o = apply(p, x)
    return sum(jnp.sum(jnp.sin(v) + v ** 2) for v in o.values())
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)

  # Attention modules and heads are private to their task; the backbone and
  # the transfer convs serve every task.
  def left_only(p):
    return jnp.sum(apply(p, x)["left"])
  g = jax.jit(jax.grad(left_only))(params)
  for other in ("sum", "dense"):
    assert all(np.abs(np.asarray(l)).max() == 0
               for l in jax.tree.leaves(g["tasks"][other]))
  for path, l in jax.tree_util.tree_leaves_with_path(g["shared"]):
    assert np.abs(np.asarray(l)).max() > 0, jax.tree_util.keystr(path)


def test_masks_of_one_give_head_on_backbone_features():
  apply, encode, params = _model_and_params("flatten")
  x = _inputs()
  params = _perturb(params, scale=0.2)
  opened = _force_masks(params, 30.0)  # sigmoid(30) == 1 in float32
  out = apply(opened, x)
  features = np.asarray(encode(opened, x),
                        np.float64).reshape(3, -1)  # [B, 4 * 3 * 8]
  for name in SHAPES:
    head = opened["tasks"][name]["head"]["Dense_0"]
    hand = features @ head["kernel"].astype(np.float64) + head["bias"]
    np.testing.assert_allclose(out[name], hand.reshape(EXPECTED[name]),
                               rtol=1e-5, atol=1e-5)

  # The learned masks do select: with them the outputs differ.
  gated = apply(params, x)
  assert not np.allclose(gated["left"], out["left"], atol=1e-3)

  # Closed masks zero every task feature: each output is its head's bias.
  closed = _force_masks(params, -30.0)
  out = apply(closed, x)
  for name in SHAPES:
    bias = closed["tasks"][name]["head"]["Dense_0"]["bias"]
    np.testing.assert_allclose(
        out[name], np.broadcast_to(bias, (3, bias.size)).reshape(
            EXPECTED[name]), atol=1e-6)


def test_mean_pool_reads_averaged_features():
  apply, encode, params = _model_and_params("mean")
  x = _inputs()
  out = apply(params, x)
  assert {k: v.shape for k, v in out.items()} == EXPECTED
  opened = _force_masks(_perturb(params, scale=0.2), 30.0)
  out = apply(opened, x)
  features = np.asarray(encode(opened, x),
                        np.float64).mean(axis=(1, 2))  # [B, 8]
  head = opened["tasks"]["sum"]["head"]["Dense_0"]
  np.testing.assert_allclose(
      out["sum"], (features @ head["kernel"] + head["bias"])[:, 0],
      rtol=1e-5, atol=1e-5)


def test_errors():
  x = _inputs()
  with pytest.raises(ValueError,
                     match="unknown pool 'max'; valid: flatten, mean"):
    mtan.MTANModel(SHAPES, channels=CHANNELS, pool="max").init(
        jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"inputs must be images \[B, H, W, C\]"):
    mtan.MTANModel(SHAPES, channels=CHANNELS).init(
        jax.random.PRNGKey(0), x.reshape(3, -1))
  with pytest.raises(ValueError, match="channels is empty"):
    mtan.MTANModel(SHAPES, channels=()).init(jax.random.PRNGKey(0), x)
