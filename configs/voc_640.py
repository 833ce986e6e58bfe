r"""VOC 2007 at the paper's second scale, N = 640 (crop 576).

    python -m rma_jax.main --config=configs/voc_640.py --workdir=runs/voc640

Two-scale fusion (Table 6): evaluate either run with ``--config.eval.scales='(512, 640)'``.
"""

from configs import voc


def get_config():
  c = voc.get_config()
  c.data.image_size = 640
  c.data.crop_size = 576
  c.eval.scales = (640,)
  return c
