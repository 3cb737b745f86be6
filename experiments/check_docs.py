r"""Runs the shell commands of README.md and BUILD.md as written, in a short
setting; one line per command: PASS, FAIL (the first error line) or SKIP (why).

  python -m experiments.check_docs           # fast: every flag of every command
  python -m experiments.check_docs --full    # and run them (several minutes)

Commands are read from the fenced code blocks (``` without a language, or
sh/bash/shell/console; the ```python blocks are the library quick-start, run by
tests/quickstart_test.py) whose lines start with a command word (`python -m
experiments.`, `.venv/bin/python`, `make`, `pip`, `tfds`, `tensorboard`,
`bash`, `for`, `gcloud`, `srun`, `VAR=value ...`); `\` continuations are
joined, comments dropped. A line of options alone (indented, starting with
`--` or `'--`) after a comment is a variant of the block's last command: that
command plus those options. `[...]` marks an optional part, `a|b` inside it
alternatives: the fast mode checks each alternative, the full mode leaves the
optional part out.

Fast mode (no training, one process): each `python -m experiments.<script>`
command's flags are parsed by the flags the script defines (imported here, the
`--config`/`--sweep`/`--protocol` config files loaded and their
`--<flag>.<field>` overrides applied as ml_collections does, with the one-line
messages of experiments/cli.py), and `experiments.train`'s resolved config goes
through `train.check_config`; `python -c` code is compiled; `pytest` file
arguments must exist.

Full mode runs them too, from the repository root with the venv's python
(`python` -> sys.executable), each output path (`--workdir`, `--root`,
`--results`, `--out`, `--out_dir`) redirected to a temporary directory and a
short setting appended per script (`SHORT`): experiments.train gets
`--print_config` (one process) and then a 3-step run (`--config.num_steps=3
--config.eval_every=3`, and `--config.data.data_dir=data/tfds` where the
command names none); `--config.init_from` points at the last run this check
made; the protocol scripts run `--mode=commands` (plan every run, train none);
tabular, toy_pareto and benchmark their docstrings' quick settings. A train
command whose dataset is not prepared here is SKIP with the missing data's
message. Not runnable here, and SKIP with the reason: package installs (need
the network), `tfds build` (TensorFlow and the network), `make run`/`make test`
(minutes; the commands they wrap are checked here), TensorBoard (a server),
gcloud and srun (a TPU VM, a SLURM cluster: their `experiments.train` flags are
still checked). Exit code 1 if any command FAILs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import itertools
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Iterator, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "BUILD.md")
# A fenced block's languages whose lines are shell commands.
SHELL_LANGUAGES = ("", "sh", "bash", "shell", "console")
# First words of a command line (after `VAR=value` assignments).
COMMAND_WORDS = ("python", "python3", ".venv/bin/python", ".venv/bin/pip",
                 "pip", "make", "tfds", "tensorboard", "bash", "for", "gcloud",
                 "srun")
# Flags whose value is a config file (ml_collections.config_flags).
CONFIG_FILE_FLAGS = ("config", "sweep", "protocol")
# Flags whose value is a path the command writes: a temporary one in --full.
OUTPUT_FLAGS = ("workdir", "root", "results", "out", "out_dir")
# The short setting appended to each script's command in --full.
SHORT = {
    "experiments.train": ["--config.num_steps=3", "--config.eval_every=3"],
    "experiments.sweep": ["--mode=commands"],
    "experiments.semi_supervised": ["--mode=commands"],
    "experiments.pretrain_finetune": ["--mode=commands"],
    "experiments.grid_cells": ["--mode=commands"],
    "experiments.relatedness": ["--mode=commands"],
    "experiments.tabular": ["--problems=linnerud", "--num_seeds=1",
                            "--missing_rates=0.3", "--max_epochs=5"],
    "experiments.toy_pareto": ["--steps=20"],
    "experiments.benchmark": ["--num_tasks=2", "--steps=1", "--rounds=1",
                              "--warmup=0"],
}
DATA_DIR = "data/tfds"
SHELL_OPERATORS = ("&", ";", "|", "&&", "||", "done")
SUBPROCESS_TIMEOUT_SEC = 900


@dataclasses.dataclass
class Command:
  """A documented command: where it is written and its text (one line)."""
  source: str  # "README.md:239"
  text: str


@dataclasses.dataclass
class Result:
  command: Command
  status: str  # PASS, FAIL or SKIP
  detail: str = ""

  def line(self) -> str:
    detail = f": {self.detail}" if self.detail else ""
    return f"{self.status} {self.command.source} {self.command.text}{detail}"


def _strip_comment(line: str) -> str:
  """`line` without its `#` comment (a `#` outside quotes after a space)."""
  quote = None
  for i, char in enumerate(line):
    if quote:
      if char == quote:
        quote = None
    elif char in "'\"":
      quote = char
    elif char == "#" and (i == 0 or line[i - 1].isspace()):
      return line[:i].rstrip()
  return line.rstrip()


def _first_word(text: str) -> str:
  words = text.split()
  while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
    words = words[1:]
  return words[0] if words else ""


def _blocks(markdown: str) -> Iterator[tuple[int, list[str]]]:
  """(line number of the first line, lines) of each shell fenced block."""
  lines = markdown.splitlines()
  i = 0
  while i < len(lines):
    match = re.match(r"\s*```\s*(\S*)", lines[i])
    if not match:
      i += 1
      continue
    language, start, i = match.group(1).lower(), i + 1, i + 1
    while i < len(lines) and not re.match(r"\s*```", lines[i]):
      i += 1
    if language in SHELL_LANGUAGES:
      yield start + 1, lines[start:i]
    i += 1


def extract(markdown: str, name: str) -> list[Command]:
  """The commands of `markdown`'s shell blocks (see the module docstring)."""
  commands = []
  for first, lines in _blocks(markdown):
    base = None  # the block's last command (for option-only variant lines)
    i = 0
    while i < len(lines):
      number, text = first + i, _strip_comment(lines[i])
      raw = lines[i]
      while text.endswith("\\") and i + 1 < len(lines):
        i += 1
        text = text[:-1].rstrip() + " " + _strip_comment(lines[i]).strip()
      i += 1
      if re.match(r"\s*for\s", text):  # a loop: up to its `done`
        while not re.search(r"(^|[\s;])done\b", text) and i < len(lines):
          text += " " + _strip_comment(lines[i]).strip()
          while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1].rstrip() + " " + _strip_comment(lines[i]).strip()
          i += 1
      stripped = text.strip()
      if not stripped:
        continue
      if raw[:1].isspace() and re.match(r"'?--", stripped) and base:
        commands.append(Command(f"{name}:{number}",
                                f"{base.text} {stripped}"))
      elif _first_word(stripped) in COMMAND_WORDS:
        base = Command(f"{name}:{number}", " ".join(stripped.split()))
        commands.append(base)
  return commands


