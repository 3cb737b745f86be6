"""Metric writers (JSONL + TensorBoard), console progress, and a PNG of curves."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

from absl import logging


def _to_float(value: Any) -> float:
  return float(value)


JSONL_FILE = "metrics.jsonl"


class MetricWriter:
  """Appends `{"step": s, "split": ..., **scalars}` lines to `metrics.jsonl` and
  writes the same scalars as TensorBoard events under `<workdir>/tb`.

  Args:
    workdir: the run directory.
    enabled: False on non-zero processes of a multi-host run (they write nothing).
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, JSONL_FILE)
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(
            "MetricWriter writes TensorBoard events with tensorboardX, which "
            "is not installed: pip install 'mtl-jax[tensorboard]'") from e
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: Mapping[str, Any], *,
            split: str = "train") -> None:
    if not self.enabled:
      return
    values = {k: _to_float(v) for k, v in scalars.items()}
    record = {"step": int(step), "split": split, **values}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(record, allow_nan=True) + "\n")
    for key, value in values.items():
      if math.isfinite(value):
        self._tb.add_scalar(f"{split}/{key}", value, int(step))
    self._tb.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes a run's hyperparameters to TensorBoard: the HParams dashboard
    (values as bool, int, float or str; lists and None as str) and a
    "hparams" text summary (a Markdown table, the same values)."""
    if not self.enabled:
      return
    from tensorboardX.summary import hparams as hparams_summary  # pylint: disable=g-import-not-at-top
    values = {k: hparam_value(v) for k, v in sorted(hparams.items())}
    writer = self._tb._get_file_writer()  # pylint: disable=protected-access
    for summary in hparams_summary(values, {}):
      writer.add_summary(summary)
    self._tb.add_text("hparams", "| hyperparameter | value |\n|---|---|\n" +
                      "\n".join(f"| {k} | {v} |" for k, v in values.items()),
                      0)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def hparam_value(value: Any) -> bool | int | float | str:
  """`value` as TensorBoard's HParams plugin takes it (bool, int, float or
  str; anything else as its str)."""
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (list, tuple)):
    return ",".join(str(v) for v in value)
  return str(value)


class Progress:
  """Formats steps/s and ETA for the console."""

  def __init__(self, start_step: int, total_steps: int):
    self.total_steps = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    """Returns `steps_per_sec` and `eta_sec` since the previous call."""
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "eta_sec": eta}


def format_progress(step: int, total: int, scalars: Mapping[str, float],
                    keys: tuple[str, ...]) -> str:
  parts = [f"step {step}/{total}"]
  if "steps_per_sec" in scalars:
    parts.append(f"{scalars['steps_per_sec']:.1f} steps/s")
    eta = scalars.get("eta_sec", float("inf"))
    parts.append(f"ETA {eta:.0f}s" if math.isfinite(eta) else "ETA ?")
  parts += [f"{k}={scalars[k]:.4g}" for k in keys if k in scalars]
  return " | ".join(parts)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a metrics JSONL file.

  A last line cut off by a crash (no newline, not valid JSON) is ignored.
  """
  with open(path) as f:
    lines = f.read().split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:  # the unfinished last line
        break
      raise
  return records


def truncate_jsonl(path: str, step: int) -> None:
  """Drops the records of steps after `step` (and a cut-off last line).

  A run resumed from the checkpoint of `step` logs the later steps again;
  without this they would appear twice. The file is replaced atomically.
  """
  if not os.path.exists(path):
    return
  kept = [r for r in read_jsonl(path) if r["step"] <= step]
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(path + ".tmp", path)


def plot_curves(jsonl_path: str, png_path: str, task_names: tuple[str, ...],
                eval_metrics: tuple[str, ...] = (), eval_split: str = "eval"
                ) -> None:
  """Plots train task losses and the `eval_split` records' metrics
  ("validation", or "eval" for runs evaluated on the test split) against
  the step into a PNG; panels are titled with the records' split name, as
  in metrics.jsonl and on the console ("eval ... (test split)")."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = read_jsonl(jsonl_path)
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == eval_split]
  panels = 1 + len(eval_metrics)  # train losses, then one panel per metric
  ncols = min(panels, 3)
  nrows = -(-panels // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.5 * nrows),
                           squeeze=False)
  axes = axes.ravel()
  ax = axes[0]
  for name in task_names:
    pts = [(r["step"], r[f"{name}/loss"]) for r in train
           if f"{name}/loss" in r and r.get(f"{name}/count", 1) > 0]
    if pts:
      ax.plot(*zip(*pts), label=name)
  ax.set(xlabel="step", ylabel="train loss", yscale="log",
         title="per-task train loss")
  ax.legend()
  for ax, key in zip(axes[1:], eval_metrics):
    pts = [(r["step"], r[key]) for r in evals if key in r]
    if pts:
      ax.plot(*zip(*pts), marker="o")
    ax.set(xlabel="step", ylabel=key, title=f"{eval_split} {key}" + (
        " (test split)" if eval_split == "eval" else ""))
    ax.grid(alpha=0.3)
  for ax in axes[panels:]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
  logging.info("wrote %s", png_path)
