r"""Which grid cells help: each grid_mask cell as the pretext, its downstream
gain next to its reconstruction quality.

  python -m experiments.grid_cells \
      --protocol=experiments/configs/sweeps/grid_cells.py \
      --root=runs/grid_cells [--mode=run|commands|collect]

The protocol config is a sweep config (`experiments/sweep.py`; the shipped
one is `experiments/configs/sweeps/grid_cells.py`) whose method axis holds a
supervised-only arm, the reference (`sweep.reference`, e.g. "none"), and
grid_mask arms: one per fixed cell (`pretext.grid_mask.cell=k`) and one with
a random cell per example; `sweep.score` sets `num_images` and
`reference_batches` of the reconstruction scores. Besides the tuning axis
(`tune_axis`), the sweep has no axis other than the method axis: one table.

The modes are the sweep's (train the unfinished runs, or print their
commands, or only collect). `collect` writes the sweep's tables
(`summary.*`, Δm% against the reference) and:

  1. scores every finished grid_mask run's head with
     `mtl_jax.pretext.learnability.grid_cell_quality` on every cell: the
     params are those the run's test metrics come from (the step that model
     selection kept in `<workdir>/best`, `results.json`'s `selection`; the
     final checkpoint for a run without selection), the images the first
     `num_images` real rows of the run's test stream, the mean-image
     baseline's reference the mean of its first `reference_batches` training
     batches (as `experiments/learnability.py`). The score is cached in the
     workdir (`grid_cell_quality.json`) and reused while the step and the
     score settings are the same;
  2. writes `grid_cells.json`, `grid_cells.md` and `grid_cells.png` under the
     root. Per arm: the downstream Δm% against the reference (mean and 95%
     CI over seeds, `experiments.protocols.stats`) and each task's test
     metric, next to the reconstruction, mean over seeds: for a fixed-cell
     arm the PSNR of its own cell and its gain in dB over the best
     no-training baseline (mean-image or harmonic interpolation, per cell),
     for the random arm the same on every cell. The reference arm's Δm% is
     0 on average; its CI is its own seed spread. The PNG shows per cell the
     fixed-cell arms' Δm% and their own-cell gain (dB) as heatmaps, and the
     random arm's per-cell gain, its Δm% in the title.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

from absl import app
import ml_collections
import numpy as np

from experiments import learnability
from experiments import sweep as sweep_lib
from mtl_jax.pretext import learnability as learnability_lib

DEFAULT_PROTOCOL = "experiments/configs/sweeps/grid_cells.py"
JSON_FILE = "grid_cells.json"
MD_FILE = "grid_cells.md"
PNG_FILE = "grid_cells.png"
# A run's grid_cell_quality score, cached in its workdir.
QUALITY_FILE = "grid_cell_quality.json"
PRETEXT = "grid_mask"
DEFAULT_SCORE = {"num_images": 256, "reference_batches": 8}


def score_settings(sweep: ml_collections.ConfigDict) -> dict[str, int]:
  """`sweep.score` over the defaults, checked."""
  settings = dict(DEFAULT_SCORE)
  settings.update(sweep.get("score", ml_collections.ConfigDict()).to_dict())
  unknown = sorted(set(settings) - set(DEFAULT_SCORE))
  if unknown:
    raise ValueError(f"sweep.score: unknown field(s) {unknown}; valid: "
                     f"{sorted(DEFAULT_SCORE)}")
  for name, value in settings.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"sweep.score.{name} must be an int >= 1, got "
                       f"{value!r}")
  return settings


def _run_pretext(run: sweep_lib.Run) -> dict[str, Any] | None:
  """The run's grid_mask settings (`{"grid", "cell"}`; cell None: random)
  from its config.json, or None for a run without grid_mask."""
  config = learnability.load_config(run.workdir)
  names = [n.strip() for n in config.pretext.names.split(",")]
  if PRETEXT not in names:
    return None
  block = config.pretext[PRETEXT]
  grid = block.grid
  grid = [int(grid), int(grid)] if isinstance(grid, int) else [int(g) for g
                                                               in grid]
  cell = block.get("cell")
  return {"grid": grid, "cell": None if cell is None else int(cell)}


def _selected_params(exp: Any, workdir: str, results: Mapping[str, Any],
                     sample: np.ndarray) -> tuple[int, Any]:
  """`(step, params)` the run's test metrics come from."""
  selection = results.get("selection")
  if not selection:  # no model selection: the final state was tested
    return learnability.restore_params(exp, workdir, sample)
  from experiments import train  # pylint: disable=g-import-not-at-top
  from mtl_jax.models import build as models_build  # pylint: disable=g-import-not-at-top
  from mtl_jax.training import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  step = int(selection["step"])
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, train.BEST_DIR))
  try:
    params = checkpointer.read(step)["params"]
  finally:
    checkpointer.close()
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  if shapes(params) != shapes(models_build.abstract_params(exp.model,
                                                          sample)):
    raise ValueError(f"the selected checkpoint {step} in {workdir!r}/"
                     f"{train.BEST_DIR} holds params of another model than "
                     "its config.json builds")
  return step, jax.tree.map(np.asarray, params)


