r"""Statistics of multi-task results over seeds and methods (pure numpy).

Metric keys are "<task>/<metric>", e.g. "depth/mae" or "segmentation/miou".
The metric name (the part after the last "/") decides the direction: lower is
better for the names of `LOWER_IS_BETTER` ("loss", "mae", "rmse", "mse"),
higher is better for every other name (accuracy, f1, psnr, ...).

Multi-task performance change (Maninis et al. 2019, "Attentive
Single-Tasking of Multiple Tasks", CVPR; Vandenhende et al. 2021, "Multi-Task
Learning for Dense Prediction Tasks: A Survey", TPAMI), in percent, over the T
keys of the baselines (usually the single-task models):

  Δm = 100 / T * Σ_i (-1)^{l_i} (M_i - B_i) / B_i,

with M_i the multi-task model's metric, B_i the baseline's and l_i = 1 when
lower is better for key i (0 otherwise), so that Δm > 0 means better than the
baselines on average.

Confidence interval of the mean over n seeds (Student t):

  mean ± t_{(1+c)/2, n-1} * s / sqrt(n),

with s the sample standard deviation (ddof = 1) and c the confidence level.

Ranks: for each key the methods are ranked 1 (best) to m, ties get the average
of the ranks they span (scipy.stats.rankdata's "average"), and a method's rank
is its mean rank over the keys.
"""

from __future__ import annotations

import csv
import math
from typing import Any, Mapping, Sequence

import numpy as np

try:
  from scipy import stats as _scipy_stats
except ImportError:  # pragma: no cover - scipy comes with scikit-learn.
  _scipy_stats = None

LOWER_IS_BETTER = frozenset({"loss", "mae", "rmse", "mse"})


def lower_is_better(key: str) -> bool:
  """Whether lower values are better for a metric key.

  Args:
    key: "<task>/<metric>"; the metric is the part after the last "/".

  Returns:
    True if the metric name is in `LOWER_IS_BETTER`, False otherwise.

  Raises:
    ValueError: if the key has no "/".
  """
  if "/" not in key:
    raise ValueError(f"Metric key {key!r} is not of the form '<task>/<metric>'.")
  return key.rsplit("/", 1)[1] in LOWER_IS_BETTER


def delta_m(metrics: Mapping[str, float], baselines: Mapping[str, float]) -> float:
  """Multi-task performance change Δm in percent (Maninis et al. 2019).

  Δm = 100 / T * Σ_i (-1)^{l_i} (M_i - B_i) / B_i over the T keys of
  `baselines`, l_i = 1 if lower is better for key i. Keys of `metrics` that
  are not in `baselines` are ignored.

  Args:
    metrics: {"<task>/<metric>": value} of the model.
    baselines: {"<task>/<metric>": value} of the baselines.

  Returns:
    Δm in percent; positive means better than the baselines.

  Raises:
    ValueError: if `baselines` is empty, a baseline key is missing from
      `metrics`, or a baseline is 0.
  """
  if not baselines:
    raise ValueError("delta_m needs at least one baseline.")
  missing = sorted(k for k in baselines if k not in metrics)
  if missing:
    raise ValueError(f"Metrics lack the baseline keys {missing}.")
  total = 0.0
  for key, base in baselines.items():
    base = float(base)
    if base == 0.0:
      raise ValueError(f"Baseline of {key!r} is 0; Δm divides by it.")
    change = (float(metrics[key]) - base) / base
    total += -change if lower_is_better(key) else change
  return 100.0 * total / len(baselines)


def _t_quantile(q: float, dof: int) -> float:
  """Quantile q of the Student t distribution with `dof` degrees of freedom."""
  if _scipy_stats is None:  # pragma: no cover
    raise ImportError("mean_ci needs scipy for the Student t quantile.")
  return float(_scipy_stats.t.ppf(q, dof))


