r"""Pre-train on the pretexts, then fine-tune (full or probe) vs from scratch.

  python -m experiments.pretrain_finetune \
      --protocol=experiments/configs/sweeps/pretrain_finetune.py \
      --root=runs/pretrain_finetune [--mode=run|commands|collect]

Stage 1, per seed: one pre-training run (`<root>/pretrain/seed<k>`) on
every training image: the pretexts of `config.pretrain_base` (e.g.
`multi_digits_ssl.py`) plus the supervised tasks `config.pretrain_tasks`
("none": the pretexts only) with `config.pretrain_label_fraction` of their
labels. It gets `config.overrides` (data, model, batch size), then no
validation split or selection (the fine-tune runs start from its last
checkpoint), then `config.pretrain_overrides` (its own budget).

Stage 2, per seed and label fraction (the same fraction of each downstream
task's training labels, `config.tasks` on `config.base`), the arms of
`config.arms`, all with the same budget, data and tuning:

  scratch        random initialisation (the baseline of Δm%);
  finetune       `init_from` the seed's pre-training run: the shared params
                 and the heads of the tasks seen at pre-training restored,
                 the other heads initialised; everything trains;
  probe          the same start, the shared trunk frozen
                 (`optimizer.freeze="shared/*"`): only the heads train;
  finetune_lr01  (optional) finetune with the trunk at a tenth of the
                 heads' learning rate.

The validation split of `config.overrides` selects each run's step
(`select_by`), and the optional tuning axis `config.tune` its
hyperparameters, for every arm alike (`experiments/sweep.py`); the test
split is evaluated once per run.

Every run has its own workdir: a finished one (results.json) is skipped, an
interrupted one resumes. Modes (`--mode`):

  run       trains stage 1, then stage 2, then collects;
  commands  prints one `python -m experiments.train ...` line per unfinished
            pre-training run, then per unfinished stage-2 run of the seeds
            whose pre-training run is finished (stderr names the seeds that
            wait): run it once before anything is trained (the stage-1 job
            array) and again once stage 1 is done (the stage-2 array);
  collect   reads the finished stage-2 runs.

`collect` writes the sweep's tables (groups: label fractions, methods: arms;
`summary*.{csv,md,png}`, `summary.json`) and `pretrain_finetune.json`,
`.md` and `.png`: per downstream task metric (each task marked seen or unseen
at pre-training) each arm's test mean and 95% CI over seeds against the label
fraction, and the gain of each arm over scratch: Δm% (`stats.delta_m`) of an
arm's run against the scratch run of the same seed and fraction, then mean
and 95% CI over seeds, over all tasks' metrics and over those of the seen and
of the unseen tasks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

from absl import app
import ml_collections

from experiments import semi_supervised
from experiments import sweep as sweep_lib
from experiments.protocols import stats

# The default of --protocol (`sweep_lib.PROTOCOL`).
DEFAULT_PROTOCOL = "experiments/configs/sweeps/pretrain_finetune.py"

PRETRAIN = "pretrain"
SCRATCH = "scratch"
NO_TASKS = "none"  # experiments.train.NO_TASKS
# Each arm: (starts from the seed's pre-training run, its overrides).
ARMS = {
    SCRATCH: (False, {}),
    "finetune": (True, {}),
    "probe": (True, {"optimizer": {"freeze": "shared/*"}}),
    "finetune_lr01": (True, {"optimizer": {"lr_scales": "shared/*=0.1"}}),
}
# Set per run by the protocol, not by the overrides.
_PROTOCOL_FIELDS = ("tasks", "seed", "init_from", "init_from_step")
# What the two stages must share for the trunk to move over.
_SHARED_FIELDS = ("model", "data.name", "data.options")
# The tables and curves of semi_supervised.py (metric x label fraction,
# one column / line per arm).
_markdown = semi_supervised._markdown  # pylint: disable=protected-access
_plot = semi_supervised._plot  # pylint: disable=protected-access


def _names(value: str, field: str) -> list[str]:
  names = [t.strip() for t in value.split(",") if t.strip()]
  if len(set(names)) != len(names):
    raise ValueError(f"{field}={value!r} names a task twice")
  return names


def downstream_tasks(config: ml_collections.ConfigDict) -> list[str]:
  """The fine-tuned tasks (`config.tasks`)."""
  tasks = _names(config.tasks, "config.tasks")
  if not tasks or NO_TASKS in tasks:
    raise ValueError(f"config.tasks={config.tasks!r}: name the downstream "
                     "tasks")
  return tasks


def pretrain_tasks(config: ml_collections.ConfigDict) -> list[str]:
  """The supervised tasks of the pre-training runs ([] for "none")."""
  if config.pretrain_tasks.strip() in ("", NO_TASKS):
    return []
  tasks = _names(config.pretrain_tasks, "config.pretrain_tasks")
  if NO_TASKS in tasks:
    raise ValueError(f"config.pretrain_tasks={config.pretrain_tasks!r}: "
                     f"{NO_TASKS!r} cannot be combined with tasks")
  return tasks


def _check(config: ml_collections.ConfigDict) -> None:
  arms = list(config.arms)
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    raise ValueError(f"config.arms: unknown arm {unknown[0]!r}; known: "
                     f"{', '.join(ARMS)}")
  if len(set(arms)) != len(arms):
    raise ValueError(f"config.arms={tuple(arms)} names an arm twice")
  if SCRATCH not in arms or len(arms) < 2:
    raise ValueError(f"config.arms={tuple(arms)} must hold {SCRATCH!r} (the "
                     "baseline of Δm%) and at least one arm that starts from "
                     "the pre-training run")
  if not config.seeds:
    raise ValueError("config.seeds: name at least one seed")
  if not 0 < config.pretrain_label_fraction <= 1:
    raise ValueError(f"config.pretrain_label_fraction="
                     f"{config.pretrain_label_fraction!r} is not in (0, 1]")
  for field, overrides in (("config.overrides", config.overrides),
                           ("config.pretrain_overrides",
                            config.pretrain_overrides)):
    clash = sorted(set(sweep_lib.flatten(overrides)) & set(_PROTOCOL_FIELDS))
    if clash:
      raise ValueError(f"{field} sets {clash[0]!r}, which the protocol sets "
                       "per run (config.tasks, config.pretrain_tasks, "
                       "config.seeds, the arms)")
  if sweep_lib.flatten(config.pretrain_overrides).get("select_by"):
    raise ValueError("config.pretrain_overrides sets select_by: the fine-tune "
                     "runs start from the pre-training run's last step, "
                     "not a selected one")


def pretrain_sweep(config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """A sweep config for `sweep_lib.command`/`make_config` of stage 1."""
  return ml_collections.ConfigDict({"base": config.pretrain_base})


def pretrain_dir(root: str, seed: int) -> str:
  return os.path.join(root, PRETRAIN, f"seed{seed}")


def plan_pretrain(config: ml_collections.ConfigDict, root: str
                  ) -> list[sweep_lib.Run]:
  """The pre-training run of each seed (module docstring)."""
  tasks = pretrain_tasks(config)
  fixed = {**sweep_lib.flatten(config.overrides),
           "tasks": ",".join(tasks) or NO_TASKS, "select_by": "",
           "data.validation_fraction": 0.0,
           **{f"data.label_fractions.{t}": float(
               config.pretrain_label_fraction) for t in tasks},
           **sweep_lib.flatten(config.pretrain_overrides)}
  return [sweep_lib.Run(pretrain_dir(root, seed), PRETRAIN, "", seed,
                        {**fixed, "seed": seed}) for seed in config.seeds]


def finetune_sweep(config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """The stage-2 sweep: arms x label fractions (x tuning) x seeds
  (`semi_supervised.make_sweep`), the arms' init_from left to
  `plan_finetune`."""
  view = ml_collections.ConfigDict({
      "base": config.base, "fractions": tuple(config.fractions),
      "seeds": tuple(config.seeds), "overrides": config.overrides.to_dict(),
      "arms": {a: ARMS[a][1] for a in config.arms},
      "tune": config.get("tune", ml_collections.ConfigDict()).to_dict()})
  return semi_supervised.make_sweep(view, downstream_tasks(config))


def plan_finetune(config: ml_collections.ConfigDict, root: str
                  ) -> list[sweep_lib.Run]:
  """Every stage-2 run; those of a pre-trained arm start from their seed's
  pre-training run (`init_from`)."""
  runs = sweep_lib.plan(finetune_sweep(config), root, [])
  return [dataclasses.replace(r, overrides={
      **r.overrides, "init_from": pretrain_dir(root, r.seed)})
          if ARMS[r.method][0] else r for r in runs]


def plan(config: ml_collections.ConfigDict, root: str
         ) -> tuple[list[sweep_lib.Run], list[sweep_lib.Run]]:
  """`(stage-1 runs, stage-2 runs)`.

  Raises:
    ValueError: an unknown arm or one twice, no scratch arm, a label
      fraction outside (0, 1], a task named twice, overrides that set what
      the protocol sets per run, a selection in the pre-training runs, or
      stages whose model or dataset differ (the trunk could not move).
  """
  _check(config)
  downstream_tasks(config)
  first, second = plan_pretrain(config, root), plan_finetune(config, root)
  _check_same_trunk(config, first[0], second[0])
  return first, second


def _check_same_trunk(config: ml_collections.ConfigDict,
                      pretrain: sweep_lib.Run, finetune: sweep_lib.Run
                      ) -> None:
  a = sweep_lib.flatten(sweep_lib.make_config(pretrain_sweep(config),
                                              pretrain).to_dict())
  b = sweep_lib.flatten(sweep_lib.make_config(finetune_sweep(config),
                                              finetune).to_dict())
  for key in sorted(set(a) | set(b)):
    if any(key == f or key.startswith(f + ".") for f in _SHARED_FIELDS) and (
        a.get(key) != b.get(key)):
      raise ValueError(
          f"the pre-training and fine-tune runs differ in {key} "
          f"({a.get(key)!r} vs {b.get(key)!r}): the trunk could not move "
          "over; set it in config.overrides (both stages)")


def train_all(config: ml_collections.ConfigDict, root: str,
              train_fn: Callable[[ml_collections.ConfigDict, str], Any]
              ) -> list[sweep_lib.Run]:
  """Trains the unfinished runs, stage 1 first (`sweep_lib.run_all`);
  returns those it trained."""
  first, second = plan(config, root)
  trained = sweep_lib.run_all(pretrain_sweep(config), first, train_fn)
  return trained + sweep_lib.run_all(finetune_sweep(config), second,
                                     train_fn)


def commands(config: ml_collections.ConfigDict, root: str
             ) -> tuple[list[str], list[int]]:
  """`(command lines, seeds waiting)`: the unfinished pre-training runs'
  commands, then the unfinished stage-2 runs' of the seeds whose
  pre-training run is finished; the other seeds wait."""
  first, second = plan(config, root)
  ready = {r.seed for r in first if r.finished}
  lines = [sweep_lib.command(pretrain_sweep(config), r) for r in first
           if not r.finished]
  sweep = finetune_sweep(config)
  lines += [sweep_lib.command(sweep, r) for r in second
            if r.seed in ready and not r.finished]
  return lines, sorted({r.seed for r in first} - ready)


def collect(config: ml_collections.ConfigDict, runs: Sequence[sweep_lib.Run],
            root: str) -> dict[str, Any]:
  """The sweep's tables of the stage-2 `runs`, and
  `pretrain_finetune.{json,md,png}` (module docstring).

  Returns:
    `{"pretrain_tasks", "tasks": {task: "seen" | "unseen"}, "metrics":
    {key: {arm: [{"fraction", "n", "mean", "lower", "upper"}]}},
    "delta_m": {"all" | "seen" | "unseen": {arm: [{"fraction", "n",
    "mean", "lower", "upper", "seeds": {seed: Δm%}}]}}}`, Δm% against the
    scratch run of the same seed and fraction.
  """
  tables = sweep_lib.collect(runs, root)
  seen = set(pretrain_tasks(config))
  status = {t: "seen" if t in seen else "unseen"
            for t in downstream_tasks(config)}
  fractions = sorted(config.fractions)
  chosen = sweep_lib.choose_tuned([r for r in runs if r.finished])
  metrics: dict[str, dict[str, list]] = {}
  gains: dict[str, dict[str, list]] = {}
  for f in fractions:
    group = f"{semi_supervised.LABELS_AXIS}={semi_supervised.label_name(f)}"
    if group not in tables:
      continue
    summary = tables[group]["summary"]
    for arm, row in summary.items():
      for key, ci in row["metrics"].items():
        metrics.setdefault(key, {}).setdefault(arm, []).append(
            {"fraction": f, "n": row["n"], **ci})
    keys = sorted(next(iter(summary.values()))["metrics"])
    subsets = {"all": keys,
               "seen": [k for k in keys if k.split("/")[0] in seen],
               "unseen": [k for k in keys if k.split("/")[0] not in seen]}
    members = [r for r in chosen if r.group == group]
    scratch = {r.seed: _eval(r) for r in members if r.method == SCRATCH}
    for arm in sorted({r.method for r in members} - {SCRATCH}):
      for subset, subset_keys in subsets.items():
        values = {}
        for r in members:
          if r.method == arm and r.seed in scratch and subset_keys:
            values[r.seed] = stats.delta_m(
                _eval(r), {k: scratch[r.seed][k] for k in subset_keys})
        if not values:
          continue
        mean, lower, upper = stats.mean_ci(list(values.values()))
        gains.setdefault(subset, {}).setdefault(arm, []).append(
            {"fraction": f, "n": len(values), "mean": mean, "lower": lower,
             "upper": upper, "seeds": {str(s): v for s, v in
                                       sorted(values.items())}})
  out = {"pretrain_tasks": sorted(seen), "tasks": status, "metrics": metrics,
         "delta_m": gains}
  with open(os.path.join(root, "pretrain_finetune.json"), "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  marked = {f"{k} ({status.get(k.split('/')[0], 'unseen')})": v
            for k, v in metrics.items()}
  delta = {f"Δm% vs scratch: {s}": v for s, v in gains.items()}
  unseen = [t for t, s in status.items() if s == "unseen"]
  lines = [f"Tasks seen at pre-training: "
           f"{', '.join(sorted(seen)) or 'none (pretexts only)'}; unseen: "
           f"{', '.join(unseen) or 'none'}.",
           "", "Test metrics (mean ± 95% CI over seeds):", "",
           _markdown(marked, fractions)]
  if delta:
    lines += ["Δm% against scratch (each seed's run against the scratch "
              "run of that seed and fraction, over the metrics of all, of the "
              "seen and of the unseen tasks; mean ± 95% CI over seeds):", "",
              _markdown(delta, fractions)]
  with open(os.path.join(root, "pretrain_finetune.md"), "w") as f:
    f.write("\n".join(lines))
  _plot({**marked, **delta}, os.path.join(root, "pretrain_finetune.png"))
  return out


def _eval(run: sweep_lib.Run) -> dict[str, float]:
  with open(os.path.join(run.workdir, sweep_lib.RESULTS)) as f:
    return json.load(f)["eval"]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not sweep_lib.ROOT.value:
    raise app.UsageError("--root is required")
  config = sweep_lib.protocol_config(DEFAULT_PROTOCOL)
  root = sweep_lib.ROOT.value
  if sweep_lib.MODE.value == "commands":
    lines, waiting = commands(config, root)
    for line in lines:
      print(line)
    if waiting:
      print(f"pretrain_finetune: the stage-2 runs of seed(s) {waiting} wait "
            f"for their pre-training runs ({os.path.join(root, PRETRAIN)}/"
            "seed<k>); print the commands again once these are finished",
            file=sys.stderr)
    return
  if sweep_lib.MODE.value == "run":
    from experiments import train  # pylint: disable=g-import-not-at-top
    train_all(config, root, train.run)
  _, runs = plan(config, root)
  os.makedirs(root, exist_ok=True)
  collect(config, runs, root)
  with open(os.path.join(root, "pretrain_finetune.md")) as f:
    print(f.read())
  print("wrote", os.path.join(root, "pretrain_finetune.png"))


if __name__ == "__main__":
  app.run(main)
