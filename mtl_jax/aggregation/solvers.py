"""Small jit-able solvers on the `[K, K]` Gram matrix of the task gradients.

Gradient aggregators (MGDA, UPGrad, DualProj, CAGrad, Nash-MTL) reduce to
small optimisation problems over K task weights whose only data is the Gram
matrix `M = G G^T` of the `[K, P]` gradient matrix. These solvers never touch
`P`, run inside a jitted train step (fixed shapes, `lax.while_loop` with an
iteration cap, no host callbacks) and take a `present: bool [K]` mask: an
absent task's weight is fixed to 0 and its row and column of `M` are ignored,
so the result equals the one on the sub-matrix of present tasks (up to float
rounding).

The cosine basis. Task gradients routinely differ in norm by many orders of
magnitude (a regression loss next to a classification loss, a task near
convergence). A weight `a_k` then matters only relative to `1 / |g_k|`, and a
solver that works on `M` with absolute tolerances on the weights loses the
small weights of large gradients, which can flip the sign of `g_k . d`. Every
solver here therefore factors `M = N C N` with `N = diag(|g_k|)` and the
cosine matrix `C` (unit diagonal, entries in [-1, 1]) and solves for
`s = N a`, the weights of the UNIT gradients: in these variables each problem
is as well conditioned as `C`, whatever the spread of the norms, and the
direction is `d = G^T a = U^T s` (`U` the unit gradients). Norms are divided
by the smallest nonzero one so that nothing under- or overflows.

Algorithms. The two constrained QPs (`min_norm_simplex`,
`project_to_dual_cone`) and CAGrad's dual (`cagrad_dual`) are solved by one
primal active-set Newton method (`_active_set`, Nocedal & Wright 2006,
Algorithm 16.3, with a Newton step and an Armijo line search on the face for
the non-quadratic CAGrad objective): starting from a feasible point, each
iteration minimises over the current face (bounds fixed on the working set),
stops at the first bound it hits (which joins the working set), and once the
face is optimal frees the bound with the most negative multiplier, until every
multiplier is non-negative. It terminates with the KKT conditions satisfied
to rounding, and never leaves the feasible set. `nash_bargaining` uses damped
Newton steps on a self-concordant barrier.

Certificates. Each iterative solver can return a `SolverInfo` (iterations
used, the final KKT residual relative to the problem's scale, and whether it
is below tolerance) with `return_info=True`; under `jit`, callers that do not
ask for it pay nothing (the extra outputs are dead code). The residual is
defined per solver in its docstring. The closed forms of IMTL-G, ConFIG and
Aligned-MTL (`imtl_g_weights`, `config_weights`, `aligned_mtl_weights`) return
the same `SolverInfo` for the equality each method defines.

Dtypes. Every solver computes in the Gram matrix's floating dtype (float64
when the caller passes float64 with `jax_enable_x64` on, float32 otherwise,
float32 for lower precisions) and returns weights of that dtype.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from mtl_jax.aggregation.base import float_dtype

_HIGHEST = jax.lax.Precision.HIGHEST


class SolverInfo(NamedTuple):
  """What an iterative solver did, for callers that want to check it.

  Attributes:
    iterations: int32 scalar, iterations used (active-set or Newton steps).
    residual: scalar, the solver's certificate: its KKT residual (or the
      residual of the equation the method defines), relative to the
      problem's scale; see each solver's docstring.
    converged: bool scalar, `residual` is within the solver's tolerance (a
      small multiple of the dtype's epsilon) and the iteration cap was not
      reached.
  """

  iterations: jax.Array
  residual: jax.Array
  converged: jax.Array


def _eps(dtype) -> float:
  return float(jnp.finfo(dtype).eps)


def _mv(m: jax.Array, x: jax.Array) -> jax.Array:
  """`m @ x` at full precision (no TF32 passes on GPU)."""
  return jnp.matmul(m, x, precision=_HIGHEST)


def _present_or_all(present: jax.Array | None, num_tasks: int) -> jax.Array:
  if present is None:
    return jnp.ones((num_tasks,), bool)
  return jnp.asarray(present, bool)


def normalised_gram(m: jax.Array, present: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masks, symmetrises and scales the Gram matrix.

  Args:
    m: `[K, K]` Gram matrix.
    present: `bool [K]`.

  Returns:
    `(mn [K, K], scale [], nonzero [])`: `mn = m / scale` with absent rows and
    columns zeroed and `scale` the largest present diagonal entry (so
    `|mn_ij| <= 1`); `nonzero` is False when every present row is zero (then
    `mn` is all zeros and `scale` is meaningless).
  """
  m = jnp.asarray(m, float_dtype(m))
  both = present[:, None] & present[None, :]
  m = jnp.where(both, 0.5 * (m + m.T), 0.0)  # [K, K]
  scale = jnp.max(jnp.where(present, jnp.diagonal(m), 0.0))
  nonzero = (scale > 0) & jnp.isfinite(scale)
  mn = jnp.where(nonzero, m / jnp.where(nonzero, scale, 1.0), 0.0)
  return mn, scale, nonzero


