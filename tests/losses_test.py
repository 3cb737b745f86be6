"""Tests for mtl_jax.losses: hand-computed values, mask properties, errors."""

import functools
import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import losses

LN2, LN3, LN4 = math.log(2.0), math.log(3.0), math.log(4.0)

# Deterministic (tests must not flake) and small: every property runs in
# well under a second once its few shapes are compiled.
PROPERTY = hypothesis.settings(max_examples=25, deadline=None, derandomize=True)


def _value(fn, *args, **kwargs):
  # One jit per call compiles faster than dispatching each op eagerly.
  loss_sum, count = jax.jit(functools.partial(fn, **kwargs))(*args)
  return float(loss_sum), float(count)


def _mask_with_count(data, shape, counts):
  """Draws a bool mask of `shape` with a number of True entries in `counts`.

  Keeping the number of labelled entries to a few values keeps the number of
  sub-batch shapes, hence of compilations, small.
  """
  size = int(np.prod(shape))
  k = data.draw(st.sampled_from(counts))
  order = data.draw(st.permutations(range(size)))
  mask = np.zeros(size, bool)
  mask[list(order[:k])] = True
  return mask.reshape(shape)


# ---------------------------------------------------------------------------
# Hand-computed values.
# ---------------------------------------------------------------------------


class TestSoftmaxCrossEntropy:

  def test_single_example(self):
    # softmax([0, ln 3]) = [1/4, 3/4]: label 1 -> -ln(3/4); label 0 -> ln 4.
    logits = np.array([[0.0, LN3], [0.0, LN3]], np.float32)
    s, c = _value(losses.softmax_cross_entropy, logits, np.array([1, 0]),
                  np.array([1.0, 1.0]))
    np.testing.assert_allclose(s, -math.log(0.75) + LN4, rtol=1e-6)
    assert c == 2.0

  def test_mask_and_fractional_weights(self):
    logits = np.array([[0.0, LN3], [0.0, LN3]], np.float32)
    labels = np.array([1, 0])
    # Mask [1, 0]: only -ln(3/4); count 1.
    s, c = _value(losses.softmax_cross_entropy, logits, labels,
                  np.array([1., 0.]))
    np.testing.assert_allclose(s, -math.log(0.75), rtol=1e-6)
    assert c == 1.0
    # Weights [1, 0.5]: -ln(3/4) + 0.5 ln 4; count 1.5.
    s, c = _value(losses.softmax_cross_entropy, logits, labels,
                  np.array([1., 0.5]))
    np.testing.assert_allclose(s, -math.log(0.75) + 0.5 * LN4, rtol=1e-6)
    assert c == 1.5

  def test_label_smoothing(self):
    # ls = 0.2, C = 2: target for label 1 is [0.1, 0.9], so
    # loss = -(0.1 ln(1/4) + 0.9 ln(3/4)) = 0.1 ln 4 + 0.9 ln(4/3).
    logits = np.array([[0.0, LN3]], np.float32)
    s, _ = _value(losses.softmax_cross_entropy, logits, np.array([1]),
                  np.ones(1), label_smoothing=0.2)
    np.testing.assert_allclose(s, 0.1 * LN4 + 0.9 * math.log(4 / 3), rtol=1e-6)
    # Same as optax's smoothed-label cross-entropy.
    targets = optax.smooth_labels(jax.nn.one_hot(jnp.array([1]), 2), 0.2)
    ref = optax.softmax_cross_entropy(jnp.asarray(logits), targets)
    np.testing.assert_allclose(s, float(ref[0]), rtol=1e-6)

  def test_stable_for_huge_logits(self):
    # Naive softmax overflows; the shifted log-softmax gives 1000 - 0 = 1000.
    logits = np.array([[1000.0, 0.0]], np.float32)
    s, _ = _value(losses.softmax_cross_entropy, logits, np.array([1]),
                  np.ones(1))
    np.testing.assert_allclose(s, 1000.0, rtol=1e-6)

  def test_neg_inf_logit_of_other_class_is_finite(self):
    # Vocabulary masking: class 2 impossible; loss over {0, 1} = ln 2.
    logits = np.array([[0.0, 0.0, -np.inf]], np.float32)
    s, _ = _value(losses.softmax_cross_entropy, logits, np.array([0]),
                  np.ones(1))
    np.testing.assert_allclose(s, LN2, rtol=1e-6)

  def test_out_of_range_label_is_nan_only_when_labelled(self):
    logits = np.zeros((2, 3), np.float32)
    s, _ = _value(losses.softmax_cross_entropy, logits, np.array([0, -1]),
                  np.array([1.0, 1.0]))
    assert math.isnan(s)
    # Unlabelled: the -1 and 7 are ignored; ln 3 from the labelled example.
    s, c = _value(losses.softmax_cross_entropy, logits, np.array([0, 7]),
                  np.array([1.0, 0.0]))
    np.testing.assert_allclose(s, LN3, rtol=1e-6)
    assert c == 1.0

  def test_dense_token_mask(self):
    # [B=1, T=3, C=2]; token 1 unlabelled. ln 2 (uniform) + -ln(3/4).
    logits = np.array([[[0.0, 0.0], [5.0, -5.0], [0.0, LN3]]], np.float32)
    s, c = _value(losses.softmax_cross_entropy, logits, np.array([[0, 0, 1]]),
                  np.array([[1.0, 0.0, 1.0]]))
    np.testing.assert_allclose(s, LN2 - math.log(0.75), rtol=1e-6)
    assert c == 2.0

  def test_example_mask_averages_tokens(self):
    # [B]-mask on [B, T] labels: per-example mean over T, count = examples.
    logits = np.array([[[0.0, 0.0], [0.0, LN3]]], np.float32)
    s, c = _value(losses.softmax_cross_entropy, logits, np.array([[0, 1]]),
                  np.array([1.0]))
    np.testing.assert_allclose(s, (LN2 - math.log(0.75)) / 2, rtol=1e-6)
    assert c == 1.0


