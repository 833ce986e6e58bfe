"""Labels photos with an exported rma_jax model in ONNX Runtime: onnxruntime, numpy and
Pillow only, no JAX.

    python -m rma_jax.main --config=configs/demo.py --workdir=/tmp/rma_demo --mode=export \\
        --formats=stablehlo,onnx          # needs: pip install -e ".[export]"
    python examples/serve_onnx.py /tmp/rma_demo/export photo.jpg [more.jpg ...]

Prints one line per photo, ``photo.jpg: label p, label p, label p``, as
examples/serve_stablehlo.py does. docs/export.md says what the model holds.
"""

import json
import pathlib
import sys

import numpy as np
import onnxruntime
from PIL import Image


def main(argv):
  export_dir, *photos = argv
  folder = pathlib.Path(export_dir)
  meta = json.loads((folder / "export.json").read_text())
  session = onnxruntime.InferenceSession(str(folder / "single_view.onnx"),
                                         providers=["CPUExecutionProvider"])
  size = meta["inputs"]["single_view"]["shape"][1]
  images = np.stack([
      np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR,
                                                     reducing_gap=3.0)) for p in photos])
  names = [o.name for o in session.get_outputs()]
  out = dict(zip(names, session.run(None, {"images": images})))
  classes, k = meta["class_names"], meta["top_k"] or 3
  for photo, probs in zip(photos, out["probabilities"]):
    top = np.argsort(-probs, kind="stable")[:k]
    print(f"{photo}: " + ", ".join(f"{classes[c]} {probs[c]:.3f}" for c in top))


if __name__ == "__main__":
  main(sys.argv[1:])
