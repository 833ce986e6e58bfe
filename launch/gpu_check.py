r"""One prepared run for a lent GPU (e.g. an H200): correctness, speed and MFU in < 8 minutes.

    python launch/gpu_check.py              # on the GPU machine (JAX with CUDA installed)
    python launch/gpu_check.py --smoke      # anywhere, seconds: tiny model on the default device

Needs only JAX, Flax, Optax and NumPy (plus this repository): no TensorFlow, no TFDS, no
downloads; it imports ``rma_jax.models/ops/losses/steps/views`` and ``benchmarks.timing`` (the
timing helpers every benchmark uses), which are TF-free.

1. Correctness: the full model (real VGG-16 width, 448 crops, batch 2) in float32 and in
   bfloat16 on the accelerator against a float32 reference on the host CPU
   (``jax.devices('cpu')``) in the same process: max |diff| of the scores and theta, and the
   loss, with a pass/fail line (float32 within 1e-2 relative, bf16 within 0.1 — bf16
   recurrences drift, so only gross errors fail it).
2. Train-step images/s (bf16 compute, float32 parameters, donated state, data on device) at
   N = 512 and 640 (crops 448 / 576) with batch 16, then a doubling search for the largest
   batch that fits (stops at the first out-of-memory or ``--max_batch``).
3. Ten-view evaluation images/s at N = 512 and 640 (batch 16), trunk once, ten views in one
   attention call.
4. MFU: model FLOPs (XLA cost analysis) x images/s over 989 TFLOP/s (H200 bf16 dense) and
   over the measured peak of a large bf16 matmul.

Prints JSON lines as it goes and one Markdown table at the end. A time budget
(``--budget_s``, default 360 s: no new case starts after it) skips the remaining cases rather
than overrun.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import timing  # noqa: E402
from rma_jax import build, models, optimizer, parallel, steps, views  # noqa: E402

H200_BF16_DENSE_FLOPS = 989e12
START = time.perf_counter()


def log(rec: dict) -> None:
  rec = dict(rec, t_s=round(time.perf_counter() - START, 1))
  print(json.dumps(rec, default=str), flush=True)


def make_config(width: int, dims: dict, dtype: str, crop: int, image: int, batch: int
                ) -> ml_collections.ConfigDict:
  """The parts of configs/default.py the train step needs, written out (no file import)."""
  c = ml_collections.ConfigDict()
  c.data = dict(name="voc2007", image_size=image, crop_size=crop, pixel_convention="caffe")
  c.model = dict(name="rma", width=width, num_regions=5, sample_size=7, standard_lstm=False,
                 theta_bias=(0.5, 0.5, 0.0, 0.0), theta_kernel_scale=0.1, fixed_regions="",
                 dtype=dtype, remat=False, conv_impl="auto", trunk_init="he", **dims)
  c.loss = dict(classification="softmax_euclidean", gamma=0.1, alpha=0.5, beta=0.1,
                lambda_anchor=0.01, lambda_positive=0.1, use_anchor=True, use_scale=True,
                use_positive=True)
  c.optim = dict(batch_size=batch, learning_rate=1e-5, schedule="constant", decay_epochs=(30,),
                 decay_factor=0.1, warmup_steps=0, b1=0.9, b2=0.999, grad_clip_norm=0.0,
                 trunk_lr_multiplier=1.0, grad_accum_steps=1)
  return ml_collections.ConfigDict(c)


_PARAMS: dict = {}


def initial_params(width: int, dims: dict) -> dict:
  """The float32 parameters of the RMA of ``width`` and ``dims`` (every case and dtype uses
  the same; one compiled initialisation), on the host CPU."""
  key = (width, tuple(sorted(dims.items())))
  if key not in _PARAMS:
    model = models.RMA(num_classes=20, width=width, **dims)
    with jax.default_device(jax.devices("cpu")[0]):
      _PARAMS[key] = jax.device_get(jax.jit(model.init)(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
  return _PARAMS[key]


def correctness(args, dims, device) -> list[dict]:
  """f32 and bf16 on ``device`` vs f32 on the host CPU; same params and images."""
  cpu = jax.devices("cpu")[0]
  crop, batch = args.check_crop, 2
  rng = np.random.default_rng(0)
  images = rng.normal(0, 50, (batch, crop, crop, 3)).astype(np.float32)
  labels = (rng.random((batch, 20)) < 0.2).astype(np.float32)
  labels[:, 0] = 1
  params = initial_params(args.width, dims)
  loss_cfg = steps.LossConfig()

  def forward(dtype):
    model = models.RMA(num_classes=20, width=args.width, dtype=dtype, **dims)

    def f(p, x, y):
      out = model.apply({"params": p}, x)
      return out, loss_cfg.total_loss(out, y)[0]
    return jax.jit(f)  # compiled per device of its inputs (once when both are the CPU)
  fns = {jnp.float32: forward(jnp.float32), jnp.bfloat16: forward(jnp.bfloat16)}

  def run(dtype, dev):
    out, loss = fns[dtype](*jax.device_put((params, images, labels), dev))
    return jax.device_get(out), float(loss)

  ref, ref_loss = run(jnp.float32, cpu)
  recs = []
  for name, dtype, tol in (("float32", jnp.float32, 1e-2), ("bfloat16", jnp.bfloat16, 1e-1)):
    out, loss = run(dtype, device)
    s_err = float(np.max(np.abs(out["scores"] - ref["scores"])) /
                  (np.max(np.abs(ref["scores"])) + 1e-12))
    t_err = float(np.max(np.abs(out["theta"] - ref["theta"])))
    l_err = abs(loss - ref_loss) / abs(ref_loss)
    rec = dict(case="correctness", dtype=name, device=str(device.device_kind),
               scores_rel_err=s_err, theta_abs_err=t_err, loss=loss, cpu_loss=ref_loss,
               loss_rel_err=l_err, ok=bool(max(s_err, t_err, l_err) < tol))
    log(rec)
    recs.append(rec)
  return recs


def train_case(args, dims, image: int, crop: int, batch: int, dtype: str) -> dict:
  config = make_config(args.width, dims, dtype, crop, image, batch)
  model = build.build_model(config, 20)
  mesh = parallel.make_mesh()
  tx = optimizer.make_optimizer(config.optim, optimizer.learning_rate_schedule(
      1e-5, config.optim, 100, 1000))
  params = jax.device_put(initial_params(args.width, dims), parallel.replicated(mesh))
  state = jax.jit(lambda p: steps.TrainState.create(
      apply_fn=model.apply, params=jax.tree.map(jnp.copy, p), tx=tx),
                  out_shardings=parallel.replicated(mesh))(params)
  rng = np.random.default_rng(0)
  labels = (rng.random((batch, 20)) < 0.2).astype(np.float32)
  labels[:, 0] = 1
  batch_data = jax.device_put(
      {"image": rng.integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8), "labels": labels,
       "mask": np.ones((batch,), np.float32)}, NamedSharding(mesh, P("data")))
  step = steps.jit_train_step(steps.LossConfig(), mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch_data).compile()
  compile_s = time.perf_counter() - t0
  flops = timing.cost_flops(compiled)
  times, state = timing.time_steps(step, state, batch_data, warmup=args.warmup,
                                   repeats=args.repeats)  # state donated: the last one kept
  dt = statistics.median(times)
  cache = getattr(step.jitted, "_cache_size", lambda: None)()
  del state
  return dict(case="train", N=image, crop=crop, batch=batch, dtype=dtype,
              images_per_s=batch / dt, step_ms=1000 * dt, compile_s=compile_s,
              flops_per_image=(flops * mesh.size / batch) if flops else None,
              jit_cache_size=cache)


def ten_view_case(args, dims, image: int, crop: int, batch: int, dtype: str) -> dict:
  config = make_config(args.width, dims, dtype, crop, image, batch)
  model = build.build_model(config, 20)
  params = jax.device_put(initial_params(args.width, dims))
  images = jax.device_put(np.random.default_rng(0).integers(
      0, 256, (batch, image, image, 3), dtype=np.uint8))
  fn = jax.jit(lambda v, x: views.ten_view_scores(model, v, x, crop_size=crop)["scores"])
  t0 = time.perf_counter()
  compiled = fn.lower({"params": params}, images).compile()
  compile_s = time.perf_counter() - t0
  flops = timing.cost_flops(compiled)
  dt = statistics.median(timing.time_calls(lambda: fn({"params": params}, images),
                                           warmup=args.warmup, repeats=args.repeats))
  return dict(case="ten_view", N=image, crop=crop, batch=batch, dtype=dtype,
              images_per_s=batch / dt, step_ms=1000 * dt, ms_per_image=1000 * dt / batch,
              compile_s=compile_s, flops_per_image=flops / batch if flops else None)


def _is_oom(err: Exception) -> bool:
  text = str(err).lower()
  return "resource_exhausted" in text or "out of memory" in text or "oom" in text


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny model on the default device")
  p.add_argument("--sizes", default="512,640", help="N values; crops are N - 64")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--max_batch", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--budget_s", type=float, default=360.0)
  p.add_argument("--matmul_size", type=int, default=8192)
  a = p.parse_args()
  a.width, a.check_crop = 1, 448
  dims = dict(x_dim=4096, hidden_dim=512, z_dim=512)
  sizes = [int(s) for s in a.sizes.split(",")]
  if a.smoke:
    a.width, a.check_crop, a.batch, a.max_batch = 16, 64, 2, 2
    a.repeats, a.warmup, a.matmul_size = 2, 1, 256
    dims = dict(x_dim=64, hidden_dim=64, z_dim=64)
    sizes = [96]
  device = jax.devices()[0]
  log(dict(case="device", platform=device.platform, kind=str(device.device_kind),
           num_devices=jax.device_count(), jax=jax.__version__))
  peak = timing.matmul_peak_flops(device, "bfloat16", a.matmul_size, repeats=10, warmup=3)
  log(dict(case="matmul_peak", size=a.matmul_size, flops_per_s=peak))
  rows = []
  checks = correctness(a, dims, device)

  def over_budget():
    return time.perf_counter() - START > a.budget_s

  for image in sizes:
    crop = image - 64
    batch = a.batch
    while batch <= a.max_batch and not over_budget():
      try:
        rec = train_case(a, dims, image, crop, batch, a.dtype)
      except Exception as err:  # pylint: disable=broad-except
        if _is_oom(err):
          log(dict(case="train", N=image, batch=batch, oom=True))
          break
        raise
      log(rec)
      rows.append(rec)
      batch *= 2
    if not over_budget():
      rec = ten_view_case(a, dims, image, crop, a.batch, a.dtype)
      log(rec)
      rows.append(rec)

  print("\n| case | N | batch | dtype | images/s | ms/step | compile s | GFLOP/img | "
        f"MFU vs 989 TFLOP/s | vs matmul peak ({peak / 1e12:.0f} TFLOP/s) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    achieved = r["flops_per_image"] * r["images_per_s"] if r["flops_per_image"] else None
    mfu = f"{100 * achieved / H200_BF16_DENSE_FLOPS:.1f}%" if achieved else "–"
    mp = f"{100 * achieved / peak:.1f}%" if achieved else "–"
    gf = f"{r['flops_per_image'] / 1e9:.1f}" if r["flops_per_image"] else "–"
    print(f"| {r['case']} | {r['N']} | {r['batch']} | {r['dtype']} | {r['images_per_s']:.1f} | "
          f"{r['step_ms']:.1f} | {r['compile_s']:.1f} | {gf} | {mfu} | {mp} |")
  for c in checks:
    print(f"correctness {c['dtype']}: scores rel err {c['scores_rel_err']:.2e}, theta abs err "
          f"{c['theta_abs_err']:.2e}, loss {c['loss']:.5f} vs CPU {c['cpu_loss']:.5f}: "
          f"{'OK' if c['ok'] else 'MISMATCH'}")
  print(f"paper (TITAN X, ten-view): 150 ms/image at N=512, 200 ms/image at N=640; "
        f"total {time.perf_counter() - START:.0f} s")
  return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
  sys.exit(main())
