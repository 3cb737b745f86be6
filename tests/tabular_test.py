"""experiments/tabular.py: the problems, the masking, the summary, a tiny run."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from experiments import tabular


def test_hide_rate_and_at_least_two_values_per_target():
  rng = np.random.default_rng(0)
  Y = rng.normal(size=(4000, 3))
  hidden = np.isnan(tabular.hide(Y, 0.6, rng))
  np.testing.assert_allclose(hidden.mean(axis=0), 0.6, atol=0.03)
  assert not np.isnan(tabular.hide(Y, 0.0, rng)).any()
  # 90% of 10 rows: a column could lose every value; two always stay.
  for seed in range(20):
    few = tabular.hide(Y[:10], 0.9, np.random.default_rng(seed))
    assert np.all((~np.isnan(few)).sum(axis=0) >= 2)
    kept = ~np.isnan(few)
    np.testing.assert_array_equal(few[kept], Y[:10][kept])


def test_gradnorm_problem_scales_and_shared_structure():
  X, Y, sigmas = tabular.gradnorm_problem(500, seed=0)
  assert X.shape == (500, 250) and Y.shape == (500, 8)
  np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(sigmas, np.logspace(0, 2, 8))
  assert np.all(np.abs(Y) <= sigmas)
  # y_i / sigma_i are tanh of correlated projections: the tasks share b.
  z = np.arctanh(np.clip(Y / sigmas, -1 + 1e-12, 1 - 1e-12))
  corr = np.corrcoef(z.T)[np.triu_indices(8, 1)]
  assert corr.min() > 0.5


def test_summary_means_targets_then_seeds_with_a_t_interval():
  records = [
      dict(problem="p", method="m", missing=0.3, seed=0, scores=[0.5, 0.7],
           fit_seconds=1.0),
      dict(problem="p", method="m", missing=0.3, seed=1, scores=[0.8, 0.8],
           fit_seconds=3.0),
      dict(problem="p", method="chain", missing=0.3, seed=0, scores=None,
           fit_seconds=math.nan),
      dict(problem="p", method="chain", missing=0.3, seed=1, scores=[0.1, 0.3],
           fit_seconds=2.0),
  ]
  rows = {r["method"]: r for r in tabular.summarize(records)}
  m = rows["m"]
  assert m["score"] == pytest.approx(0.7)  # seeds' means 0.6 and 0.8
  # t_{0.975, 1} = 12.7062; s = 0.1414; half = 12.7062 * 0.1414 / sqrt(2)
  assert m["ci_high"] - m["score"] == pytest.approx(12.7062 * 0.1, rel=1e-4)
  assert m["fit_seconds"] == 2.0 and m["per_target"] == pytest.approx(
      [0.65, 0.75])
  assert m["per_target_ci"][1][0] == pytest.approx(0.75)
  assert m["per_target_ci"][1][2] - 0.75 == pytest.approx(12.7062 * 0.05,
                                                          rel=1e-4)
  assert rows["chain"]["fitted"] == 1 and rows["chain"]["seeds"] == 2
  assert "| m | 30% | 0.650 ± 1.906 | 0.750 ± 0.635 |" in (
      tabular.per_target_markdown(tabular.summarize(records)))
  table = tabular.to_markdown(tabular.summarize(records))
  assert "| chain | 0.200 (1/2 seeds) | 2.00 |" in table
  assert "| m | 0.700 ± 1.271 | 2.00 |" in table


def test_tiny_run_writes_outputs_and_a_rerun_fits_nothing(tmp_path,
                                                          monkeypatch):
  # Boosting's per-target fits (thread start-up) are the slowest part here;
  # PerTarget is covered by ridge.
  monkeypatch.setattr(tabular, "HGB_PROBLEMS", ())
  rows = tabular.run(["linnerud"], [0.6], num_seeds=1, max_epochs=3,
                     out_dir=str(tmp_path))
  methods = {r["method"] for r in rows}
  assert methods == {"mtl", "ridge", "chain", "mlp"}
  by = {r["method"]: r for r in rows}
  # 60% of 3 targets missing on 16 training rows: the joint fits have fewer
  # than MIN_COMPLETE_ROWS complete rows in some fold.
  assert by["ridge"]["fitted"] == 1 and len(by["ridge"]["per_target"]) == 3
  for name in ("results.md", "results.csv", "summary.json", "fits.jsonl",
               "per_target.md"):
    assert os.path.getsize(tmp_path / name) > 0
  assert os.path.getsize(tmp_path / "tabular.png") > 10_000
  with open(tmp_path / "fits.jsonl") as f:
    lines = [json.loads(l) for l in f]
  assert len(lines) == 4

  def fail(*args, **kwargs):
    raise AssertionError("a finished setting was fitted again")

  monkeypatch.setattr(tabular, "run_setting", fail)
  again = tabular.run(["linnerud"], [0.6], num_seeds=1, max_epochs=3,
                      out_dir=str(tmp_path))
  assert again == rows
  with pytest.raises(ValueError, match="unknown problem 'iris'"):
    tabular.run(["iris"], [0.0], 1, 3, str(tmp_path))


def test_weight_study_reports_weights_and_the_uncertainty_equilibrium(
    tmp_path, monkeypatch):
  # GradNorm's weights summing to K are tested in sklearn_test; here its slot
  # runs equal weights (one program less to compile).
  monkeypatch.setitem(tabular.WEIGHT_METHODS, "mtl_gradnorm_raw",
                      ("equal", None))
  summary = tabular.weight_study(str(tmp_path), num_seeds=1, epochs=2, n=64,
                                 dim=8)
  u = summary["mtl_uncertainty_raw"]
  np.testing.assert_allclose(
      u["w_times_2L_mean"],
      2 * np.array(u["final_mean"]) * np.array(u["final_loss_mean"]))
  assert summary["mtl_raw"]["final_mean"] == [1.0] * 8  # equal weights
  u_w = np.array(u["final_mean"])
  # w = 0.5 exp(-s), s from 0: the sigma=100 task's loss >> 1 raises its s.
  assert u["final_loss_mean"][-1] > 100 and 0 < u_w[-1] < 0.5
  assert u_w[-1] < u_w[0]
  with open(tmp_path / "gradnorm_weights.md") as f:
    table = f.read()
  assert table.count("\n| y") == 8 and "| y7 | 100.0 |" in table
  assert os.path.getsize(tmp_path / "gradnorm_weights.png") > 10_000
