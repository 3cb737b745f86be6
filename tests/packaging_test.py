"""The package as `pip install` sees it (pyproject.toml), offline.

The wheel is built from a copy of pyproject.toml, README.md and mtl_jax/ with
the environment's setuptools (`pip wheel --no-deps --no-build-isolation
--no-index`: no network, nothing written into the repository), then:

* it holds every module of `mtl_jax` and nothing else (no experiments/,
  tests/), with the version of `mtl_jax.__version__`;
* its Requires-Dist covers every third-party import: a module-level import of
  the library is a core dependency; what the library imports only inside a
  function (tensorboardX, matplotlib) is in an extra (`[tensorboard]`,
  `[plots]`); what experiments/ imports is in core + `[experiments]`, what
  tests/ imports in core + `[dev]`;
* requirements.txt (what `make` installs) pins every declared distribution
  at a version inside its bounds;
* installed into a directory of its own (`pip install --target`), every
  module imports from another working directory with only that directory on
  PYTHONPATH (the dependencies come from the running environment).

Also (not slow): a missing tensorboardX or scikit-learn fails with an
ImportError naming the extra, and the `tensorboard` package reads the events
that `MetricWriter` writes (what `tensorboard --logdir <workdir>/tb` shows).

  python -m pytest -q tests/packaging_test.py
"""

from __future__ import annotations

import ast
import email.parser
import importlib
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

from packaging.requirements import Requirement
import pytest
from tensorboard.backend.event_processing import event_accumulator

import mtl_jax
from mtl_jax.training import writers

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Imported by the library only inside a function; and the extra that installs
# each (named by the ImportError where there is one). scikit-learn is core:
# the multi_digits dataset, which the data catalog registers, imports it.
OPTIONAL = {"tensorboardx": "tensorboard", "matplotlib": "plots"}


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
  """`(top-level module, imported at module level)` of a file's absolute
  imports (`if`/`try` blocks at module level count as module level)."""
  tree = ast.parse(path.read_text(), str(path))
  module_level = set()

  def visit_top(nodes):
    for node in nodes:
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        module_level.add(id(node))
      elif isinstance(node, (ast.If, ast.Try)):
        for field in ("body", "orelse", "finalbody"):
          visit_top(getattr(node, field, []))
        for handler in getattr(node, "handlers", []):
          visit_top(handler.body)

  visit_top(tree.body)
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
      names = [node.module]
    else:
      continue
    out += [(n.split(".")[0], id(node) in module_level) for n in names]
  return out


def _third_party(paths, local: set[str]) -> dict[str, set[str]]:
  """`{distribution: {"module", "lazy", ...}}` for the third-party imports of
  `paths`: "module" if some file imports it at module level, "lazy" if
  only inside functions somewhere."""
  dists = importlib.metadata.packages_distributions()
  out = {}
  for path in paths:
    for name, at_top in _imports(path):
      if name in sys.stdlib_module_names or name in local | {"__future__"}:
        continue
      assert name in dists, f"{path}: no installed distribution has {name!r}"
      for dist in dists[name]:
        kind = "module" if at_top else "lazy"
        out.setdefault(_norm(dist), set()).add(
            f"{kind}:{path.relative_to(ROOT)}")
  return out


