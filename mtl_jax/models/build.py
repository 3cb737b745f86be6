"""Builds models from explicit arguments (names resolved through one dict each)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn

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
