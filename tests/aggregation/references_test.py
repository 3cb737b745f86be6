"""Tests of the float64 reference solutions in `references.py`.

Each reference is checked on closed forms, against scipy (SLSQP / lstsq /
eigh) where the problem is well conditioned and against 80-digit decimal
solutions where it is not (IMTL-G, ConFIG, Aligned-MTL at spreads to 1e12), on
optimality certificates recomputed here from its weights and direction
(independently of the reference's own `residual`), and for invariance to the
order of the tasks and to the overall scale. The random Jacobians have row
norms spread over 1 .. 1e12, K in 2..6, some K > P and some rank-deficient.
"""

import decimal

import numpy as np
import pytest
from scipy import optimize

import references as R

TOL = R.TOL
SPREADS = (1.0, 1e4, 1e8, 1e12)


def _cases():
  """(seed, k, p, spread, rank, scale): random spread Jacobians."""
  cases = []
  rng = np.random.default_rng(1234)
  for i in range(24):
    spread = SPREADS[i % 4]
    k = int(rng.integers(2, 7))
    if i % 3 == 0:  # K > P
      p = int(rng.integers(1, k))
    else:
      p = int(rng.integers(k, 13))
    rank = None
    if i % 4 == 1 and min(k, p) > 1:
      rank = int(rng.integers(1, min(k, p)))
    scale = float(10.0 ** rng.uniform(-20, 20))
    cases.append((i, k, p, spread, rank, scale))
  return cases


CASES = _cases()
IDS = [f"s{c[0]}-k{c[1]}-p{c[2]}-spread{c[3]:.0e}-rank{c[4]}" for c in CASES]


def _jacobian(case):
  seed, k, p, spread, rank, scale = case
  return R.random_jacobian(np.random.default_rng(seed), k, p, spread,
                           rank=rank, scale=scale)


def _norms(g):
  return np.array([R._norm(row) for row in g])


def _check_direction(sol, g):
  """The direction is `weights @ g` up to the rounding of its terms (MGDA
  declares d = 0 below 1e3 K eps of them)."""
  terms = float(np.abs(sol.weights) @ _norms(g))
  err = R._norm(sol.weights @ g - sol.direction)
  assert err <= 1e-11 * terms, (err, terms)


def _orthonormal_rows(rng, k, p):
  return np.linalg.qr(rng.normal(size=(p, k)))[0].T  # [k, p]


_CTX = decimal.Context(prec=80)


def _decimal_basis(g):
  """Norms and unit rows of g in 80-digit decimals (g's values exactly)."""
  with decimal.localcontext(_CTX):
    rows = [[decimal.Decimal(float(x)) for x in row] for row in g]
    norms = [sum(x * x for x in row).sqrt() for row in rows]
    units = [[x / n for x in row] for row, n in zip(rows, norms)]
  return norms, units


def _decimal_solve(a, b):
  """Gaussian elimination with partial pivoting in 80-digit decimals."""
  with decimal.localcontext(_CTX):
    n = len(b)
    m = [list(row) + [rhs] for row, rhs in zip(a, b)]
    for col in range(n):
      piv = max(range(col, n), key=lambda r: abs(m[r][col]))
      m[col], m[piv] = m[piv], m[col]
      for r in range(col + 1, n):
        f = m[r][col] / m[col][col]
        m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    x = [decimal.Decimal(0)] * n
    for r in reversed(range(n)):
      x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
  return x


def _dot(a, b):
  with decimal.localcontext(_CTX):
    return sum(x * y for x, y in zip(a, b))


# --------------------------------------------------------------------------
# Helpers.


def test_cosine():
  assert R.cosine([0.0, 0.0], [0.0, 0.0]) == 1.0
  assert R.cosine([0.0, 0.0], [1.0, 0.0]) == 0.0
  assert R.cosine([1e200, 1e200], [1e200, 0.0]) == pytest.approx(2 ** -0.5)
  assert R.cosine([1e-200, 0.0], [-3e-200, 0.0]) == -1.0
  assert R.cosine([1.0, 2.0], [2.0, 4.0]) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("spread", SPREADS)
