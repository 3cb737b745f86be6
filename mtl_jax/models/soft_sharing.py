"""Soft parameter sharing: one network per task, tied by an L2 penalty.

Each task has its own column (a copy of one trunk architecture, e.g.
`trunks.MLP` or `trunks.ConvNet`) and its own head. Nothing in the columns is
shared; instead an L2 penalty pulls corresponding parameters of the columns
towards each other (Duong et al. 2015, "Low Resource Dependency Parsing:
Cross-lingual Parameter Sharing in a Neural Network Parser"; Ruder 2017's MTL
overview calls this "soft parameter sharing"):

  penalty = strength * sum_{leaves l} sum_{i < j} ||theta_i^l - theta_j^l||^2

over every pair of tasks (i, j) and every leaf l of the column's param tree,
where theta_k^l is leaf l of task k's column. (Equivalently
`strength * K * sum_l sum_k ||theta_k^l - mean_k theta_k^l||^2`; the pairwise
form is computed because it is exactly zero when the columns are equal.) Heads
are not tied: their output shapes differ between tasks.

Params: `{"shared": {"scale": [C], "bias": [C]},
          "tasks": {task: {"column": <trunk params>, "head": <head params>}}}`.

Design decision on "shared": pure soft sharing shares nothing, but the library's
contract (weighting and aggregation act on `params["shared"]`) needs a shared
subtree, and flax drops empty collections. The model therefore starts with a
learned per-feature input affine map `x * scale + bias` over the last input axis
(channels of an image, features of a vector), shared by all columns. It is
initialised to the identity (scale 1, bias 0), so at initialisation the model
computes exactly K independent networks; it learns a common input
standardisation from every task's gradient. It assumes float inputs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models import heads as heads_lib

PyTree = Any

AUX_LOSS_NAME = "soft_sharing"


def pairwise_squared_distance(trees: Sequence[PyTree]) -> jax.Array:
  """Sum over leaves and over pairs i < j of `||trees[i] - trees[j]||^2`.

  Args:
    trees: K >= 1 pytrees of identical structure and leaf shapes.

  Returns:
    A float32 scalar; 0 for a single tree.

  Raises:
    ValueError: if the trees differ in structure or leaf shapes.
  """
  trees = list(trees)
  if not trees:
    raise ValueError("pairwise_squared_distance needs at least one tree")
  structure = jax.tree.structure(trees[0])
  shapes = [jnp.shape(l) for l in jax.tree.leaves(trees[0])]
  for k, tree in enumerate(trees[1:], start=1):
    if (jax.tree.structure(tree) != structure or
        [jnp.shape(l) for l in jax.tree.leaves(tree)] != shapes):
      raise ValueError(f"tree {k} differs from tree 0 in structure or leaf "
                       "shapes; soft sharing ties identical architectures only")
  total = jnp.zeros((), jnp.float32)
  # K(K-1)/2 explicit pairs rather than stacking [K, K, P] differences: K is
  # small, memory stays O(P), and equal trees give exactly 0.
  for i in range(len(trees)):
    for j in range(i + 1, len(trees)):
      for a, b in zip(jax.tree.leaves(trees[i]), jax.tree.leaves(trees[j])):
        total += jnp.sum(jnp.square(a.astype(jnp.float32) -
                                    b.astype(jnp.float32)))
  return total


def l2_penalty(params: Mapping[str, Any], strength: float) -> jax.Array:
  """The soft-sharing penalty of a `SoftSharingModel`'s params.

  `strength * sum_l sum_{i<j} ||theta_i^l - theta_j^l||^2` over the leaves l of
  the task columns `params["tasks"][task]["column"]` (heads and the shared
  input affine are not penalised).

  Args:
    params: the model's params `{"shared": ..., "tasks": {task: {"column": ...,
      "head": ...}}}`.
    strength: the penalty's multiplier (>= 0).

  Returns:
    A float32 scalar.

  Raises:
    ValueError: if `params` lacks "tasks" or a task lacks "column".
  """
  if "tasks" not in params:
    raise ValueError(f"l2_penalty: params have keys {sorted(params)}; expected "
                     "a SoftSharingModel's {'shared', 'tasks'}")
  columns = []
  for name, task_params in params["tasks"].items():
    if "column" not in task_params:
      raise ValueError(f"l2_penalty: params['tasks'][{name!r}] has no 'column' "
                       f"entry (keys: {sorted(task_params)})")
    columns.append(task_params["column"])
  return strength * pairwise_squared_distance(columns)


class InputAffine(nn.Module):
  """`x * scale + bias` over the last axis; the identity at initialisation."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))  # [C]
    bias = self.param("bias", nn.initializers.zeros, (features,))  # [C]
    return x * scale + bias


class _TaskNetwork(nn.Module):
  """One task's column and head: `inputs -> column -> head`."""

  template: nn.Module  # the column architecture, cloned (unused itself)
  output_shape: tuple[int, ...]
  head_hidden_sizes: Sequence[int]

  def setup(self):
    self.column = self.template.clone()
    self.head = heads_lib.Head(output_shape=tuple(self.output_shape),
                               hidden_sizes=tuple(self.head_hidden_sizes))

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self.head(self.column(x, train=train), train=train)


class _TaskNetworks(nn.Module):
  """Holds one `_TaskNetwork` per task, each named after its task."""

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  column: nn.Module
  head_hidden_sizes: Sequence[int]

  def setup(self):
    self.networks = {
        name: _TaskNetwork(self.column, tuple(shape), self.head_hidden_sizes,
                           name=name)
        for name, shape in self.tasks_output_shapes.items()}

  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    return {name: net(x, train=train) for name, net in self.networks.items()}


class SoftSharingModel(nn.Module):
  """One column per task, tied by an L2 penalty between the columns.

  Params are `{"shared": {"scale", "bias"}, "tasks": {task: {"column": ...,
  "head": ...}}}` (see the module docstring for why "shared" holds an input
  affine map). A task's column and head only affect that task's output.

  The penalty `l2_penalty(params, penalty_strength)` is sowed during the forward
  pass as `aux_losses/"soft_sharing"` (already multiplied by the strength) when
  the "aux_losses" collection is mutable, `penalty_strength > 0` and the model
  is not initialising (`init` returns params only); apply with
  `mutable=["aux_losses"]` and add the sum of that collection to the objective.
  Pass only `{"params": ...}` to `apply`: a sowed collection passed back in
  would be appended to, not replaced.

  Attributes:
    tasks_output_shapes: `{task_name: output_shape}` in task order, e.g.
      `{"left": (10,), "sum": ()}`.
    column: the per-task trunk, `inputs [B, ...] -> features [B, D]` (e.g.
      `trunks.MLP(hidden_sizes=(64, 64))`); cloned once per task, so all
      columns share one architecture (the penalty requires it).
    head_hidden_sizes: hidden widths of each task's `Head`.
    penalty_strength: multiplier of the pairwise L2 penalty (0 turns it off).
  """

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  column: nn.Module
  head_hidden_sizes: Sequence[int] = ()
  penalty_strength: float = 1e-3

  def setup(self):
    heads_lib.check_tasks("SoftSharingModel", self.tasks_output_shapes)
    if self.penalty_strength < 0:
      raise ValueError("SoftSharingModel: penalty_strength must be >= 0, got "
                       f"{self.penalty_strength}")
    self.shared = InputAffine()
    self.tasks = _TaskNetworks(self.tasks_output_shapes, self.column,
                               tuple(self.head_hidden_sizes))

  def __call__(self, inputs: jax.Array, *, train: bool = False
               ) -> dict[str, jax.Array]:
    """Returns `{task: prediction [B, *output_shape]}`; may sow the penalty."""
    outputs = self.tasks(self.shared(inputs), train=train)
    # Skipped when nobody collects it (eval, plain apply): saves tracing the
    # K(K-1)/2 pairwise differences. Not sown by `init` either, so that init
    # returns params only (init makes every collection mutable).
    if (self.penalty_strength and self.is_mutable_collection("aux_losses")
        and not self.is_initializing()):
      # Params of the columns just used (traced, so the penalty differentiates
      # with respect to them like any other loss term).
      task_params = self.tasks.variables["params"]
      penalty = l2_penalty({"tasks": task_params}, self.penalty_strength)
      self.sow("aux_losses", AUX_LOSS_NAME, penalty)
    return outputs
