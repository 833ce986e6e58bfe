"""Labels photos with an exported rma_jax model: jax, numpy and Pillow only, no rma_jax.

    python -m rma_jax.main --config=configs/demo.py --workdir=/tmp/rma_demo --mode=export
    python examples/serve_stablehlo.py /tmp/rma_demo/export photo.jpg [more.jpg ...]

Prints one line per photo, ``photo.jpg: label p, label p, label p`` (the report's top-k and
score transform), and with --boxes the K attentional regions in pixels of the photo.
docs/export.md says what the artifact holds.
"""

import json
import pathlib
import sys

import jax
import numpy as np
from PIL import Image


def load(export_dir):
  """(the single-view function, its parameters, export.json) of an export folder."""
  folder = pathlib.Path(export_dir)
  meta = json.loads((folder / "export.json").read_text())
  exported = jax.export.deserialize(bytearray((folder / "single_view.stablehlo").read_bytes()))
  with np.load(folder / meta["stablehlo"]["parameters"]) as arrays:
    params = [arrays[name] for name in meta["stablehlo"]["parameter_order"]]
  return exported, params, meta


def read(path, size):
  """A photo as the model takes it: RGB uint8, resized to size x size as export.json says."""
  image = Image.open(path).convert("RGB")
  return np.asarray(image.resize((size, size), Image.BILINEAR, reducing_gap=3.0)), image.size


def main(argv):
  show_boxes = "--boxes" in argv
  export_dir, *photos = [a for a in argv if a != "--boxes"]
  exported, params, meta = load(export_dir)
  size = meta["inputs"]["single_view"]["shape"][1]
  pixels, sizes = zip(*(read(p, size) for p in photos))
  out = exported.call(params, np.stack(pixels))  # one batch; its size is free
  names, k = meta["class_names"], meta["top_k"] or 3
  for i, photo in enumerate(photos):
    probs = np.asarray(out["probabilities"][i])
    top = np.argsort(-probs, kind="stable")[:k]
    print(f"{photo}: " + ", ".join(f"{names[c]} {probs[c]:.3f}" for c in top))
    if show_boxes and "boxes" in out:
      w, h = sizes[i]
      for step, box in enumerate(np.asarray(out["boxes"][i]) * [w, h, w, h], 1):
        print(f"  region {step}: " + " ".join(f"{v:.1f}" for v in box))


if __name__ == "__main__":
  main(sys.argv[1:])
