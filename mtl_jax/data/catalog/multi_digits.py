"""The embedded `multi_digits` dataset as a mixture `Dataset`.

The TFDS builder and the data live in `mtl_jax.data.multi_digits`; this module
reads a prepared config into memory and exposes its train and test splits as
mixture components whose every example is labelled for all four tasks (left,
right, present, sum). Partial labels, the unlabelled pool and sampling rates
are then the experiment's choice, through the same machinery as every other
dataset (`mixture.split_by_label_fraction`, `mixture.Mixture`).

The colour builder configs ("colour", "colour_small") give RGB inputs
[12, 16, 3] with the same labels; `Dataset.info["image_shape"]` is the shape of
one input image, (12, 16, 1) or (12, 16, 3). The trunks read the channel count
from the inputs themselves, so nothing else changes.
"""

from __future__ import annotations

from mtl_jax.data import catalog
from mtl_jax.data import mixture
from mtl_jax.data import multi_digits as md
from mtl_jax.data import sources


def _convert(raw):
  return md.to_batch_arrays(raw, None, md.TASK_NAMES)


def dataset(*, data_dir: str | None = None, builder_config: str = "default",
            sum_loss: str = "huber", prepare: bool = True) -> catalog.Dataset:
  """multi_digits train/test as components, preparing the files if needed.

  Args:
    data_dir: TFDS data directory (None: TFDS's default).
    builder_config: "default" (20000 train / 4000 test) or "small" (2000 /
      1000), grey; "colour" or "colour_small", the same sizes in RGB.
    sum_loss: loss of the `sum` regression task ("mse", "l1", "huber").
    prepare: write the array_record files if they are missing (they are built
      from scikit-learn's digits, nothing is downloaded).

  Raises:
    ValueError: unknown builder config or loss.
    FileNotFoundError: not prepared and `prepare=False`.
  """
  image_shape = md.image_shape(builder_config)  # fails early on a bad config
  load = md.load_or_prepare if prepare else md.load_split
  components = {}
  for split in md.SPLITS:
    name = f"multi_digits/{builder_config}/{split}"
    source = sources.ArraySource(name, load(split, data_dir=data_dir,
                                            config=builder_config))
    components[split] = mixture.Component(name, source, _convert)
  return catalog.Dataset(
      name="multi_digits", tasks=md.task_set(sum_loss=sum_loss),
      train=(components["train"],), eval=(components["test"],),
      info={"image_shape": image_shape})
