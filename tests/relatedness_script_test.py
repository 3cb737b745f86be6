"""experiments/relatedness.py: a tiny protocol end to end (reference run,
measurement, grouping, check runs, a rerun that trains nothing), the
measured values against the library recomputed on the same params and
batch, the check's Δm% by hand, and bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import learnability
from experiments import relatedness
from experiments import sweep as sweep_lib
from experiments import train
from experiments.configs.sweeps import relatedness as default_protocol
from experiments.protocols import stats
from mtl_jax import relatedness as relatedness_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax.training import checkpoint as checkpoint_lib

TASKS = ("left", "present", "sum")
# The module fixture runs the protocol once: every test of the file on one
# xdist worker (`make test` runs `--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("relatedness_script")

# float32 rounding of two routes to the same numbers (jit programs of
# different shape).
ATOL = 2e-6


def _tiny_protocol(data_dir):
  config = default_protocol.get_config()
  config.tasks = ",".join(TASKS)
  config.overrides = ml_collections.ConfigDict({
      "data": {"data_dir": data_dir, "validation_fraction": 0.0,
               "options": {"builder_config": "small"}},
      "select_by": "", "num_steps": 10, "eval_every": 10,
      "log_every": 5, "batch_size": 32, "eval_batch_size": 256,
      "mesh": {"data": 1},
      "model": {"trunk": "mlp", "hidden_sizes": (32,),
                "head_hidden_sizes": ()},
      "optimizer": {"schedule": "constant", "learning_rate": 0.01}})
  config.measure_every = 5
  config.num_batches = 1
  config.seeds = (0,)
  config.max_groups = 2
  return config


@pytest.fixture(scope="module")
def tiny(small_data_dir, tmp_path_factory):
  """The tiny protocol, run once: `(config, root, out)`."""
  config = _tiny_protocol(small_data_dir)
  root = str(tmp_path_factory.mktemp("relatedness"))
  out = relatedness.run_protocol(config, root, "run", train.run)
  return config, root, out


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_tiny_protocol_end_to_end_and_a_rerun_trains_nothing(tiny):
  config, root, out = tiny
  for name in ("relatedness.json", "relatedness.md", "relatedness.png",
               "relatedness_over_training.png", "check.json", "check.md",
               "check.png"):
    assert os.path.getsize(os.path.join(root, name)) > 0, name
  with open(os.path.join(root, "relatedness.json")) as f:
    report = json.load(f)
  k = len(TASKS)
  assert report["tasks"] == list(TASKS)
  # Step 0 (rebuilt) and the reference run's two checkpoints.
  assert report["steps"] == [0, 5, 10]
  assert report["learning_rates"] == pytest.approx([0.01] * 3)
  for entry in report["per_step"] + [report["average"]]:
    cos = relatedness._matrix(entry["cosine"])
    aff = relatedness._matrix(entry["affinity"])
    assert cos.shape == aff.shape == (k, k)
    defined = ~np.isnan(np.diagonal(cos))
    assert defined.any()
    np.testing.assert_allclose(np.diagonal(cos)[defined], 1.0, atol=1e-5)
    np.testing.assert_allclose(cos, cos.T, atol=1e-6, equal_nan=True)
    assert np.all(np.abs(cos[~np.isnan(cos)]) <= 1 + 1e-5)
  # The average is the mean over the steps (every task in every batch here).
  per_step = np.stack([relatedness._matrix(p["affinity"])
                       for p in report["per_step"]])
  np.testing.assert_allclose(
      relatedness._matrix(report["average"]["affinity"]),
      per_step.mean(axis=0), rtol=1e-12)
  # The groupings are best_grouping's of the averaged affinity.
  average = relatedness._matrix(report["average"]["affinity"])
  assert [g["max_groups"] for g in report["groupings"]] == [1, 2]
  for g in report["groupings"]:
    groups, score = relatedness_lib.best_grouping(average, g["max_groups"])
    assert g["groups"] == [[TASKS[i] for i in x] for x in groups]
    assert g["score"] == pytest.approx(score)
  suggested = report["suggested"]["groups"]
  assert suggested == report["groupings"][-1]["groups"]
  with open(os.path.join(root, "relatedness.md")) as f:
    md = f.read()
  assert "| cos | left | present | sum |" in md
  assert f"{report['groupings'][-1]['score']:+.4g} |" in md

  # The check: Δm% by hand from the check runs' results.json.
  runs = out["check_runs"]
  assert [r.method for r in runs] == ["all-in-one"] + [
      "group:" + ",".join(g) for g in suggested if len(g) < k]
  whole = _results(os.path.join(root, "check", "all", "seed0"))["eval"]
  assert _results(os.path.join(root, "check", "all", "seed0"))[
      "label_counts"].keys() == set(TASKS)
  grouped = {}
  for g in suggested:
    source = (whole if len(g) == k else _results(os.path.join(
        root, "check", "+".join(g), "seed0"))["eval"])
    grouped.update({key: v for key, v in source.items()
                    if key.split("/")[0] in g
                    and key.split("/")[1] not in ("loss", "count")})
  keys = sorted(grouped)
  assert keys == ["left/accuracy", "present/f1", "sum/mae", "sum/rmse"]
  by_hand = 100 / len(keys) * sum(
      (-1 if key.startswith("sum/") else 1)
      * (grouped[key] - whole[key]) / whole[key] for key in keys)
  check = out["check"]
  assert check["keys"] == keys
  assert check["delta_m_per_seed"]["0"] == pytest.approx(by_hand)
  assert check["summary"]["grouped"]["delta_m"]["mean"] == pytest.approx(
      by_hand)
  for key in keys:
    assert check["summary"]["grouped"]["metrics"][key]["mean"] == (
        pytest.approx(grouped[key]))
    assert check["summary"]["all-in-one"]["metrics"][key]["mean"] == (
        pytest.approx(whole[key]))
  with open(os.path.join(root, "check.json")) as f:
    assert json.load(f)["delta_m_per_seed"]["0"] == pytest.approx(by_hand)
  with open(os.path.join(root, "check.md")) as f:
    assert f"{by_hand:.4f}" in f.read()

  # A rerun trains nothing, reuses the measurement and gives the same
  # tables; the commands mode has nothing left to print.
  workdirs = [out["reference"].workdir] + [r.workdir for r in runs]
  mtimes = [os.path.getmtime(os.path.join(w, "results.json"))
            for w in workdirs]

  def no_training(cfg, workdir):
    raise AssertionError(f"retrained {workdir}")

  measured_at = os.path.getmtime(os.path.join(root, "relatedness.json"))
  again = relatedness.run_protocol(config, root, "run", no_training)
  assert mtimes == [os.path.getmtime(os.path.join(w, "results.json"))
                    for w in workdirs]
  assert measured_at == os.path.getmtime(os.path.join(root,
                                                      "relatedness.json"))
  assert again["check"]["delta_m_per_seed"] == check["delta_m_per_seed"]
  np.testing.assert_array_equal(again["relatedness"]["average"]["affinity"],
                                average)
  assert relatedness.run_protocol(config, root, "commands")["commands"] == []


def test_commands_before_the_reference_run_is_finished(tiny, tmp_path,
                                                        capsys):
  config = tiny[0]
  out = relatedness.run_protocol(config, str(tmp_path), "commands")
  reference = relatedness.reference_run(config, str(tmp_path))
  assert out["commands"] == [sweep_lib.command(
      relatedness._sweep(config), reference)]
  assert "--config.checkpoint_every=5" in out["commands"][0]
  assert "--config.max_checkpoints_to_keep=4" in out["commands"][0]
  assert "not finished" in capsys.readouterr().err
  assert not os.path.exists(os.path.join(str(tmp_path), "relatedness.json"))


def test_measured_values_equal_the_library_on_the_same_params_and_batch(
    tiny, tmp_path):
  """Step 5 of the reference run, its one batch: the cosines and affinities
  recomputed by the eval forward pass (model.apply + task_loss_sums), the
  library's gram_cosines and lookahead_affinity. And the same run measured
  as if its schedule were a warm-up to 0.01 at step 5 and a cosine decay to
  0 at step 10: steps 0 and 10 take no lookahead step (NaN affinities, the
  same cosines) and the average affinity is step 5's."""
  _, root, out = tiny
  workdir = out["reference"].workdir
  step = 5
  exp = train.build_experiment(learnability.load_config(workdir))
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir,
                                                          "checkpoints"))
  try:
    params = checkpointer.read(step)["params"]
  finally:
    checkpointer.close()
  batch, _ = exp.train_mixture.batch(exp.train_mixture.state_at(step))

  def losses(p):
    predictions = exp.model.apply({"params": p}, batch["inputs"],
                                  train=False)
    sums, counts = tasks_lib.task_loss_sums(exp.tasks, predictions, batch)
    return sums / jnp.maximum(counts, 1)

  @jax.jit
  def recompute(params):
    grads = jax.jacrev(lambda s: losses({**params, "shared": s}))(
        params["shared"])
    jac = jnp.concatenate([g.reshape(len(TASKS), -1)
                           for g in jax.tree.leaves(grads)], axis=1)
    return (relatedness_lib.gram_cosines(jac @ jac.T),
            relatedness_lib.lookahead_affinity(losses, params, 0.01))

  cosines, affinity = recompute(params)
  assert np.abs(np.asarray(affinity)).max() > 1e-3  # not a trivial zero
  with open(os.path.join(root, "relatedness.json")) as f:
    report = json.load(f)
  measured = report["per_step"][report["steps"].index(step)]
  np.testing.assert_allclose(relatedness._matrix(measured["cosine"]),
                             cosines, atol=ATOL)
  np.testing.assert_allclose(relatedness._matrix(measured["affinity"]),
                             affinity, atol=ATOL)

  copy = str(tmp_path / "warmup")
  shutil.copytree(workdir, copy)
  with open(os.path.join(copy, "config.json")) as f:
    run_config = json.load(f)
  run_config["optimizer"].update(schedule="warmup_cosine", warmup_steps=5)
  with open(os.path.join(copy, "config.json"), "w") as f:
    json.dump(run_config, f)
  warm = relatedness.measure(copy, measure_every=5, num_batches=1)
  assert warm["steps"] == [0, 5, 10]
  assert warm["learning_rates"] == pytest.approx([0.0, 0.01, 0.0])
  assert np.isnan(warm["per_step"][0]["affinity"]).all()
  assert np.isnan(warm["per_step"][2]["affinity"]).all()
  np.testing.assert_allclose(warm["per_step"][1]["affinity"], affinity,
                             atol=ATOL)
  np.testing.assert_array_equal(warm["average"]["affinity"],
                                warm["per_step"][1]["affinity"])
  for got, want in zip(warm["per_step"], report["per_step"]):
    np.testing.assert_allclose(got["cosine"], relatedness._matrix(
        want["cosine"]), atol=ATOL)


