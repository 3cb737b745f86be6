"""mtl_jax: a JAX/Flax library for multi-task learning.

`import mtl_jax as mtl` gives the subpackages and the most-used callables
(re-exported under their own names; nothing here wraps them):

  tasks        the Task spec and TaskSet (batch contract, masked per-task losses)
               mtl.Task, mtl.TaskSet, mtl.classification_task,
               mtl.multilabel_task, mtl.regression_task
  losses       masked losses: (prediction, label, mask) -> (loss_sum, count)
  metrics      masked metrics as summable sufficient statistics
  models       trunks, heads and multi-task architectures (`models.build`:
               one spec per architecture and per trunk)
               mtl.make_trunk, mtl.make_model, mtl.make_hard_sharing_model,
               mtl.TRUNKS, mtl.ARCHITECTURES, mtl.ArchitectureSpec,
               mtl.TrunkSpec, mtl.get_architecture
  weighting    loss-level task weighting
               mtl.get_weighting, mtl.WEIGHTINGS, mtl.Weighting
  aggregation  gradient-level aggregation of per-task gradients
               mtl.get_aggregator, mtl.AGGREGATORS, mtl.Aggregator
  pretext      self-supervised and unsupervised tasks: vision pretexts
               (labels made from the inputs inside the step) and
               DeepCluster-style clustering
               mtl.pretext_task, mtl.get_pretext, mtl.PRETEXTS,
               mtl.cluster_task, mtl.init_task_state
  gradients    the train step's gradient paths (weighted sum, per-task
               Jacobian, rep_grad, factored Gram engine) behind one spec
  training     TrainState, the pure train/eval steps (`training.step`,
               `training.state`), the NaN/Inf guard (`training.guard`); the
               loop, checkpoints and writers are imported on demand
               (`import mtl_jax.training.loop`)
               mtl.TrainState, mtl.init_params, mtl.create_train_state,
               mtl.make_train_step, mtl.make_eval_step, mtl.accumulate,
               mtl.finalize, mtl.make_evaluate (eval over a whole stream),
               mtl.skip_nonfinite; the option checks a script runs before
               reading data are in `training.checks`; optimizers with
               param groups (per-group learning rates, frozen params):
               mtl.make_optimizer, mtl.make_schedule
  transfer     start from another run's params, add or drop task heads,
               freeze by pattern, continue a state with another task set
               (`training.transfer`, loaded on first use: it reads orbax
               checkpoints): mtl.transfer, mtl.read_params, mtl.merge_params,
               mtl.add_heads, mtl.drop_tasks, mtl.freeze, mtl.continue_state
  data         sources, task mixtures and evaluation streams, the embedded
               multi_digits dataset and the TFDS catalog; as the package says,
               its modules are imported explicitly
               (`from mtl_jax.data import mixture`)
               mtl.Mixture, mtl.EvalStream, mtl.Component,
               mtl.array_component, mtl.mixing_rates, mtl.ArraySource;
               a catalog dataset's mixture and eval stream (`data.build`):
               mtl.load_dataset, mtl.select_tasks, mtl.build_data

  sklearn      scikit-learn estimators for tables with missing targets
               (`from mtl_jax.sklearn import MultiTaskRegressor,
               MultiTaskClassifier`; not imported by `import mtl_jax`)

The data names above are loaded on first use (their modules import TFDS's
reader), so `import mtl_jax` costs JAX, Flax and optax only. The README's
"Library quick-start" shows a whole training loop with these names.
"""

from __future__ import annotations

import importlib
from typing import Any

