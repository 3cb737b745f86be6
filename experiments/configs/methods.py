"""Config blocks for the weighting and aggregation methods.

Each block holds the selected method's `name` and, for every method of the
registry, a sub-config with the hyperparameters of its factory and their
defaults, read from the factory's signature. So every hyperparameter of every
method can be set on the command line, e.g.

  --config.weighting.name=gradnorm --config.weighting.gradnorm.alpha=1.0
  --config.aggregation.name=cagrad --config.aggregation.cagrad.c=0.5
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import ml_collections

_SIMPLE = (bool, int, float, str)


def factory_defaults(factory: Callable[..., Any],
                     skip: tuple[str, ...] = ()) -> dict[str, Any]:
  """The keyword arguments of `factory` with simple (CLI-settable) defaults."""
  out = {}
  for name, p in inspect.signature(factory).parameters.items():
    if name in skip or p.default is inspect.Parameter.empty:
      continue
    if isinstance(p.default, _SIMPLE):
      out[name] = p.default
  return out


def method_block(default: str, registry: Mapping[str, Callable[..., Any]],
                 skip: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """`{"name": default, <method>: {hyperparameter: default}}` for a registry."""
  block = ml_collections.ConfigDict({"name": default})
  for name, factory in sorted(registry.items()):
    block[name] = ml_collections.ConfigDict(factory_defaults(factory, skip))
  return block


def method_kwargs(block: ml_collections.ConfigDict,
                  valid: Mapping[str, Any], kind: str) -> dict[str, Any]:
  """The hyperparameters of the selected method; unknown names are an error."""
  name = block.name
  if name not in valid:
    raise ValueError(f"unknown {kind} method {name!r}; valid: "
                     f"{', '.join(sorted(valid))}")
  return dict(block[name]) if name in block else {}