class TestSigmoidBinaryCrossEntropy:

  def test_values(self):
    # sigmoid(0) = 1/2 -> ln 2; sigmoid(ln 3) = 3/4 -> label 1: -ln(3/4),
    # label 0: -ln(1/4) = ln 4.
    logits = np.array([0.0, LN3, LN3], np.float32)
    labels = np.array([1.0, 1.0, 0.0], np.float32)
    s, c = _value(losses.sigmoid_binary_cross_entropy, logits, labels,
                  np.ones(3))
    np.testing.assert_allclose(s, LN2 - math.log(0.75) + LN4, rtol=1e-6)
    assert c == 3.0

  def test_multilabel_example_mask_averages_labels(self):
    # [B=2, L=2] with [B] mask [1, 0]: mean(ln 2, ln 4) = 1.5 ln 2; count 1.
    logits = np.array([[0.0, LN3], [9.0, 9.0]], np.float32)
    labels = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    s, c = _value(losses.sigmoid_binary_cross_entropy, logits, labels,
                  np.array([1.0, 0.0]))
    np.testing.assert_allclose(s, 1.5 * LN2, rtol=1e-6)
    assert c == 1.0

  def test_soft_target_and_stability(self):
    # y = 0.5 at x = 0: ln 2. x = -200, y = 1: -log_sigmoid(-200) = 200
    # (a naive log(sigmoid(x)) gives log(0) = inf).
    s, _ = _value(losses.sigmoid_binary_cross_entropy,
                  np.array([[0.0], [-200.0]], np.float32),
                  np.array([[0.5], [1.0]], np.float32), np.ones(2))
    np.testing.assert_allclose(s, LN2 + 200.0, rtol=1e-6)


