r"""Stage 1 on COCO 2014: the VGG-16 baseline fine-tuned from ImageNet weights.

    python -m rma_jax.main --config=configs/coco_baseline.py --workdir=runs/coco_baseline \
        --config.init.pretrained=weights/vgg16_keras
"""

from rma_jax.configs import coco, default


def get_config(arg=None):
  c = coco.get_config()
  c.model.name = "baseline"
  c.optim.num_epochs = 20
  c.optim.decay_epochs = (15,)
  return default.apply_arg(c, arg)
