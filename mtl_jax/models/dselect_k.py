"""DSelect-k: a differentiable, sparse gate for mixture-of-experts MTL.

Hazimeh et al. 2021, "DSelect-k: Differentiable Selection in the Mixture of
Experts with Applications to Multi-Task Learning" (NeurIPS). `DSelectKModel`
is MMoE (`moe.MMoEModel`) with each task's softmax gate replaced by a DSelect-k
gate, which can converge to using exactly k of the E shared experts.

The gate. With m = ceil(log2 E) bits, a *single-expert selector* turns m logits
z into weights over the experts by a smooth binary encoding,

  r(z)_i = prod_{j=1..m} S(z_j)^[bit_j(i) = 1] (1 - S(z_j))^[bit_j(i) = 0],

where bit_j(i) is the j-th binary digit of i (most significant first, as in the
paper's code) and S is the smooth-step function

  S(t) = 0                                  if t <= -gamma/2,
         -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2   if -gamma/2 <= t <= gamma/2,
         1                                  if t >= gamma/2,

which is C1 and reaches exactly 0 and 1, so a selector whose logits leave the
cubic region selects exactly one expert (with E = 2^m the r_i are products of
the per-bit probabilities and sum to 1). The gate combines k selectors with
softmax weights: `q = sum_{i=1..k} softmax(alpha)_i r(z^(i))`, so at most k
experts get non-zero weight. Per-example gates ("example conditioned", the
default) compute `z = Z x + b_z` and `alpha = A x + b_alpha` from the gate
input x; task-only gates learn z and alpha as free parameters.

Number of experts. E need not be a power of 2; as in the paper's code, the
selectors then encode 2^m codes of which only the first E are experts, the
weights of one selector sum to `sum_{i<E} r_i <= 1`, and an auxiliary loss
keeps unreachable codes from taking the weight (see `DSelectKGate`).

Auxiliary losses (sown into "aux_losses", already multiplied by their weights;
the train step adds every sown value to the objective):
  "entropy"       `entropy_weight * mean_b sum_i H(r(z^(i)))`, with
                  `H(r) = -sum_e r_e log(r_e + 1e-6)`: pushes each selector to a
                  single expert (only when `entropy_weight > 0`).
  "reachability"  `mean_b sum_i (1 / sum_{e<E} r(z^(i))_e - 1)` (only when E is
                  not a power of 2).

Param layout:
  {"shared": {"trunk"?: ..., "experts": {"expert_<e>": <MLP>}},
   "tasks": {task: {"gate": {"z_logits": <Dense k*m>, "w_logits": <Dense k>},
                    "head": <Head>}}}
with task-only gates `"gate": {"z_logits": [k, m], "w_logits": [k]}`.

Deviations from the paper's code, all documented where they happen: the
auxiliary losses are means over the batch rather than sums (so their scale does
not depend on the batch size, like the task losses); the reachability loss has
the constant k subtracted (same gradient, and it reads 0 once every selector's
weight is on real experts); the entropy weight is a constant (the code allows a
schedule; schedule it outside by rebuilding the model); aux losses are sown
whenever the collection is mutable (except during `init`), not only in
training.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.models import heads as heads_lib
from mtl_jax.models import moe

# Inside the log of the entropy regulariser, as in the paper's code: keeps
# log(0) out of the value and its gradient when a selector has converged.
ENTROPY_EPSILON = 1e-6


def smooth_step(t: jax.Array, gamma: float = 1.0) -> jax.Array:
  """The smooth-step function S of Hazimeh et al. (2020, 2021).

  Args:
    t: logits, any shape.
    gamma: width of the cubic region `[-gamma/2, gamma/2]`.

  Returns:
    `S(t)` elementwise: 0 below `-gamma/2`, 1 above `gamma/2`, and
    `-2/gamma^3 t^3 + 3/(2 gamma) t + 1/2` in between (C1 at both ends).
  """
  t = jnp.asarray(t)
  cubic = -2.0 / gamma ** 3 * t ** 3 + 1.5 / gamma * t + 0.5
  # Both branches are finite everywhere, so the where's gradient is clean: the
  # cubic's slope outside [-gamma/2, gamma/2] is masked, not NaN.
  return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def num_binary(num_experts: int) -> int:
  """m = ceil(log2 E): bits needed to encode E experts."""
  return math.ceil(math.log2(num_experts))


def binary_codes(num_experts: int) -> np.ndarray:
  """`[E, m]` bool: row i is the binary code of i, most significant first."""
  m = num_binary(num_experts)
  return np.array([[c == "1" for c in np.binary_repr(i, width=m)]
                   for i in range(num_experts)], dtype=bool).reshape(
                       num_experts, m)


def single_expert_selectors(z_logits: jax.Array, num_experts: int,
                            gamma: float = 1.0) -> jax.Array:
  """Weights of single-expert selectors over the experts.

  Args:
    z_logits: `[..., m]` logits, one per bit, `m = num_binary(num_experts)`.
    num_experts: E.
    gamma: smooth-step width.

  Returns:
    `[..., E]` non-negative weights `r`, `r_i = prod_j S(z_j)` or `1 - S(z_j)`
    as bit j of i is 1 or 0. They sum to 1 when E is a power of 2, and to at
    most 1 otherwise (the codes E..2^m-1 are unreachable).
  """
  s = smooth_step(z_logits, gamma)[..., None, :]  # [..., 1, m]
  codes = jnp.asarray(binary_codes(num_experts))  # [E, m]
  return jnp.prod(jnp.where(codes, s, 1.0 - s), axis=-1)  # [..., E]


def _symmetric_uniform(limit: float) -> nn.initializers.Initializer:
  """U(-limit, limit), the paper code's initialiser (Keras RandomUniform)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


