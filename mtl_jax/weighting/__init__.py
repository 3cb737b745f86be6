"""Loss-level task weighting.

A weighting method is a `Weighting(init, update)` pair of pure functions, in
optax's style:

  state = weighting.init(num_tasks)
  weights, state = weighting.update(losses, counts, state)

`losses` and `counts` are `[K]` arrays in task order, reduced over the global
batch. A task with count 0 is absent from the batch: its loss and gradient are
zero whatever its weight, and methods with statistics must leave them unchanged.
Methods are looked up by name in `WEIGHTINGS`; `get_weighting` raises for an
unknown name, listing the valid ones.
"""

from __future__ import annotations

from typing import Any, Callable

from mtl_jax.weighting.base import Weighting
from mtl_jax.weighting.static import StaticState, equal, static

WEIGHTINGS: dict[str, Callable[..., Weighting]] = {
    "equal": equal,
    "static": static,
}


def get_weighting(name: str, **kwargs: Any) -> Weighting:
  """Builds the weighting method called `name` with its hyperparameters."""
  if name not in WEIGHTINGS:
    raise ValueError(f"unknown weighting method {name!r}; valid: "
                     f"{', '.join(sorted(WEIGHTINGS))}")
  return WEIGHTINGS[name](**kwargs)


__all__ = ["Weighting", "StaticState", "WEIGHTINGS", "equal", "get_weighting",
           "static"]