def documented_commands(docs: Sequence[str] = DOCS) -> list[Command]:
  """The commands of `docs` (paths relative to the repository root)."""
  commands = []
  for name in docs:
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
      commands.extend(extract(f.read(), os.path.basename(name)))
  return commands


def _tokens(text: str) -> list[str]:
  return shlex.split(text.replace("[", " [ ").replace("]", " ] "))


def invocations(text: str) -> list[tuple[str, list[str]]]:
  """(module, arguments) of each `python -m <module> ...` in `text` (also
  inside a quoted `--command=...` string); `[`/`]` tokens mark optional parts.
  """
  found = []
  tokens = _tokens(text)
  for i, token in enumerate(tokens):
    if " -m " in token:  # a command in a quoted argument (gcloud --command)
      found.extend(invocations(token.split("=", 1)[-1]))
    if token == "-m" and i > 0 and "python" in tokens[i - 1] and i + 1 < len(
        tokens):
      args = []
      for arg in tokens[i + 2:]:
        if arg in SHELL_OPERATORS:
          break
        args.append(arg)
      found.append((tokens[i + 1], args))
  return found


def variants(args: Sequence[str]) -> list[list[str]]:
  """`args` with each optional part's alternatives (`[--mode=a|b]`: a, b)."""
  choices, optional = [], False
  for arg in args:
    if arg == "[":
      optional = True
    elif arg == "]":
      optional = False
    elif optional and "=" in arg and "|" in arg:
      name, values = arg.split("=", 1)
      choices.append([f"{name}={v}" for v in values.split("|")])
    else:
      choices.append([arg])
  return [list(c) for c in itertools.product(*choices)]


def without_optional(args: Sequence[str]) -> list[str]:
  kept, optional = [], False
  for arg in args:
    if arg in ("[", "]"):
      optional = arg == "["
    elif not optional:
      kept.append(arg)
  return kept


