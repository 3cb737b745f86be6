"""The factored (Gram) path of the train step against the full `[K, P]` path.

`jacobian="factored"`/`"auto"` never forms the per-task Jacobian: the Gram
matrix comes from dense layers' inputs and output gradients, the direction
from the same factors (mtl_jax/gradients/gram.py). Every test here compares it
with `jacobian="full"` (the aggregator's own `update` on the flattened
per-task gradients) or with the Gram matrix of explicitly formed gradients.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax
import pytest

from mtl_jax import aggregation
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.aggregation import base as agg_base
from mtl_jax.models import build
from mtl_jax.gradients import factored as factored_lib
from mtl_jax.gradients import gram as gram_lib
from mtl_jax.training import parallel
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

TASKS = tasks_lib.TaskSet([
    tasks_lib.classification_task("cls", 3),
    tasks_lib.regression_task("reg"),
    tasks_lib.multilabel_task("ml", 2),
])
B = 16
W = weighting.static([1.0, 0.5, 2.0])


def _mlp():
  return build.make_hard_sharing_model(
      TASKS, build.make_trunk("mlp", hidden_sizes=(8, 6)),
      head_hidden_sizes=(5,))


class _TwiceNormAux(nn.Module):
  """A shared Dense called twice, a LayerNorm, and a sown auxiliary loss."""

  @nn.compact
  def __call__(self, x, *, train=False):
    del train
    with_shared = nn.Dense(6, name="mix")  # one kernel, two calls
    h = nn.tanh(with_shared(x[:, :4])) + nn.tanh(with_shared(x[:, 4:]))
    h = nn.LayerNorm()(h)
    h = nn.relu(nn.Dense(5, use_bias=False)(h))
    self.sow(step_lib.AUX_LOSSES, "l2", 1e-2 * jnp.sum(jnp.square(h)))
    return h


def _twice_model():
  return build.make_hard_sharing_model(TASKS, _TwiceNormAux())


def _batch(seed=0, dim=4, absent=None):
  rng = np.random.default_rng(seed)
  masks = {"cls": (rng.random(B) < 0.6), "reg": (rng.random(B) < 0.5),
           "ml": np.ones(B, bool)}
  if absent:
    masks[absent] = np.zeros(B, bool)
  return {
      "inputs": rng.normal(size=(B, dim)).astype(np.float32),
      "labels": {"cls": rng.integers(0, 3, B).astype(np.int32),
                 "reg": rng.normal(size=B).astype(np.float32),
                 "ml": (rng.random((B, 2)) < 0.5).astype(np.float32)},
      "masks": {k: v.astype(np.float32) for k, v in masks.items()},
  }


def _state(model, tx, agg, dim=4):
  params = state_lib.init_params(model, np.zeros((1, dim), np.float32),
                                 jax.random.PRNGKey(0))
  return state_lib.create_train_state(params, tx, W, len(TASKS),
                                      jax.random.PRNGKey(3), agg)


def _run(model, agg, jacobian, batches, dim=4, **kw):
  tx = optax.sgd(0.1)
  state = _state(model, tx, agg, dim)
  step = jax.jit(step_lib.make_train_step(model.apply, TASKS, tx, W,
                                          aggregator=agg, jacobian=jacobian,
                                          **kw))
  metrics = []
  for batch in batches:
    state, m = step(state, batch)
    metrics.append(m)
  return state, metrics


def _trace(model, agg, jacobian, batch, dim=4, **kw):
  """Traces one step without compiling it (the route is chosen at trace
  time)."""
  tx = optax.sgd(0.1)
  step = step_lib.make_train_step(model.apply, TASKS, tx, W, aggregator=agg,
                                  jacobian=jacobian, **kw)
  jax.eval_shape(step, _state(model, tx, agg, dim), batch)


def _assert_close(a, b, rtol=2e-5, atol=2e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol,
      atol=atol), a, b)


GRAM_METHODS = sorted(n for n in aggregation.AGGREGATORS
                      if aggregation.get_aggregator(n).from_gram is not None)


def test_every_method_but_graddrop_is_gram_based():
  assert set(aggregation.AGGREGATORS) - set(GRAM_METHODS) == {"graddrop"}


# Every method's `update` is `from_gram`'s weights applied to the rows, for
# any power-of-two scale (tests/aggregation/from_gram_test.py); the step only
# has to get the Gram matrix, the scale and the combination right. These
# four cover the kinds of methods: scale-invariant (mgda), using the absolute
# scale (upgrad's regularisation, nash_mtl's norm clipping), stateful
# (nash_mtl) and random (pcgrad's task order).
# pcgrad's factored step also maps over chunks of 2 tasks (per-task VJP and
# Gram products).
@pytest.mark.parametrize("method,chunk_size", [
    ("mgda", None), ("nash_mtl", None), ("pcgrad", 2), ("upgrad", None)])
def test_factored_step_matches_full_step(method, chunk_size):
  """Three steps, one of them with task 'reg' absent: same params, states
  and metrics."""
  agg = aggregation.get_aggregator(method)
  batches = [_batch(0), _batch(1, absent="reg"), _batch(2)]
  got, got_m = _run(_mlp(), agg, "factored", batches, chunk_size=chunk_size,
                    encode_decode=True)
  want, want_m = _run(_mlp(), agg, "full", batches)
  _assert_close(got.params, want.params)
  _assert_close(got.aggregation_state, want.aggregation_state)
  _assert_close(got_m, want_m)


def test_two_stage_route_is_taken_when_the_model_declares_encode_decode(
    monkeypatch):
  """The speed-up must not silently fall back: with encode_decode=True the
  factored path differentiates in two stages; without it, in one stage; a
  model that sows auxiliary losses is found at trace time and goes the
  one-stage route (same results either way: the tests below)."""
  calls = []
  real = factored_lib.two_stage_factors

  def spy(*args, **kwargs):
    out = real(*args, **kwargs)
    calls.append(out is not None)
    return out

  monkeypatch.setattr(factored_lib, "two_stage_factors", spy)
  agg = aggregation.get_aggregator("mgda")
  _trace(_mlp(), agg, "auto", _batch(0), encode_decode=True)
  assert calls == [True]
  _trace(_mlp(), agg, "auto", _batch(0))
  assert calls == [True]  # not declared: not tried
  _trace(_twice_model(), agg, "factored", _batch(0, dim=8), dim=8,
         encode_decode=True)
  assert calls == [True, False]  # tried, aux losses found: one stage


@pytest.mark.parametrize("method", ["mgda", "graddrop"])
def test_two_stage_vjp_with_dropout_matches_full_step(method):
  """A hard-sharing model goes through the heads once and the trunk K times
  (encode and decode applied separately): the dropout masks, and so the
  step, are those of the one-call full path."""
  model = build.make_hard_sharing_model(
      TASKS, build.make_trunk("mlp", hidden_sizes=(8, 6), dropout_rate=0.5),
      head_hidden_sizes=(5,))
  agg = aggregation.get_aggregator(method)
  batches = [_batch(0), _batch(1, absent="ml")]
  got, got_m = _run(model, agg, "auto", batches, encode_decode=True)
  want, want_m = _run(model, agg, "full", batches)
  _assert_close(got.params, want.params)
  _assert_close(got_m, want_m)


@pytest.mark.parametrize("method", ["mgda", "graddrop"])
def test_shared_dense_called_twice_layernorm_and_aux_loss(method):
  """Rows of both calls go into one factor; the LayerNorm's leaves stay
  per-task rows; the auxiliary loss's gradient is added to the direction."""
  model = _twice_model()
  batches = [_batch(0, dim=8), _batch(1, dim=8)]
  agg = aggregation.get_aggregator(method)
  got, got_m = _run(model, agg, "factored", batches, dim=8,
                    encode_decode=True)
  want, want_m = _run(model, agg, "full", batches, dim=8)
  assert "aux/shared/l2" in got_m[0]
  _assert_close(got.params, want.params)
  _assert_close(got_m, want_m)