def test_random_jacobian(spread):
  rng = np.random.default_rng(0)
  g = R.random_jacobian(rng, 5, 7, spread, scale=1e-3)
  assert g.shape == (5, 7) and g.dtype == np.float64
  n = _norms(g)
  np.testing.assert_allclose(n.min(), 1e-3, rtol=1e-12)
  np.testing.assert_allclose(n.max() / n.min(), spread, rtol=1e-12)
  units = g / n[:, None]
  assert np.linalg.matrix_rank(units) == 5
  g = R.random_jacobian(rng, 6, 9, spread, rank=2)
  assert np.linalg.matrix_rank(g / _norms(g)[:, None]) == 2
  g = R.random_jacobian(rng, 6, 3, spread)  # K > P: rank P
  assert np.linalg.matrix_rank(g / _norms(g)[:, None]) == 3
  # Deterministic, and with some conflicting pairs over a few draws.
  a = R.random_jacobian(np.random.default_rng(7), 4, 6, spread)
  b = R.random_jacobian(np.random.default_rng(7), 4, 6, spread)
  np.testing.assert_array_equal(a, b)
  conflicts = 0
  for seed in range(10):
    g = R.random_jacobian(np.random.default_rng(seed), 4, 6, spread)
    c = g @ g.T
    conflicts += np.any(c[np.triu_indices(4, 1)] < 0)
  assert conflicts >= 3
  with pytest.raises(ValueError):
    R.random_jacobian(rng, 3, 4, spread, rank=4)


# --------------------------------------------------------------------------
# MGDA.


def _mgda_two(g1, g2):
  """Closed form of the two-task min-norm point, each weight computed without
  cancellation."""
  diff = g1 - g2
  den = diff @ diff
  return np.array([np.clip(-diff @ g2 / den, 0, 1),
                   np.clip(diff @ g1 / den, 0, 1)])


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("cos", [-0.9, -0.3, 0.0, 0.5])
def test_mgda_two_tasks(spread, cos):
  u1 = np.array([1.0, 0.0, 0.0])
  u2 = np.array([cos, np.sqrt(1 - cos * cos), 0.0])
  g = np.stack([u1 / np.sqrt(spread), u2 * np.sqrt(spread)])
  sol = R.mgda(g)
  expected = _mgda_two(g[0], g[1])
  np.testing.assert_allclose(sol.weights, expected, rtol=1e-10, atol=1e-300)
  assert R.cosine(sol.direction, expected @ g) >= 1 - 1e-14
  assert sol.well_posed and sol.residual <= TOL
  _check_direction(sol, g)


def _check_mgda_kkt(sol, g):
  w, d = sol.weights, sol.direction
  assert np.all(w >= 0) and abs(w.sum() - 1) <= 1e-14
  n = _norms(g)
  dn = R._norm(d)
  # g_i . d >= |d|^2, with equality on the support, relative to n_i |d|.
  slack = (g @ d - dn * dn) / (n * dn)
  assert np.all(slack >= -TOL), slack
  assert np.all(np.abs(slack[w > 0]) <= TOL), slack


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mgda_kkt(case):
  g = _jacobian(case)
  sol = R.mgda(g)
  _check_direction(sol, g)
  assert np.all(sol.weights >= 0) and abs(sol.weights.sum() - 1) <= 1e-14
  if sol.well_posed:
    assert sol.residual <= TOL
    _check_mgda_kkt(sol, g)
  elif np.all(sol.direction == 0):  # 0 in the hull: a combination at 0.
    err = R._norm(sol.weights @ g)
    assert err <= 1e-10 * float(sol.weights @ _norms(g))
  else:  # 0 nearly in the hull
    assert sol.info["cancellation"] <= R.CANCELLATION


def test_mgda_degenerate():
  g = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
  sol = R.mgda(g)
  np.testing.assert_array_equal(sol.weights, [0, 1, 0])
  assert not sol.well_posed and np.all(sol.direction == 0)
  g = np.array([[1.0, 2.0], [-1e6, -2e6]])  # 0 in the hull
  sol = R.mgda(g)
  assert not sol.well_posed and np.all(sol.direction == 0)
  np.testing.assert_allclose(sol.weights, [1e6, 1.0] / np.float64(1e6 + 1),
                             rtol=1e-12)