class CosineBasis(NamedTuple):
  """`M = N C N` on the present tasks with nonzero gradients.

  Attributes:
    cos: `[K, K]` cosine matrix `C`: unit diagonal and entries in [-1, 1] on
      `nonzero` tasks, zero rows and columns elsewhere.
    norms: `[K]` gradient norms divided by the smallest nonzero one (so
      >= 1), 1 where not `nonzero`.
    unit: the smallest nonzero norm, in the units of `M` (1 if none).
    nonzero: `bool [K]`, present tasks whose gradient is not zero.
  """

  cos: jax.Array
  norms: jax.Array
  unit: jax.Array
  nonzero: jax.Array


def cosine_basis(m: jax.Array, present: jax.Array) -> CosineBasis:
  """Factors the (masked, symmetrised) Gram matrix as `N C N`.

  Entries are formed as `(m_ij / n_i) / n_j`, which neither over- nor
  underflows where `m` itself is representable (`|m_ij| <= n_i n_j`).

  Args:
    m: `[K, K]` symmetric PSD Gram matrix, any scale, float32 or float64.
    present: `bool [K]`.

  Returns:
    The `CosineBasis`.
  """
  dtype = float_dtype(m)
  m = jnp.asarray(m, dtype)
  both = present[:, None] & present[None, :]
  m = jnp.where(both, 0.5 * (m + m.T), 0.0)  # [K, K]
  diag = jnp.diagonal(m)
  nonzero = present & (diag > 0) & jnp.isfinite(diag)
  n = jnp.sqrt(jnp.where(nonzero, diag, 1.0))  # [K]
  inv = jnp.where(nonzero, 1.0 / n, 0.0)
  cos = (m * inv[:, None]) * inv[None, :]
  cos = jnp.where(nonzero[:, None] & nonzero[None, :],
                  jnp.clip(cos, -1.0, 1.0), 0.0)
  cos = jnp.where(jnp.eye(m.shape[0], dtype=bool), nonzero.astype(dtype), cos)
  unit = jnp.min(jnp.where(nonzero, n, jnp.inf))
  unit = jnp.where(jnp.isfinite(unit), unit, 1.0)
  norms = jnp.where(nonzero, n / unit, 1.0)
  return CosineBasis(cos, norms, unit, nonzero)


def combination_norm(basis: CosineBasis, w: jax.Array) -> jax.Array:
  """`|G^T w| / basis.unit`: the norm of a weighted sum of the gradients,
  from the cosine basis (no cancellation between terms of different
  magnitudes in `w^T M w`)."""
  s = jnp.where(basis.nonzero, basis.norms * w, 0.0)
  return jnp.sqrt(jnp.maximum(jnp.vdot(s, _mv(basis.cos, s)), 0.0))


def project_simplex(y: jax.Array, present: jax.Array | None = None
                    ) -> jax.Array:
  """Euclidean projection onto the simplex of the present coordinates.

  `x = max(y - theta, 0)` with the threshold that makes the present
  coordinates sum to one. With `u` the present values sorted decreasingly,
  `theta = max_j (u_1 + ... + u_j - 1) / j` (the classic sort-based rule of
  Held et al. 1974 picks the same `j`, see Condat 2016); the prefix sums are
  formed by pairwise comparisons instead of a sort, O(K^2) work that is
  trivial for K <= 100 and compiles and vectorises better than a sort.

  Args:
    y: `[K]` point to project.
    present: `bool [K]` (default: all present).

  Returns:
    `[K]`: non-negative, zero on absent coordinates, summing to 1 over the
    present ones (all zeros if no coordinate is present).
  """
  y = jnp.asarray(y, float_dtype(y))
  present = _present_or_all(present, y.shape[-1])
  # above[i, j]: j is present and y_j >= y_i, i.e. j is in the prefix of the
  # sorted order that ends at i (ties included, which only drops candidate
  # prefixes that cannot be the maximiser).
  above = present[None, :] & (y[None, :] >= y[:, None])  # [K, K]
  prefix_sum = jnp.sum(jnp.where(above, y[None, :], 0.0), axis=1)  # [K]
  prefix_len = jnp.maximum(jnp.sum(above, axis=1), 1)  # [K]
  candidates = jnp.where(present, (prefix_sum - 1.0) / prefix_len, -jnp.inf)
  theta = jnp.max(candidates)
  return jnp.where(present, jnp.maximum(y - theta, 0.0), 0.0)


