"""DeepCluster-style clustering inside the train step.

The step writes the batch's stop-gradient shared features into a bank,
refits k-means every `every` steps, and trains the task's head on the
nearest centroid of each row's features; the task has no label (count 0)
before the first fit. Its state lives in `TrainState.task_state`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import pretext
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.models import build
from mtl_jax.pretext import cluster
from mtl_jax.pretext import kmeans
from mtl_jax.training import parallel
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

SHAPE = (8, 8, 1)
B = 8
EVERY = 3
CLUSTER = cluster.cluster_task("clu", num_clusters=3, every=EVERY,
                               bank_size=16, num_iters=5)
TASKS = tasks_lib.TaskSet([
    tasks_lib.classification_task("cls", 3),
    pretext.pretext_task("cell", pretext.grid_mask((2, 2)), SHAPE),
    CLUSTER])


def _batch(i, size=B):
  rng = np.random.default_rng(i)
  mask = np.zeros(size, np.float32)
  mask[: size // 2] = 1.0  # the second half is the unlabelled pool
  return {"inputs": rng.uniform(size=(size,) + SHAPE).astype(np.float32),
          "labels": {"cls": rng.integers(0, 3, size).astype(np.int32)},
          "masks": {"cls": mask}}


@functools.cache
def _compiled():
  """The default tasks' model, initial state and jitted step, compiled once
  for the tests that use them."""
  model, state, step = _setup()
  return model, state, jax.jit(step)


def _setup(tasks=TASKS, arch="hard_sharing"):
  model = build.make_model(arch, tasks, build.make_trunk(
      "mlp", hidden_sizes=(16,)), head_hidden_sizes=())
  params = state_lib.init_params(model, _batch(0)["inputs"],
                                 jax.random.PRNGKey(0))
  task_state = cluster.init_task_state(
      tasks, lambda x: model.apply({"params": params}, x, method="encode"),
      _batch(0)["inputs"])
  opt = optax.adam(1e-2)
  state = state_lib.create_train_state(params, opt, weighting.equal(),
                                       len(tasks), jax.random.PRNGKey(1),
                                       task_state=task_state)
  step = step_lib.make_train_step(model.apply, tasks, opt, weighting.equal(),
                                  encode_decode=True)
  return model, state, step


def test_state_shapes_and_no_label_before_the_first_fit():
  model, state, step = _compiled()
  st = state.task_state["clu"]
  assert st.bank.shape == (16, 16) and st.kmeans.centroids.shape == (3, 16)
  for i in range(EVERY - 1):
    state, metrics = step(state, _batch(i))
    assert float(metrics["clu/count"]) == 0.0  # unfitted: absent
    assert float(metrics["clu/loss"]) == 0.0
  assert int(state.task_state["clu"].kmeans.num_fits) == 0
  # Two batches of 8 rows written: the bank (16 rows) is full.
  np.testing.assert_array_equal(state.task_state["clu"].bank_weights,
                                np.ones(16))


def test_refit_every_n_steps_and_labels_are_the_nearest_centroid():
  model, state, step = _compiled()
  fits = []
  for i in range(3 * EVERY):
    before = state
    state, metrics = step(state, _batch(i))
    fits.append(int(metrics["clu/num_fits"]))
  # Fitted after steps 3, 6, 9 (step + 1 a multiple of EVERY).
  assert fits == [0, 0, 1, 1, 1, 2, 2, 2, 3]
  # The last step's labels: the nearest centroid (before its refit) of each
  # row's features under the params before the update.
  centroids = before.task_state["clu"].kmeans.centroids
  features = model.apply({"params": before.params}, _batch(8)["inputs"],
                         method="encode")
  labels, _ = kmeans.assign(features, centroids)
  preds = model.apply({"params": before.params}, _batch(8)["inputs"])["clu"]
  s, c = CLUSTER.loss(preds, labels, jnp.ones(B))
  np.testing.assert_allclose(metrics["clu/loss"], s / c, rtol=1e-5)
  assert float(metrics["clu/count"]) == B
  # The stored assignments are k-means' on the bank at the last fit.
  st = state.task_state["clu"]
  np.testing.assert_array_equal(st.assignments,
                                kmeans.assign(st.bank, st.kmeans.centroids)[0])
  np.testing.assert_allclose(np.sum(st.kmeans.counts), 16.0)


def test_bank_holds_only_the_rows_the_task_trains_on():
  tasks = tasks_lib.TaskSet([TASKS[0], cluster.cluster_task(
      "clu", num_clusters=2, every=100, bank_size=16, rows="unlabelled")])
  model, state, step = _setup(tasks)
  state, _ = jax.jit(step)(state, _batch(0))
  st = state.task_state["clu"]
  # 4 pool rows written to slots 0..3, in row order.
  np.testing.assert_array_equal(st.bank_weights, [1.0] * 4 + [0.0] * 12)
  assert int(st.position) == 4
  features = model.apply({"params": _setup(tasks)[1].params},
                         _batch(0)["inputs"][4:], method="encode")
  np.testing.assert_allclose(st.bank[:4], features, rtol=1e-6)


def test_pmap_equals_one_device():
  """The views (one per row, from its global index), the pretext losses and
  the clustering's bank (gathered over devices) and k-means fits: the same
  under pmap over 8 devices as on one."""
  _, state, step = _setup()
  batches = [_batch(i, size=16) for i in range(EVERY)]
  ref = state
  step = jax.jit(step)
  for b in batches:
    ref, ref_metrics = step(ref, b)
  par = parallel.DataParallel(parallel.make_mesh(8), parallelism="pmap")
  model = build.make_model("hard_sharing", TASKS, build.make_trunk(
      "mlp", hidden_sizes=(16,)), head_hidden_sizes=())
  pstep = par.compile_train_step(step_lib.make_train_step(
      model.apply, TASKS, optax.adam(1e-2), weighting.equal(),
      encode_decode=True, axis_name=par.axis_name), par.put_state(state))
  placed = par.put_state(state)
  for b in batches:
    placed, metrics = pstep(placed, par.put_batch(b))
  metrics = par.to_host(metrics)
  for key in ref_metrics:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-4,
                               atol=1e-5, err_msg=key)
  got = par.unreplicate(placed).task_state["clu"]
  np.testing.assert_allclose(got.kmeans.centroids,
                             ref.task_state["clu"].kmeans.centroids,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(got.assignments,
                                ref.task_state["clu"].assignments)


def test_eval_leaves_the_clustering_task_out():
  model, state, _ = _compiled()
  out = step_lib.finalize(TASKS, jax.jit(step_lib.make_eval_step(
      model.apply, TASKS))(state.params, _batch(1)))
  assert not any(k.startswith("clu/") for k in out)
  assert out["cell/count"] == B


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="cluster: num_clusters must be an "
                     "integer >= 2, got 1"):
    cluster.cluster_task(num_clusters=1)
  with pytest.raises(ValueError, match="bank_size 4 is smaller than "
                     "num_clusters 8"):
    cluster.cluster_task(num_clusters=8, bank_size=4)
  tasks = tasks_lib.TaskSet([TASKS[0], cluster.cluster_task(
      "clu", num_clusters=2, bank_size=4)])
  _, state, step = _setup(tasks)
  with pytest.raises(ValueError, match="bank_size 4 is smaller than the "
                     "global batch 8"):
    jax.eval_shape(step, state, _batch(0))
  model = build.make_model("mmoe", TASKS, build.make_trunk(
      "mlp", hidden_sizes=(16,)), head_hidden_sizes=())
  params = state_lib.init_params(model, _batch(0)["inputs"],
                                 jax.random.PRNGKey(0))
  step = step_lib.make_train_step(model.apply, TASKS, optax.sgd(0.1),
                                  weighting.equal())
  state = state_lib.create_train_state(
      params, optax.sgd(0.1), weighting.equal(), len(TASKS),
      jax.random.PRNGKey(1), task_state={"clu": CLUSTER.pretext.init_state(4)})
  with pytest.raises(ValueError, match=r"clustering task\(s\) \['clu'\] read "
                     "the shared features: they need an architecture with "
                     "encode/decode"):
    jax.eval_shape(step, state, _batch(0))
