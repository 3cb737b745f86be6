"""Mixture-of-experts multi-task models: MMoE, CGC and PLE.

All three share one idea: a few expert networks see the input, and a gate per
task (a linear layer and a softmax over experts, computed from the input)
decides how much each expert contributes to that task's head input,

  task input_t(x) = sum_e g_{t,e}(x) f_e(x),   g_t(x) = softmax(W_t x + b_t).

* `MMoEModel` (Ma et al. 2018, "Modeling Task Relationships in Multi-task
  Learning with Multi-gate Mixture-of-Experts", KDD): E shared experts, one gate
  and one head per task.
* `CGCModel` (Customized Gate Control; Tang et al. 2020, "Progressive Layered
  Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized
  Recommendations", RecSys): shared experts plus task-specific experts; a task's
  gate mixes its own experts and the shared ones, never another task's.
* `PLEModel` (same paper): `num_levels` stacked CGC-like extraction layers. At
  every level but the last, a shared gate mixes *all* experts of the level
  (every task's and the shared ones) into the input of the next level's shared
  experts; each task's gate feeds that task's experts at the next level.

Experts are `trunks.MLP`s on flattened inputs (ReLU outputs, last layer named
"features"), optionally preceded by a shared `input_trunk` (e.g. a
`trunks.ConvNet` for images); gates read the same input as the experts of their
level (the trunk's features, or the flattened inputs, at the first level).

Param layout (the library's `{"shared", "tasks"}` split):

  MMoE  {"shared": {"trunk"?: ..., "experts": {"expert_0": <MLP>, ...}},
         "tasks": {task: {"gate": <Dense>, "head": <Head>}}}
  CGC   {"shared": {"trunk"?: ..., "experts": {"expert_0": ..., ...}},
         "tasks": {task: {"experts"?: {"expert_0": ...}, "gate": <Dense>,
                          "head": <Head>}}}
  PLE   {"shared": {"trunk"?: ...,
                    "level_<l>": {"experts": ..., "gate": <Dense>}},  # no gate
                                                             # at the last level
         "tasks": {task: {"level_<l>": {"experts"?: ..., "gate": <Dense>},
                          "head": <Head>}}}

("trunk" only with an `input_trunk`; a task's "experts" only with
`num_task_experts > 0`.) Gate weights are sown into the "intermediates"
collection as "gate_weights" (`[B, num_candidates]`; never during `init`), so
`apply(..., mutable=["intermediates"])` exposes the routing for analysis; no
auxiliary loss is sown: softmax gates are dense and the papers add no balancing
loss.

Candidate order of a gate (the columns of its weights): a task gate mixes
`[its own experts..., shared experts...]`; PLE's shared gate mixes
`[experts of task 1..., ..., experts of task K..., shared experts...]` with the
tasks in the order of `tasks_output_shapes`.

Note on PLE and the split: a task's experts at a level below the last also feed
the shared gate of that level, so they influence every task's prediction. They
live under `tasks/<name>` (they are that task's experts in the paper), so the
train step gives them the weighted sum of all tasks' gradients, and gradient
aggregators, which act on `params["shared"]` only, do not see them. Everything
of the last level, every head and the task gates of the second-to-last level
affect their own task only.

GradNorm's "last shared layer" is `("trunk", "features")` with an input trunk;
without one, no single shared layer feeds every task (each expert ends in its
own "features" layer).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models import heads as heads_lib
from mtl_jax.models import trunks


# --------------------------------------------------------------------------
# Validation.


def check_count(model: str, what: str, value: int, minimum: int) -> None:
  """Raises ValueError unless `value` is an int >= `minimum`."""
  if not isinstance(value, int) or value < minimum:
    raise ValueError(f"{model}: {what} must be an integer >= {minimum}, got "
                     f"{value!r}")


def check_hidden_sizes(model: str, what: str, sizes: Sequence[int], *,
                       allow_empty: bool) -> None:
  """Raises ValueError unless `sizes` is a (non-empty) sequence of ints > 0."""
  sizes = tuple(sizes)
  if (not sizes and not allow_empty) or any(
      not isinstance(s, int) or s < 1 for s in sizes):
    kind = "sequence" if allow_empty else "non-empty sequence"
    raise ValueError(f"{model}: {what} must be a {kind} of positive widths, "
                     f"got {sizes!r}")


# --------------------------------------------------------------------------
# Building blocks.


def is_collected(module: nn.Module, collection: str) -> bool:
  """Whether values sown into `collection` would be kept (and worth computing).

  Not during `init`: init makes every collection mutable, and sown values would
  come back as extra variable collections next to "params", which the train
  state does not carry (`training.state.init_params` rejects them).
  """
  return (module.is_mutable_collection(collection) and
          not module.is_initializing())


def flatten(x: jax.Array) -> jax.Array:
  """`[B, ...] -> [B, prod(...)]`."""
  return x.reshape(x.shape[0], -1)


def mix(weights: jax.Array, experts: jax.Array) -> jax.Array:
  """The weighted sum of expert outputs, one mixture per example.

  Args:
    weights: `[B, E]` mixture weights.
    experts: `[B, E, D]` expert outputs.

  Returns:
    `[B, D]`: `sum_e weights[b, e] * experts[b, e]`.
  """
  return jnp.einsum("be,bed->bd", weights, experts)


def softmax_gate(module: nn.Module, x: jax.Array, num_candidates: int
                 ) -> jax.Array:
  """A linear softmax gate named "gate" inside `module` (call it from compact).

  Weights are sown into `module`'s "intermediates" as "gate_weights" (when
  that collection is mutable, outside `init`).

  Args:
    module: the (compact) module that owns the gate.
    x: `[B, D]` gate input.
    num_candidates: number of experts the gate mixes.

  Returns:
    `[B, num_candidates]` non-negative weights that sum to 1 per example.
  """
  logits = nn.Dense(num_candidates, name="gate")(x)  # [B, E]
  weights = jax.nn.softmax(logits, axis=-1)
  if is_collected(module, "intermediates"):
    module.sow("intermediates", "gate_weights", weights)
  return weights


class Experts(nn.Module):
  """`num_experts` independent MLP experts applied to the same input.

  Separate modules rather than one `nn.vmap`-ed stack: expert counts in MTL are
  small (a handful), and a per-expert param tree ("expert_0", ...) keeps the
  experts easy to inspect, map between models, and test one by one.

  Attributes:
    num_experts: E >= 0 (0 gives an empty `[B, 0, D]` output and no params).
    hidden_sizes: widths of each expert's layers; the last is the output size D.
    dropout_rate: dropout after each expert layer (training only).
  """

  num_experts: int
  hidden_sizes: Sequence[int] = (64,)
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.num_experts == 0:
      # Lets CGC/PLE run without task-specific experts (a plain MMoE gate).
      return jnp.zeros((x.shape[0], 0, self.hidden_sizes[-1]), x.dtype)
    outs = [trunks.MLP(hidden_sizes=tuple(self.hidden_sizes),
                       dropout_rate=self.dropout_rate,
                       name=f"expert_{e}")(x, train=train)
            for e in range(self.num_experts)]
    return jnp.stack(outs, axis=1)  # [B, E, D]


class SharedExperts(nn.Module):
  """The shared part of MMoE, CGC and DSelect-k: optional trunk and E experts.

  Params: `{"trunk"?: <input_trunk params>, "experts": {"expert_<e>": ...}}`.

  Attributes:
    num_experts: number of shared experts.
    expert_hidden_sizes: widths of each expert's layers.
    dropout_rate: expert dropout (training only).
    input_trunk: optional module applied to the inputs before the experts (and
      the gates); its params live under "trunk".
  """

  num_experts: int
  expert_hidden_sizes: Sequence[int] = (64,)
  dropout_rate: float = 0.0
  input_trunk: nn.Module | None = None

  def setup(self):
    # A clone, so that the trunk's params are named "trunk" here rather than
    # under the parent that holds `input_trunk` as a field.
    self.trunk = (self.input_trunk.clone() if self.input_trunk is not None
                  else None)
    self.experts = Experts(self.num_experts, tuple(self.expert_hidden_sizes),
                           self.dropout_rate)

  def __call__(self, inputs: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """Returns `(x [B, D_in], experts [B, E, D])`: gate input, experts."""
    x = flatten(self.encode(inputs, train=train))  # [B, D_in]
    return x, self.experts(x, train=train)

  def encode(self, inputs: jax.Array, *, train: bool = False) -> jax.Array:
    """The trunk's features, or the inputs themselves without a trunk."""
    return self.trunk(inputs, train=train) if self.trunk is not None else inputs