def test_check_table_over_seeds_by_hand(tmp_path):
  """Fake check runs, seeds 0 and 1, grouping {left, sum} · {right}:
  accuracy = 0.8 + 0.1 (grouped) + 0.01 seed, MAE = 1.0 - 0.1 (grouped)."""
  config = default_protocol.get_config()
  config.tasks = "left,right,sum"
  config.seeds = (0, 1)
  groups = [["sum", "left"], ["right"]]
  root = str(tmp_path)
  runs = relatedness.plan_check(config, root, groups)
  assert [(r.method, r.seed) for r in runs] == [
      ("all-in-one", 0), ("group:left,sum", 0), ("group:right", 0),
      ("all-in-one", 1), ("group:left,sum", 1), ("group:right", 1)]
  assert runs[1].workdir == os.path.join(root, "check", "left+sum", "seed0")
  assert runs[1].overrides["tasks"] == "left,sum"
  assert runs[1].overrides["num_steps"] == 1000

  def trainer(cfg, workdir):
    bonus = 0.0 if cfg.tasks == "left,right,sum" else 0.1
    results = {"left/accuracy": 0.8 + bonus + 0.01 * cfg.seed,
               "right/accuracy": 0.7 + 0.02 * cfg.seed,
               "sum/mae": 1.0 - bonus, "left/loss": 0.3, "sum/count": 9}
    names = cfg.tasks.split(",")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"eval": {k: v for k, v in results.items()
                          if k.split("/")[0] in names}}, f)

  sweep_lib.run_all(relatedness._sweep(config), runs, trainer)
  check = relatedness.collect_check(config, runs, groups, root)
  # Per seed: left +0.1 / (0.8 + 0.01 s), right 0, sum -(0.9 - 1) / 1.
  per_seed = [100 / 3 * (0.1 / (0.8 + 0.01 * s) + 0.0 + 0.1)
              for s in (0, 1)]
  assert [check["delta_m_per_seed"][s] for s in ("0", "1")] == (
      pytest.approx(per_seed))
  mean, lower, upper = stats.mean_ci(per_seed)
  got = check["summary"]["grouped"]["delta_m"]
  assert (got["mean"], got["lower"], got["upper"]) == pytest.approx(
      (mean, lower, upper))
  assert check["summary"]["grouped"]["metrics"]["left/accuracy"][
      "mean"] == pytest.approx(0.905)
  assert check["summary"]["all-in-one"]["metrics"]["sum/mae"][
      "mean"] == pytest.approx(1.0)
  with open(os.path.join(root, "check.md")) as f:
    table = f.read()
  assert f"{mean:.4f} ± {(upper - lower) / 2:.4f}" in table
  # A group of all tasks is the all-in-one model: no run of its own.
  assert [r.method for r in relatedness.plan_check(
      config, root, [["left", "right", "sum"]])] == ["all-in-one"] * 2


