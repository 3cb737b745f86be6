r"""Labelled data only against labelled data plus the pool (S4L's protocol).

  python -m experiments.semi_supervised \
      --protocol=experiments/configs/sweeps/semi_supervised.py \
      --root=runs/semi_supervised [--mode=run|commands|collect]

For every label fraction (the same fraction of each task's training labels)
and seed, two models are trained on the same labelled rows:

  supervised   the labelled rows only (`data.drop_unlabelled=True`);
  + pretexts   the same labelled rows and the unlabelled pool, with the
               self-supervised tasks on both (S4L, Zhai et al. ICCV 2019:
               labelled and unlabelled rows in one model's batches).

Both get the same budget and the same tuning: every value of the config's
tuning axis (e.g. learning rates) is trained for both, and each is reported
with the value that reached the best validation value (`select_by`), so
the supervised baseline is tuned exactly as carefully as the method. The
test split is evaluated once per run, for its selected step.

It is a sweep (`experiments/sweep.py`: one workdir per run, finished runs
skipped, interrupted ones resumed, `--mode=commands` for a scheduler) whose
groups are the label fractions; `collect` writes the sweep's tables plus
`semi_supervised.json`, `semi_supervised.md` and `semi_supervised.png`: each
task metric's test mean and 95% confidence interval over seeds against the
label fraction, one line per arm.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from absl import app
import ml_collections

from experiments import sweep as sweep_lib

# The default of --protocol (`sweep_lib.PROTOCOL`).
DEFAULT_PROTOCOL = "experiments/configs/sweeps/semi_supervised.py"

LABELS_AXIS = "labels"
ARM_AXIS = "arm"


def label_name(fraction: float) -> str:
  """`0.05` -> `"5%"` (the group name of a label fraction)."""
  return f"{100 * fraction:g}%"


def make_sweep(config: ml_collections.ConfigDict, tasks: Sequence[str]
               ) -> ml_collections.ConfigDict:
  """The sweep: arms x label fractions (x the tuning axis) x seeds, no
  single-task baselines (the arms are compared with each other)."""
  if not config.fractions:
    raise ValueError("config.fractions: name at least one label fraction")
  for f in config.fractions:
    if not 0 < f <= 1:
      raise ValueError(f"config.fractions: {f!r} is not in (0, 1]")
  axes = {ARM_AXIS: {name: arm.to_dict() for name, arm in config.arms.items()},
          LABELS_AXIS: {label_name(f): {"data": {"label_fractions": {
              t: float(f) for t in tasks}}} for f in config.fractions}}
  overrides = {**config.overrides.to_dict(), "tasks": ",".join(tasks)}
  sweep = ml_collections.ConfigDict({
      "base": config.base, "overrides": overrides,
      "method_axis": ARM_AXIS, "seeds": tuple(config.seeds),
      "baselines": False})
  if config.get("tune"):
    axes["tune"] = {name: t.to_dict() for name, t in config.tune.items()}
    sweep.tune_axis = "tune"
  sweep.axes = axes
  return sweep


def collect(config: ml_collections.ConfigDict, runs: Sequence[sweep_lib.Run],
            root: str) -> dict[str, Any]:
  """The sweep's tables, and per metric and arm the test mean and 95% CI
  over seeds at each label fraction (`semi_supervised.{json,md,png}`)."""
  tables = sweep_lib.collect(runs, root)
  curves: dict[str, dict[str, list]] = {}
  fractions = sorted(config.fractions)
  for f in fractions:
    group = tables.get(f"{LABELS_AXIS}={label_name(f)}")
    if group is None:
      continue
    for arm, row in group["summary"].items():
      for key, ci in row["metrics"].items():
        curves.setdefault(key, {}).setdefault(arm, []).append(
            {"fraction": f, "n": row["n"], **ci})
  with open(os.path.join(root, "semi_supervised.json"), "w") as f:
    json.dump(curves, f, indent=2, sort_keys=True)
  with open(os.path.join(root, "semi_supervised.md"), "w") as f:
    f.write(_markdown(curves, fractions))
  _plot(curves, os.path.join(root, "semi_supervised.png"))
  return curves


def _markdown(curves: Mapping[str, Any], fractions: Sequence[float]) -> str:
  arms = sorted({a for per_arm in curves.values() for a in per_arm})
  lines = ["| metric | labels | " + " | ".join(arms) + " |",
           "|---" * (len(arms) + 2) + "|"]
  for key in sorted(curves):
    for f in fractions:
      cells = []
      for arm in arms:
        point = next((p for p in curves[key].get(arm, [])
                      if p["fraction"] == f), None)
        if point is None:
          cells.append("")
        elif point["n"] > 1:
          half = (point["upper"] - point["lower"]) / 2
          cells.append(f"{point['mean']:.4f} ± {half:.4f}")
        else:
          cells.append(f"{point['mean']:.4f}")
      lines.append(f"| {key} | {label_name(f)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _plot(curves: Mapping[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  keys = sorted(curves)
  if not keys:
    return
  ncols = min(len(keys), 3)
  nrows = -(-len(keys) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.5 * nrows),
                           squeeze=False)
  for ax, key in zip(axes.ravel(), keys):
    for arm, points in sorted(curves[key].items()):
      x = [p["fraction"] for p in points]
      y = [p["mean"] for p in points]
      ax.plot(x, y, marker="o", label=arm)
      if all(p["n"] > 1 for p in points):
        ax.fill_between(x, [p["lower"] for p in points],
                        [p["upper"] for p in points], alpha=0.2)
    ax.set(xscale="log", xlabel="fraction of labels per task", ylabel=key,
           title=f"test {key} (95% CI over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
  for ax in axes.ravel()[len(keys):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not sweep_lib.ROOT.value:
    raise app.UsageError("--root is required")
  config = sweep_lib.protocol_config(DEFAULT_PROTOCOL)
  root = sweep_lib.ROOT.value
  sweep = make_sweep(config, config.tasks.split(","))
  runs = sweep_lib.plan(sweep, root, [])
  if sweep_lib.dispatch(sweep, runs, lambda r, d: collect(config, r, d),
                        root=root) is None:
    return  # --mode=commands
  with open(os.path.join(root, "semi_supervised.md")) as f:
    print(f.read())
  print("wrote", os.path.join(root, "semi_supervised.png"))


if __name__ == "__main__":
  app.run(main)
