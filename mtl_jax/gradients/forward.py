"""How the train step calls a model: predictions, auxiliary losses, views.

Every gradient path reaches the model through a `Forward`, never through
`apply_fn` directly, so what a forward pass is (which inputs each task reads,
which keyword arguments the model takes, which collections are mutable) is
decided here once.

**Views.** A batch is seen through one or more views: named inputs the tasks
read (`Task.view`): the `"inputs"` view (the batch's inputs) or a view that
a pretext task makes (`mtl_jax.pretext.add_views`, run by the step before the
path, puts them under `batch["views"]`). The forward pass runs the model once
per distinct view, never once per task, and each task takes its prediction
from the pass over its own view (heads a view's tasks do not use are dead
code that XLA removes); the two-stage calls (`encode`,
`decode`) return and take features as a `{view: features}` dict. The paths
treat features, and their per-task gradients, as pytrees, so a second view
adds a trunk pass here and no branch to any path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax import tasks as tasks_lib
from mtl_jax.pretext import cluster as cluster_lib
from mtl_jax.pretext import views as views_lib

Batch = Mapping[str, Any]
# Models report auxiliary losses (penalties, adversarial losses) by sowing
# scalars into this collection; the step adds them to the objective.
AUX_LOSSES = "aux_losses"
# The view of the batch's own inputs.
INPUTS_VIEW = tasks_lib.INPUTS_VIEW


def flatten_aux(collection: Mapping[str, Any]) -> dict[str, jax.Array]:
  """`{"path/name": scalar}` from a sown collection (sow keeps tuples)."""
  out = {}
  for path, value in jax.tree_util.tree_leaves_with_path(collection):
    keys = [getattr(k, "key", None) for k in path]
    name = "/".join(str(k) for k in keys if isinstance(k, str))
    out[name] = out.get(name, 0.0) + jnp.asarray(value, jnp.float32)
  return out


def aux_total(aux: Mapping[str, jax.Array]) -> jax.Array:
  """The sum of auxiliary losses (a float32 scalar, 0 without any)."""
  return sum(aux.values(), jnp.zeros((), jnp.float32))


def batch_size(batch: Batch) -> int:
  return jax.tree.leaves(batch["inputs"])[0].shape[0]


@dataclasses.dataclass(frozen=True)
class Forward:
  """The model as the step sees it.

  Attributes:
    apply_fn: a linen `model.apply`: `apply_fn({"params": p}, inputs,
      train=True, rngs={"dropout": key}, mutable=["aux_losses"])` returns
      `({task: prediction}, collections)`.
    tasks: the tasks, in the order of the task axis.
    encode_decode: the model has `encode(inputs) -> features` and
      `decode(features) -> {task: prediction}` methods, and `decode` applies
      one head module `tasks/<task>` per task to the features (what rep_grad
      and the two-stage factored route need).
    pass_task_presence: call the model with `task_presence=[B, K]`.
  """

  apply_fn: Callable[..., Any]
  tasks: tasks_lib.TaskSet
  encode_decode: bool = False
  pass_task_presence: bool = False

  def view_names(self) -> tuple[str, ...]:
    """The distinct views the tasks read, in a fixed order."""
    return self.tasks.view_names

  def task_views(self) -> dict[str, str]:
    """`{task: view}`."""
    return {task.name: task.view for task in self.tasks}

  def views(self, batch: Batch) -> dict[str, Any]:
    """`{view: inputs}` of a batch (its pretext views made by the step)."""
    return views_lib.batch_views(self.tasks, batch)

  @property
  def feature_views(self) -> tuple[str, ...]:
    """The views whose shared features label a task (clustering)."""
    return tuple(dict.fromkeys(
        t.view for t in cluster_lib.feature_tasks(self.tasks)))

  def kept_features(self, features: Mapping[str, jax.Array] | None
                    ) -> dict[str, jax.Array] | None:
    """The stop-gradient features the step keeps (for the clustering
    tasks' banks); None without such tasks."""
    if not self.feature_views:
      return None
    return {v: jax.lax.stop_gradient(features[v]) for v in self.feature_views}

  def _kwargs(self, batch: Batch) -> dict[str, Any]:
    if not self.pass_task_presence:
      return {}
    return {"task_presence": tasks_lib.task_presence(batch["masks"],
                                                      self.tasks.names)}

  def _call(self, params, inputs, batch, key, **kwargs):
    out, collections = self.apply_fn(
        {"params": params}, inputs, train=True, rngs={"dropout": key},
        mutable=[AUX_LOSSES], **self._kwargs(batch), **kwargs)
    return out, flatten_aux(collections.get(AUX_LOSSES, {}))

  def _per_view(self, outputs: Mapping[str, Mapping[str, Any]]
                ) -> dict[str, Any]:
    """Each task's prediction from the pass over its view."""
    return {task: outputs[view][task]
            for task, view in self.task_views().items()
            if task in outputs[view]}

  def predict(self, params, batch: Batch, key: jax.Array
              ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """`({task: prediction}, {aux name: loss})`: one pass per view."""
    predictions, _, aux = self._forward(params, batch, key)
    return predictions, aux

  def _forward(self, params, batch: Batch, key: jax.Array):
    """`(predictions, {view: features} or None, aux)`. With clustering
    tasks, each view is `decode(encode(x))` (the same pass as the model's
    `__call__` for an encode/decode model) so its features are at hand."""
    if not self.feature_views:
      outputs, aux = {}, {}
      for view, inputs in self.views(batch).items():
        outputs[view], view_aux = self._call(params, inputs, batch, key)
        aux.update(_prefixed(view, view_aux))
      return self._per_view(outputs), None, aux
    if not self.encode_decode:
      raise ValueError(
          f"clustering task(s) {[t.name for t in cluster_lib.feature_tasks(self.tasks)]} "
          "read the shared features: they need an architecture with "
          "encode/decode (encode_decode=True, e.g. hard sharing)")
    features, aux = self.encode(params, batch, key)
    predictions, head_aux = self.decode(params, features, batch, key)
    return predictions, features, {**aux, **head_aux}

  def encode(self, params, batch: Batch, key: jax.Array,
             views: tuple[str, ...] | None = None
             ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """`({view: features}, aux)`: the trunk, once per view (of `views`, in
    `view_names` order, or all)."""
    features, aux = {}, {}
    for view, inputs in self.views(batch).items():
      if views is not None and view not in views:
        continue
      features[view], view_aux = self._call(params, inputs, batch, key,
                                            method="encode")
      aux.update(_prefixed(view, view_aux))
    return features, aux

  def decode(self, params, features: Mapping[str, jax.Array], batch: Batch,
             key: jax.Array, head_eps: Mapping[str, jax.Array] | None = None
             ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """`({task: prediction}, aux)`: the heads on each view's features.

    `head_eps[task]` (shaped like the features of the task's view) is added
    to the input of that task's head, `tasks/<task>`: its cotangent is the
    task's gradient w.r.t. the features (the two-stage factored route).
    """
    outputs, aux = {}, {}
    views = self.task_views()
    for view, z in features.items():
      eps = {t: e for t, e in (head_eps or {}).items() if views[t] == view}
      with _adding_to_head_inputs(eps):
        outputs[view], view_aux = self._call(params, z, batch, key,
                                             method="decode")
      aux.update(_prefixed(view, view_aux))
    return self._per_view(outputs), aux

  def task_sums(self, predictions: Mapping[str, jax.Array], batch: Batch,
                features: Mapping[str, jax.Array] | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """`(loss_sums [K], counts [K])` of this device's rows; clustering
    tasks take their pseudo-labels from `features` (`{view: features}`)."""
    tasks_lib.check_predictions(self.tasks, predictions, batch_size(batch))
    if self.feature_views:
      batch = cluster_lib.pseudo_labels(self.tasks, batch, features)
    return tasks_lib.task_loss_sums(self.tasks, predictions, batch)

  def loss_sums(self, params, batch: Batch, key: jax.Array):
    """`((loss_sums [K], aux total), (counts [K], aux, kept features))`,
    for `jax.vjp` (`kept_features`)."""
    predictions, features, aux = self._forward(params, batch, key)
    sums, counts = self.task_sums(predictions, batch, features)
    return (sums, aux_total(aux)), (counts, aux, self.kept_features(features))


def _adding_to_head_inputs(eps: Mapping[str, jax.Array]):
  """A method interceptor adding `eps[task]` to the input of the head module
  `tasks/<task>` (the `encode_decode` contract)."""
  def interceptor(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    if (context.method_name == "__call__" and len(path) == 2
        and path[0] == "tasks" and path[1] in eps):
      args = (args[0] + eps[path[1]],) + tuple(args[1:])
    return next_fun(*args, **kwargs)
  return nn.intercept_methods(interceptor)


def _prefixed(view: str, aux: Mapping[str, jax.Array]
              ) -> dict[str, jax.Array]:
  """Auxiliary losses of the inputs view keep their names; those of other
  views are reported as `<view>/<name>`."""
  if view == INPUTS_VIEW:
    return dict(aux)
  return {f"{view}/{name}": value for name, value in aux.items()}