from mtl_jax import aggregation
from mtl_jax import data
from mtl_jax import gradients
from mtl_jax import losses
from mtl_jax import metrics
from mtl_jax import models
from mtl_jax import pretext
from mtl_jax import tasks
from mtl_jax import training
from mtl_jax import weighting
from mtl_jax.aggregation import AGGREGATORS
from mtl_jax.aggregation import Aggregator
from mtl_jax.aggregation import get_aggregator
from mtl_jax.models.build import ARCHITECTURES
from mtl_jax.models.build import ArchitectureSpec
from mtl_jax.models.build import TRUNKS
from mtl_jax.models.build import TrunkSpec
from mtl_jax.models.build import get_architecture
from mtl_jax.models.build import make_hard_sharing_model
from mtl_jax.models.build import make_model
from mtl_jax.models.build import make_trunk
from mtl_jax.pretext import PRETEXTS
from mtl_jax.pretext import get_pretext
from mtl_jax.pretext import pretext_task
from mtl_jax.pretext.cluster import cluster_task
from mtl_jax.pretext.cluster import init_task_state
from mtl_jax.tasks import Task
from mtl_jax.tasks import TaskSet
from mtl_jax.tasks import classification_task
from mtl_jax.tasks import multilabel_task
from mtl_jax.tasks import regression_task
# Imported so that `mtl.training.checks` is there (no top-level names).
from mtl_jax.training import checks as _checks  # noqa: F401
from mtl_jax.training.evaluate import make_evaluate
from mtl_jax.training.guard import skip_nonfinite
from mtl_jax.training.optim import make_optimizer
from mtl_jax.training.optim import make_schedule
from mtl_jax.training.state import TrainState
from mtl_jax.training.state import create_train_state
from mtl_jax.training.state import init_params
from mtl_jax.training.step import accumulate
from mtl_jax.training.step import finalize
from mtl_jax.training.step import make_eval_step
from mtl_jax.training.step import make_train_step
from mtl_jax.weighting import WEIGHTINGS
from mtl_jax.weighting import Weighting
from mtl_jax.weighting import get_weighting

__version__ = "0.1.0"

# Loaded on first attribute access (PEP 562): name -> (module, attribute).
_LAZY = {
    "Mixture": ("mtl_jax.data.mixture", "Mixture"),
    "EvalStream": ("mtl_jax.data.mixture", "EvalStream"),
    "Component": ("mtl_jax.data.mixture", "Component"),
    "array_component": ("mtl_jax.data.mixture", "array_component"),
    "mixing_rates": ("mtl_jax.data.mixture", "mixing_rates"),
    "ArraySource": ("mtl_jax.data.sources", "ArraySource"),
    "load_dataset": ("mtl_jax.data.build", "load_dataset"),
    "select_tasks": ("mtl_jax.data.build", "select_tasks"),
    "build_data": ("mtl_jax.data.build", "build_data"),
    "transfer": ("mtl_jax.training.transfer", None),
    "read_params": ("mtl_jax.training.transfer", "read_params"),
    "merge_params": ("mtl_jax.training.transfer", "merge_params"),
    "add_heads": ("mtl_jax.training.transfer", "add_heads"),
    "drop_tasks": ("mtl_jax.training.transfer", "drop_tasks"),
    "freeze": ("mtl_jax.training.transfer", "freeze"),
    "continue_state": ("mtl_jax.training.transfer", "continue_state"),
}


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module 'mtl_jax' has no attribute {name!r}")
  module_name, attr = _LAZY[name]
  module = importlib.import_module(module_name)
  value = module if attr is None else getattr(module, attr)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))


__all__ = [
    # Subpackages and modules.
    "aggregation", "data", "gradients", "losses", "metrics", "models", "pretext",
    "tasks", "training", "weighting",
    # Tasks.
    "Task", "TaskSet", "classification_task", "multilabel_task",
    "regression_task",
    # Self-supervised and unsupervised tasks.
    "PRETEXTS", "cluster_task", "get_pretext", "init_task_state",
    "pretext_task",
    # Models.
    "ARCHITECTURES", "ArchitectureSpec", "TRUNKS", "TrunkSpec",
    "get_architecture", "make_hard_sharing_model", "make_model", "make_trunk",
    # Weighting and aggregation.
    "AGGREGATORS", "Aggregator", "WEIGHTINGS", "Weighting", "get_aggregator",
    "get_weighting",
    # Training.
    "TrainState", "accumulate", "create_train_state", "finalize",
    "init_params", "make_eval_step", "make_evaluate", "make_optimizer",
    "make_schedule", "make_train_step", "skip_nonfinite",
    # Transfer (loaded on first use).
    "add_heads", "continue_state", "drop_tasks", "freeze", "merge_params",
    "read_params", "transfer",
    # Data (loaded on first use).
    "ArraySource", "Component", "EvalStream", "Mixture", "array_component",
    "build_data", "load_dataset", "mixing_rates", "select_tasks",
]
