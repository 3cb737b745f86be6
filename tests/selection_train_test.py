"""experiments/train.py with a validation split: evaluations on validation
rows, model selection on them, and the test split evaluated once, at the
end, with the selected params (also after a resume)."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import train
from mtl_jax.training import checkpoint as checkpoint_lib
from mtl_jax.training import evaluate as evaluate_lib
import train_test  # tests/train_test.py

SELECT = {"data.validation_fraction": 0.2, "select_by": "left/accuracy",
          "eval_every": 2, "checkpoint_every": 2,
          "max_checkpoints_to_keep": 10, "mesh.data": 1}


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def _params(directory, step):
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    return ckpt.read(step)["params"]
  finally:
    ckpt.close()


def test_selection_on_validation_and_one_test_evaluation_at_the_end(
    small_data_dir, tmp_path, monkeypatch):
  calls = []  # which stream each evaluation reads, in order
  real = evaluate_lib.make_evaluate

  def spy(apply_fn, tasks, batches, **kwargs):
    evaluate = real(apply_fn, tasks, batches, **kwargs)
    kind = ("validation" if all(c.name.endswith("/validation")
                                for c in batches.components) else "test")

    def counted(params):
      calls.append(kind)
      return evaluate(params)
    return counted

  monkeypatch.setattr(evaluate_lib, "make_evaluate", spy)
  workdir = str(tmp_path / "run")
  results = train.run(train_test.tiny_config(small_data_dir, **SELECT),
                      workdir)
  # Four validation evaluations (steps 2, 4, 6, 8), then the test split once.
  assert calls == ["validation"] * 4 + ["test"]
  records = _records(workdir)
  assert {r["split"] for r in records} == {"train", "validation", "test"}
  assert [r["step"] for r in records if r["split"] == "test"] == [8]
  validation = [r for r in records if r["split"] == "validation"]
  accuracies = [r["left/accuracy"] for r in validation]
  best = validation[int(np.argmax(accuracies))]  # the first of equal ones
  selection = results["selection"]
  assert selection["step"] == best["step"]
  assert selection["value"] == pytest.approx(max(accuracies))
  assert results["validation"]["left/accuracy"] == pytest.approx(
      accuracies[-1])
  # The tested params are the selected step's, bit for bit; the test
  # metrics are theirs.
  best_params = _params(os.path.join(workdir, "best"), best["step"])
  jax.tree.map(np.testing.assert_array_equal, best_params,
               _params(os.path.join(workdir, "checkpoints"), best["step"]))
  test = [r for r in records if r["split"] == "test"][0]
  assert {k: test[k] for k in results["eval"]} == pytest.approx(
      results["eval"])
  exp = train.build_experiment(train_test.tiny_config(small_data_dir,
                                                      **SELECT))
  expected = real(exp.model.apply, exp.tasks, exp.eval_stream)(best_params)
  assert results["eval"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
  assert results["validation_counts"]["left"] > 0
  # Resumed half-way, the selection continues: the same record and test.
  resumed_dir = str(tmp_path / "resumed")
  train.run(train_test.tiny_config(small_data_dir, num_steps=4, **SELECT),
            resumed_dir)
  resumed = train.run(train_test.tiny_config(small_data_dir, **SELECT),
                      resumed_dir)
  got, want = resumed["selection"], results["selection"]
  assert (got["step"], got["select_by"]) == (want["step"], want["select_by"])
  assert got["value"] == pytest.approx(want["value"])
  assert got["validation"] == pytest.approx(want["validation"], rel=1e-6)
  assert resumed["eval"] == pytest.approx(results["eval"], rel=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"select_by": "left/accuracy"},
     r"config.select_by='left/accuracy' selects on the validation split: set "
     r"config.data.validation_fraction > 0"),
    ({"select_by": "accuracy", "data.validation_fraction": 0.1},
     r"expected 'loss' or a '<task>/<metric>' key"),
    ({"data.validation_fraction": 1.0},
     r"config.data.validation_fraction must be in \[0, 1\), got 1.0"),
])
def test_selection_config_errors(overrides, message):
  from experiments.configs import multi_digits as md_config
  config = md_config.get_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=message):
    train.check_config(config)
