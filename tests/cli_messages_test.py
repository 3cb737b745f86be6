"""Command-line mistakes, `--print_config`, and missing-dataset messages.

A config mistake on `python -m experiments.train` is one line on stderr,
`error: ...`, exit code 2, no traceback (`experiments/cli.py`); the runs
that fail at flag parsing compile nothing. `--print_config` prints the
resolved config as JSON and exits 0. A catalog dataset that is not prepared
names what was looked for and one `tfds build` command, saying that it needs
TensorFlow (`mtl_jax.data.sources.NotPreparedError`); no network.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments import cli
from experiments.configs import multi_digits as md_config
from mtl_jax.data import build as data_build
from mtl_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.train", *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120, check=False)


def test_unknown_top_level_field_is_one_line_with_exit_code_2(tmp_path):
  done = _train("--config.num_step=10", f"--workdir={tmp_path}")
  assert done.returncode == 2
  assert "Traceback" not in done.stderr
  assert done.stderr.strip().splitlines() == [
      "error: unknown config field 'num_step' (in --config.num_step=10); "
      "valid fields under config: " + ", ".join(
          sorted(md_config.get_config().keys())) +
      ", did you mean 'num_steps'?"]
  assert not os.listdir(tmp_path)  # nothing written


def test_wrong_value_type_is_one_line_with_exit_code_2(tmp_path):
  done = _train("--config.num_steps=abc", f"--workdir={tmp_path}")
  assert done.returncode == 2
  assert "Traceback" not in done.stderr
  assert done.stderr.strip().splitlines() == [
      "error: invalid value in --config.num_steps=abc: config.num_steps is "
      "an int; invalid literal for int() with base 10: 'abc'"]


def test_a_dataset_not_prepared_is_its_message_not_a_traceback(tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  done = _train("--config=experiments/configs/smallnorb.py",
                f"--workdir={tmp_path / 'run'}",
                f"--config.data.data_dir={data_dir}")
  assert done.returncode == 1
  assert "Traceback" not in done.stderr
  error = done.stderr[done.stderr.index("error: "):]
  assert error.startswith("error: TFDS dataset smallnorb is not prepared for "
                          f"random access in data_dir={data_dir}")
  assert error.rstrip().endswith(
      f"tfds build smallnorb --data_dir={data_dir} "
      "--file_format=array_record")


def test_print_config_prints_the_resolved_config_and_exits_0():
  done = _train("--print_config", "--config.num_steps=7",
                "--config.aggregation.cagrad.c=0.25")
  assert done.returncode == 0, done.stderr
  printed = json.loads(done.stdout)
  expected = md_config.get_config()
  expected.num_steps = 7
  expected.aggregation.cagrad.c = 0.25
  assert printed == json.loads(json.dumps(expected.to_dict()))
  assert "Traceback" not in done.stderr


@pytest.mark.parametrize("path, message", [
    ("aggregation.cagrad.cc",
     "unknown config field 'cc' (in ARG); valid fields under "
     "config.aggregation.cagrad: c, rescale, did you mean 'c'?"),
    ("optimizer.learning_rat",
     "unknown config field 'learning_rat' (in ARG); valid fields under "
     "config.optimizer: "),
    ("num_steps.x",
     "config field 'config.num_steps' is an int, not a group of fields: "
     "config.num_steps.x does not exist (in ARG)"),
])
def test_nested_mistakes_name_the_level_and_its_fields(path, message):
  config = md_config.get_config()
  arg = f"--config.{path}=1"
  with pytest.raises(cli.CommandLineError) as info:
    cli.check_override(config, path, arg)
  assert str(info.value).startswith(message.replace("ARG", arg))
  if path.startswith("optimizer"):
    assert str(info.value).endswith(
        ", ".join(sorted(config.optimizer.keys())) +
        ", did you mean 'learning_rate'?")


def test_check_command_line_exits_2_with_one_line(capsys, tmp_path):
  argv = ["train", "--config=experiments/configs/multi_digits.py",
          "--config.data.nme=x"]
  with pytest.raises(SystemExit) as info:
    cli.check_command_line(argv, "config", "unused.py")
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: unknown config field 'nme' "
                        "(in --config.data.nme=x); valid fields under "
                        "config.data: ")
  assert err.count("\n") == 1
  missing = str(tmp_path / "nope.py")
  with pytest.raises(SystemExit) as info:
    cli.check_command_line(["train", f"--config={missing}"], "config", "")
  assert info.value.code == 2
  assert capsys.readouterr().err == (
      f"error: config file {missing!r} (--config={missing}) does not exist\n")
  # Valid overrides (and --help) pass.
  cli.check_command_line(["train", "--config.num_steps=3",
                          "--config.model.trunk=mlp"], "config",
                         "experiments/configs/multi_digits.py")
  cli.check_command_line(["train", "--help", "--config.nope=1"], "config",
                         "experiments/configs/multi_digits.py")


def _first_line(error):
  return str(error).splitlines()[0]


def test_missing_mnist_family_names_all_three_and_one_command(tmp_path):
  data_dir = str(tmp_path)
  with pytest.raises(sources.NotPreparedError) as info:
    data_build.load_dataset("mnist_family", data_dir=data_dir)
  assert info.value.names == ("mnist", "fashion_mnist", "kmnist")
  first = _first_line(info.value)
  assert first.startswith(
      "TFDS datasets mnist, fashion_mnist, kmnist are not prepared for "
      f"random access in data_dir={data_dir} (mnist: no "
      f"{data_dir}/mnist/3.0.1/dataset_info.json (version 3.0.1); "
      f"fashion_mnist: no {data_dir}/fashion_mnist/3.0.1/dataset_info.json")
  assert "already prepared" not in first
  assert ("`tfds build` needs TensorFlow, which mtl-jax does not install "
          "(pip install tensorflow-cpu)") in first
  assert str(info.value).splitlines()[-1] == (
      f"  tfds build mnist fashion_mnist kmnist --data_dir={data_dir} "
      "--file_format=array_record")
  assert not os.listdir(data_dir)  # looking creates nothing


def test_dataset_in_another_format_is_named_as_such(tmp_path):
  data_dir = str(tmp_path)
  version_dir = tmp_path / "smallnorb" / "2.0.0"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text(json.dumps(
      {"name": "smallnorb", "version": "2.0.0", "fileFormat": "tfrecord"}))
  with pytest.raises(sources.NotPreparedError) as info:
    sources.TfdsSource("smallnorb", "train", data_dir=data_dir)
  assert info.value.missing == {"smallnorb": (
      f"{version_dir} holds it in the tfrecord format, which cannot be read "
      "by index: delete that directory and prepare it again")}
  assert str(info.value).endswith(
      f"\n  tfds build smallnorb --data_dir={data_dir} "
      "--file_format=array_record")
