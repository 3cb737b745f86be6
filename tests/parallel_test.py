"""Data parallelism on 8 virtual CPU devices: jit-sharded, fsdp and pmap all give
the numbers of one device, including tasks labelled on one device only and tasks
absent from a step."""

import jax
import numpy as np
import optax
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.models import build
from mtl_jax.training import checkpoint as checkpoint_lib
from mtl_jax.training import parallel
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

N_DEV = 8
B = 16  # 2 rows per device
STEPS = 4
TASKS = tasks_lib.TaskSet([
    tasks_lib.classification_task("one_device", 3),
    tasks_lib.regression_task("sometimes"),
    tasks_lib.multilabel_task("often", 4),
])
W = weighting.static([1.0, 0.5, 2.0])


def _model():
  return build.make_hard_sharing_model(
      TASKS, build.make_trunk("mlp", hidden_sizes=(16, 8)),
      head_hidden_sizes=(8,))


def _batches():
  rng = np.random.default_rng(0)
  batches = []
  for s in range(STEPS):
    one_device = np.zeros(B, np.float32)
    one_device[:2] = 1.0  # rows 0-1: all on device 0 (and on process 0)
    # `sometimes` has no label at all in steps 0 and 2.
    sometimes = (np.zeros(B) if s % 2 == 0 else rng.random(B) < 0.5)
    batches.append({
        "inputs": rng.normal(size=(B, 6)).astype(np.float32),
        "labels": {
            "one_device": rng.integers(0, 3, B).astype(np.int32),
            "sometimes": rng.normal(size=B).astype(np.float32),
            "often": (rng.random((B, 4)) < 0.3).astype(np.float32)},
        "masks": {"one_device": one_device,
                  "sometimes": sometimes.astype(np.float32),
                  "often": (rng.random(B) < 0.8).astype(np.float32)},
    })
  return batches


def _initial_state(model, tx):
  params = state_lib.init_params(model, np.zeros((1, 6), np.float32),
                                 jax.random.PRNGKey(0))
  return state_lib.create_train_state(params, tx, W, len(TASKS),
                                      jax.random.PRNGKey(1))


def _single_device_run():
  model, tx = _model(), optax.adam(1e-2)
  state = _initial_state(model, tx)
  step = jax.jit(step_lib.make_train_step(model.apply, TASKS, tx, W))
  metrics = []
  for batch in _batches():
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  eval_step = jax.jit(step_lib.make_eval_step(model.apply, TASKS))
  evals = step_lib.finalize(TASKS, eval_step(state.params, _batches()[1]))
  return jax.device_get(state.params), metrics, evals


def _parallel_run(par):
  model, tx = _model(), optax.adam(1e-2)
  state = par.put_state(_initial_state(model, tx))
  step = par.compile_train_step(step_lib.make_train_step(
      model.apply, TASKS, tx, W, axis_name=par.axis_name), state)
  metrics = []
  for batch in _batches():
    state, m = step(state, par.put_batch(batch))
    metrics.append(par.to_host(m))
  eval_step = par.compile_eval_step(step_lib.make_eval_step(
      model.apply, TASKS, axis_name=par.axis_name), state.params)
  evals = step_lib.finalize(
      TASKS, par.to_host(eval_step(state.params, par.put_batch(_batches()[1]))))
  return par.unreplicate(state).params, metrics, evals, state


@pytest.fixture(scope="module")
def reference():
  assert jax.device_count() == N_DEV, "conftest sets 8 virtual CPU devices"
  return _single_device_run()


@pytest.mark.parametrize("parallelism, sharding", [
    ("jit", "replicated"), ("jit", "fsdp"), ("pmap", "replicated")])
