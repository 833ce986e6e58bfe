"""Small data sets of one's own, written by the tests in the real on-disk formats: coloured
shapes drawn with Pillow, annotated as VOC XML, COCO JSON or list files, and VOC 2007's
own tar layout (for TFDS's builder)."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = [(230, 60, 60), (60, 200, 80), (70, 110, 240), (240, 200, 40), (200, 80, 220),
           (40, 220, 220)]
# On top of configs/demo.py:tiny: one stage, single-view evaluation (one program fewer to
# compile), decoding in the calling thread, and the few held-out validation images that
# these small trees leave (fewer than one evaluation batch) accepted.
TINY = ["--config.stage1.num_epochs=0", "--config.eval.ten_view=False",
        "--config.data.num_workers=0", "--config.eval.allow_small_val=True"]


def main_cli(workdir, *flags, timeout=600):
  """``python -m rma_jax.main --config=configs/demo.py:tiny`` with TINY and ``flags``."""
  import subprocess  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, "-m", "rma_jax.main", "--config=configs/demo.py:tiny",
         f"--workdir={workdir}", *TINY, *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=(
      "--xla_force_host_platform_device_count=1 " + os.environ.get("RMA_TEST_XLA_FLAGS", "")))
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def random_objects(rng, classes, width, height, max_objects=3):
  """[(name, difficult, (xmin, ymin, xmax, ymax))] in VOC's 1-based inclusive pixels."""
  out = []
  for _ in range(int(rng.integers(1, max_objects + 1))):
    w, h = (int(v) for v in rng.integers(width // 4, width // 2, size=2))
    x0 = int(rng.integers(1, width - w + 1))
    y0 = int(rng.integers(1, height - h + 1))
    out.append((str(rng.choice(classes)), int(rng.random() < 0.2), (x0, y0, x0 + w - 1,
                                                                     y0 + h - 1)))
  return out


def draw(objects, classes, width, height, seed):
  """JPEG bytes of a dark noisy canvas with each object drawn as its class's shape."""
  rng = np.random.default_rng(seed)
  canvas = Image.fromarray(rng.integers(0, 40, (height, width, 3), dtype=np.uint8))
  pen = ImageDraw.Draw(canvas)
  for name, _, (x0, y0, x1, y1) in objects:
    k = list(classes).index(name) if name in classes else 0
    box = (x0 - 1, y0 - 1, x1 - 1, y1 - 1)  # VOC pixels are 1-based
    fill = COLOURS[k % len(COLOURS)]
    if k % 3 == 0:
      pen.ellipse(box, fill=fill)
    elif k % 3 == 1:
      pen.rectangle(box, fill=fill)
    else:
      pen.polygon([(box[0], box[3]), ((box[0] + box[2]) / 2, box[1]), (box[2], box[3])],
                  fill=fill)
  buf = io.BytesIO()
  canvas.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def voc_xml(objects, width, height, filename):
  """A VOC annotation with every tag TFDS's voc builder reads (size, pose, truncated...)."""
  parts = [f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>"
           f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
  for name, difficult, (x0, y0, x1, y1) in objects:
    parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                 f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                 f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
  return ("".join(parts) + "</annotation>").encode()


def voc_examples(classes, ids, *, width=48, height=40, seed=0, max_objects=3):
  """id -> (objects, JPEG bytes) for ``ids``."""
  rng = np.random.default_rng(seed)
  out = {}
  for i, id_ in enumerate(ids):
    objects = random_objects(rng, classes, width, height, max_objects)
    out[id_] = (objects, draw(objects, classes, width, height, seed * 1000 + i))
  return out


def voc_files(examples, split_ids, *, width=48, height=40, class_files=(), prefix=""):
  """{relative path: bytes} of a VOC2007 folder: JPEGImages, Annotations, ImageSets/Main
  (``split_ids``: split -> ids) and, for ``class_files``, the per-class lists."""
  out = {}
  for id_, (objects, jpeg) in examples.items():
    out[f"{prefix}JPEGImages/{id_}.jpg"] = jpeg
    out[f"{prefix}Annotations/{id_}.xml"] = voc_xml(objects, width, height, f"{id_}.jpg")
  for split, ids in split_ids.items():
    out[f"{prefix}ImageSets/Main/{split}.txt"] = "".join(f"{i}\n" for i in ids).encode()
    for c in class_files:
      out[f"{prefix}ImageSets/Main/{c}_{split}.txt"] = "".join(
          f"{i} {1 if any(o[0] == c for o in examples[i][0]) else -1}\n" for i in ids).encode()
  return out


def write_files(root, files):
  for rel, data in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)


def write_tar(path, files):
  with tarfile.open(path, "w") as tar:
    for rel, data in sorted(files.items()):
      info = tarfile.TarInfo(rel)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def coco_json(images, categories):
  """A COCO instances JSON: ``images`` [(file_name, w, h, [(category_id, [x, y, w, h])])],
  image ids from 1 (as every JSON of a COCO export numbers them)."""
  data = {"images": [], "annotations": [], "categories": categories}
  for image_id, (file_name, w, h, anns) in enumerate(images, 1):
    data["images"].append({"id": image_id, "file_name": file_name, "width": w, "height": h})
    for cat, bbox in anns:
      data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": image_id,
                                  "category_id": cat, "bbox": list(bbox), "iscrowd": 0,
                                  "area": float(bbox[2] * bbox[3])})
  return json.dumps(data)
