"""CelebA: 40 binary face attributes and 5 facial landmarks as 41 tasks.

Dataset: Liu, Luo, Wang and Tang, "Deep Learning Face Attributes in the Wild",
ICCV 2015 (TFDS `celeb_a`, 2.1.0: 162,770 train / 19,867 validation / 19,962
test aligned face images of 218x178x3). A classic multi-task benchmark (e.g.
Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018, train on the 40 attributes).

Tasks:
  * one per attribute, named as in TFDS (`"5_o_Clock_Shadow"`, ...,
    `"Smiling"`, ..., `"Young"`): `classification_task(attr, 2)`, label 1
    where the attribute is present.
  * `"landmarks"`: `regression_task("landmarks", (10,))`, the (x, y) positions
    of the left eye, right eye, nose, left and right mouth corners, in that
    order, as fractions of the preprocessed image's width and height.

Preprocessing (`preprocess.ImageSpec`): the central 178x178 square of the
218x178 image (rows 20..197, every column), resized (bilinear, antialiased)
to `image_size` x `image_size` x 3, scaled to [0, 1]. Landmarks are moved into
that frame exactly: TFDS gives pixel coordinates in the 218x178 image; the
crop shifts y by its top offset 20 (x by its left offset 0), and a resize
of the 178x178 square to any size maps a position u to `u * size / 178`, so
as fractions of the output side the targets are

    x' = (x - 0) / 178,    y' = (y - 20) / 178,

independent of `image_size` (multiply by `image_size` for output pixels).
A landmark outside the crop falls outside [0, 1]; it is kept, not clipped.

Prepare with `tfds build celeb_a --file_format=array_record` (the images are
downloaded from Google Drive, which may need a manual download; see the TFDS
catalog page).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import catalog  # for `Dataset`, used at call time only
from mtl_jax.data import mixture
from mtl_jax.data import preprocess
from mtl_jax.data import sources

TFDS_NAME = "celeb_a"
SPLITS = ("train", "validation", "test")

IMAGE_HEIGHT, IMAGE_WIDTH = 218, 178
CROP_SIZE = 178
# The offsets `preprocess.central_crop` uses: ((H - h) // 2, (W - w) // 2).
CROP_TOP = (IMAGE_HEIGHT - CROP_SIZE) // 2  # 20
CROP_LEFT = (IMAGE_WIDTH - CROP_SIZE) // 2  # 0

# Order of the 10 landmark targets: (x, y) of each point in turn.
LANDMARK_POINTS = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
LANDMARKS_TASK = "landmarks"


def landmark_targets(landmarks: dict[str, np.ndarray]) -> np.ndarray:
  """TFDS landmark pixel coordinates -> fractions of the preprocessed frame.

  Args:
    landmarks: TFDS's `landmarks` feature, `{"lefteye_x": int [n], ...}`, in
      pixels of the 218x178 image.

  Returns:
    float32 [n, 10]: `(x - CROP_LEFT) / 178, (y - CROP_TOP) / 178` for each
    point of `LANDMARK_POINTS` in turn.
  """
  columns = []
  for point in LANDMARK_POINTS:
    x = np.asarray(landmarks[f"{point}_x"], np.float64)
    y = np.asarray(landmarks[f"{point}_y"], np.float64)
    columns += [(x - CROP_LEFT) / CROP_SIZE, (y - CROP_TOP) / CROP_SIZE]
  return np.stack(columns, axis=-1).astype(np.float32)  # [n, 10]


def dataset(*, data_dir: str | None = None, eval_split: str = "test",
            train_split: str = "train", image_size: int = 64
            ) -> catalog.Dataset:
  """CelebA's 40 attributes and landmarks (see the module docstring).

  Args:
    data_dir: the TFDS data directory (None: TFDS's default).
    eval_split: the held-out split, "test" or "validation" (TFDS slices such
      as "validation[:50%]" work too).
    train_split: the training split.
    image_size: side of the square input images.

  Returns:
    A `catalog.Dataset` with one component, named "celeb_a", per part.

  Raises:
    ValueError: `image_size` is not a positive integer.
    FileNotFoundError: celeb_a is not prepared under `data_dir`.
  """
  if isinstance(image_size, bool) or not isinstance(image_size, int) or (
      image_size < 1):
    raise ValueError(f"celeb_a: option image_size must be a positive integer, "
                     f"got {image_size!r}")
  features = ("image", "attributes", "landmarks")
  train_source = sources.TfdsSource(TFDS_NAME, train_split, data_dir=data_dir,
                                    features=features)
  eval_source = sources.TfdsSource(TFDS_NAME, eval_split, data_dir=data_dir,
                                   features=features)
  attributes = tuple(train_source.info.features["attributes"].keys())
  tasks = tasks_lib.TaskSet(
      [tasks_lib.classification_task(a, 2) for a in attributes] +
      [tasks_lib.regression_task(LANDMARKS_TASK, (2 * len(LANDMARK_POINTS),))])
  spec = preprocess.ImageSpec(shape=(image_size, image_size, 3),
                              crop=(CROP_SIZE, CROP_SIZE))

  def convert(raw: sources.Features) -> dict[str, Any]:
    n = len(raw["image"])
    labels = {a: np.asarray(raw["attributes"][a]).astype(np.int32)
              for a in attributes}
    labels[LANDMARKS_TASK] = landmark_targets(raw["landmarks"])
    ones = np.ones(n, np.float32)
    return {"inputs": spec(raw["image"]),  # [n, s, s, 3]
            "labels": labels,
            "masks": {t: ones for t in labels}}

  return catalog.Dataset(
      name="celeb_a", tasks=tasks,
      train=(mixture.Component("celeb_a", train_source, convert),),
      eval=(mixture.Component("celeb_a", eval_source, convert),),
      info={})
