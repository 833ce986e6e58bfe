r"""Speed benchmarks of the model, with an independent PyTorch implementation side by side.

    python -m rma_jax.bench --smoke                       # seconds: tiny model, all cases
    python -m rma_jax.bench --config=configs/default.py --image_size=512 --crop_size=448 \
        --batch=2 --dtype=float32 --repeats=3 --markdown_out=/tmp/bench.md

For one model configuration it measures, each as one JSON line on stdout (and a Markdown
table at the end):

* ``train``: the jitted, donated train step of :mod:`rma_jax.steps` on a (crop x crop) uint8
  batch that already lives on the devices: images/s, compile time, the number of compilations
  after the first call (must be 0: no retracing between steps), FLOPs per image from XLA's
  cost analysis, achieved FLOP/s and its fraction of a measured matmul peak, peak memory;
* ``single_view``: one forward pass on (crop x crop) images, images/s;
* ``ten_view``: the paper's ten-view evaluation on (N x N) images — trunk once, 5 crops x 2
  flips of conv5_3 batched into ONE attention call — images/s;
* ``latency_single_view``, ``latency_ten_view``: the same at batch 1, milliseconds per image.

With PyTorch importable (and ``--torch``), ``benchmarks/torch_rma.py`` runs the same network
with the same weights, shapes, batch and thread count in the same process; every record then
carries the PyTorch figure and ``ratio`` = rma_jax images/s / PyTorch images/s (> 1: rma_jax
is faster). Times are medians over ``--repeats`` calls after ``--warmup`` calls; the machine
is shared, so compare the two columns of one run rather than runs of different days.

FLOPs are the model's: XLA's cost analysis of the same step with ``model.conv_impl='xla'``
(direct convolutions, no loops: the cost analysis counts a loop body once), whichever
``conv_impl`` runs. The Winograd forward (``rma_jax.conv``) does 4x fewer multiplications
in the convolutions, so its achieved FLOP/s, and % of matmul peak, are effective figures
that can exceed the peak.

Peak memory is ``device.memory_stats()['peak_bytes_in_use']`` where the backend reports it
(GPU/TPU) and otherwise the peak resident-set size of the process (reset before each case
through ``/proc/self/clear_refs`` where the kernel allows it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import resource
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from rma_jax import configs
from rma_jax import build, config_checks, models, optimizer, parallel, steps, views
from rma_jax.data import preprocess
from rma_jax.configs import default as default_config

CASES = ("train", "single_view", "ten_view", "latency")
RECORD_KEYS = (
    "case", "framework", "backend", "device", "num_devices", "input_size", "image_size",
    "crop_size", "batch", "dtype", "width", "num_regions", "sample_size", "images_per_s",
    "latency_ms", "step_s", "step_s_all", "compile_s", "compiles_after_first_call",
    "flops_per_image", "achieved_flops_per_s", "peak_flops_per_s", "flops_utilization",
    "peak_memory_bytes", "memory_source", "threads", "repeats",
    "torch_images_per_s", "torch_latency_ms", "torch_step_s", "torch_peak_memory_bytes",
    "torch_flops_utilization", "ratio")
"""Keys of every JSON record (torch_* and ratio are None when PyTorch is not run)."""

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass(frozen=True)
class BenchSettings:
  """What to benchmark. ``image_size`` is N (ten-view input), ``crop_size`` N - 64."""
  image_size: int = 512
  crop_size: int = 448
  batch: int = 2
  dtype: str = "float32"
  width: int = 1
  num_regions: int = 5
  sample_size: int = 7
  x_dim: int = 4096
  hidden_dim: int = 512
  z_dim: int = 512
  num_classes: int = 20
  cases: tuple[str, ...] = CASES
  repeats: int = 3
  warmup: int = 1
  torch: bool = True
  threads: int = 0  # 0: the CPUs this process may use
  matmul_size: int = 0  # 0: 2048 on CPU, 8192 on accelerators
  seed: int = 0


def smoke_settings(**overrides) -> BenchSettings:
  """A seconds-long configuration for tests: the sizes of ``configs/default.py:tiny``, batch 2."""
  smoke = dict(batch=2, num_classes=5, repeats=2, warmup=1, matmul_size=256)
  return settings_from_config(default_config.get_config("tiny"), **{**smoke, **overrides})


# ----------------------------------------------------------------------------- measuring


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


def _reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS counter (VmHWM) of this process; False if not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak_rss_bytes() -> int:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory() -> None:
  """Starts a new peak-memory window (host RSS; device peaks cannot be reset and are
  reported as the running maximum)."""
  _reset_peak_rss()


def peak_memory(device: jax.Device) -> tuple[int, str]:
  """(bytes, source): the device's peak bytes in use where reported, else peak host RSS."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
  return _peak_rss_bytes(), "process_peak_rss"


