r"""Stage 1 of the two-step recipe on VOC 2007: the VGG-16 baseline (global pooling + linear
head, SPEC §1.6) fine-tuned from ImageNet weights with the paper's loss.

    python -m rma_jax.pretrained --from=keras vgg16_weights_tf_dim_ordering_tf_kernels.h5 \
        --out=weights/vgg16_keras
    python -m rma_jax.main --config=configs/voc_baseline.py --workdir=runs/voc_baseline \
        --config.init.pretrained=weights/vgg16_keras
"""

from rma_jax.configs import default, voc


def get_config(arg=None):
  c = voc.get_config()
  c.model.name = "baseline"
  c.optim.num_epochs = 20
  c.optim.decay_epochs = (15,)
  return default.apply_arg(c, arg)
