r"""Tabular multi-output benchmark: `mtl_jax.sklearn` against scikit-learn.

  python -m experiments.tabular --results=runs/tabular          # everything
  python -m experiments.tabular --problems=linnerud --num_seeds=3 \
      --results=/tmp/tabular                                     # a quick look

Every problem's training targets are hidden at random (each value
independently, with probability `--missing_rates`: 0, 30%, 60%, 90%; each
target keeps at least 2 observed values); the test targets are complete. Each method is fitted once per problem, missing
rate and seed, and scored per target on the test rows: R^2 (regression) or
accuracy (class targets); the tables give the mean over targets, each as mean
and 95% Student-t interval over seeds, and the median fit time.

Problems (`PROBLEMS`):
  linnerud     scikit-learn's Linnerud data: 20 rows, 3 exercise features, 3
               physiological targets. Each seed is a new shuffled 5-fold
               split; R^2 is computed on the pooled out-of-fold predictions of
               the 20 rows.
  gradnorm     the synthetic problem of GradNorm (Chen et al. 2018, sec. 4)
               with scalar tasks: y_i = sigma_i tanh((b + e_i) . x), x uniform
               in [-1, 1]^250 scaled to unit norm, b ~ N(0, 10^2) shared,
               e_i ~ N(0, 3.5^2) per task, 8 tasks with sigma_i log-spaced
               from 1 to 100 (the paper's tasks have 100 outputs each; here
               each task is one column). 1500 training and 500 test rows.
  correlated   make_regression-style: 20 features (10 informative), 5 targets
               y_j = x . (w + 0.3 u_j) + noise, w and u_j Gaussian, so the
               targets are strongly correlated. 1000 training, 500 test rows.
  multilabel   make_multilabel_classification: 20 features, 5 binary class
               targets (accuracy). 1000 training, 500 test rows.

Methods (each after a StandardScaler on X):
  mtl          MultiTaskRegressor / MultiTaskClassifier on all rows (NaN =
               missing), equal weights, early stopping on 10% of the rows.
  mtl_raw, mtl_gradnorm_raw, mtl_uncertainty_raw (gradnorm problem only)
               the same without target standardisation (the tasks keep their
               scales), with equal, GradNorm and uncertainty weights.
  ridge        one Ridge per target on the rows where it is present (what
               MultiOutputRegressor(Ridge) does, given each target's rows).
  chain        RegressorChain(Ridge) (ClassifierChain(LogisticRegression)) on
               the complete rows.
  mlp          MLPRegressor with standardised targets (MLPClassifier) on the
               complete rows, early stopping.
  hgb          one HistGradientBoostingRegressor (Classifier) per target on
               its rows; on linnerud and multilabel only (`HGB_PROBLEMS`: on
               2 cores its run time rules out the other two).
  logreg       one LogisticRegression per target on its rows (classes).
A joint method needs complete rows: with fewer than `MIN_COMPLETE_ROWS` it is
not fitted ("n/a" in the tables, with how many seeds it could be fitted), and
with fewer than `MIN_EARLY_STOPPING_ROWS` the MLP runs without early stopping.

Writes to `--results`: `fits.jsonl` (one line per fit: per-target scores, fit
time), `summary.json`, `results.md` and `results.csv` (mean over targets),
`per_target.md` (every target's score, mean and 95% CI over seeds),
`tabular.png` (score against the missing rate, per problem),
`gradnorm_weights.json`/`.md`/`.png` (`weight_study`: the weights GradNorm
and uncertainty weighting learn on the gradnorm problem with the targets'
scales kept, per task and its sigma, over 100 epochs). Progress (fits done, elapsed, ETA) goes to the log.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import numpy as np
from sklearn import datasets
from sklearn.base import clone
from sklearn.compose import TransformedTargetRegressor
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold
from sklearn.multioutput import ClassifierChain
from sklearn.multioutput import RegressorChain
from sklearn.neural_network import MLPClassifier
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from experiments.protocols import stats
from mtl_jax.sklearn import MultiTaskClassifier
from mtl_jax.sklearn import MultiTaskRegressor

PROBLEMS = ("linnerud", "gradnorm", "correlated", "multilabel")
# Where gradient boosting runs: per target on 250 (gradnorm) or 20
# (correlated) features with 1500 rows, its fits dominate the whole
# benchmark's time on a few cores.
HGB_PROBLEMS = ("linnerud", "multilabel")
MIN_COMPLETE_ROWS = 5
# The plot's lowest R² (the tables hold the values below it).
R2_FLOOR = -3.0
# Fewer complete rows: the joint MLP is fitted without early stopping.
MIN_EARLY_STOPPING_ROWS = 50

_RESULTS = flags.DEFINE_string("results", "runs/tabular", "Output directory.")
_PROBLEMS = flags.DEFINE_list("problems", list(PROBLEMS), "Problems to run.")
_MISSING = flags.DEFINE_list("missing_rates", ["0", "0.3", "0.6", "0.9"],
                             "Fractions of training targets hidden.")
_SEEDS = flags.DEFINE_integer("num_seeds", 5, "Seeds per setting.")
_MAX_EPOCHS = flags.DEFINE_integer("max_epochs", 200,
                                   "max_iter of the neural models.")
_WEIGHT_SEEDS = flags.DEFINE_integer(
    "weight_seeds", 3, "Seeds of the weight study on the gradnorm problem "
    "(`weight_study`; 0: skip it).")


# --- problems --------------------------------------------------------------

def gradnorm_problem(n: int, seed: int, num_tasks: int = 8,
                     max_sigma: float = 100.0, dim: int = 250
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """GradNorm's synthetic regression with scalar tasks: (X, Y, sigmas)."""
  rng = np.random.default_rng(seed)
  sigmas = np.logspace(0.0, math.log10(max_sigma), num_tasks)
  b = rng.normal(scale=10.0, size=dim)
  e = rng.normal(scale=3.5, size=(num_tasks, dim))
  X = rng.uniform(-1.0, 1.0, size=(n, dim))
  X /= np.linalg.norm(X, axis=1, keepdims=True)
  Y = sigmas * np.tanh(X @ (b + e).T)
  return X, Y, sigmas


