"""Default experiment: hard parameter sharing on the embedded multi_digits data.

Four tasks on images that compose two handwritten digits: the left digit's class,
the right digit's class, which digits are present (multi-label) and their sum
(regression). Each task is labelled on its own seeded subset of the training
composites (`data.label_fractions`); examples labelled for no task form the
unlabelled pool.

Override any field on the command line, e.g.
  python -m experiments.train --config=experiments/configs/multi_digits.py \
    --workdir=runs/md --config.optimizer.learning_rate=3e-4
"""

import ml_collections

from experiments.configs import methods
from experiments.configs import pretexts
from mtl_jax import aggregation
from mtl_jax import weighting
from mtl_jax.models import build as models_build


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # A dataset of mtl_jax.data.catalog.DATASETS; its keyword options (here the
  # TFDS builder config, "small" for quick tests, and the sum task's loss).
  config.data.name = "multi_digits"
  config.data.options = ml_collections.ConfigDict(
      {"builder_config": "default", "sum_loss": "huber"})
  config.data.data_dir = ""  # "" = TFDS default (~/tensorflow_datasets)
  # Fraction of each task's training examples that keep their label (seeded
  # per task; a task not listed keeps all). Examples left with no label form
  # the unlabelled pool.
  config.data.label_fractions = ml_collections.ConfigDict(
      {"left": 0.5, "right": 0.3, "present": 0.2, "sum": 0.1})
  config.data.label_seed = 0
  # Supervised-only runs skip the unlabelled pool (it is for self-supervised
  # tasks).
  config.data.drop_unlabelled = True
  # How batches draw from the training components (labelled sources and
  # unlabelled pools): method explicit | proportional | uniform | temperature
  # (rate ~ min(n, size_cap) ** (1 / temperature)); explicit rates name every
  # component; composition "sampled" (multinomial per batch) or "fixed".
  config.data.mixture = ml_collections.ConfigDict({
      "method": "proportional", "temperature": 1.0,
      "rates": ml_collections.ConfigDict(), "size_cap": 0,
      "composition": "sampled"})
  config.data.prefetch = 2  # batches read ahead in a background thread
  # Validation rows held out of the labelled training rows (a seeded share
  # of them; each task keeps its label fraction): the evaluations every
  # eval_every steps use them and the test split is evaluated once, at the
  # end. 0: no validation split (the evaluations use the test split).
  config.data.validation_fraction = 0.0
  config.data.validation_seed = 0

  # Comma-separated task names ("" = every task of the dataset); static loss
  # weights per task (a task not listed: 1.0).
  config.tasks = "left,right,present,sum"
  config.task_weights = ml_collections.ConfigDict(
      {"left": 1.0, "right": 1.0, "present": 1.0, "sum": 0.5})

  # Self-supervised tasks next to the supervised ones ("" = none), e.g.
  # "grid_mask,rotate"; options under config.pretext.<name> (see
  # experiments/configs/pretexts.py). They learn from every row, so mix the
  # unlabelled pool in with data.drop_unlabelled=False.
  config.pretext = pretexts.pretext_block()

  config.model = ml_collections.ConfigDict()
  # hard_sharing | soft_sharing | cross_stitch | mtan | mmoe | cgc | ple |
  # dselect_k | adversarial; hyperparameters under config.model.<name>.
  config.model.architecture = "hard_sharing"
  # Mixture-of-experts models: run the trunk before the experts (shared).
  config.model.input_trunk = False
  for name in sorted(models_build.ARCHITECTURES):
    fields = models_build.architecture_fields(name)
    if fields:
      config.model[name] = ml_collections.ConfigDict(fields)
  # The backbone: hard sharing's shared trunk, soft sharing's per-task column,
  # the adversarial model's encoders, the MoE models' optional input trunk.
  config.model.trunk = "cnn"  # mlp | cnn | resnet
  config.model.channels = (32, 64, 64)  # cnn
  config.model.strides = (1, 2, 1)  # cnn
  config.model.hidden_sizes = (256, 256)  # mlp
  config.model.feature_size = 256  # cnn / resnet
  config.model.dropout_rate = 0.1  # mlp / cnn
  config.model.head_hidden_sizes = (128,)

  # Loss-level weighting: static (config.task_weights), equal, uncertainty,
  # dwa, rlw, gls, imtl_l, gradnorm, famo; hyperparameters under
  # config.weighting.<name>.
  config.weighting = methods.method_block(
      "static", weighting.WEIGHTINGS, skip=("weights", "num_tasks"))
  # Gradient-level aggregation of the per-task gradients of the shared params:
  # "none" (plain weighted sum), mean, sum, pcgrad, graddrop, gradvac, mgda,
  # cagrad, nash_mtl, imtl_g, aligned_mtl, upgrad, dualproj, config.
  config.aggregation = methods.method_block("none", aggregation.AGGREGATORS)
  # Aggregate gradients w.r.t. the shared representation (MGDA-UB style; only
  # for methods valid there), and map the per-task VJP over chunks of tasks
  # (0: all tasks at once) to bound memory with many tasks.
  config.aggregation.rep_grad = False
  config.aggregation.chunk_size = 0
  # How Gram-based aggregators get the per-task gradients (make_train_step's
  # `jacobian`): "auto" (factored where cheaper: no [K, P] matrix),
  # "factored" or "full". The update is the same up to float rounding.
  config.aggregation.jacobian = "auto"
  # Report grad_cos/<a>,<b> (the cosine of two tasks' gradients of the shared
  # params) from the Gram matrix the aggregator forms anyway (needs an
  # aggregator; GradDrop also jacobian="full").
  config.aggregation.gradient_cosines = False

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # sgd | adam | adamw
  config.optimizer.learning_rate = 2e-3
  config.optimizer.schedule = "warmup_cosine"  # constant | cosine | warmup_cosine
  # -1: automatic, min(100, num_steps // 10) (valid for any run length); an
  # explicit count must be < num_steps (and < the steps added by extending).
  config.optimizer.warmup_steps = -1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0
  # Param groups by path pattern (fnmatch on "shared/...", "tasks/<task>/..."):
  # frozen params (comma-separated patterns; "shared/*" = linear probe: only
  # the heads train) and per-group learning-rate scales
  # ("pattern=scale,...", first match wins; e.g. "shared/*=0.1" trains the
  # trunk at a tenth of the heads' rate; "shared/features/*=1,shared/*=0"
  # freezes the cnn trunk but its last layer). A pattern matching no param
  # is an error.
  config.optimizer.freeze = ""
  config.optimizer.lr_scales = ""

  # Start from another run: its workdir or a checkpoint directory ("" =
  # from scratch) and the step to take (-1: the latest). The shared params and
  # the heads of the tasks in both runs are restored; new tasks' heads are
  # initialised from config.seed; optimizer and method states start fresh.
  # Used when this workdir has no checkpoint yet (a resume continues its own).
  config.init_from = ""
  config.init_from_step = -1
  # Continue this workdir with another task set (tasks, pretexts, their
  # weights and label fractions, the data mixture may change): the kept
  # params, their optimizer state, the step and the method states of kept
  # tasks continue; new heads start fresh. False: a changed task set is an
  # error.
  config.allow_task_change = False

  # Data parallelism: "jit" (sharded batch, default) or "pmap"; params and
  # optimizer state "replicated" or "fsdp" (sharded over the data axis, jit only).
  config.parallelism = "jit"
  config.sharding = "replicated"
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # devices on the data axis; -1 = all

  config.batch_size = 128  # global, over all devices and hosts
  config.eval_batch_size = 512
  config.num_steps = 3000
  config.log_every = 100
  config.eval_every = 500
  # Model selection on the validation split: "" (the last step), "loss" (the
  # static-weighted sum of the supervised tasks' validation losses) or a
  # "<task>/<metric>" key such as "left/accuracy" (lower is better for loss,
  # mae, rmse, mse). The selected step's params are the ones tested.
  config.select_by = ""
  config.checkpoint_every = 1000
  config.max_checkpoints_to_keep = 2
  # Steps with a NaN/Inf loss or update are skipped; this many in a row stop
  # the run with an error naming the tasks.
  config.max_nonfinite_streak = 10
  return config
