"""Gradient paths: how the train step turns per-task losses into a gradient.

Each path is a module whose function `gradients(spec, params, batch, states,
keys) -> Gradients` is the path (`spec.py` states the contract); the step
picks one when it is built (`select_path`):

* `weighted_sum` — no aggregator: one backward pass of `sum_k w_k L_k`;
* `jacobian` — the per-task gradients `[K, P]` of the shared params from one
  batched VJP, handed to `aggregator.update` (`jacobian="full"`, and any
  aggregator with a weighting that needs gradient norms);
* `rep_grad` — per-task gradients w.r.t. the shared representation,
  aggregated there and sent through the trunk once;
* `factored` — Gram-based and columnwise aggregators from the dense layers'
  factors, never forming `[K, P]` (`jacobian="auto"`, the default, and
  `"factored"`); the maths is in `gram.py`.

All paths call the model through `forward.Forward` (predictions, auxiliary
losses, encode/decode, views) and give the same update up to float rounding.
"""

from __future__ import annotations

from typing import Callable

from mtl_jax.gradients import factored
from mtl_jax.gradients import jacobian
from mtl_jax.gradients import rep_grad
from mtl_jax.gradients import weighted_sum
from mtl_jax.gradients.forward import AUX_LOSSES
from mtl_jax.gradients.forward import Forward
from mtl_jax.gradients.spec import batched_vjp
from mtl_jax.gradients.spec import Gradients
from mtl_jax.gradients.spec import GradientSpec
from mtl_jax.gradients.spec import MethodStates
from mtl_jax.gradients.spec import StepKeys

JACOBIAN_MODES = ("auto", "factored", "full")
Path = Callable[..., Gradients]


def select_path(spec: GradientSpec, use_rep_grad: bool = False) -> Path:
  """The path for a spec (chosen once, when the step is built)."""
  aggregator = spec.aggregator
  if aggregator is None:
    return weighted_sum.gradients
  if use_rep_grad:
    return rep_grad.gradients
  factorable = aggregator.from_gram is not None or aggregator.columnwise
  if spec.jacobian != "full" and factorable and not spec.needs_norms:
    return factored.gradients
  return jacobian.gradients


__all__ = [
    "AUX_LOSSES", "Forward", "Gradients", "GradientSpec", "JACOBIAN_MODES",
    "MethodStates", "Path", "StepKeys", "batched_vjp", "factored", "jacobian",
    "rep_grad", "select_path", "weighted_sum",
]
