r"""Speed benchmarks of the model, with an independent PyTorch implementation side by side.

    python -m benchmarks.bench --smoke                    # seconds: tiny model, all cases
    python -m benchmarks.bench --config=configs/default.py --image_size=512 --crop_size=448 \
        --batch=2 --dtype=float32 --repeats=3 --markdown_out=/tmp/bench.md
    python -m benchmarks.bench --config=configs/voc_resnet101.py --batch=2 ...  # ResNet-101

Run from the repository root (``benchmarks`` is a folder of the repository, not of the
installed package). For one model configuration it measures, each as one JSON line on stdout
(and a Markdown table at the end):

* ``train``: the jitted, donated train step of :mod:`rma_jax.steps` on a (crop x crop) uint8
  batch that already lives on the devices: images/s, compile time, the number of compilations
  after the first call (must be 0: no retracing between steps), FLOPs per image from XLA's
  cost analysis, achieved FLOP/s and its fraction of a measured matmul peak, peak memory;
* ``single_view``: one forward pass on (crop x crop) images, images/s;
* ``ten_view``: the paper's ten-view evaluation on (N x N) images — trunk once, 5 crops x 2
  flips of conv5_3 batched into ONE attention call — images/s;
* ``latency_single_view``, ``latency_ten_view``: the same at batch 1, milliseconds per image.

The trunk is the config's (``model.trunk``: VGG-16, or a ResNet with its stride, batch norm
and ``region_pool``). With PyTorch importable (and ``--torch``), ``benchmarks/torch_rma.py``
runs the same network with the same weights, shapes, batch and thread count in the same
process (a ResNet's weights by torchvision's names, its batch norm given non-trivial
statistics first, ``randomise_batch_norm``, so that the check below covers them); every
record then carries the PyTorch figure and ``ratio`` = rma_jax images/s / PyTorch images/s
(> 1: rma_jax is faster). Before an evaluation case is timed, the two frameworks' scores of
the same images are compared (``torch_max_rel_diff``, max|Δ| / max|torch|); above
``AGREEMENT`` the run stops: timing two different networks compares nothing. Times are
medians over ``--repeats`` calls after ``--warmup`` calls; in the evaluation cases the two
frameworks' timed calls alternate (``timing.interleaved_times``), so that a shared machine's
drift reaches both sides of the ratio alike. Compare the two
columns of one run rather than runs of different days.

The evaluation cases first prepare the evaluation-only parameter forms once
(``rma_jax.kernels.prepare_fn``), as every evaluation pass does; ``prepare_s`` records its
time. Every record names the CPU (``cpu_model``) and its vector extensions
(``cpu_extensions``): a ratio measured on one CPU kind does not hold on another.

FLOPs are the model's: XLA's cost analysis of the same step with ``model.conv_impl='xla'``
and the loops written out (``build.unrolled``: the cost analysis counts a loop body once),
whichever ``conv_impl`` runs. The Winograd forward (``rma_jax.kernels.cpu.winograd``) does 4x fewer
multiplications
in the convolutions, so its achieved FLOP/s, and % of matmul peak, are effective figures
that can exceed the peak.

Peak memory is ``device.memory_stats()['peak_bytes_in_use']`` where the backend reports it
(GPU/TPU) and otherwise the peak resident-set size of the process (reset before each case
through ``/proc/self/clear_refs`` where the kernel allows it): ``benchmarks.timing``, which
the other benchmarks and ``launch/gpu_check.py`` time with too. The PyTorch side is
``benchmarks.bench_torch``, the records and their table ``benchmarks.bench_records``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from rma_jax import configs
from rma_jax import build, config_checks, kernels, models, optimizer, parallel, steps, views
from rma_jax.configs import default as default_config
from rma_jax.data import classes as data_classes

from benchmarks import bench_records, bench_torch, timing

CASES = ("train", "single_view", "ten_view", "latency")
AGREEMENT = {"float32": 1e-3, "bfloat16": 5e-2}
"""The largest max|Δ| / max|torch| of the scores at which the two sides count as one network
(float32: rounding of two convolution libraries; bfloat16 rounds at 2^-8)."""


@dataclasses.dataclass(frozen=True)
class BenchSettings:
  """What to benchmark. ``image_size`` is N (ten-view input), ``crop_size`` N - 64. The sizes
  have no defaults here: ``settings_from_config`` takes them from a training config (the
  model's settings are declared once, in ``configs/default.py``)."""
  image_size: int
  crop_size: int
  batch: int
  dtype: str
  width: int
  num_regions: int
  sample_size: int
  x_dim: int
  hidden_dim: int
  z_dim: int
  num_classes: int
  trunk: str = "vgg16"
  resnet_stride: int = 32
  bn: str = "frozen"
  region_pool: str = "flatten"
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
                z_dim=m.z_dim, trunk=m.trunk, resnet_stride=m.resnet_stride, bn=m.bn,
                region_pool=m.region_pool,
                num_classes=len(data_classes.BUILTIN_CLASSES.get(d.name, range(20))))
  values.update({k: v for k, v in overrides.items() if v is not None})
  return BenchSettings(**values)


