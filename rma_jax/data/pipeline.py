"""Batch iterators: host-side numpy batches, then global ``jax.Array`` batches on the mesh.

Multi-host layout: a global batch of G examples is cut into ``jax.process_count()`` equal
local batches; process p decodes only rows [p*G/P, (p+1)*G/P) of it, and
:func:`device_put_batches` assembles the global array with
``jax.make_array_from_process_local_data`` (batch axis sharded over the mesh's 'data' axis).

Determinism: the order of epoch e is ``permutation(seed, e)`` and the augmentation of an
example is drawn from ``(seed, e, index)``, so the batch at step s does not depend on what ran
before it: a run resumed at ``start_step`` sees exactly the batches of an uninterrupted run,
whatever the thread timing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from rma_jax.data import preprocess
from rma_jax.data.source import BadExampleError, Source

logger = logging.getLogger(__name__)


def _process_layout(global_batch_size: int, process_index: int | None,
                    process_count: int | None) -> tuple[int, int, int]:
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % pc:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"the number of processes {pc}")
  return pi, pc, global_batch_size // pc


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The example order of ``epoch``: a permutation of range(n) derived from (seed, epoch)."""
  return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


class _Pool:
  """A thread pool, or direct calls when num_workers <= 0 (debugging, tests)."""

  def __init__(self, num_workers: int):
    self.ex = (concurrent.futures.ThreadPoolExecutor(num_workers, "rma_data")
               if num_workers > 0 else None)

  def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
    if self.ex is not None:
      return self.ex.submit(fn, *args)
    f = concurrent.futures.Future()
    try:
      f.set_result(fn(*args))
    except Exception as e:  # pylint: disable=broad-except
      f.set_exception(e)
    return f

  def close(self) -> None:
    if self.ex is not None:
      self.ex.shutdown(wait=False, cancel_futures=True)


