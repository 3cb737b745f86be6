"""MNIST, Fashion-MNIST and KMNIST: three tasks with disjoint examples.

Three 10-class tasks (`mtl_jax/data/catalog/mnist_family.py`), each labelled
only on its own dataset's 28x28 images; the mixture draws the three datasets
uniformly (`data.mixture.method`), and every example carries mask 1 for its
own task only.

Prepare the data once (array_record, for random access):
  tfds build mnist --file_format=array_record
  tfds build fashion_mnist --file_format=array_record
  tfds build kmnist --file_format=array_record

Train:
  python -m experiments.train --config=experiments/configs/mnist_family.py \
    --workdir=runs/mnist_family --config.data.mixture.method=proportional
"""

import ml_collections

from experiments.configs import multi_digits


def get_config() -> ml_collections.ConfigDict:
  config = multi_digits.get_config()
  config.data.name = "mnist_family"
  config.data.options = ml_collections.ConfigDict({
      "image_size": 28, "train_split": "train", "eval_split": "test"})
  config.data.label_fractions = ml_collections.ConfigDict()  # all labels
  # Components are named "mnist", "fashion_mnist", "kmnist" (for
  # method="explicit", set rates.<name>).
  config.data.mixture = ml_collections.ConfigDict({
      "method": "uniform", "temperature": 1.0,
      "rates": ml_collections.ConfigDict(), "size_cap": 0,
      "composition": "sampled"})

  config.tasks = ""  # mnist, fashion_mnist, kmnist
  config.task_weights = ml_collections.ConfigDict()  # 1.0 each

  config.model.trunk = "cnn"
  config.model.channels = (32, 64, 64)  # 28x28 -> 7x7
  config.model.strides = (1, 2, 2)
  config.model.feature_size = 256
  config.model.dropout_rate = 0.1

  config.optimizer.learning_rate = 1e-3
  config.batch_size = 128
  config.num_steps = 5000
  config.eval_every = 500
  return config