def bench_config(settings: BenchSettings,
                 base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The training config with the benchmark's model sizes written into it."""
  config = ml_collections.ConfigDict((base if base is not None else load_config()).to_dict())
  config.model.name = "rma"
  for field in ("width", "num_regions", "sample_size", "x_dim", "hidden_dim", "z_dim",
                "dtype", "trunk", "resnet_stride", "bn", "region_pool"):
    config.model[field] = getattr(settings, field)
  config.data.image_size = settings.image_size
  config.data.crop_size = settings.crop_size
  config.optim.batch_size = settings.batch
  config.optim.grad_accum_steps = 1
  # Random pixels, not a data set: no TFDS (nor TensorFlow) needed to benchmark the model.
  config.data.update(name="demo", source="demo")
  return config


def randomise_batch_norm(params: Any, seed: int) -> Any:
  """``params`` with every batch norm's ``scale``, ``bias``, ``mean`` and ``var`` drawn at
  random (a fresh one is the identity, which would hide a mix-up of the four), scaled so
  that activations stay O(1) through a ResNet's residual sums; other parameters as given."""
  rng = np.random.default_rng(seed)
  draw = {"scale": lambda s: 0.2 + 0.6 * rng.random(s),
          "bias": lambda s: 0.1 * rng.standard_normal(s),
          "mean": lambda s: 0.2 * rng.standard_normal(s),
          "var": lambda s: 0.5 + rng.random(s)}

  def leaf(path, value):
    names = [str(getattr(k, "key", k)) for k in path]
    if len(names) > 1 and "bn" in names[-2] and names[-1] in draw:
      return jnp.asarray(draw[names[-1]](value.shape), value.dtype)
    return value
  return jax.tree_util.tree_map_with_path(leaf, params)


def mesh_for_batch(batch: int, devices: Sequence[jax.Device] | None = None):
  """A ``data`` mesh over the most devices that divide ``batch`` (batch 1 -> one device)."""
  devices = list(jax.devices() if devices is None else devices)
  n = max(d for d in range(1, len(devices) + 1) if batch % d == 0)
  return parallel.make_mesh(devices[:n])


def ten_view_fn(model: models.RMA, crop_size: int) -> Callable:
  """(variables, uint8 (B, N, N, 3) images) -> (B, C) ten-view scores, through
  ``rma_jax.views.ten_view_scores`` (trunk once, the ten views in one attention call)."""

  def fn(variables, images):
    return views.ten_view_scores(model, variables, images, crop_size=crop_size)["scores"]
  return fn


def random_batch(rng: np.random.Generator, batch: int, size: int, num_classes: int
                 ) -> dict[str, np.ndarray]:
  """A uint8 (batch, size, size, 3) batch with random multi-hot labels, all unmasked."""
  labels = (rng.random((batch, num_classes)) < 0.3).astype(np.float32)
  labels[:, 0] = 1.0  # every image has a label: the loss is over the whole batch
  return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          "labels": labels, "mask": np.ones((batch,), np.float32)}


