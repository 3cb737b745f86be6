"""End-to-end tests of experiments/train.py on the small multi_digits config.

What the script adds to the library: config -> library wiring, the workdir's
files, results.json, resume, and one run per device layout (one device, jit
on 8 devices, fsdp, pmap, 2 processes), each compared with the one-device
run. Architectures and methods are checked at step level
(`tests/architectures_step_test.py`, `tests/methods_train_test.py`), bad
configs without data (`tests/train_config_test.py`). Runs are short (8 steps)
and their models tiny: what is shown is the wiring, not the learning.
"""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import train
from experiments.configs import multi_digits as md_config
from mtl_jax.models import build as models_build
from mtl_jax.models import trunks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 8
# The tests that share the one-device reference runs go to one xdist worker
# (`make test` runs `--dist loadgroup`), so each reference runs once.
reference_group = pytest.mark.xdist_group("train_reference")


def tiny_config(data_dir, **overrides):
  config = md_config.get_config()
  config.data.data_dir = data_dir
  config.data.options.builder_config = "small"
  config.model.trunk = "mlp"
  config.model.hidden_sizes = (32,)
  config.model.head_hidden_sizes = ()
  config.batch_size = 32
  config.eval_batch_size = 256
  config.num_steps = NUM_STEPS
  config.log_every = 2
  config.eval_every = 4
  config.checkpoint_every = 4
  config.optimizer.schedule = "constant"
  config.optimizer.learning_rate = 0.01
  config.update_from_flattened_dict(overrides)
  return config


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f]




def _final_params(workdir):
  from mtl_jax.training import checkpoint as checkpoint_lib
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return ckpt.read()["params"]
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def one_device(small_data_dir, tmp_path_factory):
  """`one_device(dropout_rate) -> (workdir, results, final params)`: the
  one-device reference runs, each made once, on first use."""
  runs = {}

  def get(dropout_rate):
    if dropout_rate not in runs:
      workdir = str(tmp_path_factory.mktemp("one_device"))
      results = train.run(tiny_config(small_data_dir, **{
          "model.dropout_rate": dropout_rate, "mesh.data": 1}), workdir)
      assert results["num_devices"] == 1
      runs[dropout_rate] = (workdir, results, _final_params(workdir))
    return runs[dropout_rate]
  return get


def _assert_same_run(results, reference, params, ref_params):
  assert results["steps"] == reference["steps"] == NUM_STEPS
  assert results["label_counts"] == reference["label_counts"]
  assert set(results["eval"]) == set(reference["eval"])
  for key, value in reference["eval"].items():
    assert results["eval"][key] == pytest.approx(value, rel=2e-5, abs=1e-6), key
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@reference_group
def test_run_writes_results_metrics_events_plot_and_checkpoints(one_device):
  workdir, results, _ = one_device(0.1)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results
  assert results["steps"] == NUM_STEPS
  assert results["num_processes"] == 1
  # Label fractions of the default config over the 2000 small train examples.
  assert results["label_counts"] == {"left": 1000, "right": 600, "present": 400,
                                     "sum": 200}
  assert results["num_train_examples"] == 2000
  counts = results["params"]
  assert counts["total"] == counts["shared"] + sum(counts["tasks"].values())
  # Each single-task model repeats the shared trunk: K trunks + K heads.
  assert counts["single_task_total"] == (
      4 * counts["shared"] + sum(counts["tasks"].values()))
  assert counts["ratio_to_single_task"] == pytest.approx(
      counts["total"] / counts["single_task_total"])
  expected_keys = {f"{t}/{m}" for t, ms in [
      ("left", ("accuracy", "loss", "count")), ("right", ("accuracy", "loss", "count")),
      ("present", ("f1", "loss", "count")), ("sum", ("mae", "rmse", "loss", "count"))]
      for m in ms}
  assert set(results["eval"]) == expected_keys
  assert results["eval"]["left/count"] == 1000.0  # the whole test split
  assert all(np.isfinite(v) for v in results["eval"].values())

  records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8]
  assert [r["step"] for r in records if r["split"] == "eval"] == [4, 8]
  assert records[0]["steps_per_sec"] > 0
  assert all(np.isfinite(r["loss"]) for r in records if r["split"] == "train")
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(workdir, "tb")))
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["dropout_rate"] == 0.1


