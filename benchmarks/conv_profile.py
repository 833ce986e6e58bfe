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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

LAYERS = {  # name: (spatial size at a 224 input, in channels, out channels)
    "conv1_2": (224, 64, 64), "conv2_2": (112, 128, 128), "conv3_2": (56, 256, 256),
    "conv4_2": (28, 512, 512), "conv5_2": (14, 512, 512)}


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _median_ms(fn, repeats):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return 1000 * statistics.median(times)


def profile(size=224, batch=2, repeats=5, use_torch=True, dtype="float32", layers=None,
            dump_hlo=False):
  scale = size / 224
  out = []
  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  for name, (hw, cin, cout) in LAYERS.items():
    if layers and name not in layers:
      continue
    hw = int(round(hw * scale))
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(batch, hw, hw, cin)).astype(np.float32)
    w_np = (rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    g_np = rng.normal(size=(batch, hw, hw, cout)).astype(np.float32)
    x, w, g = (jnp.asarray(a, dt) for a in (x_np, w_np, g_np))
    fwd = jax.jit(_conv)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: _conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: _conv(x, w), w)[1](g)[0])
    flops = 2.0 * batch * hw * hw * cin * cout * 9
    rec = {"layer": name, "hw": hw, "cin": cin, "cout": cout, "batch": batch, "dtype": dtype,
           "gflop_per_pass": flops / 1e9,
           "xla_fwd_ms": _median_ms(lambda: fwd(x, w), repeats),
           "xla_dx_ms": _median_ms(lambda: dx(x, w, g), repeats),
           "xla_dw_ms": _median_ms(lambda: dw(x, w, g), repeats),
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if dump_hlo:
      for tag, f, args in (("fwd", fwd, (x, w)), ("dx", dx, (x, w, g)), ("dw", dw, (x, w, g))):
        text = f.lower(*args).compile().as_text()
        print(f"---- {name} {tag}\n" + "\n".join(
            l for l in text.splitlines() if "convolution" in l or "custom-call" in l or
            "transpose" in l or "reverse" in l or "fusion" in l.split("=")[0]), file=sys.stderr)
    if use_torch:
      import torch  # pylint: disable=g-import-not-at-top
      tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
      cl = torch.channels_last
      xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(memory_format=cl).to(tdt)
      wt = torch.from_numpy(w_np).permute(3, 2, 0, 1).contiguous(memory_format=cl).to(tdt)
      gt = torch.from_numpy(g_np).permute(0, 3, 1, 2).contiguous(memory_format=cl).to(tdt)
      with torch.no_grad():
        def bwd(mask):
          return torch.ops.aten.convolution_backward(
              gt, xt, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
        rec["torch_fwd_ms"] = _median_ms(
            lambda: torch.nn.functional.conv2d(xt, wt, padding=1), repeats)
        rec["torch_dx_ms"] = _median_ms(lambda: bwd([True, False, False]), repeats)
        rec["torch_dw_ms"] = _median_ms(lambda: bwd([False, True, False]), repeats)
      for p in ("fwd", "dx", "dw"):
        rec[f"ratio_{p}"] = rec[f"torch_{p}_ms"] / rec[f"xla_{p}_ms"]  # > 1: XLA faster
    out.append(rec)
  return out


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
  a = p.parse_args()
  if a.torch == "true":
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))
  recs = profile(a.size, a.batch, a.repeats, a.torch == "true", a.dtype,
                 [l for l in a.layers.split(",") if l], a.dump_hlo)
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
