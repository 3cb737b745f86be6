"""Tests for mtl_jax.metrics: hand-computed values, accumulation, errors."""

import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import metrics

PROPERTY = hypothesis.settings(max_examples=25, deadline=None, derandomize=True)


def _eval(metric, pred, label, mask):
  """Stats of one batch (jitted, as in an eval step) and the final value."""
  stats = jax.jit(metric.stats)(pred, label, mask)
  return {k: float(v) for k, v in stats.items()}, metric.finalize(stats)


# ---------------------------------------------------------------------------
# Hand-computed values.
# ---------------------------------------------------------------------------


def test_accuracy():
  # argmax [1, 0, 0, 1] vs labels [1, 1, 0, 0]: rows 0 and 2 right, row 1
  # wrong; row 3 is unlabelled. 2 correct of 3 labelled -> 2 / 3.
  logits = np.array([[0., 1.], [1., 0.], [2., 1.], [0., 5.]], np.float32)
  labels = np.array([1, 1, 0, 0])
  stats, value = _eval(metrics.accuracy(), logits, labels,
                       np.array([1., 1., 1., 0.]))
  assert stats == {"correct": 2.0, "count": 3.0}
  assert value == pytest.approx(2 / 3)


def test_accuracy_counts_elements():
  # [B=2, T=3] token labels with a [B] mask [1, 0]: example 0's 3 tokens count,
  # 2 of them right (argmax per token: 0, 1, 1 vs labels 0, 1, 0).
  logits = np.array([[[1., 0.], [0., 1.], [0., 1.]],
                     [[1., 0.], [1., 0.], [1., 0.]]], np.float32)
  labels = np.array([[0, 1, 0], [1, 1, 1]])
  stats, value = _eval(metrics.accuracy(), logits, labels, np.array([1., 0.]))
  assert stats == {"correct": 2.0, "count": 3.0}
  assert value == pytest.approx(2 / 3)
  # A dense [B, T] mask selects tokens: (0,0) right, (1,0) wrong -> 1 / 2.
  stats, _ = _eval(metrics.accuracy(), logits, labels,
                   np.array([[1., 0., 0.], [1., 0., 0.]]))
  assert stats == {"correct": 1.0, "count": 2.0}


def test_binary_f1():
  # logits [2, -1, 3, -2, 1] > 0 -> predicted [1, 0, 1, 0, 1];
  # labels [1, 1, 0, 0, 1]: tp = 2 (0, 4), fp = 1 (2), fn = 1 (1).
  # f1 = 2*2 / (2*2 + 1 + 1) = 2/3.
  logits = np.array([2., -1., 3., -2., 1.], np.float32)
  labels = np.array([1., 1., 0., 0., 1.], np.float32)
  stats, value = _eval(metrics.binary_f1(), logits, labels, np.ones(5))
  assert stats == {"tp": 2.0, "fp": 1.0, "fn": 1.0}
  assert value == pytest.approx(2 / 3)
  # threshold 1.5 -> predicted [1, 0, 1, 0, 0]: tp 1, fp 1, fn 2 -> 2 / 5.
  stats, value = _eval(metrics.binary_f1(threshold=1.5), logits, labels,
                       np.ones(5))
  assert stats == {"tp": 1.0, "fp": 1.0, "fn": 2.0}
  assert value == pytest.approx(0.4)


def test_binary_f1_multilabel_micro_average_and_mask():
  # [B=2, L=2]; example 1 unlabelled. Example 0: predicted [1, 1], labels
  # [1, 0] -> tp 1, fp 1, fn 0: f1 = 2 / 3.
  logits = np.array([[1., 1.], [-1., -1.]], np.float32)
  labels = np.array([[1., 0.], [1., 1.]], np.float32)
  stats, value = _eval(metrics.binary_f1(), logits, labels, np.array([1., 0.]))
  assert stats == {"tp": 1.0, "fp": 1.0, "fn": 0.0}
  assert value == pytest.approx(2 / 3)


def test_f1_undefined_without_positives():
  # No positive prediction and no positive label: 0 / 0 is NaN, not 0 or 1.
  _, value = _eval(metrics.binary_f1(), -np.ones(3, np.float32), np.zeros(3),
                   np.ones(3))
  assert math.isnan(value)


