r"""Throughput of the training input pipeline on VOC-sized JPEGs (no data set needed).

Writes a temporary VOCdevkit/VOC2007 tree of synthetic ~500x375 JPEGs (smooth colour fields
plus texture, so they compress and decode like photographs), opens it with the same
``get_sources`` path as a real run, and times the training batches at N = 512, crop 448:
decode, resize, crop, flip and batching. Side by side, alternating within each run: the
pipeline as it was before Grain (a thread pool in the main process, ``--threads``) and
``train_batches`` on Grain at each of ``--workers`` worker processes. For each: images/s
(wall), CPU seconds per image (the main process and its worker processes, from psutil) and
the start-up (iterator built to one batch per thread or worker, not in the rates). Medians
over ``--runs``.

  python -m benchmarks.input_pipeline                       # N=512, batch 16, 512 JPEGs
  python -m benchmarks.input_pipeline --json=docs/benchmarks/input_pipeline.json
  python -m benchmarks.input_pipeline --workers=4,8 --image_size=640 --crop_size=576
"""

import collections
import concurrent.futures
import itertools
import json
import os
import statistics
import tempfile
import time

from absl import app, flags
import ml_collections
import numpy as np
from PIL import Image
import psutil

from benchmarks import timing
from rma_jax.data import get_sources, pipeline, train_batches

_NUM_IMAGES = flags.DEFINE_integer("num_images", 512, "JPEGs in the synthetic tree.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 24, "Timed batches per run and pipeline.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs; medians are reported.")
_N = flags.DEFINE_integer("image_size", 512, "N: resize side.")
_CROP = flags.DEFINE_integer("crop_size", 448, "Training crop side (N - 64).")
_THREADS = flags.DEFINE_integer("threads", 2, "Threads of the thread-pool reference (0: skip).")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Grain worker counts to time.")
_JSON = flags.DEFINE_string("json", "", "Write the results here as JSON.")


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


def thread_pool_batches(source, threads: int, lookahead: int = 2, **kw):
  """The pipeline before Grain, for comparison: examples decoded by ``threads`` threads of
  the main process, ``lookahead`` batches ahead; the same rows as ``train_batches``."""
  fn = pipeline._TrainBatch(source, local_batch_size=kw["global_batch_size"],  # pylint: disable=protected-access
                            process_index=0, **kw)
  with concurrent.futures.ThreadPoolExecutor(threads) as ex:
    def submit(step):
      epoch, idx = fn.indices(step)
      return [ex.submit(fn._load, int(i), epoch, {}) for i in idx]  # pylint: disable=protected-access
    pending = collections.deque(submit(s) for s in range(lookahead + 1))
    for step in itertools.count(lookahead + 1):
      rows = [f.result() for f in pending.popleft()]
      pending.append(submit(step))
      yield {"image": np.stack([r[0] for r in rows]),
             "labels": np.stack([r[1] for r in rows]).astype(np.float32)}


def _cpu_seconds(proc: psutil.Process) -> tuple[float, float]:
  """CPU time of this process, and of its live children (the Grain workers)."""
  children = 0.0
  for child in proc.children(recursive=True):
    try:
      children += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return sum(proc.cpu_times()[:2]), children


def _time(make, steps: int, batch: int, warmup: int) -> dict[str, float]:
  """Rates over ``steps`` batches after ``warmup`` (one per worker: each worker's start-up is
  then outside the timed window, and in the start-up time)."""
  proc = psutil.Process()
  t0 = time.perf_counter()
  it = make()
  first = next(it)
  for _ in range(warmup - 1):
    next(it)
  start = time.perf_counter() - t0
  (m0, w0), t1 = _cpu_seconds(proc), time.perf_counter()
  for _ in range(steps):
    last = next(it)
  dt, (m1, w1) = time.perf_counter() - t1, _cpu_seconds(proc)
  it.close()
  assert last["image"].shape == first["image"].shape
  n = steps * batch
  return {"images_per_s": n / dt, "cpu_s_per_image": (m1 - m0 + w1 - w0) / n,
          "main_cpu_s_per_image": (m1 - m0) / n, "startup_s": start}


def _cpu_info() -> dict[str, str]:
  model, extensions = timing.cpu_description()
  return {"cpu": model, "cores": str(os.cpu_count()), "vector_extensions": extensions}


def main(argv):
  del argv
  b, steps = _BATCH.value, _STEPS.value
  kw = dict(global_batch_size=b, image_size=_N.value, crop_size=_CROP.value, seed=0,
            random_flip=True)
  pipelines = {}  # name: (iterator factory, warm-up batches)
  if _THREADS.value:
    pipelines[f"thread pool, {_THREADS.value} threads"] = (
        lambda src: thread_pool_batches(src, _THREADS.value, **kw), _THREADS.value)
  for w in map(int, _WORKERS.value):
    pipelines[f"grain, {w} worker{'s' * (w != 1)}"] = (
        lambda src, w=w: train_batches(src, num_workers=w, process_index=0, process_count=1,
                                       **kw), max(w, 1))
  load_before = os.getloadavg()
  results = collections.defaultdict(list)
  with tempfile.TemporaryDirectory() as tmp:
    kb = write_voc_tree(tmp, _NUM_IMAGES.value)
    cfg = ml_collections.ConfigDict(dict(
        name="voc2007", source="local", data_dir=tmp, train_split="trainval",
        test_split="test", val_split="", val_fraction=0.0, max_pixels=89_478_485))
    train = get_sources(cfg, seed=0).train
    for run in range(_RUNS.value):  # alternating: every pipeline once per run
      for name, (make, warmup) in pipelines.items():
        r = _time(lambda make=make: make(train), steps, b, warmup)
        results[name].append(r)
        print(f"run {run}: {name}: {r['images_per_s']:.1f} images/s, "
              f"{1e3 * r['cpu_s_per_image']:.2f} CPU ms/image "
              f"({1e3 * r['main_cpu_s_per_image']:.2f} in the main process), "
              f"start-up {r['startup_s']:.1f} s",
              flush=True)
  table = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for name, rs in results.items()}
  out = dict(setup=dict(num_images=_NUM_IMAGES.value, image_size=_N.value,
                        crop_size=_CROP.value, batch_size=b, steps_per_run=steps,
                        runs=_RUNS.value, jpeg_kb=round(kb, 1), **_cpu_info(),
                        loadavg_before=load_before, loadavg_after=os.getloadavg()),
             median=table, runs=dict(results))
  print(f"\nN={_N.value} crop={_CROP.value} batch={b}, {_NUM_IMAGES.value} JPEGs ~{kb:.0f} KB, "
        f"{out['setup']['cpu']} ({out['setup']['cores']} cores, "
        f"{out['setup']['vector_extensions']}), load {load_before} -> {os.getloadavg()}")
  print("| pipeline | images/s | CPU ms / image | of which main process | start-up (s) |\n"
        "| --- | ---: | ---: | ---: | ---: |")
  for name, m in table.items():
    print(f"| {name} | {m['images_per_s']:.1f} | {1e3 * m['cpu_s_per_image']:.2f} | "
          f"{1e3 * m['main_cpu_s_per_image']:.2f} | {m['startup_s']:.1f} |")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
