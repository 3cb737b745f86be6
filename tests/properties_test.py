"""Property-based tests at the edges: masks, ties, zeros and extreme magnitudes.

Hypothesis draws VALUES for small fixed shapes, so that every jitted function
compiles once per shape (the compiled functions are cached below) and the file
stays fast. Values include the float32 extremes the library can meet in
practice: zeros, subnormals (1e-45), tiny (1e-30), huge (1e30, 3e38), and NaN
or inf at positions the mask says are unlabelled.

Covered, for every entry of each registry:
* losses (`mtl_jax.losses.LOSSES`): all-masked gives (0, 0) with an exactly
  zero, NaN-free gradient; count is the cleaned mask sum; the sum is finite and
  non-negative (with a finite gradient) in a stated input range; unlabelled
  entries never change the value or the gradient; closed forms at zero inputs.
* metrics (`mtl_jax.metrics.METRICS`): all-masked gives all-zero stats and a
  NaN (undefined, not an exception) from `finalize`; unlabelled garbage never
  changes a statistic; finite inputs give finite values.
* weighting (`mtl_jax.weighting.WEIGHTINGS`): extreme losses and gradient
  norms over several steps keep weights and every state leaf (optimizer
  moments included) finite, and weights non-negative; absent tasks
  keep their state entries bit for bit; normalised methods keep their sums;
  tied tasks get tied weights; K=1 works.
* aggregation (`mtl_jax.aggregation.AGGREGATORS`): finite directions for
  extreme gradients; zero gradients give a zero direction; one task, and
  identical tasks, give a direction parallel to that gradient; exactly opposite
  gradients cancel; an absent task (count 0, zero row) gives exactly the result
  of the problem without it.
"""

import functools
import math

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import aggregation
from mtl_jax import losses as losses_lib
from mtl_jax import metrics as metrics_lib
from mtl_jax import weighting

# Deterministic (tests/ must be), and small enough for a loaded 2-core CPU.
settings = hypothesis.settings(max_examples=25, deadline=None,
                               derandomize=True)

SUBNORMAL = float(np.float32(1e-45))  # the smallest positive float32
EXTREME_MAGNITUDES = [0.0, SUBNORMAL, 1e-38, 1e-30, 1e-8, 1.0, 1e8, 1e30, 3e38]
GARBAGE = [math.nan, math.inf, -math.inf, 3e38, -3e38, 1e30, SUBNORMAL, 0.0]

B, C = 4, 3  # batch, classes / trailing elements


def f32_arrays(shape, lo, hi, extremes=()):
  """float32 arrays with values in [lo, hi], plus the given special values."""
  elements = st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32,
                       allow_subnormal=True)
  if extremes:
    elements = st.one_of(elements, st.sampled_from(list(extremes)))
  return hnp.arrays(np.float32, shape, elements=elements)


def masks(shape, values=(0.0, 1.0)):
  return hnp.arrays(np.float32, shape, elements=st.sampled_from(list(values)))


def garbage_arrays(shape):
  return hnp.arrays(np.float32, shape, elements=st.sampled_from(GARBAGE))


# --------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------

LOSS_NAMES = sorted(losses_lib.LOSSES)

# Inputs in which each loss's per-position value, its sum over B positions and
# its gradient are representable in float32 (the losses do not document a
# range; these are the ones where the exact result is finite): logits up to
# 1e30 for the cross-entropies (the loss is ~|logit|), |err| up to 2e18 for
# the MSE (the loss is err^2), |err| up to 2e37 for the L1 and Huber losses.
PRED_RANGE = {"softmax_cross_entropy": 1e30,
              "sigmoid_binary_cross_entropy": 1e30,
              "mse": 1e18, "l1": 1e37, "huber": 1e37}


def loss_shapes(name):
  """(pred shape, label shape, label dtype); the mask is always [B]."""
  if name == "softmax_cross_entropy":
    return (B, C), (B,), np.int32
  return (B, C), (B, C), np.float32