# --------------------------------------------------------------------------
# The active-set Newton method.
# --------------------------------------------------------------------------

# Line-search candidates: the longest feasible step times 1, 1/2, 1/4, ...
_NUM_HALVINGS = 40


class _Problem(NamedTuple):
  """`min f(s)` s.t. `s_i >= lower_i` on `movable` coordinates, `s_i =
  lower_i` elsewhere, and (if `r` is not None) `r . s` fixed.

  `fgh(s) -> (f, grad [K], hess [K, K], scale)` gives the objective, its
  derivatives and the magnitude of the terms that make up the gradient (the
  unit of its rounding errors). `quadratic` says that one Newton step
  reaches the minimiser of a face.
  """

  fgh: Callable[[jax.Array], tuple[jax.Array, ...]]
  lower: jax.Array
  movable: jax.Array
  r: jax.Array | None
  quadratic: bool


def _half_quadratic(c: jax.Array):
  """`fgh` of `0.5 s^T C s` for a matrix with entries in [-1, 1] (the
  magnitude of `C s`'s terms is `|s|_1`)."""

  def fgh(s):
    cs = _mv(c, s)
    return 0.5 * jnp.vdot(s, cs), cs, c, jnp.sum(jnp.abs(s))

  return fgh


def _newton_on_face(hess, grad, free, r, dtype):
  """Newton step on the face `{s_i fixed for i not free, r . s fixed}`.

  Solves `[H_FF, r_F; r_F^T, 0] [step; nu] = [-g_F; 0]` (the `r` row only if
  `r` is given). A singular `H_FF` (dependent gradients: the face minimiser
  is not unique) is handled by a proximal term `delta I` whose bias is
  removed by three rounds of iterated refinement on the unregularised system,
  all with one LU factorisation.

  Returns:
    `step [K]` (zero on fixed coordinates).
  """
  k = grad.shape[0]
  ff = free[:, None] & free[None, :]
  h = jnp.where(ff, hess, 0.0)
  delta = 128 * _eps(dtype) * jnp.maximum(jnp.max(jnp.abs(h)),
                                          jnp.finfo(dtype).tiny)
  eye = jnp.eye(k, dtype=dtype)
  fixed_rows = jnp.diag(jnp.where(free, 0.0, 1.0).astype(dtype))
  if r is None:
    a = h + fixed_rows
    a_reg = a + delta * eye * free
    b = jnp.where(free, -grad, 0.0)
  else:
    # The row only says r_F . step = 0: scale it to unit size for pivoting.
    rf = jnp.where(free, r, 0.0)
    rf = rf / jnp.maximum(jnp.max(jnp.abs(rf)), jnp.finfo(dtype).tiny)
    zero = jnp.zeros((1, 1), dtype)
    a = jnp.block([[h + fixed_rows, rf[:, None]], [rf[None, :], zero]])
    reg = jnp.concatenate([delta * free.astype(dtype), jnp.zeros((1,), dtype)])
    a_reg = a + jnp.diag(reg)
    b = jnp.concatenate([jnp.where(free, -grad, 0.0), jnp.zeros((1,), dtype)])
  lu = jsl.lu_factor(a_reg)
  x = jsl.lu_solve(lu, b)
  for _ in range(3):
    x = x + jsl.lu_solve(lu, b - _mv(a, x))
  return jnp.where(free, x[:k], 0.0)


def _multipliers(grad, nu, problem):
  """Multipliers of the bounds: `grad + nu r` (the stationarity residual on
  free coordinates, the bound multipliers on fixed ones)."""
  return grad if problem.r is None else grad + nu * problem.r


def _kkt_residual(s, free, grad, nu, scale, problem):
  """Largest violation of stationarity (free coordinates) and of the sign of
  the multipliers (fixed ones), relative to the gradient's magnitude."""
  mult = _multipliers(grad, nu, problem)
  stationarity = jnp.where(free, jnp.abs(mult), 0.0)
  sign = jnp.where(problem.movable & ~free, jnp.maximum(-mult, 0.0), 0.0)
  below = jnp.where(problem.movable, jnp.maximum(problem.lower - s, 0.0), 0.0)
  worst = jnp.max(jnp.maximum(jnp.maximum(stationarity, sign), below))
  return worst / jnp.maximum(scale, jnp.finfo(s.dtype).tiny)


def _least_squares_nu(grad, free, problem):
  """`nu` minimising `|g_F + nu r_F|` (the multiplier at a face optimum)."""
  if problem.r is None:
    return jnp.zeros((), grad.dtype)
  rf = jnp.where(free, problem.r, 0.0)
  return -jnp.vdot(rf, jnp.where(free, grad, 0.0)) / jnp.maximum(
      jnp.vdot(rf, rf), jnp.finfo(grad.dtype).tiny)