def correlated_problem(n: int, seed: int, num_targets: int = 5
                       ) -> tuple[np.ndarray, np.ndarray]:
  X, _, coef = datasets.make_regression(
      n_samples=n, n_features=20, n_informative=10, coef=True,
      random_state=seed)
  rng = np.random.default_rng(seed)
  W = coef[:, None] + 0.3 * rng.normal(size=(20, num_targets)) * (coef[:, None]
                                                                  != 0)
  Y = X @ W + rng.normal(scale=10.0, size=(n, num_targets))
  return X, Y


def multilabel_problem(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  X, Y = datasets.make_multilabel_classification(
      n_samples=n, n_features=20, n_classes=5, n_labels=2,
      random_state=seed)
  return X.astype(np.float64), Y


def hide(Y: np.ndarray, rate: float, rng: np.random.Generator,
         keep: int = 2) -> np.ndarray:
  """Y (as float) with each value NaN with probability `rate`, except that
  every target keeps at least `keep` observed values (chosen at random among
  its rows): a target observed nowhere cannot be fitted by any method."""
  Y = np.asarray(Y, np.float64).copy()
  hidden = rng.random(Y.shape) < rate
  for j in range(Y.shape[1]):
    shown = np.flatnonzero(~hidden[:, j])
    if shown.size < keep:
      extra = rng.choice(np.flatnonzero(hidden[:, j]), keep - shown.size,
                         replace=False)
      hidden[extra, j] = False
  Y[hidden] = np.nan
  return Y


# --- methods ---------------------------------------------------------------

class PerTarget:
  """One clone of `estimator` per target, each fitted on its present rows."""

  def __init__(self, estimator):
    self.estimator = estimator

  def fit(self, X, Y):
    self.models_ = []
    for j in range(Y.shape[1]):
      rows = ~np.isnan(Y[:, j])
      y = Y[rows, j]
      if rows.sum() < 2 or np.unique(y).size < 2:
        self.models_.append(("constant", y.mean() if y.size else 0.0))
        continue
      if isinstance(self.estimator.steps[-1][1], (LogisticRegression,
                                                  HistGradientBoostingClassifier)):
        y = y.astype(int)
      self.models_.append(("model", clone(self.estimator).fit(X[rows], y)))
    return self

  def predict(self, X):
    out = []
    for kind, model in self.models_:
      if kind == "constant":
        out.append(np.full(X.shape[0], round(model) if self._classes()
                           else model))
      else:
        out.append(model.predict(X))
    return np.stack(out, axis=1)

  def _classes(self) -> bool:
    return isinstance(self.estimator.steps[-1][1],
                      (LogisticRegression, HistGradientBoostingClassifier))


class CompleteRows:
  """`estimator` fitted jointly on the rows where every target is present."""

  def __init__(self, estimator, classes: bool = False):
    self.estimator = estimator
    self.classes = classes

  def fit(self, X, Y):
    rows = ~np.isnan(Y).any(axis=1)
    if rows.sum() < MIN_COMPLETE_ROWS:
      raise _NotApplicable(f"{int(rows.sum())} complete rows")
    Y = Y[rows].astype(int) if self.classes else Y[rows]
    if self.classes and any(np.unique(Y[:, j]).size < 2
                            for j in range(Y.shape[1])):
      raise _NotApplicable("a target has one class in the complete rows")
    model = clone(self.estimator)
    if rows.sum() < MIN_EARLY_STOPPING_ROWS:
      # MLP's early stopping needs validation rows among the complete ones.
      model.set_params(**{k: False for k in model.get_params()
                          if k.endswith("early_stopping")})
    self.model_ = model.fit(X[rows], Y)
    return self

  def predict(self, X):
    return self.model_.predict(X)


class _NotApplicable(Exception):
  pass


def methods(problem: str, max_epochs: int, seed: int
            ) -> dict[str, Callable[[], Any]]:
  """The methods run on `problem`: name -> a fresh estimator."""
  def scaled(est):
    return make_pipeline(StandardScaler(), est)

  small = problem == "linnerud"
  neural = dict(hidden_sizes=(16,) if small else (64, 64),
                max_iter=max_epochs, random_state=seed,
                early_stopping=not small, validation_fraction=0.1,
                batch_size=16 if small else 64,
                learning_rate=1e-2 if small else 1e-3)
  mlp_kwargs = dict(hidden_layer_sizes=neural["hidden_sizes"],
                    max_iter=max_epochs, random_state=seed,
                    early_stopping=not small,
                    learning_rate_init=neural["learning_rate"],
                    batch_size=neural["batch_size"])
  if problem == "multilabel":
    return {
        "mtl": lambda: scaled(MultiTaskClassifier(**neural)),
        "logreg": lambda: PerTarget(scaled(LogisticRegression())),
        "chain": lambda: CompleteRows(scaled(ClassifierChain(
            LogisticRegression(), random_state=seed)), classes=True),
        "mlp": lambda: CompleteRows(scaled(MLPClassifier(**mlp_kwargs)),
                                    classes=True),
        "hgb": lambda: PerTarget(scaled(HistGradientBoostingClassifier(
            random_state=seed))),
    }
  out = {
      "mtl": lambda: scaled(MultiTaskRegressor(**neural)),
      "ridge": lambda: PerTarget(scaled(Ridge())),
      "chain": lambda: CompleteRows(scaled(RegressorChain(Ridge()))),
      "mlp": lambda: CompleteRows(scaled(TransformedTargetRegressor(
          MLPRegressor(**mlp_kwargs), transformer=StandardScaler()))),
  }
  if problem in HGB_PROBLEMS:
    out["hgb"] = lambda: PerTarget(scaled(HistGradientBoostingRegressor(
        random_state=seed)))
  if problem == "gradnorm":
    raw = dict(neural, standardize_targets=False)
    out["mtl_raw"] = lambda: scaled(MultiTaskRegressor(**raw))
    out["mtl_gradnorm_raw"] = lambda: scaled(MultiTaskRegressor(
        **raw, weighting="gradnorm"))
    out["mtl_uncertainty_raw"] = lambda: scaled(MultiTaskRegressor(
        **raw, weighting="uncertainty",
        weighting_options={"learning_rate": 1e-2}))
  return out


# --- one setting -------------------------------------------------------------

def _scores(Y_true: np.ndarray, pred: np.ndarray, classes: bool
            ) -> list[float]:
  pred = np.asarray(pred, np.float64).reshape(Y_true.shape)
  if classes:
    return [float(np.mean(pred[:, j] == Y_true[:, j]))
            for j in range(Y_true.shape[1])]
  return [float(r2_score(Y_true[:, j], pred[:, j]))
          for j in range(Y_true.shape[1])]


def _fit_predict(make, X_train, Y_train, X_test):
  est = make()
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    est.fit(X_train, Y_train)
  seconds = time.perf_counter() - start
  return est, est.predict(X_test), seconds


def run_setting(problem: str, rate: float, seed: int, max_epochs: int
                ) -> list[dict[str, Any]]:
  """Fits every method once; returns one record per method."""
  classes = problem == "multilabel"
  rng = np.random.default_rng(1000 * seed + int(round(rate * 100)))
  records = []
  if problem == "linnerud":
    X, Y = datasets.load_linnerud(return_X_y=True)
    folds = list(KFold(5, shuffle=True, random_state=seed).split(X))
    for name, make in methods(problem, max_epochs, seed).items():
      pred = np.zeros_like(Y, np.float64)
      seconds = 0.0
      try:
        for train, test in folds:
          _, p, s = _fit_predict(make, X[train], hide(Y[train], rate, rng),
                                 X[test])
          pred[test] = np.asarray(p).reshape(len(test), -1)
          seconds += s
        scores = _scores(Y, pred, classes)
      except _NotApplicable as e:
        scores, seconds = None, math.nan
        logging.info("%s/%s/%g/%d: not applicable (%s)", problem, name, rate,
                     seed, e)
      records.append(dict(problem=problem, method=name, missing=rate,
                          seed=seed, scores=scores, fit_seconds=seconds))
    return records
  if problem == "gradnorm":
    X, Y, _ = gradnorm_problem(2000, seed)
  elif problem == "correlated":
    X, Y = correlated_problem(1500, seed)
  else:
    X, Y = multilabel_problem(1500, seed)
  n_test = 500
  X_train, X_test = X[:-n_test], X[-n_test:]
  Y_train, Y_test = hide(Y[:-n_test], rate, rng), Y[-n_test:]
  for name, make in methods(problem, max_epochs, seed).items():
    try:
      est, pred, seconds = _fit_predict(make, X_train, Y_train, X_test)
      scores = _scores(Y_test, pred, classes)
    except _NotApplicable as e:
      est, scores, seconds = None, None, math.nan
      logging.info("%s/%s/%g/%d: not applicable (%s)", problem, name, rate,
                   seed, e)
    record = dict(problem=problem, method=name, missing=rate, seed=seed,
                  scores=scores, fit_seconds=seconds)
    final = getattr(est, "steps", [[None, None]])[-1][1]
    if isinstance(final, MultiTaskRegressor):
      record["task_weights"] = final.task_weight_curve_.tolist()
      record["epochs"] = final.n_iter_
    records.append(record)
  return records


# --- summaries -------------------------------------------------------------

def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per (problem, method, missing): mean score over targets, as mean and 95%
  CI over seeds; the number of seeds fitted; the median fit time."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for r in records:
    groups.setdefault((r["problem"], r["method"], r["missing"]), []).append(r)
  rows = []
  for (problem, method, rate), rs in sorted(groups.items()):
    fitted = [r for r in rs if r["scores"] is not None]
    row = dict(problem=problem, method=method, missing=rate,
               seeds=len(rs), fitted=len(fitted))
    if fitted:
      means = [float(np.mean(r["scores"])) for r in fitted]
      mean, lo, hi = stats.mean_ci(means)
      per_target = np.array([r["scores"] for r in fitted])
      row.update(score=mean, ci_low=lo, ci_high=hi,
                 per_target=per_target.mean(axis=0).tolist(),
                 per_target_ci=[list(stats.mean_ci(per_target[:, j]))
                                for j in range(per_target.shape[1])],
                 fit_seconds=float(np.median([r["fit_seconds"]
                                              for r in fitted])))
    rows.append(row)
  return rows


def _cell(row: dict[str, Any]) -> str:
  if not row["fitted"]:
    return "n/a"
  half = (row["ci_high"] - row["ci_low"]) / 2
  text = f"{row['score']:.3f} ± {half:.3f}" if math.isfinite(half) else (
      f"{row['score']:.3f}")
  if row["fitted"] < row["seeds"]:
    text += f" ({row['fitted']}/{row['seeds']} seeds)"
  return text


def to_markdown(rows: list[dict[str, Any]]) -> str:
  """One table per problem: methods x missing rates, then fit times."""
  out = []
  for problem in dict.fromkeys(r["problem"] for r in rows):
    sub = [r for r in rows if r["problem"] == problem]
    rates = sorted({r["missing"] for r in sub})
    metric = "accuracy" if problem == "multilabel" else "R²"
    out.append(f"#### {problem}: mean {metric} over targets (test rows), "
               "mean ± 95% CI over seeds\n")
    out.append("| method | " + " | ".join(f"{100 * m:.0f}% missing"
                                          for m in rates) +
               " | fit time (median, s) |")
    out.append("|---" * (len(rates) + 2) + "|")
    for method in dict.fromkeys(r["method"] for r in sub):
      cells = {r["missing"]: r for r in sub if r["method"] == method}
      times = [cells[m]["fit_seconds"] for m in rates
               if cells.get(m, {}).get("fitted")]
      time_cell = f"{np.median(times):.2f}" if times else "n/a"
      out.append(f"| {method} | " + " | ".join(
          _cell(cells[m]) if m in cells else "" for m in rates) +
                 f" | {time_cell} |")
    out.append("")
  return "\n".join(out)


def per_target_markdown(rows: list[dict[str, Any]]) -> str:
  """One table per problem: (method, missing rate) x targets."""
  out = []
  for problem in dict.fromkeys(r["problem"] for r in rows):
    sub = [r for r in rows if r["problem"] == problem and r["fitted"]]
    k = len(sub[0]["per_target"]) if sub else 0
    metric = "accuracy" if problem == "multilabel" else "R²"
    out.append(f"#### {problem}: {metric} per target (test rows), "
               "mean ± 95% CI over seeds\n")
    out.append("| method | missing | " + " | ".join(
        f"y{j}" for j in range(k)) + " |")
    out.append("|---" * (k + 2) + "|")
    for r in sorted(sub, key=lambda r: (r["method"], r["missing"])):
      cells = []
      for mean, lo, hi in r["per_target_ci"]:
        half = (hi - lo) / 2
        cells.append(f"{mean:.3f} ± {half:.3f}" if math.isfinite(half)
                     else f"{mean:.3f}")
      out.append(f"| {r['method']} | {100 * r['missing']:.0f}% | " +
                 " | ".join(cells) + " |")
    out.append("")
  return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  problems = list(dict.fromkeys(r["problem"] for r in rows))
  fig, axes = plt.subplots(1, len(problems), figsize=(4.5 * len(problems), 3.8),
                           squeeze=False)
  for ax, problem in zip(axes[0], problems):
    sub = [r for r in rows if r["problem"] == problem and r["fitted"]]
    for method in dict.fromkeys(r["method"] for r in sub):
      pts = sorted((r["missing"], r["score"], r["ci_low"], r["ci_high"])
                   for r in sub if r["method"] == method)
      x = [100 * p[0] for p in pts]
      y = [p[1] for p in pts]
      err = [[p[1] - p[2] if math.isfinite(p[2]) else 0 for p in pts],
             [p[3] - p[1] if math.isfinite(p[3]) else 0 for p in pts]]
      ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method,
                  linewidth=2.2 if method.startswith("mtl") else 1.2)
    low = min((r["ci_low"] if math.isfinite(r["ci_low"]) else r["score"])
              for r in sub) if sub else 0.0
    if problem != "multilabel" and low < R2_FLOOR:
      # A method far below 0 R² (worse than the mean) would flatten the
      # others: the axis stops at R2_FLOOR, the tables hold the values.
      ax.set_ylim(R2_FLOOR, 1.05)
      ax.set_title(f"{problem} (axis clipped at R² = {R2_FLOOR})")
    else:
      ax.set_title(problem)
    ax.set_xlabel("% of training targets missing")
    ax.set_ylabel("accuracy" if problem == "multilabel" else "mean R²")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


