"""Tests of the metrics JSONL helpers."""

import json

from mtl_jax.training import writers


def test_truncate_jsonl_drops_later_steps_and_a_cut_off_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    for step in (10, 20, 30):
      f.write(json.dumps({"step": step, "split": "train", "loss": step}) + "\n")
    f.write('{"step": 40, "spl')  # the process died while writing
  assert [r["step"] for r in writers.read_jsonl(path)] == [10, 20, 30]
  writers.truncate_jsonl(path, 20)
  assert [r["step"] for r in writers.read_jsonl(path)] == [10, 20]
