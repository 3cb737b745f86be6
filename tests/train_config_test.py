"""A bad config fails with an error naming the field before any data is read:
`experiments/train.py` checks the whole config up front with the library's
checks (`training.checks`, `data.build`, the architecture spec), which a
notebook user calls with explicit arguments. Nothing here trains: seconds."""

import pytest

from experiments import train
from experiments.configs import multi_digits as md_config
from mtl_jax.aggregation import get_aggregator
from mtl_jax.data import build as data_build
from mtl_jax.data import catalog
from mtl_jax.data import mixture as mixture_lib
from mtl_jax.training import checks


def _config(**overrides):
  config = md_config.get_config()
  config.data.options.builder_config = "small"
  config.model.trunk = "mlp"
  config.batch_size = 32
  config.eval_batch_size = 256
  config.num_steps = 20
  config.optimizer.warmup_steps = 5
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture
def no_data(monkeypatch):
  """Any attempt to open a dataset fails the test."""
  def fail(*args, **kwargs):
    raise AssertionError("the dataset was opened before the config error")
  monkeypatch.setattr(catalog, "get_dataset", fail)
  monkeypatch.setattr(data_build, "load_dataset", fail)


BAD = [
    ({"data.name": "mnist"}, r"unknown dataset 'mnist'; valid: celeb_a, "),
    ({"data.options.sizes": 3},
     r"dataset 'multi_digits' has no option\(s\) \['sizes'\]; valid: "
     r"builder_config, sum_loss, prepare"),
    ({"batch_size": 0}, r"config.batch_size must be a positive integer"),
    ({"num_steps": 0}, r"config.num_steps must be a positive integer"),
    ({"eval_every": -1}, r"config.eval_every must be an integer >= 0"),
    ({"max_nonfinite_streak": 0},
     r"config.max_nonfinite_streak must be an integer >= 1, got 0"),
    ({"seed": -1}, r"config.seed must be a non-negative integer"),
    ({"data.prefetch": 0}, r"config.data.prefetch must be an integer >= 1"),
    ({"data.label_fractions.left": 1.5}, r"left.*1.5"),
    ({"data.mixture.method": "zipf"},
     r"unknown mixing method 'zipf'; valid: explicit, proportional"),
    ({"data.mixture.composition": "mixed"},
     r"unknown composition 'mixed'; valid: sampled, fixed"),
    ({"model.dropout_rate": 1.5},
     r"config.model.dropout_rate must be in \[0, 1\), got 1.5"),
    ({"model.trunk": "vit"}, r"unknown trunk 'vit'; valid: cnn, mlp, resnet"),
    ({"model.architecture": "tree"},
     r"unknown architecture 'tree'; valid: adversarial, cgc"),
    ({"model.mmoe.experts": 3, "model.architecture": "mmoe"},
     r"architecture 'mmoe' has no hyperparameter\(s\) \['experts'\]"),
    ({"optimizer.name": "lion"},
     r"unknown optimizer 'lion'; valid: sgd, adam, adamw"),
    ({"optimizer.learning_rate": -1.0},
     r"config.optimizer.learning_rate must be > 0, got -1.0"),
    ({"optimizer.momentum": 1.0},
     r"config.optimizer.momentum must be in \[0, 1\), got 1.0"),
    ({"optimizer.schedule": "step"}, r"unknown schedule 'step'"),
    ({"optimizer.warmup_steps": 20},
     r"config.optimizer.warmup_steps=20 must be < config.num_steps=20; "
     r"lower config.optimizer.warmup_steps, or set it to -1"),
    ({"weighting.name": "nope"},
     r"unknown weighting method 'nope'; valid: dwa, equal, famo"),
    ({"task_weights.left": -1.0}, r"static weights must be .* >= 0"),
    ({"aggregation.name": "nope"},
     r"unknown aggregation method 'nope'; valid: aligned_mtl, cagrad"),
    ({"aggregation.name": "pcgrad", "aggregation.rep_grad": True},
     r"config.aggregation.rep_grad=True is not valid for aggregation "
     r"'pcgrad'; valid: .*mgda"),
    ({"aggregation.rep_grad": True},
     r"rep_grad=True is not valid for aggregation 'none'"),
    ({"model.architecture": "mmoe", "aggregation.name": "mgda",
      "aggregation.rep_grad": True},
     r"rep_grad=True needs one shared representation"),
    ({"model.architecture": "cross_stitch", "weighting.name": "gradnorm"},
     r"weighting 'gradnorm' needs a last shared layer"),
    ({"aggregation.jacobian": "fast"},
     r"unknown config.aggregation.jacobian 'fast'; valid: auto, factored, full"),
    ({"aggregation.chunk_size": -1},
     r"config.aggregation.chunk_size must be >= 0"),
    ({"batch_size": 36},
     r"config.batch_size=36 is not divisible by the number of devices \(8\)"),
    ({"parallelism": "dp"}, r"unknown parallelism 'dp'; valid: jit, pmap"),
    ({"pretext.names": "grid_mask,jigsaw"},
     r"config.pretext.names: unknown pretext\(s\) \['jigsaw'\]; valid: "
     r"blur_region, cluster, colourise"),
    ({"pretext.names": "rotate,rotate"},
     r"config.pretext.names repeats a pretext"),
    ({"pretext.names": "grid_mask", "pretext.grid_mask.grid": (0, 2)},
     r"config.pretext.grid_mask: grid_mask: grid \(0, 2\) must be at least "
     r"1 x 1"),
    ({"pretext.names": "super_resolve", "pretext.super_resolve.factor": 0},
     r"config.pretext.super_resolve: super_resolve: factor must be an "
     r"integer >= 1"),
    ({"pretext.names": "denoise", "pretext.denoise.rows": "pool"},
     r"config.pretext.denoise.rows: unknown rows 'pool'; valid: all, "
     r"labelled, unlabelled"),
    ({"pretext.names": "rotate", "pretext.rotate.rows": "unlabelled"},
     r"config.pretext.rotate.rows='unlabelled' trains on the unlabelled "
     r"pool, which config.data.drop_unlabelled=True leaves out"),
    ({"pretext.names": "cluster", "model.architecture": "mmoe"},
     r"the cluster task reads the shared features, which architecture "
     r"'mmoe' does not expose"),
    ({"pretext.names": "cluster", "pretext.cluster.bank_size": 16},
     r"config.pretext.cluster.bank_size=16 must hold at least one batch"),
    ({"optimizer.lr_scales": "shared/*"},
     r"config.optimizer.lr_scales: 'shared/\*' is not 'pattern=scale' with "
     r"a scale >= 0"),
    ({"optimizer.lr_scales": "tasks/*=0.5,shared/*=-1"},
     r"config.optimizer.lr_scales: 'shared/\*=-1' is not 'pattern=scale'"),
    ({"init_from_step": 3},
     r"config.init_from_step=3 needs config.init_from"),
    ({"init_from_step": -2}, r"config.init_from_step"),
    ({"aggregation.gradient_cosines": True},
     r"config.aggregation.gradient_cosines=True: the weighted-sum step"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_config_fails_before_the_dataset_is_opened(no_data, overrides,
                                                       message):
  with pytest.raises(ValueError, match=message):
    train.check_config(_config(**overrides))
  with pytest.raises(ValueError, match=message):
    train.build_experiment(_config(**overrides))


def test_good_config_is_checked_without_data(no_data):
  checked = train.check_config(_config(**{"aggregation.name": "mgda",
                                          "aggregation.rep_grad": True}))
  assert checked.architecture.name == "hard_sharing"
  assert checked.aggregator.rep_grad_ok
  assert checked.parallel.num_devices == 8
  with pytest.raises(AssertionError, match="dataset was opened"):
    train.build_experiment(_config())


@pytest.mark.parametrize("overrides, message", [
    ({"tasks": "left,colour"},
     r"unknown task 'colour'; valid tasks: left, right, present, sum"),
    ({"task_weights.colour": 1.0},
     r"config.task_weights names unknown task\(s\) \['colour'\]"),
    ({"data.label_fractions.colour": 0.5},
     r"config.data.label_fractions names unknown task\(s\) \['colour'\]"),
    ({"tasks": "none"},
     r"config.tasks='none' trains no supervised task: name pretexts in "
     r"config.pretext.names"),
])
def test_task_names_are_checked_before_any_mixture_is_built(
    small_data_dir, monkeypatch, overrides, message):
  def fail(*args, **kwargs):
    raise AssertionError("a mixture was built before the task-name error")
  monkeypatch.setattr(mixture_lib, "Mixture", fail)
  monkeypatch.setattr(mixture_lib, "split_by_label_fraction", fail)
  config = _config(**overrides)
  config.data.data_dir = small_data_dir
  with pytest.raises((ValueError, KeyError), match=message):
    train.build_experiment(config)


@pytest.mark.parametrize("overrides, message", [
    ({"pretext.names": "colourise"},
     r"config.pretext.colourise: .*colourisation needs RGB images \(C = 3\); "
     r"got C = 1 in \(H, W, C\) = \(12, 16, 1\)"),
    ({"pretext.names": "grid_mask", "pretext.grid_mask.grid": (5, 4)},
     r"config.pretext.grid_mask: .*grid 5 x 4 does not divide the image"),
    ({"pretext.names": "super_resolve", "pretext.super_resolve.factor": 13},
     r"config.pretext.super_resolve: .*factor 13 is larger than the image"),
    ({"pretext.names": "rotate"},
     r"config.pretext.rotate: .*90-degree rotation of a non-square image"),
    ({"pretext.names": "blur_region", "pretext.blur_region.size": (16, 4)},
     r"config.pretext.blur_region: .*region 16 x 4 is larger than the image"),
    ({"pretext.names": "left"},
     r"unknown pretext\(s\) \['left'\]"),
])
def test_pretexts_that_do_not_fit_the_inputs_fail_before_training(
    small_data_dir, monkeypatch, overrides, message):
  """Checked on the first batch's shape, before any parameter exists."""
  def fail(*args, **kwargs):
    raise AssertionError("params were created before the pretext error")
  monkeypatch.setattr(train.models_build, "make_model", fail)
  config = _config(**overrides)
  config.data.data_dir = small_data_dir
  with pytest.raises(ValueError, match=message):
    train.build_experiment(config)


def test_library_checks_take_explicit_arguments():
  with pytest.raises(ValueError, match=r"^unknown jacobian 'fast'"):
    checks.check_step_options(aggregator=None, jacobian="fast")
  with pytest.raises(ValueError, match=r"^chunk_size must be >= 0"):
    checks.check_step_options(aggregator=None, chunk_size=-2)
  with pytest.raises(ValueError, match=r"^rep_grad=True is not valid for "
                     r"aggregation 'pcgrad'"):
    checks.check_step_options(aggregator=get_aggregator("pcgrad"),
                              aggregator_name="pcgrad", rep_grad=True)
  checks.check_step_options(aggregator=get_aggregator("mgda"), rep_grad=True,
                            chunk_size=2, jacobian="full")
  assert "mgda" in checks.rep_grad_aggregators()
  assert "pcgrad" not in checks.rep_grad_aggregators()
  with pytest.raises(ValueError, match=r"^momentum must be in \[0, 1\)"):
    checks.build_optimizer("sgd", 0.1, schedule="constant", total_steps=10,
                           momentum=1.5)
  optimizer, schedule = checks.build_optimizer(
      "adam", 0.1, schedule="warmup_cosine", total_steps=10, warmup_steps=2)
  assert float(schedule(2)) == pytest.approx(0.1)
  assert callable(optimizer.update)
  with pytest.raises(ValueError, match=r"^log_every must be a positive"):
    checks.check_loop_options(num_steps=5, log_every=0, eval_every=0,
                              checkpoint_every=0, max_checkpoints_to_keep=1,
                              max_nonfinite_streak=1)
  with pytest.raises(ValueError, match=r"^label_fractions: label fraction for "
                     r"task 'a' must be in \[0, 1\], got nan"):
    data_build.check_label_fractions({"a": float("nan")}, 0)
  with pytest.raises(ValueError, match=r"^temperature must be > 0"):
    data_build.check_mixing_options("temperature", temperature=0.0)
  with pytest.raises(ValueError, match=r"^unknown dataset 'x'"):
    data_build.check_dataset_options("x", {})
