r"""MS-COCO 2014 on a ResNet-101 trunk at 448² (beyond the paper; docs/design.md §7): the
recipe of configs/voc_resnet101.py on configs/coco.py's data and metrics.

    python -m rma_jax.pretrained --from=torch resnet101-63fe2227.pth --out=weights/resnet101
    python -m rma_jax.main --config=configs/coco_resnet101.py --workdir=runs/coco_resnet101 \
        --config.init.pretrained=weights/resnet101

Both stages in one command (stage 1: the ResNet-101 baseline, 20 epochs; stage 2: the
attention model, 30 epochs); see configs/voc_resnet101.py for the recipe and the weights.
``--config=configs/coco_resnet101.py:tiny`` is the same run in seconds.
"""

from rma_jax.configs import coco, default, voc_resnet101


def get_config(arg=None):
  return default.apply_arg(voc_resnet101.resnet101_recipe(coco.get_config()), arg)
