"""Masked losses: `(prediction, label, mask, **hyperparams) -> (sum, count)`.

Every loss returns two float32 scalars, a masked SUM and the label COUNT, rather
than a mean: sums add across batches, devices (`psum`) and hosts, so the task
loss `masked_mean(loss_sum, count) = loss_sum / max(count, 1)` is taken once,
over the global batch. All functions are pure, jit-able and differentiable;
shapes are checked at trace time and a mismatch raises a `ValueError` naming
the problem.

Mask semantics (shared with `mtl_jax.metrics`):

* `mask` is float: 1.0 where the position is labelled, 0.0 where it is not.
  Fractional values act as weights (of examples or elements). Negative values
  are invalid; they are treated as 0 in both the sum and the count so that the
  two always agree. Bool and integer masks are cast to float32.
* `mask.shape` is a PREFIX of the per-position loss shape: `[B]` for per-example
  labels, or `[B, ...]` for dense per-element masks (per pixel, per token).
  The per-position loss has the label's shape for every loss here (softmax CE
  reduces the class axis away; the element-wise losses keep every axis).
* Trailing loss axes that the mask does not cover are AVERAGED first: a
  multi-label `[B, 10]` target with a `[B]` mask contributes, per example, the
  mean of its 10 BCE terms; a `[B, H, W, C]` image with a `[B, H, W]` mask
  contributes, per pixel, the mean over channels. Hence `count` counts mask
  positions (examples, pixels, tokens), never the elements averaged inside.
* `loss_sum = sum(where(mask > 0, mask * l, 0))` and `count = sum(mask)` over
  the mask's positions.

Robustness to unlabelled positions. Data pipelines fill unlabelled positions
with anything (zeros, -1 class ids, NaN targets) and a model may emit inf/NaN
there. Each loss therefore (1) replaces predictions and labels at unlabelled
positions by 0 before computing anything (the "double where" trick: `where`'s
VJP *selects* rather than multiplies, so the gradient there is exactly 0.0 even
when the raw prediction is inf or NaN), and (2) sums with `jnp.where`, so a
non-finite loss value at an unlabelled position cannot leak into the sum. An
all-masked batch thus gives `(0.0, 0.0)`, a zero gradient and no NaN.

Inputs are upcast to float32 before the loss is computed, so bfloat16 models get
float32 losses.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

LossFn = Callable[..., tuple[jax.Array, jax.Array]]


# --------------------------------------------------------------------------
# Mask helpers (also used by mtl_jax.metrics, so that both share one semantics).
# --------------------------------------------------------------------------


def validate_mask(mask_shape: tuple[int, ...], loss_shape: tuple[int, ...],
                  caller: str) -> None:
  """Checks that a mask shape is a non-empty prefix of the per-position shape.

  Args:
    mask_shape: shape of the mask.
    loss_shape: shape of the per-position loss (or metric) values.
    caller: name of the loss or metric, used in the error message.

  Raises:
    ValueError: if the mask has no batch axis or is not a prefix of
      `loss_shape`.
  """
  mask_shape, loss_shape = tuple(mask_shape), tuple(loss_shape)
  if not loss_shape:
    raise ValueError(f"{caller}: the per-position loss shape is () but must "
                     "have a leading batch axis [B, ...]")
  if not mask_shape:
    raise ValueError(f"{caller}: mask shape () has no batch axis; expected "
                     f"[B]={loss_shape[:1]} or a longer prefix of the loss "
                     f"shape {loss_shape}")
  if mask_shape != loss_shape[:len(mask_shape)]:
    raise ValueError(f"{caller}: mask shape {mask_shape} is not a prefix of "
                     f"the loss shape {loss_shape}")


def expand_mask(mask: jax.Array, ndim: int) -> jax.Array:
  """Appends singleton axes so that `mask` broadcasts against an `ndim` array.

  Args:
    mask: mask of shape `[B, ...]`, a prefix of the target shape.
    ndim: rank of the array to broadcast against (`>= mask.ndim`).

  Returns:
    `mask` reshaped to `mask.shape + (1,) * (ndim - mask.ndim)`.
  """
  return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def clean_mask(mask: ArrayLike) -> jax.Array:
  """Casts a mask to float32 and zeroes invalid (negative or NaN) entries.

  Args:
    mask: float, int or bool mask.

  Returns:
    float32 mask with `where(mask > 0, mask, 0)`, so that sums and counts built
    from it agree on which positions are labelled.
  """
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.where(mask > 0, mask, 0.0)


def zero_unlabelled(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Replaces `x` by 0 where `mask <= 0` (the first half of the double where).

  Args:
    x: array of shape `mask.shape + trailing`.
    mask: float mask, a prefix of `x.shape`.

  Returns:
    `x` with unlabelled positions set to 0 (same dtype); their gradient is
    exactly 0 even if `x` is inf or NaN there.
  """
  return jnp.where(expand_mask(mask, x.ndim) > 0, x, jnp.zeros((), x.dtype))


