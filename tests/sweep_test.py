"""experiments/sweep.py: the grid, its commands, skipping finished runs and
resuming an interrupted one, and the collected table against the
single-task baselines."""

import json
import os

import ml_collections
import pytest

from experiments import sweep as sweep_lib
from experiments.protocols import stats
import train_test  # tests/train_test.py


def _sweep(**extra):
  sweep = ml_collections.ConfigDict({
      "base": "experiments/configs/multi_digits.py",
      "overrides": {"num_steps": 10, "data": {"validation_fraction": 0.1}},
      "method_axis": "method",
      "axes": {"method": {"ew": {"weighting": {"name": "equal"}},
                          "pcgrad": {"aggregation": {"name": "pcgrad"}}},
               "lr": {"a": {"optimizer": {"learning_rate": 0.01}},
                      "b": {"optimizer": {"learning_rate": 0.02}}}},
      "seeds": (0, 1),
      "baselines": True,
  })
  sweep.update(extra)
  return sweep


def test_plan_is_the_product_of_axes_seeds_and_baselines(tmp_path):
  root = str(tmp_path)
  runs = sweep_lib.plan(_sweep(), root, ["left", "sum"])
  # 2 lr groups x 2 seeds x (2 single-task + 2 methods).
  assert len(runs) == 16
  assert len({r.workdir for r in runs}) == 16
  run = next(r for r in runs if r.method == "pcgrad" and r.group == "lr=b"
             and r.seed == 1)
  assert run.workdir == os.path.join(root, "method=pcgrad,lr=b", "seed1")
  assert run.overrides == {"num_steps": 10, "data.validation_fraction": 0.1,
                           "aggregation.name": "pcgrad",
                           "optimizer.learning_rate": 0.02, "seed": 1}
  single = next(r for r in runs if r.method == "single:sum"
                and r.group == "lr=a" and r.seed == 0)
  assert single.workdir == os.path.join(root, "single", "lr=a", "sum",
                                        "seed0")
  assert single.overrides["tasks"] == "sum"
  assert "aggregation.name" not in single.overrides
  assert sweep_lib.command(_sweep(), run).endswith(
      f"--workdir={run.workdir} --config.aggregation.name=pcgrad "
      "--config.data.validation_fraction=0.1 --config.num_steps=10 "
      "--config.optimizer.learning_rate=0.02 --config.seed=1")
  assert sweep_lib.make_config(_sweep(), run).optimizer.learning_rate == 0.02
  with pytest.raises(ValueError, match=r"sweep.method_axis='methods' is not "
                     r"an axis"):
    sweep_lib.plan(_sweep(method_axis="methods"), root, ["left"])


# A fake trainer: results are a function of the run (method, lr, seed,
# task), so the table is known; it can be interrupted once, as a kill would,
# after writing a checkpoint.
ACCURACY = {"ew": 0.80, "pcgrad": 0.84, "single": 0.82}


def _fake_results(config):
  method = ("single" if config.tasks in ("left", "sum") else
            "pcgrad" if config.aggregation.name == "pcgrad" else "ew")
  shift = 0.01 * config.seed + (0.1 if config.optimizer.learning_rate == 0.02
                                else 0.0)
  return {"left/accuracy": ACCURACY[method] + shift,
          "left/loss": 1.0, "left/count": 10.0,
          "sum/mae": 2.0 - ACCURACY[method] - shift, "sum/count": 10.0}


class _Trainer:

  def __init__(self, interrupt_at=None):
    self.calls, self.interrupt_at = [], interrupt_at

  def __call__(self, config, workdir):
    self.calls.append(workdir)
    os.makedirs(os.path.join(workdir, "checkpoints", "5"), exist_ok=True)
    if len(self.calls) == self.interrupt_at:
      raise KeyboardInterrupt("killed")
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"eval": _fake_results(config)}, f)


