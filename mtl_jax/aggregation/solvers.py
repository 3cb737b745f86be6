"""Small jit-able solvers on the `[K, K]` Gram matrix of the task gradients.

Gradient aggregators (MGDA, UPGrad, DualProj, Nash-MTL, CAGrad) reduce to small
optimisation problems over K task weights whose only data is the Gram matrix
`M = G G^T` of the `[K, P]` gradient matrix. These solvers never touch `P`, run
inside a jitted train step (fixed shapes, `lax.while_loop` with an iteration
cap, no host callbacks) and take a `present: bool [K]` mask: an absent task's
weight is fixed to 0 and its row and column of `M` are ignored, so the result
equals the one on the sub-matrix of present tasks (up to float rounding).

Numerics. Every solver first divides `M` by its largest present diagonal
entry, so that gradients scaled anywhere between 1e-8 and 1e8 give the same
weights in float32, and then works in float32. The two constrained QPs
(`min_norm_simplex`, `project_to_dual_cone`) are solved in two phases: a
projected accelerated gradient method (FISTA with the gradient-based adaptive
restart of O'Donoghue & Candes, 2015) with an exact projection identifies the
active constraints, typically in 20-100 iterations; then primal active-set
steps solve the KKT system on the identified face exactly (with one step of
iterative refinement), which takes the weights to float32 precision instead
of FISTA's slow tail. `nash_bargaining` uses Newton's method. On
well-conditioned problems the weights agree with scipy's float64 solvers to
~1e-7 (see tests/aggregation/solvers_test.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# FISTA stops once a projected-gradient step moves no weight by more than
# this (weights live in [0, 1] after normalisation, float32 ulp(1) = 1.2e-7).
_STEP_TOL = 5e-7
_HIGHEST = jax.lax.Precision.HIGHEST


def _mv(m: jax.Array, x: jax.Array) -> jax.Array:
  """`m @ x` at full float32 precision (no TF32 passes on GPU)."""
  return jnp.matmul(m, x, precision=_HIGHEST)


def _present_or_all(present: jax.Array | None, num_tasks: int) -> jax.Array:
  if present is None:
    return jnp.ones((num_tasks,), bool)
  return jnp.asarray(present, bool)


def normalised_gram(m: jax.Array, present: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masks, symmetrises and scales the Gram matrix.

  Every solver works on this matrix, so that its answer does not depend on
  the gradients' scale and float32 neither under- nor overflows.

  Args:
    m: `[K, K]` Gram matrix.
    present: `bool [K]`.

  Returns:
    `(mn [K, K], scale [], nonzero [])`: `mn = m / scale` with absent rows and
    columns zeroed and `scale` the largest present diagonal entry (so
    `|mn_ij| <= 1`); `nonzero` is False when every present row is zero (then
    `mn` is all zeros and `scale` is meaningless).
  """
  m = jnp.asarray(m, jnp.float32)
  both = present[:, None] & present[None, :]
  m = jnp.where(both, 0.5 * (m + m.T), 0.0)  # [K, K]
  scale = jnp.max(jnp.where(present, jnp.diagonal(m), 0.0))
  nonzero = (scale > 0) & jnp.isfinite(scale)
  mn = jnp.where(nonzero, m / jnp.where(nonzero, scale, 1.0), 0.0)
  return mn, scale, nonzero


def _lipschitz(mn: jax.Array) -> jax.Array:
  """Largest eigenvalue of the PSD `mn` (the Lipschitz constant of its
  quadratic form's gradient); 1 for the zero matrix so steps stay finite."""
  top = jnp.linalg.eigvalsh(mn)[-1]
  return jnp.where(top > 1e-12, top, 1.0)


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
  y = jnp.asarray(y, jnp.float32)
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


def _fista(x0: jax.Array, grad_fn, prox_fn, step: jax.Array, max_iters: int
           ) -> jax.Array:
  """Projected accelerated gradient (FISTA) with adaptive restart.

  Restarting the momentum whenever it points uphill (O'Donoghue & Candes,
  2015) gives linear convergence on the strongly convex faces that well-posed
  problems reduce to, without knowing the strong-convexity constant.

  Returns:
    The last projected-gradient iterate.
  """

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_iters) & ~done

  def body(carry):
    i, x, y, t, _ = carry
    x_new = prox_fn(y - step * grad_fn(y))
    done = jnp.max(jnp.abs(x_new - y)) <= _STEP_TOL
    restart = jnp.vdot(y - x_new, x_new - x) > 0
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    y_new = jnp.where(restart, x_new, x_new + ((t - 1.0) / t_new) * (x_new - x))
    t_new = jnp.where(restart, 1.0, t_new)
    return i + 1, x_new, y_new, t_new, done

  init = (jnp.zeros((), jnp.int32), x0, x0, jnp.ones((), jnp.float32),
          jnp.zeros((), bool))
  return jax.lax.while_loop(cond, body, init)[1]


