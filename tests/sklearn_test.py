"""The scikit-learn estimators (`mtl_jax.sklearn`).

scikit-learn's own estimator checks run on both estimators with their default
hyperparameters. Three of them skip themselves here, by design of the checks:
two array-API checks (they run only with SCIPY_ARRAY_API=1 and an array-API
library installed; the estimators take numpy input and claim no array-API
support) and the classifier's decision_function check (the classifier has
predict_proba, no decision_function). Every other check runs and passes.

The other tests share one problem structure (5 features, 3 targets, the
small network of `_small`) so that they reuse one compiled step.
"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import GridSearchCV
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from mtl_jax.sklearn import MultiTaskClassifier
from mtl_jax.sklearn import MultiTaskRegressor

pytestmark = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning")


@parametrize_with_checks([MultiTaskRegressor(), MultiTaskClassifier()])
def test_scikit_learn_estimator_checks(estimator, check):
  check(estimator)


def _regression(n=120, missing=0.3, seed=0):
  """Y = X W + noise, 5 features, 3 targets, `missing` of Y NaN."""
  rng = np.random.default_rng(seed)
  X = rng.normal(size=(n, 5))
  Y = X @ rng.normal(size=(5, 3)) + 0.1 * rng.normal(size=(n, 3))
  Y[rng.random(Y.shape) < missing] = np.nan
  return X, Y


def _small(cls=MultiTaskRegressor, **kwargs):
  defaults = dict(hidden_sizes=(16,), batch_size=32, max_iter=20,
                  learning_rate=1e-2, random_state=0)
  return cls(**{**defaults, **kwargs})


def test_pickled_estimator_predicts_and_continues_the_same():
  X, Y = _regression()
  est = _small().fit(X, Y)
  copy = pickle.loads(pickle.dumps(est))
  np.testing.assert_array_equal(copy.predict(X), est.predict(X))
  # Its whole state travelled: one more epoch moves both identically.
  est.partial_fit(X, Y)
  copy.partial_fit(X, Y)
  np.testing.assert_array_equal(copy.predict(X), est.predict(X))
  assert copy.t_ == est.t_ == 20 * 4 + 4  # 120 rows: 4 batches an epoch


def test_fit_is_reproducible_with_random_state():
  X, Y = _regression()
  a = _small(random_state=3).fit(X, Y).predict(X)
  b = _small(random_state=3).fit(X, Y).predict(X)
  c = _small(random_state=4).fit(X, Y).predict(X)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3


def test_rows_without_any_target_change_nothing():
  """Appending rows with every target missing gives the same fit: with one
  batch an epoch, the same labelled rows make every step (summed in another
  order, hence the float tolerance)."""
  X, Y = _regression(n=100)
  rng = np.random.default_rng(1)
  X_more = np.concatenate([X, rng.normal(size=(40, 5))])
  Y_more = np.concatenate([Y, np.full((40, 3), np.nan)])
  kwargs = dict(batch_size=256, max_iter=30, tol=0.0)
  a = _small(**kwargs).fit(X, Y)
  b = _small(**kwargs).fit(X_more, Y_more)
  assert a.t_ == b.t_ == 30
  np.testing.assert_allclose(b.predict(X), a.predict(X), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(b.loss_curve_, a.loss_curve_, rtol=1e-5)
  # The epoch's loss is the mean over targets of each target's mean loss.
  assert b.task_loss_curve_.shape == (30, 3)
  np.testing.assert_allclose(b.task_loss_curve_.mean(axis=1), b.loss_curve_,
                             rtol=1e-12)


def test_targets_are_standardised_and_mapped_back():
  """A target's affine change changes nothing but the mapped predictions."""
  X, Y = _regression()
  scaled = Y * np.array([1000.0, 1.0, 0.01]) + np.array([5.0, 0.0, 2.0])
  a = _small().fit(X, Y)
  b = _small().fit(X, scaled)
  np.testing.assert_allclose(b.y_mean_, np.nanmean(scaled, axis=0))
  np.testing.assert_allclose(b.y_scale_, np.nanstd(scaled, axis=0))
  np.testing.assert_allclose(
      b.predict(X), a.predict(X) * np.array([1000.0, 1.0, 0.01])
      + np.array([5.0, 0.0, 2.0]), rtol=1e-6, atol=1e-6 * 1000)
  assert a.score(X, Y) > 0.95  # R^2 over the observed targets


