"""Datasets of rendered objects whose generative factors are the tasks.

Each image is rendered from a few known factors (object, pose, lighting,
colour, ...); predicting every factor from the image is a multi-task problem
with fully labelled data and no label noise.

smallnorb -- LeCun, Huang and Bottou, "Learning Methods for Generic Object
  Recognition with Invariance to Pose and Lighting", CVPR 2004 (TFDS
  `smallnorb` 2.0.0: 24,300 train / 24,300 test stereo pairs of 96x96x1).
  Tasks, all `classification_task`: "category" (5), "instance" (10),
  "elevation" (9), "azimuth" (18), "lighting" (6), from the TFDS features
  `label_category`, `instance`, `label_elevation`, `label_azimuth`,
  `label_lighting`. Input: the left camera's `image` only (`image2` is not
  read), resized (bilinear, antialiased) to `image_size` (default 48) x
  `image_size` x 1 and scaled to [0, 1]. Splits "train" / "test". Note that
  the train split holds instances {4, 6, 7, 8, 9} of each category and the
  test split instances {0, 1, 2, 3, 5}: "instance" cannot be learned for the
  test split (its held-out accuracy measures nothing); evaluate it on a slice
  of train (e.g. `train_split="train[:90%]", eval_split="train[90%:]"`).

dsprites -- Matthey, Higgins, Hassabis and Lerchner, "dSprites: Disentanglement
  testing Sprites dataset", 2017 (TFDS `dsprites` 2.0.0: 737,280 64x64x1
  images, one "train" split). Tasks: "shape" (`classification_task`, 3:
  square, ellipse, heart, from `label_shape`); regressions from the TFDS
  `value_*` features: "scale" (scalar in [0.5, 1]), "x_position" and
  "y_position" (scalars in [0, 1]) and "orientation" (`(sin θ, cos θ)`, a
  2-vector, of the angle θ in [0, 2π]: an angle regressed as a number would
  make 0 and 2π maximally different). Input: the binary image, whose pixels
  TFDS stores as 0/1 (not 0/255): it is clipped to {0, 1} (any non-zero
  pixel counts as 1) and kept at scale 1.0, so inputs are 0.0/1.0 at the
  default `image_size` 64 (bilinear resizing to another size gives values
  in [0, 1]).

shapes3d -- Burgess and Kim, "3D Shapes Dataset", 2018 (TFDS `shapes3d`
  2.0.0: 480,000 64x64x3 images, one "train" split). Tasks, all
  `classification_task` from the `label_*` features: "floor_hue" (10),
  "wall_hue" (10), "object_hue" (10), "scale" (8), "shape" (4),
  "orientation" (15). Input: the RGB image at `image_size` (default 64),
  scaled to [0, 1].

dsprites and shapes3d have a single split; by default the first 90% of it
trains and the last 10% is held out (`train_split="train[:90%]"`,
`eval_split="train[90%:]"`, both configurable). The datasets enumerate the
factor grid in order, but TFDS shuffles examples (by key hash) when it
writes them, so each slice is a pseudo-random subset of the grid.

Prepare with `tfds build smallnorb --file_format=array_record` (and likewise
`dsprites`, `shapes3d`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import catalog  # for `Dataset`, used at call time only
from mtl_jax.data import mixture
from mtl_jax.data import preprocess
from mtl_jax.data import sources

# Task name -> TFDS ClassLabel feature.
SMALLNORB_TASKS = {
    "category": "label_category",
    "instance": "instance",
    "elevation": "label_elevation",
    "azimuth": "label_azimuth",
    "lighting": "label_lighting",
}
SHAPES3D_TASKS = {
    "floor_hue": "label_floor_hue",
    "wall_hue": "label_wall_hue",
    "object_hue": "label_object_hue",
    "scale": "label_scale",
    "shape": "label_shape",
    "orientation": "label_orientation",
}
# dsprites: task name -> TFDS feature (a ClassLabel for "shape", values else).
DSPRITES_TASKS = {
    "shape": "label_shape",
    "scale": "value_scale",
    "orientation": "value_orientation",
    "x_position": "value_x_position",
    "y_position": "value_y_position",
}

Labeller = Callable[[sources.Features], dict[str, np.ndarray]]


def _check_image_size(name: str, image_size: Any) -> int:
  if isinstance(image_size, bool) or not isinstance(image_size, int) or (
      image_size < 1):
    raise ValueError(f"{name}: option image_size must be a positive integer, "
                     f"got {image_size!r}")
  return image_size


def _class_labels(task_features: Mapping[str, str]) -> Labeller:
  """Labels int32 [n] of each task from its TFDS ClassLabel feature."""

  def labels(raw):
    return {t: np.asarray(raw[f]).astype(np.int32)
            for t, f in task_features.items()}

  return labels


def _classification_tasks(info: Any, task_features: Mapping[str, str]
                          ) -> list[tasks_lib.Task]:
  return [tasks_lib.classification_task(t, info.features[f].num_classes)
          for t, f in task_features.items()]


def _build(name: str, *, data_dir: str | None, train_split: str,
           eval_split: str, features: Sequence[str],
           make_tasks: Callable[[Any], list[tasks_lib.Task]],
           labels: Labeller,
           images: Callable[[np.ndarray], np.ndarray]) -> catalog.Dataset:
  """A one-component-per-part dataset whose every example labels every task.

  Args:
    name: the TFDS name, also the catalog and component name.
    data_dir: the TFDS data directory.
    train_split, eval_split: the TFDS splits of the two parts.
    features: the TFDS features to read.
    make_tasks: TFDS `DatasetInfo` -> the tasks.
    labels: raw features -> `{task: [n, ...]}`.
    images: raw `image` [n, H, W, C] -> inputs [n, h, w, c] float32.

  Returns:
    The `catalog.Dataset`.
  """
  train_source = sources.TfdsSource(name, train_split, data_dir=data_dir,
                                    features=features)
  eval_source = sources.TfdsSource(name, eval_split, data_dir=data_dir,
                                   features=features)
  tasks = tasks_lib.TaskSet(make_tasks(train_source.info))

  def convert(raw: sources.Features) -> dict[str, Any]:
    ones = np.ones(len(raw["image"]), np.float32)
    y = labels(raw)
    return {"inputs": images(raw["image"]), "labels": y,
            "masks": {t: ones for t in y}}

  return catalog.Dataset(
      name=name, tasks=tasks,
      train=(mixture.Component(name, train_source, convert),),
      eval=(mixture.Component(name, eval_source, convert),),
      info={})


def smallnorb(*, data_dir: str | None = None, eval_split: str = "test",
              train_split: str = "train", image_size: int = 48
              ) -> catalog.Dataset:
  """smallNORB's five factors (see the module docstring).

  Args:
    data_dir: the TFDS data directory (None: TFDS's default).
    eval_split: the held-out split.
    train_split: the training split.
    image_size: side of the square, one-channel input images.

  Returns:
    A `catalog.Dataset` with one component, named "smallnorb", per part.

  Raises:
    ValueError: `image_size` is not a positive integer.
    FileNotFoundError: smallnorb is not prepared under `data_dir`.
  """
  size = _check_image_size("smallnorb", image_size)
  return _build(
      "smallnorb", data_dir=data_dir, train_split=train_split,
      eval_split=eval_split, features=("image",) + tuple(
          SMALLNORB_TASKS.values()),
      make_tasks=lambda info: _classification_tasks(info, SMALLNORB_TASKS),
      labels=_class_labels(SMALLNORB_TASKS),
      images=preprocess.ImageSpec(shape=(size, size, 1)))


def dsprites_labels(raw: sources.Features) -> dict[str, np.ndarray]:
  """dsprites' task labels from its raw TFDS features.

  Returns:
    "shape": int32 [n]; "scale", "x_position", "y_position": float32 [n];
    "orientation": float32 [n, 2], `(sin θ, cos θ)`.
  """
  angle = np.asarray(raw["value_orientation"], np.float64)
  return {
      "shape": np.asarray(raw["label_shape"]).astype(np.int32),
      "scale": np.asarray(raw["value_scale"], np.float32),
      "orientation": np.stack([np.sin(angle), np.cos(angle)],
                              axis=-1).astype(np.float32),
      "x_position": np.asarray(raw["value_x_position"], np.float32),
      "y_position": np.asarray(raw["value_y_position"], np.float32),
  }


def dsprites(*, data_dir: str | None = None, eval_split: str = "train[90%:]",
             train_split: str = "train[:90%]", image_size: int = 64
             ) -> catalog.Dataset:
  """dSprites' shape, scale, orientation and position (see the module doc).

  Args:
    data_dir: the TFDS data directory (None: TFDS's default).
    eval_split: the held-out slice of the single TFDS split.
    train_split: the training slice.
    image_size: side of the square, one-channel input images.

  Returns:
    A `catalog.Dataset` with one component, named "dsprites", per part.

  Raises:
    ValueError: `image_size` is not a positive integer.
    FileNotFoundError: dsprites is not prepared under `data_dir`.
  """
  size = _check_image_size("dsprites", image_size)
  spec = preprocess.ImageSpec(shape=(size, size, 1), scale=1.0)

  def make_tasks(info):
    return [
        tasks_lib.classification_task(
            "shape", info.features[DSPRITES_TASKS["shape"]].num_classes),
        tasks_lib.regression_task("scale"),
        tasks_lib.regression_task("orientation", (2,)),
        tasks_lib.regression_task("x_position"),
        tasks_lib.regression_task("y_position"),
    ]

  return _build(
      "dsprites", data_dir=data_dir, train_split=train_split,
      eval_split=eval_split,
      features=("image",) + tuple(DSPRITES_TASKS.values()),
      make_tasks=make_tasks, labels=dsprites_labels,
      # Pixels are 0/1; clipping also accepts a 0/255 encoding.
      images=lambda image: spec(np.minimum(image, 1)))


def shapes3d(*, data_dir: str | None = None, eval_split: str = "train[90%:]",
             train_split: str = "train[:90%]", image_size: int = 64
             ) -> catalog.Dataset:
  """3D Shapes' six factors as classification tasks (see the module doc).

  Args:
    data_dir: the TFDS data directory (None: TFDS's default).
    eval_split: the held-out slice of the single TFDS split.
    train_split: the training slice.
    image_size: side of the square RGB input images.

  Returns:
    A `catalog.Dataset` with one component, named "shapes3d", per part.

  Raises:
    ValueError: `image_size` is not a positive integer.
    FileNotFoundError: shapes3d is not prepared under `data_dir`.
  """
  size = _check_image_size("shapes3d", image_size)
  return _build(
      "shapes3d", data_dir=data_dir, train_split=train_split,
      eval_split=eval_split,
      features=("image",) + tuple(SHAPES3D_TASKS.values()),
      make_tasks=lambda info: _classification_tasks(info, SHAPES3D_TASKS),
      labels=_class_labels(SHAPES3D_TASKS),
      images=preprocess.ImageSpec(shape=(size, size, 3)))
