"""The step's optional gradient-cosine metric (`gradient_cosines=True`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import aggregation
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.models import build
from mtl_jax.training import loop
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

TASKS = tasks_lib.TaskSet([
    tasks_lib.classification_task("a", 3),
    tasks_lib.regression_task("b"),
    tasks_lib.regression_task("c"),
])
B = 8
KEY = "grad_cos/"


def _model():
  return build.make_hard_sharing_model(
      TASKS, build.make_trunk("mlp", hidden_sizes=(16,)))


def _batch(c_mask):
  rng = np.random.default_rng(0)
  return {
      "inputs": rng.normal(size=(B, 5)).astype(np.float32),
      "labels": {"a": rng.integers(0, 3, B).astype(np.int32),
                 "b": rng.normal(size=B).astype(np.float32),
                 "c": rng.normal(size=B).astype(np.float32)},
      "masks": {"a": np.array([1, 1, 0, 1, 0, 1, 1, 0], np.float32),
                "b": np.array([0, 1, 1, 0, 1, 1, 0, 1], np.float32),
                "c": np.asarray(c_mask, np.float32)},
  }


def _hand_cosines(model, params, batch):
  """Each task's masked mean loss, differentiated alone w.r.t. the shared
  params, and the cosines of the flattened gradients."""

  def task_loss(p, name):
    out = model.apply({"params": p}, batch["inputs"])[name]
    m = batch["masks"][name]
    if name == "a":
      logp = jax.nn.log_softmax(out)
      per = -logp[jnp.arange(B), batch["labels"]["a"]]
    else:
      per = (out - batch["labels"][name]) ** 2
    return jnp.sum(per * m) / jnp.maximum(jnp.sum(m), 1.0)

  rows = []
  for name in TASKS.names:
    g = jax.grad(lambda s: task_loss({**params, "shared": s}, name))(
        params["shared"])
    rows.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]))
  rows = np.asarray(rows, np.float64)
  norms = np.linalg.norm(rows, axis=1)
  return rows @ rows.T / np.outer(norms, norms)


@pytest.mark.parametrize("name,jacobian", [
    ("mean", "auto"),  # factored path: the Gram of the weighted rows
    ("upgrad", "full"),  # Jacobian path: the Gram of the [K, P] rows
    ("graddrop", "full"),  # columnwise, on the Jacobian path
])
def test_cosines_match_hand_computed_gradients(name, jacobian):
  model, tx = _model(), optax.sgd(0.1)
  params = state_lib.init_params(model, np.zeros((1, 5), np.float32),
                                 jax.random.PRNGKey(0))
  # Unequal static weights: the factored Gram is of w_k grad L_k, whose
  # cosines are those of the gradients.
  weights = weighting.static([1.0, 0.3, 2.0])
  agg = aggregation.get_aggregator(name)
  state = state_lib.create_train_state(params, tx, weights, len(TASKS),
                                       jax.random.PRNGKey(1), agg)
  batch = _batch([1, 0, 0, 1, 1, 0, 1, 1])
  step = jax.jit(step_lib.make_train_step(
      model.apply, TASKS, tx, weights, aggregator=agg, jacobian=jacobian,
      gradient_cosines=True))
  _, metrics = step(state, batch)
  expected = _hand_cosines(model, params, batch)
  names = TASKS.names
  got = {k: float(v) for k, v in metrics.items() if k.startswith(KEY)}
  assert sorted(got) == [f"{KEY}a,b", f"{KEY}a,c", f"{KEY}b,c"]
  for i, j in [(0, 1), (0, 2), (1, 2)]:
    np.testing.assert_allclose(got[f"{KEY}{names[i]},{names[j]}"],
                               expected[i, j], rtol=2e-4, atol=2e-5)
  # Not every pair is aligned: the test would miss a constant 1.
  assert min(got.values()) < 0.9


def test_absent_task_gives_nan_and_loop_averages_where_defined():
  model, tx = _model(), optax.sgd(0.1)
  params = state_lib.init_params(model, np.zeros((1, 5), np.float32),
                                 jax.random.PRNGKey(0))
  agg = aggregation.get_aggregator("mean")
  weights = weighting.static([1.0, 1.0, 1.0])
  state = state_lib.create_train_state(params, tx, weights, len(TASKS),
                                       jax.random.PRNGKey(1), agg)
  step = jax.jit(step_lib.make_train_step(
      model.apply, TASKS, tx, weights, aggregator=agg, gradient_cosines=True))
  _, absent = step(state, _batch([0] * B))  # task c has no labels
  assert np.isnan(float(absent[f"{KEY}a,c"]))
  assert np.isnan(float(absent[f"{KEY}b,c"]))
  assert np.isfinite(float(absent[f"{KEY}a,b"]))
  _, present = step(state, _batch([1, 0, 0, 1, 1, 0, 1, 1]))
  summary = loop.summarize_train_metrics([absent, present], TASKS.names)
  # a,c is defined at one of the two steps: its average is that value.
  np.testing.assert_allclose(summary[f"{KEY}a,c"],
                             float(present[f"{KEY}a,c"]), rtol=1e-6)
  np.testing.assert_allclose(
      summary[f"{KEY}a,b"],
      (float(absent[f"{KEY}a,b"]) + float(present[f"{KEY}a,b"])) / 2,
      rtol=1e-6)


def test_without_a_gram_matrix_it_is_refused_by_name():
  model, tx = _model(), optax.sgd(0.1)
  weights = weighting.static([1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="gradient_cosines=True: the "
                     "weighted-sum step"):
    step_lib.make_train_step(model.apply, TASKS, tx, weights,
                             gradient_cosines=True)
  with pytest.raises(ValueError, match="columnwise aggregator"):
    step_lib.make_train_step(
        model.apply, TASKS, tx, weights,
        aggregator=aggregation.get_aggregator("graddrop"),
        gradient_cosines=True)