class FlagChecker:
  """Parses command lines with the flags of `experiments.*` scripts, each
  imported alone in this process (its flags removed before the next)."""

  def __init__(self):
    from absl import flags  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top,unused-import
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
    self._flags = flags.FLAGS
    self._baseline = set(self._flags)
    self._script, self._defined = None, {}

  def _purge(self) -> None:
    for name in set(self._flags) - self._baseline:
      delattr(self._flags, name)
    for name in list(sys.modules):
      if (name == "experiments" or name.startswith("experiments.")) and (
          name != __name__):
        del sys.modules[name]

  def _load(self, module: str):
    if self._script != module:
      self._purge()
      self._script = module
      saved, sys.argv = sys.argv, [module]
      try:
        importlib.import_module(module)
      finally:
        sys.argv = saved
      registries = [self._flags]
      own = getattr(sys.modules[module], "FLAGS", None)
      if isinstance(own, type(self._flags)) and own is not self._flags:
        registries.append(own)  # a script's own registry (benchmark)
      self._defined = {r[n].name: r[n] for r in registries for n in r}
    return sys.modules[module]

  def check(self, module: str, args: Sequence[str]) -> None:
    """Parses `args` as `python -m <module>` would (flag names, values,
    config files and their overrides); experiments.train's config also goes
    through `check_config`.

    Raises:
      ValueError: the first mistake, in one line.
    """
    from absl import flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
    from experiments import cli  # pylint: disable=g-import-not-at-top
    try:
      script = self._load(module)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{module} does not import: {type(e).__name__}: "
                       f"{e}") from e
    values = flags.FlagValues()
    argv = [module] + list(args)
    for name, flag in self._defined.items():
      if type(flag).__name__ == "_ConfigFlag":
        default = flag.default_as_str.strip("'\"")
        default = None if default in ("", "None") else default
        try:
          cli.check_overrides(args, name, default or "")
        except cli.CommandLineError as e:
          if default or any(a.startswith((f"--{name}=", f"--{name}."))
                            for a in args):
            raise ValueError(str(e)) from e
        config_flags.DEFINE_config_file(name, default, flag.help,
                                        flag_values=values, sys_argv=argv)
      else:
        values[name] = copy.deepcopy(flag)
    try:
      values(argv)
    except flags.Error as e:
      raise ValueError(" ".join(str(e).split())) from e
    if module == "experiments.train":
      try:
        script.check_config(values["config"].value)
      except ValueError as e:
        raise ValueError(" ".join(str(e).split())) from e


def _skip_reason(text: str) -> str | None:
  """Why `text` is not run here, or None."""
  word = _first_word(text)
  words = text.split()
  if word in ("pip", ".venv/bin/pip"):
    return "installs packages (needs the network)"
  if word == "python3" and "venv" in words:
    return "creates a virtualenv (then pip needs the network)"
  if word == "tfds":
    return "tfds build needs TensorFlow and the network"
  if word == "tensorboard":
    return "starts a server"
  if word == "gcloud":
    return "needs a Cloud TPU VM (its experiments.train flags are checked)"
  if word == "srun":
    return "needs a SLURM cluster (its experiments.train flags are checked)"
  if word == "bash":
    return "a long script"
  if word == "make":
    target = words[1] if len(words) > 1 else ""
    if target == "venv":
      return "creates/refreshes .venv with pip (needs the network)"
    if target == "run":
      return ("make run trains the default experiment (~2 min); its "
              "experiments.train command is the one checked here")
    return f"make {target} runs the test suite (minutes)"
  if "pytest" in words and "tests" in words:
    return "the whole test suite (~10 min; make test)"
  return None


def _loop_values(text: str) -> str:
  """`text` with a `for NAME in A B; do` loop's `$NAME` set to A."""
  match = re.match(r"\s*for\s+(\w+)\s+in\s+(\S+)", text)
  if not match:
    return text
  name, value = match.groups()
  return re.sub(rf"\$\{{?{name}\}}?\b", value, text)


def check_fast(command: Command, checker: FlagChecker) -> Result:
  """The fast check of one command (PASS, FAIL or SKIP)."""
  try:
    for module, args in invocations(_loop_values(command.text)):
      if module.startswith("experiments."):
        for argv in variants(args):
          checker.check(module, argv)
      elif module == "pytest":
        for arg in args:
          if arg.startswith("tests") and not os.path.exists(
              os.path.join(REPO, arg)):
            raise ValueError(f"no such test path: {arg}")
    match = re.search(r"python -c (\"[^\"]*\"|'[^']*')", command.text)
    if match:
      compile(shlex.split(match.group(1))[0], "<doc>", "exec")
  except (ValueError, SyntaxError) as e:
    return Result(command, "FAIL", str(e))
  reason = _skip_reason(command.text)
  if reason:
    return Result(command, "SKIP", reason)
  return Result(command, "PASS")


