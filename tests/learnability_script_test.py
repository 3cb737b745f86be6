"""experiments/learnability.py on a tiny trained run: grid_mask + denoise.

One run (20 steps of a tiny MLP on the small multi_digits config, with the
grid_mask and denoise pretexts) is trained in-process once for the module;
`analyse` scores it. The numbers' meaning (baselines, PSNR) is tested in
tests/pretext/learnability_test.py; here: the wiring from a workdir to the
report, its structure, the files, and the named errors.
"""

import json
import math
import os
import shutil

import numpy as np
import pytest

from experiments import learnability
from experiments import train
from experiments.configs import multi_digits as md_config

# The module fixture trains once: every test of the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("learnability_script")

NUM_STEPS = 20
GRID = (2, 2)
NUM_IMAGES = 40


def _tiny_config(data_dir):
  config = md_config.get_config()
  config.data.data_dir = data_dir
  config.update_from_flattened_dict({
      "data.options.builder_config": "small",
      "model.trunk": "mlp", "model.hidden_sizes": (32,),
      "model.head_hidden_sizes": (), "model.dropout_rate": 0.0,
      "batch_size": 32, "eval_batch_size": 256, "num_steps": NUM_STEPS,
      "log_every": 10, "eval_every": NUM_STEPS, "checkpoint_every": 10,
      "optimizer.schedule": "constant", "optimizer.learning_rate": 0.01,
      "mesh.data": 1, "pretext.names": "grid_mask,denoise",
      "pretext.grid_mask.grid": GRID})
  return config


@pytest.fixture(scope="module")
def trained(small_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("learnability_run"))
  train.run(_tiny_config(small_data_dir), workdir)
  return workdir


@pytest.fixture(scope="module")
def report(trained):
  return learnability.analyse(trained, num_images=NUM_IMAGES,
                              reference_batches=2)


def _best_of(baselines, pick):
  values = [pick(b) for b in baselines.values() if pick(b) is not None]
  return max(values)


def test_report_structure_and_files(trained, report):
  with open(os.path.join(trained, learnability.JSON_FILE)) as f:
    assert json.load(f) == report
  assert report["step"] == NUM_STEPS  # the latest checkpoint
  assert report["images"]["num_images"] == NUM_IMAGES
  assert report["reference"]["num_images"] == 2 * 32
  assert set(report["tasks"]) == {"grid_mask", "denoise"}
  assert report["heatmaps"] == {"grid_mask": "learnability_grid_mask.png"}
  png = os.path.join(trained, "learnability_grid_mask.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not any(n.endswith(".tmp") for n in os.listdir(trained))


def test_grid_mask_per_cell_numbers(report):
  cells = report["tasks"]["grid_mask"]
  assert cells["kind"] == "grid_cell_quality"
  assert cells["grid"] == list(GRID)
  assert cells["num_images"] == NUM_IMAGES
  assert cells["reference"] == "given by the caller"  # the training mean
  model = np.asarray(cells["model"]["psnr"])
  assert model.shape == GRID and np.isfinite(model).all()
  for name, scores in cells["baselines"].items():
    assert np.asarray(scores["psnr"], np.float64).shape == GRID, name
  for r in range(GRID[0]):
    for c in range(GRID[1]):
      best = _best_of(cells["baselines"], lambda b, r=r, c=c: b["psnr"][r][c])
      assert cells["best_baseline_psnr"][r][c] == best
      assert cells["gain_db"][r][c] == model[r][c] - best  # exactly
  assert sorted(e["cell"] for e in cells["ranking"]) == [0, 1, 2, 3]


def test_denoise_against_baselines(report):
  result = report["tasks"]["denoise"]
  assert result["kind"] == "pretext_quality" and result["metric"] == "psnr"
  assert set(result["baselines"]) == {"mean_image", "identity"}
  psnrs = [result["model"]["psnr"]] + [
      b["psnr"] for b in result["baselines"].values()]
  assert all(math.isfinite(p) for p in psnrs)
  best = max(b["psnr"] for b in result["baselines"].values())
  assert result["best_baseline_psnr"] == best
  assert result["gain_db"] == result["model"]["psnr"] - best


def test_summary_names_every_task(report):
  summary = learnability.format_summary(report)
  assert "grid_mask 2x2" in summary and "denoise: PSNR" in summary


def test_earlier_step_and_out_dir(trained, tmp_path):
  out = str(tmp_path / "out")
  report = learnability.analyse(trained, step=10, num_images=8,
                                reference_batches=1, out_dir=out)
  assert report["step"] == 10
  assert sorted(os.listdir(out)) == ["learnability.json",
                                     "learnability_grid_mask.png"]
  with pytest.raises(ValueError, match=r"no checkpoint at step 7 .*\[10, 20\]"):
    learnability.analyse(trained, step=7, num_images=8, out_dir=out)


def test_workdir_without_checkpoint(trained, tmp_path):
  shutil.copy(os.path.join(trained, "config.json"), tmp_path)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    learnability.analyse(str(tmp_path), num_images=8)
  assert not os.path.exists(tmp_path / "checkpoints")  # nothing created


def test_run_without_pretext_tasks(trained, tmp_path):
  with open(os.path.join(trained, "config.json")) as f:
    config = json.load(f)
  config["pretext"]["names"] = ""
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="has no pretext tasks"):
    learnability.analyse(str(tmp_path))


def test_not_a_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    learnability.analyse(str(tmp_path))
