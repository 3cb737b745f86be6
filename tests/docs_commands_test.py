"""The README/BUILD.md shell commands: extracted, and every flag of every
documented `python -m experiments.*` command exists and parses
(experiments/check_docs.py's fast mode; its --full mode runs them, minutes).

The flag checks run in a subprocess: check_docs imports each script alone,
removing the previous one's flags, which would break other tests' modules in
this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from experiments import check_docs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, "-m", "experiments.check_docs", *args], cwd=REPO,
      env=env, capture_output=True, text=True, timeout=120)


def test_extracts_the_documented_commands():
  commands = check_docs.documented_commands()
  texts = [c.text for c in commands]
  pairs = [(c.source, c.text) for c in commands]
  assert ("README.md:9", "make run") in pairs
  assert ("BUILD.md:73", "make run") in pairs
  assert "python -m experiments.tabular --results=runs/tabular" in texts
  assert (".venv/bin/python -m experiments.train "
          "--config=experiments/configs/smallnorb.py --workdir=runs/smallnorb "
          "--config.data.data_dir=data/tfds") in texts  # `\` joined
  assert "make test-quick" in texts  # its `# comment` dropped
  # The multi-process loop is one command, up to its `done`.
  loop = [t for t in texts if t.startswith("for i in 0 1; do ")]
  assert len(loop) == 1 and loop[0].endswith("--process_id=$i & done; wait")
  # The quick-start (```python) and the output/tree blocks are not commands.
  assert not any("import mtl_jax" in t or "mtl.TaskSet" in t or
                 t.split()[0] in ("import", "from") for t in texts)
  assert not any(t.startswith(("0 {", "mtl_jax/", "experiments/"))
                 for t in texts)
  assert sum("experiments.train" in t for t in texts) >= 12


def test_extract_rules():
  markdown = textwrap.dedent("""\
      text
      ```python
      import jax
      ```
      ```
      # a comment
      python -m experiments.train --workdir=runs/a \\
          --config.num_steps=5   # trailing comment
      # a variant of the command above
          '--config.optimizer.freeze=shared/*'
      make run    # what it does
      0 {'sign': 0.7}
      ```
        ```sh
        XLA_FLAGS=--x=8 .venv/bin/python -c "import jax # not a comment"
        ```
      """)
  commands = check_docs.extract(markdown, "X.md")
  assert [(c.source, c.text) for c in commands] == [
      ("X.md:7", "python -m experiments.train --workdir=runs/a "
                 "--config.num_steps=5"),
      ("X.md:10", "python -m experiments.train --workdir=runs/a "
                  "--config.num_steps=5 '--config.optimizer.freeze=shared/*'"),
      ("X.md:11", "make run"),
      ("X.md:15", 'XLA_FLAGS=--x=8 .venv/bin/python -c "import jax # not a '
                  'comment"'),
  ]


def test_invocations_variants_and_short_setting():
  text = ("gcloud ssh --command=\"cd x && .venv/bin/python -m "
          "experiments.train --distributed --workdir=gs://b\"")
  assert check_docs.invocations(text) == [
      ("experiments.train", ["--distributed", "--workdir=gs://b"])]
  _, args = check_docs.invocations(
      "python -m experiments.sweep --root=r [--mode=commands|collect]")[0]
  assert check_docs.variants(args) == [["--root=r", "--mode=commands"],
                                       ["--root=r", "--mode=collect"]]
  assert check_docs.without_optional(args) == ["--root=r"]
  short = check_docs._short_text(
      "for i in 0 1; do XLA_FLAGS=--x=2 .venv/bin/python -m experiments.train "
      "--workdir=runs/mp --config.init_from=runs/pre [--config.init_from_step=9]"
      " --process_id=$i & done; wait", "/t", "/t/last")
  py = sys.executable
  assert short == (
      f"for i in 0 1; do XLA_FLAGS=--x=2 {py} -m experiments.train "
      "--workdir=/t/workdir0 --config.init_from=/t/last --process_id=$i "
      "--config.num_steps=3 --config.eval_every=3 "
      "--config.data.data_dir=data/tfds & done; wait")


def test_fast_mode_passes_on_the_docs():
  done = _run()
  assert done.returncode == 0, done.stdout + done.stderr
  lines = done.stdout.splitlines()
  train = [l for l in lines if "-m experiments.train" in l]
  # Every runnable train command's flags and config parse and check.
  assert sum(l.startswith("PASS") for l in train) >= 12
  assert all(l.startswith(("PASS", "SKIP")) for l in lines[:-1])
  for script in ("sweep", "semi_supervised", "pretrain_finetune",
                 "grid_cells", "relatedness", "tabular", "toy_pareto",
                 "benchmark"):
    assert any(l.startswith("PASS") and f"-m experiments.{script} " in l
               for l in lines), script
  # Nothing is skipped silently: each SKIP says why.
  skips = [l for l in lines if l.startswith("SKIP")]
  assert any(l.startswith("SKIP README.md:9 make run: ") for l in skips)
  assert all(": " in l.split(" ", 2)[2] for l in skips)
  passed, failed, skipped = (int(w) for w in lines[-1].split()[::2])
  assert failed == 0 and passed + skipped == len(lines) - 1


def test_fast_mode_names_each_mistake(tmp_path):
  doc = tmp_path / "BAD.md"
  doc.write_text(textwrap.dedent("""\
      ```
      python -m experiments.train --config.num_step=10
      python -m experiments.train --config.optimizer.learning_rate=abc
      python -m experiments.train --config.num_steps=0
      python -m experiments.tabular --num_seed=2
      python -m experiments.sweep --sweep=no/such.py --root=r
      python -m experiments.benchmark --jacobian=auto --stepz=3
      python -m experiments.sweep --sweep=experiments/configs/sweeps/methods.py \\
          --root=r [--mode=commands|bogus]
      python -m experiments.toy_pareto --steps=20 --out=o
      ```
      """))
  done = _run("--doc", str(doc))
  assert done.returncode == 1, done.stdout + done.stderr
  lines = done.stdout.splitlines()
  assert len(lines) == 9 and lines[-1] == "1 PASS, 7 FAIL, 0 SKIP"
  assert "unknown config field 'num_step'" in lines[0]
  assert "did you mean 'num_steps'?" in lines[0]
  assert "learning_rate" in lines[1] and lines[1].startswith("FAIL")
  assert "num_steps" in lines[2] and lines[2].startswith("FAIL")
  assert "Unknown command line flag 'num_seed'" in lines[3]
  assert "config file 'no/such.py'" in lines[4]
  assert "Unknown command line flag 'stepz'" in lines[5]
  assert "bogus" in lines[6] and lines[6].startswith("FAIL")
  assert lines[7].startswith("PASS BAD.md:10 ")