def test_absent_task_has_nan_row_and_column_of_affinity():
  """Task 1 absent (loss 0): its row (no step) and column (no loss) are
  NaN; task 0 and 2's entries stay those of the quadratic case by hand
  (w = 0, lr = 0.5, targets 1 and 2: Z[0, 2] = 1 - 1.125 / 2)."""
  def losses(p):
    w = p["shared"]["w"]
    return jnp.stack([0.5 * (w - 1.0) ** 2, 0.0 * w,
                      0.5 * (w - 2.0) ** 2])

  z = jax.jit(lambda p: relatedness_lib.lookahead_affinity(losses, p, 0.5))(
      {"shared": {"w": jnp.float32(0.0)}})
  assert np.isnan(z[1]).all() and np.isnan(z[:, 1]).all()
  np.testing.assert_allclose(z[0, 2], 0.4375, rtol=1e-6)
  np.testing.assert_allclose(z[2, 0], 1.0, rtol=1e-6)


def test_bad_input_is_named(tmp_path):
  config = default_protocol.get_config()
  with pytest.raises(ValueError, match=r"unknown task 'up' in grouping"):
    relatedness.plan_check(config, str(tmp_path),
                           [["left", "up"], ["right", "present", "sum"]])
  with pytest.raises(ValueError, match=r"task 'left' is in two groups"):
    relatedness.check_groups([["left"], ["left", "sum"]], ["left", "sum"])
  with pytest.raises(ValueError, match=r"leaves out tasks \['sum'\]"):
    relatedness.check_groups([["left"]], ["left", "sum"])
  config.max_groups = 0
  with pytest.raises(ValueError, match=r"config.max_groups must be an "
                     r"integer >= 1, got 0"):
    relatedness.check_protocol(config)
  with pytest.raises(ValueError, match=r"max_groups must be an integer >= "
                     r"1"):
    relatedness.add_groupings({"tasks": ["a", "b"], "average": {
        "affinity": np.zeros((2, 2))}}, 0)
  config = default_protocol.get_config()
  config.measure_every = 0
  with pytest.raises(ValueError, match=r"config.measure_every must be an "
                     r"integer >= 1, got 0"):
    relatedness.reference_run(config, str(tmp_path))
  with pytest.raises(ValueError, match=r"measure_every must be an integer"):
    relatedness.measure(str(tmp_path), measure_every=0, num_batches=1)
  config = default_protocol.get_config()
  config.tasks = "left"
  with pytest.raises(ValueError, match=r"config.tasks='left': name two or "
                     r"more"):
    relatedness.check_protocol(config)
  with pytest.raises(ValueError, match=r"mode 'train'"):
    relatedness.run_protocol(default_protocol.get_config(), str(tmp_path),
                             "train")