def test_classifier_missing_markers_string_classes_and_probabilities():
  rng = np.random.default_rng(0)
  X = rng.normal(size=(120, 5))
  colour = np.where(X[:, 0] > 0, "red", "blue").astype(object)
  size = np.digitize(X[:, 1], [-0.5, 0.5])  # classes 0, 1, 2
  colour[rng.random(120) < 0.3] = None
  size_nan = size.astype(float)
  hidden = rng.random(120) < 0.3
  size_nan[hidden] = np.nan
  size_marked = np.where(hidden, -1, size)
  Y_nan = np.stack([colour, size_nan.astype(object)], axis=1)
  Y_marked = np.stack([colour, size_marked.astype(object)], axis=1)
  a = _small(MultiTaskClassifier).fit(X, Y_nan)
  b = _small(MultiTaskClassifier, missing_label=-1).fit(X, Y_marked)
  assert [list(c) for c in a.classes_] == [["blue", "red"], [0, 1, 2]]
  np.testing.assert_array_equal(a.predict(X), b.predict(X))
  proba = a.predict_proba(X)
  assert [p.shape for p in proba] == [(120, 2), (120, 3)]
  for p in proba:
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
  pred = a.predict(X)
  for j, p in enumerate(proba):
    np.testing.assert_array_equal(pred[:, j],
                                  a.classes_[j][np.argmax(p, axis=1)])
  assert a.score(X, Y_nan) > 0.9