class TestRegression:
  PRED = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
  TARGET = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)

  def test_mse(self):
    # errors [[0, 2], [3, 4]]: per-example means (0+4)/2 = 2, (9+16)/2 = 12.5.
    assert _value(losses.mean_squared_error, self.PRED, self.TARGET,
                  np.ones(2)) == (14.5, 2.0)
    assert _value(losses.mean_squared_error, self.PRED, self.TARGET,
                  np.array([1.0, 0.0])) == (2.0, 1.0)

  def test_mse_dense_mask(self):
    # Dense [B, D] mask [[0, 1], [1, 0]]: elements 4 and 9; count 2.
    assert _value(losses.mean_squared_error, self.PRED, self.TARGET,
                  np.array([[0.0, 1.0], [1.0, 0.0]])) == (13.0, 2.0)

  def test_l1(self):
    # |errors| [[0, 2], [3, 4]]: per-example means 1 and 3.5.
    assert _value(losses.l1_loss, self.PRED, self.TARGET,
                  np.ones(2)) == (4.5, 2.0)

  def test_huber_both_branches(self):
    # delta 1: |x| = 0.5 -> 0.5 * 0.25 = 0.125; |x| = 3 -> 1 * (3 - 0.5) = 2.5.
    s, c = _value(losses.huber_loss, np.array([0.5, -3.0], np.float32),
                  np.zeros(2, np.float32), np.ones(2))
    np.testing.assert_allclose(s, 2.625, rtol=1e-6)
    # delta 2: |x| = 3 -> 2 * (3 - 1) = 4; |x| = 2 (boundary) -> 0.5 * 4 = 2.
    s, c = _value(losses.huber_loss, np.array([3.0, 2.0], np.float32),
                  np.zeros(2, np.float32), np.ones(2), delta=2.0)
    np.testing.assert_allclose(s, 6.0, rtol=1e-6)

  def test_image_pixel_mask_averages_channels(self):
    # [B=1, H=1, W=2, C=2] with a [B, H, W] mask [[1, 0]]: pixel 0's
    # channel mean of squared errors (1 + 9) / 2 = 5; count 1 pixel.
    pred = np.array([[[[1.0, 3.0], [100.0, 100.0]]]], np.float32)
    s, c = _value(losses.mean_squared_error, pred, np.zeros_like(pred),
                  np.array([[[1.0, 0.0]]]))
    assert (s, c) == (5.0, 1.0)

  def test_bfloat16_predictions_give_float32(self):
    s, c = losses.mean_squared_error(jnp.ones((2,), jnp.bfloat16),
                                     jnp.zeros((2,)), jnp.ones(2))
    assert s.dtype == jnp.float32 and c.dtype == jnp.float32
    assert (float(s), float(c)) == (2.0, 2.0)


def test_masked_mean():
  assert float(losses.masked_mean(3.0, 2.0)) == 1.5
  assert float(losses.masked_mean(0.0, 0.0)) == 0.0  # absent task, not NaN
  # The divisor is max(count, 1), also for fractional counts below 1.
  assert float(losses.masked_mean(0.75, 0.5)) == 0.75
  np.testing.assert_allclose(
      losses.masked_mean(jnp.array([2.0, 0.0]), jnp.array([4.0, 0.0])),
      [0.5, 0.0])


def test_negative_mask_is_ignored_in_sum_and_count():
  s, c = _value(losses.mean_squared_error, np.ones(2, np.float32), np.zeros(2),
                np.array([1.0, -1.0]))
  assert (s, c) == (1.0, 1.0)


# ---------------------------------------------------------------------------
# Properties (hypothesis), for every loss.
# ---------------------------------------------------------------------------

B = 5
# id -> (loss fn, trailing prediction shape, label kind).
CASES = {
    "ce": (losses.get_loss("softmax_cross_entropy"), (3,), "class"),
    "ce_smooth": (losses.get_loss("softmax_cross_entropy", label_smoothing=0.2),
                  (3,), "class"),
    "bce": (losses.get_loss("sigmoid_binary_cross_entropy"), (4,), "prob"),
    "mse": (losses.get_loss("mse"), (2,), "real"),
    "l1": (losses.get_loss("l1"), (2,), "real"),
    "huber": (losses.get_loss("huber"), (2,), "real"),
    "huber_d3": (losses.get_loss("huber", delta=3.0), (2,), "real"),
}
# The structural properties below do not depend on hyperparameter values, so
# they skip the second huber case (it is checked against optax further down).
STRUCTURAL_CASES = sorted(set(CASES) - {"huber_d3"})
_FLOATS = st.floats(-10, 10, width=32)


