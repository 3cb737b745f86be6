r"""How related the tasks are, the grouping that suggests, and its check.

  python -m experiments.relatedness \
      --protocol=experiments/configs/sweeps/relatedness.py \
      --root=runs/relatedness [--mode=run|commands|collect]

The protocol config (`experiments/configs/sweeps/relatedness.py`) names a
base experiment config, the tasks, the overrides of every run, the
measurement (`measure_every`, `num_batches`, `reference_seed`), the largest
number of groups (`max_groups`) and the seeds of the check. Three stages:

  1. Reference run: one model of all tasks (`<root>/reference`, trained by
     `experiments.train.run`; a finished run is reused, an interrupted one
     resumed) with a checkpoint every `measure_every` steps, all kept.
  2. Measurement (`measure`): at step 0 (the run's initial params, rebuilt
     with `train.initial_state`; not with `init_from`) and at every
     checkpoint whose step is a multiple of `measure_every`, on the
     `num_batches` training batches that the run drew from that step on
     (`Mixture.state_at(step)`), per batch:
       * the cosines of the tasks' gradients of the shared params
         (`params["shared"]`) of each task's masked mean loss
         (`relatedness.gram_cosines` of their Gram matrix);
       * the lookahead affinities `Z[i, j]` (Fifty et al., "Efficiently
         Identifying Task Groupings for Multi-Task Learning", NeurIPS 2021):
         the relative drop of task j's loss after a plain gradient step on
         task i's loss alone, of the run's learning rate at that step
         (`relatedness.lookahead_affinity`; a step whose learning rate is 0,
         e.g. step 0 of a warm-up, measures nothing: NaN).
     The losses are those of the library's forward pass
     (`gradients.forward.Forward.loss_sums`, sum / max(count, 1)) with the
     model in eval mode (no dropout), so a measurement is a function of the
     params and the batch; auxiliary losses are left out, and so are
     pretext tasks (a run with pretexts is refused). A task absent from a
     batch has NaN rows and columns there. The matrices are averaged (NaN
     left out) over the batches of a step, then over the measured steps.
     TAG averages the affinity over every training step; averaging over a
     few checkpoints is an approximation of that average.
     Writes `<root>/relatedness.json` (per step and averaged matrices, task
     names, steps, learning rates), `relatedness.md` (the averaged matrices
     and the groupings), `relatedness.png` (the two averaged heatmaps) and
     `relatedness_over_training.png` (each pair against the step).
  3. Grouping and check: `relatedness.best_grouping` of the averaged
     affinity into at most 1, 2, ..., `max_groups` groups (each with its
     score); the one into at most `max_groups` groups is checked: per seed,
     one model per group (`tasks=<group>`) and one model of all tasks
     (`<root>/check/<a>+<b>/seed<k>`, `<root>/check/all/seed<k>`), with the
     same base config, overrides and budget; each task's test metrics come
     from the model that trained it (the grouped models' union against the
     all-in-one model). A group of all tasks is the all-in-one model.
     Writes `<root>/check.md`, `check.json` and `check.png`: each metric's
     mean and 95% CI over seeds (`stats.mean_ci`) for both arms, and Δm% of
     "grouped" against "all-in-one" of the same seed (`stats.delta_m`,
     lower-is-better metrics counted negatively) with its CI over seeds.

Modes (`--mode`, shared with `experiments/sweep.py`, as are `--root` and
`--protocol`, whose default here is the config above):

  run       trains the reference run, measures, trains the check runs (a
            finished run is skipped, an interrupted one resumes), collects.
  commands  prints one `python -m experiments.train ...` line per
            unfinished run: the reference run; the check runs depend on its
            grouping, so they are printed (after measuring) only once the
            reference run is finished (stderr says so until then).
  collect   measures the finished reference run (or reuses its
            relatedness.json) and collects the finished check runs.

Change a field of the protocol on the command line with the file named,
e.g. `--protocol=experiments/configs/sweeps/relatedness.py
--protocol.max_groups=3`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable, Mapping, Sequence
import warnings

from absl import app
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import learnability
from experiments import sweep as sweep_lib
from experiments.protocols import stats
from mtl_jax import relatedness as relatedness_lib
from mtl_jax.gradients import forward as forward_lib
from mtl_jax.training import checkpoint as checkpoint_lib
from mtl_jax.training import loop as loop_lib

# The default of --protocol (`sweep_lib.PROTOCOL`, the flag the protocol
# scripts share).
DEFAULT_PROTOCOL = "experiments/configs/sweeps/relatedness.py"

SHARED = "shared"
REFERENCE = "reference"
CHECK = "check"
ALL = "all"
ALL_IN_ONE = "all-in-one"
GROUPED = "grouped"
JSON_FILE = "relatedness.json"
MARKDOWN_FILE = "relatedness.md"
HEATMAP_FILE = "relatedness.png"
CURVES_FILE = "relatedness_over_training.png"
CHECK_JSON = "check.json"
CHECK_MARKDOWN = "check.md"
CHECK_PNG = "check.png"


# ---------------------------------------------------------------- protocol


def task_names(config: ml_collections.ConfigDict) -> list[str]:
  """The protocol's tasks, in order."""
  return [t.strip() for t in config.tasks.split(",") if t.strip()]


