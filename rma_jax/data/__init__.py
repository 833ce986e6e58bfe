"""The input pipeline: data sources, preprocessing and batch iterators (docs/data.md).

Importing this package never imports TensorFlow or TFDS; only opening a TFDS source does.

  sources = get_sources(config.data, seed=config.seed)          # train / val / test Sources
  it = train_batches(sources.train, global_batch_size=16, image_size=512, crop_size=448,
                     seed=0, start_step=step)
  for batch in device_put_batches(it, NamedSharding(mesh, P('data'))):
    state, metrics = step(state, batch)                        # uint8 images: the model
                                                               # normalises them

Modules: ``source`` (the types), ``voc`` / ``coco`` / ``imagelist`` / ``tfds_source`` /
``demo`` (the layouts), ``classes`` (class lists and the run's record), ``factory``
(``get_sources``: config -> checked Sources), ``decode``, ``preprocess``, ``pipeline``.
"""

from rma_jax.data.classes import (BUILTIN_CLASSES, RUN_CLASSES_FILE, load_run_classes,
                                  save_run_classes)
from rma_jax.data.decode import BadImageError, decode_image
from rma_jax.data.factory import SOURCES, config_errors, get_sources
from rma_jax.data.preprocess import eval_transform, train_transform
from rma_jax.data.pipeline import device_put_batches, epoch_permutation, eval_batches, train_batches
from rma_jax.data.source import (BadExampleError, DataError, RecordSource, SkipReport, Source,
                                 Sources, held_out_split, make_record)

__all__ = [
    "BUILTIN_CLASSES", "BadExampleError", "BadImageError", "DataError", "RUN_CLASSES_FILE",
    "RecordSource", "SOURCES", "SkipReport", "Source", "Sources", "config_errors",
    "decode_image", "device_put_batches", "epoch_permutation", "eval_batches",
    "eval_transform", "get_sources", "held_out_split", "load_run_classes", "make_record",
    "save_run_classes", "train_batches", "train_transform",
]
