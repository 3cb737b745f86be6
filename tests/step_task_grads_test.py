"""Tests of the per-task gradient paths of the train step (aggregators,
representation gradients, chunking, grad norms, post-update losses)."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.aggregation import base as agg_base
from mtl_jax.models import build
from mtl_jax.training import parallel
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

TASKS = tasks_lib.TaskSet([
    tasks_lib.classification_task("cls", 3),
    tasks_lib.regression_task("reg"),
    tasks_lib.multilabel_task("ml", 2),
])
B = 16
W = weighting.static([1.0, 0.5, 2.0])
SUM = agg_base.stateless(lambda g, **_: jnp.sum(g, 0), rep_grad_ok=True)


def _row(k):
  return agg_base.stateless(lambda g, **_: g[k], rep_grad_ok=True)


def _model():
  return build.make_hard_sharing_model(
      TASKS, build.make_trunk("mlp", hidden_sizes=(8, 6)), head_hidden_sizes=(5,))


def _batch(seed=0, reg_mask=None):
  rng = np.random.default_rng(seed)
  return {
      "inputs": rng.normal(size=(B, 4)).astype(np.float32),
      "labels": {"cls": rng.integers(0, 3, B).astype(np.int32),
                 "reg": rng.normal(size=B).astype(np.float32),
                 "ml": (rng.random((B, 2)) < 0.5).astype(np.float32)},
      "masks": {"cls": (rng.random(B) < 0.6).astype(np.float32),
                "reg": (rng.random(B) < 0.5).astype(np.float32)
                       if reg_mask is None else reg_mask.astype(np.float32),
                "ml": np.ones(B, np.float32)},
  }


def _state(model, tx, w=W, aggregator=None):
  params = state_lib.init_params(model, np.zeros((1, 4), np.float32),
                                 jax.random.PRNGKey(0))
  return state_lib.create_train_state(params, tx, w, len(TASKS),
                                      jax.random.PRNGKey(3), aggregator)


def _run(aggregator=None, rep_grad=False, chunk_size=None, w=W, batch=None):
  model, tx = _model(), optax.sgd(0.1)
  step = jax.jit(step_lib.make_train_step(
      model.apply, TASKS, tx, w, aggregator=aggregator, rep_grad=rep_grad,
      chunk_size=chunk_size, encode_decode=True))
  state = _state(model, tx, w, aggregator)
  return step(state, _batch() if batch is None else batch), state, model


def _close(a, b, rtol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol,
                                                       atol=1e-7), a, b)


@pytest.mark.parametrize("rep_grad, chunk_size", [(False, None), (False, 2),
                                                  (True, None), (True, 1)])
def test_sum_of_task_gradients_equals_the_weighted_sum_step(rep_grad, chunk_size):
  (plain, m_plain), _, _ = _run()
  (agg, m_agg), _, _ = _run(SUM, rep_grad=rep_grad, chunk_size=chunk_size)
  _close(agg.params, plain.params)
  for key in m_plain:
    np.testing.assert_allclose(m_agg[key], m_plain[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_task_rows_are_the_gradients_of_each_weighted_task_loss(k):
  """Row k of the per-task matrix is grad of w_k L_k w.r.t. the shared params."""
  (new, _), state, model = _run(_row(k))
  batch = _batch()
  task = TASKS[k]

  def task_loss(p):
    preds = model.apply({"params": p}, batch["inputs"], train=True)
    s, c = task.loss(preds[task.name], batch["labels"][task.name],
                     batch["masks"][task.name])
    return W.update(None, None, None)[0][k] * s / jnp.maximum(c, 1.0)

  g = jax.grad(task_loss)(state.params)
  expected_shared = jax.tree.map(lambda p, d: p - 0.1 * d,
                                 state.params["shared"], g["shared"])
  _close(new.params["shared"], expected_shared)


def test_absent_task_row_is_zero_and_heads_get_their_own_gradient():
  batch = _batch(reg_mask=np.zeros(B))
  (new, m), state, _ = _run(_row(1), batch=batch)  # row of the absent task
  assert float(m["reg/count"]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, new.params["shared"],
               state.params["shared"])
  # Heads are updated with their own task's gradient whatever the aggregator.
  (plain, _), _, _ = _run(batch=batch)
  _close(new.params["tasks"], plain.params["tasks"])


class _Recorder(NamedTuple):
  norms: jax.Array
  new_losses: jax.Array


def _recording_weighting():
  def init(num_tasks):
    return _Recorder(jnp.zeros(num_tasks), jnp.zeros(num_tasks))

  def update(losses, counts, state, *, rng, grad_norms):
    del losses, counts, rng
    return jnp.ones(3), state._replace(norms=grad_norms)

  def post_update(new_losses, counts, state):
    del counts
    return state._replace(new_losses=new_losses)

  return weighting.Weighting(init, update, post_update,
                             frozenset({"grad_norms"}))


@pytest.mark.parametrize("aggregator, rep_grad", [(None, False), (SUM, False),
                                                  (SUM, True)])
def test_grad_norms_and_post_update_losses(aggregator, rep_grad):
  w = _recording_weighting()
  (new, _), state, model = _run(aggregator, rep_grad=rep_grad, w=w)
  batch = _batch()

  def losses(p, k):
    preds = model.apply({"params": p}, batch["inputs"], train=True)
    t = TASKS[k]
    s, c = t.loss(preds[t.name], batch["labels"][t.name], batch["masks"][t.name])
    return s / jnp.maximum(c, 1.0)

  for k in range(3):
    g = jax.grad(losses)(state.params, k)["shared"]["features"]
    norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g)))
    np.testing.assert_allclose(new.weighting_state.norms[k], norm, rtol=1e-5)
    np.testing.assert_allclose(new.weighting_state.new_losses[k],
                               losses(new.params, k), rtol=1e-5)


def test_rep_grad_needs_a_valid_aggregator():
  model, tx = _model(), optax.sgd(0.1)
  with pytest.raises(ValueError, match="rep_grad=True needs a gradient aggregator"):
    step_lib.make_train_step(model.apply, TASKS, tx, W, rep_grad=True)
  bad = agg_base.stateless(lambda g, **_: g.sum(0), rep_grad_ok=False)
  with pytest.raises(ValueError, match="not valid on representation gradients"):
    step_lib.make_train_step(model.apply, TASKS, tx, W, aggregator=bad,
                             rep_grad=True)


def _nonlinear_aggregator():
  # Direction depends non-linearly on the whole matrix: any per-device
  # aggregation (instead of on global gradients) would change it.
  def fn(g, *, counts, **_):
    norms = jnp.linalg.norm(g, axis=1, keepdims=True)
    present = agg_base.present_mask(counts, g.shape[0])[:, None]
    return jnp.sum(jnp.where(present, g / jnp.maximum(norms, 1e-12), 0.0), 0)
  return agg_base.stateless(fn, rep_grad_ok=True)


@pytest.mark.parametrize("rep_grad", [False, True])
def test_pmap_and_sharded_jit_match_one_device_with_an_aggregator(rep_grad):
  agg = _nonlinear_aggregator()
  model, tx = _model(), optax.sgd(0.1)
  batch = _batch(reg_mask=np.eye(B)[0])  # reg labelled on one example only
  make = lambda axis: step_lib.make_train_step(
      model.apply, TASKS, tx, W, aggregator=agg, rep_grad=rep_grad,
      encode_decode=True, axis_name=axis)
  ref, ref_m = jax.jit(make(None))(_state(model, tx, aggregator=agg), batch)
  for mode in ("jit", "pmap"):
    par = parallel.DataParallel(parallel.make_mesh(8), parallelism=mode)
    st = par.put_state(_state(model, tx, aggregator=agg))
    st, m = par.compile_train_step(make(par.axis_name), st)(st, par.put_batch(batch))
    _close(par.unreplicate(st).params, jax.device_get(ref.params), rtol=1e-4)
    np.testing.assert_allclose(par.to_host(m)["loss"], ref_m["loss"], rtol=1e-5)


class _Penalised(nn.Module):
  """A hard-sharing model that sows an L2 penalty on its shared kernel."""

  strength: float = 0.3

  def setup(self):
    self.inner = _model()

  def __call__(self, x, *, train=False, task_presence=None):
    out = self.inner(x, train=train)
    kernel = self.inner.variables["params"]["shared"]["features"]["kernel"]
    self.sow("aux_losses", "penalty", self.strength * jnp.sum(kernel ** 2))
    if task_presence is not None:
      self.sow("aux_losses", "presence", jnp.mean(task_presence) * 0.0)
    return out


@pytest.mark.parametrize("aggregator", [None, SUM])
def test_auxiliary_losses_are_added_to_the_objective(aggregator):
  model, tx = _Penalised(), optax.sgd(0.1)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.float32))["params"]
  # Flax nests the inner model's params under "inner": lift them so the split
  # is {"shared", "tasks"} as the step expects.
  params = params["inner"]
  apply = lambda v, x, **kw: model.apply({"params": {"inner": v["params"]}}, x, **kw)
  state = state_lib.create_train_state(params, tx, W, 3, jax.random.PRNGKey(3),
                                       aggregator)
  step = jax.jit(step_lib.make_train_step(apply, TASKS, tx, W,
                                          aggregator=aggregator,
                                          pass_task_presence=True))
  batch = _batch()
  new, m = step(state, batch)
  plain_step = jax.jit(step_lib.make_train_step(_model().apply, TASKS, tx, W,
                                                aggregator=aggregator))
  plain, m_plain = plain_step(state, batch)
  kernel = state.params["shared"]["features"]["kernel"]
  penalty = 0.3 * float(jnp.sum(kernel ** 2))
  np.testing.assert_allclose(m["aux/penalty"], penalty, rtol=1e-6)
  np.testing.assert_allclose(m["loss"], m_plain["loss"] + penalty, rtol=1e-5)
  # The penalty's gradient 2 * 0.3 * kernel is added to the plain update.
  expected = plain.params["shared"]["features"]["kernel"] - 0.1 * 0.6 * kernel
  np.testing.assert_allclose(new.params["shared"]["features"]["kernel"],
                             expected, rtol=1e-5, atol=1e-7)
  _close(new.params["tasks"], plain.params["tasks"])


def test_task_presence_marks_labelled_tasks():
  batch = _batch()
  presence = tasks_lib.task_presence(batch["masks"], TASKS.names)
  expected = np.stack([batch["masks"][n] > 0 for n in TASKS.names], 1)
  np.testing.assert_array_equal(presence, expected.astype(np.float32))


class _TrunkWithAux(nn.Module):
  """An MLP trunk that sows an auxiliary loss (a feature penalty)."""

  @nn.compact
  def __call__(self, x, *, train=False):
    del train
    h = nn.tanh(nn.Dense(8)(x))
    h = nn.Dense(6, name="features")(h)
    self.sow(step_lib.AUX_LOSSES, "penalty", 0.1 * jnp.mean(jnp.square(h)))
    return h


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_rep_grad_adds_the_trunks_auxiliary_loss(chunk_size):
  """With the sum aggregator, rep_grad's direction sent through the trunk is
  the weighted-sum gradient: so the steps are equal only if the trunk's
  auxiliary loss reaches the shared params on the rep_grad path too."""
  model = build.make_hard_sharing_model(TASKS, _TrunkWithAux(),
                                        head_hidden_sizes=(5,))
  tx = optax.sgd(0.1)
  state = _state(model, tx, W, SUM)
  batch = _batch()
  rep = jax.jit(step_lib.make_train_step(
      model.apply, TASKS, tx, W, aggregator=SUM, rep_grad=True,
      chunk_size=chunk_size, encode_decode=True))(state, batch)
  plain_state = _state(model, tx, W)
  plain = jax.jit(step_lib.make_train_step(model.apply, TASKS, tx, W))(
      plain_state, batch)
  assert float(plain[1]["aux/shared/penalty"]) > 0
  _close(rep[0].params, plain[0].params)
  for key in plain[1]:
    np.testing.assert_allclose(rep[1][key], plain[1][key], rtol=1e-5,
                               err_msg=key)


def test_rep_grad_needs_encode_decode():
  with pytest.raises(ValueError, match="encode_decode"):
    step_lib.make_train_step(_model().apply, TASKS, optax.sgd(0.1), W,
                             aggregator=SUM, rep_grad=True)
