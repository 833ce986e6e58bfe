"""The timing helpers every benchmark here uses: one way to time, count compiles and peaks.

* ``time_calls``: wall seconds of repeated calls (outputs blocked on) after warm-up calls;
  ``time_steps`` the same for a train step that donates its state; ``interleaved_times``
  several calls round-robin, so that a shared machine's load hits them alike.
* ``CompileCounter``: XLA compilations inside a ``with`` block (no retracing must happen).
* ``reset_peak_memory`` / ``peak_memory``: the device's peak bytes, else the process's RSS.
* ``matmul_peak_flops``: the practical FLOP/s peak; ``cost_flops``: XLA's FLOP count.
* ``cpu_description``: the CPU model and its vector extensions, which every record names.

Imports JAX and ``rma_jax.build`` only (no TensorFlow, no torch).
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from rma_jax import build

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def time_calls(fn: Callable[[], Any], *, warmup: int, repeats: int) -> list[float]:
  """Wall seconds of ``repeats`` calls of ``fn`` (outputs blocked on) after ``warmup`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def median_ms(fn: Callable[[], Any], *, warmup: int, repeats: int) -> float:
  """Median milliseconds of ``time_calls``."""
  return 1000.0 * statistics.median(time_calls(fn, warmup=warmup, repeats=repeats))


def time_steps(step: Callable[[Any, Any], tuple[Any, Mapping[str, Any]]], state: Any,
               batch: Any, *, warmup: int, repeats: int) -> tuple[list[float], Any]:
  """Times ``state, metrics = step(state, batch)`` as ``time_calls`` does (blocking on
  ``metrics['loss']``); returns the times and the last state. ``step`` may donate its
  state: only the newest one is kept."""
  box = [state]

  def one() -> Any:
    box[0], metrics = step(box[0], batch)
    return metrics["loss"]
  times = time_calls(one, warmup=warmup, repeats=repeats)
  return times, box.pop()


def cpu_seconds() -> float:
  """User + system CPU seconds of this process so far (every thread)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def interleaved_times(calls: Mapping[str, Callable[[], Any]], repeats: int,
                      cpu: dict[str, list[float]] | None = None,
                      warmup: bool = True) -> dict[str, list[float]]:
  """Seconds of each zero-argument call, timed round-robin (after one warm-up call each,
  unless ``warmup`` is False: the caller has warmed them up).

  With a dict ``cpu``, also the process CPU seconds (user + system) of each call into it:
  on a shared machine they vary less than wall time with the other jobs' load.
  """
  for c in calls.values() if warmup else ():
    jax.block_until_ready(c())
  times: dict[str, list[float]] = {k: [] for k in calls}
  if cpu is not None:
    cpu.update({k: [] for k in calls})
  for _ in range(repeats):
    for k, c in calls.items():
      t, c0 = time.perf_counter(), cpu_seconds()
      jax.block_until_ready(c())
      times[k].append(time.perf_counter() - t)
      if cpu is not None:
        cpu[k].append(cpu_seconds() - c0)
  return times


class CompileCounter(contextlib.AbstractContextManager):
  """Counts XLA backend compilations inside a ``with`` block (via ``jax.monitoring``)."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0

  def _listener(self, event: str, duration_secs: float, **_) -> None:
    if event == _BACKEND_COMPILE_EVENT:
      self.count += 1
      self.seconds += duration_secs

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)
    return False


VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "neon", "asimd",
                     "sve")
"""The CPU flags a benchmark record names (``cpu_description``): the vector units XLA:CPU and
PyTorch's kernels use."""


def cpu_description() -> tuple[str, str]:
  """(CPU model name, its vector extensions among ``VECTOR_EXTENSIONS``, space-separated),
  from /proc/cpuinfo; ('', '') where it is not readable."""
  model, flags = "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
          model = value.strip()
        elif key in ("flags", "Features") and not flags:
          flags = set(value.split())
  except OSError:
    pass
  return model, " ".join(e for e in VECTOR_EXTENSIONS if e in flags)


def peak_rss_bytes() -> int:
  """The peak resident-set size of this process (VmHWM, else ``ru_maxrss``)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory() -> bool:
  """Starts a new peak-memory window: resets the kernel's peak-RSS counter (VmHWM) of this
  process; False if not allowed. Device peaks cannot be reset: they are the running
  maximum."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_memory(device: jax.Device) -> tuple[int, str]:
  """(bytes, source): the device's peak bytes in use where reported, else peak host RSS."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
  return peak_rss_bytes(), "process_peak_rss"


def matmul_peak_flops(device: jax.Device, dtype: str = "float32", size: int = 0,
                      repeats: int = 5, warmup: int = 2) -> float:
  """Measured FLOP/s of a large square matmul on ``device`` (the practical peak: the
  fastest of ``repeats`` calls). ``size`` 0: 2048 on CPU, 8192 on accelerators."""
  if not size:
    size = 2048 if device.platform == "cpu" else 8192
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.device_put(jax.random.normal(k, (size, size), build.DTYPES[dtype]), device)
          for k in keys)
  mm = jax.jit(jnp.matmul)
  times = time_calls(lambda: mm(a, b), warmup=warmup, repeats=repeats)
  return 2.0 * size ** 3 / min(times)


def cost_flops(stage: Any) -> float | None:
  """FLOPs from XLA's cost analysis of a ``Lowered`` function (the whole computation, before
  it is compiled or split over devices) or of a ``Compiled`` one (per device); None where
  the backend gives none."""
  try:
    analysis = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])