@functools.cache
def loss_and_grad(name):
  loss = losses_lib.LOSSES[name]

  def f(pred, label, mask):
    total, count = loss(pred, label, mask)
    grad = jax.grad(lambda p: loss(p, label, mask)[0])(pred)
    return total, count, grad

  return jax.jit(f)


@st.composite
def loss_inputs(draw, name, extremes=True):
  """(pred, label) within the loss's finite range, extremes included."""
  pred_shape, label_shape, label_dtype = loss_shapes(name)
  bound = PRED_RANGE[name]
  special = [v for m in EXTREME_MAGNITUDES if m <= bound for v in (m, -m)]
  pred = draw(f32_arrays(pred_shape, -bound, bound,
                         special if extremes else ()))
  if name == "softmax_cross_entropy":
    label = draw(hnp.arrays(np.int32, label_shape, elements=st.integers(0, C - 1)))
  elif name == "sigmoid_binary_cross_entropy":
    label = draw(f32_arrays(label_shape, 0.0, 1.0, [0.0, 1.0, SUBNORMAL]))
  else:
    label = draw(f32_arrays(label_shape, -bound, bound,
                            special if extremes else ()))
  return pred, label


@st.composite
def garbage_labels(draw, name):
  _, label_shape, _ = loss_shapes(name)
  if name == "softmax_cross_entropy":
    return draw(hnp.arrays(np.int32, label_shape,
                           elements=st.sampled_from([-1, C, 99, -2**31])))
  return draw(garbage_arrays(label_shape))


@pytest.mark.parametrize("name", LOSS_NAMES)
@settings
@hypothesis.given(data=st.data())
def test_loss_all_masked_is_zero_with_zero_gradient(name, data):
  pred_shape, _, _ = loss_shapes(name)
  pred = data.draw(garbage_arrays(pred_shape))
  label = data.draw(garbage_labels(name))
  # Zero, negative and NaN mask entries all mean "unlabelled".
  mask = data.draw(masks((B,), (0.0, -0.0, -1.0, math.nan)))
  total, count, grad = loss_and_grad(name)(pred, label, mask)
  assert float(total) == 0.0 and float(count) == 0.0
  np.testing.assert_array_equal(np.asarray(grad), np.zeros(pred_shape))
  assert float(losses_lib.masked_mean(total, count)) == 0.0


@pytest.mark.parametrize("name", LOSS_NAMES)
@settings
@hypothesis.given(data=st.data())
def test_loss_count_is_mask_sum_and_value_finite_in_range(name, data):
  pred, label = data.draw(loss_inputs(name))
  mask = data.draw(masks((B,), (0.0, 0.25, 1.0, 2.0, -1.0)))
  total, count, grad = loss_and_grad(name)(pred, label, mask)
  np.testing.assert_allclose(float(count), np.sum(np.maximum(mask, 0.0)),
                             rtol=0, atol=0)
  assert np.isfinite(float(total)) and float(total) >= 0.0
  assert np.all(np.isfinite(np.asarray(grad)))
  if not np.any(mask > 0):
    assert float(total) == 0.0


@pytest.mark.parametrize("name", LOSS_NAMES)
@settings
@hypothesis.given(data=st.data())
def test_loss_ignores_unlabelled_entries(name, data):
  pred, label = data.draw(loss_inputs(name))
  mask = data.draw(masks((B,), (0.0, 1.0, 0.5)))
  pred_shape, label_shape, _ = loss_shapes(name)
  unlabelled = mask <= 0
  bad_pred = np.where(unlabelled[:, None], data.draw(garbage_arrays(pred_shape)),
                      pred)
  bad_label = np.where(
      unlabelled.reshape((B,) + (1,) * (len(label_shape) - 1)),
      data.draw(garbage_labels(name)), label)
  f = loss_and_grad(name)
  total, count, grad = f(pred, label, mask)
  bad_total, bad_count, bad_grad = f(bad_pred, bad_label, mask)
  # Bit-exact: the double where makes the computation identical.
  np.testing.assert_array_equal(np.asarray(bad_total), np.asarray(total))
  np.testing.assert_array_equal(np.asarray(bad_count), np.asarray(count))
  np.testing.assert_array_equal(np.asarray(bad_grad), np.asarray(grad))
  np.testing.assert_array_equal(np.asarray(grad)[unlabelled], 0.0)


