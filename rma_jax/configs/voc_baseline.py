r"""Stage 1 of the two-step recipe on VOC 2007: the VGG-16 baseline (global pooling + linear
head, docs/design.md §1) fine-tuned from ImageNet weights with the paper's loss.

    python -m rma_jax.pretrained --from=keras vgg16_weights_tf_dim_ordering_tf_kernels.h5 \
        --out=weights/vgg16_keras
    python -m rma_jax.main --config=configs/voc_baseline.py --workdir=runs/voc_baseline \
        --config.init.pretrained=weights/vgg16_keras

The recipe is ``rma_jax.run.stage1_config`` of configs/voc.py with 20 stage-1 epochs, the
same one ``configs/voc.py --config.stage1.num_epochs=20`` runs as its first stage: the
paper's Adam recipe shortened to 20 epochs (lr 1e-5, divided by 10 after 13.3 epochs, the
paper's 30 of 45).
"""

from rma_jax.configs import default, voc
from rma_jax import run


def get_config(arg=None):
  c = voc.get_config()
  c.stage1.num_epochs = 20
  return default.apply_arg(run.stage1_config(c), arg)
