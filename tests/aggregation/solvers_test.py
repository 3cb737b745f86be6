"""Tests of the Gram-matrix solvers against scipy, KKT and closed forms.

The random problems are solved in a padded `[KMAX, KMAX]` layout (tasks beyond
K absent) so that each solver compiles once; a few tests use native shapes.
"""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtl_jax.aggregation import solvers
from mtl_jax.aggregation.cagrad import cagrad_weights

KMAX = 10
MIN_NORM = jax.jit(solvers.min_norm_simplex)
DUAL_CONE = jax.jit(solvers.project_to_dual_cone)
NASH = jax.jit(solvers.nash_bargaining)
PROJECT = jax.jit(solvers.project_simplex)
SETTINGS = hypothesis.settings(max_examples=25, deadline=None)


def _random_grads(rng, k, p=None):
  """Well-conditioned `[k, p]` gradients with a shared component (so that the
  min-norm point and the projections have non-trivial supports)."""
  p = 2 * k + 4 if p is None else p
  g = rng.normal(size=(k, p)) * rng.uniform(0.5, 2.0, size=(k, 1))
  return g + rng.normal() * rng.normal(size=(1, p))


def _pad(m, v=None):
  """Pads `m [k, k]` (and `v [k]`) to KMAX with absent tasks."""
  k = m.shape[0]
  mp = np.zeros((KMAX, KMAX), np.float32)
  mp[:k, :k] = m
  present = np.arange(KMAX) < k
  if v is None:
    return jnp.asarray(mp), jnp.asarray(present)
  vp = np.zeros(KMAX, np.float32)
  vp[:k] = v
  return jnp.asarray(vp), jnp.asarray(mp), jnp.asarray(present)


def _min_norm(m):
  """min_norm_simplex on the padded layout, checking the padding is 0."""
  k = m.shape[0]
  alpha = np.asarray(MIN_NORM(*_pad(m)), np.float64)
  np.testing.assert_array_equal(alpha[k:], 0.0)
  return alpha[:k]


def _scipy_min_norm(m):
  k = m.shape[0]
  m = m / np.max(np.diag(m))  # SLSQP's tolerances are absolute
  res = optimize.minimize(
      lambda a: a @ m @ a, np.full(k, 1.0 / k), jac=lambda a: 2 * m @ a,
      method="SLSQP", bounds=[(0.0, 1.0)] * k,
      constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0,
                    "jac": lambda a: np.ones(k)}],
      options={"ftol": 1e-14, "maxiter": 1000})
  assert res.success, res.message
  return res.x


def _sort_projection(y):
  """The textbook sort-based simplex projection (Held et al. 1974)."""
  u = np.sort(y)[::-1]
  css = np.cumsum(u)
  j = np.arange(1, len(y) + 1)
  rho = np.max(j[u - (css - 1) / j > 0])
  return np.maximum(y - (css[rho - 1] - 1) / rho, 0.0)


@SETTINGS
@hypothesis.given(
    hnp.arrays(np.float64, st.integers(1, KMAX),
               elements=st.floats(-100, 100)),
    st.integers(0, 2**31 - 1))