@pytest.mark.parametrize("name", LOSS_NAMES)
@settings
@hypothesis.given(data=st.data())
def test_loss_closed_forms_at_zero(name, data):
  """Zero logits (ties between classes) and pred == target (zero error)."""
  mask = data.draw(masks((B,), (0.0, 1.0, 3.0)))
  f = loss_and_grad(name)
  n = float(np.sum(mask))
  if name == "softmax_cross_entropy":
    label = data.draw(hnp.arrays(np.int32, (B,), elements=st.integers(0, C - 1)))
    total, count, _ = f(np.zeros((B, C), np.float32), label, mask)
    np.testing.assert_allclose(float(total), n * math.log(C), rtol=1e-6)
  elif name == "sigmoid_binary_cross_entropy":
    label = data.draw(f32_arrays((B, C), 0.0, 1.0, [0.0, 1.0]))
    total, count, _ = f(np.zeros((B, C), np.float32), label, mask)
    np.testing.assert_allclose(float(total), n * math.log(2.0), rtol=1e-6)
  else:
    pred = data.draw(f32_arrays((B, C), -3e38, 3e38, GARBAGE[3:]))
    total, count, grad = f(pred, pred, mask)
    assert float(total) == 0.0
    if name != "l1":
      # |x| has no derivative at 0 (JAX picks the subgradient 1); the smooth
      # losses have exactly zero gradient at zero error.
      np.testing.assert_array_equal(np.asarray(grad), 0.0)
  assert float(count) == n


# --------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------

METRIC_NAMES = sorted(metrics_lib.METRICS)


def metric_shapes(name):
  if name == "accuracy":
    return (B, C), (B,), np.int32
  return (B, C), (B, C), np.float32


@functools.cache
def metric_stats(name):
  return jax.jit(metrics_lib.get_metric(name).stats)


@st.composite
def metric_inputs(draw, name):
  pred_shape, label_shape, _ = metric_shapes(name)
  # |err| <= 2e18 so that squared errors (and their sum) stay finite.
  pred = draw(f32_arrays(pred_shape, -1e18, 1e18, [0.0, SUBNORMAL, 1e-30]))
  if name == "accuracy":
    label = draw(hnp.arrays(np.int32, label_shape, elements=st.integers(0, C - 1)))
  elif name == "f1":
    label = draw(f32_arrays(label_shape, 0.0, 1.0, [0.0, 1.0]))
  else:
    label = draw(f32_arrays(label_shape, -1e18, 1e18, [0.0, SUBNORMAL]))
  return pred, label


@pytest.mark.parametrize("name", METRIC_NAMES)
@settings
@hypothesis.given(data=st.data())
def test_metric_all_masked_gives_zero_stats_and_nan(name, data):
  pred_shape, label_shape, _ = metric_shapes(name)
  pred = data.draw(garbage_arrays(pred_shape))
  if name == "accuracy":
    label = data.draw(hnp.arrays(np.int32, label_shape,
                                 elements=st.sampled_from([-1, 0, 99])))
  else:
    label = data.draw(garbage_arrays(label_shape))
  mask = data.draw(masks((B,), (0.0, -1.0, math.nan)))
  stats = metric_stats(name)(pred, label, mask)
  for key, value in stats.items():
    assert float(value) == 0.0, (key, value)
  metric = metrics_lib.get_metric(name)
  # "NaN when the metric is undefined (nothing labelled)": never an exception,
  # never a made-up 0; from device arrays and from host float64 sums alike.
  assert math.isnan(metric.finalize(stats))
  host = jax.tree.map(np.float64, jax.device_get(stats))
  assert math.isnan(metrics_lib.finalize_all([metric], {name: host})[name])
  summed = metrics_lib.add_stats(None, host)
  summed = metrics_lib.add_stats(summed, host)
  assert math.isnan(metric.finalize(summed))