def _short_text(text: str, tmp: str, last_run: str | None) -> str:
  """`text` as run in --full: optional parts dropped, output paths in `tmp`,
  init_from the last run, each python script with its short setting."""
  text = re.sub(r"\s*\[[^\]]*\]", "", text)
  text = re.sub(r"(^|[\s;\"])(?:\.venv/bin/)?python3? ",
                lambda m: f"{m.group(1)}{sys.executable} ", text)
  for i, name in enumerate(OUTPUT_FLAGS):
    text = re.sub(rf"--{name}=\S+", f"--{name}={tmp}/{name}{i}", text)
  if last_run:
    text = re.sub(r"--config\.init_from=\S+", f"--config.init_from={last_run}",
                  text)
  pieces = []
  for match in re.finditer(r"-m (experiments\.\w+(?:\.\w+)*)", text):
    module = match.group(1)
    end = len(text)
    for op in (" & ", " &", "; ", " && ", " | "):
      at = text.find(op, match.end())
      if at != -1:
        end = min(end, at)
    extra = list(SHORT.get(module, []))
    if module == "experiments.train" and "--config.data.data_dir" not in text:
      extra.append(f"--config.data.data_dir={DATA_DIR}")
    pieces.append((end, " " + " ".join(extra)))
  for end, extra in sorted(pieces, reverse=True):
    text = text[:end] + extra + text[end:]
  return text


def _first_error(output: str) -> str:
  lines = [l.strip() for l in output.splitlines() if l.strip()]
  for line in lines:
    if line.startswith("error:") or re.match(r"\w*(Error|Exception)\b", line):
      return line[:300]
  return (lines[-1] if lines else "no output")[:300]


def _shell(text: str, timeout: int = SUBPROCESS_TIMEOUT_SEC):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get(
      "PYTHONPATH", ""))
  return subprocess.run(["bash", "-c", text], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def run_full(command: Command, fast: Result, tmp: str,
             state: dict[str, str]) -> Result:
  """Runs one command in its short setting (after its fast check passed)."""
  if fast.status != "PASS":
    return fast
  text = command.text
  start = time.time()
  if any(m == "experiments.train" for m, _ in invocations(text)) and (
      " for " not in f" {text}"):
    for module, args in invocations(text):
      args = without_optional(args)
      done = _shell(shlex.join([sys.executable, "-m", module, *args,
                                "--print_config"]))
      if done.returncode:
        return Result(command, "FAIL", "--print_config: " + _first_error(
            done.stderr + done.stdout))
  short = _short_text(text, tempfile.mkdtemp(dir=tmp), state.get("last_run"))
  try:
    done = _shell(short)
  except subprocess.TimeoutExpired:
    return Result(command, "FAIL", f"timed out: {short}")
  output = done.stderr + done.stdout
  seconds = f"{time.time() - start:.0f} s"
  if done.returncode:
    error = _first_error(output)
    if "tfds build" in output or "not prepared" in output:
      return Result(command, "SKIP", f"data not prepared here: {error}")
    return Result(command, "FAIL", f"{error} (ran: {short})")
  match = re.search(r"--workdir=(\S+)", short)
  if match and "experiments.train" in short:
    state["last_run"] = match.group(1)
  return Result(command, "PASS", seconds)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.check_docs",
      description=__doc__.split("\n\n")[0])
  parser.add_argument("--full", action="store_true",
                      help="also run each command in a short setting")
  parser.add_argument("--tmp", default=None,
                      help="where the runs write (default: a new temp dir)")
  parser.add_argument("--match", default="",
                      help="only the commands whose text contains this")
  parser.add_argument("--doc", action="append", default=None,
                      help=f"a Markdown file to read instead of {DOCS}")
  options = parser.parse_args(argv)
  commands = [c for c in documented_commands(options.doc or DOCS)
              if options.match in c.text]
  checker = FlagChecker()
  tmp = options.tmp or tempfile.mkdtemp(prefix="check_docs_")
  state = {}
  counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
  for command in commands:
    result = check_fast(command, checker)
    if options.full:
      result = run_full(command, result, tmp, state)
    counts[result.status] += 1
    print(result.line(), flush=True)
  print(", ".join(f"{n} {s}" for s, n in counts.items()))
  return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
  sys.exit(main())
