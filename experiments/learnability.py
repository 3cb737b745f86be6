r"""Scores a trained run's pretext heads against baselines that need no
training.

  python -m experiments.learnability --workdir=runs/multi_digits_ssl \
      [--step=3000] [--num_images=512] [--reference_batches=8] \
      [--out_dir=...] [--data_dir=...]

or from a notebook:

  from experiments import learnability
  report = learnability.analyse("runs/multi_digits_ssl", num_images=512)
  print(learnability.format_summary(report))

For a workdir written by `experiments/train.py` with pretext tasks
(`--config.pretext.names=grid_mask,...`), this:

  1. reads the run's config from `<workdir>/config.json` (train.py writes
     `config.to_dict()` there, so it is the run's whole config; JSON turns its
     tuples into lists, which `load_config` turns back: the experiment configs
     hold tuples, never lists). No `--config` file is read (passing one is
     an error: the flag exists only because train.py defines it). Fields
     that train.py lets differ between resumes and that do not change what a
     run computes are overridden: the device layout (one device, jit,
     replicated: this analysis runs on one device whatever trained the run)
     and, with `--data_dir`, where the data lives;
  2. rebuilds the experiment (`train.build_experiment`) and reads the params
     of the latest checkpoint (or `--step`) in `<workdir>/checkpoints`;
  3. takes the first `num_images` real rows (`batch["valid"] == 1`) of the
     run's eval stream as the held-out images;
  4. takes as the mean-image baseline's reference the mean input of the first
     `reference_batches` batches of the run's TRAINING mixture from its
     initial state (the batches of the run's first steps, the unlabelled pool
     included when the run mixed it in), so the baseline never sees the
     held-out images;
  5. scores every pretext task with `mtl_jax.pretext.learnability`, the head
     being the task's output of the restored model on the view:
       grid_mask       `grid_cell_quality`: every cell of its grid, against the
                       mean-image and harmonic-interpolation baselines;
       other images    `pretext_quality` (blur_region, colourise,
                       super_resolve, denoise, reconstruct) against the
                       mean-image, identity (and interpolation) baselines;
       rotate          `pretext_quality`: accuracy against chance.
     The corruptions of `pretext_quality` are drawn from the eval step's key
     (`views.EVAL_SEED`, folded with the task's view name as the step does),
     so a rerun gives the same numbers.

Writes `learnability.json` (atomically) and one heatmap PNG per grid_mask task,
`learnability_<task>.png`, into the workdir (or `--out_dir`), and prints a
short summary. Gains are in dB: the model's mean PSNR minus the best
baseline's (see the library module for the exact baseline definitions).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from experiments import train
from mtl_jax.models import build as models_build
from mtl_jax.pretext import learnability as learnability_lib
from mtl_jax.pretext import views as views_lib
from mtl_jax.training import checkpoint as checkpoint_lib
from mtl_jax.training import run_config

JSON_FILE = "learnability.json"
HEATMAP_FILE = "learnability_{task}.png"
CHECKPOINT_DIR = "checkpoints"

# --workdir (the run to score) is train.py's flag, defined when it is
# imported; so is its --config, which this script refuses: the run's config
# is read from its config.json.
FLAGS = flags.FLAGS
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to score "
                             "(default: the latest).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 512, "Held-out images (the "
                                   "first real rows of the eval stream).")
_REFERENCE_BATCHES = flags.DEFINE_integer(
    "reference_batches", 8, "Training batches whose mean input is the "
    "mean-image baseline's reference.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write "
                               "learnability.json and the PNGs (default: the "
                               "workdir).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Overrides the run's "
                                "config.data.data_dir (data moved).")


def _tuples(value: Any) -> Any:
  """JSON's lists back to the config's tuples, recursively."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_config(workdir: str, *, data_dir: str | None = None
                ) -> ml_collections.ConfigDict:
  """The run's config from `<workdir>/config.json`, set to run on one device.

  Args:
    workdir: the run's workdir.
    data_dir: overrides `config.data.data_dir` (None: keep the run's).

  Raises:
    FileNotFoundError: the workdir has no config.json (not a train.py run).
  """
  path = os.path.join(workdir, run_config.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} not found: {workdir!r} is not the workdir of a run of "
        "experiments/train.py (it writes config.json before training)")
  with open(path) as f:
    config = ml_collections.ConfigDict(_tuples(json.load(f)))
  # Layout fields train.py's MAY_DIFFER lets change: they do not change what
  # the run computes, and this analysis runs on one device.
  config.mesh.data = 1
  config.parallelism = "jit"
  config.sharding = "replicated"
  if data_dir is not None:
    config.data.data_dir = data_dir
  return config


def _check_has_pretexts(config: ml_collections.ConfigDict,
                        workdir: str) -> None:
  if not config.pretext.names.strip():
    raise ValueError(
        f"the run in {workdir!r} has no pretext tasks (config.pretext.names "
        "is empty): there is no pretext head to score. Train with e.g. "
        "--config.pretext.names=grid_mask,rotate")