def _step_length(problem, s, free, step, f, decrement, grad_tol, halvings):
  """The step `t` along `step` and the coordinates whose bound stops it.

  `t` is the longest step up to 1 that crosses no bound; for non-quadratic
  objectives, the longest of its halvings that passes Armijo's test or (where
  rounding hides f's decrease on a flat face) along which the slope is still
  <= 0 up to its rounding: f is convex, so it decreased all the way to t.

  Returns:
    `(t, hit)`: the step length and `bool [K]`, the free coordinates that
    reach their bound.
  """
  leaving = free & (step < 0)
  room = jnp.where(leaving, (s - problem.lower) / jnp.where(leaving, -step,
                                                            1.0), jnp.inf)
  t_max = jnp.clip(jnp.min(room), 0.0, 1.0)
  if problem.quadratic:
    t = t_max
  else:
    ts = t_max * halvings  # [J]

    def value_and_slope(t):
      f_t, grad_t, _, _ = problem.fgh(s + t * step)
      return f_t, jnp.vdot(grad_t, step)

    f_new, slopes = jax.vmap(value_and_slope)(ts)
    ok = ((f_new <= f - 1e-4 * ts * decrement)
          | (slopes <= grad_tol * jnp.sum(jnp.abs(step))))
    t = jnp.max(jnp.where(ok, ts, 0.0))
  return t, leaving & (room <= t)


def _active_set(problem: _Problem, s0: jax.Array, free0: jax.Array,
                max_iters: int) -> tuple[jax.Array, SolverInfo]:
  """Primal active-set Newton method from the feasible point `s0`.

  Each iteration either
  * (face not yet optimal) takes a Newton step on the current face, as long as
    possible up to 1 without crossing a bound (with backtracking on `f` for
    non-quadratic objectives); a coordinate whose bound stops the step leaves
    the free set; or
  * (face optimal: the line search stalled at rounding level, or the Newton
    decrement is far below f's rounding level; for a quadratic, also right
    after a full Newton step, in the same iteration) checks the multipliers of
    the fixed coordinates: the most negative one below `-tol` is freed;
    if there is none, the point satisfies the KKT conditions and the loop
    ends.
  The objective never increases, so no working set repeats with a higher
  value; `max_iters` caps degenerate cycling.

  Returns:
    `(s, info)`: a feasible point and its certificate (`_kkt_residual`).
  """
  dtype = s0.dtype
  k = s0.shape[0]
  eps = _eps(dtype)
  tol = 32 * k * eps
  halvings = 0.5 ** jnp.arange(_NUM_HALVINGS, dtype=dtype)  # [J]

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_iters) & ~done

  def check(s, free):
    """At a face optimum: the free set with the most violated bound freed,
    and whether none is violated (the KKT conditions hold)."""
    _, grad, _, scale = problem.fgh(s)
    nu = _least_squares_nu(grad, free, problem)
    mult = _multipliers(grad, nu, problem)
    candidates = problem.movable & ~free
    worst = jnp.argmin(jnp.where(candidates, mult, jnp.inf))
    violated = jnp.any(candidates & (mult < -tol * scale))
    return free.at[worst].set(free[worst] | violated), ~violated

  def body(carry):
    i, s, free, face_opt, _ = carry
    f, grad, hess, scale = problem.fgh(s)
    step = _newton_on_face(hess, grad, free, problem.r, dtype)
    # Face optimal: after a stalled line search, or once the Newton decrement
    # is far below f's rounding level (Newton converges quadratically: one
    # more step would be at rounding).
    decrement = -jnp.vdot(grad, step)
    size = jnp.abs(f) + scale * jnp.sum(jnp.abs(s))
    at_opt = face_opt | (decrement <= (8 * eps) ** 2 * size)
    free_opt, kkt_opt = check(s, free)
    # Otherwise: a step towards the face minimiser, up to the first bound.
    t, hit = _step_length(problem, s, free, step, f, decrement,
                          tol * scale, halvings)
    s_new = jnp.where(hit, problem.lower, s + t * step)
    s_new = jnp.where(problem.movable, jnp.maximum(s_new, problem.lower),
                      problem.lower)
    finite = jnp.all(jnp.isfinite(s_new))
    stalled = ~jnp.any(hit) & ((t <= 0) | ~finite)
    # A full step of a quadratic lands on the face minimiser: check it now.
    full = (problem.quadratic & (t >= 1.0) & ~jnp.any(hit) & finite
            & ~at_opt)
    free_full, kkt_full = check(s_new, free)
    s_next = jnp.where(at_opt | ~finite, s, s_new)
    free_next = jnp.where(at_opt, free_opt,
                          jnp.where(full, free_full, free & ~hit))
    done = jnp.where(at_opt, kkt_opt, full & kkt_full)
    return i + 1, s_next, free_next, ~at_opt & stalled, done

  init = (jnp.zeros((), jnp.int32), s0, free0, jnp.zeros((), bool),
          jnp.zeros((), bool))
  iters, s, free, _, done = jax.lax.while_loop(cond, body, init)
  _, grad, _, scale = problem.fgh(s)
  free = free & problem.movable & (s > problem.lower)
  nu = _least_squares_nu(grad, free, problem)
  residual = _kkt_residual(s, free, grad, nu, scale, problem)
  info = SolverInfo(iters, residual, done & (residual <= 4 * tol))
  return s, info


