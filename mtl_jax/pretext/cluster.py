"""Clustering as an unsupervised task (DeepCluster style), inside the step.

DeepCluster (Caron et al., ECCV 2018) alternates k-means on the shared
features of the training images with training a classification head on the
cluster assignments as pseudo-labels. Here both halves run inside the pure
train step, so they are deterministic, run under jit and pmap alike, and
resume exactly:

* **A feature bank.** Every step writes the stop-gradient shared features of
  the batch's rows (the rows the task's `rows` selects; pool rows included by
  default) into a ring buffer of `bank_size` rows kept in the task's state.
  The bank is the "sample of the training rows" that k-means sees; its rows
  are at most `bank_size / batch` steps old.
* **k-means every `every` steps** (`mtl_jax.pretext.kmeans.refit`, in a
  `lax.cond`): k-means++ seeding for the first fit, then warm-started from the
  previous centroids, which keeps cluster ids stable from one refit to the
  next so the head need not be reset; empty clusters are moved to the bank
  row farthest from its centroid (`kmeans` docstring). The first fit waits
  until the bank holds at least `num_clusters` selected rows.
* **Pseudo-labels.** A row's label is the nearest centroid of its current
  (stop-gradient) features; for the bank's rows at refit time this is their
  k-means assignment, and it extends to every row without storing a label
  per training example. Before the first fit the task's mask is 0: it has
  no label and, like any task with count 0, no gradient and no effect on the
  weighting or aggregation state.

The task's state (`ClusterState`: centroids, counts, the bank and the bank's
assignments at the last fit) lives in `TrainState.task_state[name]`, so it
is in every checkpoint. The task reads the shared representation, so it
needs an architecture with `encode`/`decode` (hard sharing). The eval step
does not score it (its labels come from the training state); its loss,
count and the k-means statistics are train metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax import losses as losses_lib
from mtl_jax import metrics as metrics_lib
from mtl_jax import tasks as tasks_lib
from mtl_jax.pretext import kmeans as kmeans_lib


class ClusterState(NamedTuple):
  """One clustering task's state.

  Attributes:
    kmeans: the last fit (`centroids [k, D]`, `counts [k]`, `inertia`,
      `num_fits`; zeros before the first fit).
    bank: `[M, D]` float32 features of the last M selected rows written.
    bank_weights: `[M]` 1.0 where the slot holds a selected row.
    position: the next slot to write (int32).
    assignments: `[M]` int32 cluster of each bank row at the last fit.
  """

  kmeans: kmeans_lib.KMeansState
  bank: jax.Array
  bank_weights: jax.Array
  position: jax.Array
  assignments: jax.Array


@dataclasses.dataclass(frozen=True)
class Clustering:
  """The spec of a clustering task (the `Task.pretext` of `cluster_task`).

  Attributes:
    num_clusters: k, the number of pseudo-classes.
    every: refit k-means every this many steps.
    bank_size: rows of features k-means sees (>= the global batch).
    num_iters: Lloyd iterations per fit.
  """

  num_clusters: int = 10
  every: int = 100
  bank_size: int = 2048
  num_iters: int = 20

  name = "cluster"
  # The task reads the shared features of the batch's own inputs.
  view_id = tasks_lib.IDENTITY_VIEW
  # Labels from the features (in the forward pass), not from a transform.
  from_features = True

  def __post_init__(self):
    for field, minimum in (("num_clusters", 2), ("every", 1),
                           ("bank_size", 2), ("num_iters", 1)):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or (
          value < minimum):
        raise ValueError(f"cluster: {field} must be an integer >= {minimum}, "
                         f"got {value!r}")
    if self.bank_size < self.num_clusters:
      raise ValueError(f"cluster: bank_size {self.bank_size} is smaller "
                       f"than num_clusters {self.num_clusters}")

  @property
  def hyperparams(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def check(self, input_shape) -> None:
    del input_shape  # any inputs the trunk reads

  def target_shape(self, input_shape) -> tuple[int, ...]:
    del input_shape
    return ()

  def init_state(self, feature_dim: int) -> ClusterState:
    m = self.bank_size
    return ClusterState(
        kmeans=kmeans_lib.init_state(self.num_clusters, feature_dim),
        bank=jnp.zeros((m, feature_dim), jnp.float32),
        bank_weights=jnp.zeros((m,), jnp.float32),
        position=jnp.zeros((), jnp.int32),
        assignments=jnp.zeros((m,), jnp.int32))


def cluster_task(name: str = "cluster", *, num_clusters: int = 10,
                 every: int = 100, bank_size: int = 2048,
                 num_iters: int = 20, rows: str = "all",
                 weight: float = 1.0) -> tasks_lib.Task:
  """A DeepCluster task: a `num_clusters`-way head on the shared features,
  trained on k-means pseudo-labels (module docstring)."""
  spec = Clustering(num_clusters=num_clusters, every=every,
                    bank_size=bank_size, num_iters=num_iters)
  return tasks_lib.Task(
      name=name, kind="classification", output_shape=(num_clusters,),
      label_shape=(), label_dtype="int32",
      loss=losses_lib.get_loss("softmax_cross_entropy"),
      metrics=(metrics_lib.accuracy(),), weight=weight,
      num_classes=num_clusters, pretext=spec, view=tasks_lib.INPUTS_VIEW,
      rows=rows)


def feature_tasks(tasks: tasks_lib.TaskSet) -> tuple[tasks_lib.Task, ...]:
  """The tasks whose labels are made from the shared features."""
  return tuple(t for t in tasks.pretexts
               if t.pretext.from_features)


def init_task_state(tasks: tasks_lib.TaskSet, encode: Any,
                    sample_inputs: Any) -> dict[str, ClusterState]:
  """`{task: ClusterState}` for the clustering tasks of `tasks` (`{}` if
  none); `encode(inputs) -> features` gives the feature size (traced
  abstractly, e.g. `lambda x: model.apply({"params": p}, x,
  method="encode")`)."""
  tasks = feature_tasks(tasks)
  if not tasks:
    return {}
  shape = jax.eval_shape(encode, sample_inputs).shape
  dim = 1
  for d in shape[1:]:
    dim *= int(d)
  return {t.name: t.pretext.init_state(dim) for t in tasks}


def _flat(z: jax.Array) -> jax.Array:
  return jax.lax.stop_gradient(z).reshape(z.shape[0], -1).astype(jnp.float32)


def pseudo_labels(tasks: tasks_lib.TaskSet, batch: Mapping[str, Any],
                  features: Mapping[str, jax.Array]) -> dict[str, Any]:
  """The batch with each clustering task's label (nearest centroid of the
  stop-gradient features) and its mask zeroed before the first fit."""
  tasks = feature_tasks(tasks)
  if not tasks:
    return batch
  labels, masks = dict(batch["labels"]), dict(batch["masks"])
  for task in tasks:
    state = batch["task_state"][task.name]
    labels[task.name], _ = kmeans_lib.assign(_flat(features[task.view]),
                                             state.kmeans.centroids)
    fitted = (state.kmeans.num_fits > 0).astype(jnp.float32)
    masks[task.name] = batch["masks"][task.name] * fitted
  return {**batch, "labels": labels, "masks": masks}


def update(task: tasks_lib.Task, state: ClusterState, features: jax.Array,
           selected: jax.Array, step: jax.Array, key: jax.Array,
           axis_name: str | None = None) -> ClusterState:
  """Writes this step's selected rows into the bank and refits k-means
  when `step + 1` is a multiple of `every` and the bank holds >= k rows.

  Args:
    task: the clustering task.
    state: its state before the step.
    features: this device's `[B, ...]` features of the task's view.
    selected: `[B]` 1.0 on the rows the task trains on (its `rows`).
    step: the step being taken (`state.step` before the update).
    key: the step's key for the k-means++ seeding.
    axis_name: the pmap axis: every device writes the global batch.
  """
  spec: Clustering = task.pretext
  z, w = _flat(features), jnp.asarray(selected, jnp.float32)
  if axis_name:
    z = jax.lax.all_gather(z, axis_name, tiled=True)
    w = jax.lax.all_gather(w, axis_name, tiled=True)
  rows = z.shape[0]
  if rows > spec.bank_size:
    raise ValueError(f"cluster task {task.name!r}: bank_size "
                     f"{spec.bank_size} is smaller than the global batch "
                     f"{rows}; the bank must hold at least one batch")
  # Only selected rows are written, packed to the front (stable order), so
  # the bank fills with rows the task trains on.
  order = jnp.argsort(-w, stable=True)
  z, w = z[order], w[order]
  count = jnp.sum(w > 0).astype(jnp.int32)
  slots = (state.position + jnp.arange(rows)) % spec.bank_size
  keep = jnp.arange(rows) < count
  bank = state.bank.at[slots].set(
      jnp.where(keep[:, None], z, state.bank[slots]))
  weights = state.bank_weights.at[slots].set(
      jnp.where(keep, 1.0, state.bank_weights[slots]))
  state = state._replace(bank=bank, bank_weights=weights,
                         position=(state.position + count) % spec.bank_size)
  due = ((step + 1) % spec.every == 0) & (
      jnp.sum(weights) >= spec.num_clusters)

  def refit(s: ClusterState) -> ClusterState:
    fit, assignments = kmeans_lib.refit(key, s.kmeans, s.bank,
                                        num_iters=spec.num_iters,
                                        weights=s.bank_weights)
    return s._replace(kmeans=fit, assignments=assignments)

  return jax.lax.cond(due, refit, lambda s: s, state)


def update_states(tasks: tasks_lib.TaskSet, task_state: Mapping[str, Any],
                  features: Mapping[str, jax.Array] | None,
                  batch: Mapping[str, Any], step: jax.Array, key: jax.Array,
                  axis_name: str | None = None) -> dict[str, Any]:
  """`update` for every clustering task; `batch` is the step's batch after
  `add_views`, whose mask of a clustering task is its row selection."""
  out = dict(task_state)
  for i, task in enumerate(feature_tasks(tasks)):
    out[task.name] = update(
        task, task_state[task.name], features[task.view],
        batch["masks"][task.name], step, jax.random.fold_in(key, i),
        axis_name)
  return out


def metrics(tasks: tasks_lib.TaskSet, task_state: Mapping[str, Any]
            ) -> dict[str, jax.Array]:
  """`<task>/num_fits`, `<task>/inertia` and `<task>/clusters_used`."""
  out = {}
  for task in feature_tasks(tasks):
    fit = task_state[task.name].kmeans
    out[f"{task.name}/num_fits"] = fit.num_fits
    out[f"{task.name}/inertia"] = fit.inertia
    out[f"{task.name}/clusters_used"] = jnp.sum(fit.counts > 0)
  return out
