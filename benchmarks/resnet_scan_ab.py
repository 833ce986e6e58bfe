"""What ``nn.scan`` over a ResNet's blocks costs XLA:CPU's gradient, jax vs jax.

    python -m benchmarks.resnet_scan_ab --json_out=docs/benchmarks/2026-12-07-resnet/scan_ab.json

The ResNet-101 trunk (``models.ResNet``, frozen batch norm, as ``configs/voc_resnet101.py``)
on ``--size``² images, batch ``--batch``: the forward pass and the gradient of
``sum(layer4 ** 2)`` with respect to the parameters, two ways in one process, the same
parameters: ``scan`` (each layer's blocks after the first in one ``nn.scan``, its loop
rolled: ``scan_unroll=False``), ``scan_unroll`` (the same scan compiled written out, how the
model trains by default) and ``unrolled`` (``ResNet(unroll=True)``: the blocks one after the
other). Compile
time of each, then ``--rounds`` round-robin calls (wall seconds, medians), and the largest
difference of the two gradients.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from typing import Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_records, timing
from rma_jax import models

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 3, "round-robin calls of each variant")
flags.DEFINE_integer("size", 224, "image side")
flags.DEFINE_integer("batch", 1, "images per call")
flags.DEFINE_string("json_out", None, "write the results here")


def scan_part(size: int, batch: int, rounds: int) -> list[dict]:
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)),
                  jnp.float32)
  scanned = models.ResNet(depth=101, scan_unroll=False)
  params = jax.jit(scanned.init)(jax.random.key(0), x)["params"]
  out = []
  for case in ("forward", "gradient"):
    fns, compile_s, results = {}, {}, {}
    for name, trunk in (("scan", scanned), ("scan_unroll", scanned.clone(scan_unroll=True)),
                        ("unrolled", scanned.clone(unroll=True))):
      def loss(p, x, trunk=trunk):
        return jnp.sum(trunk.apply({"params": p}, x) ** 2)
      fn = jax.grad(loss) if case == "gradient" else loss
      start = time.perf_counter()
      fns[name] = jax.jit(fn).lower(params, x).compile()
      compile_s[name] = time.perf_counter() - start
      results[name] = jax.block_until_ready(fns[name](params, x))  # also the warm-up
    wall = timing.interleaved_times(
        {n: functools.partial(f, params, x) for n, f in fns.items()}, rounds, warmup=False)
    # Per array, max|Δ| / max|unrolled|; frozen batch norm's gradients are 0 on both sides.
    def diff(name):
      return max(float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
                 for a, b in zip(jax.tree.leaves(results[name]),
                                 jax.tree.leaves(results["unrolled"])))
    rec = {"case": case, "input_size": size, "batch": batch, "rounds": rounds,
           "max_rel_diff": diff("scan"), "scan_unroll_max_rel_diff": diff("scan_unroll")}
    for name in fns:
      rec[f"{name}_s"] = statistics.median(wall[name])
      rec[f"{name}_s_all"] = wall[name]
      rec[f"{name}_compile_s"] = compile_s[name]
    rec["unrolled_speedup"] = rec["scan_s"] / rec["unrolled_s"]
    rec["scan_unroll_speedup"] = rec["scan_s"] / rec["scan_unroll_s"]
    print(json.dumps({k: v for k, v in rec.items() if not k.endswith("_all")}), flush=True)
    out.append(rec)
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  cpu_model, cpu_extensions = timing.cpu_description()
  bench_records.write_ab_result(
      {"cpu": lambda: {"model": cpu_model, "extensions": cpu_extensions},
       "trunk": lambda: scan_part(FLAGS.size, FLAGS.batch, FLAGS.rounds)}, FLAGS.json_out)


if __name__ == "__main__":
  app.run(main)