class TaskTowers(nn.Module):
  """Calls one tower per task on the same arguments; params under task names.

  Attributes:
    towers: `{task_name: module}`; each is called as `tower(*args, train=...)`.
  """

  towers: Mapping[str, nn.Module]

  @nn.compact
  def __call__(self, *args: jax.Array, train: bool = False
               ) -> dict[str, jax.Array]:
    # Cloning with name=task gives the param tree {task: ...} instead of linen's
    # "towers_<task>" names for dict attributes.
    return {name: tower.clone(parent=self, name=name)(*args, train=train)
            for name, tower in self.towers.items()}


# --------------------------------------------------------------------------
# MMoE.


class _MMoETower(nn.Module):
  """One MMoE task: a softmax gate over the shared experts, then the head."""

  num_experts: int
  output_shape: tuple[int, ...]
  head_hidden_sizes: Sequence[int] = ()

  @nn.compact
  def __call__(self, x: jax.Array, experts: jax.Array, *, train: bool = False
               ) -> jax.Array:
    weights = softmax_gate(self, x, self.num_experts)  # [B, E]
    head = heads_lib.Head(tuple(self.output_shape),
                          tuple(self.head_hidden_sizes), name="head")
    return head(mix(weights, experts), train=train)


class MMoEModel(nn.Module):
  """Multi-gate mixture of experts (Ma et al. 2018).

  `prediction_t = head_t(sum_e softmax(W_t x + b_t)_e f_e(x))` with E shared MLP
  experts `f_e` and, per task, a linear softmax gate and a head. With one expert
  the gates are constant 1 and the model is hard parameter sharing.

  Params: `{"shared": {"trunk"?, "experts": {"expert_<e>"}},
            "tasks": {task: {"gate", "head"}}}`.

  Attributes:
    tasks_output_shapes: `{task_name: output_shape}`, e.g. `{"left": (10,),
      "sum": ()}`.
    num_experts: E >= 1 shared experts.
    expert_hidden_sizes: widths of each expert's layers (last = expert output).
    head_hidden_sizes: widths of each head's hidden layers.
    dropout_rate: expert dropout (training only; needs a "dropout" rng).
    input_trunk: optional shared module before the experts and gates (e.g.
      `trunks.ConvNet()` for images); params under `shared/trunk`.
  """

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  num_experts: int = 4
  expert_hidden_sizes: Sequence[int] = (64,)
  head_hidden_sizes: Sequence[int] = ()
  dropout_rate: float = 0.0
  input_trunk: nn.Module | None = None

  def setup(self):
    heads_lib.check_tasks("MMoEModel", self.tasks_output_shapes)
    check_count("MMoEModel", "num_experts", self.num_experts, 1)
    check_hidden_sizes("MMoEModel", "expert_hidden_sizes",
                       self.expert_hidden_sizes, allow_empty=False)
    self.shared = SharedExperts(self.num_experts,
                                tuple(self.expert_hidden_sizes),
                                self.dropout_rate, self.input_trunk)
    self.tasks = TaskTowers({
        name: _MMoETower(self.num_experts, tuple(shape),
                         tuple(self.head_hidden_sizes))
        for name, shape in self.tasks_output_shapes.items()})

  def __call__(self, inputs: jax.Array, *, train: bool = False
               ) -> dict[str, jax.Array]:
    """Returns `{task: [B, *output_shape]}`."""
    x, experts = self.shared(inputs, train=train)  # [B, D_in], [B, E, D]
    return self.tasks(x, experts, train=train)


