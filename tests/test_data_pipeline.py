"""Preprocessing and the batch iterators: shapes, dtypes, ranges, crop/flip (train only),
determinism and resume (in the main process and in Grain worker processes), process
sharding, bad examples, eval coverage and padding, device placement, a worker killed mid-pass.

Worker processes take seconds to start: one 2-worker pipeline (``resumed_in_workers``) serves
every test that checks them, but the one that kills a worker (in a process of its own)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rma_jax.pixels import normalize
from rma_jax.data import (BadExampleError, RecordSource, device_put_batches, eval_batches,
                          epoch_permutation, eval_transform, train_batches, train_transform)
from rma_jax.data.source import make_record

N, CROP, C = 32, 24, 5


def _coord_image(index, size=N):
  """R = column, G = row, B = the example's index: any crop/flip is readable from pixels."""
  yy, xx = np.mgrid[:size, :size]
  return np.stack([xx, yy, np.full_like(xx, index)], -1).astype(np.uint8)


def _source(n=22, bad=(), size=N):
  records = []
  for i in range(n):
    labels = [i % C, (i * 3 + 1) % C] if i % 4 else []  # every 4th image has no labels
    image = _coord_image(i, size) if i not in bad else b"not an image"
    boxes = np.tile([[0.25, 0.25, 0.75, 0.5]], (len(labels), 1))
    records.append(make_record(f"id{i}", image, labels, boxes,
                               [j == 1 for j in range(len(labels))], C))
  return RecordSource("synthetic", records, [f"c{k}" for k in range(C)])


# -------------------------------------------------------------------------------- normalize

def test_normalize_conventions_by_hand():
  img = np.array([[[[10, 20, 30], [255, 0, 128]]]], np.uint8)  # (1, 1, 2, 3)
  f = img.astype(np.float64)
  caffe = np.stack([f[..., 2] - 103.939, f[..., 1] - 116.779, f[..., 0] - 123.68], -1)
  torch_ = (f / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  for conv, want in (("caffe", caffe), ("torch", torch_), ("unit", f / 255 - 0.5)):
    out = jax.jit(normalize, static_argnums=1)(img, conv)
    assert out.dtype == jnp.float32 and out.shape == img.shape
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-4)
  assert normalize(img, "unit", jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="convention"):
    normalize(img, "bgr")


# ---------------------------------------------------------------------------- transforms

def test_train_transform_crops_and_flips_and_boxes_follow():
  img = np.zeros((60, 80, 3), np.uint8)
  img[15:45, 20:40] = 255  # box (x0, y0, x1, y1) = (0.25, 0.25, 0.5, 0.75)
  box = np.array([[0.25, 0.25, 0.5, 0.75]], np.float32)
  flips = set()
  for s in range(12):
    out, out_box = train_transform(img, np.random.default_rng(s), 64, 48, boxes=box)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    ys, xs = np.nonzero(out[..., 0] > 127)
    # The white rectangle's extent in the output, in normalised crop coordinates.
    got = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / 48
    np.testing.assert_allclose(out_box[0], got, atol=1.5 / 48)
    flips.add(bool(out_box[0, 0] > 1 - out_box[0, 2]))
  assert flips == {True, False}


