"""A killed or pre-empted `python -m experiments.train` resumes exactly.

Each test interrupts a small run once it has committed a checkpoint at step 20
or later, runs the same command again, and compares the results and the final
params with one uninterrupted run. The runs train a k-means clustering task
too (refitted every 7 steps), so its centroids and feature bank resume
exactly. That run also shows that the command
line's overrides become the run's config.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mtl_jax.training import checkpoint as checkpoint_lib

# Both tests compare with the same uninterrupted run: one xdist worker runs
# them (`make test` runs `--dist loadgroup`), so it is made once.
pytestmark = pytest.mark.xdist_group("resume_uninterrupted")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 60
CHECKPOINT_EVERY = 10
INTERRUPT_AFTER = 20  # signal once a checkpoint of this step or later exists


@pytest.fixture(scope="module")
def env():
  """One device; compiled programs are cached across the runs (the
  session's compilation cache, tests/conftest.py)."""
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=os.environ.get("MTL_JAX_TEST_XLA_FLAGS", ""))


def _command(workdir, data_dir):
  return [sys.executable, "-m", "experiments.train", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}",
          "--config.data.options.builder_config=small",
          "--config.model.trunk=mlp", "--config.model.hidden_sizes=(32,)",
          "--config.model.head_hidden_sizes=()",
          "--config.model.dropout_rate=0.2",  # the train rng matters
          "--config.batch_size=32", "--config.eval_batch_size=256",
          f"--config.num_steps={NUM_STEPS}", "--config.log_every=10",
          "--config.eval_every=0",
          f"--config.checkpoint_every={CHECKPOINT_EVERY}",
          "--config.optimizer.schedule=constant",
          # An unsupervised task with state across steps: k-means
          # pseudo-labels refitted every 7 steps from a feature bank (state
          # in the checkpoint), on the labelled rows and the pool.
          "--config.data.drop_unlabelled=False",
          "--config.pretext.names=cluster",
          "--config.pretext.cluster.num_clusters=4",
          "--config.pretext.cluster.every=7",
          "--config.pretext.cluster.bank_size=64"]


def _run_to_end(command, env):
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def _committed_steps(workdir):
  """Steps of the committed checkpoints (orbax renames a save when done)."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def _interrupt(command, env, workdir, sig):
  """Starts the run and sends `sig` once step >= INTERRUPT_AFTER is saved.

  Returns:
    `(returncode, output, steps)`: `steps` are the committed checkpoints seen
    when the signal went; None if the run ended first.
  """
  log_path = workdir + ".log"
  steps = None
  with open(log_path, "w") as log:
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 240
      while proc.poll() is None and time.monotonic() < deadline:
        seen = _committed_steps(workdir)
        if seen and seen[-1] >= INTERRUPT_AFTER:
          os.kill(proc.pid, sig)
          steps = seen
          break
        time.sleep(0.005)
      proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  with open(log_path) as f:
    return proc.returncode, f.read(), steps


def _final_params(workdir):
  """The final checkpoint's params and task state (the clustering's
  centroids, feature bank and assignments)."""
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state = ckpt.read()
    return {"params": state["params"], "task_state": state["task_state"]}
  finally:
    ckpt.close()


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


class _Background:
  """A run to completion in a subprocess; `get()` waits for its outcome."""

  def __init__(self, workdir, command, env):
    self.workdir = workdir
    self._log = open(workdir + ".log", "w")
    self._proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._log,
                                  stderr=subprocess.STDOUT)
    self._outcome = None

  def get(self):
    """`(results, final params)` of the finished run."""
    if self._outcome is None:
      try:
        self._proc.wait(timeout=300)
      finally:
        self.close()
      with open(self.workdir + ".log") as f:
        assert self._proc.returncode == 0, f.read()[-3000:]
      self._outcome = _results(self.workdir), _final_params(self.workdir)
    return self._outcome

  def close(self):
    if self._proc.poll() is None:
      self._proc.kill()
      self._proc.wait()
    self._log.close()


@pytest.fixture(scope="module")
def uninterrupted(small_data_dir, tmp_path_factory, env):
  """The reference run; it runs alongside the first test's interrupted run."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  run = _Background(workdir, _command(workdir, small_data_dir), env)
  yield run
  run.close()