@pytest.mark.parametrize("name", METRIC_NAMES)
@settings
@hypothesis.given(data=st.data())
def test_metric_ignores_unlabelled_and_is_finite(name, data):
  pred, label = data.draw(metric_inputs(name))
  mask = data.draw(masks((B,), (0.0, 0.5, 1.0)))
  pred_shape, label_shape, _ = metric_shapes(name)
  unlabelled = mask <= 0
  bad_pred = np.where(unlabelled[:, None], data.draw(garbage_arrays(pred_shape)),
                      pred)
  if name == "accuracy":
    bad_label = np.where(unlabelled, -7, label).astype(np.int32)
  else:
    bad_label = np.where(unlabelled[:, None],
                         data.draw(garbage_arrays(label_shape)), label)
  stats = metric_stats(name)(pred, label, mask)
  bad_stats = metric_stats(name)(bad_pred, bad_label, mask)
  for key in stats:
    np.testing.assert_array_equal(np.asarray(bad_stats[key]),
                                  np.asarray(stats[key]), err_msg=key)
    assert np.isfinite(float(stats[key])) and float(stats[key]) >= -1e-3 or (
        name == "psnr"), (key, stats[key])
  value = metrics_lib.get_metric(name).finalize(stats)
  labelled = bool(np.any(mask > 0))
  if name == "f1":
    stats_np = {k: float(v) for k, v in stats.items()}
    defined = stats_np["tp"] + stats_np["fp"] + stats_np["fn"] > 0
  else:
    defined = labelled
  if defined:
    assert math.isfinite(value), (stats, value)
    if name in ("accuracy", "f1"):
      assert 0.0 <= value <= 1.0
    if name == "psnr":
      assert value <= 100.0 + 1e-4
  else:
    assert math.isnan(value)


@settings
@hypothesis.given(data=st.data())
def test_psnr_caps_identical_images_at_100_db(data):
  pred = data.draw(f32_arrays((B, C), -1e18, 1e18, [0.0, SUBNORMAL, 3e38]))
  mask = data.draw(masks((B,), (0.0, 1.0)))
  stats = metric_stats("psnr")(pred, pred, mask)
  n = int(np.sum(mask > 0))
  assert float(stats["count"]) == n
  np.testing.assert_allclose(float(stats["psnr_sum"]), 100.0 * n, rtol=1e-6)


# --------------------------------------------------------------------------
# Weighting.
# --------------------------------------------------------------------------

K = 3
WEIGHTING_NAMES = sorted(weighting.WEIGHTINGS)
# Methods whose weights are normalised over the present tasks:
# sum_k w_k == target(K') (module docstrings of dwa, famo, rlw).
WEIGHT_SUMS = {"dwa": lambda n: n, "famo": lambda n: 1.0 if n else 0.0,
               "rlw": lambda n: 1.0 if n else 0.0}


def build_weighting(name, num_tasks):
  if name == "equal":
    return weighting.get_weighting(name, num_tasks=num_tasks)
  if name == "static":
    return weighting.get_weighting(name, weights=[0.5, 2.0, 0.0][:num_tasks])
  return weighting.get_weighting(name)


@functools.cache
def jitted_weighting(name, num_tasks):
  w = build_weighting(name, num_tasks)
  post = jax.jit(w.post_update) if w.post_update is not None else None
  return w, jax.jit(w.update), post


def per_task_rows(state, k):
  return [np.asarray(leaf)[k] for leaf in jax.tree.leaves(state)]


extreme_values = st.sampled_from(EXTREME_MAGNITUDES)


