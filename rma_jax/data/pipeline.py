"""Batch iterators: host-side numpy batches (a Grain pipeline), then global ``jax.Array``
batches on the mesh.

Each iterator is a ``grain.MapDataset`` over batch numbers whose ``map`` reads, decodes,
augments and stacks the batch; ``num_workers`` worker processes (``mp_prefetch``) produce
batches in turn, and 0 produces them in the calling thread (debugging).

Multi-host layout: a global batch of G examples is cut into ``jax.process_count()`` equal
local batches; process p decodes only rows [p*G/P, (p+1)*G/P) of it, and
:func:`device_put_batches` assembles the global array with
``jax.make_array_from_process_local_data`` (batch axis sharded over the mesh's 'data' axis).

Determinism: the order of epoch e is ``permutation(seed, e)`` and the augmentation of an
example is drawn from ``(seed, e, index)``, so the batch at step s is a function of
(seed, s) alone: a run resumed at ``start_step`` starts the pipeline at batch ``start_step``
and sees exactly the batches of an uninterrupted run, whatever the worker count (the step is
the pipeline's whole state; nothing else is checkpointed).

Bad examples: a worker reads with ``source.read`` and returns the unreadable indices with the
batch (``_BAD``); the iterator records them in the calling process's ``source.skipped``, so
the counts and the report are the same with or without worker processes.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import itertools
import logging
import math
from multiprocessing import shared_memory
import multiprocessing.resource_tracker
import os
import secrets
import signal
import sys
import threading
from typing import Any, Callable, Iterable, Iterator

from absl import flags
import grain
import grain.experimental
import jax
import numpy as np

from rma_jax.data import preprocess
from rma_jax.data.decode import BadImageError
from rma_jax.data.source import Source

logger = logging.getLogger(__name__)

_BAD = "_bad"  # {source index: reason} of the examples a batch could not read
# Finished batches each worker keeps ahead of the consumer.
_WORKER_BUFFER = 2


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


def _map(fn: Callable[[int], Any], numbers: range, num_workers: int,
         min_shm_size: int) -> Iterator[Any]:
  """``fn(g)`` for each g of ``numbers``, in order: a Grain ``MapDataset`` in the calling
  thread, or over ``num_workers`` worker processes (``mp_prefetch``; arrays of
  ``min_shm_size`` bytes and more come back in fresh shared memory, smaller ones pickled).
  Closing it stops the workers."""
  if num_workers < 0:
    raise ValueError(f"data.num_workers={num_workers} must be >= 0 (0: in the main process)")
  # Each element is a whole batch: no reading threads inside a process (num_threads=0).
  ds = grain.MapDataset.range(numbers.start, numbers.stop).map(fn).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if not num_workers:
    yield from ds
    return
  if not flags.FLAGS.is_parsed():
    # mp_prefetch reads one of Grain's absl flags; library callers and pytest parse none.
    # Their defaults, as absl would parse an empty command line (a later app.run parses its
    # own command line as usual).
    flags.FLAGS(sys.argv[:1], known_only=True)
  ds = grain.experimental.WithOptionsIterDataset(
      ds, grain.experimental.DatasetOptions(min_shm_size=min_shm_size))
  it = iter(ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=_WORKER_BUFFER),
                           worker_init_fn=_init_worker))
  try:
    yield from _start_unkillable(it)
  finally:
    it.close()


def _iterate(fn: "_TrainBatch | _EvalBatch", batch_numbers: range, source: Source,
             num_workers: int) -> Iterator[dict[str, Any]]:
  """``fn(g)`` for each g of ``batch_numbers`` in order (in ``num_workers`` processes), with
  the unreadable examples recorded in ``source.skipped``."""
  fn.blocks = (_WorkerBlocks(f"rma{os.getpid()}_{secrets.token_hex(3)}") if num_workers > 0
               else None)
  received = _SharedArrays(fn.blocks)
  # The images come in the workers' own reused blocks (_WorkerBlocks); the small arrays
  # (labels, boxes) are pickled rather than given a fresh shared-memory block each.
  batches = _map(fn, batch_numbers, num_workers, _PICKLED_BELOW)
  try:
    for batch in batches:
      batch = received.open(batch)
      for index, reason in batch.pop(_BAD).items():
        source.skipped.add_read(index, reason)
      yield batch
  finally:
    batches.close()  # stops the workers first
    received.close(num_workers)


@dataclasses.dataclass(frozen=True)
class _Shared:
  """What travels from a worker instead of a batch array: the block that holds it."""
  name: str
  shape: tuple[int, ...]
  dtype: str


# A block's first byte says whether the main process still uses the batch in it; the
# array starts at the next cache-line boundary.
_HEADER = 64
_PICKLED_BELOW = 1 << 20  # bytes: smaller arrays are pickled (min_shm_size)


class _WorkerBlocks:
  """A worker's shared-memory blocks for batch images, reused from batch to batch.

  A fresh block per batch (Grain's ``SharedMemoryArray``) costs the kernel an allocation,
  zeroing and freeing of every page, about as much CPU as a sixth of the decoding
  (docs/performance.md, "Input pipeline"). A block here is reused once the main process has
  copied its batch out (:class:`_SharedArrays` clears the block's flag); when all are in use
  a new one is made, so a worker holds as many as its batches in flight.

  Block k of worker w is named ``{prefix}_{w}_{k}`` so that the main process can unlink every
  block of the pipeline when it closes it, those whose batches never arrived included: a
  worker cannot, since Grain ends a worker whose part of a pass is done while its last
  batches still wait in the main process. Pickled with its prefix only.
  """

  def __init__(self, prefix: str):
    self.prefix = prefix
    self._blocks: list[shared_memory.SharedMemory] = []

  def __getstate__(self) -> dict[str, Any]:
    return {"prefix": self.prefix}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["prefix"])

  def array(self, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, _Shared]:
    """A writable array in a free block, and what the main process needs to map it."""
    dtype = np.dtype(dtype)
    size = _HEADER + math.prod(shape) * dtype.itemsize
    shm = next((b for b in self._blocks if b.size == size and b.buf[0] == 0), None)
    if shm is None:
      name = f"{self.prefix}_{_worker['index']}_{_worker['blocks']}"
      shm = shared_memory.SharedMemory(name, create=True, size=size)
      _worker["blocks"] += 1
      self._blocks.append(shm)
    shm.buf[0] = 1
    return (np.ndarray(shape, dtype, buffer=shm.buf, offset=_HEADER),
            _Shared(shm.name, tuple(shape), dtype.str))


# In a worker process (set by _init_worker): its index, and the blocks it has made.
_worker = {"index": 0, "blocks": 0}


class _SharedArrays:
  """The main process's side of :class:`_WorkerBlocks`: maps each block once, copies a
  batch's array out and clears the block's flag at once; unlinks the blocks at the end.

  The copy is what makes reuse safe: JAX on CPU aliases the host arrays it is given (no
  copy, and no reference that would keep a view of the block alive), so a view handed on
  could be overwritten by a later batch under a live ``jax.Array``."""

  def __init__(self, blocks: _WorkerBlocks | None):
    self._prefix = blocks.prefix if blocks is not None else ""
    self._mapped: dict[str, shared_memory.SharedMemory] = {}

  def open(self, batch: dict[str, Any]) -> dict[str, Any]:
    for k, v in batch.items():
      if isinstance(v, _Shared):
        shm = self._mapped.get(v.name)
        if shm is None:
          shm = self._mapped[v.name] = shared_memory.SharedMemory(v.name)
        batch[k] = np.ndarray(v.shape, v.dtype, buffer=shm.buf, offset=_HEADER).copy()
        shm.buf[0] = 0
    return batch

  def close(self, num_workers: int) -> None:
    """Unlinks every block of the pipeline (once its workers are stopped)."""
    for shm in self._mapped.values():
      shm.close()
    self._mapped.clear()
    for w in range(num_workers):
      for k in itertools.count():
        try:
          shm = shared_memory.SharedMemory(f"{self._prefix}_{w}_{k}")
        except FileNotFoundError:
          break
        shm.close()
        shm.unlink()


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Runs in each worker process before its loop.

  Signals: SIGTERM and SIGINT are ignored. A preemption or Ctrl-C often signals the whole
  process group; the main process (``rma_jax.preemption.StopSignals``) finishes its step,
  saves and exits, closing the pipeline, which stops the workers; a worker killed first
  would fail that step. A worker still ends when the main process goes without closing the
  pipeline (killed): a thread watches the parent and exits the worker.

  Memory: keeps freed image buffers in a worker's heap. With glibc's defaults a fresh
  process hands them back to the OS and faults them in again for every image, a third more
  CPU per image than in a long-lived process (docs/performance.md, "Input pipeline")."""
  del worker_count
  _worker["index"] = worker_index
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                   name="rma-parent-watch").start()
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # not glibc: its allocator's defaults
    return
  mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep up to 256 MiB of freed memory
  mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: buffers up to 32 MiB (a batch) from the heap


# What a preemption or Ctrl-C sends to a whole process group.
_GROUP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_END = object()


def _start_unkillable(batches: Iterator[Any]) -> Iterator[Any]:
  """``batches`` (a pipeline with worker processes, not started yet), its first element
  fetched while this thread blocks SIGTERM and SIGINT.

  That first ``next`` creates the Grain threads that spawn the worker processes; a thread
  inherits its creator's signal mask and a spawned process its spawning thread's, so each
  worker starts with both signals blocked until ``_init_worker`` ignores them. A signal to the
  whole process group while a worker starts (seconds of imports) cannot kill it: a worker that
  died before it had read its arguments would block the pipeline for ever (CPython's spawn
  writes them into a pipe whose read end it holds open itself until the write is done). The
  signal still reaches this process: another thread takes it, or this one once the first
  batch is in, and Python runs the handler in the main thread."""
  # Started before: launching Python's resource tracker unblocks both in the launching thread.
  multiprocessing.resource_tracker.ensure_running()
  blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _GROUP_SIGNALS)
  try:
    first = next(batches, _END)
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
  if first is not _END:
    yield first
    yield from batches