def test_an_interrupted_sweep_resumes_and_gives_the_uninterrupted_table(
    tmp_path):
  sweep = _sweep()
  straight = str(tmp_path / "straight")
  runs = sweep_lib.plan(sweep, straight, ["left", "sum"])
  sweep_lib.run_all(sweep, runs, _Trainer())
  table = sweep_lib.collect(runs, straight)

  root = str(tmp_path / "interrupted")
  runs = sweep_lib.plan(sweep, root, ["left", "sum"])
  first = _Trainer(interrupt_at=3)
  with pytest.raises(KeyboardInterrupt):
    sweep_lib.run_all(sweep, runs, first)
  second = _Trainer()
  trained = sweep_lib.run_all(sweep, runs, second)
  # The two finished runs are skipped; the interrupted third is trained
  # again in its own workdir (where train.run resumes its checkpoint).
  assert second.calls[0] == first.calls[2]
  assert second.calls == [r.workdir for r in runs[2:]]
  assert [r.workdir for r in trained] == second.calls
  assert sweep_lib.collect(runs, root) == table
  with open(os.path.join(root, "summary.md")) as f:
    resumed_md = f.read()
  with open(os.path.join(straight, "summary.md")) as f:
    assert f.read() == resumed_md
  for name in ("summary_lr=a.csv", "summary_lr=b.csv", "summary_lr=a.png"):
    assert os.path.exists(os.path.join(root, name))

  # Δm% by hand for group lr=a: baselines (single-task, mean over seeds
  # 0 and 1) left/accuracy 0.825, sum/mae 1.175; pcgrad seed s has
  # accuracy 0.84 + 0.01 s and MAE 1.16 - 0.01 s.
  summary = table["lr=a"]["summary"]
  assert table["lr=a"]["baselines"] == pytest.approx(
      {"left/accuracy": 0.825, "sum/mae": 1.175})
  per_seed = [100 / 2 * ((0.84 + 0.01 * s - 0.825) / 0.825
                         + (1.175 - (1.16 - 0.01 * s)) / 1.175)
              for s in (0, 1)]
  expected = stats.mean_ci(per_seed)
  got = summary["pcgrad"]["delta_m"]
  assert (got["mean"], got["lower"], got["upper"]) == pytest.approx(expected)
  assert summary["pcgrad"]["rank"] == 1.0 and summary["ew"]["rank"] == 2.0


def test_collect_names_a_missing_baseline(tmp_path):
  sweep = _sweep()
  runs = sweep_lib.plan(sweep, str(tmp_path), ["left", "sum"])
  trainer = _Trainer()
  sweep_lib.run_all(sweep, [r for r in runs if r.method != "single:sum"],
                    trainer)
  with pytest.raises(ValueError, match=r"no finished single-task baseline "
                     r"for \['sum/mae'\]"):
    sweep_lib.collect(runs, str(tmp_path))


def test_a_tiny_sweep_end_to_end(small_data_dir, tmp_path):
  """Real training: one method and the two single-task baselines."""
  from experiments import train  # pylint: disable=g-import-not-at-top
  base = train_test.tiny_config(small_data_dir)
  sweep = ml_collections.ConfigDict({
      "base": "experiments/configs/multi_digits.py",
      "overrides": {"tasks": "left,sum", "num_steps": 4, "eval_every": 2,
                    "log_every": 2, "checkpoint_every": 2,
                    "batch_size": base.batch_size, "mesh": {"data": 1},
                    "data": {"data_dir": small_data_dir,
                             "options": {"builder_config": "small"},
                             "validation_fraction": 0.2},
                    "select_by": "loss",
                    "model": {"trunk": "mlp", "hidden_sizes": (32,),
                              "head_hidden_sizes": ()},
                    "optimizer": {"schedule": "constant"}},
      "method_axis": "method",
      "axes": {"method": {"ew": {"weighting": {"name": "equal"}}}},
      "seeds": (0,), "baselines": True})
  root = str(tmp_path)
  runs = sweep_lib.plan(sweep, root, sweep_lib._task_names(sweep))
  assert [r.method for r in runs] == ["single:left", "single:sum", "ew"]
  sweep_lib.run_all(sweep, runs, train.run)
  table = sweep_lib.collect(runs, root)
  row = table["all"]["summary"]["ew"]
  assert row["n"] == 1 and set(row["metrics"]) == {
      "left/accuracy", "sum/mae", "sum/rmse"}
  with open(os.path.join(runs[2].workdir, "results.json")) as f:
    results = json.load(f)
  baselines = table["all"]["baselines"]
  assert row["delta_m"]["mean"] == pytest.approx(
      stats.delta_m(results["eval"], baselines))
  # Run again: nothing left to train.
  assert sweep_lib.run_all(sweep, runs, train.run) == []


