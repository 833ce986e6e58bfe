r"""COCO 2014 at N = 640 (crop 576).

    python -m rma_jax.main --config=configs/coco_640.py --workdir=runs/coco640
"""

from rma_jax.configs import coco, default


def get_config(arg=None):
  c = coco.get_config()
  c.data.image_size = 640
  c.data.crop_size = 576
  c.eval.scales = (640,)
  return default.apply_arg(c, arg)