def _exit_with_parent(parent: int, interval_s: float = 0.5) -> None:
  """Ends this worker once its parent has gone (re-parented: another parent id). Grain's
  worker waits for the parent's stop event, which a killed parent never sets."""
  while os.getppid() == parent:
    threading.Event().wait(interval_s)
  os._exit(0)  # pylint: disable=protected-access


def _images(fn: "_TrainBatch | _EvalBatch", shape: tuple[int, ...]
            ) -> tuple[np.ndarray, np.ndarray | _Shared]:
  """(array to write a batch's images into, what the batch carries): a worker's reused
  block, or a plain array when no worker processes run."""
  if fn.blocks is None:
    image = np.empty(shape, np.uint8)
    return image, image
  return fn.blocks.array(shape, np.uint8)


def _read(source: Source, index: int, bad: dict[int, str]) -> dict[str, Any] | None:
  try:
    return source.read(index)
  except BadImageError as e:
    bad[index] = str(e)
    return None


class _TrainBatch:
  """step -> this process's rows of the global batch at ``step`` (a Grain map function,
  pickled into the worker processes)."""

  def __init__(self, source: Source, *, global_batch_size: int, local_batch_size: int,
               process_index: int, seed: int, image_size: int, crop_size: int,
               random_flip: bool):
    self.source, self.g, self.b, self.pi = source, global_batch_size, local_batch_size, \
        process_index
    self.seed, self.image_size, self.crop_size = seed, image_size, crop_size
    self.random_flip = random_flip
    self.steps_per_epoch = len(source) // global_batch_size
    self.blocks: _WorkerBlocks | None = None
    self._perm: tuple[int, np.ndarray] | None = None  # the current epoch's only (memory)

  def indices(self, step: int) -> tuple[int, np.ndarray]:
    """(epoch, this process's source indices) of ``step``."""
    epoch, k = divmod(step, self.steps_per_epoch)
    if self._perm is None or self._perm[0] != epoch:
      self._perm = (epoch, epoch_permutation(self.seed, epoch, len(self.source)))
    g = self._perm[1][k * self.g:(k + 1) * self.g]
    return epoch, g[self.pi * self.b:(self.pi + 1) * self.b]

  def _load(self, index: int, epoch: int, bad: dict[int, str]):
    n = len(self.source)
    for j in range(n):  # The next readable example stands in for a bad one.
      i = (index + j) % n
      ex = _read(self.source, i, bad)
      if ex is None:
        continue
      rng = np.random.default_rng([self.seed, epoch, i])
      image = preprocess.train_transform(ex["image"], rng, self.image_size, self.crop_size,
                                         random_flip=self.random_flip)
      return image, ex["labels"]
    raise RuntimeError(f"{self.source.name}: no readable example at all ({len(bad)} tried)")

  def __call__(self, step: int) -> dict[str, Any]:
    epoch, idx = self.indices(int(step))
    bad: dict[int, str] = {}
    image, carried = _images(self, (self.b, self.crop_size, self.crop_size, 3))
    labels = np.empty((self.b, self.source.num_classes), np.float32)
    for row, i in enumerate(idx):
      image[row], labels[row] = self._load(int(i), epoch, bad)
    return {"image": carried, "labels": labels, "mask": np.ones((self.b,), np.float32),
            _BAD: bad}