def masked_sum_and_count(values: jax.Array,
                         mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Reduces per-position values to a masked `(sum, count)` pair.

  Axes of `values` beyond the mask's rank are averaged first (see the module
  docstring), then `sum(where(mask > 0, mask * v, 0))` and `sum(mask)`.

  Args:
    values: per-position values `[B, ...]`; `mask.shape` must be its prefix.
    mask: float mask (already validated and cleaned).

  Returns:
    `(sum, count)`, float32 scalars.
  """
  trailing = tuple(range(mask.ndim, values.ndim))
  if trailing:
    values = jnp.mean(values, axis=trailing)  # [*mask.shape]
  labelled = mask > 0
  total = jnp.sum(jnp.where(labelled, mask * values, 0.0))
  count = jnp.sum(jnp.where(labelled, mask, 0.0))
  return total.astype(jnp.float32), count.astype(jnp.float32)


def masked_mean(loss_sum: ArrayLike, count: ArrayLike) -> jax.Array:
  """The task loss `loss_sum / max(count, 1)`.

  The `max(count, 1)` makes an all-unlabelled batch give loss 0 with a zero
  gradient instead of 0/0. For the mean over the global batch, reduce `loss_sum`
  and `count` over devices/hosts (`psum`) before calling this. Note that with
  fractional masks whose total weight is below 1 the divisor is still 1.

  Args:
    loss_sum: masked loss sum (scalar or array, e.g. `[K]` for K tasks).
    count: matching label count.

  Returns:
    The masked mean, same shape as the inputs.
  """
  return jnp.asarray(loss_sum) / jnp.maximum(jnp.asarray(count), 1.0)


# --------------------------------------------------------------------------
# Shape checks.
# --------------------------------------------------------------------------


def _check_same_shape(pred: jax.Array, target: jax.Array, caller: str,
                      names: tuple[str, str]) -> None:
  # Exact equality, no broadcasting: `[B, 1]` against `[B]` silently broadcasts
  # to `[B, B]` and is one of the most common regression bugs.
  if pred.shape != target.shape:
    raise ValueError(f"{caller}: {names[0]} shape {pred.shape} does not match "
                     f"{names[1]} shape {target.shape}; they must be equal "
                     "(no broadcasting)")


def _check_float(x: jax.Array, caller: str, what: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{caller}: {what} must be floating point, got dtype "
                     f"{x.dtype}")


def _is_concrete_number(x: Any) -> bool:
  # Hyperparameters may be traced (e.g. a schedule); only Python/NumPy numbers
  # can be range-checked at trace time.
  return isinstance(x, (int, float)) and not isinstance(x, bool)


# --------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------


def softmax_cross_entropy(
    logits: ArrayLike, labels: ArrayLike, mask: ArrayLike, *,
    label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Masked softmax cross-entropy with integer class labels.

  With label smoothing `ls` the target is `(1 - ls) * onehot + ls / C`, as in
  `optax.smooth_labels`, i.e. `l = (1 - ls) * nll - ls * mean_c(log p_c)`.
  The log-softmax is the stable max-shifted one; the label term is gathered with
  a `where` rather than `onehot * log p`, so `-inf` logits for other classes
  (vocabulary masking) do not produce `0 * -inf = NaN` when `ls == 0`.

  A label outside `[0, C)` at a LABELLED position yields a NaN loss, so that a
  data bug fails loudly instead of being silently wrapped or dropped; at an
  unlabelled position any label value is ignored.

  Args:
    logits: `[B, ..., C]` unnormalised log-probabilities.
    labels: `[B, ...]` integer class indices (`logits.shape[:-1]`).
    mask: float mask, a prefix of `labels.shape` (`[B]` or e.g. `[B, T]`).
    label_smoothing: `ls` in `[0, 1]`.

  Returns:
    `(loss_sum, count)`, float32 scalars (see the module docstring).

  Raises:
    ValueError: if the labels are not integer, if
      `labels.shape != logits.shape[:-1]`, if the mask is not a prefix of
      `labels.shape`, or if `label_smoothing` is outside `[0, 1]`.
  """
  caller = "softmax_cross_entropy"
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  if logits.ndim < 2:
    raise ValueError(f"{caller}: logits shape {logits.shape} must be "
                     "[B, ..., num_classes]")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    hint = (" (one-hot or soft targets are not supported here; pass class "
            "indices, or use sigmoid_binary_cross_entropy for multi-label)"
            if labels.shape == logits.shape else "")
    raise ValueError(f"{caller}: labels must be integer class indices of shape "
                     f"logits.shape[:-1] = {logits.shape[:-1]}, got dtype "
                     f"{labels.dtype} and shape {labels.shape}{hint}")
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"{caller}: labels shape {labels.shape} does not match "
                     f"logits shape {logits.shape} without its class axis "
                     f"({logits.shape[:-1]})")
  validate_mask(jnp.shape(mask), labels.shape, caller)
  if _is_concrete_number(label_smoothing) and not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(f"{caller}: label_smoothing must be in [0, 1], got "
                     f"{label_smoothing}")

  mask = clean_mask(mask)
  num_classes = logits.shape[-1]
  logits = zero_unlabelled(logits.astype(jnp.float32), mask)  # [B, ..., C]
  labels = zero_unlabelled(labels, mask)  # [B, ...]
  log_p = jax.nn.log_softmax(logits, axis=-1)  # [B, ..., C]
  is_target = labels[..., None] == jnp.arange(num_classes)  # [B, ..., C]
  nll = -jnp.sum(jnp.where(is_target, log_p, 0.0), axis=-1)  # [B, ...]
  if _is_concrete_number(label_smoothing) and label_smoothing == 0:
    per_position = nll
  else:
    per_position = ((1.0 - label_smoothing) * nll
                    - label_smoothing * jnp.mean(log_p, axis=-1))
  in_range = (labels >= 0) & (labels < num_classes)
  per_position = jnp.where(in_range, per_position, jnp.nan)
  return masked_sum_and_count(per_position, mask)