# --------------------------------------------------------------------------
# CGC.


class _CGCTower(nn.Module):
  """One CGC task: its own experts, a gate over [own, shared], the head."""

  num_task_experts: int
  num_shared_experts: int
  expert_hidden_sizes: Sequence[int]
  dropout_rate: float
  output_shape: tuple[int, ...]
  head_hidden_sizes: Sequence[int] = ()

  @nn.compact
  def __call__(self, x: jax.Array, shared: jax.Array, *, train: bool = False
               ) -> jax.Array:
    own = Experts(self.num_task_experts, tuple(self.expert_hidden_sizes),
                  self.dropout_rate, name="experts")(x, train=train)
    # own: [B, Et, D], shared: [B, Es, D]
    candidates = jnp.concatenate([own, shared], axis=1)  # [B, Et + Es, D]
    weights = softmax_gate(self, x, candidates.shape[1])
    head = heads_lib.Head(tuple(self.output_shape),
                          tuple(self.head_hidden_sizes), name="head")
    return head(mix(weights, candidates), train=train)


class CGCModel(nn.Module):
  """Customized Gate Control (Tang et al. 2020), PLE's single extraction layer.

  Task t's head reads `sum_j softmax(W_t x + b_t)_j c_j(x)` over the candidates
  `c = [task t's experts..., shared experts...]`: unlike MMoE, a task never
  mixes another task's experts, which the paper finds reduces negative
  transfer ("seesaw") between weakly related tasks.

  Params: `{"shared": {"trunk"?, "experts": {"expert_<e>"}},
            "tasks": {task: {"experts"?: {"expert_<e>"}, "gate", "head"}}}`.

  Attributes:
    tasks_output_shapes: `{task_name: output_shape}`.
    num_shared_experts: >= 1 experts shared by all tasks.
    num_task_experts: >= 0 experts per task.
    expert_hidden_sizes: widths of each expert's layers (last = expert output).
    head_hidden_sizes: widths of each head's hidden layers.
    dropout_rate: expert dropout (training only; needs a "dropout" rng).
    input_trunk: optional shared module before the experts and gates.
  """

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  num_shared_experts: int = 2
  num_task_experts: int = 2
  expert_hidden_sizes: Sequence[int] = (64,)
  head_hidden_sizes: Sequence[int] = ()
  dropout_rate: float = 0.0
  input_trunk: nn.Module | None = None

  def setup(self):
    heads_lib.check_tasks("CGCModel", self.tasks_output_shapes)
    check_count("CGCModel", "num_shared_experts", self.num_shared_experts, 1)
    check_count("CGCModel", "num_task_experts", self.num_task_experts, 0)
    check_hidden_sizes("CGCModel", "expert_hidden_sizes",
                       self.expert_hidden_sizes, allow_empty=False)
    self.shared = SharedExperts(self.num_shared_experts,
                                tuple(self.expert_hidden_sizes),
                                self.dropout_rate, self.input_trunk)
    self.tasks = TaskTowers({
        name: _CGCTower(self.num_task_experts, self.num_shared_experts,
                        tuple(self.expert_hidden_sizes), self.dropout_rate,
                        tuple(shape), tuple(self.head_hidden_sizes))
        for name, shape in self.tasks_output_shapes.items()})

  def __call__(self, inputs: jax.Array, *, train: bool = False
               ) -> dict[str, jax.Array]:
    """Returns `{task: [B, *output_shape]}`."""
    x, shared = self.shared(inputs, train=train)  # [B, D_in], [B, Es, D]
    return self.tasks(x, shared, train=train)