def _finish(w, info, present, zero_grad, use_zero, return_info):
  """Simplex weights, or (where `use_zero`) uniform weights on the present
  tasks with a zero gradient, whose direction 0 is then optimal (certified
  by construction); 0 on absent tasks."""
  dtype = w.dtype
  uniform = zero_grad / jnp.maximum(jnp.sum(zero_grad), 1)
  w = jnp.where(present, jnp.where(use_zero, uniform, w), 0.0).astype(dtype)
  if not return_info:
    return w
  return w, info._replace(
      residual=jnp.where(use_zero, 0.0, info.residual).astype(dtype),
      converged=info.converged | use_zero)


# --------------------------------------------------------------------------
# Min-norm point on the simplex (MGDA).
# --------------------------------------------------------------------------


def min_norm_simplex(m: jax.Array, present: jax.Array | None = None, *,
                     max_iters: int | None = None, return_info: bool = False):
  """MGDA's min-norm point: `argmin_{alpha in simplex} alpha^T M alpha`.

  The simplex is over the present tasks (absent weights are 0). With
  `M = G G^T`, `G^T alpha` is the point of minimum norm in the convex hull of
  the present task gradients (Sener & Koltun, 2018). Solved in the cosine
  basis (module docstring): `min s^T C s` s.t. `s >= 0`, `sum_k s_k / n_k =
  1`, by the active-set method from the vertex of the shortest gradient.

  Certificate (`SolverInfo.residual`): the KKT conditions `(C s)_k >= lambda
  / n_k` for every task, with equality on the support (`lambda = s^T C s`),
  i.e. `g_k . d >= |d|^2`, violated by at most the residual times the
  magnitude of `C s`'s terms. So `g_k . d >= 0` up to rounding: an MGDA step
  increases no task's loss.

  Args:
    m: `[K, K]` symmetric PSD Gram matrix, any scale, float32 or float64.
    present: `bool [K]` (default: all tasks present).
    max_iters: cap on active-set iterations (default `4 K + 10`; a solution
      with support S takes about `|S|` plus one per bound it meets).
    return_info: also return the `SolverInfo`.

  Returns:
    `alpha [K]` (and the info): `alpha >= 0`, summing to 1 over present
    tasks, 0 on absent ones. If a present gradient is zero (0 is then in the
    hull) the zero-gradient tasks share the weight equally and the direction
    is 0; with no task present, all zeros.
  """
  k = m.shape[-1]
  present = _present_or_all(present, k)
  basis = cosine_basis(m, present)
  c, n, nonzero = basis.cos, basis.norms, basis.nonzero
  dtype = c.dtype
  r = jnp.where(nonzero, 1.0 / n, 0.0)  # [K], in (0, 1]
  problem = _Problem(_half_quadratic(c), jnp.zeros((k,), dtype), nonzero, r,
                     quadratic=True)
  # The vertex of the shortest gradient (norm 1 in these units).
  first = jnp.argmin(jnp.where(nonzero, n, jnp.inf))
  s0 = jnp.where(jnp.arange(k) == first, n, 0.0).astype(dtype)
  s0 = jnp.where(nonzero, s0, 0.0)
  iters = 4 * k + 10 if max_iters is None else max_iters
  s, info = _active_set(problem, s0, jnp.arange(k) == first, iters)
  alpha = s * r
  alpha = alpha / jnp.maximum(jnp.sum(alpha), jnp.finfo(dtype).tiny)
  zero_grad = present & ~nonzero
  return _finish(alpha, info, present, zero_grad, jnp.any(zero_grad),
                 return_info)


# --------------------------------------------------------------------------
# Projection onto the dual cone (UPGrad, DualProj).
# --------------------------------------------------------------------------


