"""transfer.py: restoring part of a params tree and freezing by pattern."""

import jax
import numpy as np
import optax
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.models import build
from mtl_jax.training import checkpoint as checkpoint_lib
from mtl_jax.training import optim
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib
from mtl_jax.training import transfer

X = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)


def _params(task_names, hidden=(16,), classes=3, seed=0):
  tasks = tasks_lib.TaskSet([tasks_lib.classification_task(n, classes)
                             for n in task_names])
  model = build.make_hard_sharing_model(
      tasks, build.make_trunk("mlp", hidden_sizes=hidden),
      head_hidden_sizes=())
  return tasks, model, state_lib.init_params(model, X,
                                             jax.random.PRNGKey(seed))


def test_merge_restores_shared_and_common_heads_and_reports_the_rest():
  _, _, old = _params(["a", "b"], seed=1)
  _, _, fresh = _params(["a", "c"], seed=2)
  params, report = transfer.merge_params(fresh, old)
  jax.tree.map(np.testing.assert_array_equal, params["shared"], old["shared"])
  jax.tree.map(np.testing.assert_array_equal, params["tasks"]["a"],
               old["tasks"]["a"])
  # The new task's head is the fresh initialisation, bit for bit.
  jax.tree.map(np.testing.assert_array_equal, params["tasks"]["c"],
               fresh["tasks"]["c"])
  assert set(params["tasks"]) == {"a", "c"}
  assert report.initialised == ("tasks/c/Dense_0/bias",
                                "tasks/c/Dense_0/kernel")
  assert report.unused == ("tasks/b/Dense_0/bias", "tasks/b/Dense_0/kernel")
  assert report.restored == (
      "shared/features/bias", "shared/features/kernel",
      "tasks/a/Dense_0/bias", "tasks/a/Dense_0/kernel")
  assert jax.tree.structure(params) == jax.tree.structure(fresh)


def test_a_trunk_that_does_not_fit_is_named_with_both_shapes():
  _, _, old = _params(["a"], hidden=(16,))
  _, _, fresh = _params(["a"], hidden=(32,))
  with pytest.raises(ValueError, match=r"checkpoint param 'shared/features/"
                     r"bias' has shape \(16,\), the model's \(32,\)"):
    transfer.merge_params(fresh, old)
  _, _, deeper = _params(["a"], hidden=(16, 16))
  with pytest.raises(ValueError, match=r"under 'shared' do not fit the model: "
                     r"first difference at 'Dense_0/bias' \(missing from the "
                     r"checkpoint\)"):
    transfer.merge_params(deeper, old)


def test_a_common_head_of_other_shapes_is_an_error_until_dropped():
  _, _, old = _params(["a", "b"], classes=3)
  _, _, fresh = _params(["a", "b"], classes=5, seed=3)
  with pytest.raises(ValueError, match=r"'tasks/a/Dense_0/bias' has shape "
                     r"\(3,\), the model's \(5,\)"):
    transfer.merge_params(fresh, old)
  params, report = transfer.merge_params(
      fresh, transfer.drop_tasks(old, ["a", "b"]))
  jax.tree.map(np.testing.assert_array_equal, params["tasks"], fresh["tasks"])
  assert report.unused == ()
  with pytest.raises(KeyError, match=r"no head for task\(s\) \['z'\]"):
    transfer.drop_tasks(old, ["z"])


def test_frozen_trunk_is_bit_identical_while_the_heads_move():
  tasks, model, params = _params(["a", "b"])
  optimizer = transfer.freeze(optax.adam(1e-2), params, ["shared/*"])
  state = state_lib.create_train_state(params, optimizer, weighting.equal(),
                                       len(tasks), jax.random.PRNGKey(1))
  step = jax.jit(step_lib.make_train_step(model.apply, tasks, optimizer,
                                          weighting.equal(),
                                          encode_decode=True))
  rng = np.random.default_rng(1)
  for _ in range(5):
    batch = {"inputs": X,
             "labels": {t: rng.integers(0, 3, 8).astype(np.int32)
                        for t in tasks.names},
             "masks": {t: np.ones(8, np.float32) for t in tasks.names}}
    state, _ = step(state, batch)
  jax.tree.map(np.testing.assert_array_equal, state.params["shared"],
               params["shared"])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       state.params["tasks"], params["tasks"])
  assert min(jax.tree.leaves(moved)) > 0


def test_freeze_patterns_are_checked():
  _, _, params = _params(["a"])
  labels = transfer.frozen_labels(params, ["tasks/*/Dense_0/bias"])
  assert labels["tasks"]["a"]["Dense_0"]["bias"] == "frozen"
  assert labels["tasks"]["a"]["Dense_0"]["kernel"] == "trainable"
  with pytest.raises(ValueError, match=r"freeze pattern 'trunk/\*' matches "
                     "no param"):
    transfer.frozen_labels(params, ["trunk/*"])


