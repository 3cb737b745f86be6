"""Tests of the soft-sharing model and its L2 penalty."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.models import soft_sharing, trunks

SHAPES = {"left": (10,), "sum": (), "dense": (2, 3)}
EXPECTED = {"left": (3, 10), "sum": (3,), "dense": (3, 2, 3)}


def _perturb(params, seed=2, scale=0.05):
  """Params plus small noise, as numpy (host RNG: no per-shape compilation)."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(
      lambda l: (np.asarray(l) + scale * rng.standard_normal(l.shape)
                 ).astype(np.float32), params)


def _model(column, strength=0.1):
  return soft_sharing.SoftSharingModel(SHAPES, column, head_hidden_sizes=(5,),
                                       penalty_strength=strength)


def _inputs():
  return np.random.RandomState(0).standard_normal((3, 6, 4, 2)).astype(
      np.float32)


def _init(model, x):
  # An "rbg" key: XLA compiles threefry initialisers several times slower.
  variables = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x)
  assert set(variables) == {"params"}  # init sows nothing
  return variables["params"]


# One MLP column for most tests: params do not depend on the penalty strength,
# so they are initialised (compiled) once per file.
MLP_COLUMN = trunks.MLP(hidden_sizes=(4, 3))


@pytest.fixture(scope="module")
def mlp_params():
  return _init(_model(MLP_COLUMN), _inputs())


def _numpy_penalty(params, strength):
  """strength * sum_leaves sum_{i<j} ||theta_i - theta_j||^2, in float64."""
  columns = [jax.tree.leaves(params["tasks"][n]["column"]) for n in SHAPES]
  total = 0.0
  for i, j in itertools.combinations(range(len(columns)), 2):
    for a, b in zip(columns[i], columns[j]):
      total += float(np.sum((np.asarray(a, np.float64) -
                             np.asarray(b, np.float64)) ** 2))
  return strength * total


@pytest.mark.parametrize("column", [
    MLP_COLUMN,
    trunks.ConvNet(channels=(3,), strides=(2,), feature_size=6),
])
def test_shapes_split_and_gradients(column):
  model, x = _model(column), _inputs()
  params = _init(model, x)
  assert set(params) == {"shared", "tasks"}
  assert set(params["tasks"]) == set(SHAPES)
  assert set(params["shared"]) == {"scale", "bias"}
  for name in SHAPES:
    assert set(params["tasks"][name]) == {"column", "head"}
  out = model.apply({"params": params}, x)
  assert {k: v.shape for k, v in out.items()} == EXPECTED

  # Every parameter learns from the task losses alone (no penalty): the
  # gradient of a loss touching all outputs is non-zero in every leaf.
  params = _perturb(params)
  def loss(p):
    o = model.apply({"params": p}, x)
    return sum(jnp.sum(jnp.sin(v) + v ** 2) for v in o.values())
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)

  # Columns are private: one task's output does not reach other columns.
  def left_only(p):
    return jnp.sum(model.apply({"params": p}, x)["left"])
  g = jax.jit(jax.grad(left_only))(params)
  for other in ("sum", "dense"):
    assert all(np.abs(np.asarray(l)).max() == 0
               for l in jax.tree.leaves(g["tasks"][other]))
  assert all(np.abs(np.asarray(l)).max() > 0
             for l in jax.tree.leaves(g["shared"]))


def test_identity_input_affine_at_init(mlp_params):
  # The shared affine starts as the identity: each task's output is its own
  # column and head applied to the raw inputs.
  model, x, params = _model(MLP_COLUMN), _inputs(), mlp_params
  np.testing.assert_array_equal(params["shared"]["scale"], np.ones(2))
  np.testing.assert_array_equal(params["shared"]["bias"], np.zeros(2))
  out = model.apply({"params": params}, x)
  tp = params["tasks"]["sum"]
  h = MLP_COLUMN.apply({"params": tp["column"]}, x)
  w1, b1 = tp["head"]["Dense_0"]["kernel"], tp["head"]["Dense_0"]["bias"]
  w2, b2 = tp["head"]["Dense_1"]["kernel"], tp["head"]["Dense_1"]["bias"]
  expected = (np.maximum(h @ w1 + b1, 0) @ w2 + b2)[:, 0]
  np.testing.assert_allclose(out["sum"], expected, rtol=1e-5, atol=1e-6)