def weighting_steps(num_tasks):
  step = st.tuples(
      st.lists(extreme_values, min_size=num_tasks, max_size=num_tasks),
      st.lists(st.sampled_from([0.0, 1.0, 1e6]), min_size=num_tasks,
               max_size=num_tasks),
      st.lists(extreme_values, min_size=num_tasks, max_size=num_tasks),
      st.sampled_from([0.0, 0.5, 1.0, 2.0]))
  return st.lists(step, min_size=1, max_size=4)


def run_weighting(name, num_tasks, steps, seed):
  """Runs the steps; checks per-step properties and yields (weights, counts)."""
  w, update, post_update = jitted_weighting(name, num_tasks)
  state = w.init(num_tasks)
  for t, (losses, counts, norms, decay) in enumerate(steps):
    counts = np.asarray(counts, np.float32)
    present = counts > 0
    # An absent task's loss and gradient are 0, as the train step makes them.
    losses = np.asarray(losses, np.float32) * present
    norms = np.asarray(norms, np.float32) * present
    weights, new_state = update(losses, counts, state,
                                rng=jax.random.key(seed + t), grad_norms=norms)
    if post_update is not None:
      # The updated model's losses, kept finite (3e38 * 2 would be inf).
      new_losses = np.minimum(losses.astype(np.float64) * decay, 3e38)
      new_state = post_update(new_losses.astype(np.float32), counts, new_state)
    weights = np.asarray(weights)
    assert weights.shape == (num_tasks,)
    assert np.all(np.isfinite(weights)), (t, losses, counts, norms, weights)
    assert np.all(weights >= 0), (t, weights)
    for k in np.flatnonzero(~present):
      for new, old in zip(per_task_rows(new_state, k), per_task_rows(state, k)):
        np.testing.assert_array_equal(new, old)
    # Every leaf, Adam's second moment `nu` included (the learned weights'
    # gradients are clipped below its float32 overflow, see masking).
    for leaf in jax.tree.leaves(new_state):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), (t, new_state)
    if name in WEIGHT_SUMS:
      np.testing.assert_allclose(np.sum(weights),
                                 WEIGHT_SUMS[name](int(np.sum(present))),
                                 rtol=1e-5)
      np.testing.assert_array_equal(weights[~present], 0.0)
    yield weights, present
    state = new_state


@pytest.mark.parametrize("num_tasks", [1, K])
@pytest.mark.parametrize("name", WEIGHTING_NAMES)
@settings
@hypothesis.given(data=st.data())
def test_weighting_extreme_losses(name, num_tasks, data):
  steps = data.draw(weighting_steps(num_tasks))
  seed = data.draw(st.integers(0, 2**31 - 1))
  for weights, present in run_weighting(name, num_tasks, steps, seed):
    if num_tasks == 1 and present[0] and name in ("dwa", "famo", "gls", "rlw"):
      # A single present task is weighted 1 by every normalising method.
      np.testing.assert_allclose(weights, [1.0], rtol=1e-5)


@pytest.mark.parametrize("name", WEIGHTING_NAMES)
@settings
@hypothesis.given(
    per_step=st.lists(st.tuples(extreme_values, extreme_values), min_size=1,
                      max_size=4),
    seed=st.integers(0, 2**31 - 1))
def test_weighting_ties_give_equal_weights(name, per_step, seed):
  """Tasks with identical histories (losses, norms, all present) tie."""
  steps = [([loss] * K, [1.0] * K, [norm] * K, 0.5)
           for loss, norm in per_step]
  for weights, _ in run_weighting(name, K, steps, seed):
    if name == "rlw":
      continue  # random weights: only the checks inside run_weighting apply
    if name == "static":
      np.testing.assert_array_equal(weights, [0.5, 2.0, 0.0])
      continue
    np.testing.assert_allclose(weights, np.full(K, weights[0]), rtol=1e-6)


# --------------------------------------------------------------------------
# Aggregation.
# --------------------------------------------------------------------------

