"""experiments/protocols/publish.py: outputs copied, README tables current."""

import json
import os

import pytest

from experiments.protocols import publish

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_result_tables_are_the_committed_output_files():
  """Every README block names an output file under docs/results and holds
  exactly its content (run `python -m experiments.protocols.publish
  --readme` after publishing new outputs)."""
  with open(os.path.join(REPO, publish.README)) as f:
    text = f.read()
  blocks = publish.BLOCK.findall(text)
  assert blocks, "README.md has no result block"
  assert publish.render(text, os.path.join(REPO, publish.RESULTS_DIR)) == text


def test_publish_copies_outputs_and_times_the_runs(tmp_path):
  root = tmp_path / "sweep"
  for name, (start, end) in {"a/seed0": (100.0, 160.0),
                             "b/seed0": (170.0, 200.0)}.items():
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "results.json").write_text("{}")
    os.utime(run / "config.json", (start, start))
    os.utime(run / "results.json", (end, end))
  # A resumed run: config.json rewritten at its second start (t=250); its
  # first start is the first line of runs.jsonl (t=180).
  resumed = root / "c" / "seed0"
  resumed.mkdir(parents=True)
  (resumed / "runs.jsonl").write_text(
      json.dumps({"time": "1970-01-01T00:03:00Z"}) + "\n" +
      json.dumps({"time": "1970-01-01T00:04:10Z"}) + "\n")
  for name, t in (("config.json", 250.0), ("results.json", 300.0)):
    (resumed / name).write_text("{}")
    os.utime(resumed / name, (t, t))
  (root / "unfinished").mkdir()
  (root / "unfinished" / "config.json").write_text("{}")
  (root / "summary.md").write_text("## group\n| a | 1 |\n")
  (root / "summary.png").write_bytes(b"png")
  out = tmp_path / "docs"
  files = publish.publish(str(root), "demo", str(out))
  assert sorted(os.path.basename(f) for f in files) == [
      "runtime.json", "runtime.md", "summary.md", "summary.png"]
  with open(out / "demo" / "runtime.json") as f:
    assert json.load(f) == {"runs": 3, "run_seconds": 60.0 + 30.0 + 120.0,
                            "wall_seconds": 300.0 - 100.0}
  with open(out / "demo" / "runtime.md") as f:
    assert f.read().startswith("3 runs; 4 minutes of training summed over "
                               "the runs, 3 minutes from the first start")
  readme = ("x\n<!-- results: demo/summary.md -->\nold\n<!-- /results -->\n"
            "y\n")
  assert publish.render(readme, str(out)) == (
      "x\n<!-- results: demo/summary.md -->\n##### group\n| a | 1 |\n"
      "<!-- /results -->\n"
      "y\n")
  with pytest.raises(ValueError, match="missing/summary.md"):
    publish.render("<!-- results: missing/summary.md -->\n<!-- /results -->",
                   str(out))
  with pytest.raises(ValueError, match="no finished run"):
    publish.runtime(str(root / "unfinished"))
