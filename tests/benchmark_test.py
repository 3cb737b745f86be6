"""Smoke test of experiments/benchmark.py: fields and outputs, never timings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import benchmark
from mtl_jax import aggregation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIELDS = ("method", "model", "num_tasks", "batch_size", "rep_grad",
          "chunk_size", "ms_per_step", "ms_q25", "ms_q75", "timed_steps",
          "compile_s", "peak_bytes", "temp_bytes", "argument_bytes",
          "output_bytes")


def _main(*args: str) -> list[dict]:
  benchmark.parse_flags(["benchmark", *args])
  return benchmark.run()


@pytest.mark.slow
def test_script_exits_with_status_0():
  # app.run exits with main's return value: a list of rows would print to
  # stderr and exit with status 1.
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark", "--hidden=4",
       "--input_dim=3", "--batch_size=2", "--num_tasks=1", "--steps=1",
       "--warmup=0", "--methods=ew"], cwd=REPO, capture_output=True,
      text=True, timeout=300, check=False,
      env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  (row,) = [json.loads(line) for line in proc.stdout.splitlines()
            if line.startswith("{")]
  assert (row["method"], row["num_tasks"], row["timed_steps"]) == ("ew", 1, 1)


def test_main_prints_json_lines_and_writes_the_plot(tmp_path, capsys):
  out = str(tmp_path / "bench")
  rows = _main("--hidden=16", "--input_dim=12", "--batch_size=8",
               "--num_tasks=1,2", "--steps=2", "--rounds=2", "--warmup=1",
               "--methods=ew,mgda", f"--out={out}")
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
  assert printed[:len(rows)] == rows
  # Then one scaling line per method: K=1 and 2 were timed.
  summary = [p["scaling"] for p in printed[len(rows):]]
  assert [(s["method"], s["num_tasks_swept"]) for s in summary] == [
      ("ew", [1, 2]), ("mgda", [1, 2])]
  for s in summary:
    ms = {r["num_tasks"]: r["ms_per_step"] for r in rows
          if r["method"] == s["method"]}
    assert s["exponent"] == pytest.approx(math.log2(ms[2] / ms[1]), abs=2e-3)
  assert [(r["method"], r["num_tasks"]) for r in rows] == [
      (m, k) for k in (1, 2) for m in ("ew", "mgda")]
  for r in rows:
    assert set(FIELDS) <= set(r)
    assert r["batch_size"] == 8 and r["timed_steps"] == 2
    assert r["ms_per_step"] > 0 and r["compile_s"] > 0
    assert r["ratio_to_ew"] > 0
    # XLA's static analysis exists on CPU; the device's peak does not.
    assert r["temp_bytes"] is not None and r["argument_bytes"] > 0
  with open(os.path.join(out, "benchmark.jsonl")) as f:
    assert [json.loads(line) for line in f] == rows
  with open(os.path.join(out, "scaling.json")) as f:
    assert json.load(f) == summary
  png = os.path.join(out, "step_time_vs_tasks.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_settings_timed_one_after_the_other():
  rows = _main("--hidden=8", "--input_dim=6", "--batch_size=4",
               "--num_tasks=2,3", "--steps=2", "--rounds=1", "--warmup=0",
               "--methods=ew", "--nointerleave_settings")
  assert [(r["method"], r["num_tasks"], r["timed_steps"]) for r in rows] == [
      ("ew", 2, 2), ("ew", 3, 2)]
  assert [r["ms_per_task"] for r in rows] == [
      round(r["ms_per_step"] / r["num_tasks"], 3) for r in rows]


def _row(method, k, ms, rep_grad=False):
  return {"method": method, "model": "mlp", "num_tasks": k,
          "rep_grad": rep_grad, "ms_per_step": ms}


def test_scaling_summary_slopes():
  rows = ([_row("lin", k, 3.0 * k) for k in (1, 2, 4, 8)] +
          [_row("sqrt", k, 5.0 * math.sqrt(k)) for k in (1, 4, 16)] +
          # Linear except one step: x4 from K=2 to 4 (local slope 2).
          [_row("kink", 1, 1.0), _row("kink", 2, 2.0), _row("kink", 4, 8.0),
           _row("kink", 8, 16.0)] +
          [_row("lin", k, 2.0 * k * k, rep_grad=True) for k in (2, 4)] +
          [_row("single", 4, 1.0),
           {"method": "pipeline/mixture", "model": "multi_digits",
            "num_tasks": 3, "examples_per_s": 1e4}])
  by = {(s["method"], s["rep_grad"]): s
        for s in benchmark.scaling_summary(rows)}
  # One K only, or no step time: no summary.
  assert set(by) == {("lin", False), ("sqrt", False), ("kink", False),
                     ("lin", True)}
  assert by["lin", False]["exponent"] == pytest.approx(1.0)
  assert by["lin", False]["local_exponents"] == {"1-2": 1.0, "2-4": 1.0,
                                                 "4-8": 1.0}
  assert by["lin", False]["growth"] == 8.0
  assert by["sqrt", False]["exponent"] == pytest.approx(0.5)
  assert by["sqrt", False]["max_local_exponent"] == 0.5
  # Least squares through log2 ms = (0, 1, 3, 4) at log2 K = (0, 1, 2, 3).
  assert by["kink", False]["exponent"] == pytest.approx(1.4)
  assert by["kink", False]["local_exponents"] == {"1-2": 1.0, "2-4": 2.0,
                                                  "4-8": 1.0}
  assert by["kink", False]["max_local_exponent"] == 2.0
  assert by["lin", True]["exponent"] == pytest.approx(2.0)
  assert by["lin", True]["tasks_ratio"] == 2.0


def test_rep_grad_and_chunked_settings():
  rows = _main("--hidden=8", "--input_dim=6", "--batch_size=4",
               "--num_tasks=3", "--steps=1", "--warmup=0", "--rep_grad",
               "--chunk_size=2", "--methods=baseline,mean,pcgrad")
  # pcgrad is not valid on representation gradients: skipped; the
  # hand-written baseline has no per-task gradients at all.
  assert [(r["method"], r["rep_grad"]) for r in rows] == [
      ("baseline", False), ("mean", True)]
  assert rows[1]["ratio_to_baseline"] > 0
  assert all(r["chunk_size"] == 2 for r in rows)


def test_unknown_method_is_rejected_before_compiling():
  with pytest.raises(ValueError, match="unknown method.*valid: baseline, ew"):
    _main("--methods=ew,nope", "--steps=1")
  with pytest.raises(ValueError, match="--model=mlp only"):
    _main("--model=cnn", "--methods=baseline", "--steps=1")


def test_jacobian_modes_are_timed_side_by_side():
  rows = _main("--hidden=8", "--input_dim=6", "--batch_size=4",
               "--num_tasks=2", "--steps=1", "--warmup=0",
               "--jacobian=auto,full", "--methods=mgda")
  # Each aggregator once per mode; the row says which path ran.
  assert [(r["method"], r["jacobian"]) for r in rows] == [
      ("mgda", "factored"), ("mgda@full", "full")]
  # GradDrop has no Gram form, but its rows come from the factors too
  # (columnwise); rep_grad says so.
  graddrop = aggregation.get_aggregator("graddrop")
  assert benchmark.jacobian_used(graddrop, "auto", False) == "factored"
  assert benchmark.jacobian_used(graddrop, "full", False) == "full"
  assert benchmark.jacobian_used(graddrop, "auto", True) == "rep_grad"
  with pytest.raises(ValueError, match=r"unknown --jacobian mode\(s\) "
                     r"\['fast'\]; valid: auto, factored, full"):
    _main("--jacobian=fast", "--steps=1")


def test_solvers_mode_times_the_gram_methods_only(tmp_path):
  rows = _main("--solvers", "--num_tasks=3", "--steps=2", "--rounds=2",
               "--solver_spread=1e6", "--methods=ew,mgda,graddrop,imtl_g",
               f"--out={tmp_path}")
  # ew has no K x K part and GradDrop is not Gram-based.
  assert [r["method"] for r in rows] == ["solver/mgda", "solver/imtl_g"]
  assert all(r["num_tasks"] == 3 and r["spread"] == 1e6
             and r["us_per_call"] > 0 for r in rows)
  with open(tmp_path / "benchmark.jsonl") as f:
    assert [json.loads(line) for line in f] == rows


def test_random_grams_have_the_requested_spread():
  grams = benchmark.random_grams(4, 1e6, 3, seed=0)
  for m in grams:
    diag = np.diag(np.asarray(m, np.float64))
    assert diag.max() == 1.0
    # Norms log-uniform in [1, 1e6]: squared ratio at most 1e12.
    assert 1.0 <= diag.max() / diag.min() <= 1e12 * (1 + 1e-5)


def test_pretext_mode_rows_ratios_and_outputs(tmp_path):
  out = tmp_path / "pretext"
  rows = _main("--pretext", "--hidden=8", "--image_shape=4,4,1",
               "--batch_size=4", "--num_tasks=2", "--steps=2", "--rounds=2",
               "--warmup=0", "--methods=ew",
               "--pretext_sets=reconstruct,grid_mask*2", f"--out={out}")
  # The supervised-only step is added first: the reference of the ratios.
  assert [(r["pretexts"], r["num_pretext"], r["num_views"], r["num_tasks"])
          for r in rows] == [("none", 0, 1, 2), ("reconstruct", 1, 1, 3),
                             ("grid_mask*2", 2, 2, 4)]
  assert rows[2]["views"] == ["inputs", "grid_mask"]
  assert rows[0]["ratio_to_supervised"] == 1.0
  for r in rows:
    assert r["method"] == "ew" and r["timed_steps"] == 2
    assert math.isfinite(r["ratio_to_supervised"])
    assert r["ratio_to_supervised"] > 0
    assert r["ratio_to_supervised"] == r["ratio_to_ew"]
  with open(out / "pretext.json") as f:
    written = json.load(f)
  assert written["rows"] == rows
  # Three points, V and P both varying: an exact fit.
  (fit,) = written["fit"]
  assert fit["method"] == "ew" and fit["max_abs_residual"] == 0.0
  with open(out / "benchmark.jsonl") as f:
    assert [json.loads(line) for line in f] == rows
  with open(out / "pretext_step_time.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pretext_sets_are_parsed_and_bad_ones_named():
  assert benchmark.parse_pretext_set("none") == []
  assert benchmark.parse_pretext_set("grid_mask*2+denoise") == [
      ("grid_mask", 2), ("denoise", 1)]
  tasks = benchmark.pretext_tasks("reconstruct*2+grid_mask*3", (12, 16, 1))
  # One view per corrupting pretext; the identity reads the inputs; every
  # second task of a view takes the L1 loss.
  assert [(t.name, t.view) for t in tasks] == [
      ("reconstruct", "inputs"), ("reconstruct_2", "inputs"),
      ("grid_mask", "grid_mask"), ("grid_mask_2", "grid_mask"),
      ("grid_mask_3", "grid_mask")]
  assert tasks[2].output_shape == (6, 8, 1)
  with pytest.raises(ValueError, match=r"unknown pretext 'jigsaw'"):
    benchmark.parse_pretext_set("jigsaw")
  with pytest.raises(ValueError, match=r"'grid_mask' is named twice"):
    benchmark.parse_pretext_set("grid_mask+grid_mask")
  with pytest.raises(ValueError, match=r"needs a count >= 1"):
    benchmark.parse_pretext_set("denoise*0")
  with pytest.raises(ValueError, match=r"has no pretext tasks"):
    _main("--pretext", "--methods=baseline", "--steps=1")


def test_pretext_fit_recovers_known_costs():
  # ratio = 1 + 0.8 (V - 1) + 0.05 P, exactly.
  rows = [{"method": "ew", "num_views": v, "num_pretext": p,
           "ratio_to_supervised": 1 + 0.8 * (v - 1) + 0.05 * p}
          for v, p in ((1, 0), (1, 2), (2, 1), (2, 3), (3, 2))]
  (fit,) = benchmark.pretext_fit(rows)
  assert (fit["intercept"], fit["per_view"], fit["per_task"]) == (
      1.0, 0.8, 0.05)
  assert fit["max_abs_residual"] == 0.0 and fit["points"] == 5
  # P the same everywhere: no per-task slope to fit; nor from two points.
  assert benchmark.pretext_fit([dict(r, num_pretext=0) for r in rows]) == []
  assert benchmark.pretext_fit(rows[:2]) == []
