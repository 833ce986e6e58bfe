"""What the CPU trunk's band, pooling and conv1_1 changes do to the full model, jax vs jax.

    python -m benchmarks.trunk_ab --json_out=docs/benchmarks/trunk_ab.json

The full-size RMA model's ten-view (512², batch 2) and single view (448², batch 2), its
evaluation-only forms prepared (``rma_jax.kernels.cpu.forms``), compiled three ways in one process
and called round-robin ``--rounds`` times (wall and process CPU ms per call, medians):

* ``before``: the evaluation trunk as it was: Winograd in bands of 256 tiles, VGG's 2x2 max
  pools after the convolutions, conv1_1 on XLA's convolution;
* ``bands_im2col``: bands of ``winograd.default_tiles_per_band`` tiles and conv1_1 by
  ``conv.im2col_conv3x3`` (``conv.use_im2col``), the pools still after;
* ``pools_in_bands``: also the pools inside the Winograd bands, conv1_1's map still
  stored whole;
* ``now``: the code as it is (conv1_1 also computed inside conv1_2's Winograd bands,
  ``conv.conv3x3_pair``).

The first three are rebuilt by swapping those functions while tracing (and clearing JAX's
trace caches between compilations, else the custom VJP's cached primal is reused); all
four compute the same scores to float32 rounding (their largest difference is recorded).
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
from typing import Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench, bench_records, timing
from rma_jax import build, kernels
from rma_jax.kernels.cpu import conv, winograd

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 5, "round-robin calls of each variant")
flags.DEFINE_string("json_out", None, "write the results here")


@contextlib.contextmanager
def _variant(name: str):
  """Swaps in the trunk of variant ``name`` while tracing."""
  saved = (winograd.default_tiles_per_band, conv.use_im2col, winograd.winograd_conv3x3,
           conv.use_fused_pair)
  conv_fn = saved[2]

  def pool_after(*args, pool=False, **kwargs):  # VGG's nn.max_pool after the conv, as before
    y = conv_fn(*args, **kwargs)
    return winograd.max_pool_2x2(y) if pool else y
  if name in ("before", "bands_im2col"):
    winograd.winograd_conv3x3 = pool_after
  if name == "before":
    winograd.default_tiles_per_band = lambda out_channels: 256
    conv.use_im2col = lambda *args: False
  if name != "now":
    conv.use_fused_pair = lambda *args: False
  try:
    yield
  finally:
    (winograd.default_tiles_per_band, conv.use_im2col, winograd.winograd_conv3x3,
     conv.use_fused_pair) = saved


def model_part(rounds: int) -> list[dict]:
  settings = bench.settings_from_config(bench.load_config(), image_size=512, crop_size=448,
                                        batch=2)
  config = bench.bench_config(settings)
  model = build.build_model(config, settings.num_classes)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 448, 448, 3)))["params"]
  variables = kernels.prepare_fn(config.model.conv_impl)({"params": params})
  rng = np.random.default_rng(0)
  cases = {
      "ten_view": (bench.ten_view_fn(model, 448), 512),
      "single_view": (lambda v, x: model.apply(v, x)["scores"], 448)}
  out = []
  for case, (fn, size) in cases.items():
    images = jnp.asarray(rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8))
    compiled = {}
    for name in ("before", "bands_im2col", "pools_in_bands", "now"):
      jax.clear_caches()
      with _variant(name):
        compiled[name] = jax.jit(lambda v, x: fn(v, x)).lower(variables, images).compile()
    # Also the warm-up; finished before the timing (else the first timed call waits for
    # the other variants' dispatched calls).
    scores = jax.block_until_ready({n: f(variables, images) for n, f in compiled.items()})
    cpu = {}
    wall = timing.interleaved_times(
        {n: functools.partial(f, variables, images) for n, f in compiled.items()}, rounds,
        cpu, warmup=False)
    rec = {"case": case, "input_size": size, "batch": 2, "rounds": rounds,
           "max_abs_score_diff": max(float(jnp.max(jnp.abs(s - scores["now"])))
                                     for s in scores.values())}
    for name in compiled:
      rec[f"{name}_ms"] = 1000 * statistics.median(wall[name])
      rec[f"{name}_cpu_ms"] = 1000 * statistics.median(cpu[name])
      rec[f"{name}_ms_all"] = [1000 * t for t in wall[name]]
    rec["speedup"] = rec["before_ms"] / rec["now_ms"]
    rec["speedup_fused_pair"] = rec["pools_in_bands_ms"] / rec["now_ms"]
    print(json.dumps({k: v for k, v in rec.items() if not k.endswith("_all")}), flush=True)
    out.append(rec)
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  bench_records.write_ab_result({"model": lambda: model_part(FLAGS.rounds)}, FLAGS.json_out)


if __name__ == "__main__":
  app.run(main)
