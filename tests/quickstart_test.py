"""The README's "Library quick-start" runs as written, and the public API exists.

The snippet is read from README.md (the first ```python block under the
"Library quick-start" heading) and executed once; one test then checks its
printed losses, its evaluation and its step on a batch with an absent task
(one test, not three sharing a fixture, so that pytest-xdist never runs the
snippet twice).
"""

import ast
import contextlib
import io
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import mtl_jax as mtl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADING = "## Library quick-start"


def _snippet() -> str:
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert readme.count(HEADING) == 1, f"README.md needs one {HEADING!r} section"
  section = readme.split(HEADING, 1)[1].split("\n## ", 1)[0]
  match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
  assert match, f"no ```python block under {HEADING!r}"
  return match.group(1)


def _run_quickstart():
  """Runs the snippet; returns its namespace and its printed lines."""
  namespace = {"__name__": "quickstart"}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(_snippet(), "README.md:quick-start", "exec"), namespace)  # pylint: disable=exec-used
  return namespace, out.getvalue().splitlines()


def _check_falling_train_losses(lines):
  progress = {}
  for line in lines[:-1]:
    step, losses = line.split(" ", 1)
    progress[int(step)] = ast.literal_eval(losses)
  assert sorted(progress) == [0, 100, 200, 300], lines
  for task in ("sign", "positive", "norm"):
    first, last = progress[0][task], progress[300][task]
    assert np.isfinite(first) and last < 0.5 * first, (task, progress)


def _check_per_task_metrics(ns, lines):
  printed = ast.literal_eval(lines[-1])
  # Counts are the labelled test rows of each task, whatever the padding.
  test_masks = {t: m[1500:] for t, m in ns["arrays"]["masks"].items()}
  for task, mask in test_masks.items():
    assert printed[f"{task}/count"] == mask.sum() > 0
  assert printed["sign/accuracy"] > 0.85
  assert printed["positive/f1"] > 0.8
  assert printed["norm/mae"] < 0.5
  # Training lowered every task's held-out loss (the initial params are kept).
  tasks = ns["tasks"]
  before = ns["evaluate"](ns["params"])
  for task in tasks.names:
    assert printed[f"{task}/loss"] < 0.5 * before[f"{task}/loss"], task


def _check_absent_task(ns):
  batch = next(ns["batches"])
  batch["masks"]["norm"] = np.zeros_like(batch["masks"]["norm"])
  state, m = ns["step"](ns["state"], batch)
  assert float(m["norm/count"]) == 0.0 and float(m["norm/loss"]) == 0.0
  assert float(m["sign/count"]) > 0 and float(m["positive/count"]) > 0
  assert np.isfinite(float(m["loss"]))
  assert int(state.step) == int(ns["state"].step) + 1
  assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(state.params))


def test_readme_quickstart_runs_and_learns():
  ns, lines = _run_quickstart()
  _check_falling_train_losses(lines)
  _check_per_task_metrics(ns, lines)
  _check_absent_task(ns)


def test_public_api_names():
  # The subpackages, with the modules the quick-start relies on.
  assert mtl.aggregation.get_aggregator is mtl.get_aggregator
  assert mtl.weighting.get_weighting is mtl.get_weighting
  assert mtl.training.step.make_train_step is mtl.make_train_step
  assert mtl.training.step.make_eval_step is mtl.make_eval_step
  assert mtl.training.state.create_train_state is mtl.create_train_state
  assert mtl.training.state.init_params is mtl.init_params
  assert mtl.training.guard.skip_nonfinite is mtl.skip_nonfinite
  assert mtl.models.build.make_model is mtl.make_model
  assert mtl.tasks.TaskSet is mtl.TaskSet
  from mtl_jax.data import mixture, sources  # pylint: disable=g-import-not-at-top
  assert mtl.data.mixture is mixture and mtl.Mixture is mixture.Mixture
  assert mtl.EvalStream is mixture.EvalStream
  assert mtl.array_component is mixture.array_component
  assert mtl.ArraySource is sources.ArraySource
  assert callable(mtl.losses.get_loss) and callable(mtl.metrics.get_metric)
  assert "upgrad" in mtl.AGGREGATORS and "equal" in mtl.WEIGHTINGS
  assert "hard_sharing" in mtl.ARCHITECTURES and "mlp" in mtl.TRUNKS
  assert mtl.pretext.pretext_task is mtl.pretext_task
  assert mtl.pretext.cluster.cluster_task is mtl.cluster_task
  assert "grid_mask" in mtl.PRETEXTS
  assert mtl.transfer.merge_params is mtl.merge_params
  for name in mtl.__all__:
    assert getattr(mtl, name) is not None, name
  assert set(mtl.__all__) <= set(dir(mtl))
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    mtl.nope  # pylint: disable=pointless-statement


@pytest.mark.slow  # launches a process
def test_import_does_not_load_tfds_or_matplotlib():
  """`import mtl_jax` costs JAX, Flax and optax; data is loaded on first use,
  as a top-level name or as a submodule attribute (`mtl.data.mixture`)."""
  code = ("import sys, mtl_jax as mtl\n"
          "heavy = ('tensorflow_datasets', 'tensorflow', 'matplotlib', 'orbax')\n"
          "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
          "mixture = mtl.data.mixture\n"
          "print('tensorflow_datasets' in sys.modules)\n"
          "print(mixture.Mixture is mtl.Mixture)\n")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                       capture_output=True, text=True, check=True, timeout=120)
  assert out.stdout.split("\n")[:3] == ["[]", "True", "True"], (
      out.stdout + out.stderr)