def test_train_transform_equals_resize_then_crop_then_flip():
  """The crop is resized straight from the source; it must equal the paper's order (a flip or
  a one-pixel shift would change most pixels by far more than 1)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from rma_jax.data.preprocess import sample_crop  # pylint: disable=g-import-not-at-top
  img = np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8)
  for s in range(6):
    out = train_transform(img, np.random.default_rng(s), 96, 80)
    y0, x0, flip = sample_crop(np.random.default_rng(s), 96, 80)
    ref = np.asarray(Image.fromarray(img).resize((96, 96), Image.BILINEAR))
    ref = ref[y0:y0 + 80, x0:x0 + 80]
    diff = np.abs(out.astype(int) - (ref[:, ::-1] if flip else ref))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.05  # Pillow's fixed-point rounding only


def test_eval_transform_resizes_without_crop():
  img = np.zeros((30, 40, 3), np.uint8)
  img[:, 20:] = 200  # right half bright
  out = eval_transform(img, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  assert (out[:, :7] < 10).all() and (out[:, 9:] > 190).all()
  np.testing.assert_array_equal(eval_transform(_coord_image(3), N), _coord_image(3))


# ------------------------------------------------------------------------------ train batches

def _take(it, k):
  return [next(it) for _ in range(k)]


def test_train_batches_shapes_crops_flips_and_epochs():
  src = _source(22)
  it = train_batches(src, global_batch_size=4, image_size=N, crop_size=CROP, seed=0,
                     process_index=0, process_count=1)
  batches = _take(it, 10)  # 5 steps per epoch (22 // 4); 2 examples dropped per epoch
  seen_flip = set()
  for b in batches:
    assert b["image"].shape == (4, CROP, CROP, 3) and b["image"].dtype == np.uint8
    assert b["labels"].shape == (4, C) and b["labels"].dtype == np.float32
    assert set(b) == {"image", "labels", "mask"}
    assert set(np.unique(b["labels"])) <= {0.0, 1.0}
    np.testing.assert_array_equal(b["mask"], np.ones(4, np.float32))
    for img, lab in zip(b["image"], b["labels"]):
      i = int(img[0, 0, 2])
      np.testing.assert_array_equal(lab, src.records[i].labels)
      x, y = img[..., 0].astype(int), img[..., 1].astype(int)
      # A contiguous crop: rows step +1 down, columns step +1 or -1 (flipped) across.
      assert (np.diff(y, axis=0) == 1).all() and (np.diff(y, axis=1) == 0).all()
      dx = np.unique(np.diff(x, axis=1))
      assert dx.tolist() in ([1], [-1]) and (np.diff(x, axis=0) == 0).all()
      seen_flip.add(dx[0] == -1)
      assert 0 <= y[0, 0] <= N - CROP and 0 <= x.min() <= N - CROP
  assert seen_flip == {True, False}
  epoch0 = [int(v) for b in batches[:5] for v in b["image"][:, 0, 0, 2]]
  epoch1 = [int(v) for b in batches[5:] for v in b["image"][:, 0, 0, 2]]
  assert len(set(epoch0)) == 20 and len(set(epoch1)) == 20  # without replacement
  # The project's order: epoch e's first 20 of permutation(seed, e), 4 per step.
  assert epoch0 == epoch_permutation(0, 0, 22)[:20].tolist()
  assert epoch1 == epoch_permutation(0, 1, 22)[:20].tolist()
  # Label-less images are kept.
  assert any(b["labels"][r].sum() == 0 for b in batches for r in range(4))


def test_per_example_augmentation_is_drawn_from_seed_epoch_and_index():
  """Each row is train_transform of its image with the generator (seed, epoch, index)."""
  src = _source(22)
  batches = _take(train_batches(src, global_batch_size=4, image_size=N, crop_size=CROP,
                                seed=3, start_step=3, process_index=0, process_count=1), 4)
  for step, b in enumerate(batches, 3):
    epoch = step // 5
    for img, i in zip(b["image"], epoch_permutation(3, epoch, 22)[step % 5 * 4:][:4]):
      want = train_transform(_coord_image(i), np.random.default_rng([3, epoch, i]), N, CROP)
      np.testing.assert_array_equal(img, want)


BAD = (3, 7)
KW = dict(global_batch_size=4, image_size=N, crop_size=CROP, process_index=0, process_count=1)


def _mapped_blocks() -> set[str]:
  """Names of the shared-memory blocks this process has mapped (Linux)."""
  with open("/proc/self/maps") as f:
    return {line.split("/dev/shm/")[1].strip() for line in f if "/dev/shm/rma" in line}


@pytest.fixture(scope="module")
def resumed_in_workers():
  """Steps 4-9 (across the epoch boundary at 5) of seed 7 over a source with unreadable
  examples, from 2 Grain worker processes, resumed at step 4 and kept, then 40 more steps
  dropped as they come: the batches, the source's skipped examples after step 9, and the
  shared-memory blocks the pipeline mapped here before and after it was closed."""
  before = _mapped_blocks() if os.path.exists("/proc/self/maps") else None
  src = _source(22, bad=BAD)
  it = train_batches(src, seed=7, start_step=4, num_workers=2, **KW)
  batches = _take(it, 6)
  skipped = sorted(src.skipped.at_read), src.skipped.count
  for _ in range(40):
    next(it)
  mapped = _mapped_blocks() - before if before is not None else None
  it.close()  # stops the workers
  return dict(src=src, batches=batches, skipped=skipped, mapped=mapped,
              mapped_after=_mapped_blocks() if mapped is not None else None)


def test_train_batches_resumed_in_worker_processes_equal_an_uninterrupted_run(
    resumed_in_workers):
  resumed = resumed_in_workers["batches"]  # all held: no block was reused under them
  full = _take(train_batches(_source(22, bad=BAD), seed=7, num_workers=0, **KW), 10)
  other = _take(train_batches(_source(22, bad=BAD), seed=8, num_workers=0, **KW), 10)
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
  assert any((a["image"] != b["image"]).any() for a, b in zip(full, other))


def test_unreadable_examples_read_in_workers_are_replaced_and_counted(resumed_in_workers):
  seen = [int(v) for b in resumed_in_workers["batches"] for v in b["image"][:, 0, 0, 2]]
  # By hand: the examples drawn at steps 4-9; a bad one is replaced by the next index.
  drawn = [int(i) for step in range(4, 10)
           for i in epoch_permutation(7, step // 5, 22)[step % 5 * 4:][:4]]
  assert seen == [i + 1 if i in BAD else i for i in drawn]
  # Recorded in this process's source, though read in the workers.
  at_read, count = resumed_in_workers["skipped"]
  assert at_read == sorted(set(BAD) & set(drawn)) != []
  assert count == len(set(BAD) & set(drawn))
  with pytest.raises(BadExampleError):
    resumed_in_workers["src"][3]


def test_workers_reuse_their_shared_memory_blocks_and_remove_them(resumed_in_workers):
  mapped = resumed_in_workers["mapped"]
  if mapped is None:
    pytest.skip("no /proc/self/maps")
  # 46 batches came through a few blocks per worker, reused (fresh blocks: 46): one per
  # batch in flight, 7 per worker with every buffer of Grain 0.2.18 full (one being written,
  # the rest in the worker's queue and in Grain's threads and buffers in this process).
  assert 2 <= len(mapped) <= 16, sorted(mapped)
  # Closed: unmapped here, and unlinked (by this process, once the workers had stopped).
  assert not resumed_in_workers["mapped_after"] & mapped
  assert not [n for n in mapped if os.path.exists(os.path.join("/dev/shm", n))]


def test_train_batches_processes_read_disjoint_halves():
  src = _source(22)
  kw = dict(global_batch_size=4, image_size=N, crop_size=CROP, seed=1, num_workers=0)
  whole = _take(train_batches(src, process_index=0, process_count=1, **kw), 6)
  p0 = _take(train_batches(src, process_index=0, process_count=2, **kw), 6)
  p1 = _take(train_batches(src, process_index=1, process_count=2, **kw), 6)
  for w, a, b in zip(whole, p0, p1):
    assert a["image"].shape[0] == 2
    np.testing.assert_array_equal(w["image"], np.concatenate([a["image"], b["image"]]))
  with pytest.raises(ValueError, match="multiple"):
    next(train_batches(src, process_index=0, process_count=3, **kw))


# ------------------------------------------------------------------------------- eval batches

def test_eval_batches_cover_every_example_once_with_padding():
  src = _source(11, bad=(5,))
  # In a worker process (the second and last pipeline of this file that starts one).
  batches = list(eval_batches(src, global_batch_size=4, image_size=N, max_boxes=3,
                              num_workers=1, process_index=0, process_count=1))
  assert len(batches) == 3
  idx = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  # Example 5 is unreadable: masked like padding (and counted here, though read in a
  # worker); the last row is padding.
  np.testing.assert_array_equal(idx, [0, 1, 2, 3, 4, -1, 6, 7, 8, 9, 10, -1])
  np.testing.assert_array_equal(mask, (idx >= 0).astype(np.float32))
  assert src.skipped.count == 1 and list(src.skipped.at_read) == [5]
  for b in batches:
    assert b["image"].shape == (4, N, N, 3) and b["image"].dtype == np.uint8
    assert b["difficult"].dtype == bool and b["index"].dtype == np.int32
    assert b["boxes"].shape == (4, 3, 4) and b["box_labels"].shape == (4, 3)
    for r, i in enumerate(b["index"]):
      if i < 0:
        assert (b["image"][r] == 0).all() and b["labels"][r].sum() == 0
        assert (b["box_labels"][r] == -1).all() and b["id"][r] == ""
        continue
      rec = src.records[i]
      np.testing.assert_array_equal(b["image"][r], _coord_image(i))  # no crop, no flip
      np.testing.assert_array_equal(b["labels"][r], rec.labels)
      np.testing.assert_array_equal(b["difficult"][r], rec.difficult)
      m = len(rec.box_labels)
      np.testing.assert_array_equal(b["box_labels"][r, :m], rec.box_labels)
      assert (b["box_labels"][r, m:] == -1).all()
      np.testing.assert_allclose(b["boxes"][r, :m], rec.boxes)
      assert b["id"][r] == f"id{i}"


def test_eval_batches_split_over_processes():
  src = _source(9)
  parts = [list(eval_batches(src, global_batch_size=4, image_size=16, num_workers=0,
                             process_index=p, process_count=2)) for p in (0, 1)]
  assert len(parts[0]) == len(parts[1]) == 3  # same number of steps on every process
  idx = np.concatenate([np.concatenate([a["index"], b["index"]]) for a, b in zip(*parts)])
  np.testing.assert_array_equal(idx[idx >= 0], np.arange(9))
  assert (idx[9:] == -1).all()


# ---------------------------------------------------------------------------- device batches

def test_device_put_batches_builds_sharded_global_arrays():
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("data",))
  sharding = NamedSharding(mesh, P("data"))
  gb = 2 * len(devices)
  src = _source(gb * 2 + 1)
  host = list(eval_batches(src, global_batch_size=gb, image_size=8, num_workers=0))
  out = list(device_put_batches(iter(host), sharding, prefetch=2))
  assert len(out) == len(host) == 3
  for h, d in zip(host, out):
    assert "id" not in d and set(d) == {k for k, v in h.items() if isinstance(v, np.ndarray)}
    for k, v in d.items():
      assert isinstance(v, jax.Array) and v.shape == h[k].shape and v.dtype == h[k].dtype
      assert v.sharding.is_equivalent_to(sharding, v.ndim)
      np.testing.assert_array_equal(np.asarray(v), h[k])


def test_device_put_batches_on_four_host_devices():
  code = textwrap.dedent("""
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from rma_jax.data import device_put_batches, train_batches
      from rma_jax.data.demo import make_demo_split
      assert jax.device_count() == 4, jax.devices()
      src = make_demo_split("train", 16, canvas_size=32)
      s = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
      it = train_batches(src, global_batch_size=8, image_size=32, crop_size=24, seed=0)
      host = train_batches(src, global_batch_size=8, image_size=32, crop_size=24, seed=0)
      for b, h in zip(device_put_batches(it, s), [next(host) for _ in range(3)]):
        shards = b["image"].addressable_shards
        assert len(shards) == 4 and all(x.data.shape == (2, 24, 24, 3) for x in shards)
        assert sorted(x.index[0].start for x in shards) == [0, 2, 4, 6]
        np.testing.assert_array_equal(np.asarray(b["image"]), h["image"])
      print("OK")
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=4 " + os.environ.get("RMA_TEST_XLA_FLAGS", "")))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_random_flip_can_be_turned_off():
  from rma_jax.data import preprocess
  image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
  flipped_any = False
  for seed in range(8):
    with_flip = preprocess.train_transform(image, np.random.default_rng(seed), 48, 32)
    without = preprocess.train_transform(image, np.random.default_rng(seed), 48, 32,
                                         random_flip=False)
    _, _, flip = preprocess.sample_crop(np.random.default_rng(seed), 48, 32)
    np.testing.assert_array_equal(without, with_flip[:, ::-1] if flip else with_flip)
    flipped_any |= bool(flip)
  assert flipped_any