def _refined_solve(a: jax.Array, b: jax.Array, z0: jax.Array) -> jax.Array:
  """Solves `a z = b` starting from the guess `z0`, in residual form plus one
  step of iterative refinement, so that a good guess loses no accuracy to the
  float32 LU solve (the correction, not the solution, carries its error)."""
  z = z0 + jnp.linalg.solve(a, b - _mv(a, z0))
  return z + jnp.linalg.solve(a, b - _mv(a, z))


def _active_set_finish(x, free, lower, face_solve, max_steps):
  """Primal active-set steps on the face `{x_i = lower_i for i not free}`.

  Each step solves the equality-constrained problem on the current face
  exactly (`face_solve(free, x) -> a`); if `a` respects the bounds it is the
  answer, otherwise x moves towards `a` until the first free coordinate hits
  its bound, which then leaves the free set (the objective decreases on every
  step; at most `max_steps` steps).

  Returns:
    `(x, ok)`: the new point and whether the last face solve was finite.
  """

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < max_steps) & ~done

  def body(carry):
    i, x, free, _, _ = carry
    a = face_solve(free, x)
    finite = jnp.all(jnp.isfinite(a))
    a = jnp.where(free, a, lower)
    shrinking = free & (a < lower)
    # Largest fraction of the step that keeps every coordinate >= lower.
    gap = jnp.where(shrinking, x - a, 1.0)
    ratio = jnp.where(shrinking, (x - lower) / jnp.maximum(gap, 1e-30), 1.0)
    theta = jnp.clip(jnp.min(ratio), 0.0, 1.0)
    hit = shrinking & (ratio <= theta)
    x_new = jnp.where(hit, lower, jnp.maximum(x + theta * (a - x), lower))
    x_new = jnp.where(free, x_new, lower)
    x_new = jnp.where(finite, x_new, x)
    free_new = free & ~hit
    done = ~finite | ~jnp.any(shrinking)
    return i + 1, x_new, free_new, done, finite

  init = (jnp.zeros((), jnp.int32), x, free, jnp.zeros((), bool),
          jnp.ones((), bool))
  _, x, _, _, ok = jax.lax.while_loop(cond, body, init)
  return x, ok


def min_norm_simplex(m: jax.Array, present: jax.Array | None = None, *,
                     iters: int = 1000) -> jax.Array:
  """MGDA's min-norm point: `argmin_{alpha in simplex} alpha^T M alpha`.

  The simplex is over the present tasks (absent weights are 0). With
  `M = G G^T`, `G^T alpha` is the point of minimum norm in the convex hull of
  the present task gradients (Sener & Koltun, 2018). Solved by FISTA with an
  exact simplex projection (at most `iters` iterations, stopping once a step
  moves no weight by more than 5e-7), then by primal active-set steps that
  solve the KKT system `M_SS alpha_S = lambda 1, sum alpha_S = 1` on the
  support S exactly. The active-set result is kept only if it is finite and
  no worse than FISTA's (a singular `M_SS` leaves FISTA's answer).

  Args:
    m: `[K, K]` symmetric PSD Gram matrix, any scale.
    present: `bool [K]` (default: all tasks present).
    iters: maximum number of FISTA iterations.

  Returns:
    `alpha [K]`: float32, `alpha >= 0`, summing to 1 over present tasks, 0 on
    absent ones. When every present row of `M` is zero (all gradients zero)
    every point is optimal and the uniform weights are returned; with no task
    present, all zeros.
  """
  k = m.shape[-1]
  present = _present_or_all(present, k)
  mn, _, _ = normalised_gram(m, present)
  num_present = jnp.sum(present)
  x0 = present / jnp.maximum(num_present, 1)
  x0 = x0.astype(jnp.float32)
  step = 1.0 / _lipschitz(mn)
  prox = lambda y: project_simplex(y, present)
  x = _fista(x0, lambda y: _mv(mn, y), prox, step, iters)

  def face_solve(free, x):
    # KKT on the face: [M_SS, -1; 1^T, 0] [alpha_S; lambda] = [0; 1]; the rows
    # of fixed coordinates are the identity so that they stay at 0.
    s = free.astype(jnp.float32)
    a = jnp.where(free[:, None] & free[None, :], mn, 0.0) + jnp.diag(1.0 - s)
    kkt = jnp.block([[a, -s[:, None]], [s[None, :], jnp.zeros((1, 1))]])
    rhs = jnp.concatenate([jnp.zeros((k,)), jnp.ones((1,))])
    z0 = jnp.concatenate([x, jnp.vdot(x, _mv(mn, x))[None]])
    return _refined_solve(kkt, rhs, z0)[:k]

  zeros = jnp.zeros((k,), jnp.float32)
  finished, ok = _active_set_finish(x, present & (x > 0), zeros, face_solve,
                                    k)
  finished = finished / jnp.maximum(jnp.sum(finished), 1e-30)
  f_fista = jnp.vdot(x, _mv(mn, x))
  f_finished = jnp.vdot(finished, _mv(mn, finished))
  better = ok & jnp.all(jnp.isfinite(finished)) & (
      f_finished <= f_fista * (1.0 + 1e-5) + 1e-12)
  return jnp.where(better & (num_present > 0), finished, x)