# --------------------------------------------------------------------------
# PLE.


class _Extraction(nn.Module):
  """One group's experts at one PLE level, and its gate (if any).

  The gate input is the group's input at this level (the experts' input), as in
  the paper's `w^{k,j}(g^{k,j-1}(x))`.
  """

  num_experts: int
  expert_hidden_sizes: Sequence[int]
  dropout_rate: float
  gate_size: int  # candidates the gate mixes; 0 for no gate

  def setup(self):
    self.experts = Experts(self.num_experts, tuple(self.expert_hidden_sizes),
                           self.dropout_rate)
    if self.gate_size:
      self.gate = nn.Dense(self.gate_size)

  def __call__(self, h: jax.Array, *, train: bool = False) -> jax.Array:
    """`h [B, D_in] -> [B, E, D]` expert outputs."""
    return self.experts(h, train=train)

  def mix(self, h: jax.Array, candidates: jax.Array) -> jax.Array:
    """`h [B, D_in]`, `candidates [B, gate_size, D]` -> `[B, D]`."""
    weights = jax.nn.softmax(self.gate(h), axis=-1)  # [B, gate_size]
    if is_collected(self, "intermediates"):
      self.sow("intermediates", "gate_weights", weights)
    return mix(weights, candidates)


class _PLEShared(nn.Module):
  """PLE's shared group: optional trunk, shared experts and gates per level."""

  num_levels: int
  num_experts: int
  expert_hidden_sizes: Sequence[int]
  dropout_rate: float
  gate_size: int  # all experts of a level: K * num_task_experts + num_experts
  input_trunk: nn.Module | None = None

  def setup(self):
    self.trunk = (self.input_trunk.clone() if self.input_trunk is not None
                  else None)
    # The last level has no shared gate: nothing reads shared features there.
    self.levels = [
        _Extraction(self.num_experts, tuple(self.expert_hidden_sizes),
                    self.dropout_rate,
                    self.gate_size if l < self.num_levels - 1 else 0,
                    name=f"level_{l}")
        for l in range(self.num_levels)]

  def encode(self, inputs: jax.Array, *, train: bool = False) -> jax.Array:
    """`inputs [B, ...] -> [B, D_in]`: trunk features or flattened inputs."""
    x = self.trunk(inputs, train=train) if self.trunk is not None else inputs
    return flatten(x)

  def experts(self, level: int, h: jax.Array, *, train: bool = False
              ) -> jax.Array:
    return self.levels[level](h, train=train)  # [B, Es, D]

  def mix(self, level: int, h: jax.Array, candidates: jax.Array) -> jax.Array:
    return self.levels[level].mix(h, candidates)  # [B, D]


