r"""PASCAL VOC 2007 on a ResNet-101 trunk at 448² (beyond the paper; docs/design.md §7): the
attention module on the backbone the multi-label literature compares on (ML-GCN, ADD-GCN,
Query2Label at 448²).

    python -m rma_jax.pretrained --from=torch resnet101-63fe2227.pth --out=weights/resnet101
    python -m rma_jax.main --config=configs/voc_resnet101.py --workdir=runs/voc_resnet101 \
        --config.init.pretrained=weights/resnet101

The weights: torchvision's ImageNet ResNet-101 (V1 ``resnet101-63fe2227.pth`` or V2
``resnet101-cd907fc2.pth``, from download.pytorch.org/models; docs/pretrained.md), pixels
normalised as torchvision's (``data.pixel_convention='torch'``).

The recipe (``resnet101_recipe``; a starting point, not tuned here: no full-size run of it
was made): images resized to 512 and cropped to 448 (the layer4 map is 14 x 14 at stride 32),
batch norm frozen as loaded (batches of 16 are too small for its statistics), the region
features average-pooled over the S x S samples (``model.region_pool='avg'``, W_fx 2048 ->
2048). Both stages in one command (``stage1.num_epochs=20``): stage 1, the ResNet-101
baseline (global average pooling, a linear layer) trained with sigmoid cross-entropy; stage 2,
the attention model from it with the paper's loss. Adam, lr 1e-4 for the new layers and
1e-5 for the trunk (``optim.trunk_lr_multiplier=0.1``, as ML-GCN's 0.1), 30 epochs divided
by 10 after 20 (stage 1: 20 epochs, after 13.3). ``--config=configs/voc_resnet101.py:tiny``
is the same run in seconds (from scratch, so with batch norm fine-tuned).
"""

import ml_collections

from rma_jax.configs import default, voc


def resnet101_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ResNet-101 trunk, its weights' pixels and the recipe above, on a paper config."""
  c.model.trunk = "resnet101"
  c.model.resnet_stride = 32
  c.model.bn = "frozen"
  c.model.region_pool = "avg"
  c.model.x_dim = 2048
  c.data.image_size = 512
  c.data.crop_size = 448
  c.data.pixel_convention = "torch"
  c.eval.scales = (512,)
  c.optim.learning_rate = 1e-4
  c.optim.trunk_lr_multiplier = 0.1
  c.optim.num_epochs = 30
  c.optim.decay_epochs = (20,)
  c.stage1.num_epochs = 20
  c.stage1.learning_rate = 1e-4
  c.stage1.classification = "sigmoid_bce"
  return c


def get_config(arg=None):
  return default.apply_arg(resnet101_recipe(voc.get_config()), arg)
