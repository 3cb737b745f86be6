"""Guards a workdir: writable, and never resumed with a different configuration."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable, Mapping

CONFIG_FILE = "config.json"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(_flatten(value, path + "."))
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
                   ) -> None:
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

  Raises:
    ValueError: the workdir holds a run of a different config; names the keys.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  new = _flatten(json.loads(json.dumps(config)))
  if os.path.exists(path):
    with open(path) as f:
      old = _flatten(json.load(f))
    diff = sorted(k for k in set(old) | set(new)
                  if not _allowed(k, may_differ) and old.get(k, "<absent>") !=
                  new.get(k, "<absent>"))
    if diff:
      details = "; ".join(f"{k}: {old.get(k, '<absent>')!r} -> "
                          f"{new.get(k, '<absent>')!r}" for k in diff[:10])
      raise ValueError(
          f"workdir {workdir!r} holds a run of a different config ({details}). "
          "Use a new --workdir, or delete this one to start over.")
  if not write:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  os.replace(tmp, path)  # atomic: never a half-written config.json
