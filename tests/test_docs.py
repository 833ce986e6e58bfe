"""The README and docs/ say what the repository holds: short README, the two set-up commands,
links that resolve, no references to documents a user cannot read, and tables equal to the
committed results they are built from."""

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def _read(*parts):
  with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
    return f.read()


def _pages():
  return ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(DOCS))
                          if f.endswith(".md")]


def test_readme_is_short_with_the_two_set_up_commands():
  readme = _read("README.md")
  assert len(readme.splitlines()) <= 150
  first_block = readme.split("```")[1].strip().splitlines()
  assert first_block == [
      "pip install -e . && python -m rma_jax.main --config=configs/demo.py "
      "--workdir=/tmp/rma_demo",
      'pip install -e ".[test]" && python -m pytest -q -n 2']
  for placeholder in ("DEMO_TABLE", "DEMO_CONSOLE", "PERF_ROWS", "TEST_TIME", "QUICK_TIME"):
    assert placeholder not in readme


@pytest.mark.parametrize("page", _pages())
def test_no_reference_to_documents_outside_the_repository(page):
  text = _read(page)
  assert not re.search(r"\bSPEC\b", text), f"{page} cites SPEC, which is not in the repository"
  assert not re.search(r"issue #?\d+'?s? notes?", text, re.I), f"{page} cites issue notes"


@pytest.mark.parametrize("page", _pages())
def test_relative_links_resolve(page):
  text = _read(page)
  base = os.path.dirname(os.path.join(ROOT, page))
  for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
    if "://" in target or target.startswith("mailto:"):
      continue
    assert os.path.exists(os.path.join(base, target)), f"{page}: broken link {target}"


def test_readme_demo_table_is_the_committed_reports():
  spec = importlib.util.spec_from_file_location(
      "demo_table", os.path.join(DOCS, "demo_results", "table.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert len(module.rows()) >= 3, "one committed report per seed"
  assert module.table() in _read("README.md")
  # The demo on a ResNet (configs/demo.py:resnet50): its committed report's table.
  assert module.rows("resnet50_") and module.table("resnet50_") in _read("docs", "training.md")


def _ablation_row(table, run):
  import json
  t = json.loads(_read("docs", "ablations", f"table_{table}.json"))
  return t, next(r for r in t["rows"] if r["run"] == run)


def test_readme_demo_comparisons_are_the_committed_ablations():
  """The README's sentence on learned vs fixed regions, their pointing against both controls
  and the equal-budget baseline is built from docs/ablations' table JSON, and what it claims
  (fixed beat learned, the budget baseline beats the two-step attention model) holds there."""
  t3, fixed = _ablation_row(3, "fixed_anchors_K5")
  _, learned = _ablation_row(3, "rma_ASP_K5")
  _, budget = _ablation_row("budget", "baseline_sigmoid_budget")
  _, two_step = _ablation_row("budget", "rma_ASP_K5")
  pct = lambda row, m: f"{100 * row['mean'][m]:.1f}"  # pylint: disable=unnecessary-lambda-assignment
  assert fixed["mean"]["mAP"] > learned["mean"]["mAP"]
  assert fixed["mean"]["pointing"] > learned["mean"]["pointing"]
  assert learned["mean"]["pointing"] > learned["mean"]["pointing_chance"]
  assert budget["mean"]["mAP"] > two_step["mean"]["mAP"]
  sentence = (
      f"Over {len(t3['seeds'])} seeds, K fixed boxes at the anchors beat the learned regions: "
      f"single-view mAP {pct(fixed, 'mAP')} vs {pct(learned, 'mAP')}, pointing "
      f"{pct(fixed, 'pointing')} % vs {pct(learned, 'pointing')} % (chance "
      f"{pct(fixed, 'pointing_chance')} % and {pct(learned, 'pointing_chance')} %). The "
      f"pooled baseline trained for the same 22 epochs beats the attention model: ten-view mAP "
      f"{pct(budget, 'mAP')} vs {pct(two_step, 'mAP')}.")
  assert sentence in " ".join(_read("README.md").split()), sentence


def test_readme_performance_table_is_the_committed_benchmark():
  """The README's table per trunk is ``bench_records.trunk_table`` of the committed records
  (each a line of the benchmark's --json_out), which docs/performance.md shows in full."""
  import json
  from benchmarks import bench_records
  folder = ("docs", "benchmarks", "2026-12-07-resnet")
  records = [json.loads(line) for name in ("vgg16", "resnet101_eval", "resnet101_train")
             for line in _read(*folder, f"{name}.jsonl").splitlines()]
  assert [(r["trunk"], r["case"]) for r in records] == [
      (t, c) for t in ("vgg16", "resnet101") for c in ("train", "single_view", "ten_view")
      if (t, c) != ("resnet101", "train")] + [("resnet101", "train")]
  assert bench_records.trunk_table(records) in _read("README.md")
  performance = _read("docs", "performance.md")
  for name in ("vgg16", "resnet101_eval", "resnet101_train"):
    rows = [line for line in _read(*folder, f"{name}.md").splitlines()
            if line.startswith("| ") and not line.startswith("| trunk")]
    assert rows and all(row in performance for row in rows), rows


def test_committed_benchmark_table_follows_from_its_json():
  import json
  rows = {line.split("|")[1].strip(): line
          for line in _read("docs", "benchmarks", "cpu_eval_train.md").splitlines()
          if line.startswith("| ") and not line.startswith("| case")}
  for line in _read("docs", "benchmarks", "cpu_eval_train.jsonl").splitlines():
    rec = json.loads(line)
    cells = [c.strip() for c in rows[rec["case"]].split("|")]
    assert f"{rec['ratio']:.2f}" in cells, (rec["case"], cells)


def test_export_latency_table_is_the_committed_json():
  import json
  from benchmarks import export_latency
  records = [json.loads(_read("docs", "benchmarks", "export", f"{name}.json"))
             for name in ("demo", "voc")]
  assert export_latency.table(records) in _read("docs", "export.md")
