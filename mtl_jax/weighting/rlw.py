"""Random Loss Weighting (Lin et al., "Reasonable Effectiveness of Random
Weighting", TMLR 2022; arXiv:2111.10603).

Every step draws fresh weights `w = softmax(z)` with `z` sampled from a fixed
distribution, so the weights sum to 1:
* `"normal"`: `z_k ~ N(0, 1)` (the paper's and LibMTL's default);
* `"uniform"`: `z_k ~ U(0, 1)`;
* `"dirichlet"`: `z ~ Dirichlet(1, ..., 1)` over the present tasks.
As in LibMTL (`RLW`), the softmax is applied for every distribution, the
Dirichlet one included. LibMTL's Bernoulli variants are not provided.

Absent tasks (count 0) get weight 0 and the softmax runs over the present
tasks only, so the present tasks' weights have the distribution of RLW with
`K'` tasks and sum to 1 (the Dirichlet draw is normalised exponential variates
over the present tasks for the same reason). `z` is drawn for all `K` tasks from
`rng` as given, so the weights are a pure function of `rng` and `counts`. RLW
keeps no state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.weighting import masking
from mtl_jax.weighting.base import Weighting

DISTRIBUTIONS = ("dirichlet", "normal", "uniform")


class RLWState(NamedTuple):
  """Random loss weighting keeps no statistics."""


def sample_logits(distribution: str, rng: jax.Array, present: jax.Array
                  ) -> jax.Array:
  """The `[K]` draws `z` that RLW turns into weights by a softmax."""
  shape = present.shape
  if distribution == "normal":
    return jax.random.normal(rng, shape)
  if distribution == "uniform":
    return jax.random.uniform(rng, shape)
  # Normalising Gamma(1) (= Exponential(1)) variates over the present tasks
  # gives a Dirichlet(1, ..., 1) draw over exactly those tasks.
  g = jnp.where(present, jax.random.exponential(rng, shape), 0.0)  # [K]
  return g / jnp.maximum(jnp.sum(g), jnp.finfo(g.dtype).tiny)


def rlw(distribution: str = "normal") -> Weighting:
  """Random loss weighting, `w = softmax(z)` with fresh `z` every step.

  Args:
    distribution: one of `DISTRIBUTIONS`.

  Returns:
    The `Weighting`; its state is an empty `RLWState`. Its `update` needs the
    `rng` keyword.

  Raises:
    ValueError: unknown `distribution`.
  """
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"unknown rlw distribution {distribution!r}; valid: "
                     f"{', '.join(DISTRIBUTIONS)}")

  def init(num_tasks: int) -> RLWState:
    del num_tasks
    return RLWState()

  def update(losses, counts, state, *, rng=None, grad_norms=None):
    del losses, grad_norms
    if rng is None:
      raise ValueError("rlw draws random weights: update needs rng=<PRNG key>")
    present = masking.present_mask(counts)  # [K]
    z = sample_logits(distribution, rng, present)  # [K]
    return masking.masked_softmax(z, present), state

  return Weighting(init, update)