def _checkpoint_step(checkpointer: checkpoint_lib.Checkpointer, workdir: str,
                     step: int | None) -> int:
  steps = checkpointer.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {workdir!r}: train the run "
                            "first (experiments/train.py)")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(f"no checkpoint at step {step} in {workdir!r}; its "
                     f"checkpoints are at steps {steps}")
  return int(step)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in leaves}


def restore_params(exp: train.Experiment, workdir: str, sample: np.ndarray,
                   step: int | None = None) -> tuple[int, Any]:
  """`(step, params)` of the run's checkpoint `step` (None: the latest).

  Read without a template (`Checkpointer.read`), so any device layout that
  trained the run restores here; the params are checked against the rebuilt
  model's (`sample`: one input batch). A damaged checkpoint is an error, not
  skipped: pick another with `step`.

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
    ValueError: no checkpoint at `step`, or params of another model.
  """
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):  # Checkpointer would create it
    raise FileNotFoundError(f"no checkpoint in {workdir!r}: no "
                            f"{CHECKPOINT_DIR}/ directory; train the run "
                            "first (experiments/train.py)")
  checkpointer = checkpoint_lib.Checkpointer(directory)
  try:
    step = _checkpoint_step(checkpointer, workdir, step)
    params = checkpointer.read(step)["params"]
  finally:
    checkpointer.close()
  got = _flat_shapes(params)
  want = _flat_shapes(models_build.abstract_params(exp.model, sample))
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:5]
    raise ValueError(
        f"checkpoint {step} in {workdir!r} holds params of another model than "
        f"its config.json builds (first differences, path and shape: {diff})")
  return step, jax.tree.map(np.asarray, params)


def eval_images(exp: train.Experiment, num_images: int) -> np.ndarray:
  """The first `num_images` real rows (`valid == 1`) of the eval stream.

  Raises:
    ValueError: `num_images < 1`, or an eval stream without rows.
  """
  if num_images < 1:
    raise ValueError(f"num_images must be >= 1, got {num_images}")
  parts, count = [], 0
  for batch in exp.eval_stream:
    inputs = np.asarray(batch["inputs"])
    valid = np.asarray(batch.get("valid", np.ones(inputs.shape[0])))
    parts.append(inputs[valid > 0])  # padding rows of the last batch out
    count += parts[-1].shape[0]
    if count >= num_images:
      break
  if not count:
    raise ValueError("the run's eval stream has no rows to score on")
  return np.concatenate(parts)[:num_images]


def train_mean(exp: train.Experiment, num_batches: int
               ) -> tuple[np.ndarray, int]:
  """`(mean input [H, W, C], images averaged)` of the first `num_batches`
  training batches from the mixture's initial state.

  Raises:
    ValueError: `num_batches < 1`.
  """
  if num_batches < 1:
    raise ValueError(f"reference_batches must be >= 1, got {num_batches}")
  state, total, count = exp.train_mixture.initial_state(), 0.0, 0
  for _ in range(num_batches):
    batch, state = exp.train_mixture.batch(state)
    inputs = np.asarray(batch["inputs"], np.float64)  # train rows all real
    total = total + inputs.sum(axis=0)
    count += inputs.shape[0]
  return total / count, count


def _predictor(exp: train.Experiment, params: Any,
               task: str) -> Callable[[Any], np.ndarray]:
  """The task's head on a view: `views [n, H, W, C] -> [n, ...]`."""
  apply = jax.jit(lambda p, x: exp.model.apply({"params": p}, x,
                                               train=False)[task])
  return lambda views: np.asarray(apply(params, views))


def score_tasks(exp: train.Experiment, params: Any, images: np.ndarray,
                reference: np.ndarray, *, batch_size: int = 256
                ) -> dict[str, dict[str, Any]]:
  """`{task: learnability result}` for every pretext task of `exp`.

  Pretexts the library cannot score get `{"skipped": reason}`.
  """
  eval_key = jax.random.PRNGKey(views_lib.EVAL_SEED)
  out = {}
  for task in exp.tasks.pretexts:
    pretext, predict = task.pretext, _predictor(exp, params, task.name)
    if pretext.name == "grid_mask":
      out[task.name] = learnability_lib.grid_cell_quality(
          predict, images, pretext.hyperparams["grid"],
          fill=pretext.hyperparams["fill"], reference=reference,
          batch_size=batch_size)
    elif pretext.name in (learnability_lib.IMAGE_PRETEXTS
                          + learnability_lib.CLASS_PRETEXTS):
      out[task.name] = learnability_lib.pretext_quality(
          predict, images, pretext, views_lib.view_key(eval_key, task.view),
          reference=reference, batch_size=batch_size)
    else:
      out[task.name] = {"pretext": pretext.name, "skipped": (
          "mtl_jax.pretext.learnability cannot score this pretext")}
  return out


