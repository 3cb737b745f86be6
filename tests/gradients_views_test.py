"""The gradient paths on a model seen through two views.

`Forward` decides which inputs each task reads; the paths treat features and
their per-task gradients as `{view: ...}` pytrees. Here one task reads a
second view of the batch (the inputs negated): every path must still give
the gradient of the hand-written objective, so a view needs no branch in any
path.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import aggregation
from mtl_jax import gradients
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.aggregation import base as agg_base
from mtl_jax.models import build

TASKS = tasks_lib.TaskSet([
    tasks_lib.classification_task("cls", 3),
    tasks_lib.regression_task("reg"),
    tasks_lib.multilabel_task("ml", 2),
])
B = 12
W = weighting.static([1.0, 0.5, 2.0])
SUM = agg_base.stateless(lambda g, **_: jnp.sum(g, 0), rep_grad_ok=True)


@dataclasses.dataclass(frozen=True)
class _TwoViews(gradients.Forward):
  """Task "ml" reads the negated inputs; the others read the inputs."""

  def view_names(self):
    return ("inputs", "negated")

  def task_views(self):
    return {"cls": "inputs", "reg": "inputs", "ml": "negated"}

  def views(self, batch):
    return {"inputs": batch["inputs"], "negated": -batch["inputs"]}


def _model():
  return build.make_hard_sharing_model(
      TASKS, build.make_trunk("mlp", hidden_sizes=(8, 6)),
      head_hidden_sizes=(5,))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "inputs": jnp.asarray(rng.normal(size=(B, 4)), jnp.float32),
      "labels": {"cls": jnp.asarray(rng.integers(0, 3, B), jnp.int32),
                 "reg": jnp.asarray(rng.normal(size=B), jnp.float32),
                 "ml": jnp.asarray(rng.random((B, 2)) < 0.5, jnp.float32)},
      "masks": {"cls": jnp.asarray(rng.random(B) < 0.6, jnp.float32),
                "reg": jnp.asarray(rng.random(B) < 0.5, jnp.float32),
                "ml": jnp.ones(B, jnp.float32)},
  }


def _objective(model, params, batch):
  """`sum_k w_k L_k` written by hand: task k's prediction from its view."""
  views = {"inputs": batch["inputs"], "negated": -batch["inputs"]}
  total = 0.0
  for k, (task, view) in enumerate([("cls", "inputs"), ("reg", "inputs"),
                                    ("ml", "negated")]):
    preds = model.apply({"params": params}, views[view], train=True)
    s, c = TASKS[k].loss(preds[task], batch["labels"][task],
                         batch["masks"][task])
    total += W.update(None, None, None)[0][k] * s / jnp.maximum(c, 1.0)
  return total


def _gradients(path, model, aggregator=None, jacobian="auto"):
  spec = gradients.GradientSpec(
      model=_TwoViews(model.apply, TASKS, encode_decode=True),
      weighting=W, aggregator=aggregator, jacobian=jacobian)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
  states = gradients.MethodStates(
      W.init(len(TASKS)), aggregator.init(len(TASKS)) if aggregator else ())
  key = jax.random.PRNGKey(1)
  keys = gradients.StepKeys(key, key, key)
  return params, jax.jit(lambda p, b: path.gradients(spec, p, b, states,
                                                     keys))(params, _batch())


def _close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol,
                                                       atol=atol), a, b)


def test_weighted_sum_is_the_gradient_of_the_objective_over_both_views():
  model = _model()
  params, got = _gradients(gradients.weighted_sum, model)
  _close(got.grads, jax.grad(lambda p: _objective(model, p, _batch()))(params))


@pytest.mark.parametrize("path", ["jacobian", "rep_grad", "factored"])
def test_every_path_with_the_sum_aggregator_gives_the_same_gradient(path):
  """The sum of the per-task rows is the weighted-sum gradient on every path
  (factored: the two-stage route, with a head per view's features)."""
  model = _model()
  _, want = _gradients(gradients.weighted_sum, model)
  agg = SUM if path != "factored" else aggregation.get_aggregator("sum")
  _, got = _gradients(getattr(gradients, path), model, agg)
  _close(got.grads, want.grads)
  _close(got.losses, want.losses)


@pytest.mark.parametrize("method", ["mgda", "graddrop"])
def test_factored_two_stage_equals_the_jacobian_path_over_two_views(method):
  model = _model()
  agg = aggregation.get_aggregator(method)
  _, got = _gradients(gradients.factored, model, agg, jacobian="factored")
  _, want = _gradients(gradients.jacobian, model, agg)
  _close(got.grads, want.grads)