def test_mae_rmse_mse():
  # errors [1, 1, 1, 3]: mae = 6/4 = 1.5, mse = (1+1+1+9)/4 = 3,
  # rmse = sqrt(3) ~ 1.732 > mae (one large error dominates RMSE).
  pred = np.zeros(4, np.float32)
  target = np.array([1., -1., 1., 3.], np.float32)
  mask = np.ones(4)
  stats, mae = _eval(metrics.mean_absolute_error(), pred, target, mask)
  assert stats == {"sum_abs_error": 6.0, "count": 4.0}
  assert mae == pytest.approx(1.5)
  _, mse = _eval(metrics.mean_squared_error(), pred, target, mask)
  assert mse == pytest.approx(3.0)
  stats, rmse = _eval(metrics.root_mean_squared_error(), pred, target, mask)
  assert stats == {"sum_sq_error": 12.0, "count": 4.0}
  assert rmse == pytest.approx(math.sqrt(3.0))


def test_regression_example_mask_averages_trailing_axes():
  # [B=3, D=2] targets with a [B] mask [1, 1, 0]: per-example mean |error|
  # (1+3)/2 = 2 and (0+2)/2 = 1; count = 2 examples (not 4 elements); the
  # value 1.5 equals the element-wise mean (1+3+0+2)/4.
  pred = np.array([[1., 3.], [0., 2.], [50., 50.]], np.float32)
  stats, mae = _eval(metrics.mean_absolute_error(), pred, np.zeros_like(pred),
                     np.array([1., 1., 0.]))
  assert stats == {"sum_abs_error": 3.0, "count": 2.0}
  assert mae == pytest.approx(1.5)


def test_psnr():
  # Example 0: all errors 0.1 -> mse 0.01 -> 10 log10(1 / 0.01) = 20 dB.
  # Example 1: all errors 0.01 -> mse 1e-4 -> 40 dB. Mean 30 dB.
  # Example 2 is unlabelled and does not count.
  target = np.zeros((3, 2, 2), np.float32)
  pred = np.stack([np.full((2, 2), 0.1), np.full((2, 2), 0.01),
                   np.full((2, 2), 7.0)]).astype(np.float32)
  stats, value = _eval(metrics.psnr(), pred, target, np.array([1., 1., 0.]))
  assert stats["count"] == 2.0
  assert value == pytest.approx(30.0, abs=1e-4)


def test_psnr_max_value_dense_mask_and_cap():
  # max 2, errors 0.2 -> mse 0.04: 10 log10(4 / 0.04) = 20 dB.
  pred = np.full((1, 4), 0.2, np.float32)
  _, value = _eval(metrics.psnr(max_value=2.0), pred, np.zeros_like(pred),
                   np.ones(1))
  assert value == pytest.approx(20.0, abs=1e-4)
  # Dense mask: only elements 0 and 1 (errors 0.1, 0.1) count -> 20 dB at
  # max 1, although element 3's error is 100.
  pred = np.array([[0.1, 0.1, 0.0, 100.0]], np.float32)
  _, value = _eval(metrics.psnr(), pred, np.zeros_like(pred),
                   np.array([[1., 1., 0., 0.]]))
  assert value == pytest.approx(20.0, abs=1e-4)
  # A perfect example is capped at 10 log10(1 / 1e-10) = 100 dB, not inf.
  _, value = _eval(metrics.psnr(), np.ones((1, 3), np.float32),
                   np.ones((1, 3), np.float32), np.ones(1))
  assert value == pytest.approx(100.0, abs=1e-3)


# ---------------------------------------------------------------------------
# Undefined values, non-finite inputs at unlabelled positions.
# ---------------------------------------------------------------------------

ALL_METRICS = [
    (metrics.accuracy(), np.full((3, 2), np.nan, np.float32),
     np.zeros(3, np.int32)),
    (metrics.binary_f1(), np.full((3, 2), np.nan, np.float32),
     np.ones((3, 2), np.float32)),
    (metrics.mean_absolute_error(), np.full((3, 2), np.inf, np.float32),
     np.zeros((3, 2), np.float32)),
    (metrics.mean_squared_error(), np.full((3, 2), np.inf, np.float32),
     np.zeros((3, 2), np.float32)),
    (metrics.root_mean_squared_error(), np.full((3, 2), np.nan, np.float32),
     np.zeros((3, 2), np.float32)),
    (metrics.psnr(), np.full((3, 2), np.nan, np.float32),
     np.zeros((3, 2), np.float32)),
]


@pytest.mark.parametrize("metric,pred,label", ALL_METRICS,
                         ids=[m.name for m, _, _ in ALL_METRICS])
def test_count_zero_is_nan_and_garbage_does_not_leak(metric, pred, label):
  stats, value = _eval(metric, pred, label, np.zeros(3))
  assert all(v == 0.0 for v in stats.values()), stats
  assert isinstance(value, float) and math.isnan(value)