def _objective(fn):
  def objective(pred, label, mask):
    loss_sum, count = fn(pred, label, mask)
    return losses.masked_mean(loss_sum, count), (loss_sum, count)
  return objective


# One jitted value_and_grad per case; shapes in the tests below take only a few
# values, so each compiles a handful of times at most.
VALUE_AND_GRAD = {
    k: jax.jit(jax.value_and_grad(_objective(fn), has_aux=True))
    for k, (fn, _, _) in CASES.items()
}


def _draw_inputs(data, case, batch_shape):
  _, trailing, kind = CASES[case]
  pred = data.draw(hnp.arrays(np.float32, batch_shape + trailing,
                              elements=_FLOATS))
  if kind == "class":
    label = data.draw(hnp.arrays(np.int32, batch_shape + trailing[:-1],
                                 elements=st.integers(0, trailing[-1] - 1)))
  elif kind == "prob":
    label = data.draw(hnp.arrays(np.float32, pred.shape,
                                 elements=st.floats(0, 1, width=32)))
  else:
    label = data.draw(hnp.arrays(np.float32, pred.shape, elements=_FLOATS))
  return pred, label


def _run(case, pred, label, mask):
  (loss, (loss_sum, count)), grad = VALUE_AND_GRAD[case](
      pred, label, np.asarray(mask, np.float32))
  return float(loss), float(loss_sum), float(count), np.asarray(grad)