def test_mgda_against_slsqp():
  rng = np.random.default_rng(5)
  for _ in range(5):
    g = R.random_jacobian(rng, 4, 6, 1.0)
    m = g @ g.T
    res = optimize.minimize(
        lambda a: a @ m @ a, np.full(4, 0.25), jac=lambda a: 2 * m @ a,
        method="SLSQP", bounds=[(0, 1)] * 4,
        constraints=[dict(type="eq", fun=lambda a: a.sum() - 1)],
        options=dict(ftol=1e-15, maxiter=500))
    sol = R.mgda(g)
    assert sol.direction @ sol.direction <= res.fun * (1 + 1e-12)
    assert R.cosine(sol.direction, res.x @ g) >= 1 - 1e-8


# --------------------------------------------------------------------------
# UPGrad / DualProj.


def test_dualproj_torchjd_example():
  g = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
  sol = R.dualproj(g)
  np.testing.assert_allclose(sol.direction, [5 / 9, 10 / 9, 10 / 9],
                             rtol=1e-14)
  _check_direction(sol, g)
  np.testing.assert_allclose(sol.weights @ g, [5 / 9, 10 / 9, 10 / 9],
                             rtol=1e-14)


@pytest.mark.parametrize("spread", SPREADS)
def test_projections_of_non_conflicting_rows(spread):
  # Pairwise non-conflicting rows: each is in the dual cone, and so is the mean.
  rng = np.random.default_rng(3)
  g = np.abs(rng.normal(size=(4, 6))) * np.logspace(0, np.log10(spread), 4)[
      :, None]
  for fn in (R.upgrad, R.dualproj):
    sol = fn(g)
    np.testing.assert_allclose(sol.weights, 0.25, rtol=1e-14)
    assert R.cosine(sol.direction, g.mean(0)) >= 1 - 1e-15


def _check_projection_kkt(sol, g, v):
  w, d = sol.weights, sol.direction
  n = _norms(g)
  q = R._norm(v @ g)
  assert np.all(w >= v - 1e-15 * np.abs(v))
  proj = g @ d / (n * q)  # u_i . d / |q|
  assert np.all(proj >= -TOL), proj
  active = w > v * (1 + 1e-12)
  assert np.all(np.abs(proj[active]) <= TOL), proj


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dual_cone_kkt(case):
  g = _jacobian(case)
  k = g.shape[0]
  rng = np.random.default_rng(case[0])
  for v in (np.full(k, 1 / k), rng.uniform(0, 1, k), np.eye(k)[0]):
    sol = R.dual_cone_projection(g, v)
    _check_direction(sol, g)
    assert np.all(sol.weights >= v)
    if sol.well_posed:
      assert sol.residual <= TOL
      _check_projection_kkt(sol, g, v)
  sol = R.upgrad(g)
  _check_direction(sol, g)
  assert np.all(sol.weights >= 0)
  if sol.well_posed:
    assert sol.residual <= TOL
  parts = sol.info["parts"]
  np.testing.assert_allclose(sol.weights, np.sum([p.weights for p in parts],
                                                 axis=0), rtol=1e-15)
  # Non-conflict: g_k . d >= 0 for UPGrad and DualProj (relative).
  # Where d is rounding noise (0 in the hull: d = 0 exactly) it is skipped.
  for s in (sol, R.dualproj(g)):
    if s.well_posed:
      dn = R._norm(s.direction)
      assert np.all(g @ s.direction >= -TOL * _norms(g) * dn)


def test_dual_cone_against_slsqp():
  rng = np.random.default_rng(6)
  for _ in range(5):
    g = R.random_jacobian(rng, 4, 6, 1.0, conflict=1.0)
    m = g @ g.T
    v = np.full(4, 0.25)
    res = optimize.minimize(
        lambda a: a @ m @ a, v, jac=lambda a: 2 * m @ a, method="SLSQP",
        bounds=[(x, None) for x in v], options=dict(ftol=1e-15, maxiter=500))
    sol = R.dualproj(g)
    assert sol.direction @ sol.direction <= res.fun * (1 + 1e-12)
    assert R.cosine(sol.direction, res.x @ g) >= 1 - 1e-8


# --------------------------------------------------------------------------
# CAGrad.


