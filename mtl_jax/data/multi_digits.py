"""`multi_digits`: a small, deterministic MultiMNIST-style multi-task dataset.

Each example is a 12x16 grey canvas holding two real handwritten digits from
scikit-learn's `load_digits()` (1797 8x8 images, intensities 0..16, shipped with
scikit-learn, so nothing is downloaded): one on the left, one on the right,
overlapping in the middle columns and combined by pixel-wise max. Four tasks:

  left     int class 0..9 of the left digit        (classification)
  right    int class 0..9 of the right digit       (classification)
  present  float32 [10] multi-hot of digits shown  (multi-label)
  sum      float32 left + right                    (regression)

Leakage: the 1797 source digits are split once, stratified per class, into
disjoint train and test POOLS (about 2/3 : 1/3, fixed seed, pixel-identical
images grouped so that they fall on one side). Train composites only use train
pool digits and test composites only test pool digits, whatever the seed.

Colour variant (configs "colour" and "colour_small", images uint8
[12, 16, 3]), for self-supervised colourisation: colour follows content, so it
is learnable from the grey image. The same seed gives the same digits, offsets
and labels as the grey variant; the colour draws come after them from the same
generator. Each digit's strokes take its class's colour C from
`CLASS_COLOURS`: ten hues 36 degrees apart, each the most saturated RGB colour
of BT.601 luminance Y = 150 at its hue (0 red (255, 105, 105), 1 orange
(230, 138, 0), 2 yellow-green (145, 182, 0), 3 green (46, 232, 0), 4 spring
green (0, 237, 95), 5 cyan (0, 214, 214), 6 sky blue (94, 158, 255),
7 lavender (153, 128, 255), 8 violet (223, 93, 255), 9 pink (255, 89, 189)).
Each digit of each example jitters it: stroke = v * (Y + s * (C - Y)), with
saturation s ~ U[0.7, 1] and brightness v ~ U[0.85, 1] (drawn for all left
digits, s then v, then for all right digits). The background is a fixed
vertical gradient, linear in the row from a dusk-sky blue (24, 36, 84) on
row 0 to an earth brown (56, 36, 12) on row 11 (`BACKGROUND_TOP`,
`BACKGROUND_BOTTOM`; luminance 37.9 to 39.2). Each digit is alpha-blended
over the background with alpha = its grey intensity / 255; where the digits
overlap, the pixel comes from the digit with the larger grey intensity (the
left one on ties), as the grey canvas takes the max; the result is rounded to
uint8. The luminance of a pixel is thus bg + alpha * (v * 150 - bg), bg about
38: an increasing affine image of the grey canvas (per-digit slope), so the
digits stay recognisable in grey while the hue is told only by their shape.

Two ways in:
  * `generate_split(split, n, seed, colour=False)`: pure numpy, no files; used
    by tests and by the TFDS builder.
  * The TFDS builder `MultiDigits` ("multi_digits", configs "default" and
    "small" (grey), "colour" and "colour_small", array_record files, no
    TensorFlow needed): `prepare(data_dir, config)` once, then
    `load_split(split, data_dir=..., config=...)` reads a whole split.

`to_batch_arrays` converts a split into the batch format of docs/design.md (inputs,
labels zeroed where unlabelled, masks). Partial labels, the unlabelled pool and
the batch stream come from the generic machinery in `mtl_jax.data.mixture`;
`mtl_jax.data.catalog.multi_digits` exposes the splits as mixture components.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from sklearn import datasets as sk_datasets

from mtl_jax import tasks as tasks_lib

TASK_NAMES = ("left", "right", "present", "sum")
SPLITS = ("train", "test")
NUM_CLASSES = 10
IMAGE_SHAPE = (12, 16, 1)  # rows, cols, channels (the grey configs)
COLOUR_IMAGE_SHAPE = (12, 16, 3)  # the colour configs, RGB
# Number of composites per split for each TFDS builder config.
CONFIG_SIZES = {
    "default": {"train": 20000, "test": 4000},
    "small": {"train": 2000, "test": 1000},
    "colour": {"train": 20000, "test": 4000},
    "colour_small": {"train": 2000, "test": 1000},
}
COLOUR_CONFIGS = ("colour", "colour_small")
# Stroke colour of each digit class (RGB, row k = class k): hue 36 * k
# degrees, the most saturated colour of BT.601 luminance 150 at that hue.
# Equal luminance keeps the grey view a faithful copy of the digit shapes, so
# a colouriser must recognise the digit (not read its brightness) to colour it.
CLASS_COLOURS = np.array([
    [255, 105, 105], [230, 138, 0], [145, 182, 0], [46, 232, 0],
    [0, 237, 95], [0, 214, 214], [94, 158, 255], [153, 128, 255],
    [223, 93, 255], [255, 89, 189]], dtype=np.float64)
CLASS_COLOURS.flags.writeable = False
# Background colour on the first and last row, linear in between; both of
# luminance about 38, far below the strokes' 127..150, so digits stand out.
BACKGROUND_TOP = (24, 36, 84)
BACKGROUND_BOTTOM = (56, 36, 12)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601
# Per-example jitter ranges of each digit's stroke colour.
_SATURATION_RANGE = (0.7, 1.0)
_BRIGHTNESS_RANGE = (0.85, 1.0)

_DIGIT_SIZE = 8
_SOURCE_MAX = 16  # load_digits intensities are integers 0..16.
# Offset ranges (inclusive) of each digit's top-left corner on the canvas. The
# two column ranges overlap by 4..2 columns, so the digits touch or overlap.
_LEFT_ROWS, _LEFT_COLS = (0, 4), (0, 2)
_RIGHT_ROWS, _RIGHT_COLS = (0, 4), (6, 8)
_TRAIN_POOL_FRACTION = 2 / 3
_POOL_SEED = 20240601  # fixes the train/test partition of the source digits.
# Second entry of the per-split numpy seed, so train and test draw from
# independent streams for the same user seed.
_SPLIT_STREAM = {"train": 0, "test": 1}
_BUILDER_SEED = 0  # the seed the TFDS builder passes to generate_split.
_READ_CHUNK = 4096  # records per __getitems__ call in load_split.


# --------------------------------------------------------------------------
# Source digits and pools.


@functools.lru_cache(maxsize=1)
def source_digits() -> tuple[np.ndarray, np.ndarray]:
  """The scikit-learn digits, scaled to 0..255.

  Returns:
    `(images, labels)`: `images` uint8 [1797, 8, 8] with intensity
    `round(v * 255 / 16)`, `labels` int64 [1797]. Both are read-only (cached).
  """
  digits = sk_datasets.load_digits()
  raw = digits.images  # [M, 8, 8] float64, integer values 0..16
  images = np.rint(raw * (255.0 / _SOURCE_MAX)).astype(np.uint8)
  labels = digits.target.astype(np.int64)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


@functools.lru_cache(maxsize=1)
def source_pools() -> tuple[np.ndarray, np.ndarray]:
  """The fixed, disjoint train and test pools of source digit indices.

  Pixel-identical source images are grouped first and each group is assigned
  as a whole (scikit-learn 1.x's digits contain no such duplicates, but the
  guard costs nothing). Groups are then split per class: a seeded permutation
  of each class's groups, the first `round(2/3 * groups)` go to train. The
  partition does not depend on any user seed.

  Returns:
    `(train_ids, test_ids)`: sorted int64 arrays of indices into
    `source_digits()`, disjoint, together covering every source digit.
  """
  images, labels = source_digits()
  flat = images.reshape(len(images), -1)  # [M, 64]
  _, group = np.unique(flat, axis=0, return_inverse=True)
  group = group.reshape(-1)  # [M]
  num_groups = group.max() + 1
  # A group's class is that of its first member; a group with conflicting
  # labels (none exist) still stays on one side.
  first_member = np.full(num_groups, len(images))
  np.minimum.at(first_member, group, np.arange(len(images)))
  group_label = labels[first_member]  # [G]

  rng = np.random.default_rng(_POOL_SEED)
  train_group = np.zeros(num_groups, dtype=bool)
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(group_label == c)
    num_train = round(_TRAIN_POOL_FRACTION * len(members))
    chosen = rng.permutation(members)[:num_train]
    train_group[chosen] = True
  is_train = train_group[group]  # [M]
  train_ids = np.flatnonzero(is_train).astype(np.int64)
  test_ids = np.flatnonzero(~is_train).astype(np.int64)
  train_ids.flags.writeable = False
  test_ids.flags.writeable = False
  return train_ids, test_ids


# --------------------------------------------------------------------------
# Composites.


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; valid splits are {SPLITS}.")


def _paste(images: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """Places each 8x8 image on its own empty canvas at its (row, col) offset.

  Args:
    images: uint8 [N, 8, 8].
    offsets: int [N, 2], top-left (row, col) of each image on the canvas.

  Returns:
    uint8 [N, 12, 16].
  """
  n = len(images)
  canvas = np.zeros((n,) + IMAGE_SHAPE[:2], dtype=np.uint8)
  span = np.arange(_DIGIT_SIZE)
  rows = offsets[:, 0, None, None] + span[None, :, None]  # [N, 8, 1]
  cols = offsets[:, 1, None, None] + span[None, None, :]  # [N, 1, 8]
  canvas[np.arange(n)[:, None, None], rows, cols] = images
  return canvas


def _draw_offsets(rng: np.random.Generator, rows: tuple[int, int],
                  cols: tuple[int, int], n: int) -> np.ndarray:
  r = rng.integers(rows[0], rows[1] + 1, size=n)
  c = rng.integers(cols[0], cols[1] + 1, size=n)
  return np.stack([r, c], axis=1).astype(np.int64)  # [N, 2]


def _stroke_colours(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
  """Jittered stroke colours of digits of classes `labels`.

  Args:
    rng: draws the saturation factors of all N digits, then their brightness
      factors.
    labels: int [N], digit classes.

  Returns:
    float64 [N, 3], `v * (Y + s * (C - Y))` per digit (module docstring).
  """
  n = len(labels)
  saturation = rng.uniform(*_SATURATION_RANGE, size=(n, 1))
  brightness = rng.uniform(*_BRIGHTNESS_RANGE, size=(n, 1))
  table = CLASS_COLOURS[labels]  # [N, 3]
  luma = table @ np.asarray(LUMA_WEIGHTS)  # [N]
  # Scaling towards the grey of equal luminance keeps the luminance, so only
  # `brightness` moves it; both factors <= 1 keep the colour in 0..255.
  grey = luma[:, None]
  return brightness * (grey + saturation * (table - grey))


def background() -> np.ndarray:
  """The colour configs' background, float64 [12, 16, 3], before rounding."""
  rows = IMAGE_SHAPE[0]
  t = np.linspace(0.0, 1.0, rows)[:, None]  # [12, 1]
  top, bottom = np.asarray(BACKGROUND_TOP), np.asarray(BACKGROUND_BOTTOM)
  column = (1 - t) * top + t * bottom  # [12, 3]
  return np.broadcast_to(column[:, None, :], COLOUR_IMAGE_SHAPE)


