"""The weighting interface shared by all loss-level methods.

  state = weighting.init(num_tasks)
  weights, state = weighting.update(losses, counts, state, rng=rng,
                                    grad_norms=grad_norms)
  state = weighting.post_update(new_losses, counts, state)   # if not None

* `losses [K]`, `counts [K]`: per-task losses and label counts over the global
  batch (a task with count 0 is absent: its loss is 0 and so is its gradient).
* `rng`: a PRNG key, always passed (stochastic methods use it).
* `grad_norms [K]`: `||grad_W L_k||`, the norm of each task's UNWEIGHTED loss
  gradient w.r.t. the last shared layer W; computed by the train step only for
  methods with `"grad_norms"` in `needs` (GradNorm), else None.
* `post_update`: for methods that learn from the loss change caused by the
  model update (FAMO): called after the update with the losses of the UPDATED
  model on the SAME batch (one extra forward pass, only for such methods).
* Weights multiply the task losses: the model's objective is
  `sum_k w_k L_k`, with gradients stopped through `w`. Methods with learnable
  parameters (uncertainty, IMTL-L, GradNorm, FAMO) keep them, and their own
  optimizer state, inside the weighting state and update them inside `update`
  (or `post_update`).
* Absent tasks (count 0) must not move any statistic or learnable parameter of
  that task: every per-task entry of the state is left exactly as it was.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

NEEDS = ("grad_norms",)


class Weighting(NamedTuple):
  """A loss-level weighting method.

  Attributes:
    init: `init(num_tasks: int) -> state`.
    update: `update(losses [K], counts [K], state, *, rng, grad_norms)
      -> (weights [K], state)`; pure and jit-able.
    post_update: optional `post_update(new_losses [K], counts [K], state)
      -> state`, called after the model update (see module docstring).
    needs: extra inputs the train step must compute, a subset of `NEEDS`.
  """

  init: Callable[[int], Any]
  update: Callable[..., tuple[jax.Array, Any]]
  post_update: Callable[..., Any] | None = None
  needs: frozenset[str] = frozenset()