# ----------------------------------------------------------------------------- the cases


def agreement(calls: dict[str, Callable[[], Any]], dtype: str, case: str) -> float:
  """max|Δ| / max|torch| of the two sides' scores (one untimed call each); raises above
  ``AGREEMENT[dtype]``."""
  ours = np.asarray(jax.device_get(calls["rma_jax"]()), np.float64)
  theirs = np.asarray(calls["torch"](), np.float64)
  rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
  if not rel <= AGREEMENT[dtype]:
    raise RuntimeError(f"{case}: rma_jax and PyTorch scores differ by {rel:.3g} of their "
                       f"largest (> {AGREEMENT[dtype]}): not the same network")
  return rel


def run_benchmarks(settings: BenchSettings, base_config: ml_collections.ConfigDict | None = None,
                   emit: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
  """Runs every case of ``settings`` and returns one record each (``bench_records``).

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
  flops_model = build.unrolled(build.build_model(flops_config, settings.num_classes))
  convention = config.data.pixel_convention
  loss_cfg = steps.LossConfig.from_config(config)
  rng = np.random.default_rng(settings.seed)
  peak_flops = timing.matmul_peak_flops(device, settings.dtype, settings.matmul_size)
  run_torch = settings.torch and bench_torch.torch_available() and device.platform == "cpu"
  cpu_model, cpu_extensions = timing.cpu_description()
  common = dict(backend=device.platform, device=str(device.device_kind), threads=threads,
                cpu_model=cpu_model, cpu_extensions=cpu_extensions,
                peak_flops_per_s=peak_flops, glibc_tunables=os.environ.get("GLIBC_TUNABLES"))

  def finish(rec, flops_total, compile_s, compiles, mesh_size, torch_times=None,
             torch_peak=None):
    rec["num_devices"] = mesh_size
    rec["compile_s"] = compile_s
    rec["compiles_after_first_call"] = compiles
    if flops_total:
      rec["flops_per_image"] = flops_total / rec["batch"]
      rec["achieved_flops_per_s"] = rec["flops_per_image"] * rec["images_per_s"]
      rec["flops_utilization"] = rec["achieved_flops_per_s"] / (peak_flops * mesh_size)
    bench_records.add_torch(rec, torch_times, torch_peak, peak_flops)
    rec["load_average"] = os.getloadavg()[0]
    emit(rec)
    return rec

  records = []
  params = randomise_batch_norm(jax.jit(model.init)(
      jax.random.key(settings.seed),
      jnp.zeros((1, settings.crop_size, settings.crop_size, 3), jnp.float32))["params"],
                                 settings.seed)
  torch_runner = (bench_torch.TorchRunner(settings, params, threads, convention)
                  if run_torch else None)

  if "train" in settings.cases:
    mesh = mesh_for_batch(settings.batch)
    schedule = optimizer.learning_rate_schedule(config.optim.learning_rate, config.optim, 100, 1000)
    tx = optimizer.make_optimizer(config.optim, schedule)
    timing.reset_peak_memory()
    # The parameters of the evaluation cases (one compiled initialisation), copied: the
    # train step donates its state.
    state = jax.jit(lambda p: steps.TrainState.create(
        apply_fn=model.apply, params=jax.tree.map(jnp.copy, p), tx=tx),
                    out_shardings=parallel.replicated(mesh))(params)
    host_batch = random_batch(rng, settings.batch, settings.crop_size, settings.num_classes)
    batch = jax.device_put(host_batch, NamedSharding(mesh, P("data")))  # data on device
    step_fn = steps.jit_train_step(loss_cfg, mesh)
    start = time.perf_counter()
    step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = timing.cost_flops(step_fn.lower(state.replace(apply_fn=flops_model.apply), batch))
    with timing.CompileCounter() as counter:  # state donated: only the last one is kept
      times, state = timing.time_steps(step_fn, state, batch, warmup=settings.warmup,
                                       repeats=settings.repeats)
    mem, source = timing.peak_memory(device)
    del state
    rec = bench_records.record(settings, "train", settings.crop_size, settings.batch, times,
                  peak_memory_bytes=mem, memory_source=source, **common)
    torch_times = torch_peak = None
    if torch_runner:
      timing.reset_peak_memory()
      torch_times = timing.time_calls(torch_runner.train_step_fn(host_batch),
                                      warmup=settings.warmup, repeats=settings.repeats)
      torch_peak = timing.peak_rss_bytes()
      torch_runner.reset_weights()  # the evaluation cases compare against the JAX weights
    records.append(finish(rec, flops, compile_s, counter.count, mesh.size, torch_times,
                          torch_peak))

  def eval_case(case, make_fn, size, batch_size, torch_fn_name, **extra):
    fn = make_fn(model)
    mesh = mesh_for_batch(batch_size)
    images_host = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    images = jax.device_put(images_host, NamedSharding(mesh, P("data")))
    variables = jax.device_put({"params": params}, NamedSharding(mesh, P()))
    # As every evaluation pass: the evaluation-only parameter forms once, then the calls.
    start = time.perf_counter()
    variables = jax.block_until_ready(
        kernels.prepare_fn(config.model.conv_impl, mesh, trunk=config.model.trunk)(variables))
    prepare_s = time.perf_counter() - start
    jitted = jax.jit(fn)
    timing.reset_peak_memory()
    start = time.perf_counter()
    jitted.lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    flops = timing.cost_flops(jax.jit(make_fn(flops_model)).lower(variables, images))
    calls = {"rma_jax": lambda: jitted(variables, images)}
    with timing.CompileCounter() as counter:
      for _ in range(settings.warmup):
        jax.block_until_ready(calls["rma_jax"]())
      mem, source = timing.peak_memory(device)
      torch_peak = None
      if torch_runner:
        calls["torch"] = getattr(torch_runner, torch_fn_name)(images_host)
        timing.reset_peak_memory()
        for _ in range(settings.warmup):
          calls["torch"]()
        torch_peak = timing.peak_rss_bytes()
        extra["torch_max_rel_diff"] = agreement(calls, settings.dtype, case)
      # Round-robin, one call of each framework in turn: a shared machine's speed drifts
      # over minutes, and both sides of the ratio then see the same drift.
      times = timing.interleaved_times(calls, settings.repeats, warmup=False)
    rec = bench_records.record(settings, case, size, batch_size, times["rma_jax"],
                  peak_memory_bytes=mem, memory_source=source, prepare_s=prepare_s,
                  prepared_bytes=kernels.nbytes(variables), **common, **extra)
    torch_times = times.get("torch")
    return finish(rec, flops, compile_s, counter.count, mesh.size, torch_times, torch_peak)

  def single(model_):
    return lambda v, x: model_.apply(v, x)["scores"]

  def ten(model_):
    return ten_view_fn(model_, settings.crop_size)

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
    line = bench_records.to_json(rec)
    print(line, flush=True)
    if json_file:
      json_file.write(line + "\n")
      json_file.flush()
  records = run_benchmarks(settings, base, emit)
  if json_file:
    json_file.close()
  table = bench_records.markdown_table(records)
  command = "python -m benchmarks.bench " + " ".join(sys.argv[1:])
  cpu = records[0]["cpu_model"] if records else ""
  where = f"CPU: {cpu} ({records[0]['cpu_extensions']})" if cpu else ""
  print(f"\n{command}\n{where}\n\n{table}")
  if f.markdown_out:
    pathlib.Path(f.markdown_out).write_text(f"`{command}`\n\n{where}\n\n{table}\n")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  app.run(main, argv=configs.resolve_config_path(sys.argv))  # configs/X.py from anywhere