def _colour_composite(rng: np.random.Generator, left_canvas: np.ndarray,
                      right_canvas: np.ndarray, left: np.ndarray,
                      right: np.ndarray) -> np.ndarray:
  """Colours and composes two digits per example (see the module docstring).

  Args:
    rng: the split's generator, after the grey draws; draws the left digits'
      jitter, then the right digits'.
    left_canvas, right_canvas: uint8 [N, 12, 16], each digit alone on its
      canvas (`_paste`).
    left, right: int [N], the digit classes.

  Returns:
    uint8 [N, 12, 16, 3], RGB.
  """
  left_colour = _stroke_colours(rng, left)[:, None, None, :]  # [N,1,1,3]
  right_colour = _stroke_colours(rng, right)[:, None, None, :]
  bg = background()[None]  # [1, 12, 16, 3]
  left_alpha = left_canvas[..., None] / 255.0  # [N, 12, 16, 1]
  right_alpha = right_canvas[..., None] / 255.0
  # The brighter digit wins a pixel, as the grey canvas takes the max; each
  # digit is blended over the background by its own intensity.
  alpha = np.maximum(left_alpha, right_alpha)
  stroke = np.where(right_alpha > left_alpha, right_colour, left_colour)
  image = bg + alpha * (stroke - bg)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def generate_split(split: str, num_examples: int, seed: int = 0, *,
                   colour: bool = False) -> dict[str, np.ndarray]:
  """Generates `num_examples` composites of one split, deterministically.

  All randomness comes from `np.random.default_rng([seed, stream(split)])`,
  in a fixed order: left digit ids, right digit ids, left offsets, right
  offsets, and with `colour` then the colour jitter (left digits' saturation
  and brightness, then the right digits'), so everything but `image` is the
  same with and without `colour`. Train uses only train-pool digits and test
  only test-pool digits (`source_pools()`), for every seed.

  Args:
    split: "train" or "test".
    num_examples: number of composites, >= 0.
    seed: non-negative integer seed.
    colour: make RGB images (the module docstring says how) instead of grey.

  Returns:
    A dict of arrays with leading axis N = num_examples:
      image:        uint8   [N, 12, 16, 1], intensities 0..255 (grey), or
                    uint8   [N, 12, 16, 3], RGB 0..255 (`colour`)
      left, right:  int64   [N], digit classes 0..9
      present:      float32 [N, 10], multi-hot of {left, right}
      sum:          float32 [N], left + right
      left_id, right_id:         int64 [N], indices into `source_digits()`
      left_offset, right_offset: int64 [N, 2], (row, col) of each digit's
        top-left corner; left in [0,4]x[0,2], right in [0,4]x[6,8].

  Raises:
    ValueError: unknown split, negative `num_examples` or negative `seed`.
  """
  _check_split(split)
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}.")
  if seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed}.")
  images, labels = source_digits()
  train_ids, test_ids = source_pools()
  pool = train_ids if split == "train" else test_ids
  rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])

  left_id = pool[rng.integers(len(pool), size=num_examples)]  # [N]
  right_id = pool[rng.integers(len(pool), size=num_examples)]  # [N]
  left_offset = _draw_offsets(rng, _LEFT_ROWS, _LEFT_COLS, num_examples)
  right_offset = _draw_offsets(rng, _RIGHT_ROWS, _RIGHT_COLS, num_examples)

  left, right = labels[left_id], labels[right_id]
  left_canvas = _paste(images[left_id], left_offset)
  right_canvas = _paste(images[right_id], right_offset)
  if colour:
    image = _colour_composite(rng, left_canvas, right_canvas, left, right)
  else:
    # Pasting already-scaled digits then taking the max equals scaling the
    # max, because rounding after a monotone scale preserves order.
    image = np.maximum(left_canvas, right_canvas)[..., None]
  present = np.zeros((num_examples, NUM_CLASSES), dtype=np.float32)
  rows = np.arange(num_examples)
  present[rows, left] = 1.0
  present[rows, right] = 1.0
  return {
      "image": image,
      "left": left,
      "right": right,
      "present": present,
      "sum": (left + right).astype(np.float32),
      "left_id": left_id,
      "right_id": right_id,
      "left_offset": left_offset,
      "right_offset": right_offset,
  }


