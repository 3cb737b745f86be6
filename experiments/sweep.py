r"""Sweeps a grid of runs against single-task baselines (or a reference
method) and reports Δm%.

  python -m experiments.sweep --sweep=experiments/configs/sweeps/methods.py \
      --root=runs/sweep_methods [--mode=run|commands|collect]

The sweep config (an ml_collections file, see
`experiments/configs/sweeps/methods.py`) names a base experiment config, the
overrides common to every run, the axes of the grid and the seeds:

  base        the experiment config file (`experiments/configs/...`);
  overrides   the fields every run sets (budget, data, model), nested like
              the experiment config (`{"data": {"data_dir": ...}}`);
  axes        `{axis: {value name: overrides}}`; the grid is their
              product; `method_axis` names the axis whose values are the
              compared methods (weighting/aggregation/architecture ...);
              `tune_axis` (optional) names an axis of hyperparameters that
              are tuned, not compared: every value is trained, and each
              method (and baseline) at each seed is reported with the value
              whose run reached the best validation value of
              `overrides.select_by` (never the test split);
  seeds       the seeds (`config.seed`) of every grid point;
  baselines   True: also train one single-task model per task (same base,
              overrides and non-method axes; `tasks=<task>`) per seed;
  reference   (optional, "" = none) a value of the method axis: Δm% of
              every method is taken against that method's mean over seeds
              in the same group instead of against single-task baselines
              (e.g. "supervised only" against its pretext variants). The
              reference stays in the table: its own Δm% has mean 0 (Δm is
              linear in the metrics) and its CI shows its seed spread, the
              yardstick for the others' intervals. Exclusive with
              `baselines=True` (one yardstick per table: a ValueError).

Runs live in `<root>/<axis=value,...>/seed<k>` and
`<root>/single/<axis=value,...>/<task>/seed<k>` (one workdir each). Modes:

  run       trains every run in turn: a finished run (results.json) is
            skipped, an interrupted one resumes from its checkpoint; then
            collects.
  commands  prints one `python -m experiments.train ...` line per run not
            yet finished (e.g. for a SLURM job array: line
            $SLURM_ARRAY_TASK_ID), then `collect` gathers the results.
  collect   reads the finished runs' results.json and writes, per
            combination of the non-method axes, `summary.csv`, `summary.md`
            and `summary.png` under `<root>`: each method's test metrics as
            mean and 95% confidence interval over seeds, Δm% against the
            single-task baselines or the reference
            (`experiments.protocols.stats`) and the methods' ranks.

Protocol scripts built on the sweep (`semi_supervised.py`, `grid_cells.py`)
plan their runs and hand them to `dispatch`, which does the mode's work and
calls their own collect.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import shlex
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import ml_collections

from experiments.protocols import stats

_SWEEP = config_flags.DEFINE_config_file(
    "sweep", None, "Sweep config file (see experiments/configs/sweeps/).")
ROOT = flags.DEFINE_string("root", None, "Directory of the sweep's runs.")
# Shared with the protocol scripts built on the sweep (semi_supervised.py).
MODE = flags.DEFINE_enum("mode", "run", ["run", "commands", "collect"],
                         "Train the runs, print their commands, or only "
                         "collect the finished ones.")
# The protocol scripts built on the sweep (semi_supervised.py, grid_cells.py,
# pretrain_finetune.py, relatedness.py) read their config file from
# --protocol; each has its own default (`protocol_config`).
PROTOCOL = config_flags.DEFINE_config_file(
    "protocol", None, "A protocol script's config file "
    "(experiments/configs/sweeps/<protocol>.py; default: the script's own).")

RESULTS = "results.json"
SINGLE = "single"


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the sweep."""

  workdir: str
  method: str  # the method axis's value name, or "single:<task>"
  group: str  # the other axes' values, "axis=value,..." ("" without)
  seed: int
  overrides: dict[str, Any]  # on top of the base config
  tune: str = ""  # the tuning axis's value ("" without one)

  @property
  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, RESULTS))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """`{"a": {"b": 1}}` -> `{"a.b": 1}` (config overrides as nested dicts)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _group_name(values: Sequence[tuple[str, str]]) -> str:
  return ",".join(f"{a}={v}" for a, v in values)


def plan(sweep: ml_collections.ConfigDict, root: str,
         task_names: Sequence[str]) -> list[Run]:
  """Every run of the sweep, the baselines first.

  Args:
    sweep: the sweep config (module docstring).
    root: the sweep's directory.
    task_names: the supervised tasks (for the single-task baselines).

  Raises:
    ValueError: no method axis, an unknown `method_axis`, or an empty axis.
  """
  axes = {a: {name: flatten(o) for name, o in values.items()}
          for a, values in sweep.axes.items()}
  if sweep.method_axis not in axes:
    raise ValueError(f"sweep.method_axis={sweep.method_axis!r} is not an "
                     f"axis; axes: {sorted(axes)}")
  for axis, values in axes.items():
    if not values:
      raise ValueError(f"sweep axis {axis!r} has no values")
  tune_axis = sweep.get("tune_axis", "")
  if tune_axis and (tune_axis not in axes or tune_axis == sweep.method_axis):
    raise ValueError(f"sweep.tune_axis={tune_axis!r} must be an axis other "
                     f"than the method axis; axes: {sorted(axes)}")
  if tune_axis and not flatten(sweep.overrides).get("select_by"):
    raise ValueError("sweep.tune_axis picks each run's value on the "
                     "validation split: set overrides.select_by")
  check_reference(sweep)
  tunes = list(axes[tune_axis].items()) if tune_axis else [("", {})]
  others = [a for a in axes if a not in (sweep.method_axis, tune_axis)]
  common = flatten(sweep.overrides)
  runs = []
  for combo in itertools.product(*(axes[a].items() for a in others)):
    group = _group_name([(a, name) for a, (name, _) in zip(others, combo)])
    fixed = dict(common)
    for _, values in combo:
      fixed.update(values)
    for seed, (tune, tuned) in itertools.product(sweep.seeds, tunes):
      tune_dir = _group_name([(tune_axis, tune)]) if tune else ""
      if sweep.baselines:
        for task in task_names:
          runs.append(Run(
              os.path.join(root, SINGLE, group or "_", task, tune_dir,
                           f"seed{seed}"),
              f"single:{task}", group, seed,
              {**fixed, **tuned, "tasks": task, "seed": seed}, tune))
      for name, values in axes[sweep.method_axis].items():
        key = _group_name([(sweep.method_axis, name)])
        runs.append(Run(
            os.path.join(root, ",".join(p for p in (key, tune_dir, group)
                                        if p), f"seed{seed}"),
            name, group, seed, {**fixed, **tuned, **values, "seed": seed},
            tune))
  return runs


def check_reference(sweep: ml_collections.ConfigDict) -> str:
  """`sweep.reference` ("" without one), checked.

  Raises:
    ValueError: a reference that is no value of the method axis, or a
      reference together with `baselines=True`.
  """
  reference = sweep.get("reference", "") or ""
  if not reference:
    return ""
  values = sorted(sweep.axes[sweep.method_axis].keys())
  if reference not in values:
    raise ValueError(f"sweep.reference={reference!r} is not a value of the "
                     f"method axis {sweep.method_axis!r}; values: {values}")
  if sweep.baselines:
    raise ValueError(f"sweep.reference={reference!r} and sweep.baselines="
                     "True: Δm% is taken against one of them; set "
                     "baselines=False (or drop the reference)")
  return reference


def make_config(sweep: ml_collections.ConfigDict, run: Run
                ) -> ml_collections.ConfigDict:
  """The run's experiment config: the base file with its overrides."""
  config = load_config(sweep.base)
  config.update_from_flattened_dict(run.overrides)
  return config