class DSelectKGate(nn.Module):
  """A DSelect-k gate: mixture weights `[B, E]` with at most k non-zeros.

  Sows into "intermediates": "selector_outputs" `[B, k, E]` and "weights"
  `[B, E]`; into "aux_losses": "entropy" (if `entropy_weight > 0`) and
  "reachability" (if E is not a power of 2), see the module docstring.

  Initialisation follows the paper's code: z logits (kernel and bias)
  U(-gamma/100, gamma/100), so every smooth step starts near 1/2 and every
  expert near weight 1/E; selector logits U(-0.05, 0.05).

  Attributes:
    num_experts: E >= 2.
    num_nonzeros: k, 1 <= k <= E: the number of single-expert selectors.
    gamma: smooth-step width (> 0).
    entropy_weight: weight of the entropy regulariser (>= 0; 0 = off).
    example_conditioned: gate from the input x (True) or task-only (False:
      the same weights for every example, x only sets the batch size).
  """

  num_experts: int
  num_nonzeros: int = 2
  gamma: float = 1.0
  entropy_weight: float = 0.0
  example_conditioned: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [B, D] -> [B, E]` mixture weights."""
    batch = x.shape[0]
    k, m = self.num_nonzeros, num_binary(self.num_experts)
    z_init = _symmetric_uniform(self.gamma / 100)
    w_init = _symmetric_uniform(0.05)
    if self.example_conditioned:
      z = nn.Dense(k * m, kernel_init=z_init, bias_init=z_init,
                   name="z_logits")(x).reshape(batch, k, m)  # [B, k, m]
      alpha = nn.Dense(k, kernel_init=w_init, bias_init=w_init,
                       name="w_logits")(x)  # [B, k]
    else:
      z = jnp.broadcast_to(self.param("z_logits", z_init, (k, m)),
                           (batch, k, m))
      alpha = jnp.broadcast_to(self.param("w_logits", w_init, (k,)),
                               (batch, k))
    selectors = single_expert_selectors(z, self.num_experts,
                                        self.gamma)  # [B, k, E]
    selector_weights = jax.nn.softmax(alpha, axis=-1)  # [B, k]
    weights = jnp.einsum("bk,bke->be", selector_weights, selectors)  # [B, E]
    if moe.is_collected(self, "intermediates"):
      self.sow("intermediates", "selector_outputs", selectors)
      self.sow("intermediates", "weights", weights)

    # Only computed when collected: the train step makes "aux_losses" mutable,
    # inference and `init` do not keep it.
    collect = moe.is_collected(self, "aux_losses")
    if self.entropy_weight and collect:
      entropy = -jnp.sum(selectors * jnp.log(selectors + ENTROPY_EPSILON),
                         axis=(1, 2))  # [B]
      self.sow("aux_losses", "entropy",
               self.entropy_weight * jnp.mean(entropy))
    if self.num_experts != 2 ** m and collect:
      # The paper code's 1 / (reachable weight) per selector, minus its floor
      # (1 each): without it a selector can put all its weight on codes >= E,
      # i.e. on no expert at all.
      reachable = jnp.sum(selectors, axis=-1)  # [B, k]
      self.sow("aux_losses", "reachability",
               jnp.mean(jnp.sum(1.0 / reachable - 1.0, axis=-1)))
    return weights


class _DSelectKTower(nn.Module):
  """One DSelect-k task: its gate over the shared experts, then its head."""

  num_experts: int
  num_nonzeros: int
  gamma: float
  entropy_weight: float
  example_conditioned: bool
  output_shape: tuple[int, ...]
  head_hidden_sizes: Sequence[int] = ()

  @nn.compact
  def __call__(self, x: jax.Array, experts: jax.Array, *, train: bool = False
               ) -> jax.Array:
    weights = DSelectKGate(self.num_experts, self.num_nonzeros, self.gamma,
                           self.entropy_weight, self.example_conditioned,
                           name="gate")(x)  # [B, E]
    head = heads_lib.Head(tuple(self.output_shape),
                          tuple(self.head_hidden_sizes), name="head")
    return head(moe.mix(weights, experts), train=train)


class DSelectKModel(nn.Module):
  """Shared experts with one DSelect-k gate per task (Hazimeh et al. 2021).

  `prediction_t = head_t(sum_e q_{t,e}(x) f_e(x))` with E shared MLP experts
  and `q_t` task t's `DSelectKGate`, which puts weight on at most k experts.

  Params: `{"shared": {"trunk"?, "experts": {"expert_<e>"}},
            "tasks": {task: {"gate": {"z_logits", "w_logits"}, "head"}}}`.
  Aux losses (sown by each task's gate, under `tasks/<task>/gate`): "entropy"
  when `entropy_weight > 0`, "reachability" when E is not a power of 2.

  Attributes:
    tasks_output_shapes: `{task_name: output_shape}`.
    num_experts: E >= 2 shared experts (a power of 2 wastes no code; otherwise
      see the module docstring).
    num_nonzeros: k, 1 <= k <= E, the most experts a task's gate uses.
    gamma: smooth-step width; larger gammas keep gates soft for longer.
    entropy_weight: weight of the selectors' entropy regulariser (0 = off).
    example_conditioned: per-example gates (True) or task-only gates (False).
    expert_hidden_sizes: widths of each expert's layers (last = expert output).
    head_hidden_sizes: widths of each head's hidden layers.
    dropout_rate: expert dropout (training only; needs a "dropout" rng).
    input_trunk: optional shared module before the experts and gates.
  """

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  num_experts: int = 4
  num_nonzeros: int = 2
  gamma: float = 1.0
  entropy_weight: float = 0.0
  example_conditioned: bool = True
  expert_hidden_sizes: Sequence[int] = (64,)
  head_hidden_sizes: Sequence[int] = ()
  dropout_rate: float = 0.0
  input_trunk: nn.Module | None = None

  def setup(self):
    model = "DSelectKModel"
    heads_lib.check_tasks(model, self.tasks_output_shapes)
    moe.check_count(model, "num_experts", self.num_experts, 2)
    moe.check_count(model, "num_nonzeros", self.num_nonzeros, 1)
    if self.num_nonzeros > self.num_experts:
      raise ValueError(f"{model}: num_nonzeros ({self.num_nonzeros}) must be "
                       f"<= num_experts ({self.num_experts})")
    if not self.gamma > 0:
      raise ValueError(f"{model}: gamma must be > 0, got {self.gamma!r}")
    if not self.entropy_weight >= 0:
      raise ValueError(f"{model}: entropy_weight must be >= 0, got "
                       f"{self.entropy_weight!r}")
    moe.check_hidden_sizes(model, "expert_hidden_sizes",
                           self.expert_hidden_sizes, allow_empty=False)
    self.shared = moe.SharedExperts(self.num_experts,
                                    tuple(self.expert_hidden_sizes),
                                    self.dropout_rate, self.input_trunk)
    self.tasks = moe.TaskTowers({
        name: _DSelectKTower(self.num_experts, self.num_nonzeros, self.gamma,
                             self.entropy_weight, self.example_conditioned,
                             tuple(shape), tuple(self.head_hidden_sizes))
        for name, shape in self.tasks_output_shapes.items()})

  def __call__(self, inputs: jax.Array, *, train: bool = False
               ) -> dict[str, jax.Array]:
    """Returns `{task: [B, *output_shape]}`."""
    x, experts = self.shared(inputs, train=train)  # [B, D_in], [B, E, D]
    return self.tasks(x, experts, train=train)