# --------------------------------------------------------------------------
# TFDS builder.


def _check_config(config: str) -> None:
  if config not in CONFIG_SIZES:
    raise ValueError(f"Unknown multi_digits config {config!r}; valid configs "
                     f"are {tuple(CONFIG_SIZES)}.")


def image_shape(config: str = "default") -> tuple[int, int, int]:
  """The shape of one image of builder config `config`.

  Returns:
    `IMAGE_SHAPE` (12, 16, 1) for the grey configs, `COLOUR_IMAGE_SHAPE`
    (12, 16, 3) for the colour ones.

  Raises:
    ValueError: unknown config.
  """
  _check_config(config)
  return COLOUR_IMAGE_SHAPE if config in COLOUR_CONFIGS else IMAGE_SHAPE


@dataclasses.dataclass(eq=False, kw_only=True)
class MultiDigitsConfig(tfds.core.BuilderConfig):
  """Builder config: how many composites each split holds, grey or colour."""
  num_train: int = 0
  num_test: int = 0
  colour: bool = False


class MultiDigits(tfds.core.GeneratorBasedBuilder):
  """TFDS builder for `multi_digits` (see the module docstring).

  Records are written as array_record (construct with
  `file_format="array_record"`; `prepare` does) and read with
  `tfds.data_source`, so neither TensorFlow nor tf.data is needed. Each
  record also stores its `index` in `generate_split` order, because TFDS
  shuffles records on write; `load_split` uses it to restore the order.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: 12x16 two-digit composites of sklearn digits "
               "with left/right/present/sum labels and disjoint source pools.",
  }
  BUILDER_CONFIGS = [
      MultiDigitsConfig(
          name=name,
          description=(f"{sizes['train']} train and {sizes['test']} test "
                       f"{'colour ' if name in COLOUR_CONFIGS else ''}"
                       "composites."),
          num_train=sizes["train"],
          num_test=sizes["test"],
          colour=name in COLOUR_CONFIGS,
      ) for name, sizes in CONFIG_SIZES.items()
  ]

  # TFDS's default `code_path` touches `importlib_resources`, which
  # tensorflow-datasets only declares for Python < 3.9 and is not installed
  # here; this file is the builder's code, so say so directly.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    int64 = np.int64
    colour = self.builder_config.colour
    return self.dataset_info_from_configs(
        description=(
            "Two handwritten sklearn digits side by side on a 12x16 canvas, "
            "with left, right, present (multi-hot) and sum labels; the "
            "colour configs colour each digit by its class over a vertical "
            "background gradient."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(
                shape=COLOUR_IMAGE_SHAPE if colour else IMAGE_SHAPE,
                dtype=np.uint8,
                doc=("Two-digit composite, RGB 0..255." if colour else
                     "Two-digit composite, intensities 0..255.")),
            "left": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "right": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "present": tfds.features.Tensor(
                shape=(NUM_CLASSES,), dtype=np.float32,
                doc="Multi-hot of the digit classes shown."),
            "sum": tfds.features.Scalar(dtype=np.float32, doc="left + right."),
            "left_id": tfds.features.Scalar(
                dtype=int64, doc="Index of the left digit in load_digits()."),
            "right_id": tfds.features.Scalar(
                dtype=int64, doc="Index of the right digit in load_digits()."),
            "left_offset": tfds.features.Tensor(
                shape=(2,), dtype=int64, doc="(row, col) of the left digit."),
            "right_offset": tfds.features.Tensor(
                shape=(2,), dtype=int64, doc="(row, col) of the right digit."),
            "index": tfds.features.Scalar(
                dtype=int64, doc="Position in generate_split order."),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the digits ship with scikit-learn.
    return {
        split: self._generate_examples(split, num)
        for split, num in (("train", self.builder_config.num_train),
                           ("test", self.builder_config.num_test))
    }

  def _generate_examples(self, split: str, num_examples: int):
    arrays = generate_split(split, num_examples, seed=_BUILDER_SEED,
                            colour=self.builder_config.colour)
    for i in range(num_examples):
      example = {name: values[i] for name, values in arrays.items()}
      example["index"] = i
      yield i, example


def _builder(data_dir: str, config: str) -> MultiDigits:
  _check_config(config)
  return MultiDigits(config=config, data_dir=data_dir,
                     file_format="array_record")


def prepare(data_dir: str, config: str = "default") -> None:
  """Writes the dataset's array_record files under `data_dir` (idempotent).

  Args:
    data_dir: TFDS data directory; files go to
      `{data_dir}/multi_digits/{config}/1.0.0/`.
    config: "default" (20000 train / 4000 test) or "small" (2000 / 1000),
      grey; "colour" and "colour_small", the same sizes in colour.

  Raises:
    ValueError: unknown config.
  """
  builder = _builder(data_dir, config)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))


def load_split(split: str, *, data_dir: str,
               config: str = "default") -> dict[str, np.ndarray]:
  """Reads a whole prepared split into numpy, in `generate_split` order.

  The result equals `generate_split(split, n, seed=0, colour=c)` array for
  array, with n the config's split size and c whether it is a colour config.

  Args:
    split: "train" or "test".
    data_dir: the TFDS data directory given to `prepare`.
    config: builder config name.

  Returns:
    The dict of stacked arrays described in `generate_split`.

  Raises:
    ValueError: unknown split or config.
    FileNotFoundError: the dataset was not prepared under `data_dir`.
    RuntimeError: the stored `index` feature is not a permutation of 0..n-1
      (corrupted or mixed files).
  """
  _check_split(split)
  builder = _builder(data_dir, config)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"multi_digits/{config} {MultiDigits.VERSION} is not prepared in "
        f"data_dir={str(data_dir)!r} (looked for {builder.data_dir}). Call "
        f"mtl_jax.data.multi_digits.prepare({str(data_dir)!r}, {config!r}) "
        "first, or use load_or_prepare(...).")
  source = tfds.data_source(f"multi_digits/{config}", split=split,
                            data_dir=data_dir)
  n = len(source)
  records = []
  for start in range(0, n, _READ_CHUNK):
    stop = min(start + _READ_CHUNK, n)
    records.extend(source.__getitems__(list(range(start, stop))))
  # Scalars decode to Python numbers, so cast back to the declared dtype.
  features = builder.info.features
  arrays = {
      name: np.asarray([r[name] for r in records],
                       dtype=feature.np_dtype).reshape((n,) + feature.shape)
      for name, feature in features.items()
  }
  index = arrays.pop("index")
  order = np.argsort(index, kind="stable")
  if not np.array_equal(index[order], np.arange(n)):
    raise RuntimeError(
        f"multi_digits/{config} split {split!r} in {builder.data_dir} has "
        "duplicate or missing `index` values; delete it and prepare again.")
  return {name: values[order] for name, values in arrays.items()}


def load_or_prepare(split: str, *, data_dir: str,
                    config: str = "default") -> dict[str, np.ndarray]:
  """`prepare` (a no-op when already prepared), then `load_split`.

  Args:
    split: "train" or "test".
    data_dir: TFDS data directory.
    config: builder config name.

  Returns:
    See `load_split`.

  Raises:
    ValueError: unknown split or config.
  """
  _check_split(split)
  prepare(data_dir, config)
  return load_split(split, data_dir=data_dir, config=config)


# --------------------------------------------------------------------------
# Partial labels and the batch format.


def to_batch_arrays(examples: Mapping[str, np.ndarray],
                    masks: Mapping[str, np.ndarray] | None,
                    tasks: Sequence[str]) -> dict:
  """Converts a whole split into the batch format of docs/design.md.

  Labels of examples whose mask is 0 are set to zero, so a label can never
  reach a loss through a path that forgets the mask.

  Args:
    examples: arrays from `generate_split` or `load_split` (N examples).
    masks: task name -> [N] mask (e.g. `mixture.label_fraction_masks`) with an entry for every
      task in `tasks`; None means every example is labelled (e.g. test).
    tasks: the tasks to include, a subset of `TASK_NAMES`.

  Returns:
    {"inputs": float32 [N, 12, 16, C] in [0, 1] (C = 1 grey, 3 colour),
     "labels": {"left": int32 [N], "right": int32 [N],
                "present": float32 [N, 10], "sum": float32 [N]} (requested
               tasks only),
     "masks": {task: float32 [N]}}

  Raises:
    ValueError: an unknown or repeated task, a mask missing for a requested
      task, a mask for an unknown task, or a mask of the wrong length.
  """
  unknown = [t for t in tasks if t not in TASK_NAMES]
  if unknown:
    raise ValueError(f"Unknown multi_digits task(s) {unknown}; valid tasks are "
                     f"{TASK_NAMES}.")
  if len(set(tasks)) != len(tasks):
    raise ValueError(f"Repeated task in {list(tasks)}.")
  n = len(examples["image"])
  if masks is not None:
    unknown = [t for t in masks if t not in TASK_NAMES]
    if unknown:
      raise ValueError(f"Masks given for unknown task(s) {unknown}; valid "
                       f"tasks are {TASK_NAMES}.")
    missing = [t for t in tasks if t not in masks]
    if missing:
      raise ValueError(f"No mask for task(s) {missing}; give a fraction for "
                       "every task (1.0 = fully labelled), or "
                       "pass masks=None.")
  dtypes = {"left": np.int32, "right": np.int32, "present": np.float32,
            "sum": np.float32}
  labels, out_masks = {}, {}
  for task in tasks:
    if masks is None:
      mask = np.ones(n, dtype=np.float32)
    else:
      mask = np.asarray(masks[task], dtype=np.float32)
      if mask.shape != (n,):
        raise ValueError(f"Mask for task {task!r} has shape {mask.shape}, "
                         f"expected ({n},).")
    label = np.asarray(examples[task]).astype(dtypes[task])
    keep = (mask > 0).reshape((n,) + (1,) * (label.ndim - 1))
    labels[task] = np.where(keep, label, np.zeros((), dtypes[task]))
    out_masks[task] = mask
  return {
      "inputs": examples["image"].astype(np.float32) / 255.0,
      "labels": labels,
      "masks": out_masks,
  }


# --------------------------------------------------------------------------
# The dataset's tasks.


def task_set(weights: Mapping[str, float] | None = None,
             sum_loss: str = "huber") -> tasks_lib.TaskSet:
  """The four multi_digits tasks, in `TASK_NAMES` order.

  - left, right: 10-way classification of each digit (softmax CE, accuracy);
  - present: which digits appear, 10 sigmoid outputs (binary CE, micro F1);
  - sum: left + right as a scalar regression (`sum_loss`, MAE and RMSE).

  Args:
    weights: static loss weight per task (default 1.0 each).
    sum_loss: loss of the regression task: "mse", "l1" or "huber".

  Raises:
    ValueError: `weights` names an unknown task.
  """
  weights = dict(weights or {})
  unknown = sorted(set(weights) - set(TASK_NAMES))
  if unknown:
    raise ValueError(f"weights for unknown multi_digits task(s) {unknown}; "
                     f"valid tasks: {', '.join(TASK_NAMES)}")
  w = {name: float(weights.get(name, 1.0)) for name in TASK_NAMES}
  return tasks_lib.TaskSet([
      tasks_lib.classification_task("left", NUM_CLASSES, weight=w["left"]),
      tasks_lib.classification_task("right", NUM_CLASSES, weight=w["right"]),
      tasks_lib.multilabel_task("present", NUM_CLASSES, weight=w["present"]),
      tasks_lib.regression_task("sum", loss=sum_loss, weight=w["sum"]),
  ])
