"""Loss-level task weighting.

A weighting method is a `Weighting(init, update)` pair of pure functions, in
optax's style (see `base` for the full interface: `rng`, `grad_norms`,
`post_update`):

  state = weighting.init(num_tasks)
  weights, state = weighting.update(losses, counts, state, rng=rng)

`losses` and `counts` are `[K]` arrays in task order, reduced over the global
batch. A task with count 0 is absent from the batch: its loss and gradient are
zero whatever its weight, and methods with statistics must leave them unchanged.
Methods are looked up by name in `WEIGHTINGS`; `get_weighting` raises for an
unknown name, listing the valid ones.
"""

from __future__ import annotations

from typing import Any, Callable

from mtl_jax.weighting.base import Weighting
from mtl_jax.weighting.dwa import DWAState, dwa
from mtl_jax.weighting.famo import FAMOState, famo
from mtl_jax.weighting.gls import GLSState, gls
from mtl_jax.weighting.gradnorm import GradNormState, gradnorm
from mtl_jax.weighting.imtl_l import IMTLLState, imtl_l
from mtl_jax.weighting.rlw import RLWState, rlw
from mtl_jax.weighting.static import StaticState, equal, static
from mtl_jax.weighting.uncertainty import UncertaintyState, uncertainty

WEIGHTINGS: dict[str, Callable[..., Weighting]] = {
    "dwa": dwa,
    "equal": equal,
    "famo": famo,
    "gls": gls,
    "gradnorm": gradnorm,
    "imtl_l": imtl_l,
    "rlw": rlw,
    "static": static,
    "uncertainty": uncertainty,
}


def get_weighting(name: str, **kwargs: Any) -> Weighting:
  """Builds the weighting method called `name` with its hyperparameters."""
  if name not in WEIGHTINGS:
    raise ValueError(f"unknown weighting method {name!r}; valid: "
                     f"{', '.join(sorted(WEIGHTINGS))}")
  return WEIGHTINGS[name](**kwargs)


__all__ = [
    "DWAState", "FAMOState", "GLSState", "GradNormState", "IMTLLState",
    "RLWState", "StaticState", "UncertaintyState", "WEIGHTINGS", "Weighting",
    "dwa", "equal", "famo", "get_weighting", "gls", "gradnorm", "imtl_l", "rlw",
    "static", "uncertainty"]
