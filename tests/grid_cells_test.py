"""experiments/grid_cells.py end to end on a tiny setting: the reference
(no pretext), one fixed cell and the random cell, one seed. The per-cell
Δm% is checked against a hand computation from the runs' results.json, the
reconstruction against `experiments.learnability.analyse` of the same
checkpoint, and a second call trains and scores nothing."""

import json
import os

import ml_collections
import numpy as np
import pytest

from experiments import grid_cells
from experiments import learnability
from experiments import sweep as sweep_lib
from experiments import train
from experiments.configs.sweeps import grid_cells as default_config
import train_test  # tests/train_test.py

pytestmark = pytest.mark.xdist_group("grid_cells")

NUM_STEPS = 12
NUM_IMAGES = 24
REFERENCE_BATCHES = 2


def _tiny_sweep(data_dir):
  sweep = default_config.get_config()
  for name in ("cell1", "cell2", "cell3"):
    del sweep.axes.pretext[name]
  sweep.seeds = (0,)
  base = train_test.tiny_config(data_dir)
  # One evaluation, at the last step: the selected step is the final
  # checkpoint, which learnability.analyse scores too.
  sweep.overrides = ml_collections.ConfigDict({
      "tasks": "left,sum",
      "data": {"data_dir": data_dir, "validation_fraction": 0.2,
               "options": {"builder_config": "small"},
               "label_fractions": {"left": 0.5, "sum": 0.5}},
      "select_by": "loss", "num_steps": NUM_STEPS, "eval_every": NUM_STEPS,
      "log_every": NUM_STEPS, "checkpoint_every": NUM_STEPS,
      "batch_size": base.batch_size, "eval_batch_size": base.eval_batch_size,
      "mesh": {"data": 1},
      "model": {"trunk": "mlp", "hidden_sizes": (32,),
                "head_hidden_sizes": ()},
      "optimizer": {"schedule": "constant", "learning_rate": 0.01}})
  sweep.score = ml_collections.ConfigDict(
      {"num_images": NUM_IMAGES, "reference_batches": REFERENCE_BATCHES})
  return sweep


def _results(root, arm):
  with open(os.path.join(root, f"pretext={arm}", "seed0",
                         "results.json")) as f:
    return json.load(f)


