"""Every weighting and aggregation method trains the multi_digits model, and an
absent task changes neither the shared update nor any state."""

import functools

import jax
import numpy as np
import optax
import pytest

from mtl_jax import aggregation
from mtl_jax import weighting
from mtl_jax.data import mixture
from mtl_jax.data import multi_digits
from mtl_jax.models import build
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

ALL_TASKS = multi_digits.task_set()
# Methods whose result depends on random draws over the task axis (so K and
# K - 1 tasks draw differently even with the same key).
STOCHASTIC = {"rlw", "pcgrad", "gradvac", "graddrop"}
B = 32


@pytest.fixture(scope="module")
def batches(small_data_dir):
  train = multi_digits.load_split("train", data_dir=small_data_dir,
                                  config="small")
  masks = mixture.label_fraction_masks(len(train["left"]), {
      "left": 0.5, "right": 0.5, "present": 0.5, "sum": 0.5}, seed=0)
  arrays = multi_digits.to_batch_arrays(train, masks, ALL_TASKS.names)
  out = []
  for s in range(3):
    batch = jax.tree.map(lambda x, s=s: x[s * B:(s + 1) * B], arrays)
    if s == 1:  # "sum" has no label in the second step
      batch["masks"]["sum"] = np.zeros(B, np.float32)
    out.append(batch)
  return out


@functools.lru_cache(maxsize=None)
def _model(names):
  return build.make_hard_sharing_model(
      ALL_TASKS.select(names), build.make_trunk("mlp", hidden_sizes=(32, 16)))


@functools.lru_cache(maxsize=None)
def _initial_params(names):
  """The model's initial params (host arrays), initialised once per task set."""
  return jax.device_get(state_lib.init_params(
      _model(names), np.zeros((1, 12, 16, 1), np.float32),
      jax.random.PRNGKey(0)))


def _make(names, weighting_name, aggregator_name, rep_grad=False,
          params=None):
  """The initial state (of `params`, default the model's initial params) and
  the jitted step of the method."""
  tasks = ALL_TASKS.select(names)
  model = _model(tuple(names))
  if weighting_name == "static":
    w = weighting.get_weighting("static", weights=tasks.static_weights)
  elif weighting_name == "equal":
    w = weighting.get_weighting("equal", num_tasks=len(tasks))
  else:
    w = weighting.get_weighting(weighting_name)
  agg = (aggregation.get_aggregator(aggregator_name) if aggregator_name
         else None)
  tx = optax.sgd(0.05)
  if params is None:
    params = _initial_params(tuple(names))
  state = state_lib.create_train_state(params, tx, w, len(tasks),
                                       jax.random.PRNGKey(1), agg)
  step = jax.jit(step_lib.make_train_step(model.apply, tasks, tx, w,
                                          aggregator=agg, rep_grad=rep_grad,
                                          encode_decode=True))
  return state, step


def _select(batch, names):
  return {"inputs": batch["inputs"],
          "labels": {n: batch["labels"][n] for n in names},
          "masks": {n: batch["masks"][n] for n in names}}


def _assert_task_entries_unchanged(before, after, k, num_tasks):
  """Every [K]- or [K, K]-shaped state leaf keeps task k's entries exactly."""
  for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    b, a = np.asarray(b), np.asarray(a)
    if b.ndim >= 1 and b.shape[0] == num_tasks:
      np.testing.assert_array_equal(a[k], b[k])
    if b.ndim >= 2 and b.shape[1] == num_tasks:
      np.testing.assert_array_equal(a[:, k], b[:, k])


METHODS = ([("weighting", n) for n in sorted(weighting.WEIGHTINGS)] +
           [("aggregation", n) for n in sorted(aggregation.AGGREGATORS)])


@pytest.mark.parametrize("kind, name", METHODS)
def test_method_trains_and_ignores_absent_tasks(batches, kind, name):
  weighting_name = name if kind == "weighting" else "equal"
  aggregator_name = name if kind == "aggregation" else None
  names = ALL_TASKS.names
  state, step = _make(names, weighting_name, aggregator_name)
  k = names.index("sum")

  state, m0 = step(state, batches[0])
  before = state
  state, m1 = step(state, batches[1])
  assert float(m1["sum/count"]) == 0.0
  for m in (m0, m1):
    assert all(np.isfinite(float(v)) for v in m.values()), m
  # The absent task moved no statistic, learnable weight or pair entry.
  _assert_task_entries_unchanged(before.weighting_state, state.weighting_state,
                                 k, len(names))
  _assert_task_entries_unchanged(before.aggregation_state,
                                 state.aggregation_state, k, len(names))
  jax.tree.map(np.testing.assert_array_equal, state.params["tasks"]["sum"],
               before.params["tasks"]["sum"])
  state, m2 = step(state, batches[2])
  assert np.isfinite(float(m2["loss"]))

  if name in STOCHASTIC:
    return
  # The shared update with "sum" absent equals the update of a model that
  # never had the task (same init: flax derives each param from its path).
  others = tuple(n for n in names if n != "sum")
  small, small_step = _make(
      others, weighting_name, aggregator_name,
      params={"shared": before.params["shared"],
              "tasks": {n: before.params["tasks"][n] for n in others}})
  small = _copy_state_without(small, before, k, len(names))
  small, _ = small_step(small, _select(batches[1], others))
  after_full, _ = step(before, batches[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                       atol=1e-6),
               small.params["shared"], after_full.params["shared"])


def _copy_state_without(small, full, k, num_tasks):
  """`full`'s method states with task k's entries removed, into `small`."""
  def drop(x):
    x = np.asarray(x)
    if x.ndim >= 1 and x.shape[0] == num_tasks:
      x = np.delete(x, k, axis=0)
    if x.ndim >= 2 and x.shape[1] == num_tasks:
      x = np.delete(x, k, axis=1)
    return x
  return small.replace(
      weighting_state=jax.tree.map(drop, full.weighting_state),
      aggregation_state=jax.tree.map(drop, full.aggregation_state),
      step=full.step, rng=full.rng)


@pytest.mark.parametrize("name", sorted(
    n for n in aggregation.AGGREGATORS
    if aggregation.get_aggregator(n).rep_grad_ok))
def test_rep_grad_methods_train(batches, name):
  state, step = _make(ALL_TASKS.names, "equal", name, rep_grad=True)
  for batch in batches:
    state, m = step(state, batch)
    assert np.isfinite(float(m["loss"])), name