AGG_NAMES = sorted(aggregation.AGGREGATORS)
P = 5
SCALES = [1e-30, 1e-10, 1.0, 1e10, 1e30]
# Directions with a positive coefficient on the gradient for a single task
# and for identical tasks (docstrings: each is a non-negative combination of
# the task gradients that reduces to a positive multiple of g in these cases).


@functools.cache
def jitted_aggregator(name):
  agg = aggregation.get_aggregator(name)
  return agg, jax.jit(agg.update)


def aggregate(name, grads, counts=None, losses=None, seed=0, state=None):
  agg, update = jitted_aggregator(name)
  grads = np.asarray(grads, np.float32)
  k = grads.shape[0]
  if counts is None:
    counts = np.ones(k, np.float32)
  if losses is None:
    losses = np.ones(k, np.float32) * (np.asarray(counts) > 0)
  if state is None:
    state = agg.init(k)
  direction, state = update(grads, state, losses=np.asarray(losses, np.float32),
                            counts=np.asarray(counts, np.float32),
                            rng=jax.random.key(seed))
  return np.asarray(direction), state


def unit_rows(shape):
  """Gradients of moderate magnitude, not all zero in a row."""
  return f32_arrays(shape, -1.0, 1.0, [0.0]).filter(
      lambda g: np.all(np.linalg.norm(g.astype(np.float64), axis=-1) > 1e-3))


def assert_parallel(d, g, err=""):
  """`d = c g` with c > 0, checked by the cosine in float64."""
  d64, g64 = np.asarray(d, np.float64), np.asarray(g, np.float64)
  assert np.all(np.isfinite(d64)), err
  nd, ng = np.linalg.norm(d64), np.linalg.norm(g64)
  assert nd > 0 and ng > 0, (err, d, g)
  cos = float(d64 @ g64) / (nd * ng)
  assert cos > 1 - 1e-5, (err, cos, d, g)


# Entries up to 1e30, so that the exact direction is representable (with 3e38
# entries even the plain sum of K tasks overflows float32).
@pytest.mark.parametrize("name", AGG_NAMES)
@settings
@hypothesis.given(
    grads=hnp.arrays(np.float32, (K, P), elements=st.sampled_from(
        [v for m in EXTREME_MAGNITUDES if m <= 1e30 for v in (m, -m)])),
    seed=st.integers(0, 2**31 - 1))
def test_aggregator_finite_for_extreme_gradients(name, grads, seed):
  direction, state = aggregate(name, grads, seed=seed)
  assert np.all(np.isfinite(direction)), (grads, direction)
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


@pytest.mark.parametrize("name", AGG_NAMES)
@settings
@hypothesis.given(counts=st.lists(st.sampled_from([0.0, 1.0]), min_size=K,
                                  max_size=K), seed=st.integers(0, 2**31 - 1))
def test_aggregator_zero_gradients_give_zero(name, counts, seed):
  direction, _ = aggregate(name, np.zeros((K, P)), counts=counts, seed=seed)
  np.testing.assert_array_equal(direction, np.zeros(P))


@pytest.mark.parametrize("name", AGG_NAMES)
@settings
@hypothesis.given(g=unit_rows((P,)), scale=st.sampled_from(SCALES),
                  seed=st.integers(0, 2**31 - 1))
def test_aggregator_single_task_is_parallel(name, g, scale, seed):
  g = (g * np.float32(scale)).astype(np.float32)
  hypothesis.assume(np.any(g != 0))
  direction, _ = aggregate(name, g[None], seed=seed)
  assert_parallel(direction, g, name)


@pytest.mark.parametrize("name", AGG_NAMES)
@settings
@hypothesis.given(g=unit_rows((P,)), scale=st.sampled_from(SCALES),
                  multiples=st.lists(st.sampled_from([1.0, 0.3, 0.7, 2.0, 8.0]),
                                     min_size=K, max_size=K),
                  seed=st.integers(0, 2**31 - 1))