def protocol_config(default: str) -> ml_collections.ConfigDict:
  """The `--protocol` config, or `default`'s (a config file path; also
  when the flags are not parsed, e.g. from a notebook)."""
  if flags.FLAGS.is_parsed() and PROTOCOL.value is not None:
    return PROTOCOL.value
  return load_config(default)


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of an experiment config file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"sweep.base config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location("sweep_base_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _flag_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_flag_value(v) for v in value) + ("," if len(value)
                                                           == 1 else "") + ")"
  return str(value)


def command(sweep: ml_collections.ConfigDict, run: Run) -> str:
  """The shell command that trains `run` (`python -m experiments.train`)."""
  args = [sys.executable, "-m", "experiments.train", f"--config={sweep.base}",
          f"--workdir={run.workdir}"]
  args += [f"--config.{k}={_flag_value(v)}" for k, v in
           sorted(run.overrides.items())]
  return " ".join(shlex.quote(a) for a in args)


def run_all(sweep: ml_collections.ConfigDict, runs: Sequence[Run],
            train_fn: Callable[[ml_collections.ConfigDict, str], Any]
            ) -> list[Run]:
  """Trains the unfinished runs in order (`train_fn(config, workdir)`, e.g.
  `experiments.train.run`, which resumes a workdir with a checkpoint);
  returns the runs it trained."""
  trained = []
  todo = [r for r in runs if not r.finished]
  logging.info("sweep: %d runs, %d finished, %d to train", len(runs),
               len(runs) - len(todo), len(todo))
  for i, run in enumerate(todo):
    logging.info("sweep run %d/%d: %s", i + 1, len(todo), run.workdir)
    train_fn(make_config(sweep, run), run.workdir)
    trained.append(run)
  return trained


