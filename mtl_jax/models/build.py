"""Builds models from explicit arguments (names resolved through one dict each)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from mtl_jax.models import hard_sharing
from mtl_jax.models import heads as heads_lib
from mtl_jax.models import trunks
from mtl_jax.tasks import TaskSet

TRUNKS = {
    "mlp": trunks.MLP,
    "cnn": trunks.ConvNet,
    "resnet": trunks.ResNet,
}


def make_trunk(name: str, **kwargs: Any) -> nn.Module:
  """Returns the trunk called `name` built with `kwargs`.

  Raises:
    ValueError: unknown trunk name (lists the valid ones) or unknown argument.
  """
  if name not in TRUNKS:
    raise ValueError(f"unknown trunk {name!r}; valid: {', '.join(sorted(TRUNKS))}")
  cls = TRUNKS[name]
  fields = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name")}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"trunk {name!r} has no argument(s) {unknown}; valid: "
                     f"{', '.join(sorted(fields))}")
  return cls(**kwargs)


def make_hard_sharing_model(tasks: TaskSet, trunk: nn.Module,
                            head_hidden_sizes: Sequence[int] = ()
                            ) -> hard_sharing.HardSharingModel:
  """A hard-parameter-sharing model with one `Head` per task of `tasks`."""
  heads = {t.name: heads_lib.Head(output_shape=t.output_shape,
                                  hidden_sizes=tuple(head_hidden_sizes))
           for t in tasks}
  return hard_sharing.HardSharingModel(trunk=trunk, heads=heads)


def count_params(tree: Any) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape, dtype=np.int64)
                 for x in jax.tree.leaves(tree)))


def param_report(params: Any, single_task_counts: dict[str, int]
                 ) -> dict[str, Any]:
  """Parameter counts of a multi-task model against K single-task models.

  Args:
    params: the multi-task model's `{"shared": ..., "tasks": {...}}` params.
    single_task_counts: `{task: params of a single-task model of the same
      backbone}`.

  Returns:
    `{"total", "shared", "tasks": {task: n}, "single_task_models": {task: n},
    "single_task_total", "ratio_to_single_task"}`.
  """
  total = count_params(params)
  single_total = sum(single_task_counts.values())
  return {
      "total": total,
      "shared": count_params(params.get("shared", {})),
      "tasks": {k: count_params(v) for k, v in params.get("tasks", {}).items()},
      "single_task_models": dict(single_task_counts),
      "single_task_total": single_total,
      "ratio_to_single_task": total / single_total if single_total else None,
  }


def abstract_params(model: nn.Module, sample_inputs: Any) -> Any:
  """Param shapes of `model` without computing anything (jax.eval_shape)."""
  return jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
      sample_inputs)["params"]