def score_run(run: sweep_lib.Run, num_images: int, reference_batches: int
              ) -> dict[str, Any]:
  """The `grid_cell_quality` result of the run's grid_mask head (module
  docstring, step 1), with `step`, `num_images` and `reference_batches`;
  read from the workdir's cache when it holds the same settings."""
  with open(os.path.join(run.workdir, sweep_lib.RESULTS)) as f:
    results = json.load(f)
  selection = results.get("selection") or {}
  step = int(selection.get("step", results.get("steps", -1)))
  settings = {"step": step, "num_images": num_images,
              "reference_batches": reference_batches}
  cache = os.path.join(run.workdir, QUALITY_FILE)
  if os.path.exists(cache):
    with open(cache) as f:
      cached = json.load(f)
    if all(cached.get(k) == v for k, v in settings.items()):
      return cached
  from experiments import train  # pylint: disable=g-import-not-at-top
  exp = train.build_experiment(learnability.load_config(run.workdir))
  images = learnability.eval_images(exp, num_images)
  step, params = _selected_params(exp, run.workdir, results, images[:1])
  reference, _ = learnability.train_mean(exp, reference_batches)
  tasks = learnability.score_tasks(exp, params, images, reference)
  out = {**tasks[PRETEXT], **settings, "step": step}
  learnability_lib.write_json(out, cache)
  return out


def _finite(value: float) -> float | None:
  return value if math.isfinite(value) else None


def _ci(entry: Mapping[str, float]) -> dict[str, float | None]:
  return {k: _finite(float(entry[k])) for k in ("mean", "lower", "upper")}


def _mean_grid(grids: Sequence[Any]) -> list[list[float]]:
  return np.mean(np.asarray(grids, np.float64), axis=0).tolist()


def _reconstruction(pretext: Mapping[str, Any],
                    scores: Mapping[int, Mapping[str, Any]]
                    ) -> dict[str, Any]:
  """Mean over seeds of the reconstruction: the own cell's PSNR and gain
  for a fixed cell, every cell's for a random one (and the full grids of
  both, with the per-seed numbers)."""
  cols = pretext["grid"][1]
  out: dict[str, Any] = {
      "psnr_grid": _mean_grid([s["model"]["psnr"] for s in scores.values()]),
      "gain_db_grid": _mean_grid([s["gain_db"] for s in scores.values()]),
      "seeds": {str(seed): {"step": s["step"], "psnr": s["model"]["psnr"],
                            "gain_db": s["gain_db"],
                            "best_baseline": s["best_baseline"]}
                for seed, s in sorted(scores.items())}}
  cell = pretext["cell"]
  if cell is not None:
    r, c = divmod(cell, cols)
    out.update(cell=cell, psnr=out["psnr_grid"][r][c],
               gain_db=out["gain_db_grid"][r][c],
               best_baseline_psnr=float(np.mean(
                   [s["best_baseline_psnr"][r][c] for s in scores.values()])))
  return out


