r"""Sampler micro-benchmark: the separable sampler vs a gather-based bilinear sampler.

    python benchmarks/sampler.py                  # N = 512 and 640, K = 5, S = 7, batch 16
    python benchmarks/sampler.py --sizes=512 --repeats=10 --torch=false

At the paper's shapes: conv5_3 of a 448 crop (N = 512) is 28 x 28 x 512, of a 576 crop
(N = 640) 36 x 36 x 512; K = 5 regions of S x S = 7 x 7 per image, batch 16. For each, the
forward pass and the backward pass (gradients in the features and in theta) of

* ``separable``: ``rma_jax.ops.sample_regions``, two small batched matmuls;
* ``gather``: the textbook bilinear sampler (4 gathered neighbours per output, zero outside),
  written here in JAX;
* with PyTorch importable, ``torch_grid_sample`` (``F.grid_sample``) and ``torch_separable``
  (the same two matmuls in torch) with the same threads.

Prints one JSON line per (size, sampler, pass), the max difference of each sampler's output to
the separable one (they must agree), and a Markdown table of median milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # rma_jax from here
from benchmarks import timing  # noqa: E402  pylint: disable=g-import-not-at-top
from rma_jax import ops  # noqa: E402  pylint: disable=g-import-not-at-top


def gather_sample(features: jax.Array, theta: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C), (B, R, 4) -> (B, R, S, S, C): bilinear sampling by gathers, zero outside."""
  _, h, w, _ = features.shape
  u = (2.0 * jnp.arange(size, dtype=jnp.float32) + 1.0) / size - 1.0
  sx, sy, tx, ty = (theta[..., i, None] for i in range(4))
  px = ((sx * u + tx + 1.0) * w - 1.0) / 2.0  # (B, R, S) pixel coordinates
  py = ((sy * u + ty + 1.0) * h - 1.0) / 2.0
  x0, y0 = jnp.floor(px), jnp.floor(py)

  def one_image(fmap, px, py, x0, y0):
    out = 0.0
    for dy in (0, 1):
      for dx in (0, 1):
        xi, yi = x0 + dx, y0 + dy
        wx = 1.0 - jnp.abs(px - xi)  # (R, S)
        wy = 1.0 - jnp.abs(py - yi)
        vx = (xi >= 0) & (xi <= w - 1)
        vy = (yi >= 0) & (yi <= h - 1)
        xc = jnp.clip(xi, 0, w - 1).astype(jnp.int32)
        yc = jnp.clip(yi, 0, h - 1).astype(jnp.int32)
        vals = fmap[yc[:, :, None], xc[:, None, :]]  # (R, S, S, C) gather
        weight = (wy * vy)[:, :, None] * (wx * vx)[:, None, :]
        out = out + weight[..., None] * vals
    return out

  return jax.vmap(one_image)(features, px, py, x0, y0).astype(features.dtype)


def _inputs(batch, n_map, channels, regions, seed=0):
  rng = np.random.default_rng(seed)
  fmap = rng.normal(size=(batch, n_map, n_map, channels)).astype(np.float32)
  theta = np.stack([rng.uniform(0.2, 0.7, (batch, regions)), rng.uniform(0.2, 0.7, (batch, regions)),
                    rng.uniform(-0.6, 0.6, (batch, regions)), rng.uniform(-0.6, 0.6, (batch, regions))],
                   -1).astype(np.float32)
  return fmap, theta