def _assert_same_as(workdir, uninterrupted):
  reference, ref_params = uninterrupted.get()
  results = _results(workdir)
  assert results["steps"] == NUM_STEPS
  assert set(results["eval"]) == set(reference["eval"])
  for key, value in reference["eval"].items():
    assert results["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
  params = _final_params(workdir)
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # k-means ran at steps 7, 14, ..., 56 in both runs: 8 fits.
  assert int(np.asarray(
      params["task_state"]["cluster"]["kmeans"]["num_fits"])) == 8


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_uninterrupted(
    small_data_dir, tmp_path, env, uninterrupted):
  for attempt in range(3):  # retried only if the run ended before the kill
    workdir = str(tmp_path / f"run{attempt}")
    command = _command(workdir, small_data_dir)
    returncode, output, steps = _interrupt(command, env, workdir,
                                           signal.SIGKILL)
    if steps is not None and returncode == -signal.SIGKILL and (
        _committed_steps(workdir)[-1] < NUM_STEPS):
      break
    assert returncode in (0, -signal.SIGKILL), output[-3000:]
  else:
    pytest.fail("every run finished before it could be killed")
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  killed_at = _committed_steps(workdir)[-1]

  output = _run_to_end(command, env)
  resumed = int(re.search(r"resumed from checkpoint at step (\d+)",
                          output).group(1))
  assert INTERRUPT_AFTER <= resumed == killed_at < NUM_STEPS
  _assert_same_as(workdir, uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_the_reached_step_exits_143_and_resumes(
    small_data_dir, tmp_path, env, uninterrupted):
  for attempt in range(3):  # retried only if the run ended before the signal
    workdir = str(tmp_path / f"run{attempt}")
    command = _command(workdir, small_data_dir)
    returncode, output, steps = _interrupt(command, env, workdir,
                                           signal.SIGTERM)
    if returncode == 143:
      break
    # After the loop the default handler is back: SIGTERM just ends it.
    assert returncode in (0, -signal.SIGTERM), output[-3000:]
    assert _committed_steps(workdir)[-1] == NUM_STEPS, output[-3000:]
  else:
    pytest.fail("every run finished before it got SIGTERM")
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  saved = int(re.search(r"preempted \(SIGTERM\): saved a checkpoint at step "
                        r"(\d+)", output).group(1))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(l)["step"] for l in f if l.strip()]
  last_periodic = max(s for s in _committed_steps(workdir)
                      if s % CHECKPOINT_EVERY == 0)
  # The checkpoint is of the step the run reached, not the last periodic one.
  assert INTERRUPT_AFTER <= saved < NUM_STEPS
  assert saved >= max(logged) and saved >= last_periodic
  assert saved == max(logged) or saved > last_periodic or (
      saved == last_periodic and saved % CHECKPOINT_EVERY == 0)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    assert ckpt.latest_step() == saved
    assert int(ckpt.read()["step"]) == saved
    data_state = ckpt.data_state(saved)
    assert data_state is not None and data_state["step"] == saved
  finally:
    ckpt.close()

  output = _run_to_end(command, env)
  assert f"resumed from checkpoint at step {saved}" in output
  _assert_same_as(workdir, uninterrupted)


@pytest.mark.slow
def test_command_line_overrides_are_the_runs_config(uninterrupted):
  """The uninterrupted run is a plain command line: its `--config.<field>`
  overrides are the run's config, and process 0 logs its progress."""
  results, _ = uninterrupted.get()
  assert results["steps"] == NUM_STEPS
  with open(os.path.join(uninterrupted.workdir, "config.json")) as f:
    saved = json.load(f)
  # Every one differs from experiments/configs/multi_digits.py.
  assert saved["data"]["options"]["builder_config"] == "small"
  assert saved["model"]["trunk"] == "mlp"
  assert saved["model"]["hidden_sizes"] == [32]
  assert saved["model"]["head_hidden_sizes"] == []
  assert saved["model"]["dropout_rate"] == 0.2
  assert saved["batch_size"] == 32 and saved["num_steps"] == NUM_STEPS
  assert saved["optimizer"]["schedule"] == "constant"
  with open(uninterrupted.workdir + ".log") as f:
    log = f.read()
  assert "steps/s" in log and "ETA" in log
