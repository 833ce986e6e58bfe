r"""Where does XLA:CPU lose to PyTorch in VGG-16's backward pass? One conv layer at a time.

    python benchmarks/conv_profile.py                       # VGG-16 at 224, batch 2
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/conv_profile.py --torch=false

For a representative layer of each VGG-16 block (3x3, pad 1, NHWC / HWIO in JAX,
channels_last NCHW in torch) it times, separately, the forward convolution, the gradient in
the input (a transposed convolution) and the gradient in the kernel (a convolution of the
input with the output gradient), each as its own jitted function from ``jax.vjp``, and the
same three through ``torch.ops.aten.convolution_backward``. Medians of ``--repeats``.
The XLA-vs-torch ratio per pass shows which of the three is slow, and the HLO printed with
``--dump_hlo`` shows what XLA lowers each one to.

``--compare`` times, per layer and interleaved round by round, one forward + backward pass
(gradients in input and kernel, as in a train step) of ``rma_jax.kernels.cpu.conv.conv3x3``
with ``impl='xla'`` and ``impl='patches'`` against torch, and the kernel gradient alone
(``conv.kernel_grad``). ``--train_step`` times the full RMA train step (``rma_jax.steps``,
the benchmark config of ``benchmarks.bench``) with ``model.conv_impl='xla'`` (XLA's
convolutions), with ``'auto'`` (the CPU kernels) and PyTorch's, interleaved step by step:

    python benchmarks/conv_profile.py --compare --size=448 --repeats=3
    python benchmarks/conv_profile.py --train_step --size=448 --batch=2 --repeats=3

``--winograd`` times, per layer, the evaluation forward (not differentiated) of XLA's conv,
``rma_jax.kernels.cpu.winograd.winograd_conv3x3`` with each ``--variants``
tile:tiles_per_band (its kernel
transformed once, as evaluation does), ``conv3x3(impl='auto')`` (what the model runs) and
torch's ``conv2d`` (channels_last, inference mode), interleaved:

    python benchmarks/conv_profile.py --winograd --size=512 --batch=2 --repeats=3 \
        --variants=2:256,4:256,6:256
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # rma_jax from here
from benchmarks import timing  # noqa: E402  pylint: disable=g-import-not-at-top

LAYERS = {  # name: (spatial size at a 224 input, in channels, out channels)
    "conv1_2": (224, 64, 64), "conv2_2": (112, 128, 128), "conv3_2": (56, 256, 256),
    "conv4_2": (28, 512, 512), "conv5_2": (14, 512, 512)}
ALL_LAYERS = dict(LAYERS, conv1_1=(224, 3, 64), conv2_1=(112, 64, 128),
                  conv3_1=(56, 128, 256), conv4_1=(28, 256, 512))
"""Every distinct layer shape of VGG-16 (conv3_3 = conv3_2, conv4_3 = conv4_2, ...)."""


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _chosen(names, layers):
  """The layer names of ``names`` (in order) that ``--layers`` selects (all when empty)."""
  return [n for n in names if not layers or n in layers]


def _layer_operands(shape: tuple[int, int, int], size: int, batch: int):
  """(hw, x, w, g) of a VGG layer ``shape`` (its size at a 224 input, Cin, Cout) at a ``size``
  input: the NHWC input, HWIO kernel and NHWC output cotangent, float32 NumPy, seed 0."""
  hw, cin, cout = shape
  hw = int(round(hw * size / 224))
  rng = np.random.default_rng(0)
  x_np = rng.normal(size=(batch, hw, hw, cin)).astype(np.float32)
  w_np = (rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
  g_np = rng.normal(size=(batch, hw, hw, cout)).astype(np.float32)
  return hw, x_np, w_np, g_np


def _torch_operands(x_np, w_np, g_np, dtype):
  """NHWC input, HWIO kernel and NHWC cotangent as channels-last NCHW / OIHW torch tensors."""
  import torch  # pylint: disable=g-import-not-at-top
  tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  cl = torch.channels_last
  xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(memory_format=cl).to(tdt)
  wt = torch.from_numpy(w_np).permute(3, 2, 0, 1).contiguous(memory_format=cl).to(tdt)
  gt = torch.from_numpy(g_np).permute(0, 3, 1, 2).contiguous(memory_format=cl).to(tdt)
  return xt, wt, gt, tdt


def profile(size=224, batch=2, repeats=5, use_torch=True, dtype="float32", layers=None,
            dump_hlo=False):
  out = []
  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  for name in _chosen(LAYERS, layers):
    _, cin, cout = LAYERS[name]
    hw, x_np, w_np, g_np = _layer_operands(LAYERS[name], size, batch)
    x, w, g = (jnp.asarray(a, dt) for a in (x_np, w_np, g_np))
    fwd = jax.jit(_conv)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: _conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: _conv(x, w), w)[1](g)[0])
    flops = 2.0 * batch * hw * hw * cin * cout * 9
    rec = {"layer": name, "hw": hw, "cin": cin, "cout": cout, "batch": batch, "dtype": dtype,
           "gflop_per_pass": flops / 1e9,
           "xla_fwd_ms": timing.median_ms(lambda: fwd(x, w), warmup=1, repeats=repeats),
           "xla_dx_ms": timing.median_ms(lambda: dx(x, w, g), warmup=1, repeats=repeats),
           "xla_dw_ms": timing.median_ms(lambda: dw(x, w, g), warmup=1, repeats=repeats),
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if dump_hlo:
      for tag, f, args in (("fwd", fwd, (x, w)), ("dx", dx, (x, w, g)), ("dw", dw, (x, w, g))):
        text = f.lower(*args).compile().as_text()
        print(f"---- {name} {tag}\n" + "\n".join(
            l for l in text.splitlines() if "convolution" in l or "custom-call" in l or
            "transpose" in l or "reverse" in l or "fusion" in l.split("=")[0]), file=sys.stderr)
    if use_torch:
      import torch  # pylint: disable=g-import-not-at-top
      xt, wt, gt, tdt = _torch_operands(x_np, w_np, g_np, dtype)
      with torch.no_grad():
        def bwd(mask):
          return torch.ops.aten.convolution_backward(
              gt, xt, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
        rec["torch_fwd_ms"] = timing.median_ms(
            lambda: torch.nn.functional.conv2d(xt, wt, padding=1), warmup=1, repeats=repeats)
        rec["torch_dx_ms"] = timing.median_ms(lambda: bwd([True, False, False]), warmup=1,
                                              repeats=repeats)
        rec["torch_dw_ms"] = timing.median_ms(lambda: bwd([False, True, False]), warmup=1,
                                              repeats=repeats)
      for p in ("fwd", "dx", "dw"):
        rec[f"ratio_{p}"] = rec[f"torch_{p}_ms"] / rec[f"xla_{p}_ms"]  # > 1: XLA faster
    out.append(rec)
  return out


def _interleaved_ms(calls, repeats):
  """Median ms of each zero-argument call, timed round-robin (one warm-up call each)."""
  return {k: 1000 * statistics.median(v)
          for k, v in timing.interleaved_times(calls, repeats).items()}


def compare(size=224, batch=2, repeats=3, use_torch=True, dtype="float32", layers=None):
  """Forward+backward of conv3x3 per impl (and torch), and the kernel gradient alone."""
  from rma_jax.kernels.cpu import conv  # pylint: disable=g-import-not-at-top
  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  out = []
  for name in _chosen(sorted(ALL_LAYERS), layers):
    _, cin, cout = ALL_LAYERS[name]
    hw, x_np, w_np, g_np = _layer_operands(ALL_LAYERS[name], size, batch)
    x, w, g = (jnp.asarray(a, dt) for a in (x_np, w_np, g_np))
    b = jnp.zeros((cout,), dt)
    calls = {}
    for impl in ("xla", "patches"):
      def fb(x, w, b, g, impl=impl):  # the output too, or XLA drops the forward conv
        y, vjp = jax.vjp(lambda x, w, b: conv.conv3x3(x, w, b, impl=impl), x, w, b)
        return y, vjp(g)
      f = jax.jit(fb)
      calls[f"fb_{impl}"] = functools.partial(f, x, w, b, g)
    calls["dw_xla"] = functools.partial(
        jax.jit(lambda x, w, g: jax.vjp(lambda w: _conv(x, w), w)[1](g)[0]), x, w, g)
    calls["dw_patches"] = functools.partial(jax.jit(conv.kernel_grad), x, g)
    if use_torch:
      import torch  # pylint: disable=g-import-not-at-top
      xt, wt, gt, tdt = _torch_operands(x_np, w_np, g_np, dtype)
      bt = torch.zeros(cout, dtype=tdt)

      def torch_fb():
        with torch.no_grad():
          torch.nn.functional.conv2d(xt, wt, bt, padding=1)
          return torch.ops.aten.convolution_backward(
              gt, xt, wt, [cout], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
              [True, True, True])

      def torch_dw():
        with torch.no_grad():
          return torch.ops.aten.convolution_backward(
              gt, xt, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])
      calls["fb_torch"], calls["dw_torch"] = torch_fb, torch_dw
    rec = {"layer": name, "hw": hw, "cin": cin, "cout": cout, "batch": batch, "dtype": dtype,
           "auto_uses_patches": conv.use_patches(x.shape, "auto")}
    rec.update({f"{k}_ms": v for k, v in _interleaved_ms(calls, repeats).items()})
    print(json.dumps(rec), flush=True)
    out.append(rec)
  return out


def winograd_compare(size=512, batch=2, repeats=3, use_torch=True, layers=None,
                     variants=("4:256",)):
  """Evaluation forward per layer: XLA's conv, Winograd variants and torch, interleaved.

  Each is conv + bias + ReLU, as in the model. ``variants``: 'tile:tiles_per_band' strings
  for ``rma_jax.kernels.cpu.winograd.winograd_conv3x3``. Each record has the medians (ms), the best time,
  and the Winograd output's largest error relative to the largest output of XLA's (float32,
  both).
  """
  from rma_jax.kernels.cpu import conv, winograd  # pylint: disable=g-import-not-at-top
  out = []
  for name in _chosen(sorted(ALL_LAYERS), layers):
    _, cin, cout = ALL_LAYERS[name]
    hw, x_np, w_np, _ = _layer_operands(ALL_LAYERS[name], size, batch)
    x, w, b = jnp.asarray(x_np), jnp.asarray(w_np), jnp.zeros((cout,), jnp.float32)
    calls = {"xla": functools.partial(jax.jit(lambda x, w, b: jax.nn.relu(_conv(x, w) + b)),
                                      x, w, b)}
    for v in variants:
      tile, tpb = v.split(":")
      u = winograd.transform_kernel(w, int(tile))  # once, as evaluation does (its forms)
      calls[f"winograd_{v}"] = functools.partial(jax.jit(functools.partial(
          winograd.winograd_conv3x3, tile=int(tile), activation=jax.nn.relu,
          tiles_per_band=None if tpb == "default" else int(tpb))), x, w, b,
          transformed_kernel=u)
    # What the model runs in evaluation: impl='auto' (im2col, Winograd with its default
    # bands and prepared kernel, or XLA's conv).
    calls["auto"] = functools.partial(jax.jit(functools.partial(
        conv.conv3x3, impl="auto", activation=jax.nn.relu)), x, w, b,
        winograd_kernel=winograd.transform_kernel(w))
    if use_torch:
      import torch  # pylint: disable=g-import-not-at-top
      xt, wt, _, _ = _torch_operands(x_np, w_np, x_np[..., :0], "float32")
      bt = torch.zeros(cout)

      def torch_fwd():
        with torch.inference_mode():
          return torch.relu_(torch.nn.functional.conv2d(xt, wt, bt, padding=1))
      calls["torch"] = torch_fwd
    cpu = {}
    times = timing.interleaved_times(calls, repeats, cpu)
    ref = np.asarray(calls["xla"]())
    rec = {"layer": name, "hw": hw, "cin": cin, "cout": cout, "batch": batch,
           "gflop": 2.0 * batch * hw * hw * cin * cout * 9 / 1e9,
           "auto_uses_winograd": conv.use_winograd(x.shape, cout, x.dtype, "auto"),
           "auto_forward": ("winograd" if conv.use_winograd(x.shape, cout, x.dtype, "auto")
                            else "im2col" if conv.use_im2col(x.shape, cout, x.dtype, "auto")
                            else "xla"),
           "load_avg": os.getloadavg()[0]}
    for k, t in times.items():
      rec[f"{k}_ms"] = 1000 * statistics.median(t)
      rec[f"{k}_best_ms"] = 1000 * min(t)
      rec[f"{k}_cpu_ms"] = 1000 * statistics.median(cpu[k])
      if k.startswith("winograd") or k == "auto":
        rec[f"{k}_rel_err"] = float(np.abs(np.asarray(calls[k]()) - ref).max()
                                    / np.abs(ref).max())
    print(json.dumps(rec), flush=True)
    out.append(rec)
  return out


def train_step_compare(size=448, batch=2, repeats=3, use_torch=True, dtype="float32",
                       impls=("xla", "auto")):
  """The full RMA train step (rma_jax.steps) per model.conv_impl and PyTorch's,
  interleaved."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from benchmarks import bench, bench_torch  # pylint: disable=g-import-not-at-top
  from rma_jax import build, optimizer, steps  # pylint: disable=g-import-not-at-top

  settings = bench.settings_from_config(bench.load_config(), image_size=size + 64,
                                       crop_size=size, batch=batch, dtype=dtype,
                                       torch=use_torch)
  config = bench.bench_config(settings)
  loss_cfg = steps.LossConfig.from_config(config)
  mesh = bench.mesh_for_batch(batch)
  tx = optimizer.make_optimizer(config.optim, optimizer.learning_rate_schedule(
      config.optim.learning_rate, config.optim, 100, 1000))
  host_batch = bench.random_batch(np.random.default_rng(0), batch, size, settings.num_classes)
  data = jax.device_put(host_batch, NamedSharding(mesh, P("data")))
  calls, compile_s, states = {}, {}, {}
  for impl in impls:
    config.model.conv_impl = impl
    model = build.build_model(config, settings.num_classes)
    state = steps.create_train_state(model, tx, jax.random.key(0), (size, size, 3), mesh)
    t = time.perf_counter()
    compiled = steps.jit_train_step(loss_cfg, mesh).lower(state, data).compile()
    step = functools.partial(lambda c, s_, d: c(s_, d, loss_cfg.as_arrays()), compiled)
    compile_s[impl] = time.perf_counter() - t
    states[impl] = state

    def one(impl=impl, step=step):
      states[impl], metrics = step(states[impl], data)
      return metrics["loss"]
    calls[f"jax_{impl}"] = one
  if use_torch:
    runner = bench_torch.TorchRunner(settings, jax.device_get(states[impls[0]].params),
                                     len(os.sched_getaffinity(0)), config.data.pixel_convention)
    calls["torch"] = runner.train_step_fn(host_batch)
  ms = _interleaved_ms(calls, repeats)
  rec = {"case": "train_step", "input_size": size, "batch": batch, "dtype": dtype,
         "repeats": repeats, **{f"{k}_ms": v for k, v in ms.items()},
         **{f"compile_s_{k}": v for k, v in compile_s.items()}}
  if use_torch:
    rec.update({f"ratio_{k}": ms["torch"] / v for k, v in ms.items() if k != "torch"})
  return rec


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--layers", default="")
  p.add_argument("--torch", default="true", choices=["true", "false"])
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--dump_hlo", action="store_true")
  p.add_argument("--compare", action="store_true",
                 help="conv3x3 impl='xla' vs 'patches' vs torch, and kernel_grad methods")
  p.add_argument("--winograd", action="store_true",
                 help="evaluation forward per layer: XLA's conv vs Winograd vs torch")
  p.add_argument("--variants", default="4:256",
                 help="--winograd: comma-separated tile:tiles_per_band of winograd_conv3x3 "
                      "(tiles_per_band 'default': winograd.default_tiles_per_band)")
  p.add_argument("--train_step", action="store_true",
                 help="full RMA train step: conv_impl xla vs auto vs torch")
  a = p.parse_args()
  if a.torch == "true":
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))
  layers = [l for l in a.layers.split(",") if l]
  if a.train_step:
    rec = train_step_compare(a.size, a.batch, a.repeats, a.torch == "true", a.dtype)
    print(json.dumps(rec))
    print("\n| train step | batch | jax, XLA convs ms | jax, Conv3x3 auto ms | torch ms |"
          " torch/jax (XLA, auto) |\n|---|---|---|---|---|---|")
    t = rec.get("torch_ms")
    print(f"| {rec['input_size']}² {rec['dtype']} | {rec['batch']} | {rec['jax_xla_ms']:.0f} | "
          f"{rec['jax_auto_ms']:.0f} | {t:.0f} | {rec['ratio_jax_xla']:.2f}, "
          f"{rec['ratio_jax_auto']:.2f} |" if t else "")
    return
  if a.winograd:
    variants = a.variants.split(",")
    recs = winograd_compare(a.size, a.batch, a.repeats, a.torch == "true", layers, variants)
    cols = (["xla"] + [f"winograd_{v}" for v in variants] + ["auto"]
            + (["torch"] if a.torch == "true" else []))
    print(f"\n{a.size}² input, batch {a.batch}, float32, conv + bias + ReLU; medians of "
          f"{a.repeats} interleaved calls, wall ms (process CPU ms); speed-up = xla / auto "
          "(what the model runs), wall (CPU)\n")
    print("| layer | HxW | Cin→Cout | GFLOP | " + " | ".join(cols) +
          " | speed-up | vs torch | rel. err | auto | load |")
    print("|---|---|---|---|" + "---|" * len(cols) + "---|---|---|---|---|")
    for r in recs:
      best = "auto"
      vs_torch = (f"{r['torch_ms'] / r[best + '_ms']:.2f} "
                  f"({r['torch_cpu_ms'] / r[best + '_cpu_ms']:.2f})" if "torch_ms" in r else "–")
      print(f"| {r['layer']} | {r['hw']}² | {r['cin']}→{r['cout']} | {r['gflop']:.1f} | " +
            " | ".join(f"{r[c + '_ms']:.0f} ({r[c + '_cpu_ms']:.0f})" for c in cols) +
            f" | {r['xla_ms'] / r[best + '_ms']:.2f} ({r['xla_cpu_ms'] / r[best + '_cpu_ms']:.2f})"
            f" | {vs_torch} | {r[best + '_rel_err']:.1e} | {r['auto_forward']}"
            f" | {r['load_avg']:.1f} |")
    return
  if a.compare:
    recs = compare(a.size, a.batch, a.repeats, a.torch == "true", a.dtype, layers)
    print("\n| layer | HxW | Cin→Cout | fwd+bwd ms: xla / patches / torch | "
          "dw ms: xla / patches / torch | auto |")
    print("|---|---|---|---|---|---|")
    for r in recs:
      g = lambda k: f"{r[k]:.0f}" if k in r else "–"
      print(f"| {r['layer']} | {r['hw']}² | {r['cin']}→{r['cout']} | {g('fb_xla_ms')} / "
            f"{g('fb_patches_ms')} / {g('fb_torch_ms')} | {g('dw_xla_ms')} / "
            f"{g('dw_patches_ms')} / {g('dw_torch_ms')} | {'patches' if r['auto_uses_patches'] else 'xla'} |")
    return
  recs = profile(a.size, a.batch, a.repeats, a.torch == "true", a.dtype, layers, a.dump_hlo)
  for r in recs:
    print(json.dumps(r))
  print("\n| layer | HxW | XLA fwd / dx / dw ms | torch fwd / dx / dw ms | torch/XLA fwd, dx, dw |")
  print("|---|---|---|---|---|")
  for r in recs:
    t = (f"{r['torch_fwd_ms']:.1f} / {r['torch_dx_ms']:.1f} / {r['torch_dw_ms']:.1f}"
         if "torch_fwd_ms" in r else "–")
    q = (f"{r['ratio_fwd']:.2f}, {r['ratio_dx']:.2f}, {r['ratio_dw']:.2f}"
         if "ratio_fwd" in r else "–")
    print(f"| {r['layer']} | {r['hw']}² | {r['xla_fwd_ms']:.1f} / {r['xla_dx_ms']:.1f} / "
          f"{r['xla_dw_ms']:.1f} | {t} | {q} |")


if __name__ == "__main__":
  main()