def test_aggregator_identical_tasks_are_parallel(name, g, scale, multiples,
                                                 seed):
  """Identical (multiples all 1) or positively collinear task gradients.

  No task conflicts with another, and every method returns a non-negative,
  nonzero combination of the rows, hence a positive multiple of g.
  """
  g = (g * np.float32(scale)).astype(np.float32)
  hypothesis.assume(np.any(g != 0))
  grads = (np.asarray(multiples, np.float32)[:, None] * g).astype(np.float32)
  direction, _ = aggregate(name, grads, seed=seed)
  assert_parallel(direction, g, name)


@pytest.mark.parametrize("name", AGG_NAMES)
@settings
@hypothesis.given(g=unit_rows((P,)), scale=st.sampled_from(SCALES),
                  seed=st.integers(0, 2**31 - 1))
def test_aggregator_opposite_tasks_cancel(name, g, scale, seed):
  g = (g * np.float32(scale)).astype(np.float32)
  hypothesis.assume(np.any(g != 0))
  grads = np.stack([g, -g])
  direction, _ = aggregate(name, grads, seed=seed)
  assert np.all(np.isfinite(direction))
  if name == "graddrop":
    # Random by design: each coordinate keeps one sign, i.e. +-g_j (XLA on
    # CPU flushes subnormal entries to zero).
    g_ftz = np.where(np.abs(g) < np.finfo(np.float32).tiny, 0.0, g)
    assert np.all((direction == g_ftz) | (direction == -g_ftz)), (direction, g)
  elif name == "nash_mtl":
    # g_1 . d = -g_2 . d: no positive bargaining solution exists; only a
    # finite direction, clipped to max_norm (1.0), is promised.
    assert np.linalg.norm(direction) <= 1.0 + 1e-5
  else:
    # Every other method resolves the full conflict to (near) zero.
    np.testing.assert_allclose(
        direction, 0.0,
        atol=1e-5 * float(np.linalg.norm(g.astype(np.float64))))


@pytest.mark.parametrize("name", AGG_NAMES)
@settings
@hypothesis.given(present_grads=unit_rows((2, P)),
                  scale=st.sampled_from(SCALES),
                  absent=st.integers(0, K - 1),
                  losses=st.lists(st.floats(0.125, 8.0, width=32), min_size=2,
                                  max_size=2),
                  seed=st.integers(0, 2**31 - 1))