def project_to_dual_cone(v: jax.Array, m: jax.Array,
                         present: jax.Array | None = None, *,
                         iters: int = 1000) -> jax.Array:
  """Weights of the projection of `G^T v` onto the dual cone of the rows of G.

  The dual cone is `{x : G x >= 0}` (present rows only). By Proposition 1 of
  Quinton & Rey (2024, "Jacobian descent for multi-objective optimization"),
  the projection is `G^T w` with

    w = argmin_{w >= v} w^T M w,   M = G G^T,

  a box-constrained QP in K variables (TorchJD solves it with quadprog on the
  trace-normalised `M + 1e-4 I`; here it is solved exactly, without the ridge:
  the projection `G^T w` is unique even where `w` is not). Solved by FISTA
  from `w = v` (at most `iters` iterations) with the projection `max(., v)`,
  then by primal active-set steps that solve `M_FF w_F = -M_FB v_B` on the
  free set F exactly, kept only if finite and no worse than FISTA's answer.

  The problem is positively homogeneous in `v` and invariant to the scale of
  `M`; both are normalised internally.

  Args:
    v: `[K]` weights of the vector to project.
    m: `[K, K]` symmetric PSD Gram matrix, any scale.
    present: `bool [K]` (default: all). Absent coordinates of `v` are ignored
      and their weight is 0.
    iters: maximum number of FISTA iterations.

  Returns:
    `w [K]` float32 with `w >= v` on present tasks and 0 on absent ones. If
    every present row of `M` is zero, `w = v` (the projection is 0 anyway).
  """
  k = m.shape[-1]
  present = _present_or_all(present, k)
  mn, _, _ = normalised_gram(m, present)
  v = jnp.where(present, jnp.asarray(v, jnp.float32), 0.0)
  v_scale = jnp.max(jnp.abs(v))
  vn = v / jnp.where(v_scale > 0, v_scale, 1.0)
  step = 1.0 / _lipschitz(mn)
  prox = lambda y: jnp.where(present, jnp.maximum(y, vn), 0.0)
  x = _fista(vn, lambda y: _mv(mn, y), prox, step, iters)

  def face_solve(free, x):
    # M_FF w_F = -M_FB v_B, and w_B = v_B on the fixed coordinates.
    s = free.astype(jnp.float32)
    a = jnp.where(free[:, None] & free[None, :], mn, 0.0) + jnp.diag(1.0 - s)
    rhs = jnp.where(free, -_mv(mn, jnp.where(free, 0.0, vn)), vn)
    return _refined_solve(a, rhs, x)

  finished, ok = _active_set_finish(x, present & (x > vn), vn, face_solve, k)
  f_fista = jnp.vdot(x, _mv(mn, x))
  f_finished = jnp.vdot(finished, _mv(mn, finished))
  # Both objectives are ~|vn|^2 M-weighted, so the absolute slack is tied to
  # the size of the problem's data, not to the (possibly ~0) optimum.
  slack = 1e-6 * jnp.vdot(vn, _mv(mn, vn)) + 1e-12
  better = ok & jnp.all(jnp.isfinite(finished)) & (
      f_finished <= f_fista * (1.0 + 1e-5) + slack)
  w = jnp.where(better, finished, x)
  return jnp.where(present, w * v_scale, 0.0)


