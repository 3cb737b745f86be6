"""Adversarial shared-private multi-task model (Liu, Qiu, Huang 2017).

"Adversarial Multi-task Learning for Text Classification", adapted to any
inputs: a shared encoder S and one private encoder P_k per task; task k's head
reads `concat(S(x), P_k(x))`. A task discriminator D reads the shared features
through a gradient reversal layer and is trained to tell which tasks an example
is labelled for; the reversal makes the shared encoder maximise D's loss at the
same time, so the shared features carry no task-identifying information (the
paper's min-max adversarial loss, trained in one pass as in Ganin & Lempitsky
2015). An optional "difference" loss `sum_k ||S^T P_k||_F^2` pushes the shared
and private feature spaces apart (orthogonal).

Params: `{"shared": {"encoder": <S>, "discriminator": <D>},
          "tasks": {task: {"encoder": <P_k>, "head": <Head>}}}`.

Auxiliary losses, sowed into the "aux_losses" collection when it is mutable
and the model is not initialising (apply with `mutable=["aux_losses"]` and add
the sum of its leaves to the objective; `init` returns params only):
  "adversarial": `adversarial_weight * mean BCE(D(GRL(S(x))), task_presence)`,
    the mean of sigmoid binary cross-entropy over the `[B, K]` entries; only
    when `task_presence` is given and `adversarial_weight > 0`.
  "difference": `difference_weight * sum_k ||S^T P_k||_F^2` with `S [B, D_s]`,
    `P_k [B, D_p]` the batch's features; only when `difference_weight > 0`.
The discriminator's logits are also sowed as `intermediates/
"discriminator_logits"` `[B, K]` (kept only when "intermediates" is mutable).

Differences from the paper: batches here carry per-task masks rather than one
task id per example (an example may be labelled for several tasks or for none),
so the discriminator is multi-label: K sigmoid logits trained against
`task_presence [B, K]` instead of a K-way softmax over the source task. The
difference loss is taken over the whole batch (private features exist for
every example), unnormalised as in the paper, so it grows with B^2: its
weight depends on the batch size. Encoders are any trunks, not LSTMs.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mtl_jax.models import heads as heads_lib

ADVERSARIAL_LOSS_NAME = "adversarial"
DIFFERENCE_LOSS_NAME = "difference"


@jax.custom_vjp
def _reverse(x: jax.Array, scale: jax.Array) -> jax.Array:
  return x


def _reverse_fwd(x, scale):
  return x, scale


def _reverse_bwd(scale, g):
  # No gradient for `scale`: it is a hyperparameter, not something to learn.
  return -scale * g, jnp.zeros_like(scale)


_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def gradient_reversal(x: jax.Array, scale: float | jax.Array = 1.0
                      ) -> jax.Array:
  """Identity forward; multiplies the cotangent by `-scale` backward.

  Ganin & Lempitsky (2015)'s gradient reversal layer: what follows it is
  trained to minimise a loss while what precedes it is trained to maximise it
  (scaled by `scale`).

  Args:
    x: any array.
    scale: the reversal strength (>= 0 for an adversary; 0 blocks the
      gradient).

  Returns:
    `x` unchanged.
  """
  return _reverse(x, jnp.asarray(scale, dtype=x.dtype))


def discriminator_loss(logits: jax.Array, task_presence: jax.Array
                       ) -> jax.Array:
  """The discriminator's multi-label loss (before `adversarial_weight`).

  Args:
    logits: `[B, K]` discriminator logits.
    task_presence: `[B, K]`, 1.0 where the example is labelled for the task.

  Returns:
    The mean of sigmoid binary cross-entropy over the B * K entries.
  """
  return jnp.mean(optax.sigmoid_binary_cross_entropy(
      logits, task_presence.astype(logits.dtype)))


def difference_loss(shared_features: jax.Array,
                    private_features: Sequence[jax.Array]) -> jax.Array:
  """Liu et al.'s difference (orthogonality) loss (before its weight).

  Args:
    shared_features: S, `[B, D_s]`.
    private_features: the K private feature arrays P_k, each `[B, D_p]`.

  Returns:
    `sum_k ||S^T P_k||_F^2`, a float32 scalar.
  """
  total = jnp.zeros((), jnp.float32)
  for p in private_features:
    total += jnp.sum(jnp.square(shared_features.T @ p))  # [D_s, D_p]
  return total


class _SharedParts(nn.Module):
  """The shared encoder and the task discriminator."""

  encoder_template: nn.Module
  num_tasks: int
  discriminator_hidden_sizes: Sequence[int]

  def setup(self):
    self.encoder = self.encoder_template.clone()
    self.discriminator = heads_lib.Head(
        output_shape=(self.num_tasks,),
        hidden_sizes=tuple(self.discriminator_hidden_sizes))


class _TaskParts(nn.Module):
  """One task's private encoder and head."""

  encoder_template: nn.Module
  output_shape: tuple[int, ...]
  head_hidden_sizes: Sequence[int]

  def setup(self):
    self.encoder = self.encoder_template.clone()
    self.head = heads_lib.Head(output_shape=tuple(self.output_shape),
                               hidden_sizes=tuple(self.head_hidden_sizes))