WEIGHT_METHODS = {"mtl_raw": ("equal", None),
                  "mtl_gradnorm_raw": ("gradnorm", None),
                  "mtl_uncertainty_raw": ("uncertainty",
                                          {"learning_rate": 1e-2})}


def weight_study(out_dir: str, num_seeds: int = 3, epochs: int = 100,
                 n: int = 2000, dim: int = 250) -> dict[str, Any]:
  """What GradNorm and uncertainty weighting learn on the gradnorm problem.

  The targets keep their scales (`standardize_targets=False`), every fit runs
  `epochs` epochs (no early stopping, so the weights have time to settle),
  on all `n` rows (none missing). Reported per task: the final weights, and
  for uncertainty weighting the ratio of its weight to its equilibrium
  `1 / (2 L_k)` (where d/ds_k = 0, `L_k` the task's mean training loss in
  the last epoch); for both, the slope of log w against log sigma.

  Writes `gradnorm_weights.json`, `.md` and `.png` to `out_dir`.
  """
  sigmas = None
  finals = {m: [] for m in WEIGHT_METHODS}
  losses = {m: [] for m in WEIGHT_METHODS}
  curves = {}
  for seed in range(num_seeds):
    X, Y, sigmas = gradnorm_problem(n, seed, dim=dim)
    X = StandardScaler().fit_transform(X)
    for method, (weighting, options) in WEIGHT_METHODS.items():
      est = MultiTaskRegressor(
          weighting=weighting, weighting_options=options,
          standardize_targets=False, max_iter=epochs, tol=0.0,
          n_iter_no_change=epochs + 1, random_state=seed)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, Y)
      finals[method].append(est.task_weight_curve_[-1])
      losses[method].append(est.task_loss_curve_[-1])
      if seed == 0:
        curves[method] = est.task_weight_curve_
  summary: dict[str, Any] = {"sigmas": sigmas.tolist(), "epochs": epochs,
                             "seeds": num_seeds, "rows": n}
  for method in WEIGHT_METHODS:
    w = np.array(finals[method])
    summary[method] = {"final_mean": w.mean(0).tolist(),
                       "final_std": w.std(0).tolist(),
                       "final_loss_mean": np.mean(losses[method], 0).tolist()}
    if method != "mtl_raw":
      summary[method]["slope_log_w_vs_log_sigma"] = float(
          np.polyfit(np.log(sigmas), np.log(w.mean(0)), 1)[0])
  ratio = np.array(finals["mtl_uncertainty_raw"]) * 2 * np.array(
      losses["mtl_uncertainty_raw"])
  summary["mtl_uncertainty_raw"]["w_times_2L_mean"] = ratio.mean(0).tolist()
  _write_weight_report(summary, curves, out_dir)
  return summary


