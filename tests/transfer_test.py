"""transfer.py: restoring part of a params tree and freezing by pattern."""

import jax
import numpy as np
import optax
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.models import build
from mtl_jax.training import checkpoint as checkpoint_lib
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
