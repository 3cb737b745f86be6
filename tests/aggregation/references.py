"""Float64 reference solutions of the K x K aggregation problems (issue 15).

Test support only: pure numpy/scipy in float64, no JAX. Each reference takes
the task gradients `g [K, P]` themselves (not only the Gram matrix) and solves
its problem in the COSINE basis,

  n_i = |g_i|,   u_i = g_i / n_i (0 for a zero row),   C = U U^T,

which stays well conditioned when the row norms are spread over many orders of
magnitude (the Gram matrix `M = G G^T = diag(n) C diag(n)` has condition number
~spread^2 there, 1e24 at a spread of 1e12, beyond any float64 solve on M).
Weights `s` on the unit rows become weights `w = s / n` on the rows of g, and
the direction is `d = U^T s = w @ g`. Every reference is positively homogeneous
in g (for `g -> a g`, a > 0, the weights are unchanged and the direction scales
by a; Nash-MTL's alpha scales by 1 / a and its direction is unchanged), so
overall scales from 1e-20 to 1e20 cost no accuracy. Row norms are computed
scaled (no overflow of `|g_i|^2`). The weights are not unique where the rows
are linearly dependent (K > P, rank deficiency): compare directions.

Every reference returns a `Solution` (Nash-MTL: `None` where the bargaining
problem has no solution):

* `weights [K]`: the direction is `weights @ g` (up to rounding);
* `direction [P]`: the same direction, computed in the cosine basis (this is
  the one to compare with; `weights @ g` rounds to `eps * sum_i |w_i| n_i`);
* `residual`: the optimality certificate of the problem, dimensionless,
  defined in each docstring (KKT residuals / duality gap / the equations the
  method defines, relative to the problem's own scale). On the random spread
  Jacobians of `references_test.py` it is at most ~1e-12 (`TOL` below is the
  bound the tests assert);
* `well_posed`: whether the direction is nonzero, unique and stable enough
  that comparing directions by cosine is meaningful. Where it is False
  (0 in the convex hull of the rows for MGDA/CAGrad, a singular system for
  IMTL-G, an eigenvalue near Aligned-MTL's cutoff, ...) compare the other
  properties instead (feasibility, KKT, non-conflict). It is also False when
  the direction is at the rounding level of its own terms:
  `info['cancellation'] = |d| / sum_i |w_i| n_i` at most `CANCELLATION`
  (1e-6), e.g. a mean gradient that cancels, or huge weights on nearly
  opposite rows (the direction itself may then be well defined, but its
  float64 rounding error ~eps / cancellation is no longer negligible next to
  TOL, and the certificates are only asserted where `well_posed`; they are
  computed in units of the direction). A float32 implementation
  resolves d only to ~1e-7 / cancellation relative: tests comparing one with
  a reference should also require a cancellation well above 1e-7;
* `info`: a dict of extra diagnostics (listed per function), always with
  `cancellation`.

Not references for the float32 behaviour of an aggregator: where a method's
definition has a relative cutoff (Aligned-MTL, ConFIG) the float64 cutoff is
the default and a float32 one can be asked for.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
from scipy import optimize

EPS = float(np.finfo(np.float64).eps)
# The certificate bound the tests assert on random spread Jacobians (actual
# residuals are ~1e-14 .. 1e-12).
TOL = 1e-9


class Solution(NamedTuple):
  """A reference solution; see the module docstring."""

  weights: np.ndarray
  direction: np.ndarray
  residual: float
  well_posed: bool
  info: dict


# --------------------------------------------------------------------------
# Helpers.


def cosine(a, b) -> float:
  """Cosine similarity of two vectors in float64, computed without overflow.

  Returns 1.0 when both are zero and 0.0 when exactly one is.
  """
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  na, nb = _norm(a), _norm(b)
  if na == 0 and nb == 0:
    return 1.0
  if na == 0 or nb == 0:
    return 0.0
  return float(np.clip(np.dot(a / na, b / nb), -1.0, 1.0))


def _norm(x: np.ndarray) -> float:
  """Euclidean norm of a vector, scaled so that squares cannot overflow."""
  top = float(np.max(np.abs(x))) if x.size else 0.0
  if top == 0.0:
    return 0.0
  return top * float(np.linalg.norm(x / top))


class _Basis(NamedTuple):
  g: np.ndarray        # [K, P] float64
  norms: np.ndarray    # [K] n_i
  units: np.ndarray    # [K, P] u_i (zero rows stay zero)
  nonzero: np.ndarray  # [K] bool


def _basis(g) -> _Basis:
  g = np.asarray(g, np.float64)
  if g.ndim != 2 or g.shape[0] == 0:
    raise ValueError(f"g must be a non-empty [K, P] array, got shape {g.shape}")
  if not np.all(np.isfinite(g)):
    raise ValueError("g must be finite")
  norms = np.array([_norm(row) for row in g])
  nonzero = norms > 0
  units = np.zeros_like(g)
  units[nonzero] = g[nonzero] / norms[nonzero, None]
  return _Basis(g, norms, units, nonzero)


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """`argmin_{x >= 0} |a x - b|`: scipy's Lawson-Hanson NNLS, polished.

  The polish re-solves the least-squares problem on the support found (one
  exact lstsq, kept if it stays positive and does not worsen the residual),
  which takes the solution to full float64 accuracy. If scipy fails (it
  raises when it reaches its iteration limit), every support is tried (fine
  for the K <= ~10 of the tests) and the best positive solution kept.
  """
  k = a.shape[1]
  try:
    x, _ = optimize.nnls(a, b)
  except RuntimeError:
    x = _nnls_enumerate(a, b)
  support = x > 0
  if support.any():
    xs = np.linalg.lstsq(a[:, support], b, rcond=None)[0]
    if np.all(xs > 0):
      x2 = np.zeros(k)
      x2[support] = xs
      if _norm(a @ x2 - b) <= _norm(a @ x - b) * (1 + 1e-12) + 1e-300:
        x = x2
  return x


def _nnls_enumerate(a, b):
  """NNLS by trying every support (exponential; small K only)."""
  k = a.shape[1]
  best, best_res = np.zeros(k), _norm(b)
  for size in range(1, k + 1):
    for sup in itertools.combinations(range(k), size):
      sup = list(sup)
      xs = np.linalg.lstsq(a[:, sup], b, rcond=None)[0]
      if np.any(xs <= 0):
        continue
      x = np.zeros(k)
      x[sup] = xs
      res = _norm(a @ x - b)
      if res < best_res:
        best, best_res = x, res
  return best


# A direction shorter than this fraction of the sum of its terms' norms is
# treated as cancellation (`well_posed` False): its float64 rounding error,
# ~eps / cancellation relative, would approach the certificates' TOL.
CANCELLATION = 1e-6


def _solution(basis: _Basis, weights, direction, residual, well_posed,
              info) -> Solution:
  """Builds a Solution, adding `info['cancellation']` = `|d| / sum_i |w_i|
  n_i` (1 when there is no cancellation, 0 for d = 0) and requiring it to
  exceed CANCELLATION for `well_posed`."""
  terms = float(np.abs(weights) @ basis.norms)
  dn = _norm(direction)
  cancellation = dn / terms if terms > 0 else 0.0
  info = dict(info, cancellation=cancellation)
  return Solution(np.asarray(weights, np.float64),
                  np.asarray(direction, np.float64), float(residual),
                  bool(well_posed) and cancellation > CANCELLATION, info)


def _uniform_over(mask: np.ndarray) -> np.ndarray:
  return mask.astype(np.float64) / max(int(mask.sum()), 1)


# --------------------------------------------------------------------------
# Random Jacobians.


def random_jacobian(rng: np.random.Generator, k: int, p: int, spread: float,
                    rank: int | None = None, scale: float = 1.0,
                    conflict: float = 0.5) -> np.ndarray:
  """Random `[k, p]` float64 task gradients with graded row norms.

  Row directions are `m_i e + z_i` in a `rank`-dimensional subspace (a random
  orthonormal basis of R^p), with a shared unit vector `e`, shared weights
  `m_i ~ U(-conflict, 2)` and `z_i ~ N(0, I)`: mostly aligned rows with some
  conflicting pairs, so that MGDA/UPGrad/CAGrad have non-trivial supports.
  Row norms are `scale * spread**t_i`, log-uniform, with the extremes `t = 0`
  and `t = 1` always present (for k >= 2; their rows are random), so the ratio
  of the largest to the smallest norm is exactly `spread`.

  Args:
    rng: a numpy Generator.
    k, p: number of tasks and of parameters.
    spread: ratio of the largest to the smallest row norm (>= 1), e.g. 1e12.
    rank: rank of the matrix (default `min(k, p)`; at most that).
    scale: the smallest row norm.
    conflict: how negative the shared component can be (0: none).

  Returns:
    `g [k, p]` float64 of rank `rank` (generically).
  """
  rank = min(k, p) if rank is None else int(rank)
  if not 1 <= rank <= min(k, p):
    raise ValueError(f"rank must be in [1, {min(k, p)}], got {rank}")
  if spread < 1:
    raise ValueError(f"spread must be >= 1, got {spread}")
  basis = np.linalg.qr(rng.normal(size=(p, rank)))[0].T  # [rank, p]
  e = rng.normal(size=rank)
  e /= np.linalg.norm(e)
  m = rng.uniform(-conflict, 2.0, size=(k, 1))
  coeffs = m * e[None, :] + rng.normal(size=(k, rank))  # [k, rank]
  rows = coeffs @ basis
  rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  t = rng.uniform(0.0, 1.0, size=k)
  if k >= 2:
    t[:2] = [0.0, 1.0]
    t = rng.permutation(t)
  return rows * (scale * float(spread) ** t)[:, None]


# --------------------------------------------------------------------------
# MGDA.


def mgda(g) -> Solution:
  """Min-norm point of the convex hull of the rows (MGDA).

  Definition: `w = argmin_{w in simplex} |w @ g|^2`, `d = w @ g`. Optimality
  (KKT): `w >= 0`, `sum w = 1`, `g_i . d >= |d|^2` for every i, with equality
  where `w_i > 0`.

  Method: least-distance-programming duality (Lawson & Hanson, ch. 23). If 0
  is not in the hull, `z* = argmin |z|^2 s.t. g_i . z >= 1` gives
  `d* = z* / |z*|^2`; in the cosine basis the constraints read
  `u_i . z >= r_i`, `r_i = 1 / n_i`, scaled to `b_i = n_min / n_i` in (0, 1].
  With `E = [U^T ; b^T]` and `f = e_{P+1}`, `y = nnls(E, f)` gives
  `z ∝ U^T y` (the residual `E y - f` is `[U^T y; b.y - 1]`), so the
  multipliers are `mu_i ∝ y_i / n_i` and `w = y b / (b . y)`, i.e.
  `s = w n = n_min y / (b . y)` and `d = U^T s`. The same y gives `U^T y ~ 0`
  (a point of the hull at 0) when 0 is in the hull, so the formula serves both
  cases.

  Degenerate inputs:
  * a zero row: `d = 0`, weights uniform over the zero rows;
  * 0 in the hull (numerically: `|U^T y| <= 1e3 K eps |y|_1`, the rounding
    level of the combination): `d = 0` returned exactly, weights the nnls
    combination (`w @ g ~ 0`); `well_posed` False.

  Returns:
    `Solution`; `residual` = max over i of the KKT violation in cosine units,
    `max(0, |d| / n_i - u_i . d/|d|)` for all i and its absolute value on the
    support (0 when d = 0). `info`: `norm` (|d|), `support` (bool [K]),
    `relative_norm` (|d| / n_min, in (0, 1]; small means nearly Pareto
    stationary: the direction's accuracy is ~eps / relative_norm).
  """
  basis = _basis(g)
  k, p = basis.g.shape
  if not basis.nonzero.all():
    w = _uniform_over(~basis.nonzero)
    return _solution(basis, w, np.zeros(p), 0.0, False,
                     dict(norm=0.0, support=w > 0, relative_norm=0.0))
  n, u = basis.norms, basis.units
  nmin = n.min()
  b = nmin / n
  e = np.vstack([u.T, b[None, :]])  # [P + 1, K]
  f = np.zeros(p + 1)
  f[-1] = 1.0
  y = _nnls(e, f)
  by = float(b @ y)
  w = y * b / by
  uy = y @ u  # U^T y, [P]
  zero = _norm(uy) <= 1e3 * k * EPS * float(np.sum(y))
  if zero:
    return _solution(basis, w, np.zeros(p), 0.0, False,
                     dict(norm=0.0, support=w > 0, relative_norm=0.0))
  d = (nmin / by) * uy  # = (w n) @ u
  dn = _norm(d)
  proj = u @ (d / dn)  # u_i . d / |d|
  slack = proj - dn / n  # >= 0, = 0 on the support
  support = w > 0
  residual = max(float(np.max(np.maximum(-slack, 0.0))),
                 float(np.max(np.abs(slack[support]))))
  return _solution(basis, w, d, residual, True,
                   dict(norm=dn, support=support, relative_norm=dn / nmin))


# --------------------------------------------------------------------------
# UPGrad / DualProj.


def dual_cone_projection(g, v) -> Solution:
  """Weights of the projection of `v @ g` onto the dual cone of the rows.

  Definition (Quinton & Rey 2024, Prop. 1): `w = argmin_{w >= v} |w @ g|^2`;
  `d = w @ g` is the Euclidean projection of `q = v @ g` onto
  `{x : g_i . x >= 0 for all i}`. KKT: `w >= v`, `g_i . d >= 0` for all i,
  `(w_i - v_i) g_i . d = 0`.

  Method: `w = v + s / n` with `s = |q| nnls(U^T, -q / |q|)`.

  Degenerate inputs: a zero row gets `w_i = v_i` (its constraint is void);
  `q = 0` gives `w = v`, `d = 0`. `well_posed` is False when d = 0 (q is in
  the polar cone) or `|d| < 1e-10 |q|` (rounding level).

  Returns:
    `Solution`; `residual` = `max(max_i -u_i . d, max_{w_i > v_i} |u_i . d|)
    / |q|`. `info`: `norm` (|d|), `q_norm` (|q|), `active` (bool [K], rows
    whose constraint is active: `w_i > v_i`).
  """
  basis = _basis(g)
  k, p = basis.g.shape
  v = np.asarray(v, np.float64)
  if v.shape != (k,):
    raise ValueError(f"v must have shape ({k},), got {v.shape}")
  n, u = basis.norms, basis.units
  q = (v * n) @ u
  qn = _norm(q)
  if qn == 0.0:
    return _solution(basis, v.copy(), np.zeros(p), 0.0, False,
                     dict(norm=0.0, q_norm=0.0, active=np.zeros(k, bool)))
  s = _nnls(u.T, -q / qn) * qn  # [K]
  s[~basis.nonzero] = 0.0
  y = np.zeros(k)
  y[basis.nonzero] = s[basis.nonzero] / n[basis.nonzero]
  w = v + y
  d = q + s @ u
  dn = _norm(d)
  proj = u @ d / qn
  active = s > 0
  residual = float(np.max(np.maximum(-proj, 0.0)))
  if active.any():
    residual = max(residual, float(np.max(np.abs(proj[active]))))
  return _solution(basis, w, d, residual, dn > 1e-10 * qn,
                   dict(norm=dn, q_norm=qn, active=active))


def _pref(k, pref):
  if pref is None:
    return np.full(k, 1.0 / k)
  pref = np.asarray(pref, np.float64)
  if pref.shape != (k,):
    raise ValueError(f"pref must have shape ({k},), got {pref.shape}")
  return pref


def upgrad(g, pref=None) -> Solution:
  """UPGrad: `w = sum_i w(p_i e_i)`, each term a `dual_cone_projection`.

  `pref` defaults to `1/K`. The direction is the p-weighted sum of the rows
  projected onto the dual cone. `residual` is the largest of the K
  projections' KKT residuals (see `dual_cone_projection`), each in units of
  `sum_j |p_j| n_j` (the sum's scale, not the part's own `|p_i| n_i`: one
  projection that nearly vanishes may be ill-conditioned alone); `well_posed`
  False when d is 0 or below 1e-10 of `sum_i p_i n_i` (e.g. 0 in the hull of
  the rows, where every projection may vanish). `info`: `norm`, `parts` (the
  K `Solution`s).
  """
  basis = _basis(g)
  k, p = basis.g.shape
  pref = _pref(k, pref)
  parts = [dual_cone_projection(basis.g, pref[i] * np.eye(k)[i])
           for i in range(k)]
  w = np.sum([part.weights for part in parts], axis=0)
  d = np.sum([part.direction for part in parts], axis=0)
  dn = _norm(d)
  scale = float(np.sum(np.abs(pref) * basis.norms))
  # Each part's KKT residual is relative to its own |q_i| = |p_i| n_i; a part
  # that nearly vanishes (its row nearly in the polar cone) may be
  # ill-conditioned alone while the sum is not: residuals relative to the
  # sum's scale.
  residual = max((part.residual * part.info["q_norm"] for part in parts),
                 default=0.0) / scale if scale > 0 else 0.0
  return _solution(basis, w, d, residual, dn > 1e-10 * scale,
                   dict(norm=dn, parts=parts))


def dualproj(g, pref=None) -> Solution:
  """DualProj: `dual_cone_projection(g, p)` with `p` defaulting to `1/K`."""
  basis = _basis(g)
  return dual_cone_projection(basis.g, _pref(basis.g.shape[0], pref))


# --------------------------------------------------------------------------
# CAGrad.


def _ldp(u: np.ndarray, h: np.ndarray):
  """`min |x| s.t. U x >= h` by NNLS (Lawson & Hanson, Alg. LDP).

  Returns `(y, hy)`: the nnls solution of `[U^T; h^T] y = e_{P+1}` and `h . y`.
  With them `x = U^T y / (1 - h.y)` and `|x|^2 = h.y / (1 - h.y)`;
  `h.y -> 1` means infeasible (|x| -> inf). y is proportional to the LDP's
  multipliers.
  """
  p = u.shape[1]
  f = np.zeros(p + 1)
  f[-1] = 1.0
  y = _nnls(np.vstack([u.T, h[None, :]]), f)
  return y, float(h @ y)


def cagrad(g, c: float = 0.4) -> Solution:
  """CAGrad's direction (Liu et al. 2021), WITHOUT the final rescale.

  Definition: with `g0 = mean_i g_i` (zero rows included), the primal is
  `max_d min_i g_i . d  s.t. |d - g0| <= c |g0|` and its dual
  `min_{w in simplex} w . (M 1/K) + c |g0| |g_w|` (`g_w = w @ g`); at the
  optimum `d = g0 + c |g0| / |g_w| g_w`. The aggregator with `rescale=1`
  returns `d / (1 + c^2)`; this reference returns d itself.

  Method (well scaled at any norm spread): with `x = d/|g0| - g0/|g0|`,
  `a_i = u_i . g0/|g0|`, `b_i = n_min / n_i` and the scaled value
  `t = min_i g_i.d / (n_min |g0|)`, the primal is `max t s.t. U x >= b t - a,
  |x| <= c`. For fixed t, `min |x| s.t. U x >= b t - a` is a least-distance
  program solved exactly by NNLS, and `|x(t)| <= c` iff `h.y <= c^2/(1+c^2)`
  (see `_ldp`), a monotone test in t: t* is found by bisection to the last
  bit. The LDP multipliers `lambda` at t* (normalised to `b . lambda = 1`)
  are the dual weights in the cosine basis, `w = lambda b` on the simplex,
  and `d/|g0| = g0/|g0| + c U^T lambda / |U^T lambda|`.

  Certificate: `D = lambda . a + c |U^T lambda|` is the dual value (an upper
  bound on t* for any feasible lambda) and d is exactly feasible (on the
  sphere), so `residual = max_i max(0, b_i D - u_i . d/|g0|) / (1 + c + b_i
  |D|)` bounds, row by row in cosine units, how far d is from attaining the
  upper bound; it also certifies complementary slackness.

  Degenerate inputs: `|g0| = 0` or `c = 0`: `d = g0`, weights 1/K
  (`well_posed` False for `|g0| = 0`). If the optimum is not unique (then
  0 is in the hull of the rows, t* = 0 and every dual optimum has `g_w = 0`,
  e.g. a zero row while the other rows admit a common descent direction in the
  ball) the aggregator's convention `g_w = 0 -> d = g0` is returned with
  `well_posed` False (g0 need not attain t* then). Detected as: the bisection
  ends where `|x| < c (1 - 1e-6)`. `info['simplex_weights']` are then
  MGDA's weights (a dual optimum: `g_w = 0`, up to rounding).

  Returns:
    `Solution` with `weights = 1/K + c |g0| w / |g_w|` (direction = weights @
    g). `info`: `simplex_weights` (the dual w), `value` (t* in units of
    `n_min |g0|`, i.e. `min_i g_i . d = value * n_min * |g0|`), `dual_value`
    (D), `iterations`.
  """
  basis = _basis(g)
  k, p = basis.g.shape
  c = float(c)
  if not 0 <= c < np.inf:
    raise ValueError(f"c must be finite and >= 0, got {c}")
  n, u, nz = basis.norms, basis.units, basis.nonzero
  mean = np.full(k, 1.0 / k)
  g0 = (mean * n) @ u
  g0n = _norm(g0)
  if g0n == 0.0 or c == 0.0:
    return _solution(basis, mean, g0, 0.0, g0n > 0,
                     dict(simplex_weights=mean.copy(), value=np.nan,
                          dual_value=np.nan, iterations=0))
  uz, nzn = u[nz], n[nz]
  nmin = nzn.min()
  b = nmin / nzn
  a = uz @ (g0 / g0n)
  thresh = c * c / (1.0 + c * c)

  def ok(t):
    y, hy = _ldp(uz, b * t - a)
    return hy <= thresh, y, hy

  # x = 0 is feasible for t = min a / b; no t above min (a + c) / b is.
  lo = float(np.min(a / b))
  hi = float(np.min((a + c) / b))
  hi = max(hi, lo)
  good, y, hy = ok(lo)
  assert good, "x = 0 must be feasible at t = min a_i / b_i"
  iters = 0
  while iters < 2000:
    mid = 0.5 * (lo + hi)
    if not lo < mid < hi:
      break
    iters += 1
    good_mid, y_mid, hy_mid = ok(mid)
    if good_mid:
      lo, y, hy = mid, y_mid, hy_mid
    else:
      hi = mid
  x = (y @ uz) / (1.0 - hy)
  xn = _norm(x)
  degenerate = xn < c * (1.0 - 1e-6)
  info = dict(value=lo, iterations=iters)
  if degenerate or (not nz.all() and lo > 0):
    # Zero rows cap t at 0 (g_i . d = 0): with lo > 0 the rest admit more, so
    # the optimum (t* = 0) is the whole ball's part where all g_i . d >= 0.
    # A dual optimum: any w with g_w = 0, e.g. MGDA's.
    info.update(simplex_weights=mgda(basis.g).weights, dual_value=0.0,
                value=0.0)
    return _solution(basis, mean, g0, 0.0, False, info)
  lam = y / float(b @ y)
  ul = lam @ uz  # U^T lambda
  uln = _norm(ul)
  dual = float(lam @ a) + c * uln
  dhat = g0 / g0n + (c / uln) * ul  # d / |g0|
  slack = (b * dual - uz @ dhat) / (1.0 + c + b * abs(dual))
  residual = float(np.max(np.maximum(slack, 0.0)))
  weights = mean.copy()
  weights[nz] += c * g0n * lam / (nzn * uln)
  info.update(simplex_weights=_embed(lam * b, nz), dual_value=dual)
  return _solution(basis, weights, g0n * dhat, residual, True, info)


def _embed(values, mask):
  out = np.zeros(mask.shape[0])
  out[mask] = values
  return out


# --------------------------------------------------------------------------
# Nash-MTL.


def nash(g, *, max_iter: int = 200) -> Solution | None:
  """Nash-MTL's bargaining weights: `alpha > 0` with `alpha_i (M alpha)_i = 1`.

  Method: in the cosine basis `s = n alpha` solves `s_i (C s)_i = 1`
  (independent of n), the stationarity condition of the strictly convex
  `F(s) = s^T C s / 2 - sum log s`; minimised by damped Newton in the scaled
  variables (`(S C S + I) delta = 1 - s (C s)`, `s <- s (1 + step delta)`,
  `S = diag(s)`), which converges quadratically.

  Returns:
    `None` when there is no solution: a zero row, or 0 in the convex hull of
    the rows (then C has a nonnegative null vector and F is unbounded below;
    tested with `mgda`, whose direction is then exactly 0), or s diverging
    (beyond 1e150 or overflowing; seen only where MGDA's direction is at
    most CANCELLATION of its terms: 0 nearly in the hull). Otherwise a
    `Solution` with `weights = alpha = s / n`, `direction = U^T s` (so
    `|d|^2 = K`), `residual = max_i |s_i (C s)_i - 1|`. Near a problem
    without solution (0 nearly in the hull, e.g. nearly opposite rows) s is
    huge, `s_i (C s)_i` rounds to ~eps s_i |s|_1 and the residual stalls
    above TOL: `well_posed` is then False (as it is for a cancellation below
    CANCELLATION). `info`: `s`, `iterations`.
  """
  basis = _basis(g)
  k = basis.g.shape[0]
  if not basis.nonzero.all():
    return None
  if mgda(basis.g).info["norm"] == 0.0:
    return None
  n, u = basis.norms, basis.units
  cmat = u @ u.T
  s = np.full(k, 1.0 / np.sqrt(max(float(np.sum(cmat)) / k, EPS)))

  def fval(s):
    return 0.5 * s @ cmat @ s - np.sum(np.log(s))

  it = 0
  for it in range(1, max_iter + 1):
    r = 1.0 - s * (cmat @ s)
    if np.max(np.abs(r)) <= 1e-14:
      break
    h = s[:, None] * cmat * s[None, :] + np.eye(k)
    try:
      delta = np.linalg.solve(h, r)
    except np.linalg.LinAlgError:  # s overflowed: diverging
      return None
    # Keep s > 0 and decrease F.
    step = 1.0
    if np.min(delta) < 0:
      step = min(1.0, 0.95 / float(-np.min(delta)))
    f0 = fval(s)
    slope = -float(r @ delta)  # directional derivative of F along s * delta
    while step > 1e-12:
      s_new = s * (1.0 + step * delta)
      if np.all(s_new > 0) and fval(s_new) <= f0 + 1e-4 * step * slope + (
          1e-13 * abs(f0)):
        break
      step *= 0.5
    s = s_new
    if not np.all(np.isfinite(s)) or np.max(s) > 1e150:
      return None
    if step * float(np.max(np.abs(delta))) <= 1e-15:
      break  # rounding level: no further progress
  residual = float(np.max(np.abs(s * (cmat @ s) - 1.0)))
  alpha = s / n
  return _solution(basis, alpha, s @ u, residual, residual <= TOL,
                   dict(s=s, iterations=it))


# --------------------------------------------------------------------------
# IMTL-G.


def imtl_g(g) -> Solution:
  """IMTL-G: `d = w @ g`, `sum w = 1`, equal projections `u_i . d` for all i.

  Method: in the cosine basis (`d = U^T s`, `w = s / n`) solve the bordered
  system `[[C, -1], [b^T, 0]] [s'; c'] = [0; 1]` with `b = n_min / n` (so
  `s = n_min s'`, `w = s' b`), by an SVD least-squares solve plus one step
  of iterative refinement: exact when the system is regular, the
  minimum-norm least-squares solution otherwise.

  Degenerate inputs: zero rows are left out (weight 0; their projection
  cannot be equalised) and the rest solved; all rows zero gives `w = 0`,
  `d = 0`. `well_posed` is False when the bordered matrix is singular to
  CANCELLATION (1e-6) relative (e.g. weights that would sum to 0: the
  direction is then undetermined), or when d is at the rounding level of its
  terms (`info['cancellation'] = |d| / sum_i |w_i| n_i`): rank-deficient
  rows (K > P included) generically admit no nonzero direction with equal
  projections, and the solution is d = 0 (c' = 0).

  Returns:
    `Solution`; `residual` = `max(max_i |u_i . d - mean_j u_j . d| / |d|,
    |sum w - 1|)`. `info`: `projection` (the common `u_i . d`), `sv_ratio`
    (smallest / largest singular value of the bordered matrix).
  """
  basis = _basis(g)
  k, p = basis.g.shape
  nz = basis.nonzero
  if not nz.any():
    return _solution(basis, np.zeros(k), np.zeros(p), 0.0, False,
                     dict(projection=0.0, sv_ratio=0.0))
  uz, nzn = basis.units[nz], basis.norms[nz]
  m = uz.shape[0]
  nmin = nzn.min()
  b = nmin / nzn
  a = np.zeros((m + 1, m + 1))
  a[:m, :m] = uz @ uz.T
  a[:m, m] = -1.0
  a[m, :m] = b
  rhs = np.zeros(m + 1)
  rhs[m] = 1.0
  sol, _, _, sv = np.linalg.lstsq(a, rhs, rcond=None)
  sol = sol + np.linalg.lstsq(a, rhs - a @ sol, rcond=None)[0]  # refinement
  sv_ratio = float(sv[-1] / sv[0])
  sp = sol[:m]
  w = _embed(sp * b, nz)
  d = nmin * (sp @ uz)
  dn = _norm(d)
  proj = uz @ d
  if dn > 0:
    residual = float(np.max(np.abs(proj - proj.mean())) / dn)
  else:
    residual = 0.0
  residual = max(residual, abs(float(np.sum(w)) - 1.0))
  # d = n_min U^T s' rounds to ~eps n_min |s'|_1: `_solution` flags a d at
  # that level (e.g. rank-deficient rows, where the only equal-projection
  # direction is 0).
  well_posed = sv_ratio > CANCELLATION
  return _solution(basis, w, d, residual, well_posed,
                   dict(projection=float(proj.mean()), sv_ratio=sv_ratio))


# --------------------------------------------------------------------------
# Aligned-MTL.


def _jacobi_svd(x: np.ndarray, max_sweeps: int = 60):
  """One-sided (Hestenes) Jacobi SVD of `x [P, K]`: `x Q = W`, W orthogonal
  columns.

  Returns `(sigma [K], q [K, K], w [P, K])` with `x = W Q^T` and
  `sigma = |W_j|`. Column-graded matrices (`x = B D`, D diagonal, B well
  conditioned) get their singular values and vectors to high RELATIVE accuracy
  (Demmel & Veselic 1992), which a bidiagonalising SVD does not give.
  """
  w = np.array(x, np.float64, copy=True)
  k = w.shape[1]
  q = np.eye(k)
  for _ in range(max_sweeps):
    rotated = False
    for i, j in itertools.combinations(range(k), 2):
      alpha = float(w[:, i] @ w[:, i])
      beta = float(w[:, j] @ w[:, j])
      gamma = float(w[:, i] @ w[:, j])
      if alpha == 0 or beta == 0 or abs(gamma) <= EPS * np.sqrt(alpha * beta):
        continue
      rotated = True
      zeta = (beta - alpha) / (2.0 * gamma)
      t = np.sign(zeta) / (abs(zeta) + np.hypot(1.0, zeta))
      if zeta == 0:
        t = 1.0
      cs = 1.0 / np.hypot(1.0, t)
      sn = cs * t
      wi, wj = w[:, i].copy(), w[:, j].copy()
      w[:, i], w[:, j] = cs * wi - sn * wj, sn * wi + cs * wj
      qi, qj = q[:, i].copy(), q[:, j].copy()
      q[:, i], q[:, j] = cs * qi - sn * qj, sn * qi + cs * qj
    if not rotated:
      break
  sigma = np.array([_norm(w[:, j]) for j in range(k)])
  return sigma, q, w


ALIGNED_SCALE_MODES = ("min", "median", "rmse")


def aligned_mtl(g, scale_mode: str = "min", eps: float | None = None
                ) -> Solution:
  """Aligned-MTL (Senushkin et al. 2023): weights `B 1`.

  Definition: `M = V diag(lam) V^T`; eigenvalues `lam <= max(lam) K eps` are
  dropped (eps: float64's by default; pass `np.finfo(np.float32).eps` for the
  cutoff a float32 implementation applies); on the kept ones
  `B = sqrt(lam_R) V diag(lam)^(-1/2) V^T` with `lam_R` their minimum
  ("min"), LOWER median ("median") or mean ("rmse"); weights `B 1`, direction
  `(B 1) @ g = sqrt(lam_R) sum_kept (v_j . 1) b_j` (b_j the right singular
  vectors of g).

  Method: one-sided Jacobi SVD of `g^T` (`g = V S B^T`, `lam = S^2`), which is
  accurate in the RELATIVE sense for graded rows (`g = diag(n) U`, U well
  conditioned): small eigenvalues are as accurate as large ones, where
  `eigh(M)` or a bidiagonalising SVD would only give them to `eps lam_max`.

  Limits: at row-norm spreads beyond ~1/sqrt(K eps) (~3e7 in float64, ~1.4e3
  with float32's eps) the smallest eigenvalues fall under the cutoff BY
  DEFINITION, and the method ignores the corresponding directions. An
  eigenvalue within a factor of 10 of the cutoff makes the result depend on
  rounding: `well_posed` is then False (`info['cutoff_ratio']`). Rank-deficient
  inputs are fine (their null eigenvalues are far under the cutoff).
  `well_posed` is also False when the ones vector is (nearly) orthogonal to
  the kept eigenvectors, `|V_kept^T 1| <= CANCELLATION sqrt(K)`: B 1 is then
  rounding noise (e.g. rows `g, -g, g, -g`, where B 1 = 0 exactly).

  Degenerate inputs: zero rows get weight 0; all rows zero: `w = 0`, `d = 0`.

  Returns:
    `Solution`; `residual`: the Jacobi SVD's certificate, the largest of
    the orthogonality residuals `|b_i . b_j|` of the kept right singular
    vectors and the row-wise reconstruction errors `|g_i - (V S B^T)_i| /
    n_i` (the rest follows from the closed form). `info`: `eigenvalues`
    ([K], descending, of `M / n_max^2`), `kept` (bool [K] aligned with
    `eigenvalues`), `lam_r` (same units), `cutoff_ratio` (min over the
    nonzero eigenvalues of `max(lam/cut, cut/lam)`; inf if none).
  """
  if scale_mode not in ALIGNED_SCALE_MODES:
    raise ValueError(f"unknown scale_mode {scale_mode!r}")
  basis = _basis(g)
  k, p = basis.g.shape
  eps = EPS if eps is None else float(eps)
  top = float(np.max(basis.norms))
  if top == 0.0:
    return _solution(basis, np.zeros(k), np.zeros(p), 0.0, False,
                     dict(eigenvalues=np.zeros(k), kept=np.zeros(k, bool),
                          lam_r=0.0, cutoff_ratio=np.inf))
  gs = basis.g / top
  sigma, q, w = _jacobi_svd(gs.T)
  order = np.argsort(-sigma, kind="stable")
  sigma, q, w = sigma[order], q[:, order], w[:, order]
  lam = sigma ** 2
  cut = lam[0] * k * eps
  kept = lam > cut
  lam_kept = lam[kept]
  if scale_mode == "min":
    lam_r = float(np.min(lam_kept))
  elif scale_mode == "median":
    lam_r = float(np.sort(lam_kept)[(len(lam_kept) - 1) // 2])
  else:
    lam_r = float(np.mean(lam_kept))
  qk, sk, wk = q[:, kept], sigma[kept], w[:, kept]
  ones = qk.T @ np.ones(k)  # v_j . 1
  # 1 (nearly) orthogonal to the kept eigenvectors: B 1 is rounding noise.
  resolved = _norm(ones) > CANCELLATION * np.sqrt(k)
  weights = np.sqrt(lam_r) * (qk @ (ones / sk))  # B is scale invariant
  bk = wk / sk[None, :]  # right singular vectors [P, r]
  direction = np.sqrt(lam_r) * (bk @ ones) * top
  nzl = lam[lam > 0]
  cutoff_ratio = (float(np.exp(np.min(np.abs(np.log(nzl) - np.log(cut)))))
                  if nzl.size else np.inf)
  # The SVD's own certificate: orthogonal kept columns, and every row of g
  # reconstructed to its own relative accuracy (Jacobi's backward error).
  residual = 0.0
  for i, j in itertools.combinations(range(bk.shape[1]), 2):
    residual = max(residual, abs(float(bk[:, i] @ bk[:, j])))
  recon = q @ w.T - gs  # [K, P]
  for i in range(k):
    if basis.nonzero[i]:
      residual = max(residual, _norm(recon[i]) / (basis.norms[i] / top))
  return _solution(basis, weights, direction, residual,
                   cutoff_ratio > 10.0 and resolved and _norm(direction) > 0,
                   dict(eigenvalues=lam, kept=kept, lam_r=lam_r,
                        cutoff_ratio=cutoff_ratio))


# --------------------------------------------------------------------------
# ConFIG.


def config(g, rcond: float | None = None) -> Solution:
  """ConFIG (Liu et al. 2025) with its default EqualWeight/ProjectionLength.

  Definition: `x = U^+ 1` (minimum-norm least squares), `u = x / |x|`,
  `d = (sum_i g_i . u) u`. As weights: `x = U^T y`, `y = C^+ 1`, so
  `x = G^T (y / n)` and `w = (sum_i g_i . u) / |x| * y / n`.

  Method: SVD of U (well conditioned: unit rows), singular values at most
  `rcond * max` dropped. The default `rcond = 1e-8` sits between float64
  rounding noise (the singular values of a rank-deficient U come out
  ~1e-16) and any singular value a float32 implementation resolves (one
  working on `C = U U^T` cuts U's singular values near `sqrt(10 K eps32)` ~
  3e-3), so that where `well_posed` is True every reasonable cutoff (LAPACK
  lstsq's `K eps` in float64 included) gives the same x.

  Degenerate inputs: zero rows have `u_i = 0`: they drop out of the least
  squares, weight 0. All rows zero: `w = 0`, `d = 0`. `well_posed` False
  when a singular value of U lies in the gray zone `(1e3 K eps64, 1e-2)`
  relative to the largest (the result then depends on the cutoff), when the
  projection of the ones vector on U's column space is below
  `CANCELLATION sqrt(K)` (x is then rounding noise; exactly 0 gives
  `w = 0`, `d = 0`, e.g. two opposite rows), or d = 0.

  Returns:
    `Solution`; `residual` = `|U^T (U x - 1)| / (sqrt(K) max(1, |x|))` (the
    normal equations; for full row rank this is `U x = 1`, i.e. equal
    cosines). `info`: `x` (U^+ 1), `rank`, `singular_values` (of U).
  """
  basis = _basis(g)
  k, p = basis.g.shape
  n, u = basis.norms, basis.units
  if not basis.nonzero.any():
    return _solution(basis, np.zeros(k), np.zeros(p), 0.0, False,
                     dict(x=np.zeros(p), rank=0, singular_values=np.zeros(0)))
  rcond = 1e-8 if rcond is None else float(rcond)
  left, sv, vt = np.linalg.svd(u, full_matrices=False)
  cut = rcond * sv[0]
  kept = sv > cut
  ones = left[:, kept].T @ np.ones(k)
  # 1 (nearly) orthogonal to U's column space: x is 0 or rounding noise.
  resolved = _norm(ones) > CANCELLATION * np.sqrt(k)
  x = vt[kept].T @ (ones / sv[kept])
  y = left[:, kept] @ (ones / sv[kept] ** 2)
  xn = _norm(x)
  if xn == 0.0:
    return _solution(basis, np.zeros(k), np.zeros(p), 0.0, False,
                     dict(x=x, rank=int(kept.sum()), singular_values=sv))
  unit = x / xn
  proj = float((n * (u @ unit)).sum())  # sum_i g_i . unit
  direction = proj * unit
  w = np.zeros(k)
  nz = basis.nonzero
  w[nz] = proj / xn * y[nz] / n[nz]
  residual = _norm(u.T @ (u @ x - 1.0)) / (np.sqrt(k) * max(1.0, xn))
  rel = sv / sv[0]
  gray = np.any((rel > 1e3 * k * EPS) & (rel < 1e-2))
  return _solution(basis, w, direction, residual,
                   (not gray) and resolved and proj != 0.0,
                   dict(x=x, rank=int(kept.sum()), singular_values=sv))
