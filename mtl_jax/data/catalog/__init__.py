"""A catalog of public multi-task datasets, read from prepared TFDS datasets.

Each entry of `DATASETS` is a function `dataset(*, data_dir=None,
eval_split=..., **options) -> Dataset` that opens the dataset's TFDS splits as
random-access sources (`sources.TfdsSource`, no TensorFlow) and returns its
tasks and its `mixture.Component`s, ready for `mixture.Mixture` (training) and
`mixture.EvalStream` (evaluation):

  | name           | module            | tasks                                   |
  |----------------|-------------------|-----------------------------------------|
  | "celeb_a"      | `celeb_a`         | 40 binary attributes + 5 landmarks       |
  | "smallnorb"    | `factors`         | category, instance, elevation, ...      |
  | "dsprites"     | `factors`         | shape, scale, orientation, x/y position |
  | "shapes3d"     | `factors`         | hues, scale, shape, orientation         |
  | "mnist_family" | `mnist_family`    | mnist, fashion_mnist, kmnist            |
  | "conll2003"    | `conll2003`       | pos, chunk, ner (per token)             |
  | "multi_digits" | `multi_digits`    | left, right, present, sum (embedded)    |

Every component labels every task of its dataset (mnist_family: each of its
three sources labels its own task only); an experiment that trains a subset
restricts the components with `mixture.restrict`, and semi-supervised studies
drop labels with `mixture.split_by_label_fraction`.

Datasets must be prepared once in the array_record format (the error for a
missing one says what was looked for and gives the command), e.g.
  tfds build smallnorb --file_format=array_record
`tfds build` needs TensorFlow, which mtl-jax does not install
(`pip install tensorflow-cpu`); it is in the virtualenv's `bin/`.
Tests use `tfds.testing.mock_data`, under which every function here works
unchanged (the task sets are read from the TFDS features).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import inspect
from typing import Any

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import mixture
# The family modules refer back to `Dataset` through this package at call
# time only (never at import), so importing them here is not circular.
from mtl_jax.data.catalog import celeb_a
from mtl_jax.data.catalog import conll2003
from mtl_jax.data.catalog import factors
from mtl_jax.data.catalog import mnist_family
from mtl_jax.data.catalog import multi_digits


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A multi-task dataset: its tasks and its training and held-out components.

  Attributes:
    name: the catalog name ("celeb_a", ...).
    tasks: every task the dataset offers (labels for all of them are provided
      by `train` and `eval` together).
    train: the training components (for `mixture.Mixture`).
    eval: the held-out components (test or validation split, for
      `mixture.EvalStream`); same component names as `train`.
    info: extra facts the model needs, e.g. `{"vocab_size": ..., "vocab":
      text.Vocab}` for text datasets; `{}` otherwise.
  """

  name: str
  tasks: tasks_lib.TaskSet
  train: tuple[mixture.Component, ...]
  eval: tuple[mixture.Component, ...]
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "celeb_a": celeb_a.dataset,
    "smallnorb": factors.smallnorb,
    "dsprites": factors.dsprites,
    "shapes3d": factors.shapes3d,
    "mnist_family": mnist_family.dataset,
    "conll2003": conll2003.dataset,
    "multi_digits": multi_digits.dataset,
}


def get_dataset(name: str, **kwargs: Any) -> Dataset:
  """Builds the catalog dataset called `name`.

  Args:
    name: a key of `DATASETS`.
    **kwargs: the dataset function's keyword arguments (`data_dir`,
      `eval_split` and its own options, e.g. `image_size`).

  Returns:
    The `Dataset`.

  Raises:
    ValueError: `name` is not in the catalog (the message lists the valid
      names), or an option is invalid.
    FileNotFoundError: the dataset is not prepared under `data_dir`.
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; valid: "
                     f"{', '.join(sorted(DATASETS))}")
  fn = DATASETS[name]
  valid = [p.name for p in inspect.signature(fn).parameters.values()
           if p.kind is inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(f"dataset {name!r} has no option(s) {unknown}; valid: "
                     f"{', '.join(valid)}")
  return fn(**kwargs)
