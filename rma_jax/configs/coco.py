r"""MS-COCO 2014 at the paper's settings: N = 512, train on train2014 (82,081 images), test on
val2014 (40,137), CP/CR/CF1/OP/OR/OF1 from the top-3 labels with score >= 0.5.

    python -m rma_jax.main --config=configs/coco.py --workdir=runs/coco512 \
        --config.init.pretrained=weights/vgg16_keras

Data: TFDS ``coco/2014`` (prepare once: ``tfds build coco/2014``; ~38 GB download) or a local
COCO tree (``--config.data.source=local --config.data.data_dir=PATH`` holding
``annotations/instances_{train,val}2014.json`` and ``train2014/``, ``val2014/``).
"""

from rma_jax.configs import default


def get_config(arg=None):
  c = default.get_config()
  c.data.name = "coco2014"
  c.data.train_split = "train"
  c.data.test_split = "val"
  c.eval.ap_mode = "all"
  c.eval.top_k = 3
  c.eval.threshold = 0.5
  c.eval.batch_size = 32
  return default.apply_arg(c, arg)