def test_a_tuning_axis_is_chosen_on_validation_not_on_test(tmp_path):
  sweep = _sweep(tune_axis="lr")
  sweep.overrides.select_by = "loss"
  runs = sweep_lib.plan(sweep, str(tmp_path), ["left", "sum"])
  assert len(runs) == 16  # every lr value is trained
  assert {r.group for r in runs} == {""}

  def trainer(config, workdir):
    results = _fake_results(config)
    # Validation prefers lr 0.01 for ew and the baselines, 0.02 for pcgrad;
    # the test metrics (results["eval"]) always prefer 0.02.
    prefers_b = config.aggregation.name == "pcgrad"
    is_b = config.optimizer.learning_rate == 0.02
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"eval": results, "selection": {
          "select_by": "loss", "value": 1.0 if is_b == prefers_b else 2.0}},
                f)

  sweep_lib.run_all(sweep, runs, trainer)
  table = sweep_lib.collect(runs, str(tmp_path))["all"]
  assert table["tuned"] == {
      "ew/seed0": "a", "ew/seed1": "a", "pcgrad/seed0": "b",
      "pcgrad/seed1": "b", "single:left/seed0": "a",
      "single:left/seed1": "a", "single:sum/seed0": "a",
      "single:sum/seed1": "a"}
  ew = table["summary"]["ew"]["metrics"]["left/accuracy"]
  assert ew["mean"] == pytest.approx(0.805)  # lr a: 0.80 + 0.01 s
  pcgrad = table["summary"]["pcgrad"]["metrics"]["left/accuracy"]
  assert pcgrad["mean"] == pytest.approx(0.945)  # lr b: 0.84 + 0.1 + 0.01 s
  assert table["baselines"]["left/accuracy"] == pytest.approx(0.825)


def test_the_small_data_sweep_pairs_each_fraction_with_its_baselines():
  from experiments.configs.sweeps import small_data  # pylint: disable=g-import-not-at-top
  sweep = small_data.get_config()
  runs = sweep_lib.plan(sweep, "root", sweep_lib._task_names(sweep))
  # Fractions x 3 seeds x (4 single-task models + 1 multi-task model).
  assert len(runs) == len(small_data.FRACTIONS) * 3 * 5
  for run in runs:
    fraction = small_data.FRACTIONS[run.group.split("=")[1]]
    assert run.overrides["data.label_fractions.left"] == fraction
    assert run.overrides["data.validation_fraction"] == 0.1
  assert {r.method for r in runs} == {"multi_task", "single:left",
                                      "single:right", "single:present",
                                      "single:sum"}


def test_every_run_of_the_shipped_sweeps_is_a_valid_config():
  from experiments import train  # pylint: disable=g-import-not-at-top
  from experiments import semi_supervised  # pylint: disable=g-import-not-at-top
  from experiments.configs.sweeps import methods, small_data  # pylint: disable=g-import-not-at-top
  from experiments.configs.sweeps import semi_supervised as ssl_config  # pylint: disable=g-import-not-at-top
  ssl = ssl_config.get_config()
  sweeps = [methods.get_config(), small_data.get_config(),
            semi_supervised.make_sweep(ssl, ssl.tasks.split(","))]
  for sweep in sweeps:
    tasks = sweep_lib._task_names(sweep) if sweep.baselines else []
    for run in sweep_lib.plan(sweep, "root", tasks):
      train.check_config(sweep_lib.make_config(sweep, run))


def _reference_sweep(**extra):
  sweep = _sweep(baselines=False, reference="ew")
  sweep.update(extra)
  return sweep