def project_to_dual_cone(v: jax.Array, m: jax.Array,
                         present: jax.Array | None = None, *,
                         max_iters: int | None = None,
                         return_info: bool = False):
  """Weights of the projection of `G^T v` onto the dual cone of the rows of G.

  The dual cone is `{x : G x >= 0}` (present rows only). By Proposition 1 of
  Quinton & Rey (2024, "Jacobian descent for multi-objective optimization"),
  the projection is `G^T w` with

    w = argmin_{w >= v} w^T M w,   M = G G^T,

  a box-constrained QP in K variables (TorchJD solves it with quadprog on the
  trace-normalised `M + 1e-4 I`; here it is solved exactly, without the
  ridge: the projection `G^T w` is unique even where `w` is not). Solved in
  the cosine basis (`w = s / n`, bounds `s >= n v`) by the active-set method
  from `w = v`.

  Certificate (`SolverInfo.residual`): `(C s)_k >= 0` for every present task
  (the projection is in the dual cone: `g_k . d >= 0`), with equality where
  `w_k > v_k`, relative to the magnitude of `C s`'s terms.

  Args:
    v: `[K]` weights of the vector to project.
    m: `[K, K]` symmetric PSD Gram matrix, any scale.
    present: `bool [K]` (default: all). Absent coordinates of `v` are ignored
      and their weight is 0.
    max_iters: cap on active-set iterations (default `4 K + 10`).
    return_info: also return the `SolverInfo`.

  Returns:
    `w [K]` (and the info) with `w >= v` on present tasks and 0 on absent
    ones. A present task with a zero gradient keeps `w_k = v_k` (its weight
    does not change the projection).
  """
  k = m.shape[-1]
  present = _present_or_all(present, k)
  basis = cosine_basis(m, present)
  c, n, nonzero = basis.cos, basis.norms, basis.nonzero
  dtype = c.dtype
  v = jnp.where(present, jnp.asarray(v, dtype), 0.0)
  # The problem is positively homogeneous in v: solve for v / max|v n|.
  t = v * n
  t_scale = jnp.max(jnp.abs(t))
  t_scale = jnp.where(t_scale > 0, t_scale, 1.0)
  t = t / t_scale

  problem = _Problem(_half_quadratic(c), t, nonzero, None, quadratic=True)
  iters = 4 * k + 10 if max_iters is None else max_iters
  s, info = _active_set(problem, t, jnp.zeros((k,), bool), iters)
  w = jnp.where(nonzero, s * t_scale / n, v)
  w = jnp.where(present, w, 0.0).astype(dtype)
  if return_info:
    return w, info
  return w


# --------------------------------------------------------------------------
# CAGrad's dual.
# --------------------------------------------------------------------------


def cagrad_dual(m: jax.Array, present: jax.Array | None = None, *,
                c: float = 0.4, max_iters: int | None = None,
                return_info: bool = False):
  """Solves CAGrad's dual `min_{w in simplex} w^T M b + r sqrt(w^T M w)`.

  Here `b` is the uniform weight vector over present tasks (so `M b` holds
  the `g_k . g0`) and `r = c |g0|` (Liu et al., 2021). The objective is
  convex (linear plus a norm) and smooth away from `g_w = 0`. In the cosine
  basis (`s = N w`, module docstring) it reads `s . h + r |U^T s|` with
  `h = C N b`, subject to `s >= 0` and `sum_k s_k / n_k = 1`, and is solved by
  the active-set method with Newton steps (Hessian
  `r / q (C - C s s^T C / q^2)`, `q = |U^T s|`) and Armijo backtracking,
  from the best vertex.

  Certificate (`SolverInfo.residual`): the KKT conditions of the problem in
  `s` (stationarity on the support, non-negative multipliers elsewhere),
  relative to the magnitude of the gradient's terms `|h| + r`.

  Args:
    m: `[K, K]` symmetric PSD Gram matrix, any scale.
    present: `bool [K]` (default: all). Absent tasks get weight 0 and are left
      out of `g0`.
    c: CAGrad's `c >= 0`.
    max_iters: cap on iterations (default `6 K + 20`).
    return_info: also return the `SolverInfo`.

  Returns:
    `w [K]` (and the info) on the simplex of present tasks. If the minimum is
    at `g_w = 0` (0 in the convex hull and no better point) the weights are
    not unique; then the present tasks with a zero gradient share the weight
    if there are any, and otherwise the solver's point is returned (its
    `|g_w|` is 0 to rounding).
  """
  k = m.shape[-1]
  present = _present_or_all(present, k)
  basis = cosine_basis(m, present)
  cm, n, nonzero = basis.cos, basis.norms, basis.nonzero
  dtype = cm.dtype
  num_present = jnp.maximum(jnp.sum(present), 1)
  b = present.astype(dtype) / num_present  # [K]
  nb = jnp.where(nonzero, n * b, 0.0)  # g0 = U^T (N b), in units
  h = _mv(cm, nb)  # [K]: u_k . g0
  radius = c * jnp.sqrt(jnp.maximum(jnp.vdot(nb, h), 0.0))
  # Divide the objective by the size of its terms (the minimiser is the same).
  size = jnp.maximum(jnp.max(jnp.abs(h)) + radius, jnp.finfo(dtype).tiny)
  h = h / size
  radius = radius / size
  r = jnp.where(nonzero, 1.0 / n, 0.0)
  tiny = jnp.finfo(dtype).tiny

  def fgh(s):
    cs = _mv(cm, s)
    q = jnp.sqrt(jnp.maximum(jnp.vdot(s, cs), 0.0))
    qs = jnp.maximum(q, tiny)
    f = jnp.vdot(s, h) + radius * q
    grad = h + radius * cs / qs
    hess = (radius / qs) * (cm - jnp.outer(cs, cs) / (qs * qs))
    return f, grad, hess, jnp.max(jnp.abs(h)) + radius

  problem = _Problem(fgh, jnp.zeros((k,), dtype), nonzero, r,
                     quadratic=False)
  # The best vertex: s = n_k e_k has value n_k (h_k + radius).
  vertex_values = jnp.where(nonzero, n * (h + radius), jnp.inf)
  first = jnp.argmin(vertex_values)
  s0 = jnp.where((jnp.arange(k) == first) & nonzero, n, 0.0).astype(dtype)
  iters = 6 * k + 20 if max_iters is None else max_iters
  s, info = _active_set(problem, s0, jnp.arange(k) == first, iters)
  w = s * r
  w = w / jnp.maximum(jnp.sum(w), tiny)
  # A zero gradient gives the value 0; it wins when no point is below 0.
  zero_grad = present & ~nonzero
  f_opt = problem.fgh(s)[0]
  use_zero = jnp.any(zero_grad) & ((f_opt >= 0) | ~jnp.any(nonzero))
  return _finish(w, info, present, zero_grad, use_zero, return_info)