@pytest.mark.parametrize("case", STRUCTURAL_CASES)
@PROPERTY
@hypothesis.given(data=st.data())
def test_masked_batch_equals_labelled_sub_batch(case, data):
  pred, label = _draw_inputs(data, case, (B,))
  mask = _mask_with_count(data, (B,), (2, B))
  loss, loss_sum, count, grad = _run(case, pred, label, mask)
  sub_loss, sub_sum, sub_count, sub_grad = _run(
      case, pred[mask], label[mask], np.ones(mask.sum()))
  assert count == sub_count == mask.sum()
  np.testing.assert_allclose(loss, sub_loss, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(loss_sum, sub_sum, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(grad[mask], sub_grad, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(grad[~mask], 0.0)


@pytest.mark.parametrize("case", sorted(CASES))
@PROPERTY
@hypothesis.given(data=st.data())
def test_weighted_mask_matches_optax_reference(case, data):
  fn, _, kind = CASES[case]
  pred, label = _draw_inputs(data, case, (B,))
  weights = data.draw(hnp.arrays(np.float32, (B,),
                                 elements=st.sampled_from([0.0, 0.25, 1.0])))
  p, y = jnp.asarray(pred), jnp.asarray(label)
  if case.startswith("ce"):
    ls = 0.2 if case == "ce_smooth" else 0.0
    targets = optax.smooth_labels(jax.nn.one_hot(y, pred.shape[-1]), ls)
    per_example = optax.softmax_cross_entropy(p, targets)
  elif case == "bce":
    per_example = optax.sigmoid_binary_cross_entropy(p, y).mean(-1)
  elif case == "mse":
    per_example = optax.squared_error(p, y).mean(-1)
  elif case == "l1":
    per_example = jnp.abs(p - y).mean(-1)
  else:
    delta = 3.0 if case == "huber_d3" else 1.0
    per_example = optax.huber_loss(p, y, delta=delta).mean(-1)
  s, c = jax.jit(fn)(pred, label, weights)
  np.testing.assert_allclose(float(s), float(np.sum(weights * per_example)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(c), float(weights.sum()), rtol=1e-6)


_GARBAGE = st.sampled_from([1e30, -1e30, np.inf, -np.inf, np.nan])


@pytest.mark.parametrize("case", STRUCTURAL_CASES)
@PROPERTY
@hypothesis.given(data=st.data())
def test_all_masked_is_zero_with_zero_gradient(case, data):
  pred, label = _draw_inputs(data, case, (B,))
  pred = np.where(data.draw(hnp.arrays(np.bool_, pred.shape)),
                  np.float32(data.draw(_GARBAGE)), pred)
  loss, loss_sum, count, grad = _run(case, pred, label, np.zeros(B))
  assert (loss, loss_sum, count) == (0.0, 0.0, 0.0)
  np.testing.assert_array_equal(grad, 0.0)  # exact zeros, hence no NaN


@pytest.mark.parametrize("case", STRUCTURAL_CASES)
@PROPERTY
@hypothesis.given(data=st.data())
def test_unlabelled_garbage_is_exactly_ignored(case, data):
  # Unlabelled rows hold huge, infinite or NaN predictions and garbage labels.
  # Because each loss zeroes unlabelled inputs with a `where` before computing
  # (so the VJP selects 0 rather than multiplying 0 * inf), the result is
  # bit-identical to the clean batch and the gradient there is exactly 0.0 --
  # for non-finite predictions too, not only for finite ones.
  _, _, kind = CASES[case]
  pred, label = _draw_inputs(data, case, (B,))
  mask = data.draw(hnp.arrays(np.bool_, (B,)))
  garbage_pred = pred.copy()
  garbage_pred[~mask] = np.float32(data.draw(_GARBAGE))
  garbage_label = label.copy()
  garbage_label[~mask] = -1 if kind == "class" else np.nan
  clean = _run(case, np.where(mask[:, None], pred, 0), label, mask)
  dirty = _run(case, garbage_pred, garbage_label, mask)
  assert dirty[:3] == clean[:3]
  assert np.all(np.isfinite(dirty[3]))
  np.testing.assert_array_equal(dirty[3][~mask], 0.0)
  np.testing.assert_array_equal(dirty[3][mask], clean[3][mask])


def test_where_guard_keeps_nonfinite_values_out_of_the_sum():
  # The second `where` on its own: per-position values inf and NaN at
  # unlabelled positions do not turn the sum into inf/NaN (0 * inf = NaN would).
  values = jnp.array([1.0, jnp.inf, jnp.nan, 2.0])
  s, c = losses.masked_sum_and_count(values, jnp.array([1.0, 0.0, 0.0, 0.5]))
  assert (float(s), float(c)) == (2.0, 1.5)


DENSE_CASES = {
    # id -> (loss fn, prediction shape, label kind, mask rank)
    "ce_tokens": (losses.get_loss("softmax_cross_entropy"), (2, 3, 4), "class",
                  2),
    "bce_labels": (losses.get_loss("sigmoid_binary_cross_entropy"), (2, 3),
                   "prob", 2),
    "mse_pixels": (losses.get_loss("mse"), (2, 2, 2, 3), "real", 3),
    "huber_pixels": (losses.get_loss("huber"), (2, 2, 2, 3), "real", 3),
}
DENSE_VALUE_AND_GRAD = {
    k: jax.jit(jax.value_and_grad(_objective(fn), has_aux=True))
    for k, (fn, _, _, _) in DENSE_CASES.items()
}


@pytest.mark.parametrize("case", sorted(DENSE_CASES))
@PROPERTY
@hypothesis.given(data=st.data())
def test_dense_mask_equals_labelled_elements(case, data):
  # A per-element mask [B, ...] behaves like the flat selection of labelled
  # elements given with an all-ones per-example mask.
  _, shape, kind, mask_rank = DENSE_CASES[case]
  pred = data.draw(hnp.arrays(np.float32, shape, elements=_FLOATS))
  label_shape = shape[:-1] if kind == "class" else shape
  if kind == "class":
    label = data.draw(hnp.arrays(np.int32, label_shape,
                                 elements=st.integers(0, shape[-1] - 1)))
  elif kind == "prob":
    label = data.draw(hnp.arrays(np.float32, label_shape,
                                 elements=st.floats(0, 1, width=32)))
  else:
    label = data.draw(hnp.arrays(np.float32, label_shape, elements=_FLOATS))
  mask = _mask_with_count(data, shape[:mask_rank], (1, 4))
  run = DENSE_VALUE_AND_GRAD[case]
  (loss, (s, c)), grad = run(pred, label, mask.astype(np.float32))
  (sub_loss, (sub_s, sub_c)), sub_grad = run(
      pred[mask], label[mask], np.ones(mask.sum(), np.float32))
  assert float(c) == float(sub_c) == mask.sum()
  np.testing.assert_allclose(float(s), float(sub_s), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(loss), float(sub_loss), rtol=1e-6, atol=1e-7)
  grad = np.asarray(grad)
  np.testing.assert_allclose(grad[mask], sub_grad, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(grad[~mask], 0.0)


# ---------------------------------------------------------------------------
# Errors and the registry.
# ---------------------------------------------------------------------------


def test_mask_not_a_prefix():
  with pytest.raises(ValueError, match=r"mask shape \(4, 3\) is not a prefix "
                     r"of the loss shape \(4,\)"):
    losses.mean_squared_error(jnp.zeros(4), jnp.zeros(4), jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"mask shape \(3,\) is not a prefix"):
    losses.softmax_cross_entropy(jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32),
                                 jnp.ones(3))
  with pytest.raises(ValueError, match="no batch axis"):
    losses.l1_loss(jnp.zeros(4), jnp.zeros(4), jnp.ones(()))


def test_shape_mismatch_names_both_shapes():
  with pytest.raises(ValueError, match=r"pred shape \(4, 1\) does not match "
                     r"target shape \(4,\)"):
    losses.huber_loss(jnp.zeros((4, 1)), jnp.zeros(4), jnp.ones(4))
  with pytest.raises(ValueError, match=r"logits shape \(4, 2\) does not match "
                     r"labels shape \(4,\)"):
    losses.sigmoid_binary_cross_entropy(jnp.zeros((4, 2)), jnp.zeros(4),
                                        jnp.ones(4))
  with pytest.raises(ValueError, match=r"labels shape \(5,\) does not match "
                     r"logits shape \(4, 2\)"):
    losses.softmax_cross_entropy(jnp.zeros((4, 2)), jnp.zeros(5, jnp.int32),
                                 jnp.ones(4))


def test_float_labels_to_softmax_ce():
  with pytest.raises(ValueError,
                     match="must be integer class indices.*one-hot"):
    losses.softmax_cross_entropy(jnp.zeros((4, 2)), jnp.zeros((4, 2)),
                                 jnp.ones(4))
  with pytest.raises(ValueError, match="integer class indices.*float32"):
    losses.softmax_cross_entropy(jnp.zeros((4, 2)), jnp.zeros(4), jnp.ones(4))


def test_bad_hyperparameter_values():
  with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
    losses.softmax_cross_entropy(jnp.zeros((1, 2)), jnp.zeros(1, jnp.int32),
                                 jnp.ones(1), label_smoothing=1.5)
  with pytest.raises(ValueError, match="delta must be > 0"):
    losses.huber_loss(jnp.zeros(1), jnp.zeros(1), jnp.ones(1), delta=0.0)


def test_errors_raise_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="is not a prefix"):
    jax.jit(losses.mean_squared_error)(jnp.zeros(4), jnp.zeros(4),
                                       jnp.ones((4, 3)))


def test_get_loss():
  assert set(losses.LOSSES) == {"softmax_cross_entropy",
                                "sigmoid_binary_cross_entropy", "mse", "l1",
                                "huber"}
  fn = losses.get_loss("huber", delta=2.0)
  assert isinstance(fn, functools.partial)
  s, _ = fn(jnp.array([3.0]), jnp.array([0.0]), jnp.ones(1))
  assert float(s) == 4.0  # 2 * (3 - 1)


def test_get_loss_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match=(
      "unknown loss 'cross_entropy'; valid: huber, l1, mse, "
      "sigmoid_binary_cross_entropy, softmax_cross_entropy")):
    losses.get_loss("cross_entropy")


def test_get_loss_unknown_hyperparameter():
  with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['dleta'\]"
                     r"; valid: \['delta'\]"):
    losses.get_loss("huber", dleta=2.0)
  with pytest.raises(TypeError, match="valid: none"):
    losses.get_loss("mse", delta=1.0)