def run(sizes=(512, 640), batch=16, regions=5, sample=7, channels=512, repeats=5,
        use_torch=True, threads=0, dtype="float32") -> list[dict]:
  """All measurements as records (dicts)."""
  records = []
  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  samplers = {"separable": lambda f, t: ops.sample_regions(f, t, sample),
              "gather": lambda f, t: gather_sample(f, t, sample)}
  for n in sizes:
    n_map = (n - 64) // 16
    fmap_np, theta_np = _inputs(batch, n_map, channels, regions)
    fmap, theta = jnp.asarray(fmap_np, dt), jnp.asarray(theta_np)
    cot = jnp.asarray(np.random.default_rng(1).normal(
        size=(batch, regions, sample, sample, channels)), dt)
    ref = None
    for name, fn in samplers.items():
      fwd = jax.jit(fn)
      bwd = jax.jit(jax.grad(lambda f, t, fn=fn: jnp.sum((fn(f, t) * cot).astype(jnp.float32)),
                             argnums=(0, 1)))
      out = np.asarray(fwd(fmap, theta), np.float32)
      ref = out if ref is None else ref
      for pass_name, call in (("forward", lambda: fwd(fmap, theta)),
                              ("backward", lambda: bwd(fmap, theta))):
        t = timing.time_calls(call, warmup=2, repeats=repeats)
        records.append(dict(N=n, map=n_map, sampler=name, framework="jax", pass_=pass_name,
                            ms=1000 * statistics.median(t), ms_all=[1000 * x for x in t],
                            max_abs_diff_to_separable=float(np.max(np.abs(out - ref))),
                            batch=batch, K=regions, S=sample, C=channels, dtype=dtype,
                            backend=jax.default_backend()))
    if use_torch:
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError:
        continue
      from benchmarks import torch_rma  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
      tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
      f_t = torch.from_numpy(fmap_np).permute(0, 3, 1, 2).contiguous().to(tdt)
      th_t = torch.from_numpy(theta_np)
      cot_t = torch.from_numpy(np.asarray(cot, np.float32)).permute(0, 1, 4, 2, 3).to(tdt)
      for name, fn in (("torch_grid_sample", torch_rma.sample_grid),
                       ("torch_separable", torch_rma.sample_separable)):
        with torch.no_grad():
          out = fn(f_t, th_t, sample).permute(0, 1, 3, 4, 2).float().numpy()

        def fwd_t(fn=fn):
          with torch.no_grad():
            return fn(f_t, th_t, sample)

        def bwd_t(fn=fn):
          f = f_t.detach().requires_grad_(True)
          t = th_t.detach().requires_grad_(True)
          (fn(f, t, sample) * cot_t).float().sum().backward()
          return f.grad, t.grad
        for pass_name, call in (("forward", fwd_t), ("backward", bwd_t)):
          t = timing.time_calls(call, warmup=2, repeats=repeats)
          records.append(dict(N=n, map=n_map, sampler=name, framework="torch", pass_=pass_name,
                              ms=1000 * statistics.median(t), ms_all=[1000 * x for x in t],
                              max_abs_diff_to_separable=float(np.max(np.abs(out - ref))),
                              batch=batch, K=regions, S=sample, C=channels, dtype=dtype,
                              backend="cpu"))
  return records


def table(records: list[dict]) -> str:
  lines = ["| N (map) | sampler | forward ms | backward ms | max |diff| to separable |",
           "|---|---|---|---|---|"]
  seen = {}
  for r in records:
    seen.setdefault((r["N"], r["map"], r["sampler"]), {})[r["pass_"]] = r
  for (n, m, name), d in seen.items():
    lines.append(f"| {n} ({m}x{m}) | {name} | {d['forward']['ms']:.3g} | "
                 f"{d['backward']['ms']:.3g} | {d['forward']['max_abs_diff_to_separable']:.1e} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="512,640")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--regions", type=int, default=5)
  p.add_argument("--sample", type=int, default=7)
  p.add_argument("--channels", type=int, default=512)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--torch", default="true", choices=["true", "false"])
  p.add_argument("--threads", type=int, default=0)
  a = p.parse_args()
  records = run(tuple(int(s) for s in a.sizes.split(",")), a.batch, a.regions, a.sample,
                a.channels, a.repeats, a.torch == "true", a.threads, a.dtype)
  for r in records:
    print(json.dumps(r))
  print("\npython benchmarks/sampler.py " + " ".join(sys.argv[1:]) + "\n")
  print(table(records))


if __name__ == "__main__":
  main()
