"""Tests of the pure train step and the eval step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import aggregation
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.data import mixture
from mtl_jax.models import build
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

TASKS = tasks_lib.TaskSet([
    tasks_lib.classification_task("cls", 3, weight=1.0),
    tasks_lib.regression_task("reg", weight=0.5),
])
B = 8


def _model():
  return build.make_hard_sharing_model(
      TASKS, build.make_trunk("mlp", hidden_sizes=(16,)))


def _batch(seed=0, cls_mask=None, reg_mask=None):
  rng = np.random.default_rng(seed)
  return {
      "inputs": rng.normal(size=(B, 5)).astype(np.float32),
      "labels": {"cls": rng.integers(0, 3, B).astype(np.int32),
                 "reg": rng.normal(size=B).astype(np.float32)},
      "masks": {
          "cls": np.array([1, 1, 0, 1, 0, 0, 1, 0] if cls_mask is None
                          else cls_mask, np.float32),
          "reg": np.array([0, 1, 1, 0, 0, 1, 0, 0] if reg_mask is None
                          else reg_mask, np.float32)},
  }


def _state(model, tx, seed=0):
  params = state_lib.init_params(model, np.zeros((1, 5), np.float32),
                                 jax.random.PRNGKey(seed))
  return state_lib.create_train_state(params, tx, weighting.static([1.0, 0.5]),
                                      len(TASKS), jax.random.PRNGKey(42))


def _reference_objective(model, params, batch):
  """The weighted masked objective written out by hand (no mtl_jax losses)."""
  out = model.apply({"params": params}, batch["inputs"])
  m_c, m_r = batch["masks"]["cls"], batch["masks"]["reg"]
  logp = jax.nn.log_softmax(out["cls"])
  nll = -logp[jnp.arange(B), batch["labels"]["cls"]]
  l_cls = jnp.sum(nll * m_c) / jnp.sum(m_c)
  l_reg = jnp.sum((out["reg"] - batch["labels"]["reg"]) ** 2 * m_r) / jnp.sum(m_r)
  return 1.0 * l_cls + 0.5 * l_reg, (l_cls, l_reg)


def test_step_matches_hand_written_objective_and_sgd_update():
  model, tx = _model(), optax.sgd(0.1)
  state = _state(model, tx)
  batch = _batch()
  step = jax.jit(step_lib.make_train_step(model.apply, TASKS, tx,
                                          weighting.static([1.0, 0.5])))
  new_state, metrics = step(state, batch)
  (total, (l_cls, l_reg)), grads = jax.value_and_grad(
      lambda p: _reference_objective(model, p, batch), has_aux=True)(state.params)
  np.testing.assert_allclose(metrics["loss"], total, rtol=1e-6)
  np.testing.assert_allclose(metrics["cls/loss"], l_cls, rtol=1e-6)
  np.testing.assert_allclose(metrics["reg/loss"], l_reg, rtol=1e-6)
  assert float(metrics["cls/count"]) == 4.0 and float(metrics["reg/count"]) == 3.0
  assert float(metrics["reg/weight"]) == 0.5
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               new_state.params, expected)
  assert int(new_state.step) == 1


def test_unlabelled_rows_change_nothing():
  """Rows masked for every task give exactly the update of the sub-batch without them."""
  model, tx = _model(), optax.sgd(0.1)
  state = _state(model, tx)
  batch = _batch()  # rows 4 and 7 are labelled for no task
  keep = np.array([0, 1, 2, 3, 5, 6])
  sub = jax.tree.map(lambda x: x[keep], batch)
  step = step_lib.make_train_step(model.apply, TASKS, tx,
                                  weighting.static([1.0, 0.5]))
  full_state, full_m = jax.jit(step)(state, batch)
  sub_state, sub_m = jax.jit(step)(state, sub)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               full_state.params, sub_state.params)
  np.testing.assert_allclose(full_m["loss"], sub_m["loss"], rtol=1e-6)


def test_absent_task_has_zero_loss_and_gradient():
  model, tx = _model(), optax.sgd(0.1)
  state = _state(model, tx)
  batch = _batch(reg_mask=np.zeros(B))
  new_state, m = jax.jit(step_lib.make_train_step(
      model.apply, TASKS, tx, weighting.static([1.0, 0.5])))(state, batch)
  assert float(m["reg/count"]) == 0.0 and float(m["reg/loss"]) == 0.0
  assert np.isfinite(float(m["loss"]))
  jax.tree.map(np.testing.assert_array_equal, new_state.params["tasks"]["reg"],
               state.params["tasks"]["reg"])
  # The shared trunk still moves (the classification task is present).
  assert not np.allclose(new_state.params["shared"]["features"]["kernel"],
                         state.params["shared"]["features"]["kernel"])


def test_loss_decreases_on_a_fixed_batch():
  model, tx = _model(), optax.adam(1e-2)
  state = _state(model, tx)
  batch = _batch()
  step = jax.jit(step_lib.make_train_step(model.apply, TASKS, tx,
                                          weighting.static([1.0, 0.5])))
  losses = []
  for _ in range(30):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert all(b < a for a, b in zip(losses[:10], losses[1:11])), losses
  assert losses[-1] < 0.3 * losses[0], losses


def test_step_compiles_once():
  model, tx = _model(), optax.adam(1e-3)
  state = _state(model, tx)
  traces = []
  inner = step_lib.make_train_step(model.apply, TASKS, tx,
                                   weighting.static([1.0, 0.5]))

  def counted(s, b):
    traces.append(1)  # runs only while tracing
    return inner(s, b)

  step = jax.jit(counted, donate_argnums=0)
  masks = [None, np.zeros(B), np.ones(B), np.eye(B)[3]]
  for i, reg_mask in enumerate(masks):  # absent and present tasks alike
    state, _ = step(state, _batch(seed=i, reg_mask=reg_mask))
  assert len(traces) == 1
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_dropout_key_depends_on_step_not_on_history():
  """The step's randomness is fold_in(rng, step): a restored state replays it."""
  model = build.make_hard_sharing_model(
      TASKS, build.make_trunk("mlp", hidden_sizes=(16,), dropout_rate=0.5))
  tx = optax.sgd(0.1)
  state = _state(model, tx)
  step = jax.jit(step_lib.make_train_step(model.apply, TASKS, tx,
                                          weighting.static([1.0, 0.5])))
  a, _ = step(state, _batch())
  b, _ = step(state, _batch())
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  c, _ = step(state.replace(step=state.step + 1), _batch())
  assert not np.allclose(a.params["shared"]["features"]["kernel"],
                         c.params["shared"]["features"]["kernel"])


