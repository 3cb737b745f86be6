"""The weighting interface shared by all loss-level methods."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax


class Weighting(NamedTuple):
  """A loss-level weighting method.

  Attributes:
    init: `init(num_tasks: int) -> state`.
    update: `update(losses [K], counts [K], state) -> (weights [K], state)`;
      pure and jit-able. The train step stops gradients through the weights.
  """

  init: Callable[[int], Any]
  update: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