# --------------------------------------------------------------------------
# Nash bargaining (Nash-MTL).
# --------------------------------------------------------------------------


def nash_bargaining(m: jax.Array, present: jax.Array | None = None, *,
                    iters: int = 100, ridge: float = 1e-6,
                    return_info: bool = False):
  """Nash bargaining weights: `alpha > 0` with `M alpha = 1 / alpha`.

  Navon et al. (2022, Nash-MTL) characterise the bargaining solution by
  `(G^T alpha) . g_i = 1 / alpha_i` for every task i, i.e. `alpha_i (M
  alpha)_i = 1`. In the cosine basis `s = N alpha` this is `s_i (C s)_i = 1`:
  the solution is `s / n` with `s` independent of the norms, so norm spreads
  cost no accuracy. `s` is the stationary point of the strictly convex,
  self-concordant

    phi(s) = 0.5 s^T C s - sum_i log s_i,

  minimised by Newton's method: each step is damped to `1 / (1 + lambda)`
  while the Newton decrement `lambda` is >= 1/4 (which keeps `s > 0` and
  guarantees descent for self-concordant functions), lengthened to the
  largest of 1, 1/2, 1/4, ... that keeps `s > 0` and passes Armijo's test
  when that is longer, and full once `lambda < 1/4` (quadratic convergence).
  At most `iters` steps; stops at `lambda^2 < 1e-12` (float32) or its
  float64 counterpart.

  Regularisation: if C is singular with a non-negative null direction (a zero
  gradient, or `g_1 = -g_2`), `phi` is unbounded below and no solution
  exists; rounding of `C s` can have the same effect on nearly singular C.
  Newton's method therefore first minimises `phi + 0.5 * ridge * |s|^2`
  (i.e. uses `C + ridge * I`), so that a degenerate direction gets a large
  but finite weight (`~1 / sqrt(ridge)`). Then up to three plain Newton steps
  on the unregularised `phi` remove the ridge's bias (`~ridge * s_i^2` in
  `s_i (C s)_i`); each is kept only if it moves no weight by more than 1% and
  reduces the residual `max_i |s_i (C s)_i - 1|`, which holds when an exact
  solution lies near the regularised one, and fails (keeping the regularised
  weights) when C is singular.

  Certificate (`SolverInfo.residual`): `max_i |s_i (C s)_i - 1|`, the
  bargaining equation's relative residual; above tolerance exactly when the
  ridge had to stay (no solution exists).

  Args:
    m: `[K, K]` symmetric PSD Gram matrix, any scale.
    present: `bool [K]` (default: all). Absent tasks get weight 0 and do not
      influence the others.
    iters: maximum number of Newton steps on the regularised problem.
    ridge: relative Tikhonov regularisation, see above.
    return_info: also return the `SolverInfo`.

  Returns:
    `alpha [K]` (and the info), > 0 on present tasks, 0 on absent ones; all
    zeros if every present row of `M` is zero (no bargaining solution exists).
    A present task with a zero gradient gets the ridge's finite weight.
  """
  k = m.shape[-1]
  present = _present_or_all(present, k)
  basis = cosine_basis(m, present)
  dtype = basis.cos.dtype
  pf = present.astype(dtype)
  # Absent tasks get an identity row: their weight decouples (and is 1).
  cr = basis.cos + jnp.diag(1.0 - pf)  # [K, K]
  # The ridge stays out of `cr` so that rounding does not lose it against
  # diagonal entries of size 1.
  reg = ridge * pf  # [K]
  used, a_reg = _nash_newton(cr, reg, iters)
  s = _nash_unbias(cr, present, a_reg)
  any_nonzero = jnp.any(basis.nonzero)
  # alpha = s / |g| in M's units: |g| = norms * unit.
  alpha = s / (basis.norms * basis.unit)
  alpha = jnp.where(present & any_nonzero, alpha, 0.0).astype(dtype)
  if return_info:
    res = _nash_residual(cr, present, s)
    tol = 64 * k * _eps(dtype)
    info = SolverInfo(used + 3, res, (res <= tol) | ~any_nonzero)
    return alpha, info
  return alpha