def test_prediction_shape_mismatch_is_a_clear_error():
  bad_tasks = tasks_lib.TaskSet([tasks_lib.classification_task("cls", 4),
                                 tasks_lib.regression_task("reg")])
  model, tx = _model(), optax.sgd(0.1)  # heads built for 3 classes
  state = _state(model, tx)
  step = jax.jit(step_lib.make_train_step(model.apply, bad_tasks, tx,
                                          weighting.static([1.0, 1.0])))
  with pytest.raises(ValueError, match=r"task 'cls': prediction shape \(8, 3\)"):
    step(state, _batch())


def test_state_made_with_other_methods_is_a_clear_error():
  model, tx = _model(), optax.sgd(0.1)
  state = _state(model, tx)  # no aggregator, static weights, sgd
  cases = [
      (dict(aggregator=aggregation.get_aggregator("gradvac")),
       "aggregation_state does not match the step's aggregator"),
      # A stateless aggregator too: the state holds () where the step
      # expects the aggregator's EmptyState.
      (dict(aggregator=aggregation.get_aggregator("mgda")),
       "aggregation_state does not match the step's aggregator"),
      (dict(optimizer=optax.adam(0.1)),
       "opt_state does not match the step's optimizer"),
      (dict(weighting_=weighting.get_weighting("uncertainty")),
       "weighting_state does not match the step's weighting"),
  ]
  for kwargs, message in cases:
    step_tx = kwargs.pop("optimizer", tx)
    w = kwargs.pop("weighting_", weighting.static([1.0, 1.0]))
    step = jax.jit(step_lib.make_train_step(model.apply, TASKS, step_tx, w,
                                            **kwargs))
    with pytest.raises(ValueError, match=message):
      step(state, _batch())
  # The matching step runs.
  step = jax.jit(step_lib.make_train_step(model.apply, TASKS, tx,
                                          weighting.static([1.0, 1.0])))
  assert int(step(state, _batch())[0].step) == 1