def _results(run: Run) -> dict[str, Any]:
  with open(os.path.join(run.workdir, RESULTS)) as f:
    return json.load(f)


def _read(run: Run) -> dict[str, float]:
  return _results(run)["eval"]


def choose_tuned(runs: Sequence[Run]) -> list[Run]:
  """One run per (method, group, seed): with a tuning axis, the value whose
  run selected the best validation value (`results["selection"]`, the
  direction of its `select_by`); the test split plays no part."""
  chosen = {}
  for run in runs:
    key = (run.method, run.group, run.seed)
    if not run.tune:
      chosen[key] = run
      continue
    selection = _results(run)["selection"]
    lower = stats.lower_is_better("x/" + selection["select_by"].rsplit(
        "/", 1)[-1])
    value = selection["value"] if lower else -selection["value"]
    if key not in chosen or value < chosen[key][0]:
      chosen[key] = (value, run)
  return [v[1] if isinstance(v, tuple) else v for v in chosen.values()]


def metric_keys(results: Mapping[str, float]) -> list[str]:
  """The task metrics of a results dict (not losses or counts)."""
  return sorted(k for k in results
                if k.rsplit("/", 1)[-1] not in ("loss", "count"))


def collect(runs: Sequence[Run], root: str, reference: str = ""
            ) -> dict[str, Any]:
  """Summaries of the finished runs, per group; writes summary.{csv,md,png}.

  Δm% of each method run is taken against the mean over seeds of the
  single-task baselines of its group (each task's metrics from the model
  trained on that task alone); with a `reference` method, against the
  reference's mean over seeds in the group, over the supervised tasks'
  metrics that every method reports (a run's supervised tasks: the keys of
  its results.json `label_counts`; pretext metrics are not in Δm, as with
  single-task baselines); with neither, no Δm.

  Args:
    runs: the sweep's runs (`plan`); unfinished ones are left out.
    root: where the summaries go.
    reference: a method name of `runs` ("" = single-task baselines).

  Returns:
    `{group: {"summary": stats.summarize(...), "baselines": {key: value} or
    None, ["reference": name], ["tuned": ...]}}`.

  Raises:
    ValueError: a reference no run has, or a group without a finished run
      of the reference (or of a planned single-task baseline).
  """
  if reference and reference not in {r.method for r in runs}:
    raise ValueError(f"sweep collect: reference {reference!r} is not a "
                     f"method of the runs: {sorted({r.method for r in runs})}")
  finished = [r for r in runs if r.finished]
  missing = len(runs) - len(finished)
  if missing:
    logging.warning("sweep collect: %d of %d runs are not finished; they "
                    "are left out", missing, len(runs))
  out: dict[str, Any] = {}
  lines = []
  finished = choose_tuned(finished)
  for group in sorted({r.group for r in runs}):
    members = [r for r in finished if r.group == group]
    singles = [r for r in members if r.method.startswith("single:")]
    methods = [r for r in members if not r.method.startswith("single:")]
    if not methods:
      continue
    # The metrics every method run reports (pretext metrics only where all
    # have the pretext).
    keys = sorted(set.intersection(*(set(metric_keys(_read(r)))
                                     for r in methods)))
    planned = {r.method.split(":", 1)[1] for r in runs
               if r.group == group and r.method.startswith("single:")}
    if reference:
      baselines = _reference_means(methods, keys, reference, group)
    else:
      baselines = _baselines(singles, keys, planned)
    entries = [{"method": r.method, "seed": r.seed, "metrics": _read(r)}
               for r in methods]
    summary = stats.summarize(entries, baselines, keys)
    out[group or "all"] = {"summary": summary, "baselines": baselines}
    if reference:
      out[group or "all"]["reference"] = reference
    if any(r.tune for r in members):
      out[group or "all"]["tuned"] = {
          f"{r.method}/seed{r.seed}": r.tune for r in members}
    lines += [f"## {group or 'all runs'}", "",
              stats.to_markdown(summary, keys), ""]
    if baselines:
      what = (f"Reference {reference!r} (mean over seeds; Δm% against it)"
              if reference else "Single-task baselines (mean over seeds)")
      lines += [f"{what}: " + ", ".join(
          f"{k} {v:.4g}" for k, v in sorted(baselines.items())), ""]
    suffix = f"_{group}" if group else ""
    stats.to_csv(summary, keys, os.path.join(root, f"summary{suffix}.csv"))
    _plot(summary, keys, os.path.join(root, f"summary{suffix}.png"),
          group or "all runs",
          f"Δm% vs {reference}" if reference else "Δm% vs single-task")
  with open(os.path.join(root, "summary.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(root, "summary.json"), "w") as f:
    json.dump(out, f, indent=2, sort_keys=True, default=float)
  return out


def _baselines(singles: Sequence[Run], keys: Sequence[str], tasks: set[str]
               ) -> dict[str, float] | None:
  """`{key: mean over seeds}` of each task's single-task model (`tasks`:
  those the sweep plans a single-task model for)."""
  if not tasks:
    return None
  values: dict[str, list[float]] = {}
  for run in singles:
    task = run.method.split(":", 1)[1]
    for key, value in _read(run).items():
      if key in keys and key.split("/", 1)[0] == task:
        values.setdefault(key, []).append(value)
  # Every supervised task's metrics (a pretext has no single-task model).
  missing = sorted(k for k in keys if k.split("/", 1)[0] in tasks
                   and k not in values)
  if missing:
    raise ValueError(f"sweep collect: no finished single-task baseline for "
                     f"{missing}")
  return {k: sum(v) / len(v) for k, v in values.items()}


def _reference_means(methods: Sequence[Run], keys: Sequence[str],
                     reference: str, group: str) -> dict[str, float]:
  """`{key: mean over seeds}` of the reference method's runs in a group,
  over the supervised tasks' keys (results.json's `label_counts`; all of
  `keys` for results without it)."""
  runs = [r for r in methods if r.method == reference]
  if not runs:
    raise ValueError(f"sweep collect: no finished run of the reference "
                     f"{reference!r} in group {group or 'all'!r}")
  results = [_results(r) for r in runs]
  supervised = [k for k in keys if all(
      "label_counts" not in res or k.split("/", 1)[0] in res["label_counts"]
      for res in results)]
  if not supervised:
    raise ValueError(f"sweep collect: the reference {reference!r} shares no "
                     f"supervised task metric with the other methods "
                     f"(common metrics: {list(keys)})")
  return {k: sum(res["eval"][k] for res in results) / len(results)
          for k in supervised}


def _plot(summary: Mapping[str, Any], keys: Sequence[str], path: str,
          title: str, delta_label: str = "Δm% vs single-task") -> None:
  """Δm% (or the first metric without baselines) per method with its 95%
  confidence interval."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  methods = sorted(summary, key=lambda m: summary[m]["rank"])
  use_delta = all("delta_m" in summary[m] for m in methods)
  label = delta_label if use_delta else keys[0]
  stat = [summary[m]["delta_m"] if use_delta else
          summary[m]["metrics"][keys[0]] for m in methods]
  means = [s["mean"] for s in stat]
  errors = [[s["mean"] - s["lower"] if s["lower"] == s["lower"] else 0
             for s in stat],
            [s["upper"] - s["mean"] if s["upper"] == s["upper"] else 0
             for s in stat]]
  fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 3.5))
  ax.bar(range(len(methods)), means, yerr=errors, capsize=4, color="C0")
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
  ax.set(ylabel=label, title=f"{title} (95% CI over seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _task_names(sweep: ml_collections.ConfigDict) -> list[str]:
  base = load_config(sweep.base)
  base.update_from_flattened_dict(flatten(sweep.overrides))
  names = [t.strip() for t in base.tasks.split(",") if t.strip()]
  if not names:
    raise ValueError("sweep: the base config must name its tasks "
                     "(config.tasks) for the single-task baselines")
  return names


def dispatch(sweep: ml_collections.ConfigDict, runs: Sequence[Run],
             collect_fn: Callable[[Sequence[Run], str], Any], *,
             root: str | None = None, mode: str | None = None,
             train_fn: Callable[[ml_collections.ConfigDict, str], Any]
             | None = None) -> Any:
  """Does the mode's work on the planned runs (module docstring).

  Args:
    sweep: the sweep config the runs were planned from.
    runs: `plan(sweep, ...)`.
    collect_fn: `(runs, root) -> result`, the protocol's collect.
    root: the sweep's directory (default: `--root`).
    mode: run | commands | collect (default: `--mode`).
    train_fn: `(config, workdir)`, the trainer (default:
      `experiments.train.run`).

  Returns:
    `collect_fn`'s result; None in the commands mode (which prints one
    command per unfinished run and collects nothing).
  """
  root = ROOT.value if root is None else root
  mode = MODE.value if mode is None else mode
  if mode not in ("run", "commands", "collect"):
    raise ValueError(f"sweep mode {mode!r}: valid modes are run, commands, "
                     "collect")
  if mode == "commands":
    for run in runs:
      if not run.finished:
        print(command(sweep, run))
    return None
  if mode == "run":
    if train_fn is None:
      from experiments import train  # pylint: disable=g-import-not-at-top
      train_fn = train.run
    run_all(sweep, runs, train_fn)
  os.makedirs(root, exist_ok=True)
  return collect_fn(runs, root)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SWEEP.value is None or not ROOT.value:
    raise app.UsageError("--sweep and --root are required")
  sweep, root = _SWEEP.value, ROOT.value
  runs = plan(sweep, root, _task_names(sweep))
  reference = check_reference(sweep)
  if dispatch(sweep, runs, lambda r, d: collect(r, d, reference),
              root=root) is None:
    return
  with open(os.path.join(root, "summary.md")) as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main)
