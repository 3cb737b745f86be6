"""CoNLL-2003: part-of-speech, chunk and named-entity tags as per-token tasks.

Dataset: Tjong Kim Sang and De Meulder, "Introduction to the CoNLL-2003
Shared Task: Language-Independent Named Entity Recognition", CoNLL 2003
(TFDS `conll2003` 1.0.0, English: 14,041 train / 3,250 dev / 3,453 test
sentences; "-DOCSTART-" lines are dropped by the builder). Predicting the
three tag layers jointly is the classic sequence-labelling multi-task setup
(Collobert et al., "Natural Language Processing (Almost) from Scratch",
JMLR 2011; Søgaard and Goldberg, ACL 2016).

Tasks, all per-token `classification_task(name, C, positions=(max_length,))`
(labels and masks `[n, max_length]`, logits `[n, max_length, C]`):
  * "pos": Penn Treebank part-of-speech tags (47 classes, TFDS `pos`),
  * "chunk": IOB chunk tags (23 classes, TFDS `chunks`),
  * "ner": IOB1 named-entity tags (9 classes, TFDS `ner`).

Preprocessing: a vocabulary (`text.build_vocab`) of the training split's
tokens, most frequent first, at most `max_vocab` ids including padding (0)
and unknown (1); by default tokens keep their case, the strongest cue for
named entities of a word-level model without character features. Each
sentence becomes int32 ids truncated or zero-padded to `max_length` tokens
(tokens past it are neither input nor labelled). A position is labelled for a
task where both the token and that task's tag exist, so each task's mask is
`[n, max_length]`, 1.0 on real tokens and 0.0 on padding (with real data the
tag sequences are as long as the sentence; `tfds.testing.mock_data` gives
them different random lengths). `Dataset.info` holds `"vocab_size"`
(the tagger's `vocab_size`), `"vocab"` (the `text.Vocab`, to save or decode
with) and `"max_length"`.

Prepare with
  tfds build conll2003 --file_format=array_record \
    --imports=tensorflow_datasets.text.conll2003
(the builder is registered by importing its module, which `dataset()` does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtl_jax import tasks as tasks_lib
from mtl_jax.data import catalog  # for `Dataset`, used at call time only
from mtl_jax.data import mixture
from mtl_jax.data import sources
from mtl_jax.data import text

TFDS_NAME = "conll2003"
SPLITS = ("train", "dev", "test")
# Task name -> TFDS Sequence(ClassLabel) feature.
TAG_FEATURES = {"pos": "pos", "chunk": "chunks", "ner": "ner"}
_BUILDER_MODULE = "tensorflow_datasets.text.conll2003"
_READ_CHUNK = 4096  # sentences per read while building the vocabulary


def _register_builder() -> None:
  # The conll2003 builder is not in TFDS's auto-registered set; importing its
  # module registers it (kept out of module import: no side effects there).
  import tensorflow_datasets.text.conll2003  # pylint: disable=g-import-not-at-top,unused-import


def _check_positive(option: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"conll2003: option {option} must be a positive integer, "
                     f"got {value!r}")
  return value


def encode_batch(raw: sources.Features, vocab: text.Vocab, max_length: int
                 ) -> dict[str, Any]:
  """Converts raw conll2003 sentences to padded token ids and per-token tags.

  Args:
    raw: `{"tokens": n sentences, "pos"/"chunks"/"ner": n tag sequences}`,
      each a 1-D object array of per-sentence arrays or a stacked 2-D array.
    vocab: the token vocabulary.
    max_length: L, the padded length.

  Returns:
    `{"inputs": int32 [n, L], "labels": {task: int32 [n, L]}, "masks": {task:
    float32 [n, L]}}`; a task's mask is 1 where both the token and that
    task's tag exist, and its label is 0 wherever the mask is 0.
  """
  ids = [vocab.encode(tokens) for tokens in raw["tokens"]]
  inputs, token_mask = text.pad_sequences(ids, max_length, np.int32)  # [n, L]
  labels, masks = {}, {}
  for task, feature in TAG_FEATURES.items():
    tags, tag_mask = text.pad_sequences(
        [np.asarray(t, np.int32) for t in raw[feature]], max_length, np.int32)
    mask = token_mask * tag_mask  # [n, L]
    labels[task] = np.where(mask > 0, tags, 0).astype(np.int32)
    masks[task] = mask
  return {"inputs": inputs, "labels": labels, "masks": masks}


def dataset(*, data_dir: str | None = None, eval_split: str = "test",
            train_split: str = "train", max_length: int = 64,
            max_vocab: int = 20000, lowercase: bool = False
            ) -> catalog.Dataset:
  """CoNLL-2003's three tag layers as per-token tasks (see the module doc).

  Args:
    data_dir: the TFDS data directory (None: TFDS's default).
    eval_split: the held-out split, "test" or "dev".
    train_split: the training split; the vocabulary is built from its tokens.
    max_length: tokens per sentence after truncation and padding (L).
    max_vocab: the largest vocabulary size, padding and unknown included.
    lowercase: lowercase tokens before building and looking up the vocabulary.

  Returns:
    A `catalog.Dataset` with one component, named "conll2003", per part, and
    `info = {"vocab_size": int, "vocab": text.Vocab, "max_length": int}`.

  Raises:
    ValueError: `max_length` or `max_vocab` is not a positive integer, or
      `max_vocab < 2`.
    FileNotFoundError: conll2003 is not prepared under `data_dir`.
  """
  max_length = _check_positive("max_length", max_length)
  if _check_positive("max_vocab", max_vocab) < len(text.SPECIAL_TOKENS):
    raise ValueError(f"conll2003: option max_vocab must be >= "
                     f"{len(text.SPECIAL_TOKENS)} (padding and unknown "
                     f"included), got {max_vocab}")
  _register_builder()
  features = ("tokens",) + tuple(TAG_FEATURES.values())
  try:
    train_source = sources.TfdsSource(TFDS_NAME, train_split,
                                      data_dir=data_dir, features=features)
    eval_source = sources.TfdsSource(TFDS_NAME, eval_split, data_dir=data_dir,
                                     features=features)
  except FileNotFoundError as e:
    # The `tfds build` CLI does not know this builder without the import.
    message = str(e)
    if message.endswith(sources.prepare_command(TFDS_NAME, data_dir)):
      message += f" --imports={_BUILDER_MODULE}"
    else:
      message += (f"\n(the conll2003 builder needs `tfds build ... "
                  f"--imports={_BUILDER_MODULE}`)")
    raise FileNotFoundError(message) from e.__cause__

  token_source = sources.TfdsSource(TFDS_NAME, train_split, data_dir=data_dir,
                                    features=("tokens",))
  sentences = []
  for start in range(0, len(token_source), _READ_CHUNK):
    rows = np.arange(start, min(start + _READ_CHUNK, len(token_source)))
    sentences.extend(token_source.read(rows)["tokens"])
  vocab = text.build_vocab(sentences, max_size=max_vocab, lowercase=lowercase)

  info = train_source.info
  tasks = tasks_lib.TaskSet([
      tasks_lib.classification_task(
          task, info.features[feature].feature.num_classes,
          positions=(max_length,))
      for task, feature in TAG_FEATURES.items()])

  def convert(raw: sources.Features) -> dict[str, Any]:
    return encode_batch(raw, vocab, max_length)

  return catalog.Dataset(
      name="conll2003", tasks=tasks,
      train=(mixture.Component("conll2003", train_source, convert),),
      eval=(mixture.Component("conll2003", eval_source, convert),),
      info={"vocab_size": len(vocab), "vocab": vocab,
            "max_length": max_length})
