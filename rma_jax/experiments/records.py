"""The committed record of one finished ablation run: its path, atomic writing, reading, timing.

``RESULTS_DIR/seed<s>/<run>.json``, format ``RECORD_FORMAT`` (``run_record``), written once
the run is finished; a file that exists is final.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from typing import Any, Callable, Mapping

import ml_collections

from rma_jax import paths as paths_lib
from rma_jax import report
from rma_jax.configs import ablations

RECORD_FORMAT = 1


def record_path(results_dir: str, seed: int, run: str) -> str:
  """``RESULTS_DIR/seed<s>/<run>.json``: the committed result of one run of one seed."""
  return os.path.join(results_dir, f"seed{seed}", f"{run}.json")


def write_json(path: str, payload: Any) -> None:
  """Strict JSON (NaN -> null), written atomically: a reader sees the old file or the new."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  paths_lib.write_atomic(
      path, json.dumps(report.to_jsonable(payload), indent=1, allow_nan=False) + "\n")


def load_record(path: str) -> dict[str, Any]:
  """A run's record; raises ValueError naming the file if it is not a finished record."""
  with open(path, encoding="utf-8") as f:
    rec = json.load(f)
  if rec.get("status") != "complete" or "protocols" not in rec:
    raise ValueError(f"{path} is not a finished run record (status "
                     f"{rec.get('status')!r}); delete it to rerun the run")
  return rec


def git_state() -> dict[str, Any]:
  """The commit of the code that ran (and whether tracked files differed from it)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  def git(*args: str) -> str | None:
    try:
      out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.SubprocessError):
      return None
    return out.stdout.strip() if out.returncode == 0 else None

  commit = git("rev-parse", "HEAD")
  status = git("status", "--porcelain", "--untracked-files=no")
  return {"commit": commit, "dirty": None if status is None else bool(status)}


def _host() -> dict[str, Any]:
  import jax
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
          "compilation_cache": bool(jax.config.jax_compilation_cache_dir)}


def _loadavg() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
  """Runs ``fn()``; returns its result and the wall time, this process's CPU time (user +
  system, every thread) and the load average before and after."""
  load0, wall0, cpu0 = _loadavg(), time.perf_counter(), time.process_time()
  out = fn()
  return out, {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
               "loadavg_start": load0, "loadavg_end": _loadavg()}


def run_record(*, run: str, seed: int, config: ml_collections.ConfigDict,
               results: Mapping[str, Any], train_timing: Mapping[str, Any],
               eval_timing: Mapping[str, Any], concurrent_trainings: int = 1
               ) -> dict[str, Any]:
  """The compact, committable record of one finished run.

  Args:
    run: the run name (``ablations.RUNS`` key or ``ablations.STAGE1``).
    seed: its seed.
    config: the run's full config.
    results: ``evaluate.evaluate_and_report``'s results.
    train_timing: ``timed`` of the training plus ``summary`` (``train.train``'s return).
    eval_timing: ``timed`` of the evaluation.
    concurrent_trainings: how many trainings shared the machine (``--concurrent_trainings``);
      above 1 the wall times are kept but not ``comparable``.

  Returns:
    A JSON-ready dict: ``status`` 'complete', ``run``, ``seed``, ``kind``, ``protocols``
    (every protocol's metrics), ``headline``, ``class_names``, ``num_images``,
    ``pointing`` and ``attention_recall`` (RMA runs on data with boxes), ``train`` (the
    training summary), ``timing`` (training and evaluation wall/CPU seconds, their sums,
    load averages, ``resumed_from_step``, ``comparable``), ``git``, ``host`` and
    ``config``.
  """
  summary = dict(train_timing.get("summary", {}))
  resumed = int(summary.get("start_step", 0) or 0)
  timing = {
      "train_wall_s": train_timing["wall_s"], "train_cpu_s": train_timing["cpu_s"],
      "eval_wall_s": eval_timing["wall_s"], "eval_cpu_s": eval_timing["cpu_s"],
      "wall_s": train_timing["wall_s"] + eval_timing["wall_s"],
      "cpu_s": train_timing["cpu_s"] + eval_timing["cpu_s"],
      "loadavg_start": train_timing.get("loadavg_start"),
      "loadavg_train_end": train_timing.get("loadavg_end"),
      "loadavg_end": eval_timing.get("loadavg_end"),
      "resumed_from_step": resumed,
      # A run resumed mid-training measured its last session only; one that shared the
      # machine with other trainings measured them too.
      "comparable": resumed == 0 and concurrent_trainings == 1,
      "concurrent_trainings": int(concurrent_trainings),
  }
  keep = ("headline", "class_names", "num_images", "step", "checkpoint", "ema", "split", "data",
          "model", "classification_loss", "score_transform", "prf_score_transform", "ap_mode",
          "top_k", "threshold", "svm")
  rec: dict[str, Any] = {"format": RECORD_FORMAT, "status": "complete", "run": run,
                         "seed": int(seed), "kind": ablations.run_kind(run)}
  rec.update({k: results[k] for k in keep if k in results})
  rec["protocols"] = results["protocols"]
  for k in ("pointing", "attention_recall"):
    if k in results:
      rec[k] = results[k]
  rec.update(train=summary, timing=timing, git=git_state(), host=_host(),
             written=datetime.datetime.now(datetime.timezone.utc).isoformat(
                 timespec="seconds"),
             config=config.to_dict())
  return rec
