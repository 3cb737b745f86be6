"""Tests of the cross-stitch model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.models import cross_stitch

SHAPES = {"left": (10,), "sum": (), "dense": (2, 3)}
EXPECTED = {"left": (3, 10), "sum": (3,), "dense": (3, 2, 3)}
MLP = dict(hidden_sizes=(5, 4))
CNN = dict(conv_channels=(2, 3), conv_strides=(1, 2), hidden_sizes=(4,))
CONFIGS = {"mlp": MLP, "cnn": CNN}


def _inputs():
  return np.random.RandomState(0).standard_normal((3, 6, 4, 2)).astype(
      np.float32)


def _perturb(params, seed=2, scale=0.05):
  """Params plus small noise, as numpy (host RNG: no per-shape compilation)."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(
      lambda l: (np.asarray(l) + scale * rng.standard_normal(l.shape)
                 ).astype(np.float32), params)


def _init(model, x):
  # An "rbg" key: XLA compiles threefry initialisers several times slower.
  variables = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x)
  assert set(variables) == {"params"}  # init sows nothing
  return variables["params"]


@functools.lru_cache(maxsize=None)
def _model_and_params(kind):
  """The model of config `kind` and its initial params (compiled once)."""
  model = cross_stitch.CrossStitchModel(SHAPES, **CONFIGS[kind])
  return model, _init(model, _inputs())


def _numpy_mlp_forward(task_params, x):
  """A column alone, by hand: ReLU dense layers, then the linear head."""
  h = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  for l in range(len(MLP["hidden_sizes"])):
    p = task_params[f"layers_{l}"]
    h = np.maximum(h @ np.asarray(p["kernel"], np.float64) + p["bias"], 0)
  head = task_params["head"]["Dense_0"]
  return h @ np.asarray(head["kernel"], np.float64) + head["bias"]


@pytest.mark.parametrize("kind", CONFIGS)
def test_shapes_split_and_gradients(kind):
  kwargs, x = CONFIGS[kind], _inputs()
  model, params = _model_and_params(kind)
  assert set(params) == {"shared", "tasks"}
  assert set(params["tasks"]) == set(SHAPES)
  layers = len(kwargs.get("conv_channels", ())) + len(kwargs["hidden_sizes"])
  assert set(params["shared"]) == {f"cross_stitch_{l}" for l in range(layers)}
  for unit in params["shared"].values():
    np.testing.assert_array_equal(unit["alpha"], np.eye(3))
  out = model.apply({"params": params}, x)
  assert {k: v.shape for k, v in out.items()} == EXPECTED

  # At the identity, a task's output does not depend on other columns, but
  # every alpha (off-diagonal entries included) gets a gradient.
  def left_only(p):
    return jnp.sum(model.apply({"params": p}, x)["left"])
  g = jax.jit(jax.grad(left_only))(params)
  for other in ("sum", "dense"):
    assert all(np.abs(np.asarray(l)).max() == 0
               for l in jax.tree.leaves(g["tasks"][other]))
  for unit in g["shared"].values():
    # Row 0 (left's mixing weights) learns, from every column.
    assert np.all(np.asarray(unit["alpha"])[0] != 0)

  # Every parameter learns once the units mix: the gradient of a loss touching
  # all outputs is non-zero in every leaf.
  params = _perturb(params)
  def loss(p):
    o = model.apply({"params": p}, x)
    return sum(jnp.sum(jnp.sin(v) + v ** 2) for v in o.values())
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("kind", CONFIGS)
def test_identity_init_equals_independent_columns(kind):
  kwargs, x = CONFIGS[kind], _inputs()
  model, params = _model_and_params(kind)
  params = _perturb(params, scale=0.3)
  for unit in params["shared"].values():  # back to the identity
    unit["alpha"] = np.eye(3, dtype=np.float32)
  out = model.apply({"params": params}, x)
  for name, shape in SHAPES.items():
    column = cross_stitch.Column(shape, **kwargs)
    alone = column.apply({"params": params["tasks"][name]}, x)
    np.testing.assert_allclose(out[name], alone, rtol=1e-6, atol=1e-6)
    if kind == "mlp":  # and by hand
      hand = _numpy_mlp_forward(params["tasks"][name], x).reshape(
          EXPECTED[name])
      np.testing.assert_allclose(out[name], hand, rtol=1e-5, atol=1e-5)


def test_mixing_by_hand():
  # Two tasks, one dense layer: h_k = relu(x W_k + b_k), then
  # h'_i = sum_j alpha_ij h_j, then each head.
  shapes = {"a": (2,), "b": ()}
  model = cross_stitch.CrossStitchModel(shapes, hidden_sizes=(3,),
                                        alpha_self=0.9, alpha_other=0.1)
  x = _inputs().reshape(3, -1)
  params = _init(model, x)
  alpha0 = np.asarray(params["shared"]["cross_stitch_0"]["alpha"])
  np.testing.assert_allclose(alpha0, [[0.9, 0.1], [0.1, 0.9]], rtol=1e-7)
  params = _perturb(params, scale=0.3)
  alpha = np.asarray(params["shared"]["cross_stitch_0"]["alpha"], np.float64)
  h = []
  for name in shapes:
    p = params["tasks"][name]["layers_0"]
    h.append(np.maximum(x @ np.asarray(p["kernel"], np.float64) + p["bias"], 0))
  mixed = np.einsum("ij,jbd->ibd", alpha, np.stack(h))  # [K, B, 3]
  out = model.apply({"params": params}, x)
  for k, name in enumerate(shapes):
    head = params["tasks"][name]["head"]["Dense_0"]
    hand = (mixed[k] @ np.asarray(head["kernel"], np.float64) + head["bias"])
    np.testing.assert_allclose(out[name], hand.reshape((3,) + shapes[name]),
                               rtol=1e-5, atol=1e-6)


def test_errors():
  x = _inputs()
  with pytest.raises(ValueError, match="differ in length"):
    cross_stitch.CrossStitchModel(SHAPES, conv_channels=(2,)).init(
        jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="no layers to stitch"):
    cross_stitch.CrossStitchModel(SHAPES, hidden_sizes=()).init(
        jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="tasks_output_shapes is empty"):
    cross_stitch.CrossStitchModel({}).init(jax.random.PRNGKey(0), x)