# GradDrop maps over chunks of one task here (the unchunked columnwise step
# is compared with the full path on one device below).
@pytest.mark.parametrize("method,chunk_size", [
    ("nash_mtl", None), ("graddrop", 1)])
def test_pmap_factored_step_matches_one_device_full_step(method, chunk_size):
  """Rows gathered over 4 devices give the global Gram matrix; GradDrop's
  rows are summed over devices before the sign dropout."""
  mesh = parallel.make_mesh(4)
  par = parallel.DataParallel(mesh, parallelism="pmap")
  model, agg, tx = _mlp(), aggregation.get_aggregator(method), optax.sgd(0.1)
  state = par.put_state(_state(model, tx, agg))
  step = par.compile_train_step(step_lib.make_train_step(
      model.apply, TASKS, tx, W, aggregator=agg, jacobian="factored",
      chunk_size=chunk_size, encode_decode=True, axis_name=par.axis_name),
      state)
  batches = [_batch(0), _batch(1, absent="cls")]
  for batch in batches:
    state, _ = step(state, par.put_batch(batch))
  want, _ = _run(model, agg, "full", batches)
  _assert_close(par.unreplicate(state).params, want.params)


def _factored(model, batch, num_tasks):
  """The FactoredJacobian (and the explicit rows) of `L_k = mean_b k out_bk`
  (params in the batch's dtype)."""
  params = jax.tree.map(lambda p: p.astype(batch.dtype),
                        model.init(jax.random.PRNGKey(0), batch)["params"])
  run = lambda: model.apply({"params": params}, batch)
  sites = gram_lib.find_dense_sites(run, params, num_tasks=num_tasks,
                                    every=True)
  eps = gram_lib.perturbations(sites)

  def losses(p, eps):
    inputs = {}
    with gram_lib.intercepting(sites, eps, inputs):
      out = model.apply({"params": p}, batch)  # [B, K]
    return jnp.mean(out * jnp.arange(1, num_tasks + 1), 0), inputs

  value, vjp_fn, inputs = jax.vjp(losses, params, eps, has_aux=True)
  param_cts, eps_cts = jax.vmap(vjp_fn)(jnp.eye(num_tasks))
  jac = gram_lib.factor(sites, inputs, eps_cts, param_cts["shared"])
  rows = jax.vmap(lambda t: ravel_pytree(t)[0])(param_cts["shared"])
  return jac, rows, sites


