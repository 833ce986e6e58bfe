r"""Stage 1 on COCO 2014: the VGG-16 baseline fine-tuned from ImageNet weights.

    python -m rma_jax.main --config=configs/coco_baseline.py --workdir=runs/coco_baseline \
        --config.init.pretrained=weights/vgg16_keras

The recipe is ``rma_jax.run.stage1_config`` of configs/coco.py with 20 stage-1 epochs (see
configs/voc_baseline.py).
"""

from rma_jax.configs import default, coco
from rma_jax import run


def get_config(arg=None):
  c = coco.get_config()
  c.stage1.num_epochs = 20
  return default.apply_arg(run.stage1_config(c), arg)