def _check_count(name: str, value: Any, minimum: int) -> None:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < minimum):
    raise ValueError(f"config.{name} must be an integer >= {minimum}, got "
                     f"{value!r}")


def check_protocol(config: ml_collections.ConfigDict) -> None:
  """Checks the protocol config.

  Raises:
    ValueError: fewer than two tasks (or one twice), `measure_every`,
      `num_batches` or `max_groups` < 1, a negative `reference_seed`, or no
      seeds; the message names the field.
  """
  tasks = task_names(config)
  if len(tasks) < 2 or len(set(tasks)) != len(tasks):
    raise ValueError(f"config.tasks={config.tasks!r}: name two or more "
                     "distinct tasks")
  _check_count("measure_every", config.measure_every, 1)
  _check_count("num_batches", config.num_batches, 1)
  _check_count("max_groups", config.max_groups, 1)
  _check_count("reference_seed", config.reference_seed, 0)
  if not config.seeds:
    raise ValueError("config.seeds: name at least one seed for the check")


def _sweep(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What `sweep_lib.make_config`, `command` and `run_all` read."""
  return ml_collections.ConfigDict({"base": config.base})


def _num_steps(config: ml_collections.ConfigDict) -> int:
  base = sweep_lib.load_config(config.base)
  base.update_from_flattened_dict(sweep_lib.flatten(config.overrides))
  return int(base.num_steps)


def reference_run(config: ml_collections.ConfigDict, root: str
                  ) -> sweep_lib.Run:
  """The reference run: all tasks, a checkpoint every `measure_every`
  steps, every one kept (and the final step's)."""
  check_protocol(config)
  overrides = {
      **sweep_lib.flatten(config.overrides),
      "tasks": ",".join(task_names(config)),
      "seed": config.reference_seed,
      "checkpoint_every": config.measure_every,
      "max_checkpoints_to_keep": _num_steps(config) // config.measure_every
                                 + 2}
  return sweep_lib.Run(os.path.join(root, REFERENCE), REFERENCE, "",
                       config.reference_seed, overrides)


def check_groups(groups: Sequence[Sequence[str]], tasks: Sequence[str]
                 ) -> list[list[str]]:
  """`groups` as lists in the order of `tasks`, checked to split `tasks`.

  Raises:
    ValueError: an unknown task, a task in two groups or in none, or an
      empty group.
  """
  seen: dict[str, int] = {}
  for g, group in enumerate(groups):
    if not group:
      raise ValueError(f"grouping {list(map(list, groups))}: group {g} is "
                       "empty")
    for name in group:
      if name not in tasks:
        raise ValueError(f"unknown task {name!r} in grouping "
                         f"{list(map(list, groups))}; tasks: {list(tasks)}")
      if name in seen:
        raise ValueError(f"task {name!r} is in two groups of "
                         f"{list(map(list, groups))}")
      seen[name] = g
  missing = [t for t in tasks if t not in seen]
  if missing:
    raise ValueError(f"grouping {list(map(list, groups))} leaves out tasks "
                     f"{missing}")
  return [[t for t in tasks if t in set(group)] for group in groups]


def plan_check(config: ml_collections.ConfigDict, root: str,
               groups: Sequence[Sequence[str]]) -> list[sweep_lib.Run]:
  """The check runs: per seed, the all-in-one model, then one model per
  group (none for a group of all tasks: that is the all-in-one model).

  Raises:
    ValueError: a bad protocol or grouping (`check_protocol`,
      `check_groups`).
  """
  check_protocol(config)
  tasks = task_names(config)
  groups = check_groups(groups, tasks)
  common = sweep_lib.flatten(config.overrides)
  runs = []
  for seed in config.seeds:
    runs.append(sweep_lib.Run(
        os.path.join(root, CHECK, ALL, f"seed{seed}"), ALL_IN_ONE, "", seed,
        {**common, "tasks": ",".join(tasks), "seed": seed}))
    for group in groups:
      if len(group) == len(tasks):
        continue
      runs.append(sweep_lib.Run(
          os.path.join(root, CHECK, "+".join(group), f"seed{seed}"),
          f"group:{','.join(group)}", "", seed,
          {**common, "tasks": ",".join(group), "seed": seed}))
  return runs


# ------------------------------------------------------------- measurement


def _eval_mode(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` with `train=False` whatever the caller asks (no dropout)."""
  def apply(variables, inputs, *, train, **kwargs):
    del train
    return apply_fn(variables, inputs, train=False, **kwargs)
  return apply


def task_losses_fn(exp: Any, batch: Mapping[str, Any]
                   ) -> Callable[[Any], tuple[jax.Array, jax.Array]]:
  """`params -> (masked mean loss [K], label count [K])` of `batch`, by the
  library's forward pass with the model in eval mode; an absent task has
  loss 0 (sum / max(count, 1))."""
  forward = forward_lib.Forward(
      _eval_mode(exp.model.apply), exp.tasks, encode_decode=exp.encode_decode,
      pass_task_presence=exp.pass_task_presence)
  key = jax.random.PRNGKey(0)  # no dropout in eval mode: unused

  def losses(params):
    (sums, _), (counts, _, _) = forward.loss_sums(params, batch, key)
    return sums / jnp.maximum(counts, 1), counts

  return losses


def make_measure(exp: Any) -> Callable[..., tuple[Any, Any, Any]]:
  """`(params, batch, learning_rate) -> (cosines [K, K], affinities [K, K],
  counts [K])` of one batch, jitted."""
  def measure_batch(params, batch, learning_rate):
    losses = task_losses_fn(exp, batch)
    means = lambda p: losses(p)[0]
    grads = jax.jacrev(lambda s: means({**params, SHARED: s}))(
        params[SHARED])
    num_tasks = len(exp.tasks)
    jac = jnp.concatenate([g.reshape(num_tasks, -1)
                           for g in jax.tree.leaves(grads)], axis=1)
    cosines = relatedness_lib.gram_cosines(jac @ jac.T)
    affinity = relatedness_lib.lookahead_affinity(means, params,
                                                  learning_rate, SHARED)
    return cosines, affinity, losses(params)[1]
  return jax.jit(measure_batch)


def _nanmean(values: Any, axis: int = 0) -> np.ndarray:
  with warnings.catch_warnings():  # an all-NaN cell stays NaN, quietly
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.nanmean(np.asarray(values, np.float64), axis=axis)


def _checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, learnability.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  checkpointer = checkpoint_lib.Checkpointer(directory)
  try:
    return checkpointer.all_steps()
  finally:
    checkpointer.close()


def measured_steps(workdir: str, measure_every: int,
                   initial: bool = True) -> list[int]:
  """Step 0 (with `initial`) and the run's checkpoints at multiples of
  `measure_every`."""
  _check_count("measure_every", measure_every, 1)
  steps = [s for s in _checkpoint_steps(workdir)
           if s > 0 and s % measure_every == 0]
  return ([0] if initial else []) + steps


def measure(workdir: str, *, measure_every: int, num_batches: int,
            data_dir: str | None = None) -> dict[str, Any]:
  """Gradient cosines and lookahead affinities over the run in `workdir`
  (module docstring, stage 2).

  Args:
    workdir: a finished train.py run with checkpoints every
      `measure_every` steps.
    measure_every: the measured checkpoints are at its multiples.
    num_batches: training batches per measured step.
    data_dir: overrides the run's `config.data.data_dir`.

  Returns:
    `{"reference", "tasks", "measure_every", "num_batches", "steps",
    "learning_rates", "per_step": [{"step", "learning_rate", "cosine",
    "affinity" ([K, K], mean over the batches), "task_counts" ([batch][K])}],
    "average": {"cosine", "affinity"}}`, matrices as numpy arrays.

  Raises:
    ValueError: `measure_every` or `num_batches` < 1, a run with pretext
      tasks or without shared params.
    FileNotFoundError: no config.json or no checkpoint in `workdir`.
  """
  from experiments import train  # pylint: disable=g-import-not-at-top
  _check_count("measure_every", measure_every, 1)
  _check_count("num_batches", num_batches, 1)
  config = learnability.load_config(workdir, data_dir=data_dir)
  if config.pretext.names.strip():
    raise ValueError(f"the run in {workdir!r} has pretext tasks "
                     f"({config.pretext.names}): relatedness measures the "
                     "supervised tasks of a run without pretexts")
  # The run's own schedule, extensions included (the cycles its checkpoints
  # record): the lookahead steps at the learning rate the run used.
  horizons = loop_lib.schedule_horizons(
      os.path.join(workdir, learnability.CHECKPOINT_DIR), config.num_steps)
  exp = train.build_experiment(config, tuple(horizons))
  mixture = exp.train_mixture
  sample, _ = mixture.batch(mixture.initial_state())
  steps = measured_steps(workdir, measure_every,
                         initial=not config.init_from)
  if len(steps) == (0 if config.init_from else 1):
    raise FileNotFoundError(
        f"no checkpoint at a multiple of measure_every={measure_every} in "
        f"{workdir!r}: train it with config.checkpoint_every="
        f"{measure_every}")
  measure_batch = make_measure(exp)
  per_step = []
  for step in steps:
    if step == 0:
      params = train.initial_state(exp, sample["inputs"], config.seed).params
      params = jax.tree.map(np.asarray, params)
    else:
      _, params = learnability.restore_params(exp, workdir,
                                              sample["inputs"][:1], step)
    if SHARED not in params:
      raise ValueError(
          f"architecture {config.model.architecture!r} has no "
          f"params[{SHARED!r}] (params: {sorted(params)}): the task "
          "gradients of shared params need a model with shared params, "
          "e.g. hard_sharing")
    learning_rate = float(exp.schedule(step))
    state = mixture.state_at(step)
    cosines, affinities, counts = [], [], []
    for _ in range(num_batches):
      batch, state = mixture.batch(state)
      cos, z, count = measure_batch(params, batch, learning_rate)
      cosines.append(np.asarray(cos, np.float64))
      affinities.append(np.asarray(z, np.float64))
      counts.append(np.asarray(count).astype(int).tolist())
    affinity = _nanmean(affinities)
    if learning_rate == 0:  # no lookahead step: nothing measured
      affinity = np.full_like(affinity, np.nan)
    per_step.append({"step": step, "learning_rate": learning_rate,
                     "cosine": _nanmean(cosines), "affinity": affinity,
                     "task_counts": counts})
    logging.info("relatedness: measured step %d (learning rate %g)", step,
                 learning_rate)
  return {
      "reference": os.path.abspath(workdir),
      "tasks": list(exp.tasks.names),
      "measure_every": measure_every,
      "num_batches": num_batches,
      "steps": steps,
      "learning_rates": [p["learning_rate"] for p in per_step],
      "per_step": per_step,
      "average": {
          "cosine": _nanmean([p["cosine"] for p in per_step]),
          "affinity": _nanmean([p["affinity"] for p in per_step])},
  }


def add_groupings(report: dict[str, Any], max_groups: int
                  ) -> dict[str, Any]:
  """`report` with `groupings`: `best_grouping` of its averaged affinity
  into at most 1 .. `max_groups` groups (task names, score), and
  `suggested`, the one into at most `max_groups` groups.

  Raises:
    ValueError: `max_groups` < 1, or NaN in the averaged affinity.
  """
  _check_count("max_groups", max_groups, 1)
  tasks = report["tasks"]
  groupings = []
  for k in range(1, max_groups + 1):
    groups, score = relatedness_lib.best_grouping(
        report["average"]["affinity"], k)
    groupings.append({"max_groups": k,
                      "groups": [[tasks[i] for i in g] for g in groups],
                      "score": float(score)})
  return {**report, "groupings": groupings, "suggested": groupings[-1]}


# ------------------------------------------------------------ file output


def _to_json(value: Any) -> Any:
  """Arrays to nested lists, NaN to None (strict JSON)."""
  if isinstance(value, dict):
    return {k: _to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  if isinstance(value, np.ndarray):
    return _to_json(value.tolist())
  if isinstance(value, (float, np.floating)):
    return None if math.isnan(value) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value


def _matrix(value: Any) -> np.ndarray:
  return np.array([[np.nan if v is None else v for v in row]
                   for row in value], np.float64)


def _from_json(report: dict[str, Any]) -> dict[str, Any]:
  """A report read from JSON with its matrices as arrays again."""
  out = dict(report)
  out["per_step"] = [{**p, "cosine": _matrix(p["cosine"]),
                      "affinity": _matrix(p["affinity"])}
                     for p in report["per_step"]]
  out["average"] = {k: _matrix(v) for k, v in report["average"].items()}
  return out


def _write_text(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)  # readers never see a half-written file


def _write_json(path: str, value: Any) -> None:
  _write_text(path, json.dumps(_to_json(value), indent=2, sort_keys=True))


def _save_figure(fig: Any, path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.savefig(path + ".tmp", dpi=100, format="png")
  plt.close(fig)
  os.replace(path + ".tmp", path)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _cell(value: float, spec: str = "+.3f") -> str:
  return "nan" if np.isnan(value) else format(value, spec)


# The affinities of a step of the run's learning rate are small: 3
# significant digits rather than 3 decimals.
_AFFINITY = "+.3g"


def _table(matrix: np.ndarray, tasks: Sequence[str], corner: str,
           spec: str = "+.3f") -> str:
  lines = [f"| {corner} | " + " | ".join(tasks) + " |",
           "|---" * (len(tasks) + 1) + "|"]
  for name, row in zip(tasks, matrix):
    lines.append(f"| {name} | " + " | ".join(_cell(v, spec) for v in row)
                 + " |")
  return "\n".join(lines)


def markdown(report: Mapping[str, Any]) -> str:
  """The averaged matrices as Markdown tables, and the groupings."""
  tasks = report["tasks"]
  lines = [
      "# Task relatedness", "",
      f"Reference run `<root>/{os.path.basename(report['reference'])}`, "
      f"measured at steps "
      f"{report['steps']} (learning rates "
      f"{[float(f'{lr:.3g}') for lr in report['learning_rates']]}), "
      f"{report['num_batches']} training batch(es) per step; means over "
      "the batches, then over the steps (NaN left out).", "",
      "## Gradient cosine (shared params)", "",
      _table(report["average"]["cosine"], tasks, "cos"), "",
      "## Lookahead affinity Z[i → j] (Fifty et al. 2021)", "",
      "Row i: the task stepped on; column j: the task whose loss is "
      "measured; positive: the step on i lowers j's loss.", "",
      _table(report["average"]["affinity"], tasks, "i \\ j", _AFFINITY),
      ""]
  if "groupings" in report:
    lines += ["## Groupings (`best_grouping` of the averaged affinity)", "",
              "| max groups | groups | score |", "|---|---|---|"]
    for g in report["groupings"]:
      groups = " · ".join("{" + ", ".join(x) + "}" for x in g["groups"])
      lines.append(f"| {g['max_groups']} | {groups} | {g['score']:+.4g} |")
    lines.append("")
  return "\n".join(lines)


def _heatmap(ax: Any, matrix: np.ndarray, tasks: Sequence[str], title: str,
             limit: float, spec: str, plt: Any) -> None:
  image = ax.imshow(np.ma.masked_invalid(matrix), cmap="RdBu",
                    vmin=-limit, vmax=limit)
  ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
  ax.set_yticks(range(len(tasks)), tasks)
  ax.set_title(title)
  for i, row in enumerate(matrix):
    for j, value in enumerate(row):
      ax.text(j, i, _cell(value, spec), ha="center", va="center",
              fontsize=8,
              color="white" if abs(value) > 0.6 * limit else "black")
  plt.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def plot_heatmaps(report: Mapping[str, Any], path: str) -> None:
  """The averaged cosine and affinity matrices side by side."""
  plt = _pyplot()
  tasks = report["tasks"]
  affinity = report["average"]["affinity"]
  # The colour scale of the pairs: the diagonal (a task's step on its own
  # loss) is far larger and would wash them out; it is clipped.
  off = np.abs(affinity[~np.eye(len(tasks), dtype=bool)])
  limit = float(np.nanmax(off)) if np.isfinite(off).any() else 0.0
  fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(tasks), 4.2))
  _heatmap(axes[0], report["average"]["cosine"], tasks,
           "gradient cosine", 1.0, "+.3f", plt)
  axes[0].set(xlabel="task j", ylabel="task i")
  _heatmap(axes[1], affinity, tasks, "lookahead affinity Z[i → j]",
           limit or 1.0, _AFFINITY, plt)
  axes[1].set(xlabel="task j (loss measured)", ylabel="task i (stepped on)")
  fig.tight_layout()
  _save_figure(fig, path)


def plot_over_training(report: Mapping[str, Any], path: str) -> None:
  """Each pair's cosine and each ordered pair's affinity against the
  step."""
  plt = _pyplot()
  tasks, steps = report["tasks"], report["steps"]
  k = len(tasks)
  cos = np.stack([p["cosine"] for p in report["per_step"]])
  aff = np.stack([p["affinity"] for p in report["per_step"]])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i in range(k):
    for j in range(k):
      if i < j:
        axes[0].plot(steps, cos[:, i, j], marker="o",
                     label=f"{tasks[i]}, {tasks[j]}")
      if i != j:
        axes[1].plot(steps, aff[:, i, j], marker="o",
                     label=f"{tasks[i]} → {tasks[j]}")
  axes[0].set(xlabel="step", ylabel="cosine", title="gradient cosine")
  axes[1].set(xlabel="step", ylabel="Z", title="lookahead affinity")
  for ax in axes:
    ax.axhline(0, color="k", lw=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  _save_figure(fig, path)


def write_relatedness(report: Mapping[str, Any], root: str) -> None:
  """relatedness.{json,md,png} and relatedness_over_training.png."""
  os.makedirs(root, exist_ok=True)
  _write_json(os.path.join(root, JSON_FILE), report)
  _write_text(os.path.join(root, MARKDOWN_FILE), markdown(report))
  plot_heatmaps(report, os.path.join(root, HEATMAP_FILE))
  plot_over_training(report, os.path.join(root, CURVES_FILE))


def read_relatedness(root: str) -> dict[str, Any] | None:
  """`<root>/relatedness.json` with its matrices as arrays (None if
  absent)."""
  path = os.path.join(root, JSON_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return _from_json(json.load(f))


def measure_reference(config: ml_collections.ConfigDict, root: str
                      ) -> dict[str, Any]:
  """The reference run's measurement with the groupings, written to
  `<root>`. A relatedness.json of the same run, settings and steps is
  reused: the groupings are recomputed, and the files rewritten only if
  they changed (e.g. another `max_groups`)."""
  workdir = reference_run(config, root).workdir
  saved = read_relatedness(root)
  steps = measured_steps(workdir, config.measure_every)
  report = saved
  if (saved is None or saved["reference"] != os.path.abspath(workdir)
      or saved["measure_every"] != config.measure_every
      or saved["num_batches"] != config.num_batches
      or [s for s in saved["steps"] if s] != [s for s in steps if s]):
    report = measure(workdir, measure_every=config.measure_every,
                     num_batches=config.num_batches)
  report = add_groupings(report, config.max_groups)
  files = (JSON_FILE, MARKDOWN_FILE, HEATMAP_FILE, CURVES_FILE)
  if (saved is None or _to_json(report) != _to_json(saved)
      or not all(os.path.exists(os.path.join(root, f)) for f in files)):
    write_relatedness(report, root)
  return report


# ------------------------------------------------------------------- check


def _read_eval(run: sweep_lib.Run) -> dict[str, float]:
  with open(os.path.join(run.workdir, sweep_lib.RESULTS)) as f:
    return json.load(f)["eval"]


def _task_metrics(results: Mapping[str, float], tasks: Sequence[str]
                  ) -> dict[str, float]:
  return {k: results[k] for k in sweep_lib.metric_keys(results)
          if k.split("/", 1)[0] in tasks}


def collect_check(config: ml_collections.ConfigDict,
                  runs: Sequence[sweep_lib.Run],
                  groups: Sequence[Sequence[str]], root: str
                  ) -> dict[str, Any] | None:
  """The check's table over the seeds whose runs all finished; writes
  check.{json,md,png}. None (and nothing written) if no seed finished.

  Per seed, the grouped arm's metrics are each task's metrics from its
  group's model; Δm% of the grouped arm is taken against the all-in-one
  model of the same seed, then averaged over seeds with its 95% CI.
  """
  tasks = task_names(config)
  groups = check_groups(groups, tasks)
  grouped, all_in_one = {}, {}
  for seed in config.seeds:
    mine = {r.method: r for r in runs if r.seed == seed}
    if not all(r.finished for r in mine.values()):
      logging.warning("relatedness check: the runs of seed %d are not all "
                      "finished; it is left out", seed)
      continue
    whole = _read_eval(mine[ALL_IN_ONE])
    all_in_one[seed] = _task_metrics(whole, tasks)
    grouped[seed] = {}
    for group in groups:
      run = mine.get(f"group:{','.join(group)}", mine[ALL_IN_ONE])
      grouped[seed].update(_task_metrics(
          whole if run is mine[ALL_IN_ONE] else _read_eval(run), group))
  if not grouped:
    logging.warning("relatedness check: no seed has all its runs finished")
    return None
  keys = sorted(set.intersection(*(set(m) for m in grouped.values()),
                                 *(set(m) for m in all_in_one.values())))
  entries = [{"method": arm, "seed": seed, "metrics": metrics[seed]}
             for arm, metrics in ((GROUPED, grouped),
                                  (ALL_IN_ONE, all_in_one))
             for seed in metrics]
  summary = stats.summarize(entries, None, keys)
  per_seed = {seed: stats.delta_m(grouped[seed], {
      k: all_in_one[seed][k] for k in keys}) for seed in grouped}
  mean, lower, upper = stats.mean_ci(list(per_seed.values()))
  summary[GROUPED]["delta_m"] = {"mean": mean, "lower": lower,
                                 "upper": upper}
  result = {
      "groups": groups, "seeds": sorted(grouped), "keys": keys,
      "summary": summary,
      "delta_m_per_seed": {str(s): v for s, v in per_seed.items()},
      "metrics": {GROUPED: {str(s): m for s, m in grouped.items()},
                  ALL_IN_ONE: {str(s): m for s, m in all_in_one.items()}},
      "runs": {f"{r.method}/seed{r.seed}": r.workdir for r in runs},
  }
  _write_json(os.path.join(root, CHECK_JSON), result)
  _write_text(os.path.join(root, CHECK_MARKDOWN),
              _check_markdown(result, keys))
  _plot_check(result, keys, os.path.join(root, CHECK_PNG))
  return result


def _check_markdown(result: Mapping[str, Any], keys: Sequence[str]) -> str:
  groups = " · ".join("{" + ", ".join(g) + "}" for g in result["groups"])
  per_seed = ", ".join(f"seed {s}: {v:+.3f}" for s, v in
                       result["delta_m_per_seed"].items())
  return "\n".join([
      "# Check of the suggested grouping", "",
      f"Grouped models {groups} (each task's test metrics from its group's "
      f"model) against one model of all tasks; seeds {result['seeds']}; "
      "mean ± 95% CI half-width over seeds. Δm% of the grouped arm against "
      "the all-in-one model of the same seed (positive: grouping is "
      "better).", "",
      stats.to_markdown(result["summary"], keys),
      f"Δm% per seed: {per_seed}", ""])


def _plot_check(result: Mapping[str, Any], keys: Sequence[str],
                path: str) -> None:
  """One panel per metric (both arms) and one of the grouped Δm%, with 95%
  CIs over seeds."""
  plt = _pyplot()
  summary = result["summary"]
  panels = list(keys) + ["Δm%"]
  ncols = min(len(panels), 4)
  nrows = -(-len(panels) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3 * nrows),
                           squeeze=False)

  def bars(ax, names, cis, colors):
    means = [c["mean"] for c in cis]
    errors = [[c["mean"] - c["lower"] if not math.isnan(c["lower"]) else 0
               for c in cis],
              [c["upper"] - c["mean"] if not math.isnan(c["upper"]) else 0
               for c in cis]]
    ax.bar(range(len(names)), means, yerr=errors, capsize=4, color=colors)
    ax.set_xticks(range(len(names)), names)

  for ax, key in zip(axes.ravel(), panels):
    if key == "Δm%":
      bars(ax, [GROUPED], [summary[GROUPED]["delta_m"]], ["C0"])
      ax.axhline(0, color="k", lw=0.8)
      ax.set_title("Δm% grouped vs all-in-one")
    else:
      bars(ax, [GROUPED, ALL_IN_ONE], [summary[GROUPED]["metrics"][key],
                                       summary[ALL_IN_ONE]["metrics"][key]],
           ["C0", "C1"])
      ax.set_title(f"test {key}")
  for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
  fig.suptitle(f"95% CI over seeds {result['seeds']}")
  fig.tight_layout()
  _save_figure(fig, path)


# -------------------------------------------------------------- protocol


def run_protocol(config: ml_collections.ConfigDict, root: str,
                 mode: str = "run",
                 train_fn: Callable[[ml_collections.ConfigDict, str], Any]
                 | None = None) -> dict[str, Any]:
  """Does the mode's work (module docstring).

  Returns:
    `{"reference": Run, "relatedness": report or None, "check_runs": [Run],
    "check": collect_check's result or None, "commands": [str]}`.

  Raises:
    ValueError: a bad protocol or mode.
  """
  check_protocol(config)
  if mode not in ("run", "commands", "collect"):
    raise ValueError(f"mode {mode!r}: valid modes are run, commands, "
                     "collect")
  sweep = _sweep(config)
  reference = reference_run(config, root)
  out = {"reference": reference, "relatedness": None, "check_runs": [],
         "check": None, "commands": []}
  if mode == "run":
    if train_fn is None:
      from experiments import train  # pylint: disable=g-import-not-at-top
      train_fn = train.run
    sweep_lib.run_all(sweep, [reference], train_fn)
  if not reference.finished:
    if mode == "commands":
      out["commands"].append(sweep_lib.command(sweep, reference))
    print(f"relatedness: the reference run {reference.workdir} is not "
          "finished; the check runs depend on the grouping it suggests, so "
          "they come once it is (train it, then run this again)",
          file=sys.stderr)
    return out
  report = measure_reference(config, root)
  out["relatedness"] = report
  runs = plan_check(config, root, report["suggested"]["groups"])
  out["check_runs"] = runs
  if mode == "commands":
    out["commands"] = [sweep_lib.command(sweep, r) for r in runs
                       if not r.finished]
    return out
  if mode == "run":
    sweep_lib.run_all(sweep, runs, train_fn)
  out["check"] = collect_check(config, runs, report["suggested"]["groups"],
                               root)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not sweep_lib.ROOT.value:
    raise app.UsageError("--root is required")
  root = sweep_lib.ROOT.value
  logging.get_absl_handler().addFilter(
      lambda record: "orbax" not in record.pathname)
  out = run_protocol(sweep_lib.protocol_config(DEFAULT_PROTOCOL), root,
                     sweep_lib.MODE.value)
  for line in out["commands"]:
    print(line)
  if sweep_lib.MODE.value == "commands":
    return
  if out["relatedness"] is not None:
    with open(os.path.join(root, MARKDOWN_FILE)) as f:
      print(f.read())
  if out["check"] is not None:
    with open(os.path.join(root, CHECK_MARKDOWN)) as f:
      print(f.read())


if __name__ == "__main__":
  app.run(main)
