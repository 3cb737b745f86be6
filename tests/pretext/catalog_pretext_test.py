"""The colour catalog datasets (celeb_a, shapes3d) train with vision pretexts.

Runs under `tfds.testing.mock_data` (random examples with the real feature
specs), as `tests/catalog_train_test.py` does: each config is shrunk only in
size (16x16 images, an MLP trunk, batch 8, two steps) and the experiment
comes from `experiments.train.build_experiment`, so what is exercised is
the config's own dataset, preprocessing and task set with the pretexts of
`config.pretext` added by `train.py`. Each dataset is built and trained
once (a module fixture) and read by the tests that follow.

The pretexts are every one that runs on colour images, split so that each
dataset's step compiles six (blur_region and denoise both make views of
their own; each dataset takes one). The grid, region and factor are not
square and differ from the defaults, so that a target shape that swaps H
and W, or ignores a hyperparameter, fails.
"""

import math
import pathlib
import shlex
from typing import Any, NamedTuple

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import train
from experiments.configs import celeb_a as celeb_a_config
from experiments.configs import shapes3d as shapes3d_config
from mtl_jax import pretext as pretext_lib

import train_testing  # tests/train_testing.py

# The module fixture trains once: every test of the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("catalog_pretext")

REPO = pathlib.Path(__file__).resolve().parents[2]
NUM_MOCK = 8
BATCH = 8
NUM_STEPS = 2
SIZE = 16  # data.options.image_size of the trained runs
GRID = (2, 4)
REGION = (4, 6)
FACTOR = 4
CONFIGS = {"celeb_a": celeb_a_config, "shapes3d": shapes3d_config}
# One supervised task each: the pretexts are under test, not the heads.
SUPERVISED = {"celeb_a": "Smiling", "shapes3d": "shape"}
PRETEXTS = {
    "celeb_a": ("grid_mask", "colourise", "super_resolve", "rotate",
                "blur_region", "reconstruct"),
    "shapes3d": ("grid_mask", "colourise", "super_resolve", "rotate",
                 "denoise", "reconstruct"),
}
# BT.601 luma weights, written out rather than read from the library.
LUMA = np.array([0.299, 0.587, 0.114])


