"""Every architecture of the spec table trains at step level.

Each architecture is built from its `ArchitectureSpec` (tiny widths), given a
train state and run through the jitted `make_train_step` with the spec's
`step_kwargs`, on one fixed batch in which one task has no label. In
numbers: the params move, the loss is finite, the metrics name every task, the absent task's head
gets exactly zero gradient, a few steps lower the loss, and the eval step
gives finite metrics for every task. (`tests/train_test.py` checks the
config -> model wiring of every architecture without training.)
"""

import functools

import jax
import numpy as np
import optax
import pytest

from mtl_jax import weighting
from mtl_jax.data import multi_digits
from mtl_jax.models import build
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

TASKS = multi_digits.task_set()  # left, right (10 classes), present, sum
ABSENT = "sum"
B = 16
STEPS = 5
# Tiny widths: every hidden size of the defaults, replaced.
SMALL = {
    "soft_sharing": {},
    "cross_stitch": {"hidden_sizes": (8,)},
    "mtan": {"channels": (4, 8), "groups": 2},
    "mmoe": {"num_experts": 2, "expert_hidden_sizes": (8,)},
    "cgc": {"num_shared_experts": 1, "num_task_experts": 1,
            "expert_hidden_sizes": (8,)},
    "ple": {"num_shared_experts": 1, "num_task_experts": 1,
            "expert_hidden_sizes": (8,)},
    "dselect_k": {"num_experts": 3, "expert_hidden_sizes": (8,)},
    "adversarial": {"discriminator_hidden_sizes": (8,)},
}
# The auxiliary losses each model sows by default (with these widths: three
# experts, not a power of two, make DSelect-k's gates sow "reachability").
AUX = {
    "soft_sharing": {"soft_sharing"},
    "adversarial": {"adversarial"},
    "dselect_k": {f"tasks/{t}/gate/reachability" for t in TASKS.names},
}
# Architectures whose task params serve only their task, so that all of an
# absent task's params keep still. Elsewhere only its head must: the
# soft-sharing penalty ties the columns together, cross-stitch units and PLE's
# shared gates feed a task's column or experts to the other tasks, and
# DSelect-k's reachability loss acts on every gate.
PRIVATE_TASK_PARAMS = {"hard_sharing", "mtan", "mmoe", "cgc", "adversarial"}


def _batch(absent=ABSENT):
  rng = np.random.default_rng(0)
  batch = {
      "inputs": rng.normal(size=(B, 8, 8, 1)).astype(np.float32),
      "labels": {
          "left": rng.integers(0, 10, B).astype(np.int32),
          "right": rng.integers(0, 10, B).astype(np.int32),
          "present": (rng.random((B, 10)) < 0.3).astype(np.float32),
          "sum": rng.normal(size=B).astype(np.float32)},
      "masks": {t: np.ones(B, np.float32) for t in TASKS.names},
  }
  batch["masks"]["right"][::2] = 0.0  # a task half labelled
  if absent:
    batch["masks"][absent] = np.zeros(B, np.float32)
    batch["labels"][absent] = np.zeros_like(batch["labels"][absent])
  TASKS.validate_batch(batch)
  return batch


def _head(task_params):
  """The head's params inside a task's params (hard sharing: all of them)."""
  return task_params["head"] if "head" in task_params else task_params


@functools.lru_cache(maxsize=None)
def _setup(name):
  spec = build.ARCHITECTURES[name]
  model = spec.build(TASKS, build.make_trunk("mlp", hidden_sizes=(8,)),
                     input_trunk=True, **SMALL.get(name, {}))
  tx = optax.sgd(0.1)
  w = weighting.static(list(TASKS.static_weights))
  params = state_lib.init_params(model, _batch()["inputs"][:1],
                                 jax.random.PRNGKey(0))
  state = state_lib.create_train_state(params, tx, w, len(TASKS),
                                       jax.random.PRNGKey(1))
  step = jax.jit(step_lib.make_train_step(
      model.apply, TASKS, tx, w, **spec.step_kwargs(input_trunk=True)))
  eval_step = jax.jit(step_lib.make_eval_step(model.apply, TASKS))
  return spec, state, step, eval_step


def _changed(a, b):
  return jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))),
                      a, b)


@pytest.mark.parametrize("name", sorted(build.ARCHITECTURES))
def test_architecture_trains_at_step_level(name):
  spec, state, step, eval_step = _setup(name)
  batch = _batch()
  params = state.params
  assert set(params) == {"shared", "tasks"}
  assert set(params["tasks"]) == set(TASKS.names)

  new_state, metrics = step(state, batch)
  metrics = jax.device_get(metrics)
  assert int(new_state.step) == 1
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
  for task in TASKS.names:
    for key in ("loss", "count", "weight"):
      assert np.isfinite(metrics[f"{task}/{key}"]), (task, key)
  assert metrics[f"{ABSENT}/count"] == 0.0
  assert metrics[f"{ABSENT}/loss"] == 0.0
  assert metrics["right/count"] == B / 2 and metrics["left/count"] == B
  aux = {k[len("aux/"):]: v for k, v in metrics.items() if k.startswith("aux/")}
  assert set(aux) == AUX.get(name, set())
  assert all(v > 0 for v in aux.values()), aux

  # Every shared leaf and every leaf of the labelled tasks moved.
  changed = _changed(params, new_state.params)
  for path, moved in jax.tree_util.tree_leaves_with_path(changed["shared"]):
    assert moved, f"shared{jax.tree_util.keystr(path)} did not move"
  for task in TASKS.names:
    if task == ABSENT:
      continue
    for path, moved in jax.tree_util.tree_leaves_with_path(
        changed["tasks"][task]):
      assert moved, f"tasks/{task}{jax.tree_util.keystr(path)} did not move"
  # The absent task's head got exactly zero gradient: under plain SGD it is
  # bit-identical (and so are all its params where they serve it alone).
  absent_before = params["tasks"][ABSENT]
  absent_after = new_state.params["tasks"][ABSENT]
  if name in PRIVATE_TASK_PARAMS:
    jax.tree.map(np.testing.assert_array_equal, absent_after, absent_before)
  jax.tree.map(np.testing.assert_array_equal, _head(absent_after),
               _head(absent_before))

  # A few steps on the same batch lower its loss; the eval step (train=False)
  # gives finite metrics for every task.
  before = step_lib.finalize(TASKS, eval_step(params, batch))
  trained = new_state
  for _ in range(STEPS - 1):
    trained, m = step(trained, batch)
    assert np.isfinite(float(m["loss"]))
  after = step_lib.finalize(TASKS, eval_step(trained.params, batch))
  labelled = [t for t in TASKS.names if t != ABSENT]
  assert sum(after[f"{t}/loss"] for t in labelled) < sum(
      before[f"{t}/loss"] for t in labelled)
  assert after[f"{ABSENT}/count"] == 0.0
  full = step_lib.finalize(TASKS, eval_step(trained.params, _batch(absent=None)))
  assert set(full) == set(before)
  for task in TASKS.names:
    assert full[f"{task}/count"] == (B / 2 if task == "right" else B)
    assert all(np.isfinite(v) for k, v in full.items()
               if k.startswith(f"{task}/")), task
