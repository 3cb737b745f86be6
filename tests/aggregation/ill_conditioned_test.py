"""Every Gram-based aggregator on ill-conditioned Jacobians, float32 and x64.

Hypothesis draws task gradients whose row norms are spread up to 1e12 (a
regression loss beside a classification loss, a task near convergence), some
rank deficient and some with K > P, at overall scales from 1e-20 to 1e20, in
float32 and in float64 (with `jax_enable_x64`), and compares each aggregator's
direction with a float64 reference solved in the cosine basis
(`references.py`): cosine >= 0.9999 and the same length where the reference
says the problem is well posed; the non-conflict property `g_k . d >= 0` (up to
rounding) for MGDA, UPGrad and DualProj; invariance to the order of the tasks.
The solvers' own certificates (KKT residuals, feasibility) are checked on the
same draws.

Shapes are fixed (K = 5 tasks, P = 8 columns; smaller problems are padded with
absent tasks and zero columns) so that each method compiles once per dtype.

Float32 range: a Gram entry of two rows of norm below ~1e-19 underflows, so in
float32 the smallest row norm is kept >= 1e-18 unless every row is below 1e-9
(then `scaled_gram` rescales the rows before the product). float64 covers the
whole range.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import aggregation
from mtl_jax.aggregation import solvers
from mtl_jax.aggregation.aligned_mtl import aligned_mtl_weights
from mtl_jax.aggregation.conflict_free import config_weights
from mtl_jax.aggregation.imtl import imtl_g_weights

import references as ref

KMAX, PMAX = 5, 8
C = 0.4  # CAGrad's c
SETTINGS = hypothesis.settings(max_examples=30, deadline=None,
                               derandomize=True)
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def _aligned_reference(g, dtype):
  # Aligned-MTL's cutoff uses float32's epsilon in every dtype.
  del dtype
  return ref.aligned_mtl(g, eps=float(jnp.finfo(jnp.float32).eps))


# name -> (aggregator, float64 reference of its direction or None).
METHODS = {
    "mgda": (aggregation.mgda, lambda g, dt: ref.mgda(g)),
    "upgrad": (aggregation.upgrad, lambda g, dt: ref.upgrad(g)),
    "dualproj": (aggregation.dualproj, lambda g, dt: ref.dualproj(g)),
    "cagrad": (functools.partial(aggregation.cagrad, c=C, rescale=0),
               lambda g, dt: ref.cagrad(g, c=C)),
    "nash_mtl": (functools.partial(aggregation.nash_mtl, max_norm=0.0,
                                   gram_normalization="none"),
                 lambda g, dt: ref.nash(g)),
    "imtl_g": (aggregation.imtl_g, lambda g, dt: ref.imtl_g(g)),
    "config": (aggregation.config, lambda g, dt: ref.config(g)),
    "aligned_mtl": (aggregation.aligned_mtl, _aligned_reference),
}
NON_CONFLICTING = ("mgda", "upgrad", "dualproj")


@functools.cache
def _update(name, dtype_name):
  del dtype_name  # one jitted function per dtype (x64 is part of the trace)
  agg = METHODS[name][0]()
  return agg, jax.jit(agg.update)


@st.composite
def jacobians(draw, dtype_name):
  """`(g [k, p] float64, already rounded to the dtype)`."""
  seed = draw(st.integers(0, 2**31 - 1))
  k = draw(st.integers(2, KMAX))
  p = draw(st.sampled_from([3, PMAX]))  # p = 3 < k gives K > P
  rank = draw(st.sampled_from([None, 1, 2]))
  spread = draw(st.sampled_from([1.0, 1e4, 1e8, 1e12]))
  low = draw(st.sampled_from([1e-20, 1e-8, 1.0, 1e8]))
  if dtype_name == "float32":
    hypothesis.assume(low >= 1e-18 or low * spread <= 1e-9)
  rng = np.random.default_rng(seed)
  g = ref.random_jacobian(rng, k, p, spread, rank=None if rank is None else
                          min(rank, k, p), scale=low)
  return g.astype(np.dtype(dtype_name)).astype(np.float64)


def _aggregate(name, dtype_name, g):
  """The direction for `g [k, p]`, padded to `[KMAX, PMAX]`."""
  agg, update = _update(name, dtype_name)
  k, p = g.shape
  dtype = DTYPES[dtype_name]
  padded = np.zeros((KMAX, PMAX))
  padded[:k, :p] = g
  counts = (np.arange(KMAX) < k).astype(np.float64)
  d, _ = update(jnp.asarray(padded, dtype), agg.init(KMAX),
                losses=jnp.asarray(counts, dtype),
                counts=jnp.asarray(counts, dtype), rng=jax.random.key(0))
  assert d.dtype == dtype, (name, d.dtype)
  d = np.asarray(d, np.float64)
  np.testing.assert_array_equal(d[p:], 0.0)
  return d[:p]


def _cos(a, b):
  return ref.cosine(a, b)


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(METHODS))
@SETTINGS
@hypothesis.given(data=st.data())
def test_direction_matches_float64_reference(name, dtype_name, data):
  g = data.draw(jacobians(dtype_name))
  eps = float(jnp.finfo(DTYPES[dtype_name]).eps)
  with jax.enable_x64(dtype_name == "float64"):
    d = _aggregate(name, dtype_name, g)
    order = np.random.default_rng(g.shape[0]).permutation(g.shape[0])
    d_perm = _aggregate(name, dtype_name, g[order])
  assert np.all(np.isfinite(d)), (name, g, d)
  solution = METHODS[name][1](g, DTYPES[dtype_name])
  norms = np.linalg.norm(g, axis=1)
  # Rounding of `w @ G` and of the Gram matrix: relative to the size of the
  # direction's terms `sum_k |w_k| |g_k|`, not to |d| (which may be far
  # shorter, down to 0 where the gradients cancel).
  terms = (float(np.abs(solution.weights) @ norms) if solution is not None
           else float(norms.sum()))
  rounding = 256 * g.shape[0] * eps * terms
  if solution is not None and solution.well_posed and (
      solution.info["cancellation"] > 1e3 * eps):
    want = solution.direction
    assert _cos(d, want) >= 0.9999, (name, _cos(d, want), g)
    np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(want),
                               rtol=1e-3, err_msg=name)
    # Same direction for another order of the same tasks.
    assert _cos(d_perm, d) >= 0.9999, (name, _cos(d_perm, d))
  if name in NON_CONFLICTING:
    # g_k . d >= 0 for every task, up to the rounding of d's terms.
    assert np.all(g @ d >= -rounding * norms), (name, g @ d / norms, g)


def _gram(g, dtype):
  """The Gram matrix padded to KMAX tasks (absent ones) and the mask."""
  k = g.shape[0]
  m = np.zeros((KMAX, KMAX))
  m[:k, :k] = g @ g.T / np.max(np.sum(g * g, axis=1))
  return jnp.asarray(m, dtype), jnp.asarray(np.arange(KMAX) < k)


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@SETTINGS
@hypothesis.given(data=st.data())
def test_solvers_certify_their_solutions(dtype_name, data):
  """KKT residuals within tolerance and feasible weights, every draw."""
  g = data.draw(jacobians(dtype_name))
  k = g.shape[0]
  dtype = DTYPES[dtype_name]
  eps = float(jnp.finfo(dtype).eps)
  with jax.enable_x64(dtype_name == "float64"):
    m, present = _gram(g, dtype)
    alpha, info = _min_norm(m, present)
    w_cone, info_cone = _dual_cone(jnp.full((KMAX,), 1.0 / k, dtype), m,
                                   present)
    w_ca, info_ca = _cagrad(m, present)
    alpha_nash, info_nash = _nash(m, present)
  for w, info in ((alpha, info), (w_ca, info_ca)):
    assert w.dtype == dtype, w.dtype
    w = np.asarray(w, np.float64)
    np.testing.assert_array_equal(w[k:], 0.0)
    assert np.all(w >= 0), w
    np.testing.assert_allclose(w.sum(), 1.0, rtol=16 * k * eps)
    assert bool(info.converged), (info, g)
    assert float(info.residual) <= 128 * k * eps, info
  assert np.all(np.asarray(w_cone)[:k] >= 1.0 / k * (1 - 4 * eps))
  assert bool(info_cone.converged) and float(
      info_cone.residual) <= 128 * k * eps, info_cone
  if ref.nash(g) is not None and np.linalg.cond(
      g / np.linalg.norm(g, axis=1, keepdims=True)) < 1e3:
    # Well-posed bargaining problems are solved to the equation's rounding.
    assert bool(info_nash.converged), (info_nash, g)
  assert np.all(np.asarray(alpha_nash)[:k] > 0)


_min_norm = jax.jit(functools.partial(solvers.min_norm_simplex,
                                      return_info=True))
_dual_cone = jax.jit(functools.partial(solvers.project_to_dual_cone,
                                       return_info=True))
_cagrad = jax.jit(functools.partial(solvers.cagrad_dual, c=C,
                                    return_info=True))
_nash = jax.jit(functools.partial(solvers.nash_bargaining, return_info=True))


_CLOSED_FORMS = {
    "imtl_g": (jax.jit(functools.partial(
        imtl_g_weights, return_info=True)), lambda g: ref.imtl_g(g)),
    "config": (jax.jit(functools.partial(
        config_weights, return_info=True)),
               lambda g: ref.config(g)),
    "aligned_mtl": (jax.jit(functools.partial(
        aligned_mtl_weights, return_info=True)),
                    lambda g: _aligned_reference(g, None)),
}


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(_CLOSED_FORMS))
@SETTINGS
@hypothesis.given(data=st.data())
def test_closed_forms_certify_their_equalities(name, dtype_name, data):
  """IMTL-G's equal projections, ConFIG's equal cosines and Aligned-MTL's
  orthonormal aligned gradients hold to rounding where the reference says
  the problem is well posed."""
  g = data.draw(jacobians(dtype_name))
  fn, reference = _CLOSED_FORMS[name]
  with jax.enable_x64(dtype_name == "float64"):
    m, present = _gram(g, DTYPES[dtype_name])
    _, info = fn(m, present)
  solution = reference(g)
  if solution.well_posed and solution.info["cancellation"] > 1e3 * float(
      jnp.finfo(DTYPES[dtype_name]).eps) and _equality_holds(name, g,
                                                              solution):
    assert bool(info.converged), (name, info, g)


def _equality_holds(name, g, solution):
  """Whether the method's defining equality is attainable: the float64
  reference direction has equal projections (IMTL-G) or equal cosines
  (ConFIG) on the nonzero gradients. Where it is not (e.g. rows g, g, -g),
  the least-squares weights are returned and `converged` is False."""
  if name == "aligned_mtl":
    return True
  norms = np.linalg.norm(g, axis=1)
  nonzero = norms > 0
  proj = (g[nonzero] / norms[nonzero, None]) @ solution.direction
  if name == "config":
    proj = proj / max(np.linalg.norm(solution.direction), 1e-300)
  else:
    proj = proj / max(float(np.abs(solution.weights) @ norms), 1e-300)
  return np.ptp(proj) <= 1e-9


def test_closed_form_certificates_by_hand():
  # g_1 = -g_2, g_3 orthogonal to both: no direction has equal cosines with
  # all three (ConFIG's least squares gives d ~ g_3: cosines 0, 0, 1, spread
  # exactly 1), while IMTL-G's equal projections hold with d = 0.
  g = np.array([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0], [0.0, 0.0, 1.0]])
  m = jnp.asarray(g @ g.T, jnp.float32)
  present = jnp.ones(3, bool)
  w, info = _CLOSED_FORMS["config"][0](m, present)
  np.testing.assert_allclose(np.asarray(w) @ g, [0.0, 0.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(float(info.residual), 1.0, rtol=1e-6)
  assert not bool(info.converged)
  w, info = _CLOSED_FORMS["imtl_g"][0](m, present)
  np.testing.assert_allclose(np.asarray(w), [0.5, 0.5, 0.0], atol=1e-6)
  assert bool(info.converged) and float(info.residual) < 1e-6
  # Aligned-MTL of orthogonal gradients: B G has rows of length
  # sqrt(lambda_min) = 1 exactly.
  g = np.diag([1.0, 2.0, 4.0])
  w, info = _CLOSED_FORMS["aligned_mtl"][0](
      jnp.asarray(g @ g.T, jnp.float32), present)
  np.testing.assert_allclose(np.asarray(w), [1.0, 0.5, 0.25], rtol=1e-6)
  assert bool(info.converged) and float(info.residual) < 1e-6