def test_finalize_accepts_numpy_and_jax_scalars():
  metric = metrics.accuracy()
  assert metric.finalize({"correct": np.float32(3),
                          "count": np.float64(4)}) == 0.75
  assert metric.finalize({"correct": jnp.array(3.0),
                          "count": jnp.array(4.0)}) == 0.75
  assert isinstance(metric.finalize({"correct": 1, "count": 2}), float)


# ---------------------------------------------------------------------------
# Accumulation: stats of two halves add up to the full batch.
# ---------------------------------------------------------------------------

B = 6
_WEIGHTS = st.sampled_from([0.0, 0.5, 1.0])
_FLOATS = st.floats(-3, 3, width=32)
# kind -> (metrics, draws (pred, label) for a batch of B, mask trailing shape).
_REGRESSION = (metrics.mean_absolute_error(), metrics.mean_squared_error(),
               metrics.root_mean_squared_error(), metrics.psnr(max_value=3.0))
GROUPS = {
    "classification": ((metrics.accuracy(),), (3,)),
    "multilabel": ((metrics.binary_f1(),
                    metrics.binary_f1(threshold=0.5)._replace(name="f1@0.5")),
                   (2,)),
    "regression": (_REGRESSION, (2, 2)),
    "regression_dense": (_REGRESSION, (2, 2)),
}
# One jitted compute_stats per group; only the B and B/2 shapes are compiled.
COMPUTE = {k: jax.jit(lambda p, l, m, ms=ms: metrics.compute_stats(ms, p, l, m))
           for k, (ms, _) in GROUPS.items()}


def _draw_batch(data, group):
  _, trailing = GROUPS[group]
  if group == "classification":
    pred = data.draw(hnp.arrays(np.float32, (B,) + trailing, elements=_FLOATS))
    label = data.draw(hnp.arrays(np.int32, (B,),
                                 elements=st.integers(0, trailing[0] - 1)))
    mask_shape = (B,)
  elif group == "multilabel":
    pred = data.draw(hnp.arrays(np.float32, (B,) + trailing, elements=_FLOATS))
    label = data.draw(hnp.arrays(np.float32, pred.shape,
                                 elements=st.sampled_from([0.0, 1.0])))
    mask_shape = pred.shape  # per-label mask
  else:
    pred = data.draw(hnp.arrays(np.float32, (B,) + trailing, elements=_FLOATS))
    label = data.draw(hnp.arrays(np.float32, pred.shape, elements=_FLOATS))
    mask_shape = (B, 2) if group == "regression_dense" else (B,)
  mask = data.draw(hnp.arrays(np.float32, mask_shape, elements=_WEIGHTS))
  return pred, label, mask


@pytest.mark.parametrize("group", sorted(GROUPS))
@PROPERTY
@hypothesis.given(data=st.data())
def test_two_halves_add_up_to_the_full_batch(group, data):
  ms, _ = GROUPS[group]
  pred, label, mask = _draw_batch(data, group)
  h = B // 2
  full = COMPUTE[group](pred, label, mask)
  first = COMPUTE[group](pred[:h], label[:h], mask[:h])
  second = COMPUTE[group](pred[h:], label[h:], mask[h:])
  # Accumulate on the host in float64, as an eval loop would.
  to_host = lambda stats: jax.tree.map(np.float64, jax.device_get(stats))
  summed = metrics.add_stats(None, to_host(first))
  summed = metrics.add_stats(summed, to_host(second))
  full_host = jax.device_get(full)
  assert jax.tree.structure(summed) == jax.tree.structure(full_host)
  for got_leaf, want_leaf in zip(jax.tree.leaves(summed),
                                 jax.tree.leaves(full_host)):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-5)
  want = metrics.finalize_all(ms, full)
  got = metrics.finalize_all(ms, summed)
  assert want.keys() == got.keys() == {m.name for m in ms}
  for name in want:
    if math.isnan(want[name]):
      assert math.isnan(got[name]), name
    else:
      assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-5), name