def test_aggregator_absent_task_equals_dropping_it(name, present_grads, scale,
                                                   absent, losses, seed):
  """base.py: an absent task gives exactly the result of the sub-problem.

  With two present tasks the random visiting orders of pcgrad and gradvac
  do not matter (each task visits the single other one), and graddrop draws
  one uniform per coordinate whatever K, so the comparison is exact for the
  randomized methods too. Two steps exercise the state of the stateful
  methods (gradvac's phi_hat, nash_mtl's weights).
  """
  g2 = (present_grads * np.float32(scale)).astype(np.float32)
  keep = [k for k in range(K) if k != absent]
  g3 = np.zeros((K, P), np.float32)
  g3[keep] = g2
  counts3 = np.ones(K, np.float32)
  counts3[absent] = 0.0
  losses2 = np.asarray(losses, np.float32)
  losses3 = np.zeros(K, np.float32)
  losses3[keep] = losses2
  state2 = state3 = None
  init_state3 = jitted_aggregator(name)[0].init(K)
  rtol = 1e-5
  # The size that rounding errors of the direction are relative to: the
  # direction's norm, but at least the norm of its summands c_k g_k. For
  # opposite gradients the summands cancel to ~0 and only their float32
  # rounding is left, which the K' and K problems round differently. The
  # summands are ~|g| for every method (c_k = O(1)) except Nash-MTL, whose
  # combination is scale-free (c_k ~ 1 / |g_k|: summands of norm ~1).
  floor = 1.0 if name == "nash_mtl" else float(
      np.max(np.linalg.norm(g2.astype(np.float64), axis=1)))
  if name in ("aligned_mtl", "nash_mtl"):
    # Aligned-MTL scales by sqrt(lambda_min) and Nash-MTL solves
    # G alpha = 1 / alpha: the K x K and K' x K' solves round differently,
    # with a relative error ~eps * cond of the Gram matrix. The results agree
    # to that precision (capped at 1e-2 for nearly parallel gradients), not
    # bit for bit.
    m = g2.astype(np.float64) @ g2.T.astype(np.float64) / float(scale) ** 2
    ev = np.linalg.eigvalsh(m)
    cond = ev[-1] / max(ev[0], 1e-300)
    rtol = float(np.clip(1e-7 * cond, 1e-5, 1e-2))
  for step in range(2):
    d2, state2 = aggregate(name, g2, losses=losses2, seed=seed + step,
                           state=state2)
    d3, state3 = aggregate(name, g3, counts=counts3, losses=losses3,
                           seed=seed + step, state=state3)
    scale_d = max(float(np.linalg.norm(d2.astype(np.float64))), floor,
                  1e-37)
    np.testing.assert_allclose(d3, d2, rtol=rtol, atol=rtol * scale_d,
                               err_msg=f"{name} step {step}")
  # State: the present tasks' entries match the sub-problem's; the absent
  # task's entries (and its pairs) never moved from init.
  for leaf2, leaf3, leaf0 in zip(jax.tree.leaves(state2),
                                 jax.tree.leaves(state3),
                                 jax.tree.leaves(init_state3)):
    leaf2, leaf3, leaf0 = map(np.asarray, (leaf2, leaf3, leaf0))
    if leaf3.ndim == 0:
      np.testing.assert_array_equal(leaf3, leaf2)
      continue
    idx = np.ix_(*[keep] * leaf3.ndim)
    np.testing.assert_allclose(leaf3[idx], leaf2, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.take(leaf3, [absent], axis=0),
                                  np.take(leaf0, [absent], axis=0))
    if leaf3.ndim == 2:
      np.testing.assert_array_equal(leaf3[:, absent], leaf0[:, absent])


@settings
@hypothesis.given(g=unit_rows((2, P)), scale=st.sampled_from(SCALES),
                  zero_row=st.integers(0, 2))
def test_mgda_of_a_present_zero_row_is_zero(g, scale, zero_row):
  """A present zero row puts 0 in the convex hull: MGDA's direction is zero."""
  grads = np.insert((g * np.float32(scale)).astype(np.float32), zero_row,
                    0.0, axis=0)
  direction, _ = aggregate("mgda", grads)
  # Zero up to float32 rounding of the weights: when 0 is in the hull in
  # several ways (e.g. the other two rows are opposite), the min-norm point
  # may be reached by mixing them, which leaves ~1e-8 relative residue.
  bound = 1e-6 * float(np.max(np.linalg.norm(grads.astype(np.float64), axis=1)))
  assert float(np.linalg.norm(direction.astype(np.float64))) <= bound, (
      direction, grads)


def test_nash_mtl_absent_task_with_opposite_gradients():
  """Opposite gradients at scale 1e10: Nash-MTL's terms (of norm ~1, its
  combination is scale-free) cancel, and with or without an absent third
  task the direction is ~0 on that unit scale."""
  g2 = np.array([[0, 0, 0, 0.04882812, 0], [0, 0, 0, -1, 0]],
                np.float32) * np.float32(1e10)
  g3 = np.concatenate([np.zeros((1, P), np.float32), g2])
  d2, _ = aggregate("nash_mtl", g2)
  d3, _ = aggregate("nash_mtl", g3, counts=np.array([0, 1, 1], np.float32))
  assert np.linalg.norm(d2) < 1e-3 and np.linalg.norm(d3) < 1e-3
  np.testing.assert_allclose(d3, d2, atol=1e-3)
