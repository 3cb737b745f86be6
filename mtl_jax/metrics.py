"""Masked metrics as summable sufficient statistics.

A `Metric` is a pair of pure functions in the style of optax's
`GradientTransformation`:

* `stats(pred, label, mask) -> {stat: float32 scalar}`: jit-able sufficient
  statistics that are SUMS, so they add across batches (`add_stats`), devices
  (`jax.lax.psum`) and hosts, whatever the batch split;
* `finalize(summed_stats) -> float`: the metric value, computed once on the host
  from the accumulated sums. It accepts NumPy or (concrete) JAX scalars,
  computes in float64, and returns `float('nan')` when the metric is undefined
  (nothing labelled, or F1 with no positives at all): undefined is not 0.

Mask semantics follow `mtl_jax.losses`: `mask` is float (1 labelled, 0 not,
fractional = weight, negative treated as 0), its shape is a prefix of the label
shape (`[B]` per example or `[B, ...]` dense), and unlabelled positions cannot
leak inf/NaN into a statistic (every sum is guarded with `jnp.where`). Trailing
axes the mask does not cover are handled per metric:

* `accuracy` and `f1` count ELEMENTS: a `[B]` mask on `[B, T]` token labels
  broadcasts over `T` and `count` is the number of labelled tokens.
* `mae`, `mse` and `rmse` AVERAGE the trailing axes first, exactly like the
  losses, so `count` is the number of labelled mask positions (examples for a
  `[B]` mask). Because every position has the same number of trailing
  elements, the final value equals the element-wise one; only `count` differs.
* `psnr` is per example: see `psnr`.

Stats are float32 on device. When counts can exceed 2^24 (the float32 integer
range), accumulate on the host in float64:
`add_stats(acc, jax.tree.map(np.float64, jax.device_get(stats)))`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from mtl_jax import losses

Stats = dict[str, jax.Array]


class Metric(NamedTuple):
  """A masked metric.

  Attributes:
    name: short name used as the key in reports (e.g. "accuracy", "rmse").
    stats: `(pred, label, mask) -> {stat: scalar}`; summable, jit-able.
    finalize: `{stat: summed scalar} -> float`; NaN when undefined.
  """

  name: str
  stats: Callable[[ArrayLike, ArrayLike, ArrayLike], Stats]
  finalize: Callable[[Mapping[str, Any]], float]


def _as_float(x: Any) -> float:
  # float64 on the host: the finalize step runs once, and float32 division of
  # large accumulated counts would lose digits for no gain.
  return float(np.asarray(x, dtype=np.float64))


def _ratio(numerator: Any, denominator: Any) -> float:
  den = _as_float(denominator)
  return _as_float(numerator) / den if den > 0 else math.nan


def _elementwise_weights(mask: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
  """The cleaned mask broadcast to `shape` (element-wise counting)."""
  mask = losses.clean_mask(mask)
  return jnp.broadcast_to(losses.expand_mask(mask, len(shape)), shape)


def _weighted_sum(values: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(weights > 0, weights * values, 0.0)).astype(
      jnp.float32)


def _check_regression(caller: str, pred: jax.Array, label: jax.Array,
                      mask: ArrayLike) -> None:
  if pred.shape != label.shape:
    raise ValueError(f"{caller}: pred shape {pred.shape} does not match label "
                     f"shape {label.shape}; they must be equal (no "
                     "broadcasting)")
  losses.validate_mask(jnp.shape(mask), pred.shape, caller)


# --------------------------------------------------------------------------
# Classification.
# --------------------------------------------------------------------------


def accuracy() -> Metric:
  """Top-1 accuracy of logits `[B, ..., C]` against integer labels `[B, ...]`.

  Counts elements: with a dense or a `[B]` mask on `[B, T]` labels each labelled
  token counts once (times its mask weight). Ties in the logits go to the lowest
  class index (`argmax`).

  Returns:
    A `Metric` named "accuracy" with stats `{"correct", "count"}`.
  """

  def stats(logits: ArrayLike, labels: ArrayLike, mask: ArrayLike) -> Stats:
    caller = "accuracy"
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.ndim < 2 or labels.shape != logits.shape[:-1]:
      raise ValueError(f"{caller}: labels shape {labels.shape} does not match "
                       f"logits shape {logits.shape} without its class axis")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"{caller}: labels must be integer class indices, got "
                       f"dtype {labels.dtype}")
    losses.validate_mask(jnp.shape(mask), labels.shape, caller)
    weights = _elementwise_weights(mask, labels.shape)  # [B, ...]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {"correct": _weighted_sum(correct, weights),
            "count": _weighted_sum(jnp.ones_like(weights), weights)}

  def finalize(summed: Mapping[str, Any]) -> float:
    return _ratio(summed["correct"], summed["count"])

  return Metric("accuracy", stats, finalize)


def binary_f1(threshold: float = 0.0) -> Metric:
  """Micro-averaged F1 of a binary or multi-label task, from LOGITS.

  An element is predicted positive iff `logit > threshold` (0.0 is probability
  0.5) and is a true positive iff `label >= 0.5` (soft targets are rounded).
  tp/fp/fn are summed over all labelled elements of all labels (micro
  average), weighted by the mask; `f1 = 2tp / (2tp + fp + fn)`, NaN when the
  denominator is 0 (no positive predictions and no positive labels).

  Args:
    threshold: logit threshold for a positive prediction.

  Returns:
    A `Metric` named "f1" with stats `{"tp", "fp", "fn"}`.
  """

  def stats(logits: ArrayLike, labels: ArrayLike, mask: ArrayLike) -> Stats:
    caller = "f1"
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.shape != labels.shape:
      raise ValueError(f"{caller}: logits shape {logits.shape} does not match "
                       f"labels shape {labels.shape}")
    losses.validate_mask(jnp.shape(mask), labels.shape, caller)
    weights = _elementwise_weights(mask, labels.shape)  # [B, ...]
    predicted = (logits > threshold).astype(jnp.float32)
    actual = (labels >= 0.5).astype(jnp.float32)
    return {"tp": _weighted_sum(predicted * actual, weights),
            "fp": _weighted_sum(predicted * (1.0 - actual), weights),
            "fn": _weighted_sum((1.0 - predicted) * actual, weights)}

  def finalize(summed: Mapping[str, Any]) -> float:
    tp2 = 2.0 * _as_float(summed["tp"])
    return _ratio(tp2, tp2 + _as_float(summed["fp"]) + _as_float(summed["fn"]))

  return Metric("f1", stats, finalize)


# --------------------------------------------------------------------------
# Regression.
# --------------------------------------------------------------------------


def _error_sum_stats(caller: str, error_fn: Callable[[jax.Array], jax.Array],
                     key: str) -> Callable[..., Stats]:
  """Stats `{key: sum of per-position mean error, "count"}` (loss semantics)."""

  def stats(pred: ArrayLike, label: ArrayLike, mask: ArrayLike) -> Stats:
    pred, label = jnp.asarray(pred), jnp.asarray(label)
    _check_regression(caller, pred, label, mask)
    mask = losses.clean_mask(mask)
    err = pred.astype(jnp.float32) - label.astype(jnp.float32)
    total, count = losses.masked_sum_and_count(error_fn(err), mask)
    return {key: total, "count": count}

  return stats


def mean_absolute_error() -> Metric:
  """Mean absolute error; trailing axes beyond the mask are averaged first.

  Returns:
    A `Metric` named "mae" with stats `{"sum_abs_error", "count"}`.
  """
  return Metric(
      "mae", _error_sum_stats("mae", jnp.abs, "sum_abs_error"),
      lambda s: _ratio(s["sum_abs_error"], s["count"]))


def mean_squared_error() -> Metric:
  """Mean squared error; trailing axes beyond the mask are averaged first.

  Returns:
    A `Metric` named "mse" with stats `{"sum_sq_error", "count"}`.
  """
  return Metric(
      "mse", _error_sum_stats("mse", jnp.square, "sum_sq_error"),
      lambda s: _ratio(s["sum_sq_error"], s["count"]))


def root_mean_squared_error() -> Metric:
  """`sqrt(sum_sq_error / count)`: the root of the pooled MSE.

  The root is taken after summing over all batches, so RMSE is exact for the
  whole evaluation set (not a mean of per-batch roots).

  Returns:
    A `Metric` named "rmse" with stats `{"sum_sq_error", "count"}`.
  """
  return Metric(
      "rmse", _error_sum_stats("rmse", jnp.square, "sum_sq_error"),
      lambda s: math.sqrt(_ratio(s["sum_sq_error"], s["count"])))


# Identical images would give PSNR = +inf, which poisons averages; the MSE is
# floored at this fraction of max_value^2, capping a perfect example at 100 dB.
PSNR_MSE_FLOOR = 1e-10


def psnr(max_value: float = 1.0) -> Metric:
  """Mean per-example peak signal-to-noise ratio, in dB.

  For each example, `mse_b` is the (mask-weighted) mean squared error over its
  labelled elements (all non-batch axes), and
  `psnr_b = 10 * log10(max_value^2 / max(mse_b, PSNR_MSE_FLOOR * max_value^2))`,
  i.e. at most 100 dB. The metric is the mean of `psnr_b` over the examples with
  at least one labelled element; each such example counts once (fractional mask
  values weight elements within an example's MSE, not examples).

  Args:
    max_value: the largest possible signal value (1.0 for [0, 1] images, 255
      for uint8 ones).

  Returns:
    A `Metric` named "psnr" with stats `{"psnr_sum", "count"}`.

  Raises:
    ValueError: if `max_value <= 0`.
  """
  if not max_value > 0:
    raise ValueError(f"psnr: max_value must be > 0, got {max_value}")
  peak_sq = float(max_value) ** 2

  def stats(pred: ArrayLike, label: ArrayLike, mask: ArrayLike) -> Stats:
    pred, label = jnp.asarray(pred), jnp.asarray(label)
    _check_regression("psnr", pred, label, mask)
    weights = _elementwise_weights(mask, pred.shape)  # [B, ...]
    labelled = weights > 0
    sq = jnp.square(pred.astype(jnp.float32) - label.astype(jnp.float32))
    axes = tuple(range(1, pred.ndim))
    sse = jnp.sum(jnp.where(labelled, weights * sq, 0.0), axis=axes)  # [B]
    weight = jnp.sum(weights, axis=axes)  # [B]
    has_label = weight > 0  # [B]
    mse = sse / jnp.where(has_label, weight, 1.0)  # [B]
    per_example = 10.0 * jnp.log10(
        peak_sq / jnp.maximum(mse, PSNR_MSE_FLOOR * peak_sq))  # [B]
    return {"psnr_sum": jnp.sum(jnp.where(has_label, per_example, 0.0)),
            "count": jnp.sum(has_label.astype(jnp.float32))}

  def finalize(summed: Mapping[str, Any]) -> float:
    return _ratio(summed["psnr_sum"], summed["count"])

  return Metric("psnr", stats, finalize)


# --------------------------------------------------------------------------
# Registry and helpers.
# --------------------------------------------------------------------------

# The one place a metric name maps to its factory; keys equal `Metric.name`.
METRICS: dict[str, Callable[..., Metric]] = {
    "accuracy": accuracy,
    "f1": binary_f1,
    "mae": mean_absolute_error,
    "mse": mean_squared_error,
    "psnr": psnr,
    "rmse": root_mean_squared_error,
}


def get_metric(name: str, **kwargs: Any) -> Metric:
  """Builds the metric called `name`.

  Args:
    name: a key of `METRICS`.
    **kwargs: arguments of that factory (e.g. `threshold` for "f1",
      `max_value` for "psnr").

  Returns:
    The `Metric`.

  Raises:
    ValueError: if `name` is unknown (the message lists the valid names) or an
      argument value is invalid.
    TypeError: if the factory does not accept one of `kwargs`.
  """
  if name not in METRICS:
    raise ValueError(
        f"unknown metric {name!r}; valid: {', '.join(sorted(METRICS))}")
  factory = METRICS[name]
  valid = sorted(inspect.signature(factory).parameters)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise TypeError(f"metric {name!r} got unknown argument(s) {unknown}; "
                    f"valid: {valid if valid else 'none'}")
  return factory(**kwargs)


def _check_unique(metrics: Sequence[Metric]) -> None:
  names = [m.name for m in metrics]
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate metric names {names}: names key the stats")


def compute_stats(metrics: Sequence[Metric], pred: ArrayLike, label: ArrayLike,
                  mask: ArrayLike) -> dict[str, Stats]:
  """Sufficient statistics of several metrics on one batch (jit-able).

  Args:
    metrics: metrics with unique names.
    pred: the task's predictions.
    label: the task's labels.
    mask: the task's mask.

  Returns:
    `{metric.name: metric.stats(pred, label, mask)}`.

  Raises:
    ValueError: on duplicate metric names or a shape error from a metric.
  """
  _check_unique(metrics)
  return {m.name: m.stats(pred, label, mask) for m in metrics}


def add_stats(a: Any, b: Any) -> Any:
  """Adds two stats trees leaf by leaf (NumPy or JAX values).

  Args:
    a: accumulated stats, or None to start an accumulation.
    b: stats of the same tree structure.

  Returns:
    `a + b` leaf-wise (`b` when `a` is None).
  """
  if a is None:
    return b
  return jax.tree.map(lambda x, y: x + y, a, b)


def finalize_all(metrics: Sequence[Metric],
                 summed: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """Turns summed stats into metric values on the host.

  Args:
    metrics: the metrics that produced `summed` via `compute_stats`.
    summed: `{metric.name: summed stats}`.

  Returns:
    `{metric.name: float value}` (NaN where undefined).

  Raises:
    ValueError: on duplicate metric names.
    KeyError: if `summed` lacks a metric's stats.
  """
  _check_unique(metrics)
  out = {}
  for m in metrics:
    if m.name not in summed:
      raise KeyError(f"no stats for metric {m.name!r}; have {sorted(summed)}")
    out[m.name] = float(m.finalize(summed[m.name]))
  return out
