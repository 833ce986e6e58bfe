r"""VOC 2007 at the paper's second scale, N = 640 (crop 576).

    python -m rma_jax.main --config=configs/voc_640.py --workdir=runs/voc640

Two-scale fusion as in the paper (§5.1, Table 6), with the N = 512 run of configs/voc.py:

    python -m rma_jax.main --mode=fuse --fuse_workdirs=runs/voc512,runs/voc640 \
        --workdir=runs/fused

(``--config.eval.scales='(512, 640)'`` instead evaluates one checkpoint at both sizes.)
"""

from rma_jax.configs import default, voc


def get_config(arg=None):
  c = voc.get_config()
  c.data.image_size = 640
  c.data.crop_size = 576
  c.eval.scales = (640,)
  return default.apply_arg(c, arg)
