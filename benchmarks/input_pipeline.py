r"""Throughput of the training input pipeline on VOC-sized JPEGs (no data set needed).

Writes a temporary VOCdevkit/VOC2007 tree of synthetic ~500x375 JPEGs (smooth colour fields
plus texture, so they compress and decode like photographs), opens it with the same
``get_sources`` path as a real run, and times ``train_batches`` at N = 512, crop 448: decode,
resize, crop, flip and batching in the thread pool. Prints images/s for each run and the
median.

  python -m benchmarks.input_pipeline                       # defaults: N=512, batch 16
  python -m benchmarks.input_pipeline --num_workers=4 --image_size=640 --crop_size=576
"""

import os
import statistics
import tempfile
import time

from absl import app, flags
import ml_collections
import numpy as np
from PIL import Image

from rma_jax.data import get_sources, train_batches

_NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "JPEGs in the synthetic tree.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 24, "Timed batches per run.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs; the median is reported.")
_N = flags.DEFINE_integer("image_size", 512, "N: resize side.")
_CROP = flags.DEFINE_integer("crop_size", 448, "Training crop side (N - 64).")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "Decoding threads (0: one per CPU core).")


def _photo_like(rng: np.random.Generator, w: int = 500, h: int = 375) -> Image.Image:
  low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float32)
  img += rng.normal(0, 12, (h, w, 3))  # texture: JPEG sizes ~ real VOC photos
  return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_voc_tree(root: str, num_images: int, seed: int = 0) -> float:
  """Writes VOC2007/{JPEGImages,Annotations,ImageSets/Main}; returns the mean JPEG size (KB)."""
  rng = np.random.default_rng(seed)
  voc = os.path.join(root, "VOC2007")
  for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
    os.makedirs(os.path.join(voc, sub), exist_ok=True)
  ids, sizes = [], []
  for i in range(num_images):
    id_ = f"{i:06d}"
    w, h = (500, 375) if i % 3 else (375, 500)
    path = os.path.join(voc, "JPEGImages", f"{id_}.jpg")
    _photo_like(rng, w, h).save(path, quality=90)
    sizes.append(os.path.getsize(path))
    with open(os.path.join(voc, "Annotations", f"{id_}.xml"), "w") as f:
      f.write(f"<annotation><size><width>{w}</width><height>{h}</height></size><object>"
              f"<name>dog</name><difficult>0</difficult><bndbox><xmin>10</xmin><ymin>10</ymin>"
              f"<xmax>100</xmax><ymax>100</ymax></bndbox></object></annotation>")
    ids.append(id_)
  for split in ("trainval", "test"):
    with open(os.path.join(voc, "ImageSets", "Main", f"{split}.txt"), "w") as f:
      f.write("\n".join(ids) + "\n")
  return float(np.mean(sizes)) / 1024


def main(argv):
  del argv
  workers = _WORKERS.value or os.cpu_count()
  with tempfile.TemporaryDirectory() as tmp:
    kb = write_voc_tree(tmp, _NUM_IMAGES.value)
    cfg = ml_collections.ConfigDict(dict(
        name="voc2007", source="local", data_dir=tmp, train_split="trainval",
        test_split="test", val_split="", val_fraction=0.0, max_pixels=89_478_485))
    train = get_sources(cfg, seed=0).train
    it = train_batches(train, global_batch_size=_BATCH.value, image_size=_N.value,
                       crop_size=_CROP.value, seed=0, num_workers=workers)
    next(it)  # warm up: threads started, first lookahead decoded
    rates = []
    for run in range(_RUNS.value):
      t0 = time.perf_counter()
      for _ in range(_STEPS.value):
        batch = next(it)
      dt = time.perf_counter() - t0
      rates.append(_STEPS.value * _BATCH.value / dt)
      print(f"run {run}: {rates[-1]:.1f} images/s")
    it.close()
  print(f"input pipeline: N={_N.value} crop={_CROP.value} batch={_BATCH.value} "
        f"workers={workers} cpus={os.cpu_count()} jpeg~{kb:.0f}KB 500x375 -> "
        f"median {statistics.median(rates):.1f} images/s ({batch['image'].shape})")


if __name__ == "__main__":
  app.run(main)
