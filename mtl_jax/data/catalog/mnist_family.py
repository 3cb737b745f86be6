"""MNIST, Fashion-MNIST and Kuzushiji-MNIST: three tasks from three datasets.

Datasets: LeCun, Bottou, Bengio and Haffner, "Gradient-Based Learning Applied
to Document Recognition", 1998 (TFDS `mnist`); Xiao, Rasul and Vollgraf,
"Fashion-MNIST", arXiv:1708.07747, 2017 (`fashion_mnist`); Clanuwat et al.,
"Deep Learning for Classical Japanese Literature", arXiv:1812.01718, 2018
(`kmnist`). Each has 60,000 train / 10,000 test 28x28x1 images.

Tasks: "mnist", "fashion_mnist", "kmnist", each a 10-class
`classification_task`. The data come from three components, one per TFDS
dataset and named like its task; an example is labelled for its own
dataset's task only, so a mixed batch carries mask 1 for exactly one of the
three tasks per example (the mixture fills the other two with label 0, mask
0). This is the "disjoint labels" setting of multi-task learning: the tasks
share an input space but no example.

Preprocessing: uint8 images scaled to float32 [0, 1], shape `image_size` x
`image_size` x 1 (default 28: no resize).

Prepare the three once with
`tfds build mnist fashion_mnist kmnist --file_format=array_record` (TFDS's
`tfds build` needs TensorFlow: `pip install tensorflow-cpu`); the error for
missing ones names each and gives this command.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import catalog  # for `Dataset`, used at call time only
from mtl_jax.data import mixture
from mtl_jax.data import preprocess
from mtl_jax.data import sources

# Task name == TFDS name == component name.
MEMBERS = ("mnist", "fashion_mnist", "kmnist")


def dataset(*, data_dir: str | None = None, eval_split: str = "test",
            train_split: str = "train", image_size: int = 28
            ) -> catalog.Dataset:
  """The three MNIST-like datasets, each labelling its own task.

  Args:
    data_dir: the TFDS data directory (None: TFDS's default), shared by the
      three datasets.
    eval_split: the held-out split of each dataset.
    train_split: the training split of each dataset.
    image_size: side of the square, one-channel input images.

  Returns:
    A `catalog.Dataset` with three components per part, named "mnist",
    "fashion_mnist" and "kmnist".

  Raises:
    ValueError: `image_size` is not a positive integer.
    sources.NotPreparedError: (a FileNotFoundError) datasets are not
      prepared under `data_dir`; the message names every missing one and
      gives one command that prepares them all.
  """
  if isinstance(image_size, bool) or not isinstance(image_size, int) or (
      image_size < 1):
    raise ValueError(f"mnist_family: option image_size must be a positive "
                     f"integer, got {image_size!r}")
  spec = preprocess.ImageSpec(shape=(image_size, image_size, 1))

  def make_convert(task: str):
    def convert(raw: sources.Features) -> dict[str, Any]:
      return {"inputs": spec(raw["image"]),  # [n, s, s, 1]
              "labels": {task: np.asarray(raw["label"]).astype(np.int32)},
              "masks": {task: np.ones(len(raw["label"]), np.float32)}}
    return convert

  opened, missing = {}, []
  for name in MEMBERS:  # every missing dataset is named, with one command
    try:
      opened[name] = tuple(
          sources.TfdsSource(name, split, data_dir=data_dir,
                             features=("image", "label"))
          for split in (train_split, eval_split))
    except sources.NotPreparedError as e:
      missing.append(e)
  if missing:
    raise sources.merge_not_prepared(missing)
  task_list, train, held_out = [], [], []
  for name in MEMBERS:
    train_source, eval_source = opened[name]
    task_list.append(tasks_lib.classification_task(
        name, train_source.info.features["label"].num_classes))
    convert = make_convert(name)
    train.append(mixture.Component(name, train_source, convert))
    held_out.append(mixture.Component(name, eval_source, convert))
  return catalog.Dataset(name="mnist_family",
                         tasks=tasks_lib.TaskSet(task_list),
                         train=tuple(train), eval=tuple(held_out), info={})