def _targets(h: int, w: int, grid=GRID, region=REGION) -> dict[str, tuple]:
  """The label shape of each pretext on one (h, w, 3) image."""
  return {"grid_mask": (h // grid[0], w // grid[1], 3),
          "blur_region": (*region, 3), "rotate": (),
          **{p: (h, w, 3) for p in ("colourise", "super_resolve", "denoise",
                                    "reconstruct")}}


def _small(name: str, image_size: int = SIZE) -> ml_collections.ConfigDict:
  """The dataset's config shrunk in size, with its pretexts selected."""
  config = CONFIGS[name].get_config()
  config.tasks = SUPERVISED[name]
  config.num_steps = NUM_STEPS
  config.batch_size = BATCH
  config.eval_batch_size = BATCH
  config.optimizer.warmup_steps = 1
  config.model.trunk = "mlp"
  config.model.hidden_sizes = (16,)
  config.model.head_hidden_sizes = ()
  # One device: the 8 virtual test devices would make the step's compile
  # slower, and a view's independence of the device split is tested in
  # tests/pretext/views_test.py.
  config.mesh.data = 1
  config.data.options.image_size = image_size
  config.pretext.names = ",".join(PRETEXTS[name])
  config.pretext.update_from_flattened_dict({
      "grid_mask.grid": GRID, "blur_region.size": REGION,
      "super_resolve.factor": FACTOR})
  return config


class Run(NamedTuple):
  name: str
  exp: Any
  history: list[tuple[dict[str, float], dict[str, Any]]]  # (metrics, batch)
  final_eval: dict[str, float]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def run(request) -> Run:
  config = _small(request.param)
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    exp = train.build_experiment(config)
    history, final_eval, _ = train_testing.train_and_evaluate(
        exp, config.seed, NUM_STEPS)
  return Run(request.param, exp, history, final_eval)


def test_task_set_has_the_pretexts_at_the_image_shape(run):
  sample = run.history[0][1]["inputs"]
  assert sample.shape == (BATCH, SIZE, SIZE, 3)
  assert run.exp.tasks.names == (SUPERVISED[run.name], *PRETEXTS[run.name])
  targets = _targets(SIZE, SIZE)
  assert targets["grid_mask"] == (8, 4, 3)  # (H / rows, W / cols, C)
  for name in PRETEXTS[run.name]:
    task = run.exp.tasks.get(name)
    assert task.label_shape == targets[name], name
    if name == "rotate":
      assert (task.kind, task.output_shape, task.label_dtype) == (
          "classification", (4,), "int32")
    else:
      assert (task.kind, task.output_shape, task.label_dtype) == (
          "regression", targets[name], "float32"), name
    assert task.rows == "all"
    # The autoencoder reads the inputs (the supervised trunk pass); every
    # other pretext has a view of its own.
    assert task.view == ("inputs" if name == "reconstruct" else name)


def test_train_steps_report_every_pretext(run):
  for metrics, batch in run.history:
    assert metrics["nonfinite"] == 0.0
    assert math.isfinite(metrics["loss"])
    for name in PRETEXTS[run.name]:
      assert math.isfinite(metrics[f"{name}/loss"]), name
      assert metrics[f"{name}/loss"] > 0.0, name
      # rows=all: every row of the batch, labelled for a task or not.
      assert metrics[f"{name}/count"] == BATCH, name
    # The supervised task keeps its own counts from the batch's masks.
    task = SUPERVISED[run.name]
    assert metrics[f"{task}/count"] == float(np.sum(batch["masks"][task]))


def test_eval_scores_every_pretext(run):
  ev = run.final_eval
  for name in PRETEXTS[run.name]:
    # The eval step scores a pretext on every held-out row.
    assert ev[f"{name}/count"] == NUM_MOCK, name
    if name == "rotate":
      assert "rotate/psnr" not in ev
      accuracy = ev["rotate/accuracy"]
      assert 0.0 <= accuracy <= 1.0
      assert accuracy * NUM_MOCK == pytest.approx(round(accuracy * NUM_MOCK))
      continue
    assert f"{name}/accuracy" not in ev
    psnr, mse = ev[f"{name}/psnr"], ev[f"{name}/loss"]
    assert math.isfinite(psnr) and 0.0 < psnr < 100.0, (name, psnr)
    # PSNR is the mean of per-example 10 log10(1 / mse_b) on [0, 1] images,
    # the loss the mean of mse_b: by Jensen the PSNR is at least the PSNR of
    # the mean loss.
    assert psnr >= 10.0 * math.log10(1.0 / mse) - 1e-4, (name, psnr, mse)


def test_colourise_and_grid_mask_on_a_real_batch(run):
  batch = jax.device_get(run.history[0][1])
  images = np.asarray(batch["inputs"], np.float64)  # [B, H, W, 3]
  # The mock images are colour (the channels differ), so a luminance view is
  # not the image itself.
  assert np.max(np.abs(images - (images @ LUMA)[..., None])) > 0.05
  # The two pretexts alone (one compile less of the others): a view's key
  # depends on its name only, so a key gives them the views it gives them
  # among all the tasks.
  tasks = run.exp.tasks.select([SUPERVISED[run.name], "grid_mask",
                                "colourise"])
  out = jax.device_get(jax.jit(lambda b, k: pretext_lib.add_views(
      tasks, b, k))(batch, jax.random.PRNGKey(3)))

  view = out["views"]["colourise"]
  assert view.shape == images.shape
  luma = images @ LUMA  # [B, H, W]
  for c in range(3):
    np.testing.assert_allclose(view[..., c], luma, atol=1e-6)
  # The label is the chroma: the view plus the label is the colour image.
  np.testing.assert_allclose(view + out["labels"]["colourise"], images,
                             atol=1e-6)
  np.testing.assert_array_equal(out["masks"]["colourise"], np.ones(BATCH))

  # grid_mask: each row's label is one (H/2, W/4) cell of its image, and the
  # view is the image with exactly that cell blanked (fill 0).
  cell_h, cell_w = SIZE // GRID[0], SIZE // GRID[1]
  label, view = out["labels"]["grid_mask"], out["views"]["grid_mask"]
  for b in range(BATCH):
    blank = np.all(view[b] != batch["inputs"][b], axis=-1)  # [H, W]
    ys, xs = np.nonzero(blank)
    top, left = ys.min(), xs.min()
    assert (top % cell_h, left % cell_w) == (0, 0)
    expected = np.zeros((SIZE, SIZE), bool)
    expected[top:top + cell_h, left:left + cell_w] = True
    np.testing.assert_array_equal(blank, expected)
    np.testing.assert_array_equal(
        label[b], batch["inputs"][b, top:top + cell_h, left:left + cell_w])
    np.testing.assert_array_equal(view[b][blank], 0.0)


def _documented_argv(module) -> list[str]:
  """The module docstring's command line that selects pretexts: argv with
  `--config` (made absolute) and its overrides."""
  text = module.__doc__.replace("\\\n", " ")
  lines = [line for line in text.splitlines()
           if "--config.pretext.names=" in line]
  assert len(lines) == 1, lines
  args = shlex.split(lines[0])  # as the shell would: quotes removed
  path = pathlib.Path(module.__file__).relative_to(REPO).as_posix()
  assert f"--config={path}" in args
  return ["train", f"--config={module.__file__}",
          *(a for a in args if a.startswith("--config."))]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_documented_command_line_builds(name):
  argv = _documented_argv(CONFIGS[name])
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config",
                                  flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  assert config.data.options.image_size == 64  # the config's default
  names = tuple(config.pretext.names.split(","))
  assert {"grid_mask", "colourise", "rotate"} <= set(names)
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    exp = train.build_experiment(config)
  assert exp.tasks.names[-len(names):] == names
  grid = tuple(config.pretext.grid_mask.grid)
  targets = _targets(64, 64, grid=grid, region=config.pretext.blur_region.size)
  assert targets["grid_mask"] == (16, 16, 3)
  for pretext in names:
    assert exp.tasks.get(pretext).label_shape == targets[pretext], pretext


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("override, match", [
    ({"grid_mask.grid": (5, 5)},
     r"config\.pretext\.grid_mask: .*grid 5 x 5 does not divide the image "
     r"\(H, W, C\) = \(64, 64, 3\)"),
    ({"super_resolve.factor": 65},
     r"config\.pretext\.super_resolve: .*factor 65 is larger than the image "
     r"\(H, W, C\) = \(64, 64, 3\)"),
])
def test_bad_pretext_shape_fails_before_training(name, override, match):
  config = _small(name, image_size=64)
  config.pretext.update_from_flattened_dict(override)
  # The hyperparameters are valid on their own: only the dataset's image
  # shape rules them out, so the config check passes ...
  train.check_config(config)
  # ... and the experiment's build, which reads one batch for the shape,
  # names the pretext before any parameter exists.
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    with pytest.raises(ValueError, match=match):
      train.build_experiment(config)
