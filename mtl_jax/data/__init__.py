"""Datasets and input pipelines.

This package imports nothing when it is imported, so that `import mtl_jax`
never pulls in TFDS or registers a builder as a side effect; a submodule is
imported on first use, explicitly (`from mtl_jax.data import multi_digits`) or
as an attribute (`mtl_jax.data.mixture`).
"""

import importlib

_SUBMODULES = ("build", "catalog", "mixture", "multi_digits", "pipeline",
               "preprocess", "sources", "text")


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