def mean_ci(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
  """Mean and Student-t confidence interval of the mean over seeds.

  mean ± t_{(1+c)/2, n-1} * s / sqrt(n), s the sample standard deviation
  (ddof = 1).

  Args:
    values: one value per seed.
    confidence: the confidence level c, in (0, 1).

  Returns:
    (mean, lower, upper); lower and upper are nan when there is one value.

  Raises:
    ValueError: if there are no values, some are NaN, or the confidence is
      not in (0, 1).
  """
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
  x = np.asarray(values, dtype=np.float64).reshape(-1)
  n = x.size
  if n == 0:
    raise ValueError("mean_ci needs at least one value.")
  num_nan = int(np.isnan(x).sum())
  if num_nan:
    raise ValueError(f"mean_ci got {num_nan} NaN value(s) out of {n}.")
  mean = float(x.mean())
  if n == 1:
    return mean, math.nan, math.nan
  s = float(x.std(ddof=1))
  half = _t_quantile((1.0 + confidence) / 2.0, n - 1) * s / math.sqrt(n)
  return mean, mean - half, mean + half


def _average_ranks(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
  """Ranks 1 (best) .. n of `values`, ties getting their average rank."""
  v = -values if higher_is_better else values
  # rank_i = #{j: v_j < v_i} + (#{j: v_j == v_i} + 1) / 2.
  less = (v[None, :] < v[:, None]).sum(axis=1)
  equal = (v[None, :] == v[:, None]).sum(axis=1)
  return less + (equal + 1) / 2.0


def _check_finite(values: np.ndarray, what: str) -> None:
  if np.isnan(values).any():
    raise ValueError(f"Cannot rank NaN values ({what}).")


def ranks(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """Mean rank of each method over the metric keys.

  For each key the methods are ranked 1 (best) .. m in the direction of
  `lower_is_better(key)`, ties getting their average rank; a method's result
  is its mean rank over the keys.

  Args:
    scores: {method: {"<task>/<metric>": value}}, every method with the same
      keys.

  Returns:
    {method: mean rank}.

  Raises:
    ValueError: if there are no methods or keys, the methods' keys differ,
      or a value is NaN.
  """
  if not scores:
    raise ValueError("ranks needs at least one method.")
  methods = list(scores)
  keys = sorted(scores[methods[0]])
  if not keys:
    raise ValueError(f"Method {methods[0]!r} has no metric keys.")
  for method in methods[1:]:
    other = sorted(scores[method])
    if other != keys:
      raise ValueError(
          f"Method {method!r} has keys {other}, but {methods[0]!r} has "
          f"{keys}.")
  total = np.zeros(len(methods))
  for key in keys:
    values = np.array([float(scores[m][key]) for m in methods])
    _check_finite(values, key)
    total += _average_ranks(values, higher_is_better=not lower_is_better(key))
  return {m: float(r) for m, r in zip(methods, total / len(keys))}


def rank_by(
    values: Mapping[str, float], higher_is_better: bool = True
) -> dict[str, float]:
  """Ranks of methods by one number (e.g. Δm), ties getting their average rank.

  Args:
    values: {method: value}.
    higher_is_better: direction of the value.

  Returns:
    {method: rank}, 1 for the best.

  Raises:
    ValueError: if a value is NaN.
  """
  methods = list(values)
  v = np.array([float(values[m]) for m in methods])
  _check_finite(v, "rank_by")
  r = _average_ranks(v, higher_is_better)
  return {m: float(x) for m, x in zip(methods, r)}


def _ci_dict(values: Sequence[float]) -> dict[str, float]:
  mean, lower, upper = mean_ci(values)
  return {"mean": mean, "lower": lower, "upper": upper}


def summarize(
    runs: Sequence[Mapping[str, Any]],
    baselines: Mapping[str, float] | None,
    keys: Sequence[str],
) -> dict[str, dict[str, Any]]:
  """Per-method summary over seeds: means, 95% intervals, Δm and rank.

  Args:
    runs: dicts {"method": str, "seed": int, "metrics": {key: value}}; every
      run has every key of `keys` (and of `baselines`).
    baselines: {key: value} for Δm, or None for no Δm.
    keys: the metric keys to summarise and rank on.

  Returns:
    {method: {"n": number of seeds,
              "metrics": {key: {"mean", "lower", "upper"}},
              "delta_m": {"mean", "lower", "upper"} (Δm of each seed against
                  `baselines`, then `mean_ci`; absent if baselines is None),
              "rank": mean rank over `keys` of the method's mean metrics
                  (`ranks`)}}.
    The bounds are nan for a method with one seed.

  Raises:
    ValueError: if there are no runs or keys, a run lacks a key, or a method
      has the same seed twice.
  """
  if not runs:
    raise ValueError("summarize needs at least one run.")
  if not keys:
    raise ValueError("summarize needs at least one metric key.")
  grouped: dict[str, list[Mapping[str, Any]]] = {}
  for run in runs:
    method = run["method"]
    seeds = [r["seed"] for r in grouped.get(method, [])]
    if run["seed"] in seeds:
      raise ValueError(f"Method {method!r} has seed {run['seed']} twice.")
    missing = [k for k in keys if k not in run["metrics"]]
    if missing:
      raise ValueError(
          f"Run of {method!r} seed {run['seed']} lacks the keys {missing}.")
    grouped.setdefault(method, []).append(run)
  summary: dict[str, dict[str, Any]] = {}
  for method, method_runs in grouped.items():
    entry: dict[str, Any] = {
        "n": len(method_runs),
        "metrics": {
            k: _ci_dict([r["metrics"][k] for r in method_runs]) for k in keys
        },
    }
    if baselines is not None:
      entry["delta_m"] = _ci_dict(
          [delta_m(r["metrics"], baselines) for r in method_runs])
    summary[method] = entry
  mean_rank = ranks({
      m: {k: e["metrics"][k]["mean"] for k in keys} for m, e in summary.items()
  })
  for method, entry in summary.items():
    entry["rank"] = mean_rank[method]
  return summary


def _sorted_methods(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """Methods by rank (best first), ties by name."""
  return sorted(summary, key=lambda m: (summary[m]["rank"], m))


def _format_ci(ci: Mapping[str, float], n: int, precision: int) -> str:
  """"mean ± half-width", or just the mean when n = 1."""
  if n <= 1:
    return f"{ci['mean']:.{precision}f}"
  half = (ci["upper"] - ci["lower"]) / 2.0
  return f"{ci['mean']:.{precision}f} ± {half:.{precision}f}"


def to_markdown(
    summary: Mapping[str, Mapping[str, Any]],
    keys: Sequence[str],
    precision: int = 4,
) -> str:
  """Markdown table of a `summarize` result, one row per method by rank.

  Columns: method, n, each key as "mean ± half-width" (half-width =
  (upper - lower) / 2; just the mean when n = 1), "Δm%" the same way when the
  summary has Δm, and rank.

  Args:
    summary: the result of `summarize`.
    keys: the metric keys, in column order.
    precision: decimals of the means and half-widths.

  Returns:
    The table, lines joined by "\n", with a final newline.
  """
  has_dm = any("delta_m" in e for e in summary.values())
  header = ["method", "n", *keys] + (["Δm%"] if has_dm else []) + ["rank"]
  lines = [
      "| " + " | ".join(header) + " |",
      "|" + "|".join(["---"] * len(header)) + "|",
  ]
  for method in _sorted_methods(summary):
    e = summary[method]
    n = e["n"]
    row = [method, str(n)]
    row += [_format_ci(e["metrics"][k], n, precision) for k in keys]
    if has_dm:
      row.append(_format_ci(e["delta_m"], n, precision) if "delta_m" in e
                 else "")
    row.append(f"{e['rank']:.2f}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def to_csv(
    summary: Mapping[str, Mapping[str, Any]],
    keys: Sequence[str],
    path: str,
) -> None:
  """Writes a `summarize` result as CSV, one row per method by rank.

  Columns: method, n, then `<key>_mean`, `<key>_lower`, `<key>_upper` for each
  key, then delta_m_mean, delta_m_lower, delta_m_upper when the summary has
  Δm, then rank. Bounds of one-seed methods are written as "nan".

  Args:
    summary: the result of `summarize`.
    keys: the metric keys, in column order.
    path: the file to write.
  """
  has_dm = any("delta_m" in e for e in summary.values())
  fields = ["method", "n"]
  for k in keys:
    fields += [f"{k}_mean", f"{k}_lower", f"{k}_upper"]
  if has_dm:
    fields += ["delta_m_mean", "delta_m_lower", "delta_m_upper"]
  fields.append("rank")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for method in _sorted_methods(summary):
      e = summary[method]
      row: dict[str, Any] = {"method": method, "n": e["n"], "rank": e["rank"]}
      for k in keys:
        for part in ("mean", "lower", "upper"):
          row[f"{k}_{part}"] = e["metrics"][k][part]
      if has_dm and "delta_m" in e:
        for part in ("mean", "lower", "upper"):
          row[f"delta_m_{part}"] = e["delta_m"][part]
      writer.writerow(row)
