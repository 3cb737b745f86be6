"""scikit-learn estimators for tables with several targets, some missing.

  from mtl_jax.sklearn import MultiTaskRegressor, MultiTaskClassifier

  reg = MultiTaskRegressor(hidden_sizes=(64, 64), weighting="uncertainty")
  reg.fit(X, Y)            # Y [n, k]; NaN where a target was not measured
  reg.predict(X_new)       # [n, k], every target predicted for every row

Each column of `Y` is one task of the library (`mtl_jax.tasks`): a scalar
regression task, or a classification task over the column's classes. A
missing target becomes a zero in the task's mask, so a row counts in the loss
of the targets it has and nowhere else (a row with every target missing is
allowed and changes nothing); the model, the masked losses, the weighting and
aggregation methods and the train step are the library's
(`mtl_jax.training.step.make_train_step`), run on the default JAX device.

Conventions (scikit-learn's, and where they depart from `MLPRegressor`):

* Constructor arguments are hyperparameters only; `fit(X, Y)` learns,
  `partial_fit` runs one epoch (the first call initialises; a classifier's
  first call takes `classes`, or infers them from that call's `Y`), and
  `warm_start=True` makes `fit` continue from the fitted model when the
  problem has the same shape. `random_state` (int) makes `fit` reproducible:
  it seeds the initialisation, the dropout and step keys and the shuffling.
* Missing targets: NaN in a float `Y`; in a classifier's `Y` also None (object
  arrays) or the value `missing_label` (e.g. -1, as scikit-learn's
  semi-supervised estimators mark unlabelled rows). Infinite targets, a target
  column observed nowhere, and a classification column with one class are
  errors.
* Regression targets are standardised per column over their observed values
  (`standardize_targets=True`); the losses and the task weighting see the
  standardised targets and predictions are mapped back. With
  `standardize_targets=False` the tasks keep their scales: what loss-scale
  methods (GradNorm, uncertainty weighting) are meant to correct.
* `max_iter` counts epochs; an epoch is a pass over the rows in shuffled
  batches of `batch_size` (the last one padded with masked rows, so every step
  compiles to one program). Training stops early when the monitored loss (the
  validation loss with `early_stopping=True`, on a `validation_fraction` of the
  rows that have a target, else the training loss) has not improved by `tol`
  for `n_iter_no_change` epochs; with early stopping the parameters of the
  best validation epoch are kept. The monitored loss is the mean over targets
  of each target's mean loss (MSE on standardised targets, cross-entropy).
* Fitted attributes: `params_` (the model's parameters, numpy),
  `n_features_in_`, `n_outputs_`, `target_names_` (the task names: `Y`'s
  column names for a DataFrame, else "y0", "y1", ...), `loss_curve_`,
  `validation_loss_curve_`/`best_validation_loss_` (early stopping),
  `n_iter_` (epochs), `t_` (steps), `task_weights_` (the weighting's weights
  at the last step, `{task: w}`), `task_weight_curve_` (the weights at each
  epoch's last step, `[epochs, k]`) and `task_loss_curve_` (each target's
  mean training loss per epoch, `[epochs, k]`), `y_mean_`/`y_scale_` (regression), `classes_`
  (classification: an array, or a list of arrays for several targets).

Compiled programs are cached per process by problem structure (architecture,
methods, batch size, numbers of features and targets/classes), never stored on
the estimator: a fitted estimator pickles as numpy arrays, and a clone or a
grid-search fold with the same structure reuses the compiled step (the
learning rate lives in the optimizer state, so it does not recompile).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
try:
  from sklearn.base import BaseEstimator
  from sklearn.base import ClassifierMixin
  from sklearn.base import RegressorMixin
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.metrics import r2_score
  from sklearn.utils import check_random_state
  from sklearn.utils.multiclass import check_classification_targets
  from sklearn.utils.validation import check_array
  from sklearn.utils.validation import check_consistent_length
  from sklearn.utils.validation import check_is_fitted
  from sklearn.utils.validation import validate_data
except ImportError as e:
  raise ImportError(
      "mtl_jax.sklearn needs scikit-learn (>= 1.9, with "
      "sklearn.utils.validation.validate_data): pip install "
      f"'mtl-jax[sklearn]' ({e})") from e

from mtl_jax import aggregation as aggregation_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.models import build as build_lib
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

# Architectures that take flat feature vectors with the MLP trunk.
ARCHITECTURES = ("hard_sharing", "soft_sharing", "cross_stitch", "mmoe", "cgc",
                 "ple", "dselect_k")
# `aggregation="none"`: the weighted sum of the task losses.
NO_AGGREGATION = "none"
# Rows per predict call (one compiled program whatever the number of rows).
_PREDICT_ROWS = 256
# Batches scanned per compiled call; an epoch's last call skips (`cond`) the
# batches past its end, so one program serves every data size.
_CHUNK = 16


def _freeze(value: Any) -> Any:
  """A hashable form of an options value (dicts and lists to tuples)."""
  if isinstance(value, dict):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, np.ndarray):
    return tuple(value.tolist())
  return value


def _thaw(value: Any) -> Any:
  return dict(value) if value else {}


def _to_numpy(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


class _Program:
  """The compiled functions of one problem structure (see `_program`)."""

  def __init__(self, key: tuple):
    (heads, self.architecture, hidden_sizes, head_hidden_sizes, arch_options,
     weighting, weighting_options, aggregation, aggregation_options,
     weight_decay, self.num_features) = key
    specs = []
    for name, num_classes in heads:
      if num_classes:
        specs.append(tasks_lib.classification_task(name, num_classes))
      else:
        specs.append(tasks_lib.regression_task(name))
    self.tasks = tasks_lib.TaskSet(specs)
    spec = build_lib.get_architecture(self.architecture)
    trunk = build_lib.make_trunk("mlp", hidden_sizes=tuple(hidden_sizes))
    self.model = spec.build(self.tasks, trunk,
                            head_hidden_sizes=tuple(head_hidden_sizes),
                            **_thaw(arch_options))
    self.weighting = weighting_lib.get_weighting(weighting,
                                                 **_thaw(weighting_options))
    self.aggregator = (None if aggregation == NO_AGGREGATION else
                       aggregation_lib.get_aggregator(
                           aggregation, **_thaw(aggregation_options)))
    spec.check_step_options(grad_norms_for=(
        weighting if "grad_norms" in self.weighting.needs else None))
    # The learning rate is a value in the optimizer state, not a constant of
    # the program: a grid over it reuses one compiled step.
    self.optimizer = optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-3, weight_decay=weight_decay)
    step = step_lib.make_train_step(
        self.model.apply, self.tasks, self.optimizer, self.weighting,
        aggregator=self.aggregator, **spec.step_kwargs(),
        # A non-finite loss ends the fit with an error (`_epoch`), so the
        # step's own skip-and-continue guard would only add compile time.
        skip_nonfinite=False)
    names = self.tasks.names

    def run(state, batches, active):
      def train(state, batch):
        new, metrics = step(state, batch)
        out = {"loss": metrics["loss"]}
        for t in names:
          for field in ("loss", "count", "weight"):
            out[f"{t}/{field}"] = metrics[f"{t}/{field}"]
        return new, out

      def skip(state, batch):
        shapes = jax.eval_shape(train, state, batch)[1]
        return state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   shapes)

      def body(state, xs):
        batch, on = xs
        return jax.lax.cond(on, train, skip, state, batch)

      return jax.lax.scan(body, state, (batches, active))

    self.run = jax.jit(run)
    self.apply = jax.jit(
        lambda params, x: self.model.apply({"params": params}, x, train=False))

    def create(key, learning_rate):
      init_key, step_key = jax.random.split(key)
      params = self.model.init(
          init_key, jnp.zeros((1, self.num_features), jnp.float32),
          train=False)["params"]
      state = state_lib.create_train_state(
          params, self.optimizer, self.weighting, len(self.tasks), step_key,
          self.aggregator)
      return set_learning_rate(state, learning_rate)

    self._create = jax.jit(create)

  def create_state(self, seed: int, learning_rate: float) -> Any:
    """The train state at step 0 (one compiled program)."""
    return self._create(jax.random.PRNGKey(seed),
                        jnp.asarray(learning_rate, jnp.float32))


def set_learning_rate(state: Any, learning_rate: float) -> Any:
  """The state with the injected learning rate replaced."""
  opt_state = state.opt_state
  hyperparams = dict(opt_state.hyperparams)
  hyperparams["learning_rate"] = jnp.asarray(
      learning_rate, jnp.result_type(hyperparams["learning_rate"]))
  return state.replace(opt_state=opt_state._replace(hyperparams=hyperparams))


@functools.lru_cache(maxsize=64)
def _program(key: tuple) -> _Program:
  return _Program(key)


@dataclasses.dataclass
class _History:
  """Per-epoch records across `fit`, `partial_fit` and warm starts."""

  loss: list[float]
  weights: list[np.ndarray]
  task_losses: list[np.ndarray]
  validation: list[float]
  best_validation_loss: float = np.inf

  def copy(self) -> _History:
    return _History(list(self.loss), list(self.weights),
                    list(self.task_losses), list(self.validation),
                    self.best_validation_loss)

  def add(self, loss: float, weights: np.ndarray,
          task_losses: np.ndarray) -> None:
    self.loss.append(loss)
    self.weights.append(weights)
    self.task_losses.append(task_losses)


class _MultiTaskEstimator(BaseEstimator):
  """What the regressor and the classifier share (not for direct use)."""

  def __init__(self, *, architecture="hard_sharing", hidden_sizes=(64, 64),
               head_hidden_sizes=(), architecture_options=None,
               weighting="equal", weighting_options=None, aggregation="none",
               aggregation_options=None, learning_rate=1e-3, weight_decay=0.0,
               batch_size=64, max_iter=200, tol=1e-4, n_iter_no_change=10,
               early_stopping=False, validation_fraction=0.1, warm_start=False,
               random_state=None, verbose=0):
    self.architecture = architecture
    self.hidden_sizes = hidden_sizes
    self.head_hidden_sizes = head_hidden_sizes
    self.architecture_options = architecture_options
    self.weighting = weighting
    self.weighting_options = weighting_options
    self.aggregation = aggregation
    self.aggregation_options = aggregation_options
    self.learning_rate = learning_rate
    self.weight_decay = weight_decay
    self.batch_size = batch_size
    self.max_iter = max_iter
    self.tol = tol
    self.n_iter_no_change = n_iter_no_change
    self.early_stopping = early_stopping
    self.validation_fraction = validation_fraction
    self.warm_start = warm_start
    self.random_state = random_state
    self.verbose = verbose

  def __sklearn_tags__(self):
    tags = super().__sklearn_tags__()
    tags.target_tags.required = True
    tags.target_tags.single_output = True
    tags.target_tags.multi_output = True
    return tags

  # --- hyperparameter checks (in fit, as scikit-learn does) ---------------

  def _check_hyperparameters(self) -> None:
    name = type(self).__name__
    if self.architecture not in ARCHITECTURES:
      raise ValueError(
          f"{name}: architecture={self.architecture!r} is not valid; valid: "
          f"{', '.join(ARCHITECTURES)}")
    if self.weighting not in weighting_lib.WEIGHTINGS:
      raise ValueError(
          f"{name}: weighting={self.weighting!r} is not a weighting method; "
          f"valid: {', '.join(sorted(weighting_lib.WEIGHTINGS))}")
    valid_aggregations = [NO_AGGREGATION] + sorted(aggregation_lib.AGGREGATORS)
    if self.aggregation not in valid_aggregations:
      raise ValueError(
          f"{name}: aggregation={self.aggregation!r} is not an aggregation "
          f"method; valid: {', '.join(valid_aggregations)}")
    for option in ("architecture_options", "weighting_options",
                   "aggregation_options"):
      value = getattr(self, option)
      if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name}: {option} must be a dict or None, got "
                         f"{value!r}")
    sizes = (self.hidden_sizes, self.head_hidden_sizes)
    for field, value in zip(("hidden_sizes", "head_hidden_sizes"), sizes):
      if (not isinstance(value, (tuple, list)) or not all(
          isinstance(v, numbers.Integral) and v >= 1 for v in value)):
        raise ValueError(f"{name}: {field} must be a tuple of positive ints, "
                         f"got {value!r}")
    if not self.hidden_sizes:
      raise ValueError(f"{name}: hidden_sizes must have at least one layer")
    positive = {"learning_rate": self.learning_rate,
                "batch_size": self.batch_size, "max_iter": self.max_iter,
                "n_iter_no_change": self.n_iter_no_change}
    for field, value in positive.items():
      if (not isinstance(value, numbers.Real) or isinstance(value, bool)
          or not value > 0):
        raise ValueError(f"{name}: {field} must be > 0, got {value!r}")
    for field in ("batch_size", "max_iter", "n_iter_no_change"):
      if not isinstance(getattr(self, field), numbers.Integral):
        raise ValueError(f"{name}: {field} must be an int, got "
                         f"{getattr(self, field)!r}")
    if not (isinstance(self.weight_decay, numbers.Real)
            and self.weight_decay >= 0):
      raise ValueError(f"{name}: weight_decay must be >= 0, got "
                       f"{self.weight_decay!r}")
    if not (isinstance(self.tol, numbers.Real) and self.tol >= 0):
      raise ValueError(f"{name}: tol must be >= 0, got {self.tol!r}")
    if self.early_stopping and not 0 < self.validation_fraction < 1:
      raise ValueError(f"{name}: validation_fraction must be in (0, 1), got "
                       f"{self.validation_fraction!r}")

  # --- the problem's structure and the compiled program -------------------

  def _program_for(self, heads: tuple) -> _Program:
    key = (heads, self.architecture, tuple(self.hidden_sizes),
           tuple(self.head_hidden_sizes),
           _freeze(self.architecture_options or {}), self.weighting,
           _freeze(self.weighting_options or {}), self.aggregation,
           _freeze(self.aggregation_options or {}),
           float(self.weight_decay), self.n_features_in_)
    try:
      return _program(key)
    except (TypeError, ValueError) as e:  # options the library refuses
      raise ValueError(f"{type(self).__name__}: {e}") from e

  # --- input checks --------------------------------------------------------

  def _check_X(self, X, *, reset: bool) -> np.ndarray:
    X = validate_data(self, X, reset=reset, dtype=(np.float64, np.float32))
    return np.asarray(X, np.float32)

  def _check_Y(self, Y, n_rows: int) -> np.ndarray:
    name = type(self).__name__
    if Y is None:
      raise ValueError(f"{name} requires y to be passed, but the target y is "
                       "None")
    columns = getattr(Y, "columns", None)
    Y = check_array(Y, ensure_2d=False, ensure_all_finite=False, dtype=None,
                    input_name="Y", ensure_min_samples=1)
    if Y.ndim == 2 and Y.shape[1] == 0:
      raise ValueError("Y has 0 target columns; it needs at least one")
    check_consistent_length(np.empty((n_rows, 0)), Y)
    self._Y_columns = (None if columns is None or Y.ndim == 1 else
                       [str(c) for c in columns])
    return Y

  def _target_names(self, k: int) -> list[str]:
    names = getattr(self, "_Y_columns", None)
    if (names and len(set(names)) == k
        and all(n and "/" not in n for n in names)):
      return names
    return [f"y{j}" for j in range(k)]

  # --- training ------------------------------------------------------------

  def _seed(self) -> int:
    return int(check_random_state(self.random_state).randint(2**31 - 1))

  def _fit(self, X, Y, *, incremental: bool, classes=None):
    """`fit`/`partial_fit`: all or nothing. On any error the estimator is
    left as it was (a fitted model stays fitted and consistent)."""
    saved = dict(self.__dict__)
    try:
      return self._fit_unguarded(X, Y, incremental=incremental,
                                 classes=classes)
    except BaseException:
      self.__dict__.clear()
      self.__dict__.update(saved)
      raise

  def _fit_unguarded(self, X, Y, *, incremental: bool, classes):
    self._check_hyperparameters()
    first = not (incremental or self.warm_start) or not hasattr(
        self, "params_")
    X = self._check_X(X, reset=first)
    Y = self._check_Y(Y, X.shape[0])
    k = 1 if Y.ndim == 1 else Y.shape[1]
    if not first and k != self.n_outputs_:
      if incremental:
        raise ValueError(f"partial_fit: y has {k} target(s) but the model "
                         f"was fitted on {self.n_outputs_}")
      first = True  # warm_start on another problem: start again
      X = self._check_X(X, reset=True)
    labels, masks, heads = self._encode_targets(Y, first=first,
                                                classes=classes)
    program = self._program_for(heads)
    rng = check_random_state(self.random_state)
    if first:
      state = program.create_state(self._seed(), float(self.learning_rate))
      history = _History([], [], [], [])
    else:
      state = set_learning_rate(jax.tree.map(jnp.asarray, self._state),
                                float(self.learning_rate))
      history = self._history
      if incremental:
        # Each call shuffles differently, reproducibly for a random_state.
        rng = np.random.RandomState((self._seed() + self.t_) % (2**31 - 1))
    train_rows, val_rows = np.arange(X.shape[0]), None
    if self.early_stopping and not incremental:
      train_rows, val_rows = self._validation_split(masks, rng)
    state, history, converged = self._train(
        program, state, history, (X, labels, masks), train_rows, val_rows,
        rng, epochs=1 if incremental else int(self.max_iter))
    if not (converged or incremental):
      warnings.warn(
          f"{type(self).__name__}: max_iter={self.max_iter} epochs reached "
          "and the optimisation has not converged yet.", ConvergenceWarning)
    self._keep(state, history, heads)
    return self

  def _train(self, program, state, history, data, train_rows, val_rows, rng,
             *, epochs: int):
    """Up to `epochs` epochs with the stopping rule; returns (the state to
    keep: the best validation epoch's with early stopping, the new history,
    whether the rule stopped training)."""
    X, labels, masks = data
    names = program.tasks.names
    history = history.copy()
    if val_rows is not None:
      best = history.best_validation_loss
    else:
      best = min(history.loss, default=np.inf)
    best_state, stall = state, 0
    for _ in range(epochs):
      state, train_loss, weights, task_losses = self._epoch(
          program, state, X, labels, masks, train_rows, rng,
          epoch=len(history.loss) + 1)
      history.add(train_loss, weights, task_losses)
      monitored = train_loss
      if val_rows is not None:
        monitored = self._mean_loss(program, state.params, X[val_rows],
                                    {t: labels[t][val_rows] for t in names},
                                    {t: masks[t][val_rows] for t in names})
        history.validation.append(monitored)
      if self.verbose:
        print(f"epoch {len(history.loss)}: loss {train_loss:.6f}" +
              (f", validation loss {monitored:.6f}"
               if val_rows is not None else ""))
      stall = 0 if monitored < best - self.tol else stall + 1
      if monitored < best:
        best, best_state = monitored, state
      if stall >= self.n_iter_no_change:
        break
    if val_rows is not None:
      history.best_validation_loss = best
      state = best_state.replace(step=state.step)
    return state, history, stall >= self.n_iter_no_change

  def _keep(self, state, history: _History, heads: tuple) -> None:
    """Stores the fitted state and sets the public fitted attributes."""
    self._heads = heads
    self._history = history
    self._state = _to_numpy(state)
    self.params_ = self._state.params
    self.t_ = int(state.step)
    self.n_iter_ = len(history.loss)
    self.n_outputs_ = len(heads)
    self.target_names_ = [name for name, _ in heads]
    self.loss_curve_ = list(history.loss)
    self.task_weight_curve_ = np.array(history.weights).reshape(-1,
                                                                len(heads))
    self.task_loss_curve_ = np.array(history.task_losses).reshape(
        -1, len(heads))
    self.validation_loss_curve_ = (list(history.validation)
                                   if self.early_stopping else None)
    self.best_validation_loss_ = (history.best_validation_loss
                                  if self.early_stopping else None)
    self.task_weights_ = dict(zip(self.target_names_,
                                  self.task_weight_curve_[-1].tolist()))

  def _validation_split(self, masks, rng):
    labelled = np.flatnonzero(
        np.stack(list(masks.values()), axis=1).max(axis=1) > 0)
    n_val = int(math.ceil(self.validation_fraction * labelled.size))
    if n_val < 1 or n_val >= labelled.size:
      raise ValueError(
          f"{type(self).__name__}: early_stopping needs rows with a target on "
          f"both sides of validation_fraction={self.validation_fraction}; "
          f"there are {labelled.size} such rows")
    perm = rng.permutation(labelled)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])

  def _epoch(self, program, state, X, labels, masks, rows, rng, *,
             epoch: int):
    """One shuffled pass over `rows`: (state, mean loss over tasks, the
    weights at the last step, each task's mean loss (NaN if unlabelled))."""
    names = program.tasks.names
    b = int(self.batch_size)
    perm = rng.permutation(rows)
    num_batches = max(1, -(-perm.size // b))
    chunk = _CHUNK
    total = -(-num_batches // chunk) * chunk
    index = np.zeros(total * b, np.int64)
    valid = np.zeros(total * b, np.float32)
    index[:perm.size] = perm
    valid[:perm.size] = 1.0
    index = index.reshape(total, b)
    valid = valid.reshape(total, b)
    active = np.arange(total) < num_batches
    sums = np.zeros(len(names))
    counts = np.zeros(len(names))
    weights = np.zeros(len(names))
    for start in range(0, total, chunk):
      sel = index[start:start + chunk]
      ok = valid[start:start + chunk]
      batches = {"inputs": X[sel],
                 "labels": {t: labels[t][sel] for t in names},
                 "masks": {t: masks[t][sel] * ok for t in names}}
      on = active[start:start + chunk]
      state, metrics = program.run(state, batches, on)
      metrics = jax.device_get(metrics)
      if not np.all(np.isfinite(metrics["loss"][on])):
        raise ValueError(
            f"{type(self).__name__}: the training loss became NaN/Inf at "
            f"epoch {epoch}; lower learning_rate (now "
            f"{self.learning_rate}) or check the inputs' scale")
      for j, t in enumerate(names):
        c = metrics[f"{t}/count"][on]
        sums[j] += float(np.sum(metrics[f"{t}/loss"][on] * c))
        counts[j] += float(np.sum(c))
        weights[j] = float(metrics[f"{t}/weight"][on][-1])
    seen = counts > 0
    per_task = np.full(len(names), np.nan)
    per_task[seen] = sums[seen] / counts[seen]
    mean = float(np.mean(per_task[seen])) if seen.any() else 0.0
    return state, mean, weights, per_task

  def _raw_predict(self, program, params, X) -> dict[str, np.ndarray]:
    """The model's outputs for every row, `_PREDICT_ROWS` rows at a time."""
    n = X.shape[0]
    out = {t: [] for t in program.tasks.names}
    padded = np.zeros((_PREDICT_ROWS, X.shape[1]), np.float32)
    for start in range(0, n, _PREDICT_ROWS):
      part = X[start:start + _PREDICT_ROWS]
      padded[:part.shape[0]] = part
      pred = jax.device_get(program.apply(params, padded))
      for t in out:
        out[t].append(np.asarray(pred[t][:part.shape[0]], np.float64))
    return {t: np.concatenate(v) for t, v in out.items()}

  def _mean_loss(self, program, params, X, labels, masks) -> float:
    """Mean over targets of each target's mean loss on the rows given."""
    pred = self._raw_predict(program, params, X)
    losses = []
    for task in program.tasks:
      m = masks[task.name] > 0
      if not m.any():
        continue
      p, y = pred[task.name][m], labels[task.name][m]
      if task.kind == "regression":
        losses.append(float(np.mean((p - y) ** 2)))
      else:
        logz = np.logaddexp.reduce(p, axis=1)
        losses.append(float(np.mean(logz - p[np.arange(p.shape[0]), y])))
    return float(np.mean(losses)) if losses else 0.0

  def _fitted_program(self, X) -> tuple[_Program, np.ndarray]:
    check_is_fitted(self, "params_")
    X = self._check_X(X, reset=False)
    return self._program_for(self._heads), X

  def __getstate__(self):
    state = self.__dict__.copy()
    state.pop("_Y_columns", None)
    return state


class MultiTaskRegressor(RegressorMixin, _MultiTaskEstimator):
  """A multi-task network for several regression targets, NaN = missing.

  Args (all keyword-only; see the module docstring for the conventions):
    architecture: "hard_sharing" (a shared MLP trunk and a linear head per
      target; default) or another of `ARCHITECTURES` (soft sharing,
      cross-stitch, mixture-of-experts models on the MLP as expert).
    hidden_sizes: the trunk's hidden layer widths.
    head_hidden_sizes: hidden layers of each target's head (default none).
    architecture_options: the architecture's hyperparameters, e.g.
      `{"num_experts": 4}` for "mmoe".
    weighting: a loss weighting method (`mtl_jax.WEIGHTINGS`: "equal",
      "uncertainty", "gradnorm", "dwa", ...), with `weighting_options`.
    aggregation: "none" (the weighted sum of the losses) or a gradient
      aggregation method (`mtl_jax.AGGREGATORS`: "upgrad", "pcgrad",
      "imtl_g", ...), with `aggregation_options`.
    learning_rate, weight_decay: Adam(W)'s.
    batch_size: rows per step; max_iter: epochs.
    tol, n_iter_no_change, early_stopping, validation_fraction: the stopping
      rule (module docstring).
    standardize_targets: standardise each target over its observed values.
    warm_start: `fit` continues from the fitted model.
    random_state: an int for reproducible fits.
    verbose: print the loss per epoch.
  """

  def __init__(self, *, architecture="hard_sharing", hidden_sizes=(64, 64),
               head_hidden_sizes=(), architecture_options=None,
               weighting="equal", weighting_options=None, aggregation="none",
               aggregation_options=None, learning_rate=1e-3, weight_decay=0.0,
               batch_size=64, max_iter=200, tol=1e-4, n_iter_no_change=10,
               early_stopping=False, validation_fraction=0.1,
               standardize_targets=True, warm_start=False, random_state=None,
               verbose=0):
    super().__init__(
        architecture=architecture, hidden_sizes=hidden_sizes,
        head_hidden_sizes=head_hidden_sizes,
        architecture_options=architecture_options, weighting=weighting,
        weighting_options=weighting_options, aggregation=aggregation,
        aggregation_options=aggregation_options, learning_rate=learning_rate,
        weight_decay=weight_decay, batch_size=batch_size, max_iter=max_iter,
        tol=tol, n_iter_no_change=n_iter_no_change,
        early_stopping=early_stopping,
        validation_fraction=validation_fraction, warm_start=warm_start,
        random_state=random_state, verbose=verbose)
    self.standardize_targets = standardize_targets

  def fit(self, X, y):
    """Fits on `X [n, d]` and `y [n]` or `[n, k]` (NaN where missing)."""
    return self._fit(X, y, incremental=False)

  def partial_fit(self, X, y):
    """One epoch on `(X, y)`; the first call initialises the model."""
    return self._fit(X, y, incremental=True)

  def _encode_targets(self, Y, *, first: bool, classes=None):
    del classes
    if Y.dtype.kind not in "biuf":
      try:
        Y = Y.astype(np.float64)
      except (TypeError, ValueError) as e:
        raise ValueError(f"Y must be numeric (NaN where missing) for a "
                         f"regressor, got dtype {Y.dtype}: {e}") from e
    Y = np.asarray(Y, np.float64)
    if np.isinf(Y).any():
      raise ValueError("Input Y contains infinity; mark a missing target "
                       "with NaN")
    self._y_1d = Y.ndim == 1 if first else self._y_1d
    Y2 = Y.reshape(Y.shape[0], -1)
    observed = ~np.isnan(Y2)
    empty = np.flatnonzero(~observed.any(axis=0))
    if empty.size:
      raise ValueError(
          f"Input Y contains NaN only: target column(s) {empty.tolist()} are "
          "missing in every row; drop them (a target needs at least one "
          "observed value)")
    k = Y2.shape[1]
    if first:
      mean = np.zeros(k)
      scale = np.ones(k)
      if self.standardize_targets:
        for j in range(k):
          v = Y2[observed[:, j], j]
          mean[j] = v.mean()
          std = v.std()
          scale[j] = std if std > 0 else 1.0
      self.y_mean_, self.y_scale_ = mean, scale
    names = self._target_names(k) if first else self.target_names_
    heads = tuple((n, 0) for n in names)
    z = (np.where(observed, Y2, 0.0) - self.y_mean_) / self.y_scale_
    labels, masks = {}, {}
    for j, (name, _) in enumerate(heads):
      labels[name] = np.where(observed[:, j], z[:, j], 0.0).astype(np.float32)
      masks[name] = observed[:, j].astype(np.float32)
    return labels, masks, heads

  def predict(self, X):
    """Predictions `[n]` (fitted on a 1-d y) or `[n, k]`, float64."""
    program, X = self._fitted_program(X)
    raw = self._raw_predict(program, self.params_, X)
    Y = np.stack([raw[t] for t in program.tasks.names], axis=1)
    Y = Y * self.y_scale_ + self.y_mean_
    return Y[:, 0] if self._y_1d else Y

  def score(self, X, y, sample_weight=None):
    """Mean R^2 over targets, each over the rows where it is observed."""
    y = np.asarray(y, np.float64)
    pred = self.predict(X)
    if y.ndim == 1 and not np.isnan(y).any():
      return r2_score(y, pred, sample_weight=sample_weight)
    y2 = y.reshape(y.shape[0], -1)
    pred2 = pred.reshape(pred.shape[0], -1)
    scores = []
    for j in range(y2.shape[1]):
      m = ~np.isnan(y2[:, j])
      if m.sum() >= 2:
        w = None if sample_weight is None else np.asarray(sample_weight)[m]
        scores.append(r2_score(y2[m, j], pred2[m, j], sample_weight=w))
    if not scores:
      raise ValueError("score needs a target observed in at least 2 rows")
    return float(np.mean(scores))


def _class_values(values: np.ndarray, column: int) -> np.ndarray:
  """A column's observed class labels in one dtype: numbers in an object
  array become numeric, and integer-valued floats (a float column that held
  NaN for missing) become ints; strings stay strings."""
  if values.dtype.kind == "O":
    is_str = np.array([isinstance(v, str) for v in values], bool)
    if is_str.any() and not is_str.all():
      raise ValueError(f"target column {column} mixes strings and other "
                       "labels")
    if not is_str.any():
      try:
        values = np.asarray(values.tolist(), np.float64)
      except (TypeError, ValueError) as e:
        raise ValueError(f"target column {column}: labels must be strings or "
                         f"numbers: {e}") from e
    else:
      values = values.astype(str)
  if values.dtype.kind == "f" and np.all(values == np.round(values)):
    values = values.astype(np.int64)
  return values


class MultiTaskClassifier(ClassifierMixin, _MultiTaskEstimator):
  """A multi-task network for several class targets, some missing.

  Each column of `Y` is a classification task over its own classes (two or
  more); a multilabel indicator matrix is `k` binary targets. A missing target
  is NaN, None, or `missing_label`. `predict` returns the classes `[n]` or
  `[n, k]`; `predict_proba` an array `[n, C]` (one target) or a list of `k`
  arrays `[n, C_j]`, scikit-learn's multi-output convention. The other
  arguments are the regressor's (`MultiTaskRegressor`).
  """

  def __init__(self, *, architecture="hard_sharing", hidden_sizes=(64, 64),
               head_hidden_sizes=(), architecture_options=None,
               weighting="equal", weighting_options=None, aggregation="none",
               aggregation_options=None, learning_rate=1e-3, weight_decay=0.0,
               batch_size=64, max_iter=200, tol=1e-4, n_iter_no_change=10,
               early_stopping=False, validation_fraction=0.1,
               missing_label=None, warm_start=False, random_state=None,
               verbose=0):
    super().__init__(
        architecture=architecture, hidden_sizes=hidden_sizes,
        head_hidden_sizes=head_hidden_sizes,
        architecture_options=architecture_options, weighting=weighting,
        weighting_options=weighting_options, aggregation=aggregation,
        aggregation_options=aggregation_options, learning_rate=learning_rate,
        weight_decay=weight_decay, batch_size=batch_size, max_iter=max_iter,
        tol=tol, n_iter_no_change=n_iter_no_change,
        early_stopping=early_stopping,
        validation_fraction=validation_fraction, warm_start=warm_start,
        random_state=random_state, verbose=verbose)
    self.missing_label = missing_label

  def __sklearn_tags__(self):
    tags = super().__sklearn_tags__()
    tags.classifier_tags.multi_label = True
    return tags

  def fit(self, X, y):
    """Fits on `X [n, d]` and class targets `y [n]` or `[n, k]`."""
    return self._fit(X, y, incremental=False)

  def partial_fit(self, X, y, classes=None):
    """One epoch; the first call takes `classes` (an array, or a list of
    arrays for several targets) or infers them from this call's `y`."""
    return self._fit(X, y, incremental=True, classes=classes)

  def _missing(self, column: np.ndarray) -> np.ndarray:
    if column.dtype.kind == "f":
      missing = np.isnan(column)
    elif column.dtype.kind == "O":
      missing = np.array([v is None or (isinstance(v, float) and np.isnan(v))
                          for v in column], bool)
    else:
      missing = np.zeros(column.shape, bool)
    if self.missing_label is not None:
      missing |= np.array([v == self.missing_label for v in column.tolist()],
                          bool)
    return missing

  def _encode_targets(self, Y, *, first: bool, classes=None):
    self._y_1d = Y.ndim == 1 if first else self._y_1d
    Y2 = Y.reshape(Y.shape[0], -1)
    k = Y2.shape[1]
    if classes is not None and first:
      classes = [classes] if k == 1 and np.ndim(classes[0]) == 0 else classes
      if len(classes) != k:
        raise ValueError(f"classes has {len(classes)} entries for {k} "
                         "target(s)")
    observed = np.stack([~self._missing(Y2[:, j]) for j in range(k)], axis=1)
    empty = np.flatnonzero(~observed.any(axis=0))
    if empty.size:
      raise ValueError(
          f"Input Y contains NaN only: target column(s) {empty.tolist()} are "
          "missing in every row; drop them (a target needs at least one "
          "observed value)")
    columns = [_class_values(Y2[observed[:, j], j], j) for j in range(k)]
    if first:
      all_classes = []
      for j, values in enumerate(columns):
        check_classification_targets(values)
        found = np.unique(values) if classes is None else np.unique(
            np.asarray(classes[j]))
        if classes is not None:
          unseen = np.setdiff1d(np.unique(values), found)
          if unseen.size:
            raise ValueError(f"target column {j} has classes {unseen} that "
                             f"are not in classes={found}")
        if found.size < 2:
          raise ValueError(
              f"target column {j} has one class ({found.tolist()}); a "
              "classification target needs at least 2 classes")
        all_classes.append(found)
      self._classes = all_classes
    names = self._target_names(k) if first else self.target_names_
    heads = tuple((n, int(c.size)) for n, c in zip(names, self._classes))
    labels, masks = {}, {}
    for j, name in enumerate(names):
      idx = np.zeros(Y2.shape[0], np.int32)
      obs = observed[:, j]
      values = columns[j]
      pos = np.searchsorted(self._classes[j], values)
      pos = np.clip(pos, 0, self._classes[j].size - 1)
      bad = self._classes[j][pos] != values
      if np.any(bad):
        raise ValueError(
            f"target column {j} has labels {np.unique(values[bad])} not seen "
            f"when the model was first fitted (classes "
            f"{self._classes[j].tolist()})")
      idx[obs] = pos
      labels[name] = idx
      masks[name] = obs.astype(np.float32)
    if first:
      self.classes_ = (self._classes[0] if self._y_1d else
                       list(self._classes))
    return labels, masks, heads

  def predict_proba(self, X):
    """Class probabilities: `[n, C]`, or a list of `[n, C_j]` per target."""
    program, X = self._fitted_program(X)
    raw = self._raw_predict(program, self.params_, X)
    probs = []
    for t in program.tasks.names:
      logits = raw[t]
      p = np.exp(logits - logits.max(axis=1, keepdims=True))
      probs.append(p / p.sum(axis=1, keepdims=True))
    return probs[0] if self._y_1d else probs

  def predict_log_proba(self, X):
    proba = self.predict_proba(X)
    if isinstance(proba, list):
      return [np.log(p) for p in proba]
    return np.log(proba)

  def predict(self, X):
    """The most probable class of every target: `[n]` or `[n, k]`."""
    program, X = self._fitted_program(X)
    raw = self._raw_predict(program, self.params_, X)
    out = [c[np.argmax(raw[t], axis=1)]
           for t, c in zip(program.tasks.names, self._classes)]
    if self._y_1d:
      return out[0]
    if len({c.dtype for c in out}) > 1:
      return np.stack([c.astype(object) for c in out], axis=1)
    return np.stack(out, axis=1)

  def score(self, X, y, sample_weight=None):
    """Mean accuracy over targets, each over the rows where it is observed
    (for one target without missing values: scikit-learn's accuracy)."""
    y = np.asarray(y)
    pred = self.predict(X)
    y2 = y.reshape(y.shape[0], -1)
    pred2 = pred.reshape(pred.shape[0], -1)
    scores = []
    for j in range(y2.shape[1]):
      m = ~self._missing(y2[:, j])
      if m.any():
        w = None if sample_weight is None else np.asarray(sample_weight)[m]
        scores.append(np.average(pred2[m, j] == y2[m, j], weights=w))
    if not scores:
      raise ValueError("score needs a target observed in at least 1 row")
    return float(np.mean(scores))
