r"""Publishes a protocol's outputs under docs/results and into the README.

  python -m experiments.protocols.publish --root=runs/small_data \
      --name=small_data           # copy the outputs, record the run time
  python -m experiments.protocols.publish --readme   # refresh README tables

`--root` is a protocol's directory (`experiments/sweep.py`,
`semi_supervised.py`, `grid_cells.py`, `pretrain_finetune.py`,
`relatedness.py`): its top-level outputs (`*.md`, `*.json`, `*.csv`,
`*.png`; never the runs' workdirs) are copied to `docs/results/<name>/`,
with `runtime.json` (and the same as a line of Markdown, `runtime.md`): the
number of finished runs and their training time (each run from its first
start, the first line of its `runs.jsonl` (runs made before that record:
`config.json`'s time), to its `results.json`), summed and from the first
start to the last end.

`--readme` replaces every block of README.md between

  <!-- results: <name>/<file>.md -->
  ...
  <!-- /results -->

by the content of `docs/results/<name>/<file>.md` (its headings three levels
down), so that the README's
tables are the scripts' output files, never retyped;
`tests/publish_test.py` checks that the README is up to date.
"""

from __future__ import annotations

import calendar
import glob
import json
import os
import re
import shutil
import time

from absl import app
from absl import flags

from experiments import sweep as sweep_lib
from mtl_jax.training import run_config

RESULTS_DIR = "docs/results"
README = "README.md"
OUTPUT_PATTERNS = ("*.md", "*.json", "*.csv", "*.png")
RUNTIME_FILE = "runtime.json"
RUNTIME_MD = "runtime.md"
BLOCK = re.compile(r"(<!-- results: (?P<path>[^ ]+) -->\n)(?P<body>.*?)"
                   r"(<!-- /results -->)", re.DOTALL)

# --root is the sweep's flag (the protocol's directory, as for the scripts).
_ROOT = sweep_lib.ROOT
_NAME = flags.DEFINE_string("name", None,
                            "docs/results/<name>/ receives the outputs.")
_README = flags.DEFINE_bool("readme", False,
                            "Refresh the README's result blocks.")


def _first_start(workdir: str) -> float | None:
  """When the run in `workdir` first started (seconds since the epoch): the
  first line of its `runs.jsonl`; for runs made before that record, the
  time `config.json` was written (rewritten at every start, so the last
  start); None without either."""
  history = run_config.read_history(workdir)
  if history and "time" in history[0]:
    return float(calendar.timegm(time.strptime(history[0]["time"],
                                               "%Y-%m-%dT%H:%M:%SZ")))
  config = os.path.join(workdir, "config.json")
  return os.path.getmtime(config) if os.path.exists(config) else None


def runtime(root: str) -> dict[str, float]:
  """Finished runs under `root` and their training time in seconds."""
  spans = []
  for results in glob.glob(os.path.join(root, "**", "results.json"),
                           recursive=True):
    start = _first_start(os.path.dirname(results))
    if start is not None:
      spans.append((start, os.path.getmtime(results)))
  if not spans:
    raise ValueError(f"publish: no finished run (results.json) under {root!r}")
  return {"runs": len(spans),
          "run_seconds": round(sum(end - start for start, end in spans), 1),
          "wall_seconds": round(max(e for _, e in spans)
                                - min(s for s, _ in spans), 1)}


def publish(root: str, name: str, out_dir: str = RESULTS_DIR) -> list[str]:
  """Copies `root`'s outputs to `<out_dir>/<name>/`; returns the files."""
  if not os.path.isdir(root):
    raise ValueError(f"publish: {root!r} is not a directory")
  files = sorted(f for p in OUTPUT_PATTERNS
                 for f in glob.glob(os.path.join(root, p)))
  if not files:
    raise ValueError(f"publish: {root!r} holds no output ({OUTPUT_PATTERNS})")
  target = os.path.join(out_dir, name)
  os.makedirs(target, exist_ok=True)
  copied = []
  for f in files:
    shutil.copyfile(f, os.path.join(target, os.path.basename(f)))
    copied.append(os.path.join(target, os.path.basename(f)))
  times = runtime(root)
  with open(os.path.join(target, RUNTIME_FILE), "w") as f:
    json.dump(times, f, indent=2, sort_keys=True)
  with open(os.path.join(target, RUNTIME_MD), "w") as f:
    f.write(runtime_markdown(times))
  return copied + [os.path.join(target, n) for n in (RUNTIME_FILE,
                                                      RUNTIME_MD)]


def runtime_markdown(times: dict[str, float]) -> str:
  """One line for the README: runs and minutes on this machine."""
  return (f"{times['runs']} runs; {times['run_seconds'] / 60:.0f} minutes of "
          f"training summed over the runs, {times['wall_seconds'] / 60:.0f} "
          "minutes from the first start to the last end (2 CPU cores, "
          "shared with other protocols' runs).\n")


def render(readme: str, results_dir: str = RESULTS_DIR) -> str:
  """`readme` with every result block replaced by its file's content."""

  def block(match: re.Match) -> str:
    path = os.path.join(results_dir, match.group("path"))
    if not os.path.exists(path):
      raise ValueError(f"publish: README block names {path!r}, which does "
                       "not exist")
    with open(path) as f:
      body = f.read().strip("\n") + "\n"
    # The file's headings go three levels down (under the README's ###).
    body = re.sub(r"^#", "####", body, flags=re.MULTILINE)
    return match.group(1) + body + match.group(4)

  return BLOCK.sub(block, readme)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _ROOT.value or _NAME.value:
    if not (_ROOT.value and _NAME.value):
      raise app.UsageError("--root and --name go together")
    for path in publish(_ROOT.value, _NAME.value):
      print("wrote", path)
  if _README.value:
    with open(README) as f:
      text = f.read()
    new = render(text)
    with open(README, "w") as f:
      f.write(new)
    print("README.md:", "updated" if new != text else "up to date")


if __name__ == "__main__":
  app.run(main)