def test_evaluation_counts_only_labelled_examples():
  """Accuracy and MAE over a split, by hand, with padding and masked rows."""
  tasks = tasks_lib.TaskSet([tasks_lib.classification_task("cls", 2),
                             tasks_lib.regression_task("reg")])

  def apply_fn(variables, x, train=False):
    del variables, train
    # Predicts class 1 iff x > 0, and regression value x.
    return {"cls": jnp.stack([-x[:, 0], x[:, 0]], -1), "reg": x[:, 0]}

  x = np.array([[1.0], [-1.0], [2.0], [-3.0], [0.5]], np.float32)
  arrays = {"inputs": x,
            "labels": {"cls": np.array([1, 1, 0, 0, 1], np.int32),
                       "reg": np.array([1.0, 0.0, 0.0, 0.0, 0.0], np.float32)},
            "masks": {"cls": np.array([1, 1, 1, 1, 0], np.float32),
                      "reg": np.array([1, 0, 0, 1, 1], np.float32)}}
  eval_step = jax.jit(step_lib.make_eval_step(apply_fn, tasks))
  total = None
  for batch in mixture.EvalStream([mixture.array_component("eval", arrays)],
                                  tasks, batch_size=2):  # last one padded
    total = step_lib.accumulate(total, eval_step(None, batch))
  out = step_lib.finalize(tasks, total)
  # cls predictions [1, 0, 1, 0, (1)]; labelled rows 0-3: correct 0 and 3.
  assert out["cls/accuracy"] == pytest.approx(2 / 4)
  assert out["cls/count"] == 4.0
  # reg errors on labelled rows 0, 3, 4: |1-1|, |-3-0|, |0.5-0| -> MAE 3.5/3.
  assert out["reg/mae"] == pytest.approx(3.5 / 3)
  assert out["reg/rmse"] == pytest.approx(np.sqrt((9 + 0.25) / 3))
  assert out["reg/loss"] == pytest.approx((9 + 0.25) / 3)


def test_pmap_path_equals_jit_on_one_device():
  """The axis_name path (psum of sums and counts, then divide) gives jit's numbers.

  Multi-device equivalence is tested with virtual devices in the parallelism
  tests; here the pmap code path itself is exercised on the one CPU device.
  """
  model, tx = _model(), optax.sgd(0.1)
  state = _state(model, tx)
  batch = _batch(reg_mask=np.zeros(B))  # one task absent
  w = weighting.static([1.0, 0.5])
  jit_state, jit_m = jax.jit(step_lib.make_train_step(
      model.apply, TASKS, tx, w))(state, batch)
  pstep = jax.pmap(step_lib.make_train_step(model.apply, TASKS, tx, w,
                                            axis_name="data"),
                   axis_name="data")
  add_axis = lambda t: jax.tree.map(lambda x: np.asarray(x)[None], t)
  p_state, p_m = pstep(add_axis(state), add_axis(batch))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-6),
               p_state.params, jit_state.params)
  for key in jit_m:
    np.testing.assert_allclose(p_m[key][0], jit_m[key], rtol=1e-6, err_msg=key)