def _py_files(folder: str) -> list[pathlib.Path]:
  return sorted((ROOT / folder).rglob("*.py"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """`(wheel path, METADATA message)` of the package built offline."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  src.mkdir()
  shutil.copy(ROOT / "pyproject.toml", src)
  shutil.copy(ROOT / "README.md", src)
  shutil.copytree(ROOT / "mtl_jax", src / "mtl_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps",
       "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "out"),
       str(src)], capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  (path,) = (tmp / "out").glob("*.whl")
  with zipfile.ZipFile(path) as z:
    meta_name = next(n for n in z.namelist()
                     if n.endswith(".dist-info/METADATA"))
    meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
  return path, meta


def _requirements(meta) -> tuple[dict[str, Requirement],
                                 dict[str, dict[str, Requirement]]]:
  """Core requirements and `{extra: requirements}` (self-references to
  `mtl-jax[...]` resolved) from the wheel's METADATA."""
  core, extras, nested = {}, {}, {}
  for extra in meta.get_all("Provides-Extra"):
    extras[extra], nested[extra] = {}, []
  for line in meta.get_all("Requires-Dist"):
    req = Requirement(line)
    extra = None
    if req.marker is not None:
      (extra,) = [e for e in extras if req.marker.evaluate({"extra": e})]
    if _norm(req.name) == "mtl-jax":
      nested[extra] += sorted(req.extras)
    elif extra is None:
      core[_norm(req.name)] = req
    else:
      extras[extra][_norm(req.name)] = req
  for extra, others in nested.items():
    for other in others:
      extras[extra].update(extras[other])
  return core, extras


@pytest.mark.slow
def test_wheel_contents_and_requirements_cover_the_imports(wheel):
  path, meta = wheel
  assert meta["Name"] == "mtl-jax"
  assert meta["Version"] == mtl_jax.__version__
  assert path.name == f"mtl_jax-{mtl_jax.__version__}-py3-none-any.whl"
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
  modules = {n for n in names if not n.startswith("mtl_jax-")}
  expected = {str(p.relative_to(ROOT)) for p in _py_files("mtl_jax")}
  assert modules == expected  # every module, no experiments/ or tests/
  assert len(expected) > 80

  core, extras = _requirements(meta)
  assert set(extras) == {"tensorboard", "sklearn", "plots", "experiments",
                         "test", "dev", "all"}
  assert {"jax", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
          "array-record", "numpy"} <= set(core)
  assert set(extras["tensorboard"]) == {"tensorboardx", "tensorboard"}
  everything = set(core).union(*extras.values())
  assert set(extras["all"]) | set(core) == everything

  assert {"scikit-learn", "pandas"} <= set(extras["sklearn"])
  # The library: module-level imports are core; the optional ones are
  # imported only inside functions, and their extra installs them.
  library = _third_party(_py_files("mtl_jax"), {"mtl_jax"})
  assert set(OPTIONAL) | {"jax", "flax", "optax", "scikit-learn"} <= set(
      library)
  for dist, where in library.items():
    if dist in core:
      continue
    assert dist in OPTIONAL, (dist, where)
    assert dist in extras[OPTIONAL[dist]], dist
    assert all(w.startswith("lazy:") for w in where), (dist, where)
  # The scripts and the tests run with core + [experiments] / + [dev].
  local = {"experiments", "mtl_jax"}
  for dist, where in _third_party(_py_files("experiments"), local).items():
    assert dist in set(core) | set(extras["experiments"]), (dist, where)
  local |= {p.stem for p in _py_files("tests")}
  for dist, where in _third_party(_py_files("tests"), local).items():
    assert dist in set(core) | set(extras["dev"]), (dist, where)

  # requirements.txt pins each declared distribution inside its bounds.
  pins = {}
  for line in (ROOT / "requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, version = line.split("==")
      pins[_norm(name)] = version
  for req in list(core.values()) + [r for e in extras.values()
                                    for r in e.values()]:
    assert _norm(req.name) in pins, req
    assert req.specifier.contains(pins[_norm(req.name)]), (req, pins)
  # pyproject.toml declares the same (the METADATA is built from it).
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert {_norm(Requirement(r).name) for r in project["dependencies"]} == set(
      core)


@pytest.mark.slow
def test_installed_wheel_imports_every_module_from_elsewhere(wheel, tmp_path):
  path, _ = wheel
  target = tmp_path / "site"
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
       "--target", str(target), str(path)],
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  script = (
      "import importlib, pkgutil, mtl_jax\n"
      "names = [m.name for m in pkgutil.walk_packages(mtl_jax.__path__, "
      "'mtl_jax.')]\n"
      "for n in names: importlib.import_module(n)\n"
      "print(mtl_jax.__file__, len(names))\n")
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = str(target)
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  file, count = proc.stdout.split()[-2:]
  assert file == str(target / "mtl_jax" / "__init__.py")
  expected = [p for p in _py_files("mtl_jax") if p.name != "__init__.py"]
  expected += [p for p in _py_files("mtl_jax") if p.name == "__init__.py"
               and p.parent != ROOT / "mtl_jax"]
  assert int(count) == len(expected)


def _block(monkeypatch, name: str) -> None:
  """Makes `import name` (and its submodules) fail as if not installed."""
  for key in list(sys.modules):
    if key == name or key.startswith(name + "."):
      monkeypatch.setitem(sys.modules, key, None)
  monkeypatch.setitem(sys.modules, name, None)


def test_missing_tensorboardx_names_the_extra(monkeypatch, tmp_path):
  _block(monkeypatch, "tensorboardX")
  with pytest.raises(ImportError, match=re.escape(
      "tensorboardX, which is not installed: pip install "
      "'mtl-jax[tensorboard]'")):
    writers.MetricWriter(str(tmp_path))


def test_missing_scikit_learn_names_the_extra(monkeypatch):
  _block(monkeypatch, "sklearn")
  monkeypatch.delitem(sys.modules, "mtl_jax.sklearn", raising=False)
  with pytest.raises(ImportError, match=re.escape(
      "mtl_jax.sklearn needs scikit-learn (>= 1.9, with "
      "sklearn.utils.validation.validate_data): pip install "
      "'mtl-jax[sklearn]'")):
    importlib.import_module("mtl_jax.sklearn")


def test_tensorboard_reads_the_metric_writer_events(tmp_path):
  w = writers.MetricWriter(str(tmp_path))
  w.write(10, {"loss": 2.5, "left/loss": 1.25})
  w.write(20, {"loss": 1.5, "left/loss": float("nan")})  # NaN: not written
  w.write(20, {"left/accuracy": 0.75}, split="eval")
  w.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  acc.Reload()
  assert sorted(acc.Tags()["scalars"]) == [
      "eval/left/accuracy", "train/left/loss", "train/loss"]
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
      (10, 2.5), (20, 1.5)]
  assert [(e.step, e.value) for e in acc.Scalars("train/left/loss")] == [
      (10, 1.25)]
  assert [(e.step, e.value) for e in acc.Scalars("eval/left/accuracy")] == [
      (20, 0.75)]
