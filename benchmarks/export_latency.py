r"""Single-image latency of the exported artifacts (docs/export.md), side by side in one process.

    python -m benchmarks.export_latency --config=configs/voc.py --repeats=10 \
        --json_out=docs/benchmarks/export/voc.json

The model of ``--config`` with initialised parameters (latency does not depend on their
values) is exported by ``rma_jax.export.export_run`` to a temporary folder; then one image
(batch 1) is scored, round-robin so that the machine's load hits every row alike, by:
``rma_jax`` (``TrainedRun.outputs``: the library, with the CPU kernels), the deserialised
StableHLO artifact (``jax.export``), and the ONNX model in ONNX Runtime (where the
``.[export]`` extra is installed), for the single view and the ten views. Prints and writes
one JSON record with the medians, the CPU model and its vector extensions, and the load.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from benchmarks import timing
from rma_jax import build, configs, export, trained

FLAGS = flags.FLAGS
ROWS = ("rma_jax", "stablehlo", "onnxruntime")


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/voc.py).")
  flags.DEFINE_integer("num_classes", 20, "Classes of the model.")
  flags.DEFINE_integer("repeats", 10, "Timed calls of each artifact.")
  flags.DEFINE_string("json_out", "", "Also write the record here.")


def table(records: list[dict]) -> str:
  """The Markdown table of docs/export.md: a row per (record, what ran), a column per view."""
  lines = ["| config | input (single / ten-view) | runs | single view ms | ten-view ms |",
           "|---|---|---|---|---|"]
  for r in records:
    sizes = f"{r['input_sizes']['single_view']}² / {r['input_sizes']['ten_view']}²"
    for row in ROWS:
      if f"single_view/{row}" in r["median_ms"]:
        lines.append(f"| `{r['config']}` | {sizes} | {row} | "
                     f"{r['median_ms'][f'single_view/{row}']} | "
                     f"{r['median_ms'][f'ten_view/{row}']} |")
  return "\n".join(lines)


def main(argv):
  del argv
  config = FLAGS.config
  model = build.build_model(config, FLAGS.num_classes)
  size = config.data.crop_size
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8))
  run = trained.TrainedRun(config, model, params["params"],
                           tuple(f"class{i}" for i in range(FLAGS.num_classes)))
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
    formats = ("stablehlo", "onnx")
  except ImportError:
    onnxruntime, formats = None, ("stablehlo",)
  load_start = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as out:
    manifest = export.export_run(run, out, formats=formats)
    calls, sizes = {}, {}
    rng = np.random.default_rng(0)
    for view in export.VIEWS:
      ten = view == "ten_view"
      image = rng.integers(0, 256, (1, *manifest["inputs"][view]["shape"][1:]), np.uint8)
      exp, leaves = _stablehlo(out, view, manifest)
      calls[f"{view}/rma_jax"] = lambda image=image, ten=ten: run.outputs(image, ten)
      calls[f"{view}/stablehlo"] = lambda exp=exp, leaves=leaves, image=image: exp.call(
          leaves, image)
      if onnxruntime is not None:
        session = onnxruntime.InferenceSession(os.path.join(out, f"{view}.onnx"),
                                               providers=["CPUExecutionProvider"])
        calls[f"{view}/onnxruntime"] = lambda s=session, image=image: s.run(
            None, {"images": image})
    sizes = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    times = timing.interleaved_times(calls, FLAGS.repeats)
  cpu, extensions = timing.cpu_description()
  record = {
      "config": next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
      "input_sizes": {v: manifest["inputs"][v]["shape"][1]
                                              for v in export.VIEWS},
      "batch": 1, "repeats": FLAGS.repeats, "cpu": cpu, "vector_extensions": extensions,
      "cores": os.cpu_count(), "jax": jax.__version__,
      "onnxruntime": getattr(onnxruntime, "__version__", None),
      "median_ms": {k: round(1000 * statistics.median(v), 1) for k, v in times.items()},
      "file_bytes": sizes,
      "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
  }
  text = json.dumps(record, indent=1)
  print(text)
  if FLAGS.json_out:
    os.makedirs(os.path.dirname(FLAGS.json_out) or ".", exist_ok=True)
    with open(FLAGS.json_out, "w") as f:
      f.write(text + "\n")


def _stablehlo(out: str, view: str, manifest: dict) -> tuple[jax.export.Exported, list]:
  """An artifact as a server loads it (examples/serve_stablehlo.py)."""
  with open(os.path.join(out, f"{view}.stablehlo"), "rb") as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  with np.load(os.path.join(out, export.PARAMS_FILE)) as arrays:
    leaves = [arrays[n] for n in manifest["stablehlo"]["parameter_order"]]
  return exp, leaves


if __name__ == "__main__":
  _define_flags()
  app.run(main, argv=configs.resolve_config_path(sys.argv))