def train_batches(source: Source, *, global_batch_size: int, image_size: int, crop_size: int,
                  seed: int, start_step: int = 0, num_workers: int = 0,
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
    num_workers: worker processes decoding batches (0: in the calling thread).
    process_index, process_count: override ``jax.process_index()/process_count()`` (tests).
    random_flip: random horizontal flips (the paper); off for chiral classes (digits).

  Yields:
    dict with ``image`` uint8 (b, crop, crop, 3), ``labels`` float32 (b, C), ``mask`` float32
    (b,) ones, where b = G / process_count. Images without labels are kept (the loss masks them).
  """
  pi, _, b = _process_layout(global_batch_size, process_index, process_count)
  if len(source) < global_batch_size:
    raise ValueError(f"{source.name}: {len(source)} examples is fewer than one global batch "
                     f"of {global_batch_size}")
  fn = _TrainBatch(source, global_batch_size=global_batch_size, local_batch_size=b,
                   process_index=pi, seed=seed, image_size=image_size, crop_size=crop_size,
                   random_flip=random_flip)
  reported = source.skipped.count
  batches = _iterate(fn, range(start_step, sys.maxsize), source, num_workers)
  for step, batch in enumerate(batches, start_step):
    if step > start_step and step % fn.steps_per_epoch == 0 and source.skipped.count > reported:
      logger.warning("end of epoch %d: %s", step // fn.steps_per_epoch - 1,
                     source.skipped.summary())
      reported = source.skipped.count
    yield batch


class _EvalBatch:
  """batch number -> this process's rows of that global batch, padded (a Grain map
  function)."""

  def __init__(self, source: Source, *, global_batch_size: int, local_batch_size: int,
               process_index: int, image_size: int, max_boxes: int):
    self.source, self.g, self.b, self.pi = source, global_batch_size, local_batch_size, \
        process_index
    self.image_size, self.max_boxes = image_size, max_boxes
    self.blocks: _WorkerBlocks | None = None

  def __call__(self, g: int) -> dict[str, Any]:
    n, c, b, m_max = len(self.source), self.source.num_classes, self.b, self.max_boxes
    size = self.image_size
    image, carried = _images(self, (b, size, size, 3))
    batch = dict(image=carried, labels=np.zeros((b, c), np.float32),
                 difficult=np.zeros((b, c), bool),
                 mask=np.zeros((b,), np.float32), index=np.full((b,), -1, np.int32),
                 boxes=np.zeros((b, m_max, 4), np.float32),
                 box_labels=np.full((b, m_max), -1, np.int32), id=[""] * b)
    bad: dict[int, str] = {}
    first = int(g) * self.g + self.pi * b
    for row, pos in enumerate(range(first, min(first + b, n))):
      ex = _read(self.source, pos, bad)
      if ex is None:
        image[row] = 0
        continue
      m = min(len(ex["box_labels"]), m_max)
      image[row] = preprocess.eval_transform(ex["image"], size)
      batch["labels"][row] = ex["labels"]
      batch["difficult"][row] = ex["difficult"]
      batch["mask"][row] = 1.0
      batch["index"][row] = pos
      batch["boxes"][row, :m] = ex["boxes"][:m]
      batch["box_labels"][row, :m] = ex["box_labels"][:m]
      batch["id"][row] = ex["id"]
    image[max(0, min(b, n - first)):] = 0  # padding
    batch[_BAD] = bad
    return batch


def eval_batches(source: Source, *, global_batch_size: int, image_size: int,
                 num_workers: int = 0, max_boxes: int = 16,
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
    num_workers: worker processes decoding batches (0: in the calling thread).
    max_boxes: Mmax, boxes per image kept (fixed so shapes never change; extra boxes of
      crowded images are dropped, in annotation order).
    process_index, process_count: override the JAX process layout (tests).

  Yields:
    dict with ``image`` uint8 (b, size, size, 3), ``labels`` float32 (b, C), ``difficult``
    bool (b, C), ``mask`` float32 (b,), ``index`` int32 (b,), ``boxes`` float32 (b, Mmax, 4),
    ``box_labels`` int32 (b, Mmax) (-1 = no box), and ``id`` (a list of b str; '' for padding).
  """
  pi, _, b = _process_layout(global_batch_size, process_index, process_count)
  num_batches = -(-len(source) // global_batch_size)
  fn = _EvalBatch(source, global_batch_size=global_batch_size, local_batch_size=b,
                  process_index=pi, image_size=image_size, max_boxes=max_boxes)
  yield from _iterate(fn, range(num_batches), source, num_workers)
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


def map_in_workers(fn: Callable[[int], Any], n: int, num_workers: int = 0) -> Iterator[Any]:
  """``fn(0), ..., fn(n - 1)``, in order, for inputs that are no :class:`Source` (the files
  ``rma_jax.predict`` labels): in ``num_workers`` worker processes set up as the batch
  iterators' (``fn`` is pickled into them; what it returns comes back pickled, without shared
  memory), or in the calling thread with 0. Close the iterator to stop the workers early."""
  return _map(fn, range(n), num_workers, min_shm_size=sys.maxsize)
