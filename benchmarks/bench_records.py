"""The records of ``benchmarks.bench``: one dict per case (``RECORD_KEYS``), its JSON line
and the Markdown table of a run; and the JSON file of the jax-vs-jax A/B benchmarks
(``write_ab_result``)."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any, Callable, Iterable

import numpy as np

from rma_jax.weights import TRUNK_NAMES

RECORD_KEYS = (
    "case", "trunk", "framework", "backend", "device", "num_devices", "input_size", "image_size",
    "crop_size", "batch", "dtype", "width", "num_regions", "sample_size", "images_per_s",
    "latency_ms", "step_s", "step_s_all", "compile_s", "compiles_after_first_call",
    "flops_per_image", "achieved_flops_per_s", "peak_flops_per_s", "flops_utilization",
    "peak_memory_bytes", "memory_source", "threads", "repeats",
    "torch_images_per_s", "torch_latency_ms", "torch_step_s", "torch_peak_memory_bytes",
    "torch_flops_utilization", "ratio", "prepare_s", "prepared_bytes", "load_average",
    "glibc_tunables", "cpu_model", "cpu_extensions", "torch_max_rel_diff")
"""Keys of every JSON record (torch_* and ratio are None when PyTorch is not run;
``prepare_s``/``prepared_bytes``, of the evaluation cases only: the time and size of
``rma_jax.kernels.prepare_fn``'s function, run once before the timed calls as an evaluation
pass does; ``load_average``: the 1-minute load average after the case; ``glibc_tunables``:
the environment's ``GLIBC_TUNABLES``, which changes how both frameworks' buffers are paged;
``cpu_model``, ``cpu_extensions``: the CPU and its vector extensions (``timing.cpu_description``):
ratios hold for one CPU kind only); ``trunk``: the config's ``model.trunk``;
``torch_max_rel_diff``, of the evaluation cases with PyTorch: max|Δ| / max|torch| of the two
sides' scores, checked before timing (``bench.agreement``))."""


def record(settings: Any, case: str, input_size: int, batch: int, times: list[float],
           **extra) -> dict[str, Any]:
  """The record of one case from its step times (``extra`` fills further keys)."""
  step = statistics.median(times)
  rec = {k: None for k in RECORD_KEYS}
  rec.update(case=case, trunk=settings.trunk, framework="rma_jax", input_size=input_size,
             image_size=settings.image_size, crop_size=settings.crop_size, batch=batch,
             dtype=settings.dtype, width=settings.width, num_regions=settings.num_regions,
             sample_size=settings.sample_size, images_per_s=batch / step,
             latency_ms=1000.0 * step / batch, step_s=step, step_s_all=times,
             repeats=len(times))
  rec.update(extra)
  return rec


def add_torch(rec: dict[str, Any], times: list[float] | None, peak: int | None,
              peak_flops: float | None) -> None:
  """Writes the PyTorch figures of the same case (step times, peak RSS) into ``rec``."""
  if not times:
    return
  step = statistics.median(times)
  rec["torch_step_s"] = step
  rec["torch_images_per_s"] = rec["batch"] / step
  rec["torch_latency_ms"] = 1000.0 * step / rec["batch"]
  rec["torch_peak_memory_bytes"] = peak
  rec["ratio"] = rec["images_per_s"] / rec["torch_images_per_s"]
  if rec["flops_per_image"] and peak_flops:
    rec["torch_flops_utilization"] = rec["flops_per_image"] * rec["torch_images_per_s"] / peak_flops


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
  if value is None:
    return "–"
  return format(value * scale, spec)


def markdown_table(records: Iterable[dict[str, Any]]) -> str:
  """A Markdown table of the records, one row per case, PyTorch and the ratio beside."""
  header = ("| trunk | case | input | batch | dtype | rma_jax img/s | PyTorch img/s | ratio | "
            "latency ms (jax / torch) | compile s | recompiles | GFLOP/img | "
            "achieved GFLOP/s | % of matmul peak | peak mem MiB (jax / torch) |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for r in records:
    lines.append("| " + " | ".join([
        # Records from before the trunk was recorded are VGG-16's.
        TRUNK_NAMES.get(r.get("trunk") or "vgg16", str(r.get("trunk"))), r["case"],
        f"{r['input_size']}²", str(r["batch"]), r["dtype"],
        _fmt(r["images_per_s"], ".3g"), _fmt(r["torch_images_per_s"], ".3g"),
        _fmt(r["ratio"], ".2f"),
        f"{_fmt(r['latency_ms'], '.4g')} / {_fmt(r['torch_latency_ms'], '.4g')}",
        _fmt(r["compile_s"], ".1f"), str(r["compiles_after_first_call"]),
        _fmt(r["flops_per_image"], ".4g", 1e-9), _fmt(r["achieved_flops_per_s"], ".4g", 1e-9),
        _fmt(r["flops_utilization"], ".1f", 100.0),
        f"{_fmt(r['peak_memory_bytes'], '.0f', 2**-20)} / "
        f"{_fmt(r['torch_peak_memory_bytes'], '.0f', 2**-20)}",
    ]) + " |")
  return "\n".join(lines)


def trunk_table(records: Iterable[dict[str, Any]]) -> str:
  """The README's table: one row per trunk, each case's images/s of rma_jax / PyTorch (the
  ratio), and the single view's GFLOP per image; a case a trunk's records lack is '–'."""
  cases = ("train", "single_view", "ten_view")
  by_trunk: dict[str, dict[str, dict[str, Any]]] = {}
  for r in records:
    by_trunk.setdefault(r.get("trunk") or "vgg16", {})[r["case"]] = r
  lines = ["| trunk | train img/s: rma_jax / PyTorch (ratio) | single view | ten-view | "
           "GFLOP/img, single view |", "|---|---|---|---|---|"]
  for trunk, rec in by_trunk.items():
    cells = [f"{_fmt(rec[c]['images_per_s'], '.3g')} / "
             f"{_fmt(rec[c]['torch_images_per_s'], '.3g')} ({_fmt(rec[c]['ratio'], '.2f')})"
             if c in rec else "–" for c in cases]
    flops = rec.get("single_view", {}).get("flops_per_image")
    lines.append(f"| {TRUNK_NAMES.get(trunk, trunk)} | " + " | ".join(cells)
                 + f" | {_fmt(flops, '.1f', 1e-9)} |")
  return "\n".join(lines)


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.floating, np.integer)):
    return obj.item()
  return str(obj)


def to_json(record: dict[str, Any]) -> str:
  return json.dumps(record, default=_json_default, sort_keys=False)


def write_ab_result(parts: dict[str, Callable[[], Any]], json_out: str | None) -> dict:
  """Runs each part of an A/B benchmark in order and returns, prints and (if ``json_out``)
  writes ``{"load_average_start", <part>: its result, ..., "load_average_end"}``."""
  result = {"load_average_start": os.getloadavg()[0]}
  result.update({name: part() for name, part in parts.items()})
  result["load_average_end"] = os.getloadavg()[0]
  text = json.dumps(result, indent=1)
  print(text)
  if json_out:
    with open(json_out, "w") as f:
      f.write(text + "\n")
  return result