class _Net(nn.Module):
  scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(7, name="a")(x))
    return nn.Dense(3, name="b")(h * self.scale)


class _Wrapped(nn.Module):
  scale: float = 1.0

  def setup(self):
    self.shared = _Net(self.scale)

  def __call__(self, x):
    return self.shared(x)


@pytest.mark.parametrize("scale,chunk_size", [
    (1.0, None), (1.0, 1), (1.0, 2), (1e25, None), (1e25, 2), (1e-25, None)])
def test_gram_of_factors_equals_gram_of_explicit_rows(scale, chunk_size):
  """Huge and tiny gradients take the rescaled path: still the same matrix
  up to the power of two s (and finite); chunks give the same matrix."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
  jac, rows, sites = _factored(_Wrapped(scale), x, 3)
  assert [s.path for s in sites] == [("shared", "a"), ("shared", "b")]
  assert jax.tree.leaves(jac.leaves) == []  # every leaf is factored
  present = jnp.array([True, True, True])
  weights = jnp.array([1.0, 0.5, 2.0])
  got, s = gram_lib.scaled_gram(jac, weights, present, chunk_size=chunk_size)
  want, s_want = agg_base.scaled_gram(rows * weights[:, None])
  assert np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_allclose(got * (s / s_want) ** 2, want, rtol=1e-4,
                             atol=1e-6 * float(jnp.max(want)))
  # An absent task's row and column are exactly zero.
  got_absent, _ = gram_lib.scaled_gram(jac, weights,
                                       jnp.array([True, False, True]))
  assert np.all(np.asarray(got_absent)[1] == 0)
  assert np.all(np.asarray(got_absent)[:, 1] == 0)


def test_factored_gram_is_float64_under_x64():
  """float64 params give the Gram matrix in float64, to float64 accuracy."""
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float64)
    jac, rows, _ = _factored(_Wrapped(), x, 3)
    weights = jnp.array([1.0, 0.5, 2.0], jnp.float64)
    got, s = gram_lib.scaled_gram(jac, weights, jnp.array([True] * 3))
    want, s_want = agg_base.scaled_gram(rows * weights[:, None])
    assert got.dtype == jnp.float64 and want.dtype == jnp.float64
    np.testing.assert_allclose(got * (s / s_want) ** 2, want, rtol=1e-12)


# (K, out, chunk): blocks (32 columns or a multiple) that divide `out`, that
# do not (the last block overlaps its neighbour, whose columns it zeroes),
# one task per chunk, one block for all columns, and chunks of K or more (no
# blocks).
@pytest.mark.parametrize("k,out,chunk_size", [
    (4, 64, 2), (7, 70, 3), (9, 40, 2), (5, 100, 1), (5, 7, 1), (3, 5, 3),
    (3, 5, 8)])
def test_kernel_gram_in_column_blocks_equals_gram_of_rows(k, out, chunk_size):
  rng = np.random.default_rng(k * out)
  a = rng.normal(size=(6, 5)).astype(np.float32)  # [N, in]
  d = rng.normal(size=(k, 6, out)).astype(np.float32)  # [K, N, out]
  rows = np.einsum("ni,kno->kio", a.astype(np.float64),
                   d.astype(np.float64)).reshape(k, -1)  # A^T D_k, flattened
  got = gram_lib._kernel_gram(jnp.asarray(a), jnp.asarray(d), chunk_size)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, rows @ rows.T, rtol=1e-5,
                             atol=1e-5 * np.abs(rows @ rows.T).max())


def test_combination_of_factors_equals_combination_of_rows():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4)), jnp.float32)
  jac, rows, _ = _factored(_Wrapped(), x, 3)
  coeffs = jnp.array([0.3, -1.0, 2.0])
  got = ravel_pytree(gram_lib.combine(jac, coeffs))[0]
  np.testing.assert_allclose(got, coeffs @ rows, rtol=1e-5, atol=1e-6)


def test_cost_model_picks_the_cheaper_way():
  """N^2 in + K N^2 out against K N in out, per dense layer."""
  def sites(n, in_dim, out_dim, k, every=False):
    x = jnp.zeros((n, in_dim))

    class One(nn.Module):
      def setup(self):
        self.shared = nn.Dense(out_dim)

      def __call__(self, x):
        return self.shared(x)

    one = One()
    params = one.init(jax.random.PRNGKey(0), x)["params"]
    return gram_lib.find_dense_sites(lambda: one.apply({"params": params}, x),
                                     params, num_tasks=k, every=every)

  # 256 rows, 784 -> 512, K=4: 256^2 (784 + 4 * 512) = 1.86e8 < 4.1e8.
  assert len(sites(256, 784, 512, 4)) == 1
  # 256 rows, 2 -> 2: 256^2 (2 + 8) = 6.6e5 > 4 * 256 * 4 = 4096.
  assert sites(256, 2, 2, 4) == ()
  assert len(sites(256, 2, 2, 4, every=True)) == 1
  # More rows than MAX_ROWS: never factored.
  assert sites(gram_lib.MAX_ROWS + 1, 2, 2, 1, every=True) == ()


def test_unknown_jacobian_mode_is_rejected():
  with pytest.raises(ValueError, match="unknown jacobian mode 'fast'; valid: "
                     "auto, factored, full"):
    step_lib.make_train_step(_mlp().apply, TASKS, optax.sgd(0.1), W,
                             aggregator=aggregation.get_aggregator("mgda"),
                             jacobian="fast")


@pytest.mark.parametrize("chunk_size", [0, -2])
def test_chunk_size_below_one_is_rejected(chunk_size):
  with pytest.raises(ValueError, match=f"chunk_size must be >= 1 .*got "
                     f"{chunk_size}"):
    step_lib.make_train_step(_mlp().apply, TASKS, optax.sgd(0.1), W,
                             aggregator=aggregation.get_aggregator("mgda"),
                             chunk_size=chunk_size)


# With chunk_size, each kernel's rows are formed in blocks of input rows
# (chunk 1 of K=3 tasks: blocks of 2 of the first kernel's 4 input rows,
# blocks of 3 of the second's 8, the last one overlapping).
@pytest.mark.parametrize("leak,chunk_size", [
    (1.0, None), (0.0, 1), ((0.3, 0.0, 1.0), 2)])
def test_factored_graddrop_step_matches_full_step(leak, chunk_size):
  """GradDrop runs leaf by leaf (no [K, P] matrix) on rows formed from the
  factors, in the leaves' own layout: the same draws for the same
  coordinate as the full path, so the same params. With leak 1 it passes
  every gradient: the plain sum of the rows."""
  agg = aggregation.get_aggregator("graddrop", leak=leak)
  batches = [_batch(0), _batch(1, absent="reg"), _batch(2)]
  got, got_m = _run(_mlp(), agg, "auto", batches, chunk_size=chunk_size,
                    encode_decode=True)
  want, want_m = _run(_mlp(), agg, "full", batches)
  _assert_close(got.params, want.params)
  _assert_close(got_m, want_m)
  if leak == 1.0:
    total, _ = _run(_mlp(), aggregation.get_aggregator("sum"), "full", batches)
    _assert_close(got.params, total.params)


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_columnwise_blocks_see_the_explicit_rows(chunk_size):
  """`columnwise_blocks` hands `direction` the rows `w_k A^T D_k` of each
  block of coordinates: a direction that returns row k rebuilds task k's
  weighted gradient, in blocks or whole."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 4)), jnp.float32)
  jac, rows, _ = _factored(_Wrapped(), x, 3)
  weights = jnp.array([1.0, 0.5, -2.0])
  for k in range(3):
    got = gram_lib.columnwise_blocks(jac, weights,
                                     lambda i, r, offset, k=k: r[k],
                                     chunk_size)
    np.testing.assert_allclose(ravel_pytree(got)[0], rows[k] * weights[k],
                               rtol=1e-5, atol=1e-6)


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return nn.tanh(nn.Dense(8)(carry)), None


class _RematTrunk(nn.Module):
  """Dense layers under nn.remat and inside an nn.scan'd block."""

  @nn.compact
  def __call__(self, x, *, train=False):
    del train
    dense = nn.remat(nn.Dense)
    h = nn.relu(dense(8)(x))
    h, _ = nn.scan(_ScanBlock, variable_broadcast="params",
                   split_rngs={"params": False}, length=2)()(h, None)
    return nn.relu(dense(6, name="features")(h))


def test_dense_inside_a_lifted_transform_is_left_unfactored():
  """Lifted transforms run their layers in an inner trace: no site, and the
  same step as the full path."""
  model = build.make_hard_sharing_model(TASKS, _RematTrunk())
  x = jnp.zeros((B, 4))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  assert gram_lib.find_dense_sites(
      lambda: model.apply({"params": params}, x), params, num_tasks=3,
      every=True) == ()
  agg = aggregation.get_aggregator("mgda")
  got, _ = _run(model, agg, "factored", [_batch(0)])
  want, _ = _run(model, agg, "full", [_batch(0)])
  _assert_close(got.params, want.params)