def sigmoid_binary_cross_entropy(
    logits: ArrayLike, labels: ArrayLike,
    mask: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Masked element-wise sigmoid binary cross-entropy (multi-label or binary).

  `l = -(y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x))`, which is stable for
  large `|x|` (no `log(sigmoid(x))` of an underflowed value) and equals
  `optax.sigmoid_binary_cross_entropy`. Soft targets in `[0, 1]` are allowed.

  Args:
    logits: `[B, ...]` logits, one per binary label.
    labels: `[B, ...]` targets in `[0, 1]` (same shape as `logits`; int/bool
      targets are cast to float).
    mask: float mask, a prefix of `logits.shape`: `[B]` averages the labels of
      an example, `[B, L]` masks each label separately.

  Returns:
    `(loss_sum, count)`, float32 scalars.

  Raises:
    ValueError: if the shapes of logits and labels differ or the mask is not a
      prefix of them.
  """
  caller = "sigmoid_binary_cross_entropy"
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check_same_shape(logits, labels, caller, ("logits", "labels"))
  validate_mask(jnp.shape(mask), logits.shape, caller)
  mask = clean_mask(mask)
  x = zero_unlabelled(logits.astype(jnp.float32), mask)
  y = zero_unlabelled(labels.astype(jnp.float32), mask)
  per_element = -(y * jax.nn.log_sigmoid(x)
                  + (1.0 - y) * jax.nn.log_sigmoid(-x))
  return masked_sum_and_count(per_element, mask)


def _regression_inputs(caller: str, pred: ArrayLike, target: ArrayLike,
                       mask: ArrayLike):
  pred, target = jnp.asarray(pred), jnp.asarray(target)
  _check_same_shape(pred, target, caller, ("pred", "target"))
  _check_float(pred, caller, "pred")
  validate_mask(jnp.shape(mask), pred.shape, caller)
  mask = clean_mask(mask)
  pred = zero_unlabelled(pred.astype(jnp.float32), mask)
  target = zero_unlabelled(target.astype(jnp.float32), mask)
  return pred - target, mask


def mean_squared_error(pred: ArrayLike, target: ArrayLike,
                       mask: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Masked squared error `(pred - target)^2`, averaged over unmasked axes.

  Args:
    pred: `[B, ...]` float predictions.
    target: `[B, ...]` targets, same shape.
    mask: float mask, a prefix of `pred.shape`.

  Returns:
    `(loss_sum, count)`, float32 scalars.

  Raises:
    ValueError: on a shape mismatch, a non-prefix mask, or non-float `pred`.
  """
  err, mask = _regression_inputs("mean_squared_error", pred, target, mask)
  return masked_sum_and_count(jnp.square(err), mask)


def l1_loss(pred: ArrayLike, target: ArrayLike,
            mask: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Masked absolute error `|pred - target|`, averaged over unmasked axes.

  Args:
    pred: `[B, ...]` float predictions.
    target: `[B, ...]` targets, same shape.
    mask: float mask, a prefix of `pred.shape`.

  Returns:
    `(loss_sum, count)`, float32 scalars.

  Raises:
    ValueError: on a shape mismatch, a non-prefix mask, or non-float `pred`.
  """
  err, mask = _regression_inputs("l1_loss", pred, target, mask)
  return masked_sum_and_count(jnp.abs(err), mask)


def huber_loss(pred: ArrayLike, target: ArrayLike, mask: ArrayLike, *,
               delta: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Masked Huber loss, averaged over unmasked axes.

  `0.5 * x^2` for `|x| <= delta`, else `delta * (|x| - 0.5 * delta)`, written as
  `0.5 * q^2 + delta * (|x| - q)` with `q = min(|x|, delta)` (as in optax) so
  that both branches are evaluated without a `where` over a non-finite value.

  Args:
    pred: `[B, ...]` float predictions.
    target: `[B, ...]` targets, same shape.
    mask: float mask, a prefix of `pred.shape`.
    delta: positive threshold between the quadratic and linear regimes.

  Returns:
    `(loss_sum, count)`, float32 scalars.

  Raises:
    ValueError: on a shape mismatch, a non-prefix mask, non-float `pred`, or a
      non-positive `delta`.
  """
  caller = "huber_loss"
  if _is_concrete_number(delta) and not delta > 0:
    raise ValueError(f"{caller}: delta must be > 0, got {delta}")
  err, mask = _regression_inputs(caller, pred, target, mask)
  abs_err = jnp.abs(err)
  quadratic = jnp.minimum(abs_err, delta)
  per_element = 0.5 * jnp.square(quadratic) + delta * (abs_err - quadratic)
  return masked_sum_and_count(per_element, mask)


# The one place a loss name maps to a function; grep here, not for getattr.
LOSSES: dict[str, LossFn] = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "sigmoid_binary_cross_entropy": sigmoid_binary_cross_entropy,
    "mse": mean_squared_error,
    "l1": l1_loss,
    "huber": huber_loss,
}


def _keyword_hyperparams(fn: Callable[..., Any]) -> list[str]:
  return sorted(p.name for p in inspect.signature(fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY)


def get_loss(name: str, **hyperparams: Any) -> LossFn:
  """Returns the loss called `name` with its hyperparameters bound.

  Args:
    name: a key of `LOSSES`.
    **hyperparams: keyword-only hyperparameters of that loss (e.g.
      `label_smoothing=0.1` for `softmax_cross_entropy`, `delta=2.0` for
      `huber`).

  Returns:
    `functools.partial(loss, **hyperparams)`: a
    `(prediction, label, mask) -> (loss_sum, count)` function.

  Raises:
    ValueError: if `name` is not a known loss (the message lists valid names).
    TypeError: if a hyperparameter is not accepted by that loss.
  """
  if name not in LOSSES:
    raise ValueError(
        f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}")
  fn = LOSSES[name]
  valid = _keyword_hyperparams(fn)
  unknown = sorted(set(hyperparams) - set(valid))
  if unknown:
    raise TypeError(f"loss {name!r} got unknown hyperparameter(s) {unknown}; "
                    f"valid: {valid if valid else 'none'}")
  return functools.partial(fn, **hyperparams)
