"""Smoke test of experiments/benchmark.py: fields and outputs, never timings."""

from __future__ import annotations

import json
import os

import pytest

from experiments import benchmark
from mtl_jax import aggregation

FIELDS = ("method", "model", "num_tasks", "batch_size", "rep_grad",
          "chunk_size", "ms_per_step", "ms_q25", "ms_q75", "timed_steps",
          "compile_s", "peak_bytes", "temp_bytes", "argument_bytes",
          "output_bytes")


def _main(*args: str) -> list[dict]:
  return benchmark.main(benchmark.parse_flags(["benchmark", *args]))


def test_main_prints_json_lines_and_writes_the_plot(tmp_path, capsys):
  out = str(tmp_path / "bench")
  rows = _main("--hidden=16", "--input_dim=12", "--batch_size=8",
               "--num_tasks=1,2", "--steps=2", "--rounds=2", "--warmup=1",
               "--methods=ew,mgda", f"--out={out}")
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
  assert printed == rows
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
  png = os.path.join(out, "step_time_vs_tasks.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


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