def nash_bargaining(m: jax.Array, present: jax.Array | None = None, *,
                    iters: int = 100, ridge: float = 1e-6) -> jax.Array:
  """Nash bargaining weights: `alpha > 0` with `M alpha = 1 / alpha`.

  Navon et al. (2022, Nash-MTL) characterise the bargaining solution by
  `(G^T alpha) . g_i = 1 / alpha_i` for every task i, i.e. `alpha_i (M
  alpha)_i = 1`. This is the stationarity condition of the strictly convex,
  self-concordant

    phi(alpha) = 0.5 alpha^T M alpha - sum_i log alpha_i,

  which is minimised by Newton's method: each step is damped to
  `1 / (1 + lambda)` while the Newton decrement `lambda` is >= 1/4 (which
  keeps `alpha > 0` and guarantees descent for self-concordant functions),
  lengthened to the largest of 1, 1/2, 1/4, ... that keeps `alpha > 0` and
  passes Armijo's test when that is longer, and full once `lambda < 1/4`
  (quadratic convergence). At most `iters` steps; stops at `lambda^2 < 1e-12`.

  Regularisation: if M is singular with a non-negative null direction (a zero
  gradient, or `g_1 = -g_2`), `phi` is unbounded below and no solution
  exists; float32 rounding of `M alpha` can have the same effect on nearly
  singular M. Newton's method therefore first minimises
  `phi + 0.5 * ridge * s * |alpha|^2`, `s` the largest diagonal entry of M
  (i.e. uses `M + ridge * s * I`), so that a degenerate direction gets a
  large but finite weight (`~1 / sqrt(ridge * s)`). Then up to three plain
  Newton steps on the unregularised `phi` remove the ridge's bias
  (`~ridge * s * alpha_i^2` in `alpha_i (M alpha)_i`); each is kept only if it
  moves no weight by more than 1% and reduces the residual
  `max_i |alpha_i (M alpha)_i - 1|`, which holds when an exact solution lies
  near the regularised one, and fails (keeping the regularised weights) when
  M is singular.

  Args:
    m: `[K, K]` symmetric PSD Gram matrix, any scale.
    present: `bool [K]` (default: all). Absent tasks get weight 0 and do not
      influence the others.
    iters: maximum number of Newton steps on the regularised problem.
    ridge: relative Tikhonov regularisation, see above.

  Returns:
    `alpha [K]` float32, > 0 on present tasks, 0 on absent ones; all zeros if
    every present row of `M` is zero (no bargaining solution exists).
  """
  k = m.shape[-1]
  present = _present_or_all(present, k)
  mn, scale, nonzero = normalised_gram(m, present)
  pf = present.astype(jnp.float32)
  # Absent tasks get an identity row: their weight decouples (and is 1).
  mr = mn + jnp.diag(1.0 - pf)  # [K, K]
  # The ridge stays out of `mr` so that float32 does not round it away
  # against diagonal entries of size 1.
  reg = ridge * pf  # [K]

  def phi(a):
    return (0.5 * jnp.vdot(a, _mv(mr, a)) + 0.5 * jnp.vdot(reg * a, a)
            - jnp.sum(jnp.log(a)))

  def newton_step(a, reg):
    grad = _mv(mr, a) + reg * a - 1.0 / a  # [K]
    hess = mr + jnp.diag(reg + 1.0 / (a * a))  # [K, K], positive definite
    delta = -jnp.linalg.solve(hess, grad)
    dec2 = jnp.maximum(-jnp.vdot(grad, delta), 0.0)  # Newton decrement^2
    return delta, dec2

  def cond(carry):
    i, _, done = carry
    return (i < iters) & ~done

  def body(carry):
    i, a, _ = carry
    delta, dec2 = newton_step(a, reg)
    lam = jnp.sqrt(dec2)
    damped = jnp.where(lam < 0.25, 1.0, 1.0 / (1.0 + lam))
    # Backtracking on t = 1, 1/2, ..., evaluated all at once.
    ts = 0.5 ** jnp.arange(30, dtype=jnp.float32)  # [30]
    cand = a[None, :] + ts[:, None] * delta[None, :]  # [30, K]
    feasible = jnp.all(cand > 0, axis=1)
    safe = jnp.where(feasible[:, None], cand, 1.0)
    armijo = jax.vmap(phi)(safe) <= phi(a) - 1e-4 * ts * dec2
    t_search = jnp.max(jnp.where(feasible & armijo, ts, 0.0))
    a_new = a + jnp.maximum(damped, t_search) * delta
    ok = jnp.all(jnp.isfinite(a_new)) & jnp.all(a_new > 0)
    a_new = jnp.where(ok, a_new, a)
    done = ~ok | (dec2 < 1e-12)
    return i + 1, a_new, done

  # Start from the solution for the diagonal of M (exact if the gradients are
  # orthogonal).
  a0 = 1.0 / jnp.sqrt(jnp.diagonal(mr) + reg)
  _, a_reg, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), a0, jnp.zeros((), bool)))

  def residual(a):
    return jnp.max(jnp.abs(a * _mv(mr, a) - 1.0))

  def unbias(_, a):
    delta, _ = newton_step(a, jnp.zeros_like(reg))
    a_new = a + delta
    keep = (jnp.all(jnp.isfinite(a_new)) & jnp.all(a_new > 0)
            & (jnp.max(jnp.abs(a_new / a_reg - 1.0)) <= 1e-2)
            & (residual(a_new) < residual(a)))
    return jnp.where(keep, a_new, a)

  a = jax.lax.fori_loop(0, 3, unbias, a_reg)
  # mn = m / scale, so alpha = a / sqrt(scale) solves m alpha = 1 / alpha.
  alpha = a / jnp.sqrt(jnp.where(nonzero, scale, 1.0))
  return jnp.where(present & nonzero, alpha, 0.0)
