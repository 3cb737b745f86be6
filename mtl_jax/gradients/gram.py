"""The per-task Gram matrix of the shared params without the `[K, P]` Jacobian.

A Gram-based aggregator (`Aggregator.from_gram`, every method but GradDrop)
needs the task gradients `g_k = grad L_k` of the shared params only through
their Gram matrix `G_kl = <g_k, g_l>`, and returns `d = sum_k c_k g_k`. For a
dense layer `y = x W + b` applied to `N` rows `A [N, in]` with per-task output
gradients `D_k = dL_k/dy [N, out]`, the task gradients are
`grad_W L_k = A^T D_k` and `grad_b L_k = 1^T D_k`, so

  <grad_W L_k, grad_W L_l> = <D_k, (A A^T) D_l>          (Frobenius)
  sum_k c_k grad_W L_k     = A^T (sum_k c_k D_k)

(Goodfellow 2015's per-example gradient-norm trick, TorchJD's "autogram"). The
first costs `N^2 in + K N^2 out` multiply-adds and `K N out` floats of memory,
where forming the kernel's rows costs `K N in out` and `K in out` floats: for
the benchmark MLP (N = 256 examples, 784-512-512-256, K = 4) about half the
arithmetic and none of the `[K, P]` traffic. The second reuses the `D_k` of
the per-task backward pass: no further pass through the trunk.

`FactoredJacobian` gets the `A` and `D_k` of every `flax.linen.Dense` under
`params["shared"]` with a method interceptor: each call's input is recorded and
a zero "perturbation" is added to its output, whose cotangent is `D`. A dense
layer is factored when that is cheaper than forming its rows (`N^2 in + K N^2
out < K N in out`, and `N <= MAX_ROWS`); every other shared leaf (convolutions,
norms, embeddings, dense layers with many rows) keeps its per-task gradient
`[K, ...]` from the same batched VJP, and contributes `J J^T` and `c @ J`.

GradDrop, which needs every coordinate, gets the rows themselves from the same
factors (`columnwise_blocks`: one GEMM `A^T D_k` per task and block of input
rows, in the kernel's layout).

Layers are found by type (`nn.Dense` with the default `dot_general`) and
path. A Dense inside a lifted transform (`nn.scan`, `nn.vmap`, `nn.remat`)
runs in an inner trace and is left unfactored (its leaves keep their
per-task gradients).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.aggregation import base

_HIGHEST = jax.lax.Precision.HIGHEST
# Column blocks of the chunked Gram contraction are a multiple of this wide.
_BLOCK_ALIGN = 32
SHARED = "shared"
# Above this many rows a dense layer's N x N matrix A A^T (4 N^2 bytes) is not
# worth it: its rows are formed instead.
MAX_ROWS = 8192


@dataclasses.dataclass(frozen=True)
class DenseSite:
  """A shared dense layer whose task gradients are kept factored.

  Attributes:
    path: the module path, starting with "shared" (also its params' path).
    calls: how many times the layer is called in one forward pass.
    in_dim, out_dim: kernel shape.
    rows: `N`, rows over all calls (per device under pmap).
    use_bias: whether the layer has a bias.
    outputs: shape and dtype of each call's output.
  """

  path: tuple[str, ...]
  calls: int
  in_dim: int
  out_dim: int
  rows: int
  use_bias: bool
  outputs: tuple[jax.ShapeDtypeStruct, ...] = ()


def _is_plain_dense(module: nn.Module) -> bool:
  return (type(module) is nn.Dense  # pylint: disable=unidiomatic-typecheck
          and module.dot_general is None and module.dot_general_cls is None)


def _lookup(tree: Any, path: Sequence[str]) -> Any:
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return node


def find_dense_sites(apply: Callable[[], Any], params: Mapping[str, Any], *,
                     num_tasks: int, num_devices: int = 1,
                     every: bool = False) -> tuple[DenseSite, ...]:
  """The shared dense layers worth factoring, found by tracing `apply()`.

  Args:
    apply: runs the model's forward pass (traced abstractly, never run).
    params: the model params (`params["shared"]` holds the shared ones).
    num_tasks: K (the cost model compares both ways).
    num_devices: devices whose rows are gathered under pmap.
    every: factor every plain shared dense layer, whatever the cost model
      says (`MAX_ROWS` still applies).

  Returns:
    The sites, in call order of their first call.
  """
  found: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
  outer = []  # the trace level of the outermost module call

  def record(next_fun, args, kwargs, context):
    module = context.module
    level = module.scope.trace_level
    if not outer:
      outer.append(level)
    if (context.method_name == "__call__" and _is_plain_dense(module)
        and module.path[:1] == (SHARED,) and args):
      x = args[0]
      # A layer under nn.remat/nn.scan/nn.vmap runs in an inner trace (flax
      # gives its scope another trace level): its input is not a value of
      # the step. Never factored.
      rows = math.prod(x.shape[:-1]) if level == outer[0] else None
      out = next_fun(*args, **kwargs)
      found.setdefault(tuple(module.path), []).append(
          (x.shape[-1], module.features, rows,
           jax.ShapeDtypeStruct(out.shape, out.dtype)))
      return out
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: apply())  # a new function: no cached trace

  sites = []
  for path, calls in found.items():
    in_dim, out_dim = calls[0][:2]
    kernel = _lookup(params, path + ("kernel",))
    if kernel is None or tuple(kernel.shape) != (in_dim, out_dim):
      continue  # e.g. inside nn.scan/nn.vmap: params of another shape
    if any(c[:2] != (in_dim, out_dim) or c[2] is None for c in calls):
      continue
    rows = sum(c[2] for c in calls)
    n = rows * num_devices
    factored_cost = n * n * in_dim + num_tasks * n * n * out_dim
    rows_cost = num_tasks * n * in_dim * out_dim
    if n > MAX_ROWS or (factored_cost >= rows_cost and not every):
      continue
    bias = _lookup(params, path + ("bias",))
    sites.append(DenseSite(path, len(calls), in_dim, out_dim, rows,
                           bias is not None, tuple(c[3] for c in calls)))
  return tuple(sites)


def perturbations(sites: Sequence[DenseSite]) -> dict[str, list[jax.Array]]:
  """Zero output perturbations `{site_key: [one per call]}`."""
  return {site_key(s.path): [jnp.zeros(o.shape, o.dtype) for o in s.outputs]
          for s in sites}


def site_key(path: Sequence[str]) -> str:
  return "/".join(path)


def intercepting(sites: Sequence[DenseSite], eps: Mapping[str, Any],
                 inputs_out: dict[str, list[jax.Array]]):
  """A method interceptor adding `eps` to the sites' outputs, recording inputs.

  `inputs_out[key]` receives each call's input `[..., in]` (in call order).
  """
  wanted = {site_key(s.path) for s in sites}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    key = site_key(context.module.path)
    if key not in wanted:
      return next_fun(*args, **kwargs)
    calls = inputs_out.setdefault(key, [])
    index = len(calls)
    calls.append(args[0])
    return next_fun(*args, **kwargs) + eps[key][index]

  return nn.intercept_methods(interceptor)


class FactoredJacobian(NamedTuple):
  """The per-task gradients of the shared params, partly factored.

  Attributes:
    sites: the factored dense layers (static).
    acts: `{key: A [N, in]}` per site (this device's rows).
    deltas: `{key: D [K, N, out]}` per site.
    leaves: the per-task gradients `[K, ...]` of the other shared params, a
      pytree shaped like `params["shared"]` with None at factored leaves.
  """

  sites: tuple[DenseSite, ...]
  acts: dict[str, jax.Array]
  deltas: dict[str, jax.Array]
  leaves: Any


def factor(sites: Sequence[DenseSite], inputs: Mapping[str, list[jax.Array]],
           eps_cotangents: Mapping[str, list[jax.Array]], shared_cotangents: Any
           ) -> FactoredJacobian:
  """Assembles a `FactoredJacobian` from one batched VJP's outputs.

  Args:
    sites: the factored layers.
    inputs: `{key: [x of each call]}` recorded by `intercepting`.
    eps_cotangents: `{key: [[K, ...out] per call]}`, the cotangents of the
      perturbations (the per-task output gradients).
    shared_cotangents: `[K, ...]` per-task gradients of `params["shared"]`
      (the factored sites' leaves are ignored).
  """
  acts, deltas = {}, {}
  factored = set()
  for s in sites:
    key = site_key(s.path)
    acts[key] = jnp.concatenate(
        [x.reshape(-1, s.in_dim) for x in inputs[key]], axis=0)
    deltas[key] = jnp.concatenate(
        [d.reshape(d.shape[0], -1, s.out_dim) for d in eps_cotangents[key]],
        axis=1)
    factored.add(s.path[1:] + ("kernel",))
    if s.use_bias:
      factored.add(s.path[1:] + ("bias",))

  def keep(path, leaf):
    names = tuple(getattr(k, "key", str(k)) for k in path)
    return None if names in factored else leaf

  leaves = jax.tree_util.tree_map_with_path(keep, shared_cotangents)
  return FactoredJacobian(tuple(sites), acts, deltas, leaves)


def _rows(leaf: jax.Array) -> jax.Array:
  return leaf.reshape(leaf.shape[0], -1).astype(base.float_dtype(leaf))


def _gram_dtype(fj: FactoredJacobian) -> jnp.dtype:
  """float64 if any factor or leaf is float64 (x64), else float32."""
  arrays = (jax.tree.leaves(fj.acts) + jax.tree.leaves(fj.deltas)
            + jax.tree.leaves(fj.leaves))
  if not arrays:
    return jnp.dtype(jnp.float32)
  return base.float_dtype(jnp.zeros((), jnp.result_type(*arrays)))


def _kernel_gram(a: jax.Array, d: jax.Array, chunk_size: int | None = None
                 ) -> jax.Array:
  """`[K, K]` Gram matrix of a dense kernel's task gradients `A^T D_k`.

  `G_kl = <D_k, (A A^T) D_l>`. With `chunk_size` C, `(A A^T) D` is formed for
  all K tasks but a block of `~out C / K` output columns at a time (memory
  `~C N out`, as for C tasks' full `D_k`; blocks are rounded up to a multiple
  of 32 columns), and each block is contracted while it is still in cache:
  `D` is read once. (Blocks of tasks would contract each block with every
  task's `D_l`, reading all of `D` K/C times.)
  """
  k, _, out = d.shape
  aa = jnp.matmul(a, a.T, precision=_HIGHEST)  # [N, N]
  if chunk_size is None or chunk_size >= k:
    m = jnp.matmul(aa[None], d, precision=_HIGHEST)  # [K, N, out]
    return jnp.matmul(d.reshape(k, -1), m.reshape(k, -1).T,
                      precision=_HIGHEST)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  # Columns per block: out C / K, rounded up to a multiple of _BLOCK_ALIGN
  # (narrow blocks make poor GEMMs).
  width = -(-out // -(-k // chunk_size))
  width = min(out, -(-width // _BLOCK_ALIGN) * _BLOCK_ALIGN)
  num_blocks = -(-out // width)

  def block(g, b):
    # The last block may start before b * width (same width, inside the
    # array); the columns a previous block had are zeroed.
    start = jnp.minimum(b * width, out - width)
    d_b = jax.lax.dynamic_slice_in_dim(d, start, width, axis=2)  # [K, N, w]
    d_b = jnp.where(start + jnp.arange(width) >= b * width, d_b, 0.0)
    m_b = jnp.matmul(aa[None], d_b, precision=_HIGHEST)
    return g + jnp.matmul(d_b.reshape(k, -1), m_b.reshape(k, -1).T,
                          precision=_HIGHEST), None

  gram, _ = jax.lax.scan(block, jnp.zeros((k, k), d.dtype),
                         jnp.arange(num_blocks))
  return gram


def _gather_rows(fj: FactoredJacobian, axis_name: str | None
                 ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  if not axis_name:
    return fj.acts, fj.deltas
  gather = lambda x, axis: jax.lax.all_gather(x, axis_name, axis=axis,
                                              tiled=True)
  return ({k: gather(v, 0) for k, v in fj.acts.items()},
          {k: gather(v, 1) for k, v in fj.deltas.items()})


class _Term(NamedTuple):
  """One site's kernel, one site's bias, or one unfactored leaf."""

  plain: Callable[[], jax.Array]  # its Gram matrix
  # `(c, rescaled)`: c a power of two bounding its factors, and
  # `rescaled(s)` its Gram matrix divided by s^2, computed without overflow
  # for s >= c.
  rescaled: Callable[[], tuple[jax.Array, Callable[[jax.Array], jax.Array]]]


def _terms(fj: FactoredJacobian, acts, deltas, leaves,
           chunk_size: int | None) -> list[_Term]:
  """The Gram terms of every site and unfactored leaf (unweighted rows)."""
  terms = []
  for s in fj.sites:
    key = site_key(s.path)
    a = acts[key].astype(base.float_dtype(acts[key]))
    d = deltas[key].astype(base.float_dtype(deltas[key]))

    def kernel(a=a, d=d):
      sa, sd = base.power_of_two_scale(a), base.power_of_two_scale(d)
      return sa * sd, lambda c: _rescaled_kernel_gram(a, d, c, chunk_size)

    terms.append(_Term(lambda a=a, d=d: _kernel_gram(a, d, chunk_size),
                       kernel))
    if s.use_bias:
      b = lambda c=None, d=d: jnp.sum(d if c is None else d / c, axis=1)
      terms.append(_Term(
          lambda b=b: _plain_gram(b()),
          lambda b=b, d=d: (base.power_of_two_scale(d),
                            lambda c: _plain_gram(b(c)))))
  for leaf in jax.tree.leaves(leaves):
    rows = _rows(leaf)
    terms.append(_Term(
        lambda rows=rows: _plain_gram(rows),
        lambda rows=rows: (base.power_of_two_scale(rows),
                           lambda c: _plain_gram(rows / c))))
  return terms


def _rescaled_kernel_gram(a: jax.Array, d: jax.Array, c: jax.Array,
                          chunk_size: int | None) -> jax.Array:
  """`_kernel_gram(a, d) / c^2` for a power of two `c >= sa sd` (the powers of
  two bringing `a` and `d` to `[1, 2)`), computed without overflow and
  without a rescaled copy of `d`: each task's `D_k sa / c` is formed inside
  a map over tasks (`chunk_size` at a time)."""
  sa = base.power_of_two_scale(a)
  an = a / sa  # [N, in], small
  aa = jnp.matmul(an, an.T, precision=_HIGHEST)  # [N, N]
  f = sa / c  # (a / sa)^T (d f) = a^T d / c, and |d f| <= 2

  def row(d_k):  # [N, out] -> [K]
    m_k = jnp.matmul(aa, d_k * f, precision=_HIGHEST)
    return jax.lax.map(lambda d_l: jnp.vdot(d_l * f, m_k), d,
                       batch_size=chunk_size or d.shape[0])

  return jax.lax.map(row, d, batch_size=chunk_size or 1)


def _plain_gram(rows: jax.Array) -> jax.Array:
  return jnp.matmul(rows, rows.T, precision=_HIGHEST)


def scaled_gram(fj: FactoredJacobian, task_scale: jax.Array,
                present: jax.Array, axis_name: str | None = None,
                chunk_size: int | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """`(gram(rows / s), s)` of the rows `task_scale[k] * grad L_k`.

  The rule of `aggregation.base.scale_gram`: the plain Gram matrix when it is
  finite and its diagonal far from underflow (s from the diagonal), otherwise
  every term is recomputed from factors rescaled by one common power of two.
  Rows and columns of absent tasks are zero.

  Args:
    fj: the factored per-task gradients of this device's rows.
    task_scale: `[K]` row factors (the loss weights).
    present: `bool [K]`.
    axis_name: the pmap axis (rows are gathered, leaves are psum-ed).
    chunk_size: bound the dense layers' `(A A^T) D` to the memory of this
      many tasks' (formed for all tasks, a block of columns at a time).
  """
  acts, deltas = _gather_rows(fj, axis_name)
  leaves = fj.leaves
  if axis_name:
    leaves = jax.lax.psum(leaves, axis_name)
  task_scale = jnp.where(present, task_scale, 0.0).astype(_gram_dtype(fj))
  mask = present[:, None] & present[None, :]
  terms = _terms(fj, acts, deltas, leaves, chunk_size)
  # The rows' weights multiply the [K, K] matrix, not the [K, N, out] factors.
  plain = jnp.where(mask, jnp.outer(task_scale, task_scale) *
                    sum(t.plain() for t in terms), 0.0)

  def rescaled():
    # A term whose factors are at most c_t contributes (c_t / s)^2 times a
    # Gram matrix of O(1) entries; with s = max_t c_t nothing overflows. The
    # weights are brought to [1, 2) by their own power of two.
    parts = [t.rescaled() for t in terms]
    s = jnp.max(jnp.stack([c for c, _ in parts]))
    s_w = base.power_of_two_scale(task_scale)
    w = task_scale / s_w
    g = jnp.outer(w, w) * sum(fn(s) for _, fn in parts)
    return jnp.where(mask, g, 0.0), s * s_w

  return base.scale_gram(plain, rescaled)


def _kernel_rows(a: jax.Array, d: jax.Array) -> jax.Array:
  """`[K, in, out]` rows `A^T D_k` of a dense kernel: one GEMM per task, `A^T`
  (transposed once, `[in, N]`) times `D_k` as laid out by the backward
  pass."""
  at = jnp.broadcast_to(a.T.astype(d.dtype), (d.shape[0],) + a.T.shape)
  return jnp.matmul(at, d, precision=_HIGHEST)


def _scaled_sites(fj: FactoredJacobian, task_scale: jax.Array):
  """`(kernel path, bias path or None, A, task_scale[k] D_k)` of each site."""
  for s in fj.sites:
    key = site_key(s.path)
    d = fj.deltas[key]
    yield (s.path[1:] + ("kernel",),
           s.path[1:] + ("bias",) if s.use_bias else None, fj.acts[key],
           d * task_scale.astype(d.dtype)[:, None, None])  # [K, N, out]


def _scale_rows(rows: jax.Array, task_scale: jax.Array) -> jax.Array:
  """`task_scale[k] * rows[k]` for rows `[K, ...]`."""
  return rows * task_scale.astype(rows.dtype).reshape(
      (-1,) + (1,) * (rows.ndim - 1))


def columnwise_blocks(fj: FactoredJacobian, task_scale: jax.Array,
                      direction: Callable[[int, jax.Array, Any], jax.Array],
                      chunk_size: int,
                      reduce: Callable[[jax.Array], jax.Array] = lambda x: x
                      ) -> Any:
  """A columnwise aggregator's direction from the factors, in blocks.

  The rows `task_scale[k] * grad L_k` of a factored kernel, `A^T D_k`, are
  formed for a block of ~`in chunk_size / K` of its input rows at a time
  (memory ~`chunk_size in out`, as for `chunk_size` tasks' rows), summed
  over devices by `reduce` (a psum under pmap) and handed to `direction`;
  the `[K, P]` rows never exist at once. Other leaves (biases, unfactored
  leaves) are small and go whole.

  Args:
    fj: the factored per-task gradients of this device's rows.
    task_scale: `[K]` row factors (the loss weights, 0 for absent tasks).
    direction: `direction(i, rows [K, n], offset) -> [n]`: the direction of
      the flat coordinates `offset .. offset + n - 1` of leaf i (the order of
      `jax.tree.leaves` of the shared params), from those coordinates' rows.
    chunk_size: the memory bound, in tasks' rows.
    reduce: sums this device's rows over devices.

  Returns:
    The direction, a pytree shaped like `params["shared"]`.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  k = task_scale.shape[0]

  def kernel(a, d):
    def run(i):
      n_in, out = a.shape[1], d.shape[2]
      height = min(n_in, -(-n_in * chunk_size // k))  # input rows per block

      def block(acc, b):
        # The last block may start before b * height (same height): its
        # rows overlap the previous block's, whose directions it recomputes
        # exactly (the same coordinates, hence the same draws).
        start = jnp.minimum(b * height, n_in - height)
        a_b = jax.lax.dynamic_slice_in_dim(a, start, height, axis=1)
        rows = reduce(_kernel_rows(a_b, d))  # [K, h, out]
        dir_b = direction(i, rows.reshape(k, -1), start * out)
        return jax.lax.dynamic_update_slice_in_dim(
            acc, dir_b.reshape(height, out).astype(acc.dtype), start,
            axis=0), None

      acc, _ = jax.lax.scan(block, jnp.zeros((n_in, out), d.dtype),
                            jnp.arange(-(-n_in // height)))
      return acc
    return run

  def whole(rows):  # [K, ...] -> a leaf's direction, in one piece
    return lambda i: direction(i, reduce(rows).reshape(k, -1), 0).reshape(
        rows.shape[1:])

  thunks: dict[tuple[str, ...], Callable[[int], jax.Array]] = {}
  for kernel_path, bias_path, a, d in _scaled_sites(fj, task_scale):
    thunks[kernel_path] = kernel(a, d)
    if bias_path:
      thunks[bias_path] = whole(jnp.sum(d, axis=1))
  tree = _fill_unfactored(fj, thunks,
                          lambda leaf: whole(_scale_rows(leaf, task_scale)))
  leaves, treedef = jax.tree.flatten(tree, is_leaf=callable)
  return jax.tree.unflatten(treedef,
                            [run(i) for i, run in enumerate(leaves)])


def _fill_unfactored(fj: FactoredJacobian,
                     factored: Mapping[tuple[str, ...], jax.Array],
                     leaf_fn: Callable[[jax.Array], jax.Array]) -> Any:
  """A pytree shaped like `params["shared"]`: `factored[path]` at the sites'
  leaves, `leaf_fn(per-task leaf)` at the others."""
  def fill(path, leaf):
    names = tuple(getattr(k, "key", str(k)) for k in path)
    return factored[names] if leaf is None else leaf_fn(leaf)

  return jax.tree_util.tree_map_with_path(fill, fj.leaves,
                                          is_leaf=lambda x: x is None)


def combine(fj: FactoredJacobian, coeffs: jax.Array) -> Any:
  """`sum_k coeffs[k] grad L_k` of the shared params (this device's rows).

  Returns a pytree shaped like `params["shared"]`.
  """
  out: dict[tuple[str, ...], jax.Array] = {}
  for s in fj.sites:
    key = site_key(s.path)
    a, d = fj.acts[key], fj.deltas[key]
    dc = jnp.tensordot(coeffs.astype(d.dtype), d, axes=1)  # [N, out]
    out[s.path[1:] + ("kernel",)] = jnp.matmul(
        a.T, dc.astype(a.dtype), precision=_HIGHEST)
    if s.use_bias:
      out[s.path[1:] + ("bias",)] = jnp.sum(dc, axis=0)

  return _fill_unfactored(fj, out, lambda leaf: jnp.tensordot(
      coeffs.astype(leaf.dtype), leaf, axes=1))
