r"""Command-line mistakes of `experiments.train` as one line, exit code 2.

  python -m experiments.train --config.num_step=10
  error: unknown config field 'num_step' (in --config.num_step=10); valid
  fields under config: ..., did you mean 'num_steps'?

`check_command_line`, called before the config flag is defined (which reads
the overrides of sys.argv at once), checks that the config file loads and
that every `--config.<path>[=<value>]` argument names one of its fields
(ml_collections would raise an AttributeError with a traceback);
`parse_flags`, `app.run`'s `flags_parser`, turns any flag-parsing error that
is left (a value of the wrong type, an unknown flag) into the same form: one
line on stderr, `error: ...`, and exit code 2 (the usage-error code of
argparse), no traceback. `--help` and `--helpfull` behave as in absl.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any, Sequence

from absl import flags
import ml_collections

# What `sys.exit` gets for a command-line mistake.
USAGE_EXIT_CODE = 2


class CommandLineError(ValueError):
  """A command-line mistake; its message is the one line shown."""


def _config_path(argv: Sequence[str], flag: str, default: str) -> str:
  """The value of `--<flag>` in `argv` (the last one), or `default`."""
  path = default
  for i, arg in enumerate(argv):
    if arg == f"--{flag}" and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith(f"--{flag}="):
      path = arg.split("=", 1)[1]
  return path


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file spec `path[:argument]`, as
  `config_flags.DEFINE_config_file` reads it.

  Raises:
    CommandLineError: the file does not exist or has no `get_config`.
  """
  path, sep, argument = spec.partition(":")
  if not os.path.isfile(path):
    raise CommandLineError(f"config file {path!r} (--config={spec}) does not "
                           "exist")
  try:
    module_spec = importlib.util.spec_from_file_location("_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_config = module.get_config
    return get_config(argument) if sep else get_config()
  except Exception as e:  # pylint: disable=broad-except  # shown as one line
    raise CommandLineError(
        f"config file {spec!r} does not load: {type(e).__name__}: "
        f"{' '.join(str(e).split())}") from e


def _overrides(argv: Sequence[str], flag: str) -> list[tuple[str, str]]:
  """`(dotted path, argument as typed)` of each `--<flag>.<path>` argument."""
  found = []
  for arg in argv:
    if arg == "--":
      break
    for prefix in (f"--{flag}.", f"--no{flag}.", f"-{flag}."):
      if arg.startswith(prefix):
        found.append((arg[len(prefix):].split("=", 1)[0], arg))
  return found


def _type_name(value: Any) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    return "a group of fields"
  name = type(value).__name__
  return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def check_override(config: ml_collections.ConfigDict, path: str, arg: str,
                   root: str = "config") -> None:
  """Checks that the dotted `path` names a field of `config`.

  Raises:
    CommandLineError: an unknown field (with the valid fields at that level
      and the closest name) or a path through a field that is a value.
  """
  node, where = config, root
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      raise CommandLineError(
          f"config field {where!r} is {_type_name(node)}, not a group of "
          f"fields: {where}.{part} does not exist (in {arg})")
    if part not in node:
      valid = sorted(node.keys())
      close = difflib.get_close_matches(part, valid, n=1)
      hint = f", did you mean {close[0]!r}?" if close else ""
      raise CommandLineError(
          f"unknown config field {part!r} (in {arg}); valid fields under "
          f"{where}: {', '.join(valid)}{hint}")
    node, where = node[part], f"{where}.{part}"


def check_overrides(argv: Sequence[str], flag: str = "config",
                    default: str = "") -> None:
  """Checks that the config file (`--<flag>`'s, or `default`) loads and that
  every `--<flag>.<path>` of `argv` names one of its fields
  (`check_override`).

  Raises:
    CommandLineError: the first mistake.
  """
  config = load_config_file(_config_path(argv, flag, default))
  for path, arg in _overrides(argv, flag):
    check_override(config, path, arg, root=flag)


def _fail(message: str) -> None:
  sys.stderr.write(f"error: {message}\n")
  sys.exit(USAGE_EXIT_CODE)


def check_command_line(argv: Sequence[str], flag: str = "config",
                       default: str = "") -> None:
  """`check_overrides` of `argv[1:]`, exiting with one line and code
  `USAGE_EXIT_CODE` on a mistake.

  Call it before `config_flags.DEFINE_config_file`, which reads the
  overrides of `sys.argv` when it is defined (an unknown field raises
  there, at import). `--help`/`--helpfull` skip the checks.
  """
  if any(a in ("--help", "--helpfull", "--helpshort", "-h", "-?")
         for a in argv[1:]):
    return
  try:
    check_overrides(argv[1:], flag, default)
  except CommandLineError as e:
    _fail(str(e))


def _message(error: Exception, argv: Sequence[str], flag: str,
             default: str) -> str:
  """One line for a flag-parsing error; a wrong value names the field's
  type."""
  text = " ".join(str(error).split())
  if isinstance(error, flags.IllegalFlagValueError) and text.startswith(
      f"flag --{flag}."):
    arg = text[len("flag "):].split(": ", 1)[0]
    path = arg[len(f"--{flag}."):].split("=", 1)[0]
    try:
      node = load_config_file(_config_path(argv, flag, default))
      for part in path.split("."):
        node = node[part]
      expected = f"{flag}.{path} is {_type_name(node)}; "
    except Exception:  # pylint: disable=broad-except  # the message suffices
      expected = ""
    return f"invalid value in {arg}: {expected}{text.split(': ', 1)[-1]}"
  return text


def parse_flags(argv: list[str], flag: str = "config",
                default: str = "") -> list[str]:
  """`app.run`'s `flags_parser`: absl's flag parsing, with command-line
  mistakes as one line on stderr and exit code `USAGE_EXIT_CODE`."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # shown as one line
    _fail(_message(e, argv[1:], flag, default))
