"""experiments/train.py's transfer: init_from, frozen and scaled param groups,
and a workdir continued with another task set.

A small source run (tasks left and right, 8 steps) is made once; every test
starts from it. The library's parts (merge, continue_state, param groups)
are checked against hand-computed values in `tests/transfer_test.py`; here,
the wiring: what the config says reaches the params, before any training
for the errors, and the same under jit, fsdp and pmap on 8 devices.
"""

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments import train
from mtl_jax.training import checkpoint as checkpoint_lib
import train_test  # tests/train_test.py

# Every test here reads the one source run: one xdist worker makes it.
pytestmark = pytest.mark.xdist_group("transfer_source")


def _config(data_dir, **overrides):
  return train_test.tiny_config(data_dir, **{"mesh.data": 1, **overrides})


def _checkpoint(workdir, step=None):
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return ckpt.read(step)
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def source(small_data_dir, tmp_path_factory):
  """`(workdir, final params)` of an 8-step run of tasks left, right."""
  workdir = str(tmp_path_factory.mktemp("source"))
  train.run(_config(small_data_dir, tasks="left,right"), workdir)
  return workdir, _checkpoint(workdir)["params"]


def test_init_from_restores_the_trunk_and_common_heads_and_starts_new_ones(
    small_data_dir, source):
  workdir, params = source
  config = _config(small_data_dir, tasks="left,sum", init_from=workdir,
                   seed=3)
  exp = train.build_experiment(config)
  sample = exp.train_mixture.batch(exp.train_mixture.initial_state())[0]
  fresh = train.initial_state(exp, sample["inputs"], config.seed)
  state, record = train._init_from(config, exp, fresh, sample["inputs"])
  same = np.testing.assert_array_equal
  jax.tree.map(same, state.params["shared"], params["shared"])
  jax.tree.map(same, state.params["tasks"]["left"], params["tasks"]["left"])
  # The new head is the run's own initialisation from config.seed.
  jax.tree.map(same, state.params["tasks"]["sum"],
               fresh.params["tasks"]["sum"])
  assert record["step"] == train_test.NUM_STEPS
  assert record["initialised"] == ["tasks/sum/Dense_0/bias",
                                   "tasks/sum/Dense_0/kernel"]
  assert record["unused"] == ["tasks/right/Dense_0/bias",
                              "tasks/right/Dense_0/kernel"]
  assert record["restored"][:2] == ["shared/features/bias",
                                    "shared/features/kernel"]


PROBE = {"tasks": "left,sum", "optimizer.freeze": "shared/*",
         "model.dropout_rate": 0.0}


@pytest.fixture(scope="module")
def probe(small_data_dir, source, tmp_path_factory):
  """`(results, final params)` of a linear probe from the source run."""
  workdir = str(tmp_path_factory.mktemp("probe"))
  results = train.run(_config(small_data_dir, init_from=source[0], **PROBE),
                      workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["init_from"] == results["init_from"]
  return results, _checkpoint(workdir)["params"]


def test_linear_probe_keeps_the_restored_trunk_bit_identical(source, probe):
  params = source[1]
  results, probed = probe
  jax.tree.map(np.testing.assert_array_equal, probed["shared"],
               params["shared"])
  moved = np.abs(probed["tasks"]["left"]["Dense_0"]["kernel"]
                 - params["tasks"]["left"]["Dense_0"]["kernel"]).max()
  assert moved > 1e-4
  assert results["init_from"]["step"] == train_test.NUM_STEPS
  assert results["init_from"]["initialised"] == [
      "tasks/sum/Dense_0/bias", "tasks/sum/Dense_0/kernel"]


# The same probe under each 8-device layout ends with the one-device params.
@pytest.mark.parametrize("parallelism, sharding", [
    ("jit", "fsdp"), ("pmap", "replicated")])
def test_linear_probe_on_8_devices_matches_one_device(
    small_data_dir, source, probe, tmp_path, parallelism, sharding):
  results = train.run(_config(small_data_dir, init_from=source[0], **PROBE, **{
      "mesh.data": -1, "parallelism": parallelism, "sharding": sharding}),
                      str(tmp_path))
  assert results["num_devices"] == 8
  params = _checkpoint(str(tmp_path))["params"]
  jax.tree.map(np.testing.assert_array_equal, params["shared"],
               source[1]["shared"])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                 atol=1e-6), params["tasks"], probe[1]["tasks"])