def _nash_newton_step(cr: jax.Array, reg: jax.Array, a: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
  """The Newton step of `phi + 0.5 |sqrt(reg) s|^2` at `a`, and the squared
  Newton decrement."""
  grad = _mv(cr, a) + reg * a - 1.0 / a  # [K]
  hess = cr + jnp.diag(reg + 1.0 / (a * a))  # [K, K], positive definite
  delta = -jnp.linalg.solve(hess, grad)
  return delta, jnp.maximum(-jnp.vdot(grad, delta), 0.0)


def _nash_newton(cr: jax.Array, reg: jax.Array, iters: int
                 ) -> tuple[jax.Array, jax.Array]:
  """`(steps used, s)`: damped Newton with line search on the regularised
  `phi(s) = 0.5 s^T (C + diag(reg)) s - sum_i log s_i` (see
  `nash_bargaining`)."""
  dtype = cr.dtype
  stop = 1e-12 if dtype == jnp.float32 else 1e-24

  def phi(a):
    return (0.5 * jnp.vdot(a, _mv(cr, a)) + 0.5 * jnp.vdot(reg * a, a)
            - jnp.sum(jnp.log(a)))

  def cond(carry):
    i, _, done = carry
    return (i < iters) & ~done

  def body(carry):
    i, a, _ = carry
    delta, dec2 = _nash_newton_step(cr, reg, a)
    lam = jnp.sqrt(dec2)
    damped = jnp.where(lam < 0.25, 1.0, 1.0 / (1.0 + lam))
    # Backtracking on t = 1, 1/2, ..., evaluated all at once.
    ts = 0.5 ** jnp.arange(30, dtype=dtype)  # [30]
    cand = a[None, :] + ts[:, None] * delta[None, :]  # [30, K]
    feasible = jnp.all(cand > 0, axis=1)
    safe = jnp.where(feasible[:, None], cand, 1.0)
    armijo = jax.vmap(phi)(safe) <= phi(a) - 1e-4 * ts * dec2
    t_search = jnp.max(jnp.where(feasible & armijo, ts, 0.0))
    a_new = a + jnp.maximum(damped, t_search) * delta
    ok = jnp.all(jnp.isfinite(a_new)) & jnp.all(a_new > 0)
    a_new = jnp.where(ok, a_new, a)
    done = ~ok | (dec2 < stop)
    return i + 1, a_new, done

  # Start from the solution for orthogonal gradients.
  a0 = 1.0 / jnp.sqrt(jnp.diagonal(cr) + reg)
  used, a_reg, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), a0, jnp.zeros((), bool)))
  return used, a_reg


def _nash_residual(cr: jax.Array, present: jax.Array, a: jax.Array
                   ) -> jax.Array:
  """`max_i |a_i (C a)_i - 1|` over present tasks."""
  return jnp.max(jnp.where(present, jnp.abs(a * _mv(cr, a) - 1.0), 0.0))


def _nash_unbias(cr: jax.Array, present: jax.Array, a_reg: jax.Array
                 ) -> jax.Array:
  """Up to three plain Newton steps on the unregularised `phi` from the
  regularised solution, each kept only if it moves no weight by more than 1%
  and lowers the residual (see `nash_bargaining`)."""
  zero = jnp.zeros_like(a_reg)

  def unbias(_, a):
    delta, _ = _nash_newton_step(cr, zero, a)
    a_new = a + delta
    keep = (jnp.all(jnp.isfinite(a_new)) & jnp.all(a_new > 0)
            & (jnp.max(jnp.abs(a_new / a_reg - 1.0)) <= 1e-2)
            & (_nash_residual(cr, present, a_new)
               < _nash_residual(cr, present, a)))
    return jnp.where(keep, a_new, a)

  return jax.lax.fori_loop(0, 3, unbias, a_reg)