def test_cagrad_closed_forms():
  g = np.array([[3.0, 4.0]])
  np.testing.assert_allclose(R.cagrad(g, 0.4).direction, 1.4 * g[0],
                             rtol=1e-14)
  rng = np.random.default_rng(0)
  g = R.random_jacobian(rng, 4, 5, 1e6)
  sol = R.cagrad(g, 0.0)
  np.testing.assert_allclose(sol.direction, g.mean(0), rtol=1e-14)
  # Orthogonal rows of norms 1e-6, 1, 1e6: the worst task is the smallest,
  # d = g0 + c |g0| e_1 (the second task still gets 1/3 > 0.4 |g0| 1e-6).
  g = np.diag([1e-6, 1.0, 1e6])
  g0 = g.mean(0)
  sol = R.cagrad(g, 0.4)
  expected = g0 + 0.4 * np.linalg.norm(g0) * np.eye(3)[0]
  np.testing.assert_allclose(sol.direction, expected, rtol=1e-12)
  _check_direction(sol, g)


def _check_cagrad(sol, g, c):
  k = g.shape[0]
  n = _norms(g)
  g0 = g.mean(0)
  g0n = R._norm(g0)
  d = sol.direction
  # Primal feasibility: in the ball.
  assert R._norm(d - g0) <= c * g0n * (1 + 1e-12)
  # Dual feasibility and value: w in the simplex, D = w.(M b) + c |g0| |g_w|
  # bounds min_k g_k . d from above; d attains it row by row.
  w = sol.info["simplex_weights"]
  assert np.all(w >= 0) and abs(w.sum() - 1) <= 1e-12
  gw = w @ g
  dual = float(w @ (g @ g0)) + c * g0n * R._norm(gw)
  scale = g0n * (n + float(w @ n))
  assert np.all(g @ d >= dual - TOL * scale), (g @ d - dual) / scale
  np.testing.assert_allclose(sol.weights, 1 / k + c * g0n * w / R._norm(gw),
                             rtol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cagrad_certificate(case):
  g = _jacobian(case)
  for c in (0.4, 2.0):
    sol = R.cagrad(g, c)
    _check_direction(sol, g)
    if sol.well_posed:
      assert sol.residual <= TOL
      _check_cagrad(sol, g, c)


def test_cagrad_against_slsqp():
  rng = np.random.default_rng(8)
  for _ in range(5):
    g = R.random_jacobian(rng, 4, 6, 10.0)
    c = 0.4
    m = g @ g.T
    b = np.full(4, 0.25)
    r = c * np.sqrt(b @ m @ b)
    res = optimize.minimize(
        lambda w: w @ m @ b + r * np.sqrt(w @ m @ w), b, method="SLSQP",
        bounds=[(0, 1)] * 4,
        constraints=[dict(type="eq", fun=lambda w: w.sum() - 1)],
        options=dict(ftol=1e-15, maxiter=500))
    gw = res.x @ g
    g0 = b @ g
    expected = g0 + c * np.linalg.norm(g0) / np.linalg.norm(gw) * gw
    sol = R.cagrad(g, c)
    assert R.cosine(sol.direction, expected) >= 1 - 1e-8


def test_cagrad_degenerate():
  g = np.array([[1.0, 2.0], [-1.0, -2.0]])  # g0 = 0
  sol = R.cagrad(g)
  assert not sol.well_posed
  g = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.5, 1.0, 1.0]])
  sol = R.cagrad(g)  # zero row, the others agree: t* = 0, d = g0
  assert not sol.well_posed
  np.testing.assert_allclose(sol.direction, g.mean(0), rtol=1e-15)
  np.testing.assert_array_equal(sol.info["simplex_weights"], [0, 1, 0])
  # 0 in the hull of nonzero rows, and t* = 0 attained on a segment.
  g = np.array([[1.0, 0.0], [-1.0, 0.0], [0.3, 1.0]])
  sol = R.cagrad(g)
  assert not sol.well_posed
  np.testing.assert_allclose(sol.direction, g.mean(0), rtol=1e-15)
  np.testing.assert_allclose(sol.info["simplex_weights"], [0.5, 0.5, 0.0],
                             atol=1e-15)
  # 0 in the hull but t* < 0: unique (d = 0.6 g0 leans towards g_1).
  g = np.array([[1.0, 2.0], [-1e6, -2e6]])
  sol = R.cagrad(g)
  assert sol.well_posed and sol.residual <= TOL
  np.testing.assert_allclose(sol.direction, 0.6 * g.mean(0), rtol=1e-12)