def test_cells_end_to_end(small_data_dir, tmp_path, monkeypatch):
  sweep = _tiny_sweep(small_data_dir)
  root = str(tmp_path / "root")
  trained = []

  def trainer(config, workdir):
    trained.append(workdir)
    return train.run(config, workdir)

  report = grid_cells.run_protocol(sweep, root, mode="run", train_fn=trainer)
  assert len(trained) == 3
  for name in (grid_cells.JSON_FILE, grid_cells.MD_FILE,
               grid_cells.PNG_FILE, "summary.md"):
    assert os.path.exists(os.path.join(root, name)), name
  with open(os.path.join(root, grid_cells.JSON_FILE)) as f:
    assert json.load(f) == report
  assert report["cells"] == {"0": "cell0"}
  assert report["random_arms"] == ["random"]
  assert report["grid"] == [2, 2]
  assert report["keys"] == ["left/accuracy", "sum/mae", "sum/rmse"]

  # Δm% by hand: the reference's test metrics (one seed) and the arm's.
  none = _results(root, "none")["eval"]
  assert report["reference_metrics"] == pytest.approx(
      {k: none[k] for k in report["keys"]})
  for arm in ("cell0", "random", "none"):
    got = _results(root, arm)["eval"]
    expected = 100 / 3 * (
        (got["left/accuracy"] - none["left/accuracy"]) / none["left/accuracy"]
        - (got["sum/mae"] - none["sum/mae"]) / none["sum/mae"]
        - (got["sum/rmse"] - none["sum/rmse"]) / none["sum/rmse"])
    entry = report["arms"][arm]
    assert entry["n"] == 1
    assert entry["delta_m"]["mean"] == pytest.approx(expected, abs=1e-9)
    assert entry["delta_m"]["lower"] is None  # one seed: no interval
    for key in report["keys"]:
      assert entry["metrics"][key]["mean"] == pytest.approx(got[key])
  assert report["arms"]["none"]["delta_m"]["mean"] == pytest.approx(0.0)
  assert report["arms"]["none"]["reconstruction"] is None

  # Reconstruction: learnability.analyse on the same (final = selected)
  # checkpoint, the same images and reference (analyse reads the run's
  # checkpoints/, the protocol its best/).
  workdir = os.path.join(root, "pretext=cell0", "seed0")
  assert _results(root, "cell0")["selection"]["step"] == NUM_STEPS
  quality = learnability.analyse(
      workdir, num_images=NUM_IMAGES, reference_batches=REFERENCE_BATCHES,
      out_dir=str(tmp_path / "analyse"))["tasks"]["grid_mask"]
  rec = report["arms"]["cell0"]["reconstruction"]
  assert report["arms"]["cell0"]["pretext"] == {"grid": [2, 2], "cell": 0}
  np.testing.assert_allclose(rec["psnr_grid"], quality["model"]["psnr"])
  np.testing.assert_allclose(rec["gain_db_grid"], quality["gain_db"])
  assert rec["seeds"]["0"]["step"] == NUM_STEPS
  assert rec["psnr"] == pytest.approx(quality["model"]["psnr"][0][0])
  assert rec["gain_db"] == pytest.approx(quality["gain_db"][0][0])
  assert rec["best_baseline_psnr"] == pytest.approx(
      quality["best_baseline_psnr"][0][0])
  # The random arm: every cell of its own score (one seed: the mean).
  with open(os.path.join(root, "pretext=random", "seed0",
                         grid_cells.QUALITY_FILE)) as f:
    random_quality = json.load(f)
  assert random_quality["kind"] == "grid_cell_quality"
  assert random_quality["num_images"] == NUM_IMAGES
  rec = report["arms"]["random"]["reconstruction"]
  assert report["arms"]["random"]["pretext"] == {"grid": [2, 2],
                                                 "cell": None}
  np.testing.assert_allclose(rec["psnr_grid"],
                             random_quality["model"]["psnr"])
  np.testing.assert_allclose(rec["gain_db_grid"], random_quality["gain_db"])
  assert "psnr" not in rec  # no own cell

  with open(os.path.join(root, grid_cells.MD_FILE)) as f:
    table = f.read()
  cell0 = report["arms"]["cell0"]
  assert (f"| cell0 | 0 | 1 | {cell0['delta_m']['mean']:+.2f} |") in table
  assert f"{cell0['reconstruction']['gain_db']:+.2f} |" in table
  assert "Arm 'random' (random cell), per cell:" in table

  # Again: every run is finished and every score cached.
  def fail(*args, **kwargs):
    raise AssertionError("a finished run was scored again")

  monkeypatch.setattr(learnability, "score_tasks", fail)
  again = grid_cells.run_protocol(sweep, root, mode="run", train_fn=trainer)
  assert len(trained) == 3
  assert again == report


def test_the_shipped_protocol():
  sweep = default_config.get_config()
  runs = sweep_lib.plan(sweep, "root", [])
  assert sorted({r.method for r in runs}) == [
      "cell0", "cell1", "cell2", "cell3", "none", "random"]
  assert len(runs) == 6 * 3
  for run in runs:
    config = sweep_lib.make_config(sweep, run)
    train.check_config(config)
    assert dict(config.data.label_fractions) == {
        "left": 0.05, "right": 0.05, "present": 0.05, "sum": 0.05}
    assert config.num_steps == 600 and config.select_by == "loss"
    if run.method == "none":
      assert config.data.drop_unlabelled and not config.pretext.names
    else:
      assert not config.data.drop_unlabelled
      assert config.data.mixture.method == "uniform"
      assert config.pretext.names == "grid_mask"
      assert tuple(config.pretext.grid_mask.grid) == (2, 2)
      assert config.pretext.grid_mask.cell == (
          None if run.method == "random" else int(run.method[-1]))


def test_bad_protocols_are_named(tmp_path):
  sweep = default_config.get_config()
  sweep.reference = ""
  with pytest.raises(ValueError, match="set sweep.reference"):
    grid_cells.run_protocol(sweep, str(tmp_path), mode="commands")
  sweep = default_config.get_config()
  sweep.axes.lr = {"a": {}}
  with pytest.raises(ValueError, match=r"axes \['lr'\] besides the method "
                     "axis 'pretext'"):
    grid_cells.run_protocol(sweep, str(tmp_path), mode="commands")
  sweep = default_config.get_config()
  sweep.score.num_images = 0
  with pytest.raises(ValueError, match=r"sweep.score.num_images must be an "
                     "int >= 1, got 0"):
    grid_cells.run_protocol(sweep, str(tmp_path), mode="commands")
