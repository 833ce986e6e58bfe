"""``--check``: every number of a page's tables follows from the committed JSON."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np

from rma_jax.configs import ablations
from rma_jax.experiments import records, tables


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


def table_numbers(markdown: str) -> list[tuple[int, str]]:
  """(line number, number as written) of every number in the data rows of the page's
  Markdown tables, leaving out each row's first cell (the row label) and code spans
  (protocol names)."""
  out = []
  lines = markdown.splitlines()
  for i, line in enumerate(lines):
    if not line.lstrip().startswith("|") or re.fullmatch(r"\s*\|[\s:|-]*", line):
      continue
    nxt = lines[i + 1] if i + 1 < len(lines) else ""
    if re.fullmatch(r"\s*\|[\s:|-]*-[\s:|-]*", nxt):
      continue  # a header row
    cells = line.strip().strip("|").split("|")[1:]
    for cell in cells:
      cell = re.sub(r"`[^`]*`", "", cell)
      out += [(i + 1, m.group(0)) for m in _NUMBER.finditer(cell)]
  return out


def _numbers(x: Any) -> Iterable[float]:
  if isinstance(x, Mapping):
    for v in x.values():
      yield from _numbers(v)
  elif isinstance(x, (list, tuple)):
    for v in x:
      yield from _numbers(v)
  elif isinstance(x, (int, float)) and not isinstance(x, bool):
    yield float(x)


def _renderings(x: float) -> set[str]:
  """The ways a table shows a JSON number: a fraction in %, or as is (minutes, the paper's
  published %), with one decimal."""
  if math.isnan(x):
    return set()
  return {f"{100 * x:.1f}", f"{x:.1f}"}


def check_page(page: str, results_dir: str) -> list[str]:
  """Problems that keep a page's tables from being reproduced from the committed JSON.

  1. Every table JSON (``results_dir/table_<t>.json``) must follow from the per-run
     records: each row's per-seed values are recomputed from
     ``results_dir/seed<s>/<run>.json`` and its mean and std from those.
  2. Every number in the page's Markdown tables (``table_numbers``) must be a number of a
     table JSON as the tables show it (``_renderings``).

  Args:
    page: the Markdown file (e.g. docs/ablations.md).
    results_dir: the committed records and tables (e.g. docs/ablations).

  Returns:
    Human-readable problems; empty when the page checks out.
  """
  problems = []
  table_files = sorted(f for f in os.listdir(results_dir)
                  if re.fullmatch(r"table_.+\.json", f)) if os.path.isdir(results_dir) else []
  shown: set[str] = set()
  for name in table_files:
    with open(os.path.join(results_dir, name), encoding="utf-8") as f:
      table = json.load(f)
    for x in _numbers({k: [r[k] for r in table["rows"]] for k in ("values", "mean", "std",
                                                                 "paper")}):
      shown |= _renderings(x)
    problems += _check_table(table, results_dir, name)
  if not table_files:
    problems.append(f"{results_dir}: no table_<t>.json")
  with open(page, encoding="utf-8") as f:
    text = f.read()
  for line, number in table_numbers(text):
    if number not in shown:
      problems.append(f"{page}:{line}: {number} is in no table JSON of {results_dir}")
  return problems


def _check_table(table: Mapping[str, Any], results_dir: str, name: str) -> list[str]:
  problems = []
  seeds = table["seeds"]
  per_seed: dict[int, dict[str, Any]] = {}
  runs = {r["run"] for r in table["rows"]} | {ablations.STAGE1}
  for s in seeds:
    for run in runs:
      path = records.record_path(results_dir, s, run)
      if os.path.exists(path):
        per_seed.setdefault(s, {})[run] = records.load_record(path)
  for row in table["rows"]:
    missing = [s for s in seeds if row["run"] not in per_seed.get(s, {})]
    if missing:
      problems.append(f"{name}: row {row['name']!r}: no record of {row['run']} for seeds "
                      f"{missing}")
      continue
    for m, values in row["values"].items():
      want = tables.row_values(row["run"], row["protocol"], m, seeds, per_seed)
      mean, std = tables.mean_std(want)
      got = [float("nan") if v is None else v for v in values]
      ok = np.allclose(got, want, rtol=1e-9, atol=1e-12, equal_nan=True) and all(
          np.isclose(_nan(row[k][m]), v, rtol=1e-9, atol=1e-12, equal_nan=True)
          for k, v in (("mean", mean), ("std", std)))
      if not ok:
        problems.append(f"{name}: row {row['name']!r}, {m}: {values} / mean {row['mean'][m]}"
                        f" / std {row['std'][m]} do not follow from the records ({want})")
  return problems


def _nan(x: Any) -> float:
  return float("nan") if x is None else float(x)
