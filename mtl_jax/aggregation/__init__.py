"""Gradient-level aggregation of per-task gradients of the shared parameters.

Every method is an `Aggregator(init, update, rep_grad_ok, from_gram)` built by
a factory named after it (see `base.py` for the contract); every method but
GradDrop is Gram-based (`from_gram` is set). `AGGREGATORS` is the one
name -> factory table; `get_aggregator` raises for an unknown name, listing the
valid ones.
"""

from __future__ import annotations

from typing import Any, Callable

from mtl_jax.aggregation.aligned_mtl import aligned_mtl
from mtl_jax.aggregation.base import Aggregator
from mtl_jax.aggregation.basic import mean
from mtl_jax.aggregation.basic import sum  # pylint: disable=redefined-builtin
from mtl_jax.aggregation.cagrad import cagrad
from mtl_jax.aggregation.conflict_free import config
from mtl_jax.aggregation.graddrop import graddrop
from mtl_jax.aggregation.gradvac import gradvac
from mtl_jax.aggregation.imtl import imtl_g
from mtl_jax.aggregation.mgda import mgda
from mtl_jax.aggregation.nash_mtl import nash_mtl
from mtl_jax.aggregation.pcgrad import pcgrad
from mtl_jax.aggregation.upgrad import dualproj
from mtl_jax.aggregation.upgrad import upgrad

AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    "aligned_mtl": aligned_mtl,
    "cagrad": cagrad,
    "config": config,
    "dualproj": dualproj,
    "graddrop": graddrop,
    "gradvac": gradvac,
    "imtl_g": imtl_g,
    "mean": mean,
    "mgda": mgda,
    "nash_mtl": nash_mtl,
    "pcgrad": pcgrad,
    "sum": sum,
    "upgrad": upgrad,
}


def get_aggregator(name: str, **kwargs: Any) -> Aggregator:
  """Builds the aggregator called `name` with its hyperparameters.

  Raises:
    ValueError: unknown name (lists the valid ones).
  """
  if name not in AGGREGATORS:
    raise ValueError(f"unknown aggregation method {name!r}; valid: "
                     f"{', '.join(sorted(AGGREGATORS))}")
  return AGGREGATORS[name](**kwargs)