def test_project_simplex_matches_sort_reference(y, seed):
  # Rounded values create ties, the delicate case of the pairwise rule.
  y = np.round(y, 1) if seed % 2 else y
  got = np.asarray(PROJECT(jnp.asarray(y, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, _sort_projection(y), atol=1e-6 * max(
      1.0, np.abs(y).max()))
  # Absent coordinates are 0 and the others are projected on their own.
  present = np.random.default_rng(seed).random(len(y)) < 0.6
  got = np.asarray(PROJECT(jnp.asarray(y, jnp.float32), present), np.float64)
  np.testing.assert_array_equal(got[~present], 0.0)
  if present.any():
    np.testing.assert_allclose(got[present], _sort_projection(y[present]),
                               atol=1e-6 * max(1.0, np.abs(y).max()))


@pytest.mark.parametrize("k", range(3, KMAX + 1))
def test_min_norm_matches_scipy_and_kkt(k):
  rng = np.random.default_rng(k)
  worst = 0.0
  for _ in range(4):
    g = _random_grads(rng, k)
    m = g @ g.T
    alpha = _min_norm(m)
    ref = _scipy_min_norm(m)
    scale = np.max(np.diag(m))
    worst = max(worst, np.abs(alpha - ref).max())
    assert abs(alpha @ m @ alpha - ref @ m @ ref) < 1e-6 * scale
    # KKT: alpha in the simplex, (M alpha)_i >= alpha^T M alpha with
    # equality on the support (relative to the problem's scale).
    assert np.all(alpha >= 0)
    assert abs(alpha.sum() - 1) < 1e-6
    grad = m @ alpha / scale
    lam = alpha @ m @ alpha / scale
    assert np.all(grad >= lam - 1e-6)
    support = alpha > 1e-4
    np.testing.assert_allclose(grad[support], lam, atol=1e-6)
  assert worst < 1e-6


def test_min_norm_closed_forms_and_degenerate_inputs():
  # Two tasks: alpha_1 = clip((g2 - g1).g2 / |g1 - g2|^2, 0, 1).
  for g1, g2 in [([1.0, 0.0], [0.0, 1.0]), ([3.0, 1.0], [-1.0, 0.5]),
                 ([1.0, 1.0], [2.0, 2.0]), ([1.0, 0.0], [-1.0, 0.0])]:
    g = np.array([g1, g2])
    a1 = np.clip((g[1] - g[0]) @ g[1] / np.sum((g[0] - g[1])**2), 0, 1)
    np.testing.assert_allclose(_min_norm(g @ g.T), [a1, 1 - a1], atol=1e-6)
  # The same in a native [2, 2] layout (no padding).
  alpha = MIN_NORM(jnp.asarray(g @ g.T, jnp.float32))
  np.testing.assert_allclose(alpha, [0.5, 0.5], atol=1e-6)
  # One task; all-zero M (every point optimal: uniform); no task present.
  np.testing.assert_array_equal(_min_norm(np.array([[4.0]])), [1.0])
  np.testing.assert_allclose(_min_norm(np.zeros((3, 3))), [1 / 3] * 3)
  np.testing.assert_array_equal(
      MIN_NORM(jnp.eye(KMAX), jnp.zeros(KMAX, bool)), np.zeros(KMAX))


def test_min_norm_scale_invariant_and_masked():
  rng = np.random.default_rng(0)
  g = _random_grads(rng, 6)
  m = g @ g.T
  alpha = _min_norm(m)
  for scale in (1e-16, 1e-8, 1e8, 1e16):
    np.testing.assert_allclose(_min_norm(m * scale), alpha, atol=1e-6)
  # An absent task's (non-zero) row is ignored: the result is that of the
  # sub-matrix of present tasks.
  present = np.array([1, 1, 0, 1, 1, 1], bool)
  mp, _ = _pad(m)
  mask = np.zeros(KMAX, bool)
  mask[:6] = present
  got = np.asarray(MIN_NORM(mp, jnp.asarray(mask)))
  np.testing.assert_array_equal(got[~mask], 0.0)
  np.testing.assert_allclose(got[mask], _min_norm(m[present][:, present]),
                             atol=1e-6)


def _nnls_projection(g, v):
  """w = argmin_{w >= v} |G^T w|^2 via scipy's NNLS on w = v + u, u >= 0."""
  u, _ = optimize.nnls(g.T, -g.T @ v, maxiter=100 * len(v))
  return v + u


def test_dual_cone_matches_nnls_and_kkt():
  rng = np.random.default_rng(1)
  worst = 0.0
  for trial in range(24):
    k = 3 + trial % 8
    g = _random_grads(rng, k)
    m = g @ g.T
    v = rng.normal(size=k) if trial % 2 else np.eye(k)[trial % k]
    w = np.asarray(DUAL_CONE(*_pad(m, v)), np.float64)
    np.testing.assert_array_equal(w[k:], 0.0)
    w = w[:k]
    ref = _nnls_projection(g, v)
    worst = max(worst, np.abs(w - ref).max())
    # The projection itself, relative to the projected vector's length.
    assert (np.linalg.norm(g.T @ (w - ref))
            < 1e-6 * np.linalg.norm(g.T @ v))
    # KKT: w >= v, M w >= 0 (the projection is in the dual cone), and
    # (M w)_i = 0 where w_i > v_i.
    scale = np.max(np.diag(m)) * np.abs(v).max()
    assert np.all(w >= v - 1e-7 * np.abs(v).max())  # v rounded to float32
    mw = m @ w / scale
    assert np.all(mw >= -1e-6)
    free = w > v + 1e-4
    np.testing.assert_allclose(mw[free], 0.0, atol=1e-6)
  assert worst < 1e-6


def test_dual_cone_closed_form_scaling_and_degenerate():
  # TorchJD's DualProj example: the mean [1, 1, 1] of [-4, 1, 1] and [6, 1, 1]
  # conflicts with the first row only; its projection onto the half-space
  # g1.x >= 0 is [1, 1, 1] + 2/18 [-4, 1, 1] (TorchJD's ridge gives 0.5563).
  g = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
  m = jnp.asarray(g @ g.T, jnp.float32)
  w = np.asarray(DUAL_CONE(jnp.array([0.5, 0.5]), m))
  np.testing.assert_allclose(w @ g, [5 / 9, 10 / 9, 10 / 9], atol=1e-6)
  # Homogeneous in v, invariant to the scale of M.
  for c in (1e-8, 3.0, 1e8):
    np.testing.assert_allclose(DUAL_CONE(jnp.array([0.5, 0.5]) * c, m),
                               w * c, rtol=1e-6)
    np.testing.assert_allclose(DUAL_CONE(jnp.array([0.5, 0.5]), m * c), w,
                               rtol=1e-6)
  # g2 conflicts with g1 too: w = e2 + (22 / 18) e1; 1.5 g1 + g2 does not.
  np.testing.assert_allclose(DUAL_CONE(jnp.array([0.0, 1.0]), m),
                             [22 / 18, 1.0], rtol=1e-6)
  np.testing.assert_allclose(DUAL_CONE(jnp.array([1.5, 1.0]), m), [1.5, 1.0],
                             rtol=1e-6)
  # M = 0: every w >= v is optimal; v itself is returned.
  np.testing.assert_array_equal(
      DUAL_CONE(jnp.array([0.5, 0.5]), jnp.zeros((2, 2))), [0.5, 0.5])


@pytest.mark.parametrize("k", [2, 5, KMAX])
def test_nash_solves_bargaining_equation(k):
  rng = np.random.default_rng(10 + k)
  for _ in range(5):
    g = _random_grads(rng, k, p=3 * k + 4)
    m = g @ g.T
    mp, present = _pad(m)
    alpha = np.asarray(NASH(mp, present), np.float64)
    np.testing.assert_array_equal(alpha[k:], 0.0)
    alpha = alpha[:k]
    assert np.all(alpha > 0)
    np.testing.assert_allclose(alpha * (m @ alpha), 1.0, atol=1e-6)
    # The solution minimises the strictly convex 0.5 a^T M a - sum log a:
    # scipy (float64, from our answer) cannot improve it.
    phi = lambda a, m=m: 0.5 * a @ m @ a - np.sum(np.log(a))
    res = optimize.minimize(phi, alpha, jac=lambda a, m=m: m @ a - 1 / a,
                            method="L-BFGS-B", bounds=[(1e-12, None)] * k,
                            options={"ftol": 1e-15, "gtol": 1e-12})
    assert phi(alpha) - res.fun < 1e-9
    np.testing.assert_allclose(alpha, res.x, rtol=1e-5)


def _nash(m, present=None):
  """nash_bargaining on the padded layout (optionally with a [k] mask)."""
  k = m.shape[0]
  mp, mask = _pad(m)
  if present is not None:
    mask = jnp.asarray(np.arange(KMAX) < k) & jnp.asarray(
        np.pad(present, (0, KMAX - k)))
  alpha = np.asarray(NASH(mp, mask), np.float64)
  np.testing.assert_array_equal(alpha[~np.asarray(mask)], 0.0)
  return alpha[:k]


def test_nash_closed_forms_scaling_and_singular_inputs():
  # Orthogonal gradients: alpha_k = 1 / |g_k|; also in a native layout.
  np.testing.assert_allclose(_nash(np.diag([4.0, 1.0, 0.25])),
                             [0.5, 1.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(NASH(jnp.diag(jnp.array([4.0, 0.25]))),
                             [0.5, 2.0], rtol=1e-6)
  # alpha(c M) = alpha(M) / sqrt(c).
  rng = np.random.default_rng(3)
  g = _random_grads(rng, 4)
  m = g @ g.T
  alpha = _nash(m)
  for c in (1e-16, 1e-8, 1e8, 1e16):
    np.testing.assert_allclose(_nash(m * c), alpha / np.sqrt(c), rtol=1e-5)
  # Masked task = sub-matrix.
  present = np.array([True, False, True, True])
  got = _nash(m, present)
  assert got[1] == 0.0
  np.testing.assert_allclose(got[present], _nash(m[present][:, present]),
                             rtol=1e-6)
  # Singular M has no solution: the ridge keeps the weights finite and
  # positive (a zero gradient, opposite gradients, K > P).
  for g in (np.array([[1.0, 0.0], [0.0, 0.0]]),
            np.array([[1.0, 2.0], [-1.0, -2.0]]),
            rng.normal(size=(6, 3))):
    alpha = _nash(g @ g.T)
    assert np.all(np.isfinite(alpha)) and np.all(alpha > 0)
  # Opposite gradients: equal weights, so G^T alpha = 0 exactly.
  alpha = _nash(np.array([[5.0, -5.0], [-5.0, 5.0]]))
  assert alpha[0] == alpha[1]
  np.testing.assert_array_equal(_nash(np.zeros((3, 3))), [0.0, 0.0, 0.0])


# --------------------------------------------------------------------------
# Gradient norms spread over orders of magnitude, and float64.
# --------------------------------------------------------------------------


def _spread_rows(seed, norms, p=4, shared=False):
  """Random rows rescaled to the given norms (float64)."""
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(len(norms), p))
  if shared:
    g = g + rng.normal() * rng.normal(size=(1, p))
  g = g / np.linalg.norm(g, axis=1, keepdims=True)
  return g * np.asarray(norms, np.float64)[:, None]


def test_min_norm_keeps_the_small_weight_of_a_large_gradient():
  # Norms 1e-2, 1, 1e2: the exact min-norm point gives the largest gradient
  # a weight of ~8e-5, far below any absolute tolerance on the weights, yet
  # without it d conflicts with that task (cosine -0.61 when it is dropped).
  g = _spread_rows(76, [1e-2, 1.0, 1e2])
  m = jnp.asarray(g @ g.T, jnp.float32)
  alpha = np.asarray(MIN_NORM(m), np.float64)
  np.testing.assert_allclose(alpha, [0.9999162, 0.0, 8.378795e-05],
                             rtol=1e-5, atol=1e-12)
  d = alpha @ g
  cosines = g @ d / np.linalg.norm(g, axis=1) / np.linalg.norm(d)
  assert np.all(cosines > 0), cosines
  # MGDA's guarantee g_k . d >= |d|^2, up to float32 rounding of g_k . d.
  assert np.all(g @ d >= d @ d - 1e-6 * np.linalg.norm(g, axis=1)
                * np.linalg.norm(d))
  _, info = jax.jit(lambda m: solvers.min_norm_simplex(
      m, return_info=True))(m)
  assert bool(info.converged) and float(info.residual) < 1e-5


def test_cagrad_weights_stay_on_the_simplex_at_extreme_spreads():
  # Norms 1, 1e6, 1e12 with a shared component: a first-order solver that
  # returns its momentum point when no step passes its curvature test gives
  # weights off the simplex here, e.g. [0.503, 0.503, -0.006].
  weights = jax.jit(cagrad_weights)
  for seed in range(1, 6):
    g = _spread_rows(seed, [1.0, 1e6, 1e12], shared=True)
    w = np.asarray(weights(jnp.asarray(g @ g.T, jnp.float32)), np.float64)
    assert np.all(w >= 0), (seed, w)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
  # Seed 2: the exact dual solution (float64, cosine basis) puts 3.04e-7 on
  # the middle task; the direction follows it only if the solver resolves it.
  g = _spread_rows(2, [1.0, 1e6, 1e12], shared=True)
  w = np.asarray(weights(jnp.asarray(g @ g.T, jnp.float32)), np.float64)
  np.testing.assert_allclose(w, [1 - 3.0438e-7, 3.0438e-7, 0.0], rtol=1e-4,
                             atol=1e-14)


def test_dtype_follows_the_gram_matrix_under_x64():
  # With jax_enable_x64 every solver runs in float64 for float64 input (every
  # loop carry keeps the input's dtype, or the loops fail to trace) and in
  # float32 for float32 input, with the same answer up to float32 rounding.
  g = _spread_rows(3, [0.5, 2.0, 30.0], shared=True)
  names = ("min_norm", "cagrad", "dual_cone", "nash")

  @jax.jit
  def solve_all(m):  # one compilation per dtype for the four solvers
    v = jnp.full((3,), 1.0 / 3, m.dtype)
    return (solvers.min_norm_simplex(m), cagrad_weights(m),
            solvers.project_to_dual_cone(v, m), solvers.nash_bargaining(m))

  expected = solve_all(jnp.asarray(g @ g.T, jnp.float32))
  with jax.enable_x64(True):
    for dtype in (jnp.float32, jnp.float64):
      for name, got, want in zip(names, solve_all(jnp.asarray(g @ g.T, dtype)),
                                 expected):
        assert got.dtype == dtype, (name, got.dtype)
        np.testing.assert_allclose(np.asarray(got, np.float64),
                                   np.asarray(want, np.float64), rtol=2e-5,
                                   atol=1e-7, err_msg=name)
