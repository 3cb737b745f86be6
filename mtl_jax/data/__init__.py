"""Datasets and input pipelines.

Modules are imported explicitly (`from mtl_jax.data import multi_digits`); this
package imports nothing itself so that `import mtl_jax` never pulls in TFDS or
registers a builder as a side effect.
"""
