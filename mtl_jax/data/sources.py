"""Random-access data sources: in-memory arrays and prepared TFDS datasets.

A source is anything with a `name`, a length and `read(indices)`, which returns
the raw features of those examples stacked along a leading axis. Sources know
nothing about tasks or batches: a mixture component (`mixture.Component`) pairs
a source with the conversion of its raw features into the batch format.

`TfdsSource` reads a prepared TFDS dataset through `tfds.data_source` (the
array_record files; no TensorFlow, no tf.data), so examples are read lazily and
only by the host that needs them: datasets far larger than memory (celeb_a,
shapes3d) work the same as small ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import os
import shutil
import sys
from typing import Any, Protocol

import jax
import numpy as np
import tensorflow_datasets as tfds

Features = dict[str, Any]  # feature name -> stacked array, or a nested dict


class Source(Protocol):
  """What a mixture needs from a dataset: a name, a size and random access."""

  name: str

  def __len__(self) -> int:
    ...

  def read(self, indices: np.ndarray) -> Features:
    """Raw features of examples `indices` (int [n]), leading axis n."""
    ...


def check_indices(indices: Any, size: int, name: str) -> np.ndarray:
  """`indices` as an int64 [n] array inside [0, size).

  Raises:
    ValueError: not 1-D integers, or a value out of range (names the source).
  """
  indices = np.asarray(indices)
  if indices.ndim != 1 or not (indices.size == 0 or
                               np.issubdtype(indices.dtype, np.integer)):
    raise ValueError(f"source {name!r}: indices must be a 1-D integer array, "
                     f"got dtype {indices.dtype} and shape {indices.shape}")
  if indices.size and (indices.min() < 0 or indices.max() >= size):
    raise ValueError(f"source {name!r}: indices must lie in [0, {size}), got "
                     f"values in [{indices.min()}, {indices.max()}]")
  return indices.astype(np.int64)


class ArraySource:
  """A source over in-memory numpy arrays (a pytree with a common leading axis).

  Args:
    name: the source's name (used in errors and as its mixture identity).
    arrays: nested dict of arrays, all with leading size N.

  Raises:
    ValueError: no arrays, a scalar, or leaves of different lengths.
  """

  def __init__(self, name: str, arrays: Mapping[str, Any]):
    leaves, _ = jax.tree_util.tree_flatten_with_path(arrays)
    if not leaves:
      raise ValueError(f"source {name!r}: arrays has no leaves")
    lengths = {}
    for path, leaf in leaves:
      if np.ndim(leaf) == 0:
        raise ValueError(f"source {name!r}: {jax.tree_util.keystr(path)} is a "
                         "scalar; every array needs a leading example axis")
      lengths[jax.tree_util.keystr(path)] = np.shape(leaf)[0]
    if len(set(lengths.values())) != 1:
      raise ValueError(f"source {name!r}: arrays have different leading sizes "
                       f"{lengths}")
    self.name = name
    self._arrays = jax.tree.map(np.asarray, dict(arrays))
    self._size = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._size

  def read(self, indices: np.ndarray) -> Features:
    indices = check_indices(indices, self._size, self.name)
    return jax.tree.map(lambda a: a[indices], self._arrays)


def stack_records(records: Sequence[Mapping[str, Any]]) -> Features:
  """Stacks per-example feature dicts into arrays with a leading axis.

  Nested dicts (e.g. celeb_a's `attributes`) stay nested. A feature whose
  examples differ in shape (variable-length sequences such as tokens) becomes
  a 1-D object array holding one array per example.
  """
  if not records:
    raise ValueError("stack_records needs at least one record")
  out = {}
  for key, first in records[0].items():
    if isinstance(first, Mapping):
      out[key] = stack_records([r[key] for r in records])
      continue
    values = [np.asarray(r[key]) for r in records]
    if all(v.shape == values[0].shape for v in values):
      out[key] = np.stack(values)
    else:
      ragged = np.empty(len(values), dtype=object)
      ragged[:] = values
      out[key] = ragged
  return out


def _path_note() -> str:
  """Where `tfds` is when it is not on the PATH: a virtualenv's `bin/` is
  not on it unless the virtualenv is activated."""
  local = os.path.join(os.path.dirname(sys.executable), "tfds")
  if shutil.which("tfds") or not os.path.exists(local):
    return ""
  return (f"; `tfds` is {local}, not on the PATH (activate the virtualenv, "
          "or call it by that path)")


def prepare_command(names: str | Sequence[str], data_dir: str | None) -> str:
  """The shell command that prepares the TFDS dataset(s) `names` in the
  array_record format."""
  names = [names] if isinstance(names, str) else list(names)
  target = f" --data_dir={data_dir}" if data_dir else ""
  return f"tfds build {' '.join(names)}{target} --file_format=array_record"


# How `tfds build` is made to work: TFDS builds datasets with TensorFlow,
# which mtl-jax does not depend on (it reads the array_record files without
# it).
PREPARE_NOTE = (
    "`tfds build` needs TensorFlow, which mtl-jax does not install (pip "
    "install tensorflow-cpu), and internet access (some datasets need a "
    "manual download first, see their TFDS catalog page)")


class NotPreparedError(FileNotFoundError):
  """A TFDS dataset is not prepared for random access.

  Attributes:
    names: the TFDS names that are missing.
    missing: what was looked for and not found, per name.
    data_dir: the data directory looked in.
  """

  def __init__(self, missing: Mapping[str, str], data_dir: str | None):
    self.names = tuple(missing)
    self.missing = dict(missing)
    self.data_dir = data_dir
    what = "; ".join(f"{n}: {m}" for n, m in self.missing.items())
    super().__init__(
        f"TFDS dataset{'s' if len(self.names) > 1 else ''} "
        f"{', '.join(self.names)} {'are' if len(self.names) > 1 else 'is'} "
        f"not prepared for random access in "
        f"data_dir={data_dir or '~/tensorflow_datasets'} ({what}). "
        f"{PREPARE_NOTE}{_path_note()}. Prepare "
        f"{'them' if len(self.names) > 1 else 'it'} "
        f"once with:\n  {prepare_command(self.names, data_dir)}")


def merge_not_prepared(errors: Sequence[NotPreparedError]
                       ) -> NotPreparedError:
  """One error naming every dataset of `errors` (same data_dir), with one
  command that prepares them all."""
  missing = {}
  for e in errors:
    missing.update(e.missing)
  return NotPreparedError(missing, errors[0].data_dir)


def _what_is_missing(name: str, split: str, data_dir: str | None,
                     error: Exception) -> str:
  """What `tfds.data_source(name, split, data_dir)` looked for and did not
  find: the version directory, or a dataset prepared in another format."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    version_dir = os.fspath(builder.data_dir)
  except Exception:  # pylint: disable=broad-except  # an unknown name
    return f"{type(error).__name__}: {str(error).splitlines()[0]}"
  info_path = os.path.join(version_dir, "dataset_info.json")
  if not os.path.exists(info_path):
    return f"no {info_path} (version {builder.version})"
  try:
    with open(info_path) as f:
      file_format = json.load(f).get("fileFormat", "tfrecord")
  except (OSError, ValueError):
    file_format = "unknown"
  if file_format not in ("array_record", "parquet"):
    return (f"{version_dir} holds it in the {file_format} format, which "
            "cannot be read by index: delete that directory and prepare it "
            "again")
  return (f"split {split!r} not readable in {version_dir}: "
          f"{type(error).__name__}: {str(error).splitlines()[0]}")


class TfdsSource:
  """A split of a prepared TFDS dataset, read by index with `tfds.data_source`.

  Args:
    name: TFDS name, optionally with config and version ("smallnorb",
      "shapes3d:2.0.0").
    split: TFDS split, slices included ("train", "train[:90%]").
    data_dir: the TFDS data directory (None: TFDS's default).
    features: keep only these top-level features (None: all). Dropping what a
      task set does not use saves decoding time (e.g. smallnorb's `image2`).

  Raises:
    NotPreparedError: (a FileNotFoundError) the dataset is not prepared
      under `data_dir` in a random-access format; the message says what was
      looked for and gives the command that prepares it.
    ValueError: `features` names a feature the dataset does not have.
  """

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               features: Sequence[str] | None = None):
    self.name = f"{name}/{split}"
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                      download=False)
    except Exception as e:  # TFDS raises several types for "not there"
      raise NotPreparedError(
          {name: _what_is_missing(name, split, data_dir, e)}, data_dir) from e
    available = tuple(self._source.dataset_info.features.keys())
    if features is not None:
      unknown = sorted(set(features) - set(available))
      if unknown:
        raise ValueError(f"source {self.name!r}: unknown feature(s) {unknown};"
                         f" the dataset has {', '.join(available)}")
      self._features = tuple(features)
    else:
      self._features = available
    self.info = self._source.dataset_info
    self._size = len(self._source)

  def __len__(self) -> int:
    return self._size

  def _records(self, indices: list[int]) -> list[Mapping[str, Any]]:
    try:
      return list(self._source.__getitems__(indices))  # batched read
    except TypeError:
      # `tfds.testing.mock_data` patches a data source without batched reads.
      return [self._source[i] for i in indices]

  def read(self, indices: np.ndarray) -> Features:
    indices = check_indices(indices, self._size, self.name)
    if not indices.size:
      raise ValueError(f"source {self.name!r}: read needs at least one index")
    records = self._records([int(i) for i in indices])
    return stack_records([{k: r[k] for k in self._features} for r in records])