def test_a_worker_killed_mid_pass_fails_the_pipeline_at_once():
  """A worker process that dies while the pipeline runs (SIGKILL: the OOM killer's way) fails
  it within seconds with Grain's error, which names the exit status, instead of a wait for
  ever; the other worker is stopped. In a process of its own: the dead worker's batches in
  flight are left to that process's resource tracker."""
  code = textwrap.dedent("""
      import time, psutil
      from rma_jax.data import train_batches
      from rma_jax.data.demo import make_demo_split
      src = make_demo_split("train", 16, canvas_size=32)
      it = train_batches(src, global_batch_size=4, image_size=32, crop_size=24, seed=0,
                         num_workers=2)
      next(it)
      workers = [p for p in psutil.Process().children()
                 if "spawn_main" in " ".join(p.cmdline())]
      assert len(workers) == 2, workers
      time.sleep(1)  # its buffers full: killed while it waits, not half-way through a block
      workers[0].kill()
      started = time.time()
      try:
        for _ in range(1000):
          next(it)
      except RuntimeError as e:
        print(f"{time.time() - started:.1f}", e)
      print(len(psutil.wait_procs(workers, timeout=30)[1]), "left")
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  first, left = r.stdout.splitlines()
  seconds, error = first.split(" ", 1)
  assert float(seconds) < 10 and error.startswith(
      "Worker process was terminated unexpectedly with exit code -9"), r.stdout
  assert left == "0 left", r.stdout
