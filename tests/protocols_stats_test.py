"""Tests of experiments/protocols/stats.py against numbers computed by hand."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from experiments.protocols import stats

# Student t quantiles t_{0.975, dof}, from tables (not recomputed with scipy).
T_975_DOF2 = 4.302652729749464
T_975_DOF3 = 3.182446305284263

KEYS = ["cls/accuracy", "depth/mae"]
BASELINES = {"cls/accuracy": 0.75, "depth/mae": 2.5}


def test_lower_is_better():
  assert stats.LOWER_IS_BETTER == frozenset({"loss", "mae", "rmse", "mse"})
  assert stats.lower_is_better("depth/mae")
  assert stats.lower_is_better("a/b/rmse")  # The part after the last "/".
  assert stats.lower_is_better("total/loss")
  assert not stats.lower_is_better("cls/accuracy")
  assert not stats.lower_is_better("img/psnr")
  assert not stats.lower_is_better("mae/f1")
  with pytest.raises(ValueError, match="'accuracy'"):
    stats.lower_is_better("accuracy")


def test_delta_m_two_tasks():
  # accuracy: (0.8 - 0.75) / 0.75 = +6.6667%; mae (lower is better):
  # -(2.0 - 2.5) / 2.5 = +20%; mean over T = 2: 13.3333%.
  metrics = {"cls/accuracy": 0.8, "depth/mae": 2.0, "other/f1": 0.1}
  assert stats.delta_m(metrics, BASELINES) == pytest.approx(
      (100 * 0.05 / 0.75 + 20.0) / 2)
  assert stats.delta_m(metrics, BASELINES) == pytest.approx(13.333333, abs=1e-5)
  # Worse on both: accuracy -10%, mae -(3.0 - 2.5) / 2.5 = -20% -> -15%.
  worse = {"cls/accuracy": 0.675, "depth/mae": 3.0}
  assert stats.delta_m(worse, BASELINES) == pytest.approx(-15.0)
  # Equal to the baselines: 0.
  assert stats.delta_m(BASELINES, BASELINES) == 0.0


def test_delta_m_errors():
  with pytest.raises(ValueError, match="depth/mae"):
    stats.delta_m({"cls/accuracy": 0.8}, BASELINES)
  with pytest.raises(ValueError, match="cls/accuracy"):
    stats.delta_m({"cls/accuracy": 0.8}, {"cls/accuracy": 0.0})


def test_mean_ci_four_values():
  # mean 2.5; s = sqrt(((1.5^2 + 0.5^2) * 2) / 3) = sqrt(5 / 3) = 1.2909944;
  # half-width = 3.182446305 * 1.2909944 / 2 = 2.0542603.
  mean, lower, upper = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
  assert mean == pytest.approx(2.5)
  half = T_975_DOF3 * 1.2909944487358056 / 2.0
  assert half == pytest.approx(2.0542603, abs=1e-7)
  assert lower == pytest.approx(2.5 - 2.0542603, abs=1e-7)
  assert upper == pytest.approx(2.5 + 2.0542603, abs=1e-7)


def test_mean_ci_other_confidence_is_narrower():
  _, lower95, upper95 = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
  _, lower90, upper90 = stats.mean_ci([1.0, 2.0, 3.0, 4.0], confidence=0.9)
  assert lower95 < lower90 < 2.5 < upper90 < upper95


def test_mean_ci_one_value_and_errors():
  mean, lower, upper = stats.mean_ci([3.5])
  assert mean == 3.5
  assert math.isnan(lower) and math.isnan(upper)
  with pytest.raises(ValueError):
    stats.mean_ci([])
  with pytest.raises(ValueError, match="2 NaN"):
    stats.mean_ci([1.0, float("nan"), 2.0, float("nan")])


def test_ranks_tie_direction_and_mean():
  scores = {
      "a": {"t/accuracy": 0.9, "t/mae": 1.0},
      "b": {"t/accuracy": 0.9, "t/mae": 2.0},
      "c": {"t/accuracy": 0.8, "t/mae": 0.5},
  }
  # accuracy (higher is better): a and b tie for 1st and 2nd -> 1.5, c 3.
  # mae (lower is better): c 1, a 2, b 3.
  # Means: a (1.5 + 2) / 2 = 1.75, b (1.5 + 3) / 2 = 2.25, c (3 + 1) / 2 = 2.
  assert stats.ranks(scores) == {"a": 1.75, "b": 2.25, "c": 2.0}
  accuracy_only = {m: {"t/accuracy": s["t/accuracy"]} for m, s in scores.items()}
  assert stats.ranks(accuracy_only) == {"a": 1.5, "b": 1.5, "c": 3.0}
  mae_only = {m: {"t/mae": s["t/mae"]} for m, s in scores.items()}
  assert stats.ranks(mae_only) == {"a": 2.0, "b": 3.0, "c": 1.0}


def test_ranks_three_way_tie_and_key_mismatch():
  tie = {m: {"t/f1": 0.5} for m in ("a", "b", "c")}
  assert stats.ranks(tie) == {"a": 2.0, "b": 2.0, "c": 2.0}
  with pytest.raises(ValueError, match="'b'.*t/mae"):
    stats.ranks({"a": {"t/f1": 0.5}, "b": {"t/f1": 0.4, "t/mae": 1.0}})


def test_rank_by():
  values = {"a": 5.0, "b": 5.0, "c": -1.0, "d": 7.0}
  assert stats.rank_by(values) == {"a": 2.5, "b": 2.5, "c": 4.0, "d": 1.0}
  assert stats.rank_by(values, higher_is_better=False) == {
      "a": 2.5, "b": 2.5, "c": 1.0, "d": 4.0}


def _runs():
  """Two methods x 3 seeds; "zeta" is better than "alpha" on both keys."""
  zeta = [(0.78, 2.0), (0.80, 2.1), (0.82, 1.9)]
  alpha = [(0.70, 2.4), (0.72, 2.6), (0.74, 2.5)]
  runs = []
  for method, values in (("alpha", alpha), ("zeta", zeta)):
    for seed, (acc, mae) in enumerate(values):
      runs.append({"method": method, "seed": seed,
                   "metrics": {"cls/accuracy": acc, "depth/mae": mae}})
  return runs


# Per-seed Δm (%), by hand: (accuracy change + mae improvement) / 2.
# zeta: (4 + 20) / 2 = 12, (6.6667 + 16) / 2 = 11.3333, (9.3333 + 24) / 2
#   = 16.6667; mean 40 / 3 = 13.3333.
# alpha: (-6.6667 + 4) / 2 = -1.3333, (-4 - 4) / 2 = -4, (-1.3333 + 0) / 2
#   = -0.6667; mean -2.
ZETA_DM = [12.0, 34.0 / 3, 50.0 / 3]
ALPHA_DM = [-4.0 / 3, -4.0, -2.0 / 3]


def _half(values, t=T_975_DOF2):
  """t * s / sqrt(n) with the hard-coded t quantile."""
  return t * np.std(values, ddof=1) / math.sqrt(len(values))


def test_summarize_two_methods_three_seeds():
  summary = stats.summarize(_runs(), BASELINES, KEYS)
  assert set(summary) == {"alpha", "zeta"}
  zeta, alpha = summary["zeta"], summary["alpha"]
  assert zeta["n"] == alpha["n"] == 3

  # zeta accuracy: mean 0.80, s = 0.02, half-width 4.3026527 * 0.02 / sqrt(3).
  acc = zeta["metrics"]["cls/accuracy"]
  assert acc["mean"] == pytest.approx(0.80)
  assert acc["upper"] - acc["mean"] == pytest.approx(
      T_975_DOF2 * 0.02 / math.sqrt(3))
  assert acc["mean"] - acc["lower"] == pytest.approx(0.0496827, abs=1e-7)
  assert zeta["metrics"]["depth/mae"]["mean"] == pytest.approx(2.0)
  assert zeta["metrics"]["depth/mae"]["upper"] == pytest.approx(
      2.0 + T_975_DOF2 * 0.1 / math.sqrt(3))
  assert alpha["metrics"]["cls/accuracy"]["mean"] == pytest.approx(0.72)
  assert alpha["metrics"]["depth/mae"]["mean"] == pytest.approx(2.5)

  assert zeta["delta_m"]["mean"] == pytest.approx(40.0 / 3)
  assert zeta["delta_m"]["upper"] == pytest.approx(
      40.0 / 3 + _half(ZETA_DM))
  assert alpha["delta_m"]["mean"] == pytest.approx(-2.0)
  assert alpha["delta_m"]["lower"] == pytest.approx(-2.0 - _half(ALPHA_DM))

  # zeta is first on both keys.
  assert zeta["rank"] == 1.0 and alpha["rank"] == 2.0


def test_summarize_without_baselines_and_errors():
  summary = stats.summarize(_runs(), None, KEYS)
  assert "delta_m" not in summary["zeta"]
  runs = _runs()
  with pytest.raises(ValueError, match="seed 0 twice"):
    stats.summarize(runs + [runs[0]], None, KEYS)
  with pytest.raises(ValueError, match="other/f1"):
    stats.summarize(runs, None, KEYS + ["other/f1"])


def test_to_markdown_rows_and_order():
  summary = stats.summarize(_runs(), BASELINES, KEYS)
  table = stats.to_markdown(summary, KEYS)
  lines = table.splitlines()
  assert lines[0] == "| method | n | cls/accuracy | depth/mae | Δm% | rank |"
  assert len(lines) == 4
  # zeta (rank 1) before alpha (rank 2), though alpha comes first in the runs.
  # zeta half-widths: accuracy 0.0496827, mae 4.3026527 * 0.1 / sqrt(3)
  # = 0.2484137, Δm: s = sqrt(((-4/3)^2 + 2^2 + (10/3)^2) / 2) = 2.9059326,
  # half-width 7.2187...
  assert _half(ZETA_DM) == pytest.approx(7.21873, abs=1e-5)
  assert lines[2] == (
      "| zeta | 3 | 0.8000 ± 0.0497 | 2.0000 ± 0.2484 | 13.3333 ± 7.2187 "
      "| 1.00 |")
  assert lines[3].startswith("| alpha | 3 | 0.7200 ± 0.0497 | 2.5000 ± 0.2484 "
                             "| -2.0000 ± ")
  assert lines[3].endswith(" | 2.00 |")


def test_to_markdown_one_seed_is_mean_only():
  runs = [{"method": "solo", "seed": 0,
           "metrics": {"cls/accuracy": 0.8, "depth/mae": 2.0}}]
  table = stats.to_markdown(stats.summarize(runs, None, KEYS), KEYS)
  assert table.splitlines()[0] == "| method | n | cls/accuracy | depth/mae | rank |"
  assert table.splitlines()[2] == "| solo | 1 | 0.8000 | 2.0000 | 1.00 |"


def test_to_csv_round_trip(tmp_path):
  summary = stats.summarize(_runs(), BASELINES, KEYS)
  path = tmp_path / "summary.csv"
  stats.to_csv(summary, KEYS, str(path))
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    rows = list(reader)
    fields = reader.fieldnames
  assert fields == [
      "method", "n",
      "cls/accuracy_mean", "cls/accuracy_lower", "cls/accuracy_upper",
      "depth/mae_mean", "depth/mae_lower", "depth/mae_upper",
      "delta_m_mean", "delta_m_lower", "delta_m_upper", "rank"]
  assert [r["method"] for r in rows] == ["zeta", "alpha"]
  zeta, alpha = rows
  assert int(zeta["n"]) == 3
  assert float(zeta["cls/accuracy_mean"]) == pytest.approx(0.80)
  assert float(zeta["cls/accuracy_lower"]) == pytest.approx(0.80 - 0.0496827,
                                                            abs=1e-7)
  assert float(zeta["delta_m_mean"]) == pytest.approx(40.0 / 3)
  assert float(alpha["depth/mae_mean"]) == pytest.approx(2.5)
  assert float(alpha["delta_m_mean"]) == pytest.approx(-2.0)
  assert float(alpha["rank"]) == 2.0
  # Without baselines: no Δm columns.
  stats.to_csv(stats.summarize(_runs(), None, KEYS), KEYS, str(path))
  with open(path, newline="") as f:
    assert "delta_m_mean" not in csv.DictReader(f).fieldnames