class _Tasks(nn.Module):
  """Holds one `_TaskParts` per task, each named after its task."""

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  encoder_template: nn.Module
  head_hidden_sizes: Sequence[int]

  def setup(self):
    self.parts = {
        name: _TaskParts(self.encoder_template, tuple(shape),
                         self.head_hidden_sizes, name=name)
        for name, shape in self.tasks_output_shapes.items()}


class AdversarialSharedPrivateModel(nn.Module):
  """Shared and private encoders, with an adversarial task discriminator.

  Params are `{"shared": {"encoder", "discriminator"}, "tasks": {task:
  {"encoder", "head"}}}`. The discriminator gets gradient only from the
  adversarial loss; through the reversal layer the shared encoder gets
  `-reversal_scale` times that loss's gradient. A task's private encoder and
  head only affect that task's output (and the difference loss).

  Attributes:
    tasks_output_shapes: `{task_name: output_shape}` in task order (the order
      of the discriminator's logits and of `task_presence`'s columns).
    shared_encoder: trunk `inputs [B, ...] -> [B, D_s]`, e.g. `trunks.MLP()`.
    private_encoder: trunk `inputs [B, ...] -> [B, D_p]`, cloned per task.
    head_hidden_sizes: hidden widths of each task's `Head`.
    discriminator_hidden_sizes: hidden widths of the discriminator.
    adversarial_weight: multiplier of the discriminator loss (paper: 0.05).
    reversal_scale: gradient reversal strength into the shared encoder.
    difference_weight: multiplier of the difference loss (0: off; paper 0.01).
  """

  tasks_output_shapes: Mapping[str, tuple[int, ...]]
  shared_encoder: nn.Module
  private_encoder: nn.Module
  head_hidden_sizes: Sequence[int] = ()
  discriminator_hidden_sizes: Sequence[int] = ()
  adversarial_weight: float = 0.05
  reversal_scale: float = 1.0
  difference_weight: float = 0.0

  def setup(self):
    heads_lib.check_tasks("AdversarialSharedPrivateModel",
                          self.tasks_output_shapes)
    for field in ("adversarial_weight", "reversal_scale", "difference_weight"):
      if getattr(self, field) < 0:
        raise ValueError(f"AdversarialSharedPrivateModel: {field} must be "
                         f">= 0, got {getattr(self, field)}")
    self.shared = _SharedParts(self.shared_encoder,
                               len(self.tasks_output_shapes),
                               tuple(self.discriminator_hidden_sizes))
    self.tasks = _Tasks(self.tasks_output_shapes, self.private_encoder,
                        tuple(self.head_hidden_sizes))

  def __call__(self, inputs: jax.Array, *,
               task_presence: jax.Array | None = None,
               train: bool = False) -> dict[str, jax.Array]:
    """Returns `{task: prediction [B, *output_shape]}` and sows aux losses.

    Args:
      inputs: `[B, ...]` (or a pytree of them), whatever the encoders take.
      task_presence: `[B, K]`, 1.0 where the example is labelled for task k
        (see `mtl_jax.tasks.task_presence`); None (e.g. at evaluation) sows no
        adversarial loss.
      train: passed to the encoders (dropout).

    Raises:
      ValueError: if `task_presence` is not `[B, K]`.
    """
    names = list(self.tasks_output_shapes)
    expected = (jax.tree.leaves(inputs)[0].shape[0], len(names))  # [B, K]
    if task_presence is not None and task_presence.shape != expected:
      raise ValueError(
          f"AdversarialSharedPrivateModel: task_presence has shape "
          f"{task_presence.shape}; expected [B, K] = {expected} with columns "
          f"in task order {names}")
    shared_features = self.shared.encoder(inputs, train=train)  # [B, D_s]
    private = {n: part.encoder(inputs, train=train)  # [B, D_p]
               for n, part in self.tasks.parts.items()}
    outputs = {
        n: part.head(jnp.concatenate([shared_features, private[n]], axis=-1))
        for n, part in self.tasks.parts.items()}

    # Always run the discriminator, so that `init` creates its params even
    # without task_presence; unused logits cost nothing under jit.
    logits = self.discriminate(
        gradient_reversal(shared_features, self.reversal_scale))  # [B, K]
    self.sow("intermediates", "discriminator_logits", logits)
    # `init` makes every collection mutable; it should return params only.
    collect = (self.is_mutable_collection("aux_losses") and
               not self.is_initializing())
    if collect and task_presence is not None and self.adversarial_weight:
      loss = discriminator_loss(logits, task_presence)
      self.sow("aux_losses", ADVERSARIAL_LOSS_NAME,
               self.adversarial_weight * loss)
    if collect and self.difference_weight:
      self.sow("aux_losses", DIFFERENCE_LOSS_NAME,
               self.difference_weight * difference_loss(
                   shared_features, [private[n] for n in names]))
    return outputs

  def encode(self, inputs: jax.Array, *, train: bool = False) -> jax.Array:
    """The shared features `[B, D_s]`."""
    return self.shared.encoder(inputs, train=train)

  def discriminate(self, features: jax.Array) -> jax.Array:
    """The discriminator's logits `[B, K]` on shared features (no reversal)."""
    return self.shared.discriminator(features)
