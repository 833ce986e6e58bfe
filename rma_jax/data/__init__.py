"""The input pipeline: data sources, preprocessing and batch iterators (SPEC §3, §5).

Importing this package never imports TensorFlow or TFDS; only opening a TFDS source does.

  sources = get_sources(config.data, seed=config.seed)          # train / val / test Sources
  it = train_batches(sources.train, global_batch_size=16, image_size=512, crop_size=448,
                     seed=0, start_step=step)
  for batch in device_put_batches(it, NamedSharding(mesh, P('data'))):
    images = normalize(batch['image'], 'caffe')                 # inside the jitted step
"""

from rma_jax.data.decode import BadImageError, decode_image
from rma_jax.data.preprocess import eval_transform, normalize, train_transform
from rma_jax.data.pipeline import device_put_batches, epoch_permutation, eval_batches, train_batches
from rma_jax.data.sources import (BadExampleError, RecordSource, SkipReport, Source, Sources,
                                  get_sources, held_out_split)

__all__ = [
    "BadExampleError", "BadImageError", "RecordSource", "SkipReport", "Source", "Sources",
    "decode_image", "device_put_batches", "epoch_permutation", "eval_batches",
    "eval_transform", "get_sources", "held_out_split", "normalize", "train_batches",
    "train_transform",
]
