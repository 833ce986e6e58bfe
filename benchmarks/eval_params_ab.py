"""What the evaluation-only parameter forms (``rma_jax.kernels.cpu.forms``) change, jax against jax.

    python -m benchmarks.eval_params_ab --json_out=docs/benchmarks/eval_params_ab.json

Two parts, both medians of ``--repeats`` calls after one warm-up, printed and written as
JSON:

* ``dense``: fc6's product (M rows of 25088 by its 4096 outputs) with the kernel in the
  stored (in, out) layout and in the (out, in) one ``kernels.prepare_fn`` prepares, the two
  interleaved call by call, for the M of single view (2 images) and ten-view (20 views);
* ``model``: the full-size RMA model's single view (448², batch 2) and ten-view (512²,
  batch 2) with and without the prepared forms, each timed in blocks of consecutive calls
  (as an evaluation pass makes them), the blocks alternating ``--rounds`` times; and the
  largest difference of their scores.
"""

from __future__ import annotations

import statistics
from typing import Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench, bench_records, timing
from rma_jax import build, kernels

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 5, "timed calls per measurement")
flags.DEFINE_integer("rounds", 2, "alternating blocks per model variant")
flags.DEFINE_string("json_out", None, "write the results here")


def dense_part(repeats: int, rows: Sequence[int] = (2, 20)) -> list[dict]:
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.standard_normal((25088, 4096), np.float32))
  kernel_t = jnp.asarray(np.ascontiguousarray(np.asarray(kernel).T))
  stored = jax.jit(lambda a, k: a @ k)
  transposed = jax.jit(lambda a, kt: jax.lax.dot_general(a, kt, (((1,), (1,)), ((), ()))))
  out = []
  for m in rows:
    a = jnp.asarray(rng.standard_normal((m, 25088), np.float32))
    t = timing.interleaved_times({"in_out": lambda: stored(a, kernel),
                                  "out_in": lambda: transposed(a, kernel_t)}, repeats)
    out.append({"rows": m, **{f"{k}_ms": 1000 * statistics.median(v) for k, v in t.items()}})
  return out


def model_part(repeats: int, rounds: int) -> list[dict]:
  settings = bench.settings_from_config(bench.load_config(), image_size=512, crop_size=448,
                                        batch=2)
  config = bench.bench_config(settings)
  model = build.build_model(config, settings.num_classes)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 448, 448, 3)))["params"]
  plain = {"params": params}
  prepared = kernels.prepare_fn(config.model.conv_impl)(plain)
  rng = np.random.default_rng(0)
  cases = {
      "single_view": (jax.jit(lambda v, x: model.apply(v, x)["scores"]), 448),
      "ten_view": (jax.jit(bench.ten_view_fn(model, 448)), 512)}
  out = []
  for case, (fn, size) in cases.items():
    images = jnp.asarray(rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8))
    diff = float(jnp.max(jnp.abs(fn(plain, images) - fn(prepared, images))))
    times = {"plain": [], "prepared": []}
    for _ in range(rounds):
      for name, variables in (("plain", plain), ("prepared", prepared)):
        times[name] += timing.time_calls(lambda: fn(variables, images), warmup=1,
                                         repeats=repeats)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    out.append({"case": case, "plain_ms": med["plain"], "prepared_ms": med["prepared"],
                "speedup": med["plain"] / med["prepared"], "max_abs_score_diff": diff,
                "plain_ms_all": [1000 * t for t in times["plain"]],
                "prepared_ms_all": [1000 * t for t in times["prepared"]]})
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  bench_records.write_ab_result({"dense": lambda: dense_part(FLAGS.repeats),
                                 "model": lambda: model_part(FLAGS.repeats, FLAGS.rounds)},
                                FLAGS.json_out)


if __name__ == "__main__":
  app.run(main)
