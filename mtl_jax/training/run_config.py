"""Guards a workdir: writable, never resumed with a different configuration,
and the record of every (re)start.

`<workdir>/config.json` is the run's current config: the one its latest
start ran with, which is what the checkpoints were last trained with and
what tools that rebuild the run read (`experiments/learnability.py`,
`relatedness.py`, `grid_cells.py`). A resume may change only the keys it is
allowed to change (the device layout, the length, logging). How each start
was made is appended to `<workdir>/runs.jsonl` (`append_start`), never
rewritten: its first line holds the first start's full config, each later
line the keys that start changed (`{key: [old, new]}`), and every line the
time, command line, devices, parallelism and process count.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable, Mapping

CONFIG_FILE = "config.json"
HISTORY_FILE = "runs.jsonl"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "."))
    else:
      out[path] = list(value) if isinstance(value, tuple) else value
  return out


def _allowed(key: str, may_differ: Iterable[str]) -> bool:
  return any(key == k or (k.endswith(".*") and key.startswith(k[:-1]))
             for k in may_differ)


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and checks that files can be written in it.

  Raises:
    PermissionError: the directory cannot be created or written (read-only
      file system, permissions, a file in the way); names the directory.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
      pass
  except OSError as e:
    raise PermissionError(
        f"workdir {workdir!r} is not writable ({e.strerror or e}); choose "
        "another --workdir or fix its permissions. Nothing was trained.") from e


def check_or_write(workdir: str, config: Mapping[str, Any],
                   may_differ: Iterable[str] = (), *, write: bool = True
                   ) -> dict[str, list[Any]]:
  """Writes `config` to `<workdir>/config.json`, or checks it against the saved one.

  A workdir belongs to one run. Resuming it with a config that would change the
  result (another model, dataset, seed, ...) would silently mix two experiments,
  so it is an error. Keys in `may_differ` (e.g. logging intervals, or the number
  of steps to extend a run) are allowed to change and are updated.

  Args:
    workdir: the run directory (created if missing).
    config: the run's config as a plain nested dict of JSON values.
    may_differ: dotted keys that may change between the runs of one workdir;
      `"a.*"` allows every key under `a`.
    write: False on all but one process of a multi-process run (they only
      check).

  Returns:
    The keys that changed since the saved config, `{key: [old, new]}` (all
    in `may_differ`; `{}` for a new workdir).

  Raises:
    ValueError: the workdir holds a run of a different config; names the keys.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  new = flatten(json.loads(json.dumps(config)))
  changed = {}
  if os.path.exists(path):
    with open(path) as f:
      old = flatten(json.load(f))
    diff = sorted(k for k in set(old) | set(new)
                  if not _allowed(k, may_differ) and old.get(k, "<absent>") !=
                  new.get(k, "<absent>"))
    if diff:
      details = "; ".join(f"{k}: {old.get(k, '<absent>')!r} -> "
                          f"{new.get(k, '<absent>')!r}" for k in diff[:10])
      raise ValueError(
          f"workdir {workdir!r} holds a run of a different config ({details}). "
          "Use a new --workdir, or delete this one to start over.")
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
               if old.get(k, "<absent>") != new.get(k, "<absent>")}
  if not write:
    return changed
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  os.replace(tmp, path)  # atomic: never a half-written config.json
  return changed


def read_history(workdir: str) -> list[dict[str, Any]]:
  """The start records of `<workdir>/runs.jsonl`, oldest first ([] when
  none)."""
  path = os.path.join(workdir, HISTORY_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_start(workdir: str, record: Mapping[str, Any],
                 config: Mapping[str, Any], changed: Mapping[str, Any]
                 ) -> dict[str, Any]:
  """Appends one start's record to `<workdir>/runs.jsonl`: `record` (time,
  command line, devices, ...), with `config` (the full config) on the first
  line and `changed` (`check_or_write`'s return) on later ones. Returns the
  line written."""
  line = dict(record)
  if read_history(workdir):
    line["changed"] = dict(changed)
  else:
    line["config"] = json.loads(json.dumps(config))
  with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
    f.write(json.dumps(line, sort_keys=True) + "\n")
  return line
