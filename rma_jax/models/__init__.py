"""The models: trunks (``vgg``, ``resnet``), the recurrent attention module (``attention``)
and the two models built on a trunk (``heads``): the paper's ``RMA`` and the pooled
``Baseline``.

    trunk = models.VGG16(width=8)    # or models.ResNet(depth=101, output_stride=16)
    model = models.RMA(trunk=trunk, num_classes=20, num_regions=5)  # trunk=None: VGG-16
    out = model.apply(variables, images)  # scores (B, C), region_scores, theta (B, K+1, 4)

Plain Flax: the platform-specific kernels (``rma_jax.kernels``) are building blocks a model
can be given (``VGG16.block``, ``RMA.dense``), never named here. From a config:
``rma_jax.build.build_model``.
"""

from rma_jax.models.attention import (ATTENTION_FIELDS, DEFAULT_THETA_BIAS, REGION_POOLS,
                                      AttentionCell, AttentionSettings, RecurrentAttention,
                                      anchor_step_offsets, fixed_region_thetas,
                                      output_dtype)
from rma_jax.models.heads import (HEAD_PARAMS, POOLS, RMA, Baseline, is_trunk_param,
                                  trunk_params)
from rma_jax.models.resnet import (BN_MODES, BN_STATS, OUTPUT_STRIDES, RESNET_DEPTHS,
                                   BatchNorm, Bottleneck, ResNet, is_batch_stat,
                                   merge_batch_stats)
from rma_jax.models.vgg import (TRUNK_INITS, VGG16, VGG16_BLOCKS, VGG16_STRIDE, ConvBlock,
                                dirac_init, vgg16_layer_names)

__all__ = [
    "ATTENTION_FIELDS", "AttentionCell", "AttentionSettings", "BN_MODES", "BN_STATS",
    "Baseline", "BatchNorm", "Bottleneck", "ConvBlock", "DEFAULT_THETA_BIAS", "HEAD_PARAMS",
    "OUTPUT_STRIDES", "POOLS", "REGION_POOLS", "RESNET_DEPTHS", "RMA", "RecurrentAttention",
    "ResNet", "TRUNK_INITS", "VGG16", "VGG16_BLOCKS", "VGG16_STRIDE", "anchor_step_offsets",
    "dirac_init", "fixed_region_thetas", "is_batch_stat", "is_trunk_param",
    "merge_batch_stats", "output_dtype", "trunk_params", "vgg16_layer_names",
]