def test_read_params_from_a_workdir_and_named_errors(tmp_path):
  tasks, _, params = _params(["a"])
  state = state_lib.create_train_state(params, optax.sgd(0.1),
                                       weighting.equal(), len(tasks),
                                       jax.random.PRNGKey(1))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"))
  ckpt.save(3, state, wait=True)
  ckpt.save(7, state.replace(params=jax.tree.map(lambda x: x + 1, params)),
            wait=True)
  ckpt.close()
  step, read = transfer.read_params(str(tmp_path / "run"))
  assert step == 7
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b + 1), read,
               params)
  step, read = transfer.read_params(str(tmp_path / "run" / "checkpoints"), 3)
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, read, params)
  with pytest.raises(FileNotFoundError, match=r"init_from path '.*nowhere' "
                     "does not exist"):
    transfer.read_params(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"holds no checkpoint"):
    transfer.read_params(str(tmp_path / "empty"))
  assert not (tmp_path / "empty" / "checkpoints").exists()
  with pytest.raises(ValueError, match=r"no checkpoint at step 5; steps: "
                     r"\[3, 7\]"):
    transfer.read_params(str(tmp_path / "run"), 5)


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), params)


def test_param_group_learning_rates_match_a_hand_computation():
  _, _, params = _params(["a", "b"])
  groups = [("shared/*", 0.1), ("tasks/b/*", 0.0), ("tasks/*", 2.0)]
  lr = 0.05
  g = _grads(params, 0)
  # SGD: the update of a group is -lr * scale * g.
  sgd = optim.make_optimizer("sgd", optax.constant_schedule(lr), momentum=0.0,
                             param_groups=groups)
  updates, _ = sgd.update(g, sgd.init(params), params)
  np.testing.assert_allclose(updates["shared"]["features"]["kernel"],
                             -lr * 0.1 * g["shared"]["features"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_allclose(updates["tasks"]["a"]["Dense_0"]["kernel"],
                             -lr * 2.0 * g["tasks"]["a"]["Dense_0"]["kernel"],
                             rtol=1e-6)
  # Scale 0: exactly zero (frozen), with no optimizer state of its own.
  assert not np.any(np.asarray(updates["tasks"]["b"]["Dense_0"]["kernel"]))
  # Adam, two steps with a warm-up schedule: m, v by hand, lr(step) scaled.
  schedule = optax.linear_schedule(0.01, 0.03, 10)
  adam = optim.make_optimizer("adam", schedule, param_groups=groups)
  opt_state = adam.init(params)
  g2 = _grads(params, 1)
  for gs in (g, g2):
    updates, opt_state = adam.update(gs, opt_state, params)
  b1, b2, eps = 0.9, 0.999, 1e-8
  x, y = g["shared"]["features"]["bias"], g2["shared"]["features"]["bias"]
  m = (1 - b1) * (b1 * x + y) / (1 - b1 ** 2)
  v = (1 - b2) * (b2 * x ** 2 + y ** 2) / (1 - b2 ** 2)
  np.testing.assert_allclose(updates["shared"]["features"]["bias"],
                             -0.1 * float(schedule(1)) * m / (np.sqrt(v) + eps),
                             rtol=1e-4)  # float32 bias correction 1 - b2**2
  with pytest.raises(ValueError, match=r"scale of 'shared/\*' must be a "
                     r"number >= 0"):
    optim.make_optimizer("sgd", optax.constant_schedule(lr),
                         param_groups=[("shared/*", -1.0)])


def test_continue_state_keeps_what_the_tasks_share_and_initialises_the_rest(
    tmp_path):
  old_tasks, model, old_params = _params(["a", "b"], seed=1)
  new_tasks, new_model, new_params = _params(["c", "a"], seed=2)
  method = weighting.uncertainty()
  optimizer = optax.adam(1e-2)
  old = state_lib.create_train_state(old_params, optimizer, method, 2,
                                     jax.random.PRNGKey(5))
  g = _grads(old_params, 3)
  _, opt_state = optimizer.update(g, old.opt_state, old_params)
  log_vars = np.array([0.25, -0.5], np.float32)  # [a, b]
  old = old.replace(step=np.int32(12), opt_state=opt_state,
                    weighting_state=old.weighting_state._replace(
                        log_vars=log_vars),
                    nonfinite_streak=np.int32(1))
  # As a checkpoint reads back without a template: nested dicts.
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), metadata={"tasks": ["a", "b"]})
  ckpt.save(12, old, wait=True)
  raw = ckpt.read(12)
  assert ckpt.metadata(12) == {"tasks": ["a", "b"]}
  ckpt.close()
  fresh = state_lib.create_train_state(new_params, optimizer, method, 2,
                                       jax.random.PRNGKey(6))
  state, report = transfer.continue_state(fresh, raw, ["a", "b"], ["c", "a"])
  assert int(state.step) == 12 and int(state.nonfinite_streak) == 1
  np.testing.assert_array_equal(state.rng, old.rng)
  same = np.testing.assert_array_equal
  jax.tree.map(same, state.params["shared"], old_params["shared"])
  jax.tree.map(same, state.params["tasks"]["a"], old_params["tasks"]["a"])
  jax.tree.map(same, state.params["tasks"]["c"], new_params["tasks"]["c"])
  mu, fresh_mu = state.opt_state[0].mu, fresh.opt_state[0].mu
  jax.tree.map(same, mu["shared"], opt_state[0].mu["shared"])
  jax.tree.map(same, mu["tasks"]["a"], opt_state[0].mu["tasks"]["a"])
  jax.tree.map(same, mu["tasks"]["c"], fresh_mu["tasks"]["c"])
  assert int(state.opt_state[0].count) == 1
  # Per-task method state follows the task: c is new, a was index 0.
  same(state.weighting_state.log_vars,
       [float(fresh.weighting_state.log_vars[0]), 0.25])
  assert report.added == ("c",) and report.removed == ("b",)
  assert report.params.unused == ("tasks/b/Dense_0/bias",
                                  "tasks/b/Dense_0/kernel")
  assert report.opt_state_initialised == 4  # mu, nu of c's bias and kernel
  assert jax.tree.structure(state) == jax.tree.structure(fresh)
  # Unknown task order: the method states start afresh.
  state, report = transfer.continue_state(fresh, raw, None, ["c", "a"])
  same(state.weighting_state.log_vars, fresh.weighting_state.log_vars)
  assert report.method_states.startswith("initialised")
  assert report.removed == ("b",)