# --------------------------------------------------------------------------
# Nash-MTL.


@pytest.mark.parametrize("spread", SPREADS)
def test_nash_orthogonal(spread):
  rng = np.random.default_rng(1)
  n = np.logspace(0, np.log10(spread), 4)
  g = _orthonormal_rows(rng, 4, 7) * n[:, None]
  sol = R.nash(g)
  np.testing.assert_allclose(sol.weights, 1 / n, rtol=1e-13)
  assert sol.residual <= 1e-13


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nash_equations(case):
  g = _jacobian(case)
  sol = R.nash(g)
  if sol is None:  # 0 (nearly) in the hull
    assert not R.mgda(g).well_posed
    return
  _check_direction(sol, g)
  alpha = sol.weights
  assert np.all(alpha > 0)
  if sol.well_posed:
    assert sol.residual <= TOL
    np.testing.assert_allclose(alpha * (g @ (alpha @ g)), 1.0, rtol=1e-8)
    np.testing.assert_allclose(sol.direction @ sol.direction, g.shape[0],
                               rtol=1e-9)


def test_nash_undefined():
  assert R.nash(np.array([[1.0, 2.0], [-3.0, -6.0]])) is None
  assert R.nash(np.array([[1.0, 2.0], [0.0, 0.0]])) is None
  g = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
  assert R.nash(g) is None


# --------------------------------------------------------------------------
# IMTL-G.


def _libmtl_imtl(g):
  """LibMTL's closed form (task 1 as reference); fine for well-conditioned g."""
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  dmat = g[0] - g[1:]
  umat = u[0] - u[1:]
  alpha = g[0] @ umat.T @ np.linalg.inv(dmat @ umat.T)
  return np.concatenate([[1 - alpha.sum()], alpha])


@pytest.mark.parametrize("spread", SPREADS)
def test_imtl_orthogonal(spread):
  rng = np.random.default_rng(2)
  n = np.logspace(0, np.log10(spread), 4)
  g = _orthonormal_rows(rng, 4, 6) * n[:, None]
  sol = R.imtl_g(g)
  expected = (1 / n) / np.sum(1 / n)
  np.testing.assert_allclose(sol.weights, expected, rtol=1e-12)
  proj = g @ sol.direction / n
  np.testing.assert_allclose(proj, proj[0], rtol=1e-12)


def test_imtl_against_libmtl():
  rng = np.random.default_rng(4)
  for _ in range(5):
    g = R.random_jacobian(rng, 4, 7, 1.0)
    sol = R.imtl_g(g)
    np.testing.assert_allclose(sol.weights, _libmtl_imtl(g), rtol=1e-8)


