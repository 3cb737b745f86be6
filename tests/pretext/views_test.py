"""Pretext tasks in the train step: views, masks, trunk passes, checks.

The step makes each pretext task's view, label and mask from the inputs
(`add_views`); tasks on one view share one trunk pass on every gradient path;
the masks cover exactly the rows the task's `rows` names; a row's corruption
does not depend on how the batch is split over devices.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import aggregation
from mtl_jax import pretext
from mtl_jax import tasks as tasks_lib
from mtl_jax import weighting
from mtl_jax.models import build
from mtl_jax.pretext import views
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib

SHAPE = (8, 8, 1)
B = 8
SUPERVISED = [tasks_lib.classification_task("cls", 3),
              tasks_lib.regression_task("reg")]
# Six tasks on three views: the supervised tasks and the autoencoder read
# the inputs; two tasks share the masked-cell view; rotation has its own.
PRETEXTS = [
    pretext.pretext_task("ae", pretext.reconstruct(), SHAPE, rows="labelled"),
    pretext.pretext_task("cell", pretext.grid_mask((2, 2)), SHAPE),
    pretext.pretext_task("cell_l1", pretext.grid_mask((2, 2)), SHAPE,
                         view="cell", loss="l1"),
    pretext.pretext_task("rot", pretext.rotate(), SHAPE, rows="unlabelled"),
]
TASKS = tasks_lib.TaskSet(SUPERVISED + PRETEXTS)
# Rows 0, 1, 5 are labelled (for some supervised task); 2, 3, 4, 6, 7 are
# the unlabelled pool.
LABELLED = np.array([1, 1, 0, 0, 0, 1, 0, 0], np.float32)


def _batch(seed=0, size=B):
  rng = np.random.default_rng(seed)
  cls_mask = np.zeros(size, np.float32)
  cls_mask[[0, 5]] = 1.0
  reg_mask = np.zeros(size, np.float32)
  reg_mask[[1, 5]] = 1.0
  return {
      "inputs": rng.uniform(size=(size,) + SHAPE).astype(np.float32),
      "labels": {"cls": rng.integers(0, 3, size).astype(np.int32),
                 "reg": rng.normal(size=size).astype(np.float32)},
      "masks": {"cls": cls_mask, "reg": reg_mask},
  }


def _trunk_passes(fn, *args):
  """Forward applications of the trunk in the traced computation of `fn`.

  The trunk (an MLP, `_model`) maps `[B, 64]` rows by a `[64, 16]` kernel:
  each forward application is one `dot_general` of exactly those operand
  shapes (backward products have other shapes). Abstract traces that are
  never run (`eval_shape`, e.g. to find dense layers) are not part of the
  computation and are not counted.
  """
  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general" and [
          tuple(v.aval.shape) for v in eqn.invars] == [(B, 64), (64, 16)]:
        n += 1
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            n += count(sub)
    return n

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def _model(tasks=TASKS, trunk=None):
  return build.make_hard_sharing_model(
      tasks, trunk or build.make_trunk("mlp", hidden_sizes=(16,)),
      head_hidden_sizes=())


def _state(model, tasks=TASKS, aggregator=None, opt=None):
  params = state_lib.init_params(model, _batch()["inputs"],
                                 jax.random.PRNGKey(0))
  return state_lib.create_train_state(
      params, opt or optax.sgd(0.1), weighting.equal(), len(tasks),
      jax.random.PRNGKey(1), aggregator)


@pytest.mark.parametrize("aggregator, options", [
    (None, {}),
    ("upgrad", {"jacobian": "full"}),
    ("upgrad", {"jacobian": "factored"}),
    ("mgda", {"rep_grad": True}),
])
def test_trunk_runs_once_per_distinct_view(aggregator, options):
  model = _model()
  agg = aggregation.get_aggregator(aggregator) if aggregator else None
  state = _state(model, aggregator=agg)
  step = step_lib.make_train_step(model.apply, TASKS, optax.sgd(0.1),
                                  weighting.equal(), aggregator=agg,
                                  encode_decode=True, **options)
  assert TASKS.view_names == ("inputs", "cell", "rot")
  assert _trunk_passes(step, state, _batch()) == 3  # 6 tasks, 3 views


def test_trunk_passes_grow_with_views_not_tasks():
  """Adding tasks on existing views adds no trunk pass; a view adds one."""
  counts = {}
  for name, tasks in {
      "supervised": SUPERVISED,
      "plus_ae": SUPERVISED + PRETEXTS[:1],
      "plus_cell": SUPERVISED + PRETEXTS[:2],
      "plus_cell_l1": SUPERVISED + PRETEXTS[:3],
  }.items():
    tasks = tasks_lib.TaskSet(tasks)
    model = _model(tasks)
    step = step_lib.make_train_step(model.apply, tasks, optax.sgd(0.1),
                                    weighting.equal(), encode_decode=True)
    counts[name] = _trunk_passes(step, _state(model, tasks), _batch())
  assert counts == {"supervised": 1, "plus_ae": 1, "plus_cell": 2,
                    "plus_cell_l1": 2}


def test_masks_cover_the_rows_the_task_names():
  batch = views.add_views(TASKS, _batch(), jax.random.PRNGKey(3))
  masks = {k: np.asarray(v) for k, v in batch["masks"].items()}
  np.testing.assert_array_equal(masks["cell"], np.ones(B))  # pool included
  np.testing.assert_array_equal(masks["cell_l1"], np.ones(B))
  np.testing.assert_array_equal(masks["ae"], LABELLED)
  np.testing.assert_array_equal(masks["rot"], 1.0 - LABELLED)
  # The supervised masks are untouched.
  np.testing.assert_array_equal(masks["cls"], _batch()["masks"]["cls"])
  # Padding rows of an eval batch (valid 0) are left out of every pretext.
  valid = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
  batch = views.add_views(TASKS, {**_batch(), "valid": valid},
                          jax.random.PRNGKey(3))
  np.testing.assert_array_equal(batch["masks"]["cell"], valid)
  np.testing.assert_array_equal(batch["masks"]["rot"],
                                valid * (1.0 - LABELLED))


def test_views_labels_are_the_pretexts_transform_per_row():
  key = jax.random.PRNGKey(4)
  images = jnp.asarray(_batch()["inputs"])
  batch = views.add_views(TASKS, _batch(), key)
  assert set(batch["views"]) == {"cell", "rot"}
  # Row b is the pretext's transform of row b with fold_in(view key, b).
  for b in (0, 5):
    row_key = jax.random.fold_in(views.view_key(key, "rot"), b)
    view, target, _ = pretext.rotate()(row_key, images[b:b + 1])
    np.testing.assert_array_equal(batch["views"]["rot"][b], view[0])
    assert int(batch["labels"]["rot"][b]) == int(target[0])
  # The two tasks on the "cell" view see one view and the same target.
  np.testing.assert_array_equal(batch["labels"]["cell"],
                                batch["labels"]["cell_l1"])
  blanked = np.asarray(batch["views"]["cell"] == 0).reshape(B, -1).sum(1)
  assert np.all(blanked >= 16)  # a 4 x 4 cell of zeros in every row
  # The identity pretext's label is the inputs.
  np.testing.assert_array_equal(batch["labels"]["ae"], images)


def test_views_do_not_depend_on_how_the_batch_is_split():
  key = jax.random.PRNGKey(5)
  whole = views.add_views(TASKS, _batch(), key)
  halves = [views.add_views(TASKS, jax.tree.map(lambda x: x[s], _batch()),
                            key, row_offset=s.start)
            for s in (slice(0, 4), slice(4, 8))]
  joined = jax.tree.map(lambda a, b: np.concatenate([a, b]), *halves)
  jax.tree.map(np.testing.assert_array_equal, joined, whole)


def test_views_are_deterministic_and_change_with_the_step():
  model = _model()
  state = _state(model)
  keys = [step_lib.step_keys(s, None).pretext
          for s in (state, state, state.replace(step=state.step + 1))]
  made = [jax.jit(lambda k: views.add_views(TASKS, _batch(), k))(k)
          for k in keys]
  jax.tree.map(np.testing.assert_array_equal, made[0], made[1])
  assert not np.array_equal(made[0]["views"]["rot"], made[2]["views"]["rot"])
  assert not np.array_equal(made[0]["labels"]["cell"],
                            made[2]["labels"]["cell"])


def test_step_losses_are_the_pretext_losses_on_the_views():
  model = _model()
  state = _state(model)
  step = jax.jit(step_lib.make_train_step(model.apply, TASKS, optax.sgd(0.1),
                                          weighting.equal(),
                                          encode_decode=True))
  _, metrics = step(state, _batch())
  batch = views.add_views(TASKS, _batch(),
                          step_lib.step_keys(state, None).pretext)
  inputs = views.batch_views(TASKS, batch)
  for task in TASKS:
    preds = model.apply({"params": state.params}, inputs[task.view])
    s, c = task.loss(preds[task.name], batch["labels"][task.name],
                     batch["masks"][task.name])
    np.testing.assert_allclose(metrics[f"{task.name}/loss"], s / max(c, 1),
                               rtol=1e-5, err_msg=task.name)
    np.testing.assert_allclose(metrics[f"{task.name}/count"], c)
  # ae: the 3 labelled rows; rot: the 5 pool rows; cell: all 8.
  assert [float(metrics[f"{t}/count"]) for t in ("ae", "rot", "cell")] == [
      3.0, 5.0, 8.0]


def test_eval_step_scores_pretexts_on_real_rows_only():
  model = _model()
  state = _state(model)
  eval_step = jax.jit(step_lib.make_eval_step(model.apply, TASKS))
  valid = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
  stats = eval_step(state.params, {**_batch(), "valid": valid})
  out = step_lib.finalize(TASKS, stats)
  # Every real row, whichever rows the pretext trains on.
  assert out["cell/count"] == out["rot/count"] == out["ae/count"] == 6.0
  # The same views at every evaluation: a fixed key.
  again = step_lib.finalize(TASKS, eval_step(state.params,
                                             {**_batch(), "valid": valid}))
  assert out == again
  # The PSNR is the metric of the views made from the eval key.
  batch = views.add_views(TASKS, {**_batch(), "valid": valid},
                          jax.random.PRNGKey(views.EVAL_SEED))
  pred = model.apply({"params": state.params}, batch["views"]["cell"])["cell"]
  mse = np.mean((np.asarray(pred) - np.asarray(batch["labels"]["cell"])) ** 2,
                axis=(1, 2, 3))[:6]
  np.testing.assert_allclose(out["cell/psnr"], np.mean(-10 * np.log10(mse)),
                             rtol=1e-4)


# ----------------------------------------------------------------------------
# Bad input, named before training.


def test_validate_batch_rejects_pretext_labels_in_the_batch():
  TASKS.validate_batch(_batch())  # supervised entries only: fine
  bad = _batch()
  bad["labels"]["cell"] = np.zeros((B, 4, 4, 1), np.float32)
  with pytest.raises(ValueError, match=r"pretext task\(s\) \['cell'\].*made "
                     "in the train step"):
    TASKS.validate_batch(bad)


@pytest.mark.parametrize("task, shape, message", [
    (pretext.pretext_task("cell", pretext.grid_mask((2, 2)), (8, 8, 1)),
     (9, 8, 1), r"grid 2 x 2 does not divide the image"),
    (pretext.pretext_task("colour", pretext.colourise(), (8, 8, 3)),
     (8, 8, 1), r"colourisation needs RGB images"),
    (pretext.pretext_task("sr", pretext.super_resolve(4), (8, 8, 1)),
     (2, 8, 1), r"factor 4 is larger than the image"),
])
def test_check_pretexts_names_the_problem(task, shape, message):
  tasks = tasks_lib.TaskSet(SUPERVISED + [task])
  with pytest.raises(ValueError, match=rf"pretext task {task.name!r}: "
                     rf".*{message}"):
    tasks.check_pretexts(shape)
  batch = _batch()
  batch["inputs"] = np.zeros((B,) + shape, np.float32)
  with pytest.raises(ValueError, match=message):
    tasks.validate_batch(batch)


def test_pretext_task_rejects_inputs_it_cannot_run_on():
  with pytest.raises(ValueError, match=r"pretext task 'colour': colourise: "
                     "colourisation needs RGB"):
    pretext.pretext_task("colour", pretext.colourise(), (8, 8, 1))
  with pytest.raises(ValueError, match=r"grid_mask: grid 3 x 3 does not "
                     "divide"):
    pretext.pretext_task("cell", pretext.grid_mask((3, 3)), (8, 8, 1))
  with pytest.raises(ValueError, match=r"unknown loss 'huber'.*mse, l1"):
    pretext.pretext_task("ae", pretext.reconstruct(), SHAPE, loss="huber")
  with pytest.raises(ValueError, match=r"classification; loss='l1'"):
    pretext.pretext_task("rot", pretext.rotate(), SHAPE, loss="l1")
  with pytest.raises(ValueError, match=r"unknown rows 'pool'; valid: all, "
                     "labelled, unlabelled"):
    pretext.pretext_task("ae", pretext.reconstruct(), SHAPE, rows="pool")


def test_target_that_does_not_fit_the_head_is_named():
  cell = pretext.pretext_task("cell", pretext.grid_mask((2, 2)), SHAPE)
  wrong = dataclasses.replace(cell, output_shape=(4, 4, 3),
                              label_shape=(4, 4, 3))
  tasks = tasks_lib.TaskSet(SUPERVISED + [wrong])
  with pytest.raises(ValueError, match=r"pretext task 'cell': the grid_mask "
                     r"target of inputs \(8, 8, 1\) has shape \(4, 4, 1\), "
                     r"which does not fit .*label shape \(4, 4, 3\)"):
    tasks.check_pretexts(SHAPE)
  # Built for other inputs (16 x 16): the head is too big for 8 x 8 images.
  big = pretext.pretext_task("cell", pretext.grid_mask((2, 2)), (16, 16, 1))
  with pytest.raises(ValueError, match=r"has shape \(4, 4, 1\).*head output "
                     r"shape \(8, 8, 1\)"):
    tasks_lib.TaskSet([big]).check_pretexts(SHAPE)


def test_views_must_be_made_one_way():
  with pytest.raises(ValueError, match=r"'cell' and 'cell3' both read view "
                     "'cell' but apply different corruptions"):
    tasks_lib.TaskSet([PRETEXTS[1], pretext.pretext_task(
        "cell3", pretext.grid_mask((2, 2), fill=0.5), SHAPE, view="cell")])
  with pytest.raises(ValueError, match=r"reads view 'denoised', which no "
                     r"pretext task makes; views: inputs, cell"):
    tasks_lib.TaskSet([PRETEXTS[1], dataclasses.replace(
        SUPERVISED[0], view="denoised")])
  with pytest.raises(ValueError, match=r"corrupts its inputs, so it cannot "
                     "read the 'inputs' view"):
    pretext.pretext_task("cell", pretext.grid_mask((2, 2)), SHAPE,
                         view="inputs")
  with pytest.raises(ValueError, match=r"rows='labelled' is for pretext "
                     "tasks"):
    dataclasses.replace(SUPERVISED[0], rows="labelled")


def test_a_supervised_task_may_read_a_pretext_view():
  """E.g. a classifier trained on denoised inputs: it reads the view, its
  labels still come from the batch."""
  tasks = tasks_lib.TaskSet([
      dataclasses.replace(SUPERVISED[0], view="noisy"), SUPERVISED[1],
      pretext.pretext_task("noisy", pretext.denoise(0.3), SHAPE)])
  model = _model(tasks)
  state = _state(model, tasks)
  step = jax.jit(step_lib.make_train_step(model.apply, tasks, optax.sgd(0.1),
                                          weighting.equal(),
                                          encode_decode=True))
  _, metrics = step(state, _batch())
  batch = views.add_views(tasks, _batch(),
                          step_lib.step_keys(state, None).pretext)
  preds = model.apply({"params": state.params}, batch["views"]["noisy"])
  s, c = tasks[0].loss(preds["cls"], batch["labels"]["cls"],
                       batch["masks"]["cls"])
  np.testing.assert_allclose(metrics["cls/loss"], s / c, rtol=1e-5)