def train_batches(source: Source, *, global_batch_size: int, image_size: int, crop_size: int,
                  seed: int, start_step: int = 0, num_workers: int = 2, lookahead: int = 2,
                  process_index: int | None = None, process_count: int | None = None,
                  random_flip: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """Infinite stream of this process's part of the training batches.

  Epochs are full permutations without replacement; the last ``len(source) % G`` examples of
  an epoch's permutation are dropped (a different set every epoch), so every step has the
  same shape. An unreadable example is replaced by the next readable one in the source
  (deterministically) and counted in ``source.skipped``; the count is logged when an epoch ends.

  Args:
    source: the training source.
    global_batch_size: G, over all processes (must divide by the process count).
    image_size: N (resize).
    crop_size: crop side (N - 64 in the paper).
    seed: seeds the epoch permutations and the augmentation.
    start_step: the first step to produce (resume).
    num_workers: decoding threads (<= 0: decode in the calling thread).
    lookahead: batches decoded ahead of the one being consumed.
    process_index, process_count: override ``jax.process_index()/process_count()`` (tests).
    random_flip: random horizontal flips (the paper); off for chiral classes (digits).

  Yields:
    dict with ``image`` uint8 (b, crop, crop, 3), ``labels`` float32 (b, C), ``mask`` float32
    (b,) ones, where b = G / process_count. Images without labels are kept (the loss masks them).
  """
  n = len(source)
  pi, _, b = _process_layout(global_batch_size, process_index, process_count)
  steps_per_epoch = n // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{source.name}: {n} examples is fewer than one global batch of "
                     f"{global_batch_size}")
  perms: dict[int, np.ndarray] = {}

  def indices(step: int) -> tuple[int, np.ndarray]:
    epoch, k = divmod(step, steps_per_epoch)
    if epoch not in perms:
      perms.clear()  # Keep only the current epoch's permutation (memory on big data sets).
      perms[epoch] = epoch_permutation(seed, epoch, n)
    g = perms[epoch][k * global_batch_size:(k + 1) * global_batch_size]
    return epoch, g[pi * b:(pi + 1) * b]

  def load(index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    for j in range(n):  # The next readable example stands in for a bad one.
      i = (index + j) % n
      try:
        ex = source[i]
      except BadExampleError:
        continue
      rng = np.random.default_rng([seed, epoch, i])
      image = preprocess.train_transform(ex["image"], rng, image_size, crop_size,
                                         random_flip=random_flip)
      return image, ex["labels"]
    raise RuntimeError(f"{source.name}: no readable example at all; {source.skipped.summary()}")

  pool = _Pool(num_workers)
  pending: collections.deque = collections.deque()
  step = start_step
  try:
    for _ in range(lookahead + 1):
      epoch, idx = indices(step)
      pending.append((epoch, [pool.submit(load, int(i), epoch) for i in idx]))
      step += 1
    last_epoch, reported = None, source.skipped.count
    while True:
      epoch, futures = pending.popleft()
      nxt_epoch, idx = indices(step)
      pending.append((nxt_epoch, [pool.submit(load, int(i), nxt_epoch) for i in idx]))
      step += 1
      if last_epoch is not None and epoch != last_epoch and source.skipped.count > reported:
        logger.warning("end of epoch %d: %s", last_epoch, source.skipped.summary())
        reported = source.skipped.count
      last_epoch = epoch
      results = [f.result() for f in futures]
      yield dict(image=np.stack([r[0] for r in results]),
                 labels=np.stack([r[1] for r in results]).astype(np.float32),
                 mask=np.ones((b,), np.float32))
  finally:
    pool.close()


def eval_batches(source: Source, *, global_batch_size: int, image_size: int,
                 num_workers: int = 2, max_boxes: int = 16, lookahead: int = 2,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> Iterator[dict[str, Any]]:
  """One ordered pass over ``source``: every example exactly once, the last batch padded.

  Every process yields the same number of batches (ceil(n / G)). Padding rows, and examples
  whose image cannot be read (counted in ``source.skipped`` and logged, with the total at the
  end of the pass), have ``mask`` 0 and ``index`` -1.

  Args:
    source: the split to evaluate.
    global_batch_size: G, over all processes.
    image_size: the side images are resized to (crop_size for single view, N for ten-view).
    num_workers: decoding threads (<= 0: in the calling thread).
    max_boxes: Mmax, boxes per image kept (fixed so shapes never change; extra boxes of
      crowded images are dropped, in annotation order).
    lookahead: batches decoded ahead.
    process_index, process_count: override the JAX process layout (tests).

  Yields:
    dict with ``image`` uint8 (b, size, size, 3), ``labels`` float32 (b, C), ``difficult``
    bool (b, C), ``mask`` float32 (b,), ``index`` int32 (b,), ``boxes`` float32 (b, Mmax, 4),
    ``box_labels`` int32 (b, Mmax) (-1 = no box), and ``id`` (a list of b str; '' for padding).
  """
  n, c = len(source), source.num_classes
  pi, _, b = _process_layout(global_batch_size, process_index, process_count)
  num_batches = -(-n // global_batch_size)

  def load(index: int):
    if index < 0:
      return None
    try:
      ex = source[index]
    except BadExampleError:
      return None
    return preprocess.eval_transform(ex["image"], image_size), ex

  def collate(positions: np.ndarray, results: list) -> dict[str, Any]:
    batch = dict(image=np.zeros((b, image_size, image_size, 3), np.uint8),
                 labels=np.zeros((b, c), np.float32), difficult=np.zeros((b, c), bool),
                 mask=np.zeros((b,), np.float32), index=np.full((b,), -1, np.int32),
                 boxes=np.zeros((b, max_boxes, 4), np.float32),
                 box_labels=np.full((b, max_boxes), -1, np.int32), id=[""] * b)
    for row, (pos, res) in enumerate(zip(positions, results)):
      if res is None:
        continue
      image, ex = res
      m = min(len(ex["box_labels"]), max_boxes)
      batch["image"][row] = image
      batch["labels"][row] = ex["labels"]
      batch["difficult"][row] = ex["difficult"]
      batch["mask"][row] = 1.0
      batch["index"][row] = pos
      batch["boxes"][row, :m] = ex["boxes"][:m]
      batch["box_labels"][row, :m] = ex["box_labels"][:m]
      batch["id"][row] = ex["id"]
    return batch

  def local_positions(g: int) -> np.ndarray:
    pos = g * global_batch_size + pi * b + np.arange(b)
    return np.where(pos < n, pos, -1)

  pool = _Pool(num_workers)
  pending: collections.deque = collections.deque()
  try:
    batch_ids = iter(range(num_batches))
    for g in itertools.islice(batch_ids, lookahead + 1):
      pos = local_positions(g)
      pending.append((pos, [pool.submit(load, int(i)) for i in pos]))
    while pending:
      pos, futures = pending.popleft()
      for g in itertools.islice(batch_ids, 1):
        p = local_positions(g)
        pending.append((p, [pool.submit(load, int(i)) for i in p]))
      yield collate(pos, [f.result() for f in futures])
  finally:
    pool.close()
  if source.skipped.count:
    logger.warning("end of evaluation pass: %s", source.skipped.summary())


def device_put_batches(iterator: Iterable[dict[str, Any]],
                       sharding: jax.sharding.NamedSharding, prefetch: int = 2
                       ) -> Iterator[dict[str, jax.Array]]:
  """Turns host batches into global ``jax.Array`` batches, ``prefetch`` batches ahead.

  Args:
    iterator: host batches (this process's rows), e.g. from :func:`train_batches`.
    sharding: where the global arrays live, normally ``NamedSharding(mesh, P('data'))``: the
      batch axis sharded over the 'data' axis, any other axis replicated.
    prefetch: batches transferred ahead of the one returned (transfers are asynchronous, so
      the next batches copy while the current step runs).

  Yields:
    dicts of global arrays, with the numpy-array entries of the host batch only (lists and
    strings such as ``id`` are dropped).
  """
  def put(batch: dict[str, Any]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in batch.items() if isinstance(v, np.ndarray)}

  it = iter(iterator)
  queue = collections.deque(put(x) for x in itertools.islice(it, max(prefetch, 0) + 1))
  while queue:
    yield queue.popleft()
    queue.extend(put(x) for x in itertools.islice(it, 1))