@pytest.mark.parametrize("spread", SPREADS)
def test_imtl_against_decimal(spread):
  """The bordered system solved in 80-digit decimals."""
  rng = np.random.default_rng(13)
  for k, p in [(3, 5), (5, 7)]:
    g = R.random_jacobian(rng, k, p, spread)
    norms, units = _decimal_basis(g)
    a = [[_dot(ui, uj) for uj in units] + [decimal.Decimal(-1)]
         for ui in units]
    a.append([1 / n for n in norms] + [decimal.Decimal(0)])
    sol = _decimal_solve(a, [decimal.Decimal(0)] * k + [decimal.Decimal(1)])
    expected = np.array([float(x / n) for x, n in zip(sol[:k], norms)])
    ref = R.imtl_g(g)
    assert ref.well_posed
    np.testing.assert_allclose(ref.weights, expected, rtol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_imtl_equal_projections(case):
  g = _jacobian(case)
  sol = R.imtl_g(g)
  _check_direction(sol, g)
  if sol.well_posed:
    assert sol.residual <= TOL
    assert abs(sol.weights.sum() - 1) <= TOL
    d = sol.direction
    proj = g @ d / _norms(g)
    assert np.max(np.abs(proj - proj.mean())) <= TOL * R._norm(d)
  if case[2] < case[1]:  # K > P: the only equal-projection direction is 0
    assert not sol.well_posed


# --------------------------------------------------------------------------
# Aligned-MTL.


def _aligned_eigh(g, scale_mode="min"):
  """Direct formula on eigh(M); fine for well-conditioned g."""
  m = g @ g.T
  lam, v = np.linalg.eigh(m)
  keep = lam > lam.max() * len(lam) * R.EPS
  lam_k, v_k = lam[keep], v[:, keep]
  lam_r = {"min": lam_k.min(), "median": np.sort(lam_k)[(len(lam_k) - 1) // 2],
           "rmse": lam_k.mean()}[scale_mode]
  b = np.sqrt(lam_r) * (v_k / np.sqrt(lam_k)) @ v_k.T
  return b.sum(axis=1)


@pytest.mark.parametrize("scale_mode", R.ALIGNED_SCALE_MODES)
def test_aligned_against_eigh(scale_mode):
  rng = np.random.default_rng(9)
  for k, p, rank in [(4, 7, None), (5, 3, None), (5, 8, 3)]:
    g = R.random_jacobian(rng, k, p, 3.0, rank=rank)
    sol = R.aligned_mtl(g, scale_mode)
    np.testing.assert_allclose(sol.weights, _aligned_eigh(g, scale_mode),
                               rtol=1e-9)
    assert sol.residual <= TOL
    _check_direction(sol, g)


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("scale_mode", R.ALIGNED_SCALE_MODES)
def test_aligned_orthogonal(spread, scale_mode):
  # M = diag(n^2) exactly; B = sqrt(lam_R) diag(1/n) on the kept ones.
  rng = np.random.default_rng(3)
  n = np.logspace(0, np.log10(spread), 5)[rng.permutation(5)]
  g = _orthonormal_rows(rng, 5, 8) * n[:, None]
  for eps in (None, 1e-300):
    sol = R.aligned_mtl(g, scale_mode, eps=eps)
    cut = n.max() ** 2 * 5 * (R.EPS if eps is None else eps)
    keep = n ** 2 > cut
    lam = np.sort(n[keep] ** 2)
    lam_r = {"min": lam[0], "median": lam[(len(lam) - 1) // 2],
             "rmse": lam.mean()}[scale_mode]
    expected = np.where(keep, np.sqrt(lam_r) / n, 0.0)
    # Relative accuracy of every weight, 1e-12 spreads included.
    np.testing.assert_allclose(sol.weights, expected, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(np.sort(sol.info["kept"]), np.sort(keep))
    assert sol.residual <= TOL


def _decimal_aligned_weights(g, eps, digits=80):
  """Aligned-MTL's weights from the exact Gram matrix, by cyclic two-sided
  Jacobi in `digits`-digit decimal arithmetic (independent of the float64
  code; small K only)."""
  ctx = decimal.Context(prec=digits)
  dec = [[decimal.Decimal(float(x)) for x in row] for row in g]
  k = len(dec)
  a = [[ctx.create_decimal(sum((ctx.multiply(x, y) for x, y in
                                zip(dec[i], dec[j])), decimal.Decimal(0)))
        for j in range(k)] for i in range(k)]
  v = [[decimal.Decimal(int(i == j)) for j in range(k)] for i in range(k)]
  one, two = decimal.Decimal(1), decimal.Decimal(2)
  with decimal.localcontext(ctx):
    for _ in range(100):
      off = max((abs(a[i][j]) / (a[i][i] * a[j][j]).sqrt()
                 for i in range(k) for j in range(i + 1, k)
                 if a[i][i] > 0 and a[j][j] > 0), default=0)
      if off < decimal.Decimal(10) ** (5 - digits):
        break
      for i in range(k):
        for j in range(i + 1, k):
          if a[i][j] == 0:
            continue
          theta = (a[j][j] - a[i][i]) / (two * a[i][j])
          t = (one if theta >= 0 else -one) / (abs(theta) +
                                               (theta * theta + one).sqrt())
          c = one / (t * t + one).sqrt()
          sn = t * c
          for r in range(k):  # A <- A J
            ari, arj = a[r][i], a[r][j]
            a[r][i], a[r][j] = c * ari - sn * arj, sn * ari + c * arj
          for r in range(k):  # A <- J^T A
            air, ajr = a[i][r], a[j][r]
            a[i][r], a[j][r] = c * air - sn * ajr, sn * air + c * ajr
          for r in range(k):
            vri, vrj = v[r][i], v[r][j]
            v[r][i], v[r][j] = c * vri - sn * vrj, sn * vri + c * vrj
    lam = [a[i][i] for i in range(k)]
    cut = max(lam) * k * decimal.Decimal(eps)
    kept = [i for i in range(k) if lam[i] > cut]
    lam_r = min(lam[i] for i in kept)
    ones = [sum(v[r][i] for r in range(k)) for i in kept]
    w = [lam_r.sqrt() * sum(v[r][i] * o / lam[i].sqrt()
                            for i, o in zip(kept, ones)) for r in range(k)]
  return np.array([float(x) for x in w])


@pytest.mark.parametrize("spread", SPREADS)
def test_aligned_graded_against_decimal(spread):
  # Graded rows with non-orthogonal directions: the small eigenvalues of M
  # (down to 1e-24 of the largest) are needed to full relative accuracy.
  rng = np.random.default_rng(12)
  for k, p in [(3, 5), (4, 4)]:
    g = R.random_jacobian(rng, k, p, spread)
    for eps in (None, 1e-300):  # the float64 cutoff, and none
      sol = R.aligned_mtl(g, eps=eps)
      expected = _decimal_aligned_weights(g, R.EPS if eps is None else eps)
      if sol.well_posed:
        np.testing.assert_allclose(sol.weights, expected, rtol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_aligned_certificate(case):
  g = _jacobian(case)
  sol = R.aligned_mtl(g)
  _check_direction(sol, g)
  if sol.well_posed:
    assert sol.residual <= TOL
    # The aligned rows B g are orthogonal with equal norms sqrt(lam_R) (in
    # the kept subspace): B M B = lam_R P, checked through the direction's
    # norm |1^T B g|^2 = lam_R 1^T P 1 <= lam_R K.
    dn = R._norm(sol.direction) / np.max(_norms(g))
    assert dn * dn <= sol.info["lam_r"] * g.shape[0] * (1 + 1e-10)


# --------------------------------------------------------------------------
# ConFIG.


@pytest.mark.parametrize("spread", SPREADS)
def test_config_orthogonal(spread):
  rng = np.random.default_rng(4)
  n = np.logspace(0, np.log10(spread), 3)
  g = _orthonormal_rows(rng, 3, 5) * n[:, None]
  sol = R.config(g)
  units = g / n[:, None]
  np.testing.assert_allclose(sol.direction, n.sum() / 3 * units.sum(0),
                             rtol=1e-12, atol=1e-14 * n.max())
  cosines = units @ sol.direction / R._norm(sol.direction)
  np.testing.assert_allclose(cosines, 3 ** -0.5, rtol=1e-12)
  _check_direction(sol, g)


def test_config_against_lstsq():
  rng = np.random.default_rng(10)
  for k, p, rank in [(3, 6, None), (5, 3, None), (5, 8, 2)]:
    g = R.random_jacobian(rng, k, p, 1e3, rank=rank)
    units = g / _norms(g)[:, None]
    x = np.linalg.lstsq(units, np.ones(k), rcond=1e-8)[0]
    unit = x / np.linalg.norm(x)
    expected = (g @ unit).sum() * unit
    sol = R.config(g)
    assert sol.well_posed and sol.residual <= TOL
    assert R.cosine(sol.direction, expected) >= 1 - 1e-12
    np.testing.assert_allclose(R._norm(sol.direction),
                               np.linalg.norm(expected), rtol=1e-10)


@pytest.mark.parametrize("spread", SPREADS)
def test_config_against_decimal(spread):
  """Full row rank: x = U^T C^-1 1, in 80-digit decimals."""
  rng = np.random.default_rng(14)
  for k, p in [(3, 5), (5, 7)]:
    g = R.random_jacobian(rng, k, p, spread)
    norms, units = _decimal_basis(g)
    c = [[_dot(ui, uj) for uj in units] for ui in units]
    y = _decimal_solve(c, [decimal.Decimal(1)] * k)
    with decimal.localcontext(_CTX):
      x = [sum(yi * ui[j] for yi, ui in zip(y, units)) for j in range(p)]
      xn = _dot(x, x).sqrt()
      proj = sum(n * _dot(u, x) for n, u in zip(norms, units)) / xn
      expected = np.array([float(proj / xn * yi / n)
                           for yi, n in zip(y, norms)])
    ref = R.config(g)
    assert ref.well_posed
    np.testing.assert_allclose(ref.weights, expected, rtol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_config_equal_cosines(case):
  g = _jacobian(case)
  sol = R.config(g)
  _check_direction(sol, g)
  if sol.well_posed:
    assert sol.residual <= TOL
  k, p = g.shape
  if sol.well_posed and sol.info["rank"] == k:
    cosines = g @ sol.direction / (_norms(g) * R._norm(sol.direction))
    np.testing.assert_allclose(cosines, cosines[0], rtol=1e-10)
    assert cosines[0] > 0


# --------------------------------------------------------------------------
# All references: task order, scale, degenerate inputs.

REFERENCES = {
    "mgda": R.mgda, "upgrad": R.upgrad, "dualproj": R.dualproj,
    "cagrad": R.cagrad, "nash": R.nash, "imtl_g": R.imtl_g,
    "aligned_mtl": R.aligned_mtl, "config": R.config,
}
# Which references have unique weights where the direction is well posed and
# the rows are linearly independent (all of them), and how the weights scale
# with g: Nash's alpha as 1 / scale, the others not at all.
WEIGHT_DEGREE = {name: 0 for name in REFERENCES}
WEIGHT_DEGREE["nash"] = -1
DIRECTION_DEGREE = {name: 1 for name in REFERENCES}
DIRECTION_DEGREE["nash"] = 0


@pytest.mark.parametrize("case", CASES[::2], ids=IDS[::2])
def test_task_order_invariance(case):
  g = _jacobian(case)
  k = g.shape[0]
  perm = np.random.default_rng(case[0]).permutation(k)
  # Well-conditioned independent rows: unique, well-conditioned weights.
  units = g / _norms(g)[:, None]
  independent = k <= g.shape[1] and np.linalg.cond(units) < 1e4
  for name, fn in REFERENCES.items():
    a, b = fn(g), fn(g[perm])
    if a is None or b is None:  # Nash: no solution, or none resolved
      assert a is None or not a.well_posed, name
      assert b is None or not b.well_posed, name
      continue
    assert a.well_posed == b.well_posed, name
    if not a.well_posed:
      continue
    assert R.cosine(a.direction, b.direction) >= 1 - 1e-12, name
    np.testing.assert_allclose(R._norm(a.direction), R._norm(b.direction),
                               rtol=1e-7, err_msg=name)
    if independent:
      np.testing.assert_allclose(a.weights[perm], b.weights, rtol=1e-7,
                                 atol=1e-9 * np.max(np.abs(a.weights)),
                                 err_msg=name)


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_scale_equivariance(scale):
  g = R.random_jacobian(np.random.default_rng(11), 4, 6, 1e6)
  for name, fn in REFERENCES.items():
    a, b = fn(g), fn(g * scale)
    assert a.well_posed and b.well_posed, name
    np.testing.assert_allclose(
        b.direction, a.direction * scale ** DIRECTION_DEGREE[name],
        rtol=1e-10, atol=1e-12 * R._norm(b.direction), err_msg=name)
    np.testing.assert_allclose(
        b.weights, a.weights * scale ** WEIGHT_DEGREE[name], rtol=1e-10,
        err_msg=name)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_degenerate_inputs(name):
  fn = REFERENCES[name]
  for g in (np.zeros((3, 4)), np.array([[1.0, 2.0], [-1.0, -2.0]]),
            np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.5, -1.0, 1.0]])):
    sol = fn(g)
    if sol is None:
      assert name == "nash"
      continue
    assert np.all(np.isfinite(sol.weights)) and np.all(
        np.isfinite(sol.direction))
    _check_direction(sol, g)
    if not np.any(g):
      assert not sol.well_posed and np.all(sol.direction == 0)
  with pytest.raises(ValueError):
    fn(np.array([[1.0, np.nan]]))
