"""End-to-end tests of experiments/train.py on the small multi_digits config."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import train
from experiments.configs import multi_digits as md_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **overrides):
  config = md_config.get_config()
  config.data.data_dir = data_dir
  config.data.options.builder_config = "small"
  config.model.trunk = "mlp"
  config.model.hidden_sizes = (32,)
  config.model.head_hidden_sizes = ()
  config.batch_size = 32
  config.eval_batch_size = 256
  config.num_steps = 20
  config.log_every = 5
  config.eval_every = 10
  config.checkpoint_every = 10
  config.optimizer.schedule = "constant"
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


def test_run_writes_results_metrics_events_plot_and_checkpoints(
    small_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  results = train.run(tiny_config(small_data_dir), workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results
  assert results["steps"] == 20
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
  assert [r["step"] for r in records if r["split"] == "train"] == [5, 10, 15, 20]
  assert [r["step"] for r in records if r["split"] == "eval"] == [10, 20]
  assert records[0]["steps_per_sec"] > 0
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(workdir, "tb")))
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]


def test_resume_continues_from_saved_step_and_matches_uninterrupted(
    small_data_dir, tmp_path):
  straight = train.run(tiny_config(small_data_dir, num_steps=30),
                       str(tmp_path / "straight"))
  workdir = str(tmp_path / "resumed")
  train.run(tiny_config(small_data_dir, num_steps=20), workdir)
  resumed = train.run(tiny_config(small_data_dir, num_steps=30), workdir)
  assert resumed["steps"] == 30
  train_steps = [r["step"] for r in _read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
  assert train_steps == [5, 10, 15, 20, 25, 30]  # nothing re-run before step 20
  for key, value in straight["eval"].items():
    assert resumed["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_workdir_of_a_different_config_is_refused(small_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train.run(tiny_config(small_data_dir, num_steps=5), workdir)
  with pytest.raises(ValueError, match=r"different config \(seed: 0 -> 1\)"):
    train.run(tiny_config(small_data_dir, num_steps=5, seed=1), workdir)


@pytest.mark.parametrize("overrides, message", [
    (dict(tasks="left,colour"), r"unknown task 'colour'; valid tasks: left, right, present, sum"),
    (dict(**{"model.trunk": "vit"}), r"unknown trunk 'vit'; valid: cnn, mlp, resnet"),
    (dict(**{"optimizer.name": "lion"}), r"unknown optimizer 'lion'; valid: sgd, adam, adamw"),
    (dict(**{"weighting.name": "nope"}), r"unknown weighting method 'nope'; valid: dwa, equal, famo"),
    (dict(**{"aggregation.name": "nope"}), r"unknown aggregation method 'nope'; valid: aligned_mtl, cagrad"),
    (dict(**{"aggregation.name": "pcgrad", "aggregation.rep_grad": True}),
     r"rep_grad=True is not valid for aggregation 'pcgrad'; valid: .*mgda"),
    (dict(**{"data.name": "mnist"}), r"unknown dataset 'mnist'; valid: celeb_a, conll2003, .*multi_digits"),
    (dict(batch_size=0), r"config.batch_size must be a positive integer"),
    (dict(**{"data.label_fractions.left": 1.5}), r"left.*1.5"),
    (dict(**{"optimizer.learning_rate": -1.0}),
     r"config.optimizer.learning_rate must be > 0, got -1.0"),
    (dict(**{"model.dropout_rate": 1.5}),
     r"config.model.dropout_rate must be in \[0, 1\), got 1.5"),
    (dict(max_nonfinite_streak=0),
     r"config.max_nonfinite_streak must be an integer >= 1, got 0"),
    (dict(**{"aggregation.jacobian": "fast"}),
     r"unknown config.aggregation.jacobian 'fast'; valid: auto, factored, full"),
    (dict(**{"data.mixture.method": "zipf"}),
     r"unknown mixing method 'zipf'; valid: explicit, proportional"),
    (dict(**{"data.mixture.composition": "mixed"}),
     r"unknown composition 'mixed'; valid: sampled, fixed"),
    (dict(**{"data.options.builder_config": "huge"}),
     r"Unknown multi_digits config 'huge'; valid configs are"),
    (dict(**{"data.label_fractions.colour": 0.5}),
     r"config.data.label_fractions names unknown task\(s\) \['colour'\]"),
])
def test_bad_config_fails_before_training(small_data_dir, tmp_path, overrides,
                                          message):
  workdir = str(tmp_path / "run")
  with pytest.raises((ValueError, KeyError), match=message):
    train.run(tiny_config(small_data_dir, **overrides), workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))


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
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.train", *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def test_command_line_with_overrides(small_data_dir, tmp_path):
  workdir = str(tmp_path / "cli")
  proc = _cli([f"--workdir={workdir}", f"--config.data.data_dir={small_data_dir}",
               "--config.data.options.builder_config=small", "--config.model.trunk=mlp",
               "--config.model.hidden_sizes=(16,)", "--config.num_steps=6",
               "--config.log_every=3", "--config.eval_batch_size=256",
               "--config.optimizer.learning_rate=0.01",
               "--config.optimizer.schedule=constant"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "steps/s" in proc.stderr and "ETA" in proc.stderr
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["steps"] == 6
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["optimizer"]["learning_rate"] == 0.01
  assert saved["model"]["hidden_sizes"] == [16]


def test_command_line_rejects_unknown_config_key(tmp_path):
  proc = _cli([f"--workdir={tmp_path}", "--config.optimizer.learnig_rate=0.1"])
  assert proc.returncode != 0
  assert "learnig_rate" in proc.stderr


# ----------------------------------------------------------------------------
# Data parallelism end to end: every layout gives the one-device results.

def _final_params(workdir):
  from mtl_jax.training import checkpoint as checkpoint_lib
  return checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints")).read()["params"]


def _assert_same_run(results, reference, params, ref_params):
  assert results["steps"] == reference["steps"]
  assert results["label_counts"] == reference["label_counts"]
  for key, value in reference["eval"].items():
    assert results["eval"][key] == pytest.approx(value, rel=2e-5, abs=1e-6), key
  for a, b in zip(_leaves(params), _leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def _layout_config(data_dir, dropout_rate, **overrides):
  return tiny_config(data_dir, **{"optimizer.learning_rate": 0.01,
                                  "model.dropout_rate": dropout_rate},
                     **overrides)


@pytest.fixture(scope="module")
def one_device_runs(small_data_dir, tmp_path_factory):
  """One-device reference runs, with and without dropout."""
  runs = {}
  for dropout_rate in (0.0, 0.1):
    workdir = str(tmp_path_factory.mktemp("one_device"))
    results = train.run(_layout_config(small_data_dir, dropout_rate,
                                       **{"mesh.data": 1}), workdir)
    assert results["num_devices"] == 1
    runs[dropout_rate] = (results, _final_params(workdir))
  return runs


# jit shards one global dropout key, so it matches one device even with
# dropout; pmap draws per-device masks (same distribution, other bits), so it is
# compared without dropout.
@pytest.mark.parametrize("parallelism, sharding, dropout_rate", [
    ("jit", "replicated", 0.1), ("jit", "fsdp", 0.1), ("pmap", "replicated", 0.0)])
def test_train_on_8_devices_matches_one_device(small_data_dir, tmp_path,
                                               one_device_runs, parallelism,
                                               sharding, dropout_rate):
  reference, ref_params = one_device_runs[dropout_rate]
  workdir = str(tmp_path / "run")
  results = train.run(_layout_config(
      small_data_dir, dropout_rate, parallelism=parallelism,
      sharding=sharding), workdir)
  assert results["num_devices"] == 8
  _assert_same_run(results, reference, _final_params(workdir), ref_params)


def test_batch_size_must_divide_over_devices(small_data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"config.batch_size=36 is not divisible "
                     r"by the number of devices \(8\)"):
    train.run(tiny_config(small_data_dir, batch_size=36), str(tmp_path))


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_device(small_data_dir, tmp_path,
                                        one_device_runs):
  """2 local processes x 2 CPU devices (gloo collectives) = the one-device run."""
  reference, ref_params = one_device_runs[0.1]
  workdir = str(tmp_path / "multi")
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  args = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}",
          f"--config.data.data_dir={small_data_dir}",
          "--config.data.options.builder_config=small", "--config.model.trunk=mlp",
          "--config.model.hidden_sizes=(32,)", "--config.model.head_hidden_sizes=()",
          "--config.batch_size=32", "--config.eval_batch_size=256",
          "--config.log_every=5", "--config.eval_every=10",
          "--config.checkpoint_every=10", "--config.optimizer.schedule=constant",
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

  # Stopped after 10 steps, then resumed by both processes from their shared
  # checkpoint: the whole thing still equals the uninterrupted one-device run.
  launch(10)
  outputs = launch(20)
  assert "resumed from checkpoint at step 10" in outputs[0]
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


@pytest.mark.parametrize("architecture", sorted(
    __import__("mtl_jax.models.build", fromlist=["x"]).ARCHITECTURES))
def test_every_architecture_trains_with_train_py(small_data_dir, tmp_path,
                                                 architecture):
  config = tiny_config(small_data_dir, num_steps=3, log_every=3,
                       **{"model.architecture": architecture,
                          "model.input_trunk": True})
  if architecture == "mtan":
    config.model.mtan.channels = (4, 8)
  results = train.run(config, str(tmp_path))
  assert results["steps"] == 3
  assert all(np.isfinite(v) for v in results["eval"].values())
  counts = results["params"]
  assert counts["total"] == counts["shared"] + sum(counts["tasks"].values())
  assert set(counts["tasks"]) == {"left", "right", "present", "sum"}
  records = _read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))
  train_record = [r for r in records if r["split"] == "train"][-1]
  if architecture == "soft_sharing":
    assert train_record["aux/soft_sharing"] > 0
  if architecture == "adversarial":
    assert train_record["aux/adversarial"] > 0


def test_architecture_errors_name_the_problem(small_data_dir, tmp_path):
  with pytest.raises(ValueError, match="unknown architecture 'tree'; valid: adversarial, cgc"):
    train.run(tiny_config(small_data_dir, **{"model.architecture": "tree"}),
              str(tmp_path))
  with pytest.raises(ValueError, match="rep_grad=True needs one shared representation"):
    train.run(tiny_config(small_data_dir, **{
        "model.architecture": "mmoe", "aggregation.name": "mgda",
        "aggregation.rep_grad": True}), str(tmp_path))
  with pytest.raises(ValueError, match="weighting 'gradnorm' needs a last shared layer"):
    train.run(tiny_config(small_data_dir, **{
        "model.architecture": "cross_stitch", "weighting.name": "gradnorm"}),
        str(tmp_path))