def test_pairwise_method_state_is_remapped_on_both_axes():
  gram = np.arange(9, dtype=np.float32).reshape(3, 3)  # tasks x, y, z
  fresh = {"phi": np.full((2, 2), -1, np.float32), "count": np.int32(0)}
  out = transfer._remap_tasks(fresh, {"phi": gram, "count": np.int32(4)},
                              ["x", "y", "z"], ["z", "new"])
  np.testing.assert_array_equal(out["phi"], [[8, -1], [-1, -1]])
  assert int(out["count"]) == 4


def test_add_heads_keeps_the_shared_params_and_initialises_the_new_head():
  _, _, old = _params(["a"], seed=1)
  tasks, model, fresh = _params(["a", "b"], seed=4)
  params, report = transfer.add_heads(model, old, X, jax.random.PRNGKey(4))
  jax.tree.map(np.testing.assert_array_equal, params["shared"], old["shared"])
  jax.tree.map(np.testing.assert_array_equal, params["tasks"]["b"],
               fresh["tasks"]["b"])
  assert report.initialised == ("tasks/b/Dense_0/bias",
                                "tasks/b/Dense_0/kernel")


# Which architectures can move to another task set: those whose shared
# params do not depend on the number of tasks. Abstract params (shapes only):
# no initialisation is compiled.
TASK_COUNT_IN_SHARED = {"adversarial", "cross_stitch", "ple"}


@pytest.mark.parametrize("architecture", sorted(build.ARCHITECTURES))
def test_every_architecture_restores_its_params_and_adds_a_task(architecture):
  images = np.zeros((2, 8, 8, 1), np.float32)

  def abstract(names):
    tasks = tasks_lib.TaskSet([tasks_lib.classification_task(n, 3)
                               for n in names])
    model = build.make_model(architecture, tasks, build.make_trunk(
        "cnn", channels=(4, 4), strides=(1, 2), feature_size=8),
                             head_hidden_sizes=())
    return build.abstract_params(model, images)

  old = abstract(["a", "b"])
  same, report = transfer.merge_params(abstract(["a", "b"]), old)
  assert report.initialised == () and report.unused == ()
  assert len(report.restored) == len(jax.tree.leaves(old))
  grown = abstract(["a", "b", "c"])
  if architecture in TASK_COUNT_IN_SHARED:
    with pytest.raises(ValueError, match=r"depend on the number of tasks "
                       r"\(2 in the checkpoint, 3 in the model"):
      transfer.merge_params(grown, old)
  else:
    params, report = transfer.merge_params(grown, old)
    assert report.initialised and all(p.startswith("tasks/c/")
                                       for p in report.initialised)
    assert len(report.restored) == len(jax.tree.leaves(old))