def collect(sweep: ml_collections.ConfigDict, runs: Sequence[sweep_lib.Run],
            root: str) -> dict[str, Any]:
  """The sweep's tables, the runs' reconstruction scores, and
  grid_cells.{json,md,png} (module docstring); returns the JSON's dict."""
  reference = sweep_lib.check_reference(sweep)
  tables = sweep_lib.collect(runs, root, reference)
  if not tables:
    raise ValueError("grid_cells collect: no finished run")
  (table,) = tables.values()
  summary = table["summary"]
  settings = score_settings(sweep)
  finished = sweep_lib.choose_tuned([r for r in runs if r.finished])
  pretexts: dict[str, dict[str, Any]] = {}
  scores: dict[str, dict[int, dict[str, Any]]] = {}
  for run in sorted(finished, key=lambda r: (r.method, r.seed)):
    pretext = _run_pretext(run)
    if pretext is None:
      continue
    if pretexts.setdefault(run.method, pretext) != pretext:
      raise ValueError(f"grid_cells: the runs of arm {run.method!r} differ "
                       f"in their grid_mask settings")
    scores.setdefault(run.method, {})[run.seed] = score_run(
        run, settings["num_images"], settings["reference_batches"])
  grids = {tuple(p["grid"]) for p in pretexts.values()}
  if len(grids) > 1:
    raise ValueError(f"grid_cells: the arms use different grids {sorted(grids)}"
                     "; compare cells of one grid")
  keys = sorted(next(iter(summary.values()))["metrics"])
  arms = {}
  for name, row in summary.items():
    arms[name] = {
        "n": row["n"], "delta_m": _ci(row["delta_m"]),
        "metrics": {k: _ci(row["metrics"][k]) for k in keys},
        "pretext": pretexts.get(name),
        "reconstruction": (_reconstruction(pretexts[name], scores[name])
                           if name in pretexts else None)}
  cells: dict[str, str] = {}
  for name, pretext in sorted(pretexts.items()):
    if pretext["cell"] is None:
      continue
    if str(pretext["cell"]) in cells:
      raise ValueError(f"grid_cells: arms {cells[str(pretext['cell'])]!r} "
                       f"and {name!r} both mask cell {pretext['cell']}")
    cells[str(pretext["cell"])] = name
  report = {
      "reference": reference,
      "reference_metrics": table["baselines"],
      "grid": list(grids.pop()) if grids else None,
      "keys": keys,
      "score": settings,
      "cells": cells,
      "random_arms": sorted(n for n, p in pretexts.items()
                            if p["cell"] is None),
      "arms": arms,
  }
  learnability_lib.write_json(report, os.path.join(root, JSON_FILE))
  with open(os.path.join(root, MD_FILE), "w") as f:
    f.write(to_markdown(report))
  if report["grid"] is not None:
    plot(report, os.path.join(root, PNG_FILE))
  return report


def _format(ci: Mapping[str, float | None], n: int, precision: int,
            sign: str = "") -> str:
  """"mean ± 95% CI half-width" (the mean alone for one seed)."""
  mean = f"{ci['mean']:{sign}.{precision}f}"
  if n <= 1 or ci["lower"] is None:
    return mean
  return f"{mean} ± {(ci['upper'] - ci['lower']) / 2:.{precision}f}"


def _cell_name(arm: Mapping[str, Any]) -> str:
  if arm["pretext"] is None:
    return "-"
  return "random" if arm["pretext"]["cell"] is None else str(
      arm["pretext"]["cell"])