@reference_group
def test_resume_continues_from_saved_step_and_matches_uninterrupted(
    small_data_dir, tmp_path, one_device):
  _, straight, straight_params = one_device(0.1)
  workdir = str(tmp_path / "resumed")
  config = functools.partial(tiny_config, small_data_dir, **{"mesh.data": 1})
  train.run(config(num_steps=4), workdir)
  resumed = train.run(config(), workdir)
  train_steps = [r["step"] for r in _read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
  assert train_steps == [2, 4, 6, 8]  # nothing re-run before step 4
  _assert_same_run(resumed, straight, _final_params(workdir), straight_params)
  # A config that changes the result is refused in this workdir.
  with pytest.raises(ValueError, match=r"different config \(seed: 0 -> 1\)"):
    train.run(config(seed=1), workdir)


# Configs are checked before data is read (`tests/train_config_test.py`, every
# field); here, that `run` checks them before it writes into the workdir, for
# an error found without data, one found on opening the dataset, one on its
# task names and one against the devices.
@pytest.mark.parametrize("overrides, message", [
    (dict(**{"model.trunk": "vit"}), r"unknown trunk 'vit'; valid: cnn, mlp, resnet"),
    (dict(**{"data.options.builder_config": "huge"}),
     r"Unknown multi_digits config 'huge'; valid configs are"),
    (dict(tasks="left,colour"), r"unknown task 'colour'; valid tasks: left, right, present, sum"),
    (dict(batch_size=36), r"config.batch_size=36 is not divisible "
     r"by the number of devices \(8\)"),
])
def test_bad_config_fails_before_training(small_data_dir, tmp_path, overrides,
                                          message):
  workdir = str(tmp_path / "run")
  with pytest.raises((ValueError, KeyError), match=message):
    train.run(tiny_config(small_data_dir, **overrides), workdir)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_workdir_fails_before_training(small_data_dir, tmp_path,
                                                  where):
  if where == "under_a_file":  # a file where a directory must go
    (tmp_path / "file").write_text("x")
    workdir = str(tmp_path / "file" / "run")
  else:  # a read-only file system, even for root
    workdir = "/proc/mtl_jax_run"
  with pytest.raises(PermissionError,
                     match=f"workdir '{re.escape(workdir)}' is not writable"):
    train.run(tiny_config(small_data_dir), workdir)


def _cli(args, cwd=REPO):
  # One device: what is tested is the command line, not a device layout.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("MTL_JAX_TEST_XLA_FLAGS", ""))
  return subprocess.run([sys.executable, "-m", "experiments.train", *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


# A command line's overrides becoming the run's config (config.json) and the
# progress log are checked on the uninterrupted run of tests/resume_test.py.
@pytest.mark.slow
def test_command_line_rejects_unknown_config_key(tmp_path):
  proc = _cli([f"--workdir={tmp_path}", "--config.optimizer.learnig_rate=0.1"])
  assert proc.returncode != 0
  assert "learnig_rate" in proc.stderr


# ----------------------------------------------------------------------------
# Data parallelism end to end: every layout gives the one-device results.


# jit shards one global dropout key, so it matches one device even with
# dropout; pmap draws per-device masks (same distribution, other bits), so it is
# compared without dropout.
@reference_group
@pytest.mark.parametrize("parallelism, sharding, dropout_rate", [
    ("jit", "replicated", 0.1), ("jit", "fsdp", 0.1), ("pmap", "replicated", 0.0)])
def test_train_on_8_devices_matches_one_device(small_data_dir, tmp_path,
                                               one_device, parallelism,
                                               sharding, dropout_rate):
  _, reference, ref_params = one_device(dropout_rate)
  workdir = str(tmp_path / "run")
  results = train.run(tiny_config(
      small_data_dir, parallelism=parallelism, sharding=sharding,
      **{"model.dropout_rate": dropout_rate}), workdir)
  assert results["num_devices"] == 8
  _assert_same_run(results, reference, _final_params(workdir), ref_params)


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@reference_group
def test_two_processes_match_one_device(small_data_dir, tmp_path, one_device):
  """2 local processes x 2 CPU devices (gloo collectives) = the one-device run."""
  _, reference, ref_params = one_device(0.1)
  workdir = str(tmp_path / "multi")
  port = _free_port()
  # The resumed launch reuses the first one's compiled programs (the
  # session's compilation cache, tests/conftest.py).
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("MTL_JAX_TEST_XLA_FLAGS", "") +
      " --xla_force_host_platform_device_count=2").strip())
  args = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}",
          f"--config.data.data_dir={small_data_dir}",
          "--config.data.options.builder_config=small", "--config.model.trunk=mlp",
          "--config.model.hidden_sizes=(32,)", "--config.model.head_hidden_sizes=()",
          "--config.batch_size=32", "--config.eval_batch_size=256",
          "--config.log_every=2", "--config.eval_every=4",
          "--config.checkpoint_every=4", "--config.optimizer.schedule=constant",
          "--config.optimizer.learning_rate=0.01",
          "--config.model.dropout_rate=0.1",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]

  def launch(num_steps):
    procs = [subprocess.Popen(
        args + [f"--process_id={i}", f"--config.num_steps={num_steps}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs):
      assert p.returncode == 0, out[-3000:]
    return outputs

  # Stopped after 4 steps, then resumed by both processes from their shared
  # checkpoint: the whole thing still equals the uninterrupted one-device run.
  launch(4)
  outputs = launch(NUM_STEPS)
  assert "resumed from checkpoint at step 4" in outputs[0]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["num_processes"] == 2 and results["num_devices"] == 4
  _assert_same_run(results, reference, _final_params(workdir), ref_params)
  # Only process 0 logs metrics and progress.
  assert "steps/s" in outputs[0] and "steps/s" not in outputs[1]


def test_methods_and_their_hyperparameters_come_from_the_config(
    small_data_dir, tmp_path):
  config = tiny_config(small_data_dir, num_steps=4, log_every=1, **{
      "weighting.name": "uncertainty",
      "weighting.uncertainty.learning_rate": 0.05,
      "aggregation.name": "mgda", "aggregation.mgda.normalization": "l2",
      "aggregation.rep_grad": True, "aggregation.chunk_size": 2})
  results = train.run(config, str(tmp_path))
  assert results["steps"] == 4
  assert all(np.isfinite(v) for v in results["eval"].values())
  exp = train.build_experiment(config)
  assert exp.rep_grad and exp.chunk_size == 2 and exp.aggregator.rep_grad_ok
  assert exp.jacobian == "auto"
  # The uncertainty weights 0.5 exp(-s) move with the configured learning
  # rate: s starts at 0 and, while the loss L > 1, Adam raises it by ~0.05 per
  # step towards log L (d/ds = 0.5 - 0.5 exp(-s) L < 0).
  records = _read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))
  weights = [r["left/weight"] for r in records if r["split"] == "train"]
  assert weights[0] == pytest.approx(0.5, rel=1e-6)
  np.testing.assert_allclose(weights, 0.5 * np.exp(-0.05 * np.arange(4)),
                             rtol=0.02)


# Each architecture trains at step level in tests/architectures_step_test.py;
# here, that the config reaches it: architecture, hyperparameters, trunk, the
# step's arguments from the spec, and the parameter counts of results.json.
SMALL_HYPERPARAMETERS = {
    "soft_sharing": {"penalty_strength": 0.01},
    "cross_stitch": {"hidden_sizes": (8,)},
    "mtan": {"channels": (4, 8), "groups": 2},
    "mmoe": {"num_experts": 2, "expert_hidden_sizes": (8,)},
    "cgc": {"num_task_experts": 1, "expert_hidden_sizes": (8,)},
    "ple": {"num_levels": 1, "expert_hidden_sizes": (8,)},
    "dselect_k": {"num_experts": 3, "expert_hidden_sizes": (8,)},
    "adversarial": {"adversarial_weight": 0.1},
}
TRUNK_FIELDS = ("trunk", "column", "input_trunk", "shared_encoder",
                "private_encoder")


@pytest.mark.parametrize("architecture", sorted(models_build.ARCHITECTURES))
def test_every_architecture_is_built_from_the_config(small_data_dir,
                                                     architecture):
  spec = models_build.ARCHITECTURES[architecture]
  hyperparameters = SMALL_HYPERPARAMETERS.get(architecture, {})
  config = tiny_config(small_data_dir, **{
      "model.architecture": architecture, "model.input_trunk": True,
      "model.hidden_sizes": (8,)}, **{
          f"model.{architecture}.{k}": v for k, v in hyperparameters.items()})
  exp = train.build_experiment(config)
  model = exp.model
  assert type(model) is spec.module
  for field, value in hyperparameters.items():
    assert getattr(model, field) == value, field
  # The configured trunk, wherever the architecture uses it.
  used = [getattr(model, f) for f in TRUNK_FIELDS if f in spec.trunk_use.fills]
  for trunk in used:
    assert isinstance(trunk, trunks.MLP) and trunk.hidden_sizes == (8,)
  assert exp.step_kwargs() == {
      "aggregator": None, "rep_grad": False, "chunk_size": None,
      "jacobian": "auto", "gradient_cosines": False, **spec.step_kwargs(input_trunk=True)}
  counts = exp.param_counts
  assert counts["total"] == counts["shared"] + sum(counts["tasks"].values())
  assert set(counts["tasks"]) == {"left", "right", "present", "sum"}
  assert set(counts["single_task_models"]) == set(counts["tasks"])
