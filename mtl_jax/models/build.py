"""Builds models from explicit arguments (names resolved through one dict each)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from mtl_jax.models import adversarial
from mtl_jax.models import cross_stitch
from mtl_jax.models import dselect_k
from mtl_jax.models import hard_sharing
from mtl_jax.models import heads as heads_lib
from mtl_jax.models import moe
from mtl_jax.models import mtan
from mtl_jax.models import soft_sharing
from mtl_jax.models import text
from mtl_jax.models import trunks
from mtl_jax.tasks import TaskSet

TRUNKS = {
    "mlp": trunks.MLP,
    "cnn": trunks.ConvNet,
    "resnet": trunks.ResNet,
    "tagger": text.Tagger,
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


# name -> (class, how it uses the configured trunk). Hyperparameters are the
# class's own dataclass fields (see `architecture_defaults`).
ARCHITECTURES: dict[str, tuple[type[nn.Module] | None, str]] = {
    "hard_sharing": (None, "shared trunk"),
    "soft_sharing": (soft_sharing.SoftSharingModel, "one column per task"),
    "cross_stitch": (cross_stitch.CrossStitchModel, "own columns"),
    "mtan": (mtan.MTANModel, "own backbone"),
    "mmoe": (moe.MMoEModel, "optional input trunk"),
    "cgc": (moe.CGCModel, "optional input trunk"),
    "ple": (moe.PLEModel, "optional input trunk"),
    "dselect_k": (dselect_k.DSelectKModel, "optional input trunk"),
    "adversarial": (adversarial.AdversarialSharedPrivateModel,
                    "shared and private encoders"),
}
# Module-valued fields are filled from the trunk, not from hyperparameters.
_MODULE_FIELDS = ("tasks_output_shapes", "column", "input_trunk",
                  "shared_encoder", "private_encoder", "head_hidden_sizes",
                  "parent", "name")


def architecture_fields(architecture: str) -> dict[str, Any]:
  """The hyperparameters (dataclass fields with defaults) of an architecture."""
  cls, _ = ARCHITECTURES[architecture]
  if cls is None:
    return {}
  out = {}
  for name, field in cls.__dataclass_fields__.items():
    if name in _MODULE_FIELDS or not field.init:
      continue
    if field.default is not dataclasses.MISSING:
      out[name] = field.default
  return out


def make_model(architecture: str, tasks: TaskSet, trunk: nn.Module, *,
               head_hidden_sizes: Sequence[int] = (),
               input_trunk: bool = False, **kwargs: Any) -> nn.Module:
  """Builds a multi-task architecture for `tasks` around `trunk`.

  Args:
    architecture: a key of `ARCHITECTURES`.
    tasks: the tasks (their names and output shapes).
    trunk: the backbone: the shared trunk (hard sharing), each task's column
      (soft sharing), the shared and private encoders (adversarial), or the
      optional input trunk of the mixture-of-experts models.
    head_hidden_sizes: task head hidden layers.
    input_trunk: mixture-of-experts models only: run `trunk` before the experts
      (shared); otherwise experts read the flattened inputs.
    **kwargs: the architecture's hyperparameters.

  Raises:
    ValueError: unknown architecture (lists the valid ones) or hyperparameter.
  """
  if architecture not in ARCHITECTURES:
    raise ValueError(f"unknown architecture {architecture!r}; valid: "
                     f"{', '.join(sorted(ARCHITECTURES))}")
  valid = architecture_fields(architecture)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(f"architecture {architecture!r} has no hyperparameter(s) "
                     f"{unknown}; valid: {', '.join(sorted(valid)) or 'none'}")
  if architecture == "hard_sharing":
    return make_hard_sharing_model(tasks, trunk, head_hidden_sizes)
  cls, _ = ARCHITECTURES[architecture]
  shapes = {t.name: tuple(t.output_shape) for t in tasks}
  head = tuple(head_hidden_sizes)
  if architecture == "soft_sharing":
    return cls(shapes, column=trunk, head_hidden_sizes=head, **kwargs)
  if architecture == "adversarial":
    return cls(shapes, shared_encoder=trunk, private_encoder=trunk.clone(),
               head_hidden_sizes=head, **kwargs)
  if architecture in ("mmoe", "cgc", "ple", "dselect_k"):
    return cls(shapes, head_hidden_sizes=head,
               input_trunk=trunk if input_trunk else None, **kwargs)
  return cls(shapes, head_hidden_sizes=head, **kwargs)


def last_shared_layer(architecture: str, input_trunk: bool = False
                      ) -> tuple[str, ...] | None:
  """Path of the last shared layer in `params["shared"]` (GradNorm's W)."""
  if architecture == "hard_sharing":
    return ("features",)
  if architecture == "adversarial":
    return ("encoder", "features")
  if architecture in ("mmoe", "cgc", "ple", "dselect_k") and input_trunk:
    return ("trunk", "features")
  return None


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
