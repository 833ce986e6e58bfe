r"""What a batch costs to write into a fresh shared-memory block against a reused one.

A Grain worker hands a batch to the main process in shared memory. Grain's own way
(``SharedMemoryArray``) creates a block per batch: the kernel allocates and zeroes every page
as it is first written and frees it when the block goes. ``rma_jax.data.pipeline`` reuses a
worker's blocks instead. This times, in one process, writing one training batch of images
(16 x 448 x 448 x 3 uint8, 9.6 MB) into (a) a fresh block, created, written, closed and
unlinked, and (b) a block made once. Medians over ``--repeats`` rounds of ``--batches``.

  python -m benchmarks.shared_memory_blocks \
      --json=docs/benchmarks/2026-12-07-shared-memory-blocks.json
"""

import json
import os
import statistics
import time
from multiprocessing import shared_memory

from absl import app, flags
import numpy as np

from benchmarks import timing

_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per batch.")
_CROP = flags.DEFINE_integer("crop_size", 448, "Image side.")
_BATCHES = flags.DEFINE_integer("batches", 50, "Batches per round.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Rounds; medians are reported.")
_JSON = flags.DEFINE_string("json", "", "Write the results here as JSON.")


def main(argv):
  del argv
  b, crop = _BATCH.value, _CROP.value
  images = np.random.default_rng(0).integers(0, 256, (b, crop, crop, 3), np.uint8)

  def fresh():
    shm = shared_memory.SharedMemory(create=True, size=images.nbytes)
    np.ndarray(images.shape, images.dtype, buffer=shm.buf)[:] = images
    shm.close()
    shm.unlink()

  block = shared_memory.SharedMemory(create=True, size=images.nbytes)
  target = np.ndarray(images.shape, images.dtype, buffer=block.buf)

  def reused():
    target[:] = images

  load_before = os.getloadavg()
  ms = {"fresh block": [], "reused block": []}
  for _ in range(_REPEATS.value):  # alternating
    for name, write in (("fresh block", fresh), ("reused block", reused)):
      write()
      t0 = time.process_time()
      for _ in range(_BATCHES.value):
        write()
      ms[name].append(1e3 * (time.process_time() - t0) / _BATCHES.value)
  del target
  block.close()
  block.unlink()
  median = {k: statistics.median(v) for k, v in ms.items()}
  out = dict(setup=dict(batch_size=b, crop_size=crop, batch_mb=round(images.nbytes / 1e6, 2),
                        batches=_BATCHES.value, repeats=_REPEATS.value,
                        cpu=timing.cpu_description()[0],
                        vector_extensions=timing.cpu_description()[1],
                        loadavg_before=load_before, loadavg_after=os.getloadavg()),
             cpu_ms_per_batch=median, runs=ms,
             cpu_ms_per_image={k: v / b for k, v in median.items()})
  print(f"{b} x {crop}^2 x 3 uint8 ({out['setup']['batch_mb']} MB), {out['setup']['cpu']} "
        f"({out['setup']['vector_extensions']}), load {load_before} -> {os.getloadavg()}")
  for k, v in median.items():
    print(f"{k}: {v:.2f} CPU ms per batch, {v / b:.3f} per image")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
