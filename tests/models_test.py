"""Tests of trunks, heads and the hard-sharing model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax.models import build, heads, trunks

TASKS = tasks_lib.TaskSet([
    tasks_lib.classification_task("left", 10),
    tasks_lib.multilabel_task("present", 10),
    tasks_lib.regression_task("sum"),
    tasks_lib.regression_task("dense", (2, 3)),
])


@pytest.mark.parametrize("name, kwargs", [
    ("mlp", dict(hidden_sizes=(16, 8))),
    ("cnn", dict(channels=(4, 8), strides=(1, 2), feature_size=8)),
    ("resnet", dict(stage_sizes=(1, 1), widths=(8, 8), feature_size=8)),
])
def test_hard_sharing_shapes_split_and_gradients(name, kwargs):
  model = build.make_hard_sharing_model(
      TASKS, build.make_trunk(name, **kwargs), head_hidden_sizes=(6,))
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 12, 16, 1))
  # Jitted: op-by-op dispatch of init and two gradients costs more than
  # their compilation.
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x)["params"]
  assert set(params) == {"shared", "tasks"}
  assert set(params["tasks"]) == set(TASKS.names)
  out = jax.jit(model.apply)({"params": params}, x)
  assert {k: v.shape for k, v in out.items()} == {
      "left": (3, 10), "present": (3, 10), "sum": (3,), "dense": (3, 2, 3)}
  assert model.apply({"params": params}, x, method="encode").shape == (3, 8)

  # Every parameter learns: the gradient of a loss touching all outputs is
  # non-zero in every leaf. Params are perturbed first because ResNet's
  # zero-initialised last convs block the gradient of the first conv of a block
  # at initialisation (by design: blocks start as the identity).
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(treedef, [
      l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  def loss(p):
    o = model.apply({"params": p}, x)
    return sum(jnp.sum(jnp.sin(v) + v ** 2) for v in o.values())
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)

  # A task's head only affects its own output.
  def left_only(p):
    return jnp.sum(model.apply({"params": p}, x)["left"])
  g = jax.jit(jax.grad(left_only))(params)["tasks"]
  for other in ("present", "sum", "dense"):
    assert all(float(jnp.abs(l).max()) == 0 for l in jax.tree.leaves(g[other]))


def test_head_is_affine_reshape():
  head = heads.Head(output_shape=(2, 2))
  f = jnp.arange(6.0).reshape(2, 3)
  p = head.init(jax.random.PRNGKey(0), f)
  out = head.apply(p, f)
  expected = (f @ p["params"]["Dense_0"]["kernel"]
              + p["params"]["Dense_0"]["bias"]).reshape(2, 2, 2)
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_mlp_dropout_only_in_training():
  mlp = trunks.MLP(hidden_sizes=(32,), dropout_rate=0.5)
  x = jnp.ones((4, 5))
  p = mlp.init(jax.random.PRNGKey(0), x)
  a = mlp.apply(p, x)
  np.testing.assert_array_equal(a, mlp.apply(p, x))
  b = mlp.apply(p, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  kept = b != 0
  # Inverted dropout: kept units are scaled by 1 / (1 - rate).
  np.testing.assert_allclose(b[kept], 2 * a[kept], rtol=1e-6)
  assert 0 < kept.mean() < 1


def test_unknown_trunk_and_argument():
  with pytest.raises(ValueError, match="unknown trunk 'vit'; valid: cnn, mlp, resnet"):
    build.make_trunk("vit")
  with pytest.raises(ValueError, match=r"trunk 'mlp' has no argument\(s\) \['depth'\]"):
    build.make_trunk("mlp", depth=3)