def analyse(workdir: str, *, step: int | None = None, num_images: int = 512,
            reference_batches: int = 8, out_dir: str | None = None,
            data_dir: str | None = None, batch_size: int = 256
            ) -> dict[str, Any]:
  """Scores every pretext head of the run in `workdir` (module docstring).

  Args:
    workdir: a train.py workdir with pretext tasks and a checkpoint.
    step: the checkpoint to score; None: the latest.
    num_images: held-out images, the first real rows of the eval stream.
    reference_batches: training batches averaged into the reference image.
    out_dir: where `learnability.json` and the PNGs go; None: `workdir`.
    data_dir: overrides the run's `config.data.data_dir`.
    batch_size: the most views per model call.

  Returns:
    The report written to `learnability.json`: `workdir`, `step`, `images`
    and `reference` (where they come from, how many), `tasks` (`{task:
    grid_cell_quality or pretext_quality result}`) and `heatmaps` (`{task:
    PNG file name}` for the grid_mask tasks).

  Raises:
    FileNotFoundError: no config.json, or no checkpoint, in `workdir`.
    ValueError: a run without pretext tasks, no checkpoint at `step`, or
      params that do not fit the run's model.
  """
  config = load_config(workdir, data_dir=data_dir)
  _check_has_pretexts(config, workdir)  # before any data is read
  exp = train.build_experiment(config)
  images = eval_images(exp, num_images)
  step, params = restore_params(exp, workdir, images[:1], step)
  reference, reference_count = train_mean(exp, reference_batches)
  tasks = score_tasks(exp, params, images, reference, batch_size=batch_size)
  out_dir = out_dir or workdir
  heatmaps = {}
  for name, result in tasks.items():
    if result.get("kind") == "grid_cell_quality":
      heatmaps[name] = HEATMAP_FILE.format(task=name)
      learnability_lib.plot_cell_heatmaps(
          result, os.path.join(out_dir, heatmaps[name]))
  report = {
      "workdir": os.path.abspath(workdir),
      "step": step,
      "images": {"source": "the eval stream's first real rows "
                           "(batch['valid'] == 1), in stream order",
                 "num_images": int(images.shape[0])},
      "reference": {"source": f"mean input of the first {reference_batches} "
                              "training batches from the train mixture's "
                              "initial state",
                    "num_images": reference_count},
      "pretext_key": f"views.view_key(PRNGKey({views_lib.EVAL_SEED}), "
                     "task.view), as the eval step",
      "tasks": tasks,
      "heatmaps": heatmaps,
  }
  learnability_lib.write_json(report, os.path.join(out_dir, JSON_FILE))
  return report


def _task_line(name: str, result: dict[str, Any]) -> str:
  if "skipped" in result:
    return f"  {name}: skipped ({result['skipped']})"
  if result.get("kind") == "grid_cell_quality":
    gains = np.asarray(result["gain_db"], np.float64)
    best, worst = result["ranking"][0], result["ranking"][-1]
    return (f"  {name} {result['grid'][0]}x{result['grid'][1]}: gain mean "
            f"{gains.mean():+.2f} dB; best cell {best['cell']} "
            f"{best['gain_db']:+.2f} dB, worst cell {worst['cell']} "
            f"{worst['gain_db']:+.2f} dB")
  if result["metric"] == "accuracy":
    return (f"  {name}: accuracy {result['model']['accuracy']:.3f} vs chance "
            f"{result['chance']:.3f} ({result['gain']:+.3f})")
  return (f"  {name}: PSNR {result['model']['psnr']:.2f} dB vs "
          f"{result['best_baseline']} {result['best_baseline_psnr']:.2f} dB "
          f"(gain {result['gain_db']:+.2f} dB)")


def format_summary(report: dict[str, Any]) -> str:
  """A few lines: one per pretext task, its gain over the best baseline."""
  lines = [f"{report['workdir']} step {report['step']}: "
           f"{report['images']['num_images']} held-out images"]
  lines += [_task_line(n, r) for n, r in report["tasks"].items()]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  if FLAGS["config"].present:
    raise app.UsageError("--config is not read: the run's config comes from "
                         "<workdir>/config.json (use --data_dir if the data "
                         "moved)")
  # Orbax logs every restore at INFO; keep the console for the summary.
  logging.get_absl_handler().addFilter(
      lambda record: "orbax" not in record.pathname)
  report = analyse(FLAGS.workdir, step=_STEP.value,
                   num_images=_NUM_IMAGES.value,
                   reference_batches=_REFERENCE_BATCHES.value,
                   out_dir=_OUT_DIR.value, data_dir=_DATA_DIR.value)
  print(format_summary(report))
  print("wrote", os.path.join(_OUT_DIR.value or FLAGS.workdir, JSON_FILE))


if __name__ == "__main__":
  app.run(main)