def to_markdown(report: Mapping[str, Any]) -> str:
  """The arms' table (Δm%, test metrics, own-cell reconstruction) and the
  random arms' per-cell reconstruction."""
  keys = report["keys"]
  arms = report["arms"]
  order = sorted(arms, key=lambda n: (arms[n]["pretext"] is not None,
                                      _cell_name(arms[n]), n))
  header = (["arm", "cell", "n", f"Δm% vs {report['reference']}"] + keys
            + ["PSNR own cell (dB)", "gain over baseline (dB)"])
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for name in order:
    arm = arms[name]
    rec = arm["reconstruction"] or {}
    own = ("cell" in rec)
    lines.append("| " + " | ".join(
        [name, _cell_name(arm), str(arm["n"]),
         _format(arm["delta_m"], arm["n"], 2, "+")]
        + [_format(arm["metrics"][k], arm["n"], 4) for k in keys]
        + ([f"{rec['psnr']:.2f}", f"{rec['gain_db']:+.2f}"] if own else
           ["per cell below"] * 2 if rec else ["", ""])) + " |")
  lines += ["", f"Δm% against {report['reference']!r} (mean over seeds ± "
            "95% CI half-width), over its supervised metrics: " + ", ".join(
                f"{k} {v:.4g}" for k, v in
                sorted(report["reference_metrics"].items())) + ".",
            "Reconstruction: mean over seeds of the grid_mask head's PSNR on "
            f"{report['score']['num_images']} test images, gain over the "
            "best no-training baseline (mean image, harmonic interpolation)."]
  for name in report["random_arms"]:
    rec = arms[name]["reconstruction"]
    cols = report["grid"][1]
    lines += ["", f"Arm {name!r} (random cell), per cell:", "",
              "| cell | PSNR (dB) | gain (dB) |", "|---|---|---|"]
    for i in range(report["grid"][0] * cols):
      r, c = divmod(i, cols)
      lines.append(f"| {i} | {rec['psnr_grid'][r][c]:.2f} | "
                   f"{rec['gain_db_grid'][r][c]:+.2f} |")
  return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: str) -> None:
  """Heatmaps per cell: the fixed-cell arms' Δm% and own-cell gain (dB),
  and the random arm's gain per cell (its Δm% in the title)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows, cols = report["grid"]
  arms = report["arms"]
  delta = np.full((rows, cols), np.nan)
  gain = np.full((rows, cols), np.nan)
  for cell, name in report["cells"].items():
    r, c = divmod(int(cell), cols)
    delta[r, c] = arms[name]["delta_m"]["mean"]
    gain[r, c] = arms[name]["reconstruction"]["gain_db"]
  panels = [(delta, f"Δm% vs {report['reference']} (fixed cell)", "RdBu"),
            (gain, "gain over baseline, own cell (dB)", "RdBu")]
  title = "grid_mask cells"
  for name in report["random_arms"]:
    panels.append((np.asarray(arms[name]["reconstruction"]["gain_db_grid"]),
                   f"{name}: gain per cell (dB)", "RdBu"))
    title += (f"; {name}: Δm% "
              f"{_format(arms[name]['delta_m'], arms[name]['n'], 2, '+')}")
  fig, axes = plt.subplots(1, len(panels), figsize=(
      3.6 * len(panels), 1.6 + 1.0 * rows), squeeze=False)
  # One colour scale for the gains (dB), centred on 0; one for Δm%.
  def span_of(arrays):
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays])
    return max(float(np.abs(finite).max()), 1e-6) if finite.size else 1.0
  spans = [span_of([delta])] + [span_of([p[0] for p in panels[1:]])] * (
      len(panels) - 1)
  for ax, (values, label, cmap), span in zip(axes[0], panels, spans):
    image = ax.imshow(values, cmap=cmap, vmin=-span, vmax=span)
    for r in range(rows):
      for c in range(cols):
        text = ("n/a" if not np.isfinite(values[r, c]) else
                f"{values[r, c]:+.2f}")
        ax.text(c, r, f"cell {r * cols + c}\n{text}", ha="center",
                va="center", fontsize=8,
                bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.7))
    ax.set_title(label, fontsize=9)
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.set_xlabel("grid column", fontsize=8)
    ax.set_ylabel("grid row", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  fig.suptitle(f"{title} (mean over seeds)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run_protocol(sweep: ml_collections.ConfigDict, root: str, *,
                 mode: str | None = None,
                 train_fn: Callable[[ml_collections.ConfigDict, str], Any]
                 | None = None) -> dict[str, Any] | None:
  """Plans the sweep and does the mode's work (`sweep_lib.dispatch`);
  returns `collect`'s report (None in the commands mode).

  Raises:
    ValueError: a sweep without a reference, with baselines, or with an
      axis other than the method and tuning axes.
  """
  if not sweep_lib.check_reference(sweep):
    raise ValueError("grid_cells: set sweep.reference to the supervised-only "
                     "arm (Δm% of each cell is taken against it)")
  extra = sorted(set(sweep.axes.keys()) - {sweep.method_axis,
                                           sweep.get("tune_axis", "")})
  if extra:
    raise ValueError(f"grid_cells: axes {extra} besides the method axis "
                     f"{sweep.method_axis!r} (and tune_axis): one table only")
  score_settings(sweep)  # before any training
  runs = sweep_lib.plan(sweep, root, [])
  return sweep_lib.dispatch(sweep, runs,
                            lambda r, d: collect(sweep, r, d), root=root,
                            mode=mode, train_fn=train_fn)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not sweep_lib.ROOT.value:
    raise app.UsageError("--root is required")
  root = sweep_lib.ROOT.value
  if run_protocol(sweep_lib.protocol_config(DEFAULT_PROTOCOL), root) is None:
    return  # --mode=commands
  with open(os.path.join(root, MD_FILE)) as f:
    print(f.read())
  print("wrote", os.path.join(root, PNG_FILE))


if __name__ == "__main__":
  app.run(main)
