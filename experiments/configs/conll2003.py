"""CoNLL-2003: part-of-speech, chunk and named-entity tagging per token.

Three per-token tasks (`mtl_jax/data/catalog/conll2003.py`): "pos" (47
classes), "chunk" (23) and "ner" (9), on sentences padded to
`data.options.max_length` token ids from a vocabulary of the training split
(at most `data.options.max_vocab` ids). The trunk is the convolutional
"tagger"; its `vocab_size` comes from the dataset.

Prepare the data once (array_record, for random access):
  tfds build conll2003 --file_format=array_record \
    --imports=tensorflow_datasets.text.conll2003

Train:
  python -m experiments.train --config=experiments/configs/conll2003.py \
    --workdir=runs/conll2003 --config.data.options.eval_split=dev
"""

import ml_collections

from experiments.configs import multi_digits


def get_config() -> ml_collections.ConfigDict:
  config = multi_digits.get_config()
  config.data.name = "conll2003"
  config.data.options = ml_collections.ConfigDict({
      "max_length": 64, "max_vocab": 20000, "lowercase": False,
      "train_split": "train", "eval_split": "test"})
  config.data.label_fractions = ml_collections.ConfigDict()  # all labels
  config.data.mixture = ml_collections.ConfigDict({
      "method": "proportional", "temperature": 1.0,
      "rates": ml_collections.ConfigDict(), "size_cap": 0,
      "composition": "sampled"})

  config.tasks = ""  # pos, chunk, ner
  config.task_weights = ml_collections.ConfigDict()  # 1.0 each

  config.model.trunk = "tagger"
  config.model.tagger = ml_collections.ConfigDict({
      "embed_dim": 128, "num_layers": 2, "kernel_size": 3,
      "feature_size": 128, "dropout_rate": 0.1})
  config.model.head_hidden_sizes = ()  # a per-token linear layer per task

  config.optimizer.learning_rate = 1e-3
  config.batch_size = 32  # sentences
  config.eval_batch_size = 256
  config.num_steps = 5000
  config.eval_every = 500
  return config
