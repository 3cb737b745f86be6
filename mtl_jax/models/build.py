"""Builds models from explicit arguments: one spec table per architecture and
per trunk.

`ARCHITECTURES` maps a name to an `ArchitectureSpec`: the module class, how it
uses the configured trunk (`TrunkUse`: its build function), its
hyperparameters (the module's dataclass fields with defaults, less the fields
the build function fills), the last shared layer for GradNorm, and what the
train step must know about it (`step_kwargs`). `TRUNKS` maps a name to a
`TrunkSpec`: the module class and which model options it reads. Adding an
architecture or a trunk touches its module and its row here; nothing else
tests names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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

# ---------------------------------------------------------------------------
# Trunks.


def _module_fields(cls: type[nn.Module]) -> dict[str, dataclasses.Field]:
  return {name: f for name, f in cls.__dataclass_fields__.items()
          if name not in ("parent", "name") and f.init}


def _plain(value: Any) -> Any:
  """Lists (a config's sequences) as tuples: linen fields must be hashable."""
  return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class TrunkSpec:
  """A trunk: its module and the model options it is built from.

  Attributes:
    name: the key in `TRUNKS`.
    module: the linen class, `inputs [B, ...] -> features [B, D]`, whose last
      shared layer is named `features`.
    reads: model-level options passed as the arguments of the same names
      (e.g. `hidden_sizes`, `dropout_rate`).
    own_block: also read the options under the trunk's own name (a mapping
      of its arguments, e.g. the model options' `tagger` block).
    from_dataset: arguments taken from the dataset's `info` (e.g.
      `vocab_size`).
  """

  name: str
  module: type[nn.Module]
  reads: tuple[str, ...] = ()
  own_block: bool = False
  from_dataset: tuple[str, ...] = ()

  @property
  def fields(self) -> tuple[str, ...]:
    """Every argument of the trunk's module."""
    return tuple(sorted(_module_fields(self.module)))

  def kwargs(self, model_options: Mapping[str, Any],
             dataset_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The module's arguments from model-level options and the dataset's info.

    Args:
      model_options: `{option: value}` (an experiment's model block as a
        plain dict); the options in `reads` must be there, the own block may.
      dataset_info: `catalog.Dataset.info`; None before the dataset is read
        (the `from_dataset` arguments are then left out).
    """
    out = {key: _plain(model_options[key]) for key in self.reads}
    if self.own_block:
      out.update({k: _plain(v) for k, v in
                  dict(model_options.get(self.name) or {}).items()})
    for key in self.from_dataset:
      if dataset_info is not None and key in dataset_info:
        out[key] = dataset_info[key]
    return out

  def check_kwargs(self, kwargs: Mapping[str, Any]) -> None:
    """Raises ValueError naming the arguments the trunk does not have."""
    unknown = sorted(set(kwargs) - set(self.fields))
    if unknown:
      raise ValueError(f"trunk {self.name!r} has no argument(s) {unknown}; "
                       f"valid: {', '.join(self.fields)}")

  def build(self, **kwargs: Any) -> nn.Module:
    self.check_kwargs(kwargs)
    return self.module(**kwargs)


TRUNKS: dict[str, TrunkSpec] = {spec.name: spec for spec in (
    TrunkSpec("mlp", trunks.MLP, reads=("hidden_sizes", "dropout_rate")),
    TrunkSpec("cnn", trunks.ConvNet, reads=("channels", "strides",
                                            "feature_size", "dropout_rate")),
    TrunkSpec("resnet", trunks.ResNet, reads=("feature_size",)),
    TrunkSpec("tagger", text.Tagger, own_block=True,
              from_dataset=("vocab_size",)),
)}


def get_trunk_spec(name: str) -> TrunkSpec:
  """The `TrunkSpec` called `name`.

  Raises:
    ValueError: unknown trunk name (lists the valid ones).
  """
  if name not in TRUNKS:
    raise ValueError(f"unknown trunk {name!r}; valid: {', '.join(sorted(TRUNKS))}")
  return TRUNKS[name]


def make_trunk(name: str, **kwargs: Any) -> nn.Module:
  """Returns the trunk called `name` built with `kwargs`.

  Raises:
    ValueError: unknown trunk name (lists the valid ones) or unknown argument.
  """
  return get_trunk_spec(name).build(**kwargs)


def trunk_kwargs(name: str, model_options: Mapping[str, Any],
                 dataset_info: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
  """The arguments of trunk `name` from model options (`TrunkSpec.kwargs`)."""
  return get_trunk_spec(name).kwargs(model_options, dataset_info)


def make_hard_sharing_model(tasks: TaskSet, trunk: nn.Module,
                            head_hidden_sizes: Sequence[int] = ()
                            ) -> hard_sharing.HardSharingModel:
  """A hard-parameter-sharing model with one `Head` per task of `tasks`."""
  heads = {t.name: heads_lib.Head(output_shape=t.output_shape,
                                  hidden_sizes=tuple(head_hidden_sizes))
           for t in tasks}
  return hard_sharing.HardSharingModel(trunk=trunk, heads=heads)


# ---------------------------------------------------------------------------
# How an architecture uses the configured trunk.

# build(cls, tasks, trunk, head_hidden_sizes, input_trunk, hyperparameters)
BuildFn = Callable[[type[nn.Module], TaskSet, nn.Module, tuple[int, ...], bool,
                    dict[str, Any]], nn.Module]


@dataclasses.dataclass(frozen=True)
class TrunkUse:
  """One way of building an architecture around the trunk.

  Attributes:
    description: how the trunk is used, in words.
    fills: the module's fields that `build` fills from the tasks, the trunk
      and the heads (so they are not hyperparameters).
    build: `(cls, tasks, trunk, head_hidden_sizes, input_trunk,
      hyperparameters) -> model`.
  """

  description: str
  fills: tuple[str, ...]
  build: BuildFn


def _shapes(tasks: TaskSet) -> dict[str, tuple[int, ...]]:
  return {t.name: tuple(t.output_shape) for t in tasks}


SHARED_TRUNK = TrunkUse(
    "shared trunk", ("trunk", "heads"),
    lambda cls, tasks, trunk, head, input_trunk, kw:
    make_hard_sharing_model(tasks, trunk, head))
COLUMN_PER_TASK = TrunkUse(
    "one column per task", ("tasks_output_shapes", "column",
                            "head_hidden_sizes"),
    lambda cls, tasks, trunk, head, input_trunk, kw:
    cls(_shapes(tasks), column=trunk, head_hidden_sizes=head, **kw))
OWN_BACKBONE = TrunkUse(
    "own backbone (the trunk is not used)", ("tasks_output_shapes",
                                             "head_hidden_sizes"),
    lambda cls, tasks, trunk, head, input_trunk, kw:
    cls(_shapes(tasks), head_hidden_sizes=head, **kw))
OPTIONAL_INPUT_TRUNK = TrunkUse(
    "optional input trunk (shared, before the experts)",
    ("tasks_output_shapes", "head_hidden_sizes", "input_trunk"),
    lambda cls, tasks, trunk, head, input_trunk, kw:
    cls(_shapes(tasks), head_hidden_sizes=head,
        input_trunk=trunk if input_trunk else None, **kw))
SHARED_AND_PRIVATE = TrunkUse(
    "shared and private encoders", ("tasks_output_shapes", "shared_encoder",
                                    "private_encoder", "head_hidden_sizes"),
    lambda cls, tasks, trunk, head, input_trunk, kw:
    cls(_shapes(tasks), shared_encoder=trunk, private_encoder=trunk.clone(),
        head_hidden_sizes=head, **kw))


def _always(path: tuple[str, ...]) -> Callable[[bool], tuple[str, ...]]:
  return lambda input_trunk: path


def _with_input_trunk(path: tuple[str, ...]
                      ) -> Callable[[bool], tuple[str, ...] | None]:
  return lambda input_trunk: path if input_trunk else None


# ---------------------------------------------------------------------------
# Architectures.


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
  """A multi-task architecture: everything the library and scripts ask of it.

  Attributes:
    name: the key in `ARCHITECTURES`.
    module: the linen class.
    trunk_use: how it is built around the configured trunk (`TrunkUse`).
    grad_norm_layer: `input_trunk -> path` of the last shared layer inside
      `params["shared"]` (GradNorm's W), None where there is none; or None
      for an architecture that never has one.
    pass_task_presence: the model takes `task_presence=[B, K]` (the train
      step passes it).
    encode_decode: the model has `encode(inputs) -> features` and
      `decode(features) -> {task: prediction}`, with one head module
      `tasks/<task>` per task applied to the features: what the step's
      rep_grad and two-stage factored routes need.
  """

  name: str
  module: type[nn.Module]
  trunk_use: TrunkUse
  grad_norm_layer: Callable[[bool], tuple[str, ...] | None] | None = None
  pass_task_presence: bool = False
  encode_decode: bool = False

  @property
  def hyperparameters(self) -> dict[str, Any]:
    """The hyperparameters and their defaults: the module's dataclass fields
    with defaults, less those the build function fills."""
    out = {}
    for name, field in _module_fields(self.module).items():
      if name in self.trunk_use.fills:
        continue
      if field.default is not dataclasses.MISSING:
        out[name] = field.default
    return out

  def check_hyperparameters(self, hyperparameters: Mapping[str, Any]) -> None:
    """Raises ValueError naming the hyperparameters it does not have."""
    valid = self.hyperparameters
    unknown = sorted(set(hyperparameters) - set(valid))
    if unknown:
      raise ValueError(
          f"architecture {self.name!r} has no hyperparameter(s) {unknown}; "
          f"valid: {', '.join(sorted(valid)) or 'none'}")

  def last_shared_layer(self, input_trunk: bool = False
                        ) -> tuple[str, ...] | None:
    """Path of the last shared layer in `params["shared"]`, or None."""
    if self.grad_norm_layer is None:
      return None
    return self.grad_norm_layer(input_trunk)

  def step_kwargs(self, input_trunk: bool = False) -> dict[str, Any]:
    """`make_train_step`'s architecture arguments: `encode_decode`,
    `pass_task_presence` and `grad_norm_path` (`()` where there is no last
    shared layer; `check_step_options` refuses GradNorm then)."""
    return {"encode_decode": self.encode_decode,
            "pass_task_presence": self.pass_task_presence,
            "grad_norm_path": self.last_shared_layer(input_trunk) or ()}

  def check_step_options(self, *, input_trunk: bool = False,
                         rep_grad: bool = False,
                         grad_norms_for: str | None = None) -> None:
    """Raises ValueError where the architecture cannot serve the step.

    Args:
      input_trunk: the model option (mixture-of-experts models).
      rep_grad: gradients w.r.t. the shared representation: needs
        `encode_decode`.
      grad_norms_for: name of a weighting that needs gradient norms w.r.t.
        the last shared layer (GradNorm), or None.
    """
    if rep_grad and not self.encode_decode:
      valid = [n for n, s in sorted(ARCHITECTURES.items()) if s.encode_decode]
      raise ValueError(
          "rep_grad=True needs one shared representation (a model with "
          f"encode/decode): architecture "
          f"{', '.join(map(repr, valid))}, not {self.name!r}")
    if grad_norms_for and self.last_shared_layer(input_trunk) is None:
      always = [n for n, s in sorted(ARCHITECTURES.items())
                if s.last_shared_layer(False) is not None]
      with_trunk = [n for n, s in sorted(ARCHITECTURES.items())
                    if s.last_shared_layer(False) is None
                    and s.last_shared_layer(True) is not None]
      raise ValueError(
          f"weighting {grad_norms_for!r} needs a last shared layer, which "
          f"architecture {self.name!r} does not have ({', '.join(always)} "
          f"do, and {', '.join(with_trunk)} with input_trunk=True)")

  def build(self, tasks: TaskSet, trunk: nn.Module, *,
            head_hidden_sizes: Sequence[int] = (), input_trunk: bool = False,
            **hyperparameters: Any) -> nn.Module:
    self.check_hyperparameters(hyperparameters)
    return self.trunk_use.build(self.module, tasks, trunk,
                                tuple(head_hidden_sizes), input_trunk,
                                hyperparameters)


ARCHITECTURES: dict[str, ArchitectureSpec] = {spec.name: spec for spec in (
    ArchitectureSpec("hard_sharing", hard_sharing.HardSharingModel,
                     SHARED_TRUNK, grad_norm_layer=_always(("features",)),
                     encode_decode=True),
    ArchitectureSpec("soft_sharing", soft_sharing.SoftSharingModel,
                     COLUMN_PER_TASK),
    ArchitectureSpec("cross_stitch", cross_stitch.CrossStitchModel,
                     OWN_BACKBONE),
    ArchitectureSpec("mtan", mtan.MTANModel, OWN_BACKBONE),
    ArchitectureSpec("mmoe", moe.MMoEModel, OPTIONAL_INPUT_TRUNK,
                     grad_norm_layer=_with_input_trunk(("trunk", "features"))),
    ArchitectureSpec("cgc", moe.CGCModel, OPTIONAL_INPUT_TRUNK,
                     grad_norm_layer=_with_input_trunk(("trunk", "features"))),
    ArchitectureSpec("ple", moe.PLEModel, OPTIONAL_INPUT_TRUNK,
                     grad_norm_layer=_with_input_trunk(("trunk", "features"))),
    ArchitectureSpec("dselect_k", dselect_k.DSelectKModel,
                     OPTIONAL_INPUT_TRUNK,
                     grad_norm_layer=_with_input_trunk(("trunk", "features"))),
    ArchitectureSpec("adversarial", adversarial.AdversarialSharedPrivateModel,
                     SHARED_AND_PRIVATE,
                     grad_norm_layer=_always(("encoder", "features")),
                     pass_task_presence=True),
)}


def get_architecture(name: str) -> ArchitectureSpec:
  """The `ArchitectureSpec` called `name`.

  Raises:
    ValueError: unknown architecture (lists the valid ones).
  """
  if name not in ARCHITECTURES:
    raise ValueError(f"unknown architecture {name!r}; valid: "
                     f"{', '.join(sorted(ARCHITECTURES))}")
  return ARCHITECTURES[name]


def architecture_fields(architecture: str) -> dict[str, Any]:
  """The hyperparameters (dataclass fields with defaults) of an architecture."""
  return get_architecture(architecture).hyperparameters


def check_model_options(architecture: str, trunk: str, *,
                        hyperparameters: Mapping[str, Any] | None = None,
                        trunk_kwargs: Mapping[str, Any] | None = None
                        ) -> ArchitectureSpec:
  """Checks the names of a model's options without building anything.

  Args:
    architecture: a key of `ARCHITECTURES`.
    trunk: a key of `TRUNKS`.
    hyperparameters: the architecture's hyperparameters.
    trunk_kwargs: the trunk's arguments (possibly without those read from
      the dataset).

  Returns:
    The architecture's spec.

  Raises:
    ValueError: unknown architecture, trunk, hyperparameter or trunk argument.
  """
  trunk_spec = get_trunk_spec(trunk)
  spec = get_architecture(architecture)
  spec.check_hyperparameters(hyperparameters or {})
  trunk_spec.check_kwargs(trunk_kwargs or {})
  return spec


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
  return get_architecture(architecture).build(
      tasks, trunk, head_hidden_sizes=head_hidden_sizes,
      input_trunk=input_trunk, **kwargs)


def last_shared_layer(architecture: str, input_trunk: bool = False
                      ) -> tuple[str, ...] | None:
  """Path of the last shared layer in `params["shared"]` (GradNorm's W)."""
  return get_architecture(architecture).last_shared_layer(input_trunk)


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