def test_penalty_matches_formula_and_is_sowed(mlp_params):
  strength = 0.3
  model, x = _model(MLP_COLUMN, strength), _inputs()
  params = _perturb(mlp_params, scale=0.5)
  expected = _numpy_penalty(params, strength)
  assert expected > 0
  np.testing.assert_allclose(soft_sharing.l2_penalty(params, strength),
                             expected, rtol=1e-5)
  # The mean-centred identity quoted in the docstring.
  k = len(SHAPES)
  centred = 0.0
  for leaves in zip(*[jax.tree.leaves(params["tasks"][n]["column"])
                      for n in SHAPES]):
    stacked = np.stack([np.asarray(l, np.float64) for l in leaves])
    centred += np.sum((stacked - stacked.mean(0)) ** 2)
  np.testing.assert_allclose(strength * k * centred, expected, rtol=1e-9)

  out, aux = model.apply({"params": params}, x, mutable=["aux_losses"])
  assert set(out) == set(SHAPES)
  assert list(aux["aux_losses"]) == ["soft_sharing"]
  (sowed,) = aux["aux_losses"]["soft_sharing"]
  np.testing.assert_allclose(sowed, expected, rtol=1e-5)

  # d penalty / d theta_i = 2 * strength * sum_{j != i} (theta_i - theta_j),
  # and the heads and shared params are not penalised.
  grads = jax.jit(jax.grad(soft_sharing.l2_penalty), static_argnums=1)(
      params, strength)
  kernels = {n: np.asarray(params["tasks"][n]["column"]["Dense_0"]["kernel"])
             for n in SHAPES}
  for n in SHAPES:
    hand = 2 * strength * sum(kernels[n] - kernels[m] for m in SHAPES if m != n)
    np.testing.assert_allclose(grads["tasks"][n]["column"]["Dense_0"]["kernel"],
                               hand, rtol=1e-5, atol=1e-7)
    assert all(np.abs(np.asarray(l)).max() == 0
               for l in jax.tree.leaves(grads["tasks"][n]["head"]))


def test_penalty_zero_when_columns_equal(mlp_params):
  model, x = _model(MLP_COLUMN), _inputs()
  params = _perturb(mlp_params, scale=0.5)
  column = params["tasks"]["left"]["column"]
  params["tasks"] = {n: dict(p, column=column)
                     for n, p in params["tasks"].items()}
  assert float(soft_sharing.l2_penalty(params, 10.0)) == 0.0
  _, aux = model.apply({"params": params}, x, mutable=["aux_losses"])
  assert float(aux["aux_losses"]["soft_sharing"][0]) == 0.0


def test_no_penalty_sowed_when_off_or_not_collected(mlp_params):
  x, params = _inputs(), mlp_params
  model = _model(MLP_COLUMN, strength=0.0)
  _, aux = model.apply({"params": params}, x, mutable=["aux_losses"])
  assert not aux.get("aux_losses")
  # A plain apply does not collect it (and must not fail).
  model = _model(MLP_COLUMN, strength=1.0)
  out = model.apply({"params": params}, x)
  assert set(out) == set(SHAPES)


def test_errors():
  x = _inputs()
  with pytest.raises(ValueError, match="tasks_output_shapes is empty"):
    soft_sharing.SoftSharingModel({}, trunks.MLP()).init(
        jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="penalty_strength must be >= 0"):
    _model(trunks.MLP(), strength=-1.0).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="differs from tree 0"):
    soft_sharing.pairwise_squared_distance(
        [{"w": jnp.ones(2)}, {"w": jnp.ones(3)}])
  with pytest.raises(ValueError, match="no 'column' entry"):
    soft_sharing.l2_penalty({"tasks": {"a": {"head": {}}}}, 1.0)