def test_same_numbers_as_one_device(reference, parallelism, sharding):
  ref_params, ref_metrics, ref_evals = reference
  par = parallel.DataParallel(parallel.make_mesh(N_DEV),
                              parallelism=parallelism, sharding=sharding)
  params, metrics, evals, state = _parallel_run(par)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               params, ref_params)
  for s, (m, r) in enumerate(zip(metrics, ref_metrics)):
    assert set(m) == set(r)
    for key in r:
      np.testing.assert_allclose(m[key], r[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"step {s} {key}")
  # The fixture's masks do what the test claims.
  assert [float(m["sometimes/count"]) for m in ref_metrics][::2] == [0.0, 0.0]
  assert all(float(m["one_device/count"]) == 2.0 for m in ref_metrics)
  assert evals.keys() == ref_evals.keys()
  for key in ref_evals:
    np.testing.assert_allclose(evals[key], ref_evals[key], rtol=1e-5,
                               err_msg=key)
  if sharding == "fsdp":
    # The kernels really are split over the 8 devices.
    kernel = state.params["shared"]["Dense_0"]["kernel"]  # [6, 16]
    assert kernel.sharding.spec == parallel.P(None, "data")
    assert kernel.addressable_shards[0].data.shape == (6, 2)
    mu = state.opt_state[0].mu["shared"]["Dense_0"]["kernel"]
    assert mu.addressable_shards[0].data.shape == (6, 2)


def test_fsdp_spec_picks_the_largest_divisible_axis():
  assert parallel.fsdp_spec((6, 16), 8) == parallel.P(None, "data")
  assert parallel.fsdp_spec((32, 16), 8) == parallel.P("data", None)
  assert parallel.fsdp_spec((16, 16), 8) == parallel.P("data", None)
  assert parallel.fsdp_spec((6, 3), 8) == parallel.P()
  assert parallel.fsdp_spec((), 8) == parallel.P()
  assert parallel.fsdp_spec((4,), 8) == parallel.P()


def test_batch_size_not_divisible_by_devices_is_an_error():
  par = parallel.DataParallel(parallel.make_mesh(N_DEV))
  with pytest.raises(ValueError, match=r"config.batch_size=12 is not divisible "
                     r"by the number of devices \(8\)"):
    par.check_batch_size(12, "config.batch_size")
  par.check_batch_size(16)


def test_bad_settings_name_the_problem():
  mesh = parallel.make_mesh(2)
  with pytest.raises(ValueError, match="unknown parallelism 'dp'; valid: jit, pmap"):
    parallel.DataParallel(mesh, parallelism="dp")
  with pytest.raises(ValueError, match="unknown sharding 'zero3'"):
    parallel.DataParallel(mesh, sharding="zero3")
  with pytest.raises(ValueError, match="fsdp' needs parallelism='jit'"):
    parallel.DataParallel(mesh, parallelism="pmap", sharding="fsdp")
  with pytest.raises(ValueError, match="mesh of 9 devices asked for, but there are 8"):
    parallel.make_mesh(9)


def test_checkpoint_moves_between_layouts(tmp_path):
  """Saved under pmap over 8 devices, restored under fsdp and on 1 device."""
  model, tx = _model(), optax.adam(1e-2)
  host_state = _initial_state(model, tx)
  pmap_par = parallel.DataParallel(parallel.make_mesh(N_DEV),
                                   parallelism="pmap")
  state = pmap_par.put_state(host_state)
  step = pmap_par.compile_train_step(step_lib.make_train_step(
      model.apply, TASKS, tx, W, axis_name="data"), state)
  state, _ = step(state, pmap_par.put_batch(_batches()[0]))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, pmap_par.for_checkpoint(state), wait=True)
  expected = pmap_par.unreplicate(state)

  for par in (parallel.DataParallel(parallel.make_mesh(N_DEV), sharding="fsdp"),
              parallel.DataParallel(parallel.make_mesh(1))):
    like = par.for_checkpoint(par.put_state(host_state))
    restored = par.from_checkpoint(ckpt.restore(like))
    assert par.step_of(restored) == 1
    jax.tree.map(np.testing.assert_array_equal, par.unreplicate(restored),
                 expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(like)):
      assert got.sharding == want.sharding