def test_reference_mode_takes_delta_m_against_the_reference_mean(tmp_path):
  sweep = _reference_sweep()
  root = str(tmp_path)
  runs = sweep_lib.plan(sweep, root, [])
  assert {r.method for r in runs} == {"ew", "pcgrad"}  # no single-task runs

  def trainer(config, workdir):
    # Every method reports a pretext metric; results.json's label_counts
    # name the supervised tasks, so it stays out of Δm.
    results = _fake_results(config)
    results["grid_mask/psnr"] = 20.0 + config.seed
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"eval": results, "label_counts": {"left": 5, "sum": 5}}, f)

  sweep_lib.run_all(sweep, runs, trainer)
  table = sweep_lib.collect(runs, root, reference="ew")
  group = table["lr=a"]
  assert group["reference"] == "ew"
  # ew at lr a, seed s: accuracy 0.80 + 0.01 s, MAE 1.20 - 0.01 s.
  assert group["baselines"] == pytest.approx(
      {"left/accuracy": 0.805, "sum/mae": 1.195})
  per_seed = [100 / 2 * ((0.84 + 0.01 * s - 0.805) / 0.805
                         + (1.195 - (1.16 - 0.01 * s)) / 1.195)
              for s in (0, 1)]
  got = group["summary"]["pcgrad"]["delta_m"]
  assert (got["mean"], got["lower"], got["upper"]) == pytest.approx(
      stats.mean_ci(per_seed))
  assert got["mean"] == pytest.approx(4.1581, abs=1e-4)
  # The reference is listed: mean 0, its CI its own seed spread.
  own = [100 / 2 * ((0.80 + 0.01 * s - 0.805) / 0.805
                    + (1.195 - (1.20 - 0.01 * s)) / 1.195) for s in (0, 1)]
  ref = group["summary"]["ew"]["delta_m"]
  assert ref["mean"] == pytest.approx(0.0, abs=1e-12)
  assert (ref["lower"], ref["upper"]) == pytest.approx(
      stats.mean_ci(own)[1:])
  assert "grid_mask/psnr" in group["summary"]["ew"]["metrics"]
  # Group lr=b has its own reference (ew at lr b: + 0.1 accuracy).
  assert table["lr=b"]["baselines"]["left/accuracy"] == pytest.approx(0.905)
  with open(os.path.join(root, "summary.md")) as f:
    assert "Reference 'ew' (mean over seeds; Δm% against it)" in f.read()


def test_reference_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match=r"sweep.reference='uw' is not a value "
                     r"of the method axis 'method'; values: \['ew', "
                     r"'pcgrad'\]"):
    sweep_lib.plan(_reference_sweep(reference="uw"), str(tmp_path), [])
  with pytest.raises(ValueError, match=r"sweep.reference='ew' and "
                     r"sweep.baselines=True"):
    sweep_lib.plan(_reference_sweep(baselines=True), str(tmp_path),
                   ["left", "sum"])
  sweep = _reference_sweep()
  runs = sweep_lib.plan(sweep, str(tmp_path), [])
  with pytest.raises(ValueError, match=r"reference 'uw' is not a method of "
                     r"the runs"):
    sweep_lib.collect(runs, str(tmp_path), reference="uw")
  sweep_lib.run_all(sweep, [r for r in runs if r.method != "ew"
                            or r.group != "lr=b"], _Trainer())
  with pytest.raises(ValueError, match=r"no finished run of the reference "
                     r"'ew' in group 'lr=b'"):
    sweep_lib.collect(runs, str(tmp_path), reference="ew")


def test_dispatch_runs_prints_or_collects(tmp_path, capsys):
  sweep = _sweep()
  root = str(tmp_path / "root")
  runs = sweep_lib.plan(sweep, root, ["left", "sum"])
  collected = []

  def collect_fn(r, d):
    collected.append((len(r), d))
    return "table"

  trainer = _Trainer()
  sweep_lib.run_all(sweep, runs[:1], trainer)
  assert sweep_lib.dispatch(sweep, runs, collect_fn, root=root,
                            mode="commands") is None
  lines = capsys.readouterr().out.splitlines()
  assert lines == [sweep_lib.command(sweep, r) for r in runs[1:]]
  assert not collected
  assert sweep_lib.dispatch(sweep, runs, collect_fn, root=root,
                            mode="collect", train_fn=trainer) == "table"
  assert len(trainer.calls) == 1  # collect trains nothing
  assert sweep_lib.dispatch(sweep, runs, collect_fn, root=root, mode="run",
                            train_fn=trainer) == "table"
  assert trainer.calls == [r.workdir for r in runs]
  assert collected == [(len(runs), root)] * 2
  with pytest.raises(ValueError, match="sweep mode 'train'"):
    sweep_lib.dispatch(sweep, runs, collect_fn, root=root, mode="train")


def test_protocol_config_defaults_to_the_scripts_own_file():
  path = "experiments/configs/sweeps/semi_supervised.py"
  assert (sweep_lib.protocol_config(path).to_dict()
          == sweep_lib.load_config(path).to_dict())
