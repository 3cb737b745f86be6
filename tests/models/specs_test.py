"""The architecture and trunk spec tables of `mtl_jax.models.build`: every
architecture builds from its spec, its step arguments are right, and its last
shared layer exists in its params. Shapes only (`jax.eval_shape`): seconds."""

import inspect

import jax
import numpy as np
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax.models import build

TASKS = tasks_lib.TaskSet([
    tasks_lib.classification_task("left", 10),
    tasks_lib.multilabel_task("present", 10),
    tasks_lib.regression_task("sum"),
])
X = np.zeros((2, 8, 8, 1), np.float32)
# Small hyperparameters where the defaults are slow to trace.
SMALL = {"mtan": {"channels": (4, 8)}, "cross_stitch": {"hidden_sizes": (8,)}}

# What the step must be told about each architecture, for input_trunk False
# and True: (encode_decode, pass_task_presence, grad_norm_path).
EXPECTED_STEP_KWARGS = {
    "hard_sharing": ((True, False, ("features",)),) * 2,
    "soft_sharing": ((False, False, ()),) * 2,
    "cross_stitch": ((False, False, ()),) * 2,
    "mtan": ((False, False, ()),) * 2,
    "mmoe": ((False, False, ()), (False, False, ("trunk", "features"))),
    "cgc": ((False, False, ()), (False, False, ("trunk", "features"))),
    "ple": ((False, False, ()), (False, False, ("trunk", "features"))),
    "dselect_k": ((False, False, ()), (False, False, ("trunk", "features"))),
    "adversarial": ((False, True, ("encoder", "features")),) * 2,
}


def _params(name, input_trunk):
  model = build.make_model(name, TASKS,
                           build.make_trunk("mlp", hidden_sizes=(8,)),
                           input_trunk=input_trunk, **SMALL.get(name, {}))
  return model, build.abstract_params(model, X)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_the_table_lists_every_architecture():
  assert set(build.ARCHITECTURES) == set(EXPECTED_STEP_KWARGS)
  for name, spec in build.ARCHITECTURES.items():
    assert spec.name == name and build.get_architecture(name) is spec


@pytest.mark.parametrize("name", sorted(EXPECTED_STEP_KWARGS))
@pytest.mark.parametrize("input_trunk", [False, True])
def test_every_architecture_builds_from_its_spec(name, input_trunk):
  spec = build.ARCHITECTURES[name]
  model, params = _params(name, input_trunk)
  assert isinstance(model, spec.module)
  assert set(params) == {"shared", "tasks"}
  assert set(params["tasks"]) == set(TASKS.names)
  encode_decode, presence, path = EXPECTED_STEP_KWARGS[name][input_trunk]
  assert spec.step_kwargs(input_trunk) == {
      "encode_decode": encode_decode, "pass_task_presence": presence,
      "grad_norm_path": path}
  assert build.last_shared_layer(name, input_trunk) == (path or None)
  if path:  # GradNorm's layer is a Dense named "features" in the shared params
    layer = _get(params["shared"], path)
    assert set(layer) == {"kernel", "bias"}
  # Task presence is an argument of exactly the models told to take it.
  assert ("task_presence" in inspect.signature(model.__call__).parameters
          ) == presence


def test_encode_decode_models_have_one_head_per_task_on_the_features():
  for name, spec in build.ARCHITECTURES.items():
    if not spec.encode_decode:
      continue
    model, _ = _params(name, False)
    variables = model.init(jax.random.PRNGKey(0), X)
    features = model.apply(variables, X, method="encode")
    out = model.apply(variables, features, method="decode")
    direct = model.apply(variables, X)
    for task in TASKS.names:
      np.testing.assert_array_equal(out[task], direct[task])
    assert set(variables["params"]["tasks"]) == set(TASKS.names)


def test_hyperparameters_leave_out_the_fields_the_build_fills():
  for name, spec in build.ARCHITECTURES.items():
    fields = build.architecture_fields(name)
    assert fields == spec.hyperparameters
    assert not set(fields) & set(spec.trunk_use.fills), name
    assert not set(fields) & {"parent", "name", "head_hidden_sizes"}, name
  assert build.architecture_fields("hard_sharing") == {}
  assert build.architecture_fields("mmoe")["num_experts"] == 4
  with pytest.raises(ValueError, match=r"architecture 'mmoe' has no "
                     r"hyperparameter\(s\) \['experts'\]; valid: dropout_rate"):
    build.make_model("mmoe", TASKS, build.make_trunk("mlp"), experts=2)
  with pytest.raises(ValueError, match="unknown architecture 'tree'; valid: "
                     "adversarial, cgc"):
    build.get_architecture("tree")


def test_step_option_checks_read_the_spec():
  mmoe = build.get_architecture("mmoe")
  with pytest.raises(ValueError, match="rep_grad=True needs one shared "
                     "representation.*'hard_sharing', not 'mmoe'"):
    mmoe.check_step_options(rep_grad=True)
  with pytest.raises(ValueError, match="weighting 'gradnorm' needs a last "
                     "shared layer.*adversarial, hard_sharing do.*mmoe"):
    mmoe.check_step_options(grad_norms_for="gradnorm")
  mmoe.check_step_options(input_trunk=True, grad_norms_for="gradnorm")
  build.get_architecture("hard_sharing").check_step_options(
      rep_grad=True, grad_norms_for="gradnorm")


def test_trunk_specs_read_their_options():
  options = {"hidden_sizes": [16, 8], "channels": (4,), "strides": (1,),
             "feature_size": 8, "dropout_rate": 0.1,
             "tagger": {"embed_dim": 8, "num_layers": 1}}
  assert build.trunk_kwargs("mlp", options) == {"hidden_sizes": (16, 8),
                                                "dropout_rate": 0.1}
  assert build.trunk_kwargs("cnn", options) == {
      "channels": (4,), "strides": (1,), "feature_size": 8,
      "dropout_rate": 0.1}
  assert build.trunk_kwargs("resnet", options) == {"feature_size": 8}
  assert build.trunk_kwargs("tagger", options) == {"embed_dim": 8,
                                                   "num_layers": 1}
  assert build.trunk_kwargs("tagger", options, {"vocab_size": 30}) == {
      "embed_dim": 8, "num_layers": 1, "vocab_size": 30}
  for name, spec in build.TRUNKS.items():
    assert spec.name == name
    assert set(spec.reads) <= set(spec.fields), name
    trunk = build.make_trunk(name, **spec.kwargs(options, {"vocab_size": 30}))
    assert isinstance(trunk, spec.module)
  with pytest.raises(ValueError, match=r"trunk 'tagger' has no argument\(s\) "
                     r"\['depth'\]"):
    build.check_model_options("hard_sharing", "tagger",
                              trunk_kwargs={"depth": 2})
  with pytest.raises(ValueError, match="unknown trunk 'vit'; valid: cnn, mlp, "
                     "resnet, tagger"):
    build.check_model_options("hard_sharing", "vit")
