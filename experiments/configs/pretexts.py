"""The config block of the self-supervised (pretext) tasks.

`config.pretext.names` lists the pretexts to train next to the supervised
tasks ("" = none), each a task named after its pretext; every pretext of
`mtl_jax.pretext.PRETEXTS`, and "cluster" (DeepCluster-style k-means
pseudo-labels, `mtl_jax.pretext.cluster`: num_clusters, every, bank_size,
num_iters; hard sharing only), has a sub-config with the hyperparameters of
its factory (read from its signature) and:

  rows     all | labelled | unlabelled: the rows it trains on (the pool rows
           count as unlabelled; set config.data.drop_unlabelled=False to
           mix them in);
  weight   its static loss weight;
  loss     "" (the pretext's own: mse for images) | mse | l1 (image targets);
  view     "" (its own view, or the inputs for an identity pretext) or the
           view of another pretext that makes it the same way.

  --config.pretext.names=grid_mask,rotate \
  '--config.pretext.grid_mask.grid=(3,4)' --config.pretext.rotate.rows=unlabelled
"""

from __future__ import annotations

import inspect
from typing import Any

import ml_collections
from ml_collections import config_dict

from mtl_jax import pretext as pretext_lib
from mtl_jax.pretext import cluster as cluster_lib

# Fields of every pretext's sub-config that are not its factory's
# hyperparameters.
TASK_FIELDS = ("rows", "weight", "loss", "view")
# The unsupervised task that is not a view of the inputs.
CLUSTER = "cluster"
FACTORIES = {**pretext_lib.PRETEXTS, CLUSTER: cluster_lib.Clustering}


def _hyperparameters(factory) -> dict[str, Any]:
  out = {}
  for name, p in inspect.signature(factory).parameters.items():
    if p.default is inspect.Parameter.empty:
      continue
    # A None default (grid_mask's `cell`: random) takes an int on the
    # command line.
    out[name] = (config_dict.placeholder(int) if p.default is None
                 else p.default)
  return out


def pretext_block() -> ml_collections.ConfigDict:
  """`{"names": "", <pretext>: {hyperparameters, rows, weight, loss, view}}`."""
  block = ml_collections.ConfigDict({"names": ""})
  for name, factory in sorted(pretext_lib.PRETEXTS.items()):
    block[name] = ml_collections.ConfigDict({
        **_hyperparameters(factory), "rows": "all", "weight": 1.0,
        "loss": "", "view": ""})
  block[CLUSTER] = ml_collections.ConfigDict({
      **_hyperparameters(cluster_lib.Clustering), "rows": "all",
      "weight": 1.0})
  return block


def pretext_names(block: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The selected pretexts; unknown or repeated names are an error."""
  names = tuple(n.strip() for n in block.names.split(",") if n.strip())
  unknown = sorted(set(names) - set(FACTORIES))
  if unknown:
    raise ValueError(f"config.pretext.names: unknown pretext(s) {unknown}; "
                     f"valid: {', '.join(sorted(FACTORIES))}")
  if len(set(names)) != len(names):
    raise ValueError(f"config.pretext.names repeats a pretext: {names}")
  return names


def make_pretexts(block: ml_collections.ConfigDict
                  ) -> dict[str, tuple[pretext_lib.Pretext, dict[str, Any]]]:
  """`{name: (pretext, task options)}` of the selected pretexts; the
  pretexts' factories check their hyperparameters (errors name the field)."""
  out = {}
  for name in pretext_names(block):
    fields = dict(block[name])
    options = {k: fields.pop(k, "") for k in TASK_FIELDS}
    try:
      pretext = (cluster_lib.Clustering(**fields) if name == CLUSTER
                 else pretext_lib.get_pretext(name, **fields))
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.pretext.{name}: {e}") from None
    if options["rows"] not in ("all", "labelled", "unlabelled"):
      raise ValueError(f"config.pretext.{name}.rows: unknown rows "
                       f"{options['rows']!r}; valid: all, labelled, "
                       "unlabelled")
    out[name] = (pretext, options)
  return out


def pretext_tasks(block: ml_collections.ConfigDict, input_shape
                  ) -> list[Any]:
  """The selected pretexts as tasks on inputs of one example's shape."""
  tasks = []
  for name, (pretext, o) in make_pretexts(block).items():
    if name == CLUSTER:
      tasks.append(cluster_lib.cluster_task(
          name, rows=o["rows"], weight=float(o["weight"]),
          **pretext.hyperparams))
      continue
    try:
      tasks.append(pretext_lib.pretext_task(
          name, pretext, input_shape, rows=o["rows"], view=o["view"] or None,
          weight=float(o["weight"]), loss=o["loss"] or None))
    except ValueError as e:
      raise ValueError(f"config.pretext.{name}: {e}") from None
  return tasks