def matmul_peak_flops(device: jax.Device, dtype: str = "float32", size: int = 0,
                      repeats: int = 5) -> float:
  """Measured FLOP/s of a large square matmul on ``device`` (the practical peak)."""
  if not size:
    size = 2048 if device.platform == "cpu" else 8192
  dt = build.DTYPES[dtype]
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.device_put(jax.random.normal(k, (size, size), dt), device) for k in keys)
  mm = jax.jit(jnp.matmul)
  times = time_calls(lambda: mm(a, b), warmup=2, repeats=repeats)
  return 2.0 * size ** 3 / min(times)


def cost_flops(compiled: Any) -> float | None:
  """FLOPs of a compiled XLA executable (per device), from its cost analysis."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


# ----------------------------------------------------------------------------- the model


def default_config_path() -> pathlib.Path:
  return pathlib.Path(configs.config_file("default"))  # shipped with the package


def load_config(path: str | os.PathLike | None = None) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file (default: the repository's ``configs/default.py``)."""
  path = pathlib.Path(path) if path else default_config_path()
  spec = importlib.util.spec_from_file_location(f"_bench_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def settings_from_config(config: ml_collections.ConfigDict, **overrides) -> BenchSettings:
  """Bench settings taken from a training config (model, sizes, batch); ``overrides`` win."""
  m, d = config.model, config.data
  values = dict(image_size=d.image_size, crop_size=d.crop_size, batch=config.optim.batch_size,
                dtype=m.dtype, width=m.width, num_regions=m.num_regions,
                sample_size=m.sample_size, x_dim=m.x_dim, hidden_dim=m.hidden_dim,
                z_dim=m.z_dim, num_classes=build.NUM_CLASSES.get(d.name, 20))
  values.update({k: v for k, v in overrides.items() if v is not None})
  return BenchSettings(**values)


def bench_config(settings: BenchSettings,
                 base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The training config with the benchmark's model sizes written into it."""
  config = ml_collections.ConfigDict((base if base is not None else load_config()).to_dict())
  config.model.name = "rma"
  for field in ("width", "num_regions", "sample_size", "x_dim", "hidden_dim", "z_dim",
                "dtype"):
    config.model[field] = getattr(settings, field)
  config.data.image_size = settings.image_size
  config.data.crop_size = settings.crop_size
  config.optim.batch_size = settings.batch
  config.optim.grad_accum_steps = 1
  return config


def mesh_for_batch(batch: int, devices: Sequence[jax.Device] | None = None):
  """A ``data`` mesh over the most devices that divide ``batch`` (batch 1 -> one device)."""
  devices = list(jax.devices() if devices is None else devices)
  n = max(d for d in range(1, len(devices) + 1) if batch % d == 0)
  return parallel.make_mesh(devices[:n])


def ten_view_fn(model: models.RMA, crop_size: int, convention: str) -> Callable:
  """(variables, uint8 (B, N, N, 3) images) -> (B, C) ten-view scores, through
  ``rma_jax.views.ten_view_scores`` (trunk once, the ten views in one attention call)."""

  def fn(variables, images):
    return views.ten_view_scores(model, variables, images, crop_size=crop_size,
                                 pixel_convention=convention)["scores"]
  return fn


def _random_batch(rng: np.random.Generator, batch: int, size: int, num_classes: int
                  ) -> dict[str, np.ndarray]:
  labels = (rng.random((batch, num_classes)) < 0.3).astype(np.float32)
  labels[:, 0] = 1.0  # every image has a label: the loss is over the whole batch
  return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          "labels": labels, "mask": np.ones((batch,), np.float32)}


# ----------------------------------------------------------------------------- PyTorch


def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


def load_torch_rma():
  """Imports ``benchmarks/torch_rma.py`` from the repository (it is not part of the package)."""
  path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "torch_rma.py"
  if "rma_bench_torch_rma" in sys.modules:
    return sys.modules["rma_bench_torch_rma"]
  spec = importlib.util.spec_from_file_location("rma_bench_torch_rma", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


class _TorchRunner:
  """The PyTorch side of each case, same weights and shapes as the JAX side."""

  def __init__(self, settings: BenchSettings, params: Any, threads: int, convention: str):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.tr = load_torch_rma()
    torch.set_num_threads(threads)
    self.settings = settings
    self.model = self.tr.TorchRMA(
        settings.num_classes, settings.num_regions, settings.sample_size, settings.width,
        settings.x_dim, settings.hidden_dim, settings.z_dim)
    self.tr.load_flax_params(self.model, jax.device_get(params))
    self.model = self.model.to(memory_format=torch.channels_last)
    self.convention = convention
    self.bf16 = settings.dtype == "bfloat16"

  def _images(self, images_uint8: np.ndarray):
    torch = self.torch
    x = torch.from_numpy(images_uint8).float()
    if self.convention == "caffe":
      x = x.flip(-1) - torch.tensor([103.939, 116.779, 123.68])
    elif self.convention == "torch":
      x = (x / 255.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    else:
      x = x / 255.0 - 0.5
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

  def _autocast(self):
    return self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.bf16)

  def train_step_fn(self, batch: dict[str, np.ndarray], lr: float = 1e-5) -> Callable:
    torch = self.torch
    opt = torch.optim.Adam(self.model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    images = batch["image"]
    labels = torch.from_numpy(batch["labels"])

    def step():
      opt.zero_grad(set_to_none=True)
      with self._autocast():
        out = self.model(self._images(images))
      loss, _, _ = self.tr.total_loss(out, labels)
      loss.backward()
      opt.step()
      return loss.item()
    return step

  def single_view_fn(self, images: np.ndarray) -> Callable:
    torch = self.torch

    def fwd():
      with torch.inference_mode(), self._autocast():
        return self.model(self._images(images))["scores"].float().numpy()
    return fwd

  def ten_view_fn(self, images: np.ndarray) -> Callable:
    torch = self.torch

    def fwd():
      with torch.inference_mode(), self._autocast():
        return self.tr.ten_view(self.model, self._images(images),
                                self.settings.crop_size).float().numpy()
    return fwd


# ----------------------------------------------------------------------------- the cases


def _record(settings: BenchSettings, case: str, input_size: int, batch: int, times: list[float],
            **extra) -> dict[str, Any]:
  step = statistics.median(times)
  rec = {k: None for k in RECORD_KEYS}
  rec.update(case=case, framework="rma_jax", input_size=input_size,
             image_size=settings.image_size, crop_size=settings.crop_size, batch=batch,
             dtype=settings.dtype, width=settings.width, num_regions=settings.num_regions,
             sample_size=settings.sample_size, images_per_s=batch / step,
             latency_ms=1000.0 * step / batch, step_s=step, step_s_all=times,
             repeats=len(times))
  rec.update(extra)
  return rec


def _add_torch(rec: dict[str, Any], times: list[float] | None, peak: int | None,
               peak_flops: float | None) -> None:
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


def run_benchmarks(settings: BenchSettings, base_config: ml_collections.ConfigDict | None = None,
                   emit: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
  """Runs every case of ``settings`` and returns one record (dict with ``RECORD_KEYS``) each.

  Args:
    settings: what to run.
    base_config: the training config to take the loss/optimizer settings from
      (default ``configs/default.py``).
    emit: called with each record as soon as it is measured (e.g. print a JSON line).
  """
  unknown = set(settings.cases) - set(CASES)
  if unknown:
    raise ValueError(f"unknown cases {sorted(unknown)}; known: {CASES}")
  config = bench_config(settings, base_config)
  config_checks.validate_config(config, num_devices=1)
  emit = emit or (lambda _: None)
  device = jax.devices()[0]
  threads = settings.threads or len(os.sched_getaffinity(0))
  model = build.build_model(config, settings.num_classes)
  flops_config = ml_collections.ConfigDict(config.to_dict())
  flops_config.model.conv_impl = "xla"
  flops_model = build.build_model(flops_config, settings.num_classes)  # the FLOPs to count
  convention = config.data.pixel_convention
  loss_cfg = steps.LossConfig.from_config(config)
  rng = np.random.default_rng(settings.seed)
  peak_flops = matmul_peak_flops(device, settings.dtype, settings.matmul_size)
  run_torch = settings.torch and torch_available() and device.platform == "cpu"
  common = dict(backend=device.platform, device=str(device.device_kind), threads=threads,
                peak_flops_per_s=peak_flops)

  def finish(rec, flops_total, compile_s, compiles, mesh_size, torch_times=None,
             torch_peak=None):
    rec["num_devices"] = mesh_size
    rec["compile_s"] = compile_s
    rec["compiles_after_first_call"] = compiles
    if flops_total:
      rec["flops_per_image"] = flops_total / rec["batch"]
      rec["achieved_flops_per_s"] = rec["flops_per_image"] * rec["images_per_s"]
      rec["flops_utilization"] = rec["achieved_flops_per_s"] / (peak_flops * mesh_size)
    _add_torch(rec, torch_times, torch_peak, peak_flops)
    emit(rec)
    return rec

  records = []
  params = jax.jit(model.init)(
      jax.random.key(settings.seed),
      jnp.zeros((1, settings.crop_size, settings.crop_size, 3), jnp.float32))["params"]
  torch_runner = _TorchRunner(settings, params, threads, convention) if run_torch else None

  if "train" in settings.cases:
    mesh = mesh_for_batch(settings.batch)
    schedule = optimizer.learning_rate_schedule(config.optim.learning_rate, config.optim, 100, 1000)
    tx = optimizer.make_optimizer(config.optim, schedule)
    reset_peak_memory()
    state = steps.create_train_state(model, tx, jax.random.key(settings.seed),
                                     (settings.crop_size, settings.crop_size, 3), mesh)
    host_batch = _random_batch(rng, settings.batch, settings.crop_size, settings.num_classes)
    batch = jax.device_put(host_batch, NamedSharding(mesh, P("data")))  # data on device
    step_fn = steps.jit_train_step(loss_cfg, mesh)
    start = time.perf_counter()
    step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = cost_flops(step_fn.lower(state.replace(apply_fn=flops_model.apply), batch).compile())
    holder = {"state": state}

    def one_step():
      holder["state"], metrics = step_fn(holder["state"], batch)  # state donated
      return metrics["loss"]
    with CompileCounter() as counter:
      times = time_calls(one_step, warmup=settings.warmup, repeats=settings.repeats)
    mem, source = peak_memory(device)
    del holder
    rec = _record(settings, "train", settings.crop_size, settings.batch, times,
                  peak_memory_bytes=mem, memory_source=source, **common)
    torch_times = torch_peak = None
    if torch_runner:
      reset_peak_memory()
      torch_times = time_calls(torch_runner.train_step_fn(host_batch), warmup=settings.warmup,
                               repeats=settings.repeats)
      torch_peak = _peak_rss_bytes()
    records.append(finish(rec, flops * mesh.size if flops else None, compile_s, counter.count,
                          mesh.size, torch_times, torch_peak))

  def eval_case(case, make_fn, size, batch_size, torch_fn_name, **extra):
    fn = make_fn(model)
    mesh = mesh_for_batch(batch_size)
    images_host = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    images = jax.device_put(images_host, NamedSharding(mesh, P("data")))
    variables = jax.device_put({"params": params}, NamedSharding(mesh, P()))
    jitted = jax.jit(fn)
    reset_peak_memory()
    start = time.perf_counter()
    jitted.lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    flops = cost_flops(jax.jit(make_fn(flops_model)).lower(variables, images).compile())
    with CompileCounter() as counter:
      times = time_calls(lambda: jitted(variables, images), warmup=settings.warmup,
                         repeats=settings.repeats)
    mem, source = peak_memory(device)
    rec = _record(settings, case, size, batch_size, times, peak_memory_bytes=mem,
                  memory_source=source, **common, **extra)
    torch_times = torch_peak = None
    if torch_runner:
      reset_peak_memory()
      torch_times = time_calls(getattr(torch_runner, torch_fn_name)(images_host),
                               warmup=settings.warmup, repeats=settings.repeats)
      torch_peak = _peak_rss_bytes()
    return finish(rec, flops * mesh.size if flops else None, compile_s, counter.count,
                  mesh.size, torch_times, torch_peak)

  def single(model_):
    return lambda v, x: model_.apply(v, preprocess.normalize(x, convention))["scores"]

  def ten(model_):
    return ten_view_fn(model_, settings.crop_size, convention)

  if "single_view" in settings.cases:
    records.append(eval_case("single_view", single, settings.crop_size, settings.batch,
                             "single_view_fn"))
  if "ten_view" in settings.cases:
    records.append(eval_case("ten_view", ten, settings.image_size, settings.batch,
                             "ten_view_fn"))
  if "latency" in settings.cases:
    records.append(eval_case("latency_single_view", single, settings.crop_size, 1,
                             "single_view_fn"))
    records.append(eval_case("latency_ten_view", ten, settings.image_size, 1, "ten_view_fn"))
  return records


# ----------------------------------------------------------------------------- reporting


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
  if value is None:
    return "–"
  return format(value * scale, spec)


def markdown_table(records: Iterable[dict[str, Any]]) -> str:
  """A Markdown table of the records, one row per case, PyTorch and the ratio beside."""
  header = ("| case | input | batch | dtype | rma_jax img/s | PyTorch img/s | ratio | "
            "latency ms (jax / torch) | compile s | recompiles | GFLOP/img | "
            "achieved GFLOP/s | % of matmul peak | peak mem MiB (jax / torch) |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for r in records:
    lines.append("| " + " | ".join([
        r["case"], f"{r['input_size']}²", str(r["batch"]), r["dtype"],
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


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.floating, np.integer)):
    return obj.item()
  return str(obj)


def to_json(record: dict[str, Any]) -> str:
  return json.dumps(record, default=_json_default, sort_keys=False)


# ----------------------------------------------------------------------------- CLI


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Training config (default configs/default.py).",
                                  lock_config=False)
  flags.DEFINE_bool("smoke", False, "Tiny, seconds-long run (width 16, 64 px, batch 2).")
  flags.DEFINE_integer("image_size", None, "N (ten-view input); default from the config.")
  flags.DEFINE_integer("crop_size", None, "N - 64 (train / single view); default from config.")
  flags.DEFINE_integer("batch", None, "Batch size; default the config's optim.batch_size.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Computation dtype.")
  flags.DEFINE_integer("width", None, "VGG channel divisor (1 = real VGG-16).")
  flags.DEFINE_integer("num_regions", None, "K.")
  flags.DEFINE_integer("sample_size", None, "S.")
  flags.DEFINE_integer("x_dim", None, "x_k size (4096 = fc6).")
  flags.DEFINE_integer("hidden_dim", None, "LSTM hidden size.")
  flags.DEFINE_integer("z_dim", None, "z_k size.")
  flags.DEFINE_integer("num_classes", None, "C; default from the config's data set.")
  flags.DEFINE_list("cases", list(CASES), f"Subset of {CASES}.")
  flags.DEFINE_integer("repeats", 3, "Timed calls per case (median reported).")
  flags.DEFINE_integer("warmup", 1, "Untimed calls before timing.")
  flags.DEFINE_bool("torch", True, "Run the PyTorch implementation side by side (CPU).")
  flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0 = the CPUs XLA uses).")
  flags.DEFINE_integer("matmul_size", 0, "Side of the peak-FLOP/s matmul (0 = auto).")
  flags.DEFINE_string("json_out", "", "Also append the JSON lines to this file.")
  flags.DEFINE_string("markdown_out", "", "Also write the Markdown table to this file.")
  return flags.FLAGS


def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  f = FLAGS
  overrides = dict(image_size=f.image_size, crop_size=f.crop_size, batch=f.batch,
                   dtype=f.dtype, width=f.width, num_regions=f.num_regions,
                   sample_size=f.sample_size, x_dim=f.x_dim, hidden_dim=f.hidden_dim,
                   z_dim=f.z_dim, num_classes=f.num_classes, cases=tuple(f.cases),
                   repeats=f.repeats, warmup=f.warmup, torch=f.torch, threads=f.threads,
                   matmul_size=f.matmul_size)
  base = f.config if f.config is not None else load_config()
  if f.smoke:
    settings = smoke_settings(**{k: v for k, v in overrides.items()
                                 if v is not None and k in ("dtype", "cases", "torch",
                                                            "threads")})
  else:
    settings = settings_from_config(base, **overrides)
  json_file = open(f.json_out, "a") if f.json_out else None  # pylint: disable=consider-using-with

  def emit(rec):
    line = to_json(rec)
    print(line, flush=True)
    if json_file:
      json_file.write(line + "\n")
      json_file.flush()
  records = run_benchmarks(settings, base, emit)
  if json_file:
    json_file.close()
  table = markdown_table(records)
  command = "python -m rma_jax.bench " + " ".join(sys.argv[1:])
  print(f"\n{command}\n\n{table}")
  if f.markdown_out:
    pathlib.Path(f.markdown_out).write_text(f"`{command}`\n\n{table}\n")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  app.run(main, argv=configs.resolve_config_path(sys.argv))  # configs/X.py from anywhere