def _write_weight_report(summary: dict[str, Any],
                         curves: dict[str, np.ndarray], out_dir: str) -> None:
  """`weight_study`'s JSON, Markdown table and weight curves (seed 0)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sigmas = np.array(summary["sigmas"])
  num_seeds, epochs, n = summary["seeds"], summary["epochs"], summary["rows"]
  with open(os.path.join(out_dir, "gradnorm_weights.json"), "w") as f:
    json.dump(summary, f, indent=1)
  lines = [
      f"{num_seeds} seeds, {epochs} epochs on {n} rows, targets not "
      "standardised; weights at the last step, mean ± std over seeds. "
      "Slope of log w against log sigma: GradNorm "
      f"{summary['mtl_gradnorm_raw']['slope_log_w_vs_log_sigma']:.2f}, "
      "uncertainty "
      f"{summary['mtl_uncertainty_raw']['slope_log_w_vs_log_sigma']:.2f}. "
      "w·2L: uncertainty's weight over its equilibrium 1/(2L), L the "
      "task's training loss in the last epoch.", "",
      "| task | sigma | GradNorm w | uncertainty w | uncertainty w·2L |",
      "|---|---|---|---|---|"]
  g = summary["mtl_gradnorm_raw"]
  u = summary["mtl_uncertainty_raw"]
  for i, sigma in enumerate(sigmas):
    lines.append(
        f"| y{i} | {sigma:.1f} | {g['final_mean'][i]:.3g} ± "
        f"{g['final_std'][i]:.2g} | {u['final_mean'][i]:.3g} ± "
        f"{u['final_std'][i]:.2g} | {u['w_times_2L_mean'][i]:.2f} |")
  with open(os.path.join(out_dir, "gradnorm_weights.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, method, title in zip(axes, ("mtl_gradnorm_raw",
                                      "mtl_uncertainty_raw"),
                               ("GradNorm", "uncertainty weighting")):
    c = curves[method]
    for i, sigma in enumerate(sigmas):
      ax.plot(np.arange(1, len(c) + 1), c[:, i], label=f"σ={sigma:.1f}",
              color=plt.cm.viridis(i / max(1, len(sigmas) - 1)))
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("task weight (last step of the epoch)")
    ax.set_title(f"{title}, seed 0")
    ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "gradnorm_weights.png"), dpi=110)
  plt.close(fig)


def run(problems: list[str], rates: list[float], num_seeds: int,
        max_epochs: int, out_dir: str, weight_seeds: int = 0
        ) -> list[dict[str, Any]]:
  """Runs (or, from `fits.jsonl`, skips) every setting; writes the outputs.

  Returns:
    The summary rows (`summarize`).

  Raises:
    ValueError: an unknown problem or a missing rate outside [0, 1).
  """
  for p in problems:
    if p not in PROBLEMS:
      raise ValueError(f"unknown problem {p!r}; valid: {', '.join(PROBLEMS)}")
  if any(not 0 <= m < 1 for m in rates):
    raise ValueError(f"missing rates must be in [0, 1), got {rates}")
  os.makedirs(out_dir, exist_ok=True)
  settings = [(p, m, s) for p in problems for m in rates
              for s in range(num_seeds)]
  fits_path = os.path.join(out_dir, "fits.jsonl")
  done = {}
  if os.path.exists(fits_path):  # a re-run skips the finished settings
    with open(fits_path) as f:
      for line in f:
        r = json.loads(line)
        done.setdefault((r["problem"], r["missing"], r["seed"]), []).append(r)
  records = []
  start = time.time()
  ran = 0
  for i, (problem, rate, seed) in enumerate(settings):
    if (problem, rate, seed) in done:
      records.extend(done[(problem, rate, seed)])
      continue
    new = run_setting(problem, rate, seed, max_epochs)
    with open(fits_path, "a") as f:
      for r in new:
        f.write(json.dumps(r) + "\n")
    records.extend(new)
    ran += 1
    elapsed = time.time() - start
    left = len(settings) - i - 1
    logging.info("%d/%d settings (%s, %.0f%% missing, seed %d) in %.0f s; "
                 "ETA %.0f s", i + 1, len(settings), problem, 100 * rate,
                 seed, elapsed, elapsed / ran * left)
  rows = summarize(records)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(rows, f, indent=1)
  fitted = [r for r in records if r["scores"] is not None]
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(to_markdown(rows))
    f.write(f"{len(fitted)} fits of {len(records)} (the others not "
            "applicable); fit time summed over them: "
            f"{sum(r['fit_seconds'] for r in fitted) / 60:.1f} min.\n")
  with open(os.path.join(out_dir, "per_target.md"), "w") as f:
    f.write(per_target_markdown(rows))
  keys = ["problem", "method", "missing", "seeds", "fitted", "score",
          "ci_low", "ci_high", "fit_seconds"]
  with open(os.path.join(out_dir, "results.csv"), "w") as f:
    f.write(",".join(keys) + "\n")
    for r in rows:
      f.write(",".join(str(r.get(k, "")) for k in keys) + "\n")
  plot(rows, os.path.join(out_dir, "tabular.png"))
  if weight_seeds:
    weight_study(out_dir, num_seeds=weight_seeds)
  return rows


def main(argv):
  del argv
  try:
    rows = run(_PROBLEMS.value, [float(m) for m in _MISSING.value],
               _SEEDS.value, _MAX_EPOCHS.value, _RESULTS.value,
               weight_seeds=_WEIGHT_SEEDS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(to_markdown(rows))


if __name__ == "__main__":
  app.run(main)
