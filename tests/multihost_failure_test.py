"""A process that dies makes the others of a multi-process run exit, not hang."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

# Launches processes and kills one: run with `make test`, skipped by
# `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_survivor_exits_with_an_error_when_a_process_is_killed(
    small_data_dir, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("MTL_JAX_TEST_XLA_FLAGS", "") +
      " --xla_force_host_platform_device_count=1").strip())
  port = _free_port()
  args = [sys.executable, "-m", "experiments.train",
          f"--workdir={tmp_path / 'run'}",
          f"--config.data.data_dir={small_data_dir}",
          "--config.data.options.builder_config=small",
          "--config.model.trunk=mlp", "--config.model.hidden_sizes=(16,)",
          "--config.batch_size=32", "--config.num_steps=1000000",
          "--config.log_every=20", "--config.eval_every=0",
          "--config.checkpoint_every=0",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          "--heartbeat_timeout=5"]
  logs = [open(tmp_path / f"log{i}.txt", "w+") for i in range(2)]
  procs = [subprocess.Popen(args + [f"--process_id={i}"], cwd=REPO, env=env,
                            stdout=logs[i], stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    deadline = time.time() + 180
    while "steps/s" not in (tmp_path / "log0.txt").read_text():
      assert time.time() < deadline, (tmp_path / "log0.txt").read_text()[-3000:]
      assert procs[0].poll() is None, (tmp_path / "log0.txt").read_text()[-3000:]
      time.sleep(0.5)
    os.kill(procs[1].pid, signal.SIGKILL)  # training is under way
    killed_at = time.time()
    returncode = procs[0].wait(timeout=120)  # a hang fails here
    waited = time.time() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for f in logs:
      f.close()
  out = (tmp_path / "log0.txt").read_text()
  assert returncode != 0, out[-3000:]
  # The error says what happened: the peer's connection or heartbeat is gone.
  assert ("Connection reset by peer" in out or "heartbeat timeout" in out
          or "Connection closed by peer" in out), out[-3000:]
  assert waited < 120
