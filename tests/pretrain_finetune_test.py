"""experiments/pretrain_finetune.py: end to end on a tiny setting (one seed,
one fraction: the pre-training run's trunk restored and frozen or trained,
Δm% against scratch from the runs' results, the commands of each stage,
finished runs skipped), Δm% paired by seed from a fake trainer, and the
checks of the protocol's config."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from experiments import pretrain_finetune as pf
from experiments import sweep as sweep_lib
from experiments import train
from experiments.configs.sweeps import pretrain_finetune as default_config
from mtl_jax.training import optim
from mtl_jax.training import transfer
import train_test  # tests/train_test.py

PRETRAIN_STEPS = 15


def _tiny_config(data_dir):
  config = default_config.get_config()
  config.tasks = "left,sum"
  config.pretrain_tasks = "left"  # sum is unseen at pre-training
  config.fractions = (0.5,)
  config.seeds = (0,)
  base = train_test.tiny_config(data_dir)
  config.overrides = ml_collections.ConfigDict({
      "data": {"data_dir": data_dir, "validation_fraction": 0.2,
               "options": {"builder_config": "small"}},
      "select_by": "loss", "num_steps": 10, "eval_every": 5, "log_every": 5,
      "checkpoint_every": 10, "batch_size": base.batch_size,
      "eval_batch_size": base.eval_batch_size, "mesh": {"data": 1},
      "model": {"trunk": "mlp", "hidden_sizes": (32,),
                "head_hidden_sizes": ()},
      "optimizer": {"schedule": "constant", "learning_rate": 0.01}})
  # One pretext (rotate) keeps the test short; grid_mask's head would be
  # unused at fine-tuning as rotate's is.
  config.pretrain_overrides = ml_collections.ConfigDict({
      "num_steps": PRETRAIN_STEPS, "eval_every": PRETRAIN_STEPS,
      "checkpoint_every": PRETRAIN_STEPS, "pretext": {"names": "rotate"}})
  return config


def _results(run):
  with open(os.path.join(run.workdir, "results.json")) as f:
    return json.load(f)


def _leaf_paths(tree, prefix):
  return sorted(f"{prefix}/{optim.path_name(p)}"
                for p, _ in jax.tree_util.tree_leaves_with_path(tree))


def _hand_delta_m(metrics, baseline, keys):
  total = 0.0
  for k in keys:
    change = (metrics[k] - baseline[k]) / baseline[k]
    total += -change if k.endswith(("/mae", "/rmse")) else change
  return 100.0 * total / len(keys)


def test_pretrain_then_three_arms(small_data_dir, tmp_path):
  config, root = _tiny_config(small_data_dir), str(tmp_path)
  first, second = pf.plan(config, root)
  assert [r.workdir for r in first] == [os.path.join(root, "pretrain",
                                                     "seed0")]
  assert sorted((r.method, r.group) for r in second) == [
      ("finetune", "labels=50%"), ("probe", "labels=50%"),
      ("scratch", "labels=50%")]

  # Before the pre-training run exists: its command only.
  lines, waiting = pf.commands(config, root)
  assert waiting == [0] and len(lines) == 1
  assert "--config=experiments/configs/multi_digits_ssl.py" in lines[0]
  assert f"--workdir={first[0].workdir}" in lines[0]
  assert lines[0].endswith(" --config.tasks=left")
  assert sweep_lib.run_all(pf.pretrain_sweep(config), first,
                           train.run) == first
  # Stage 1 done: the three arms' commands, two of them from its workdir.
  lines, waiting = pf.commands(config, root)
  assert waiting == [] and len(lines) == 3
  assert all("--config=experiments/configs/multi_digits.py" in l
             for l in lines)
  assert sum(f"--config.init_from={first[0].workdir}" in l
             for l in lines) == 2

  trained = pf.train_all(config, root, train.run)
  assert sorted(r.method for r in trained) == ["finetune", "probe",
                                               "scratch"]
  assert pf.train_all(config, root, train.run) == []  # all finished
  assert pf.commands(config, root) == ([], [])

  step, pretrained = transfer.read_params(first[0].workdir)
  assert step == PRETRAIN_STEPS
  runs = {r.method: r for r in second}
  shared = _leaf_paths(pretrained["shared"], "shared")
  for arm in ("finetune", "probe"):
    record = _results(runs[arm])["init_from"]
    assert record["path"] == os.path.abspath(first[0].workdir)
    assert record["step"] == PRETRAIN_STEPS
    # The trunk and the seen task's head restored; the unseen task's head
    # initialised; the pretexts' heads not used.
    assert sorted(record["restored"]) == sorted(
        shared + _leaf_paths(pretrained["tasks"]["left"], "tasks/left"))
    assert record["initialised"] == ["tasks/sum/Dense_0/bias",
                                     "tasks/sum/Dense_0/kernel"]
    assert {p.split("/")[1] for p in record["unused"]} == {"rotate"}
  assert _results(runs["scratch"])["init_from"] is None
  _, probed = transfer.read_params(runs["probe"].workdir)
  _, tuned = transfer.read_params(runs["finetune"].workdir)
  jax.tree.map(np.testing.assert_array_equal, probed["shared"],
               pretrained["shared"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                       tuned["shared"], pretrained["shared"]))
  assert max(moved) > 1e-4

  out = pf.collect(config, second, root)
  assert out["tasks"] == {"left": "seen", "sum": "unseen"}
  scratch = _results(runs["scratch"])["eval"]
  keys = sweep_lib.metric_keys(scratch)
  assert keys == ["left/accuracy", "sum/mae", "sum/rmse"]
  for arm in ("finetune", "probe"):
    metrics = _results(runs[arm])["eval"]
    assert out["metrics"]["left/accuracy"][arm][0]["mean"] == pytest.approx(
        metrics["left/accuracy"])
    for subset, subset_keys in (("all", keys), ("seen", keys[:1]),
                                ("unseen", keys[1:])):
      point, = out["delta_m"][subset][arm]
      assert point["fraction"] == 0.5 and point["n"] == 1
      expected = _hand_delta_m(metrics, scratch, subset_keys)
      assert point["mean"] == pytest.approx(expected, rel=1e-9)
      assert point["seeds"] == {"0": pytest.approx(expected, rel=1e-9)}
  assert all("scratch" not in arms for arms in out["delta_m"].values())
  with open(os.path.join(root, "pretrain_finetune.json")) as f:
    assert json.load(f)["delta_m"]["all"]["probe"][0]["mean"] == (
        pytest.approx(out["delta_m"]["all"]["probe"][0]["mean"]))
  with open(os.path.join(root, "pretrain_finetune.md")) as f:
    table = f.read()
  assert "| left/accuracy (seen) | 50% |" in table
  assert "| sum/mae (unseen) | 50% |" in table
  assert "| Δm% vs scratch: unseen | 50% |" in table
  for name in ("pretrain_finetune.png", "summary.md", "summary.json"):
    assert os.path.exists(os.path.join(root, name))


def test_delta_m_is_paired_by_seed(tmp_path):
  """Fake runs, seed s: scratch accuracy 0.5 + 0.05 s and mae 2 - 0.1 s;
  finetune +0.1 accuracy and half the mae; probe +0.05 accuracy, same mae.
  Δm% of each seed against the scratch run of that seed, then mean_ci."""
  config = default_config.get_config()
  config.tasks = "left,sum"
  config.pretrain_tasks = "left"
  config.fractions = (0.1, 1.0)
  root = str(tmp_path)

  def trainer(cfg, workdir):
    s = cfg.seed
    accuracy, mae = 0.5 + 0.05 * s, 2.0 - 0.1 * s
    if cfg.init_from:
      assert cfg.init_from == pf.pretrain_dir(root, s)
      accuracy += 0.05 if cfg.optimizer.freeze else 0.1
      mae *= 1.0 if cfg.optimizer.freeze else 0.5
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"eval": {"left/accuracy": accuracy, "sum/mae": mae,
                          "sum/count": 1.0}}, f)

  assert len(pf.train_all(config, root, trainer)) == 3 + 3 * 2 * 3
  _, runs = pf.plan(config, root)
  out = pf.collect(config, runs, root)
  for arm, gain, scale in (("finetune", 0.1, 0.5), ("probe", 0.05, 1.0)):
    per_seed = [100 / 2 * (gain / (0.5 + 0.05 * s) + (1 - scale))
                for s in (0, 1, 2)]
    seen = [100 * gain / (0.5 + 0.05 * s) for s in (0, 1, 2)]
    mean, lower, upper = pf.stats.mean_ci(per_seed)
    for f, point in zip((0.1, 1.0), out["delta_m"]["all"][arm]):
      assert point["fraction"] == f and point["n"] == 3
      assert [point["mean"], point["lower"], point["upper"]] == pytest.approx(
          [mean, lower, upper])
      assert list(point["seeds"].values()) == pytest.approx(per_seed)
    assert [p["mean"] for p in out["delta_m"]["seen"][arm]] == (
        pytest.approx([np.mean(seen)] * 2))
    assert [p["mean"] for p in out["delta_m"]["unseen"][arm]] == (
        pytest.approx([100 * (1 - scale)] * 2))
  # Paired by seed, the probe's unseen gain is 0 at every seed: no spread
  # (unpaired, the scratch mae's spread over seeds would show).
  assert out["delta_m"]["unseen"]["probe"][0]["upper"] == pytest.approx(0)


@pytest.mark.parametrize("field, value, message", [
    ("fractions", (0.0, 0.5), r"config.fractions: 0.0 is not in \(0, 1\]"),
    ("fractions", (1.5,), r"config.fractions: 1.5 is not in \(0, 1\]"),
    ("arms", ("scratch", "bogus"), r"unknown arm 'bogus'"),
    ("arms", ("finetune", "probe"), r"must hold 'scratch'"),
    ("tasks", "left,left", r"config.tasks='left,left' names a task twice"),
    ("tasks", "none", r"config.tasks='none': name the downstream tasks"),
    ("pretrain_tasks", "none,left", r"'none' cannot be combined"),
    ("pretrain_label_fraction", 0.0, r"pretrain_label_fraction=0.0"),
    ("pretrain_overrides", {"select_by": "loss"}, r"sets select_by"),
    ("overrides", {"init_from": "x"}, r"config.overrides sets 'init_from'"),
    ("pretrain_overrides", {"model": {"trunk": "mlp"}},
     r"differ in model.trunk \('mlp' vs 'cnn'\)"),
])
def test_bad_protocol_configs_are_named(tmp_path, field, value, message):
  config = default_config.get_config()
  if isinstance(value, dict):
    value = ml_collections.ConfigDict(value)
  setattr(config, field, value)
  with pytest.raises(ValueError, match=message):
    pf.plan(config, str(tmp_path))


def test_pretraining_on_the_pretexts_only_makes_every_task_unseen(tmp_path):
  config = default_config.get_config()
  config.pretrain_tasks = "none"
  first, _ = pf.plan(config, str(tmp_path))
  assert first[0].overrides["tasks"] == "none"
  assert not any(k.startswith("data.label_fractions") for k in
                 first[0].overrides)


def test_arms_and_pretrain_tasks_outside_the_downstream_ones(tmp_path):
  """finetune_lr01 starts from the pre-training run with the trunk at a
  tenth of the rate; a pre-training task need not be fine-tuned (its head
  is then unused, every downstream task unseen)."""
  config = default_config.get_config()
  config.tasks = "present,sum"
  config.arms = ("scratch", "finetune_lr01")
  config.fractions = (0.1,)
  config.seeds = (3,)
  first, second = pf.plan(config, str(tmp_path))
  pre = first[0].overrides
  assert pre["tasks"] == "left,right" and pre["seed"] == 3
  assert pre["data.label_fractions.left"] == pre[
      "data.label_fractions.right"] == 1.0
  # No selection: fine-tuning starts from its last step.
  assert pre["select_by"] == "" and pre["data.validation_fraction"] == 0.0
  assert pre["num_steps"] == 1000
  runs = {r.method: r.overrides for r in second}
  assert runs["finetune_lr01"]["init_from"] == pf.pretrain_dir(
      str(tmp_path), 3) == first[0].workdir
  assert runs["finetune_lr01"]["optimizer.lr_scales"] == "shared/*=0.1"
  assert "init_from" not in runs["scratch"]
  assert runs["scratch"]["data.label_fractions.present"] == 0.1
  assert runs["scratch"]["tasks"] == "present,sum"