def test_partial_fit_classes_and_epochs():
  rng = np.random.default_rng(0)
  X = rng.normal(size=(64, 5))
  y = np.digitize(X[:, 0], [-0.5, 0.5])
  est = _small(MultiTaskClassifier)
  # The first call sees classes 0 and 1 only; `classes` declares all three.
  first = y < 2
  est.partial_fit(X[first], y[first], classes=[0, 1, 2])
  assert est.t_ == -(-first.sum() // 32) and est.n_iter_ == 1
  est.partial_fit(X, y)
  assert est.t_ == -(-first.sum() // 32) + 2 and est.n_iter_ == 2
  np.testing.assert_array_equal(est.classes_, [0, 1, 2])
  with pytest.raises(ValueError, match=r"labels \[7\] not seen"):
    est.partial_fit(X[:3], np.array([0, 1, 7]))


def test_warm_start_continues_from_the_fitted_model():
  X, Y = _regression()
  est = _small(max_iter=5, tol=0.0, n_iter_no_change=100).fit(X, Y)
  curve = list(est.loss_curve_)
  est.set_params(warm_start=True)
  est.fit(X, Y)
  assert est.n_iter_ == 10 and est.t_ == 40
  assert est.loss_curve_[:5] == curve
  assert est.loss_curve_[5] < curve[0]
  # Another number of targets starts again.
  est.fit(X, Y[:, :2])
  assert est.n_outputs_ == 2 and est.n_iter_ == 5


def test_early_stopping_keeps_the_best_validation_epoch():
  X, Y = _regression(n=200)
  est = _small(early_stopping=True, validation_fraction=0.2,
               n_iter_no_change=3, tol=0.0, max_iter=200,
               learning_rate=0.05).fit(X, Y)
  curve = np.array(est.validation_loss_curve_)
  assert len(curve) == est.n_iter_ == len(est.loss_curve_)
  assert est.best_validation_loss_ == curve.min()
  if est.n_iter_ < 200:  # stopped: 3 epochs without improvement
    assert est.n_iter_ == int(np.argmin(curve)) + 1 + 3


def test_pipeline_grid_search_and_cross_val_score_with_missing_targets():
  X, Y = _regression(n=150)
  pipe = make_pipeline(StandardScaler(), _small(max_iter=10))
  search = GridSearchCV(pipe, {"multitaskregressor__learning_rate":
                               [1e-3, 1e-2]}, cv=2).fit(X, Y)
  assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
  assert search.best_params_ == {"multitaskregressor__learning_rate": 1e-2}
  scores = cross_val_score(pipe, X, Y, cv=3)
  assert scores.shape == (3,) and np.all(scores > 0.5)


def test_dataframe_target_columns_name_the_tasks():
  X, Y = _regression()
  frame = pd.DataFrame(Y, columns=["solubility", "logp", "toxicity"])
  est = _small().fit(pd.DataFrame(X, columns=list("abcde")), frame)
  assert est.target_names_ == ["solubility", "logp", "toxicity"]
  assert set(est.task_weights_) == set(est.target_names_)
  assert list(est.feature_names_in_) == list("abcde")


@pytest.mark.parametrize("weighting", ["gradnorm", "uncertainty"])
def test_loss_scale_methods_weight_down_the_large_scale_target(weighting):
  """Targets of scales 1 and 10, not standardised: both methods give the
  large target the smaller weight (GradNorm balances gradient norms;
  uncertainty weighting's 1/(2 sigma^2) tracks the inverse loss)."""
  rng = np.random.default_rng(0)
  X = rng.normal(size=(256, 5))
  base = np.tanh(X @ rng.normal(size=5))
  Y = np.stack([base, 10.0 * np.tanh(X @ rng.normal(size=5)), base], axis=1)
  options = {"learning_rate": 0.05} if weighting == "uncertainty" else None
  est = _small(weighting=weighting, weighting_options=options,
               standardize_targets=False, max_iter=30, tol=0.0).fit(X, Y)
  w = est.task_weights_
  assert w["y1"] < 0.5 * min(w["y0"], w["y2"]), w
  if weighting == "gradnorm":
    np.testing.assert_allclose(sum(w.values()), 3.0, rtol=1e-5)


def test_another_architecture_and_a_gradient_aggregator():
  X, Y = _regression()
  est = _small(architecture="mmoe", architecture_options={"num_experts": 2},
               aggregation="upgrad", max_iter=40).fit(X, Y)
  assert est.score(X, Y) > 0.8


@pytest.mark.parametrize("kwargs, Y_fn, match", [
    ({}, lambda Y: Y[:-1], "inconsistent numbers of samples"),
    ({}, lambda Y: Y[:, :, None], "Found array with dim 3"),
    ({}, lambda Y: np.where(np.arange(3) == 1, np.nan, Y),
     r"column\(s\) \[1\] are missing in every row"),
    ({}, lambda Y: np.where(np.arange(3) == 2, np.inf, Y), "infinity"),
    ({"weighting": "gradnrom"}, None,
     "weighting='gradnrom' is not a weighting method; valid: .*gradnorm"),
    ({"aggregation": "upgrade"}, None,
     "aggregation='upgrade' is not an aggregation method; valid: none, .*"),
    ({"architecture": "mtan"}, None, "architecture='mtan' is not valid"),
    ({"weighting_options": {"alpha": 1.5, "bogus": 1}}, None, "bogus"),
    ({"hidden_sizes": (16, 0)}, None, "hidden_sizes must be a tuple of "
     "positive ints"),
])
def test_bad_input_is_a_clear_error(kwargs, Y_fn, match):
  X, Y = _regression()
  if Y_fn is not None:
    Y = Y_fn(Y)
  kwargs = {**kwargs, "weighting": kwargs.get("weighting", "equal")}
  if "bogus" in str(kwargs):
    kwargs["weighting"] = "gradnorm"
  with pytest.raises(ValueError, match=match):
    _small(**kwargs).fit(X, Y)


def test_non_numeric_inputs_are_refused():
  X, Y = _regression(n=10)
  X = X.astype(object)
  X[3, 2] = "high"
  with pytest.raises(ValueError, match="could not convert|Unable to convert"):
    _small().fit(X, Y)
  with pytest.raises(ValueError, match="Y must be numeric"):
    _small().fit(X[:, :2].astype(float), np.array([["a"]] * 10))


def test_a_non_finite_loss_is_a_clear_error_and_keeps_the_fitted_model():
  X, Y = _regression()
  est = _small(max_iter=2, tol=0.0).fit(X, Y)  # 2 epochs, then epoch 3:
  before = est.predict(X)
  with pytest.raises(ValueError, match="loss became NaN/Inf at epoch 3; "
                     "lower learning_rate"):
    est.set_params(warm_start=True).fit(X * 1e30, Y)
  np.testing.assert_array_equal(est.predict(X), before)


def test_a_failed_fit_leaves_the_fitted_model_as_it_was():
  """A fit that fails part-way (here: a non-finite loss in a fresh fit on
  2 targets) restores every attribute: the 3-target model still predicts."""
  X, Y = _regression()
  est = _small(max_iter=2, tol=0.0).fit(X, Y)
  before = dict(pred=est.predict(X), n_iter=est.n_iter_, t=est.t_,
                curve=list(est.loss_curve_))
  with pytest.raises(ValueError, match="NaN/Inf at epoch 1"):
    est.fit(X * 1e30, Y[:, :2])
  np.testing.assert_array_equal(est.predict(X), before["pred"])
  assert (est.n_outputs_, est.n_iter_, est.t_) == (3, 2, before["t"])
  assert est.loss_curve_ == before["curve"]
