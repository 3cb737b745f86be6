"""Warm-up defaults that fit any run length, and extending a run's schedule.

- The default config (`warmup_cosine`, `warmup_steps=-1`: min(100,
  num_steps // 10)) builds for a 30-step run; an explicit warm-up that does
  not fit names both config fields.
- A run's schedule is fixed when it starts (one cycle over its num_steps);
  extending it with a larger num_steps keeps every earlier step's learning
  rate and adds a new warm-up + cosine cycle over the added steps, recorded
  in the checkpoints (`loop.schedule_horizons`). End to end: a 30-step run
  with the defaults, then extended to 40 steps; the logged learning rates are
  the documented ones.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import train
from experiments.configs import multi_digits as md_config
from mtl_jax.training import checkpoint as checkpoint_lib
from mtl_jax.training import checks
from mtl_jax.training import loop
from mtl_jax.training import optim

LR = 2e-3  # the default config's peak learning rate


def _lrs(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


def test_default_warmup_fits_a_30_step_run():
  config = md_config.get_config()
  assert config.optimizer.warmup_steps == optim.AUTO_WARMUP
  assert config.optimizer.schedule == "warmup_cosine"
  assert config.optimizer.learning_rate == LR
  config.num_steps = 30
  schedule = train.check_config(config).schedule
  # 3 warm-up steps (30 // 10), then cosine from the peak to 0 at step 30.
  np.testing.assert_allclose(_lrs(schedule, [0, 1, 2, 3]),
                             [0.0, LR / 3, 2 * LR / 3, LR], rtol=1e-6)
  mid = 3 + 27 / 2  # half-way through the decay: half the peak
  np.testing.assert_allclose(float(schedule(mid)), LR / 2, rtol=1e-5)
  assert float(schedule(30)) == pytest.approx(0.0, abs=1e-12)
  # The default 3000-step run keeps its 100 warm-up steps.
  assert optim.auto_warmup_steps(3000) == 100
  assert optim.auto_warmup_steps(30) == 3 and optim.auto_warmup_steps(5) == 0


def test_an_explicit_warmup_that_does_not_fit_names_the_fields():
  config = md_config.get_config()
  config.num_steps = 30
  config.optimizer.warmup_steps = 100
  with pytest.raises(ValueError, match=(
      r"^config\.optimizer\.warmup_steps=100 must be < config\.num_steps=30; "
      r"lower config\.optimizer\.warmup_steps, or set it to -1 \(automatic: "
      r"min\(100, steps // 10\)\)$")):
    train.check_config(config)
  config.optimizer.warmup_steps = -2
  with pytest.raises(ValueError, match=r"^config\.optimizer\.warmup_steps "
                     r"must be >= 0 \(or -1: automatic\), got -2$"):
    train.check_config(config)
  # Extending by fewer steps than an explicit warm-up: named too.
  with pytest.raises(ValueError, match=(
      r"^config\.optimizer\.warmup_steps=15 must be < the 10 steps added "
      r"when config\.num_steps was extended from 40 to 50 \(a new warm-up \+ "
      r"cosine cycle\)")):
    checks.build_optimizer("adam", LR, schedule="warmup_cosine",
                           total_steps=50, warmup_steps=15, horizons=[40],
                           prefix="config.optimizer.",
                           steps_field="config.num_steps")


def test_extension_keeps_earlier_rates_and_adds_a_cycle():
  first = optim.make_schedule("warmup_cosine", 1.0, total_steps=40,
                              warmup_steps=-1)
  extended = optim.make_schedule("warmup_cosine", 1.0, total_steps=60,
                                 warmup_steps=-1, horizons=[40])
  added = optim.make_schedule("warmup_cosine", 1.0, total_steps=20,
                              warmup_steps=-1)
  np.testing.assert_array_equal(_lrs(extended, range(40)),
                                _lrs(first, range(40)))
  np.testing.assert_array_equal(_lrs(extended, range(40, 61)),
                                _lrs(added, range(21)))
  # Across the extension point: the first cycle (4 warm-up steps, then
  # 0.5 * (1 + cos(pi * (s - 4) / 36))) ends near 0, the new one
  # warms up for 2 steps (20 // 10) to the peak, then decays to 0 at 60.
  np.testing.assert_allclose(_lrs(extended, [38, 39, 40, 41, 42, 51, 60]),
                             [0.0075961, 0.0019027, 0.0, 0.5, 1.0, 0.5, 0.0],
                             atol=1e-6)
  # Same or fewer steps: the recorded cycles stay (a shortened run stops
  # early); more: a cycle over the added steps.
  assert optim.extend_horizons([], 40) == [40]
  assert optim.extend_horizons([40], 40) == [40]
  assert optim.extend_horizons([40], 30) == [40]
  assert optim.extend_horizons([40], 60) == [40, 60]
  assert optim.extend_horizons([40, 60], 100) == [40, 60, 100]
  shortened = optim.make_schedule("cosine", 1.0, total_steps=30,
                                  horizons=[40])
  np.testing.assert_array_equal(_lrs(shortened, range(31)), _lrs(
      optim.make_schedule("cosine", 1.0, total_steps=40), range(31)))
  with pytest.raises(ValueError, match=r"increasing positive step counts"):
    optim.extend_horizons([40, 40], 60)


def test_a_run_extended_from_30_to_40_steps(small_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = md_config.get_config()  # the default schedule and warm-up
  config.data.data_dir = small_data_dir
  config.data.options.builder_config = "small"
  config.model.trunk = "mlp"
  config.model.hidden_sizes = (16,)
  config.tasks = "left"  # one head: the cheapest step to compile
  config.model.head_hidden_sizes = ()
  config.batch_size = 16
  config.eval_batch_size = 256
  config.num_steps = 30
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = 0
  results = train.run(config, workdir)
  assert results["steps"] == 30
  config.num_steps = 40
  assert train.run(config, workdir)["steps"] == 40
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    assert ckpt.metadata(30)[loop.HORIZONS_KEY] == [30]
    assert ckpt.metadata(40)[loop.HORIZONS_KEY] == [30, 40]
  finally:
    ckpt.close()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = {r["step"]: r["learning_rate"] for r in map(json.loads, f)
              if r["split"] == "train"}
  assert sorted(logged) == list(range(1, 41))
  expected = optim.make_schedule("warmup_cosine", LR, total_steps=40,
                                 warmup_steps=-1, horizons=[30])
  # The record of step s (1-based) is the rate step s-1 trained with.
  np.testing.assert_allclose([logged[s] for s in range(1, 41)],
                             _lrs(expected, range(40)), rtol=1e-5, atol=1e-9)
  # 29: the first cycle's last step; 30: the new cycle's warm-up starts at 0
  # (1 warm-up step for 10 added steps); 31: the peak.
  np.testing.assert_allclose([logged[30], logged[31], logged[32]],
                             [float(expected(29)), 0.0, LR], rtol=1e-5)