class _PLETower(nn.Module):
  """One PLE task: its experts and gate at every level, and its head."""

  num_levels: int
  num_experts: int
  expert_hidden_sizes: Sequence[int]
  dropout_rate: float
  gate_size: int  # num_task_experts + num_shared_experts
  output_shape: tuple[int, ...]
  head_hidden_sizes: Sequence[int] = ()

  def setup(self):
    self.levels = [
        _Extraction(self.num_experts, tuple(self.expert_hidden_sizes),
                    self.dropout_rate, self.gate_size, name=f"level_{l}")
        for l in range(self.num_levels)]
    self.head = heads_lib.Head(tuple(self.output_shape),
                               tuple(self.head_hidden_sizes))

  def experts(self, level: int, h: jax.Array, *, train: bool = False
              ) -> jax.Array:
    return self.levels[level](h, train=train)  # [B, Et, D]

  def mix(self, level: int, h: jax.Array, candidates: jax.Array) -> jax.Array:
    return self.levels[level].mix(h, candidates)  # [B, D]

  def predict(self, h: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(h, train=train)


class _PLETasks(nn.Module):
  """The "tasks" subtree of PLE: one `_PLETower` per task, named by the task."""

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  num_levels: int
  num_experts: int
  expert_hidden_sizes: Sequence[int]
  dropout_rate: float
  gate_size: int
  head_hidden_sizes: Sequence[int] = ()

  def setup(self):
    # Built here with name=task (not passed in and cloned): linen names the
    # entries of a dict attribute "<attribute>_<key>" unless they carry a name.
    self.by_name = {
        name: _PLETower(self.num_levels, self.num_experts,
                        tuple(self.expert_hidden_sizes), self.dropout_rate,
                        self.gate_size, tuple(shape),
                        tuple(self.head_hidden_sizes), name=name)
        for name, shape in self.tasks_output_shapes.items()}

  def experts(self, level: int, h: Mapping[str, jax.Array], *,
              train: bool = False) -> dict[str, jax.Array]:
    return {t: self.by_name[t].experts(level, h[t], train=train) for t in h}

  def mix(self, level: int, h: Mapping[str, jax.Array],
          candidates: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {t: self.by_name[t].mix(level, h[t], candidates[t]) for t in h}

  def predict(self, h: Mapping[str, jax.Array], *, train: bool = False
              ) -> dict[str, jax.Array]:
    return {t: self.by_name[t].predict(h[t], train=train) for t in h}


class PLEModel(nn.Module):
  """Progressive Layered Extraction (Tang et al. 2020).

  With `h_s^0 = h_t^0 = x` (trunk features or flattened inputs), level
  `l = 0..L-1` computes shared experts `S^l(h_s^l)` and task experts
  `T_t^l(h_t^l)`, then

    h_t^{l+1} = sum softmax(W_t^l h_t^l) * [T_t^l, S^l]           (task gates)
    h_s^{l+1} = sum softmax(W_s^l h_s^l) * [T_1^l, ..., T_K^l, S^l]  (l < L-1)

  and task t's head reads `h_t^L`. The last level has no shared gate (as in the
  paper: nothing above it reads shared features). With `num_levels=1` this is
  exactly `CGCModel` (under a different param layout: "level_0" scopes).

  Params: `{"shared": {"trunk"?, "level_<l>": {"experts", "gate" (l < L-1)}},
            "tasks": {task: {"level_<l>": {"experts"?, "gate"}, "head"}}}`.
  See the module docstring for why a task's lower-level experts, which also
  feed the shared gates, still live under `tasks`.

  Attributes:
    tasks_output_shapes: `{task_name: output_shape}`; its order is the order of
      the tasks' experts among the shared gates' candidates.
    num_levels: L >= 1 extraction levels.
    num_shared_experts: >= 1 shared experts per level.
    num_task_experts: >= 0 experts per task per level.
    expert_hidden_sizes: widths of each expert's layers, the same at every level
      (the last is the output size D, so levels above the first read D inputs).
    head_hidden_sizes: widths of each head's hidden layers.
    dropout_rate: expert dropout (training only; needs a "dropout" rng).
    input_trunk: optional shared module before the first level.
  """

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  num_levels: int = 2
  num_shared_experts: int = 2
  num_task_experts: int = 2
  expert_hidden_sizes: Sequence[int] = (64,)
  head_hidden_sizes: Sequence[int] = ()
  dropout_rate: float = 0.0
  input_trunk: nn.Module | None = None

  def setup(self):
    heads_lib.check_tasks("PLEModel", self.tasks_output_shapes)
    check_count("PLEModel", "num_levels", self.num_levels, 1)
    check_count("PLEModel", "num_shared_experts", self.num_shared_experts, 1)
    check_count("PLEModel", "num_task_experts", self.num_task_experts, 0)
    check_hidden_sizes("PLEModel", "expert_hidden_sizes",
                       self.expert_hidden_sizes, allow_empty=False)
    num_tasks = len(self.tasks_output_shapes)
    sizes = tuple(self.expert_hidden_sizes)
    self.shared = _PLEShared(
        self.num_levels, self.num_shared_experts, sizes, self.dropout_rate,
        num_tasks * self.num_task_experts + self.num_shared_experts,
        self.input_trunk)
    self.tasks = _PLETasks(
        self.tasks_output_shapes, self.num_levels, self.num_task_experts, sizes,
        self.dropout_rate, self.num_task_experts + self.num_shared_experts,
        tuple(self.head_hidden_sizes))

  def __call__(self, inputs: jax.Array, *, train: bool = False
               ) -> dict[str, jax.Array]:
    """Returns `{task: [B, *output_shape]}`."""
    names = tuple(self.tasks_output_shapes)
    h_shared = self.shared.encode(inputs, train=train)  # [B, D_in]
    h_tasks = {t: h_shared for t in names}
    for level in range(self.num_levels):
      shared = self.shared.experts(level, h_shared, train=train)  # [B, Es, D]
      own = self.tasks.experts(level, h_tasks, train=train)  # {t: [B, Et, D]}
      if level < self.num_levels - 1:
        every = jnp.concatenate([own[t] for t in names] + [shared], axis=1)
        next_shared = self.shared.mix(level, h_shared, every)  # [B, D]
      h_tasks = self.tasks.mix(level, h_tasks, {
          t: jnp.concatenate([own[t], shared], axis=1) for t in names})
      if level < self.num_levels - 1:
        h_shared = next_shared
    return self.tasks.predict(h_tasks, train=train)