def test_lr_scales_and_freeze_reach_the_optimizer(small_data_dir):
  """The config's groups in the run's optimizer: SGD's update is
  -lr * scale * g per group (first matching pattern wins)."""
  exp = train.build_experiment(_config(small_data_dir, **{
      "optimizer.name": "sgd", "optimizer.momentum": 0.0,
      "optimizer.freeze": "tasks/right/*",
      "optimizer.lr_scales": "shared/*=0.25,tasks/*=2"}))
  sample = exp.train_mixture.batch(exp.train_mixture.initial_state())[0]
  params = train.initial_state(exp, sample["inputs"], 0).params
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = exp.optimizer.update(grads, exp.optimizer.init(params), params)
  lr = float(exp.schedule(0))
  for path, scale in (("shared", 0.25), ("left", 2.0), ("right", 0.0),
                      ("sum", 2.0)):
    part = updates[path] if path == "shared" else updates["tasks"][path]
    for leaf in jax.tree.leaves(part):
      np.testing.assert_allclose(leaf, -lr * scale, rtol=1e-6)


def test_a_task_added_to_a_workdir_resumes_like_the_uninterrupted_run(
    small_data_dir, source, tmp_path, monkeypatch):
  workdir, _ = source
  runs = {}
  for name in ("straight", "killed"):
    runs[name] = str(tmp_path / name)
    shutil.copytree(workdir, runs[name])
  extended = functools.partial(_config, small_data_dir,
                               tasks="left,present,right",
                               allow_task_change=True)
  # Without the field, a changed task set is refused.
  with pytest.raises(ValueError, match=r"different config \(tasks: "
                     r"'left,right' -> 'left,present,right'\)"):
    train.run(_config(small_data_dir, tasks="left,present,right"),
              runs["straight"])
  straight = train.run(extended(num_steps=16), runs["straight"])
  change, = straight["task_changes"]
  assert change["step"] == 8 and change["added"] == ["present"]
  assert change["removed"] == [] and change["method_states"] == (
      "remapped by task")
  # Killed after the change was set up (config.json and task_changes.json
  # rewritten) but before any checkpoint of the new task set...
  with monkeypatch.context() as patch:
    def killed(*args, **kwargs):
      raise KeyboardInterrupt("killed")
    patch.setattr(train, "_train", killed)
    with pytest.raises(KeyboardInterrupt):
      train.run(extended(num_steps=16), runs["killed"])
  # ... and run again.
  resumed = train.run(extended(num_steps=16), runs["killed"])
  assert resumed["task_changes"] == straight["task_changes"]
  assert resumed["eval"] == pytest.approx(straight["eval"], rel=1e-6)
  jax.tree.map(np.testing.assert_array_equal,
               _checkpoint(runs["killed"])["params"],
               _checkpoint(runs["straight"])["params"])
  # The step counter continued: no step before 8 was trained again.
  steps = [json.loads(l)["step"] for l in open(os.path.join(
      runs["straight"], "metrics.jsonl")) if '"train"' in l]
  assert steps == [2, 4, 6, 8, 10, 12, 14, 16]


def test_init_from_errors_are_named_before_anything_is_written(
    small_data_dir, source, tmp_path):
  workdir, _ = source
  run_dir = str(tmp_path / "run")
  cases = [
      (dict(init_from=str(tmp_path / "nowhere")), FileNotFoundError,
       r"init_from path '.*nowhere' does not exist"),
      (dict(init_from=str(tmp_path)), FileNotFoundError,
       r"holds no checkpoint"),
      (dict(init_from=workdir, **{"model.hidden_sizes": (16,)}), ValueError,
       r"checkpoint param 'shared/features/bias' has shape \(32,\), the "
       r"model's \(16,\)"),
      (dict(init_from=workdir, **{"optimizer.freeze": "trunk/*"}), ValueError,
       r"config.optimizer.freeze pattern 'trunk/\*' matches no param"),
  ]
  for overrides, error, message in cases:
    with pytest.raises(error, match=message):
      train.run(_config(small_data_dir, **overrides), run_dir)
    assert not os.path.exists(run_dir)