@PROPERTY
@hypothesis.given(data=st.data())
def test_regression_metrics_match_numpy(data):
  pred, label, mask = _draw_batch(data, "regression_dense")  # mask [B, 2]
  ms, _ = GROUPS["regression_dense"]
  got = metrics.finalize_all(ms, COMPUTE["regression_dense"](pred, label, mask))
  # Reference in float64: each [B, 2] mask position averages its 2 trailing
  # elements; the value is the mask-weighted mean over positions.
  err = pred.astype(np.float64) - label
  w = mask.astype(np.float64)
  if w.sum() == 0:
    assert all(math.isnan(v) for v in got.values())
    return
  mae = np.sum(w * np.abs(err).mean(-1)) / w.sum()
  mse = np.sum(w * np.square(err).mean(-1)) / w.sum()
  ew = np.broadcast_to(w[..., None], err.shape)
  has = ew.reshape(B, -1).sum(-1) > 0
  ex_weight = ew.reshape(B, -1).sum(-1)[has]
  ex_mse = (ew * err**2).reshape(B, -1).sum(-1)[has] / ex_weight
  psnr = np.mean(10 * np.log10(9.0 / np.maximum(ex_mse, 9e-10)))
  assert got["mae"] == pytest.approx(mae, rel=1e-5, abs=1e-6)
  assert got["mse"] == pytest.approx(mse, rel=1e-5, abs=1e-6)
  assert got["rmse"] == pytest.approx(math.sqrt(mse), rel=1e-5, abs=1e-6)
  assert got["psnr"] == pytest.approx(psnr, rel=1e-4, abs=1e-4)


# ---------------------------------------------------------------------------
# Helpers, registry and errors.
# ---------------------------------------------------------------------------


def test_compute_stats_and_finalize_all():
  ms = [metrics.mean_absolute_error(), metrics.root_mean_squared_error()]
  pred = np.zeros(4, np.float32)
  stats = metrics.compute_stats(ms, pred, np.array([1., 1., 1., 3.]),
                                np.ones(4))
  assert set(stats) == {"mae", "rmse"}
  values = metrics.finalize_all(ms, stats)
  assert values == pytest.approx({"mae": 1.5, "rmse": math.sqrt(3.0)})


def test_add_stats_adds_leaves():
  a = {"acc": {"correct": np.float32(1), "count": np.float32(2)}}
  b = {"acc": {"correct": np.float32(3), "count": np.float32(4)}}
  assert metrics.add_stats(a, b) == {"acc": {"correct": 4.0, "count": 6.0}}


def test_duplicate_names_rejected():
  with pytest.raises(ValueError, match="duplicate metric names"):
    metrics.compute_stats([metrics.accuracy(), metrics.accuracy()],
                          np.zeros((2, 2)), np.zeros(2, np.int32), np.ones(2))


def test_finalize_all_missing_stats():
  with pytest.raises(KeyError, match="no stats for metric 'mae'"):
    metrics.finalize_all([metrics.mean_absolute_error()], {})


def test_shape_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"mask shape \(4, 3\) is not a prefix "
                     r"of the loss shape \(4,\)"):
    metrics.mean_absolute_error().stats(np.zeros(4), np.zeros(4),
                                        np.ones((4, 3)))
  with pytest.raises(ValueError, match=r"pred shape \(4, 1\) does not match "
                     r"label shape \(4,\)"):
    metrics.root_mean_squared_error().stats(np.zeros((4, 1)), np.zeros(4),
                                            np.ones(4))
  with pytest.raises(ValueError, match="integer class indices"):
    metrics.accuracy().stats(np.zeros((4, 2)), np.zeros(4), np.ones(4))
  with pytest.raises(ValueError, match=r"labels shape \(4, 2\) does not match "
                     r"logits shape \(4, 2\)"):
    metrics.accuracy().stats(np.zeros((4, 2)), np.zeros((4, 2), np.int32),
                             np.ones(4))
  with pytest.raises(ValueError, match=r"logits shape \(4, 2\) does not match "
                     r"labels shape \(4,\)"):
    metrics.binary_f1().stats(np.zeros((4, 2)), np.zeros(4), np.ones(4))


def test_get_metric():
  assert sorted(metrics.METRICS) == ["accuracy", "f1", "mae", "mse", "psnr",
                                     "rmse"]
  for name, factory in metrics.METRICS.items():
    assert factory().name == name == metrics.get_metric(name).name
  f1 = metrics.get_metric("f1", threshold=1.5)
  _, value = _eval(f1, np.array([2., -1., 3., -2., 1.], np.float32),
                   np.array([1., 1., 0., 0., 1.], np.float32), np.ones(5))
  assert value == pytest.approx(0.4)


def test_get_metric_errors():
  with pytest.raises(ValueError, match="unknown metric 'acc'; valid: accuracy, "
                     "f1, mae, mse, psnr, rmse"):
    metrics.get_metric("acc")
  with pytest.raises(TypeError, match=r"unknown argument\(s\) \['max_val'\]; "
                     r"valid: \['max_value'\]"):
    metrics.get_metric("psnr", max_val=255)
  with pytest.raises(ValueError, match="max_value must be > 0"):
    metrics.get_metric("psnr", max_value=0.0)
