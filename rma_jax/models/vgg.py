"""VGG-16's convolutions, the paper's trunk (docs/design.md §1).

``VGG16`` is the trunk: ``VGG16(...)(images)`` is the conv5_3 map, stride 16, 512 / width
channels. Its blocks are a building block passed in (``block``, default ``ConvBlock``: 3x3
convolutions with ReLU, then a 2x2 max pool), as flax ``examples/imagenet`` passes its
``block_cls``: platform-specific kernels (``rma_jax.kernels``) plug in there with the same
parameters. Parameter tree (``width`` divides every channel count; 1 is the real VGG-16):
``conv1_1 … conv5_3``, each ``kernel`` (3, 3, in, out) and ``bias``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ModuleDef = Any

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
"""Output channels of each conv layer of VGG-16, block by block (conv1_1 … conv5_3)."""

VGG16_STRIDE = 16
"""conv5_3 is 16x smaller than the input (four 2x2 max-pools; pool5 is dropped)."""

TRUNK_INITS = ("he", "dirac")

def relu(x: jax.Array) -> jax.Array:
  """``nn.relu``; for bfloat16 on the CPU taken in float32 (exact: ReLU only selects).

  XLA:CPU of jaxlib 0.12 fuses two or more bfloat16 convolutions, each with a bf16
  ``max(z, 0)``, followed by a reduction (the max pool, a mean) into NaN/inf; a float32 ReLU
  is not fused so. Other platforms (and float32) run ``nn.relu`` itself."""
  if x.dtype != jnp.bfloat16:
    return nn.relu(x)
  return jax.lax.platform_dependent(
      x, cpu=lambda v: nn.relu(v.astype(jnp.float32)).astype(v.dtype), default=nn.relu)


HE_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
"""He normal of the fan-out, as torchvision initialises its convolutions."""


def dirac_init(noise: float = 0.1) -> nn.initializers.Initializer:
  """A 3x3 kernel that starts as the identity map plus ``noise`` times a He-normal draw.

  For the layers of a from-scratch trunk whose input and output channel counts are equal:
  an identity conv passes a ReLU output (>= 0) through its own ReLU unchanged, so the
  untrained 13-layer VGG behaves like the 4 layers that change the channel count, which
  learn quickly; the identity layers learn from there (Dirac init, Zagoruyko & Komodakis
  2017; cf. VGG's own trick of initialising deep nets from shallow ones).
  """
  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    kh, kw, cin, cout = shape
    if cin != cout:
      raise ValueError(f"dirac_init needs equal input and output channels, got {shape}")
    identity = jnp.zeros(shape, dtype).at[kh // 2, kw // 2].set(jnp.eye(cin, dtype=dtype))
    return identity + noise * HE_INIT(key, shape, dtype)
  return init


def vgg16_layer_names() -> list[str]:
  """``['conv1_1', 'conv1_2', 'conv2_1', …, 'conv5_3']``."""
  return [f"conv{b + 1}_{i + 1}" for b, block in enumerate(VGG16_BLOCKS)
          for i in range(len(block))]


class ConvBlock(nn.Module):
  """One block of VGG: 3x3 'SAME' convolutions, each followed by ReLU, then, with ``pool``,
  a 2x2 max pool of stride 2.

  The block's convolutions are named by ``names`` and the trunk shares its scope with the
  block (``nn.share_scope``), so their parameters are the trunk's own ``conv1_1`` … A
  replacement (``rma_jax.kernels``) takes the same attributes and creates the same
  parameters.

  Attributes:
    features: the output channels of each convolution.
    names: their parameter names.
    kernel_inits: their kernel initialisers.
    pool: end with the max pool.
    dtype: computation dtype; parameters are float32.
  """
  features: Sequence[int]
  names: Sequence[str]
  kernel_inits: Sequence[Callable[..., jax.Array]]
  pool: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, features[-1]), or (B, H/2, W/2, features[-1]) with pool."""
    for features, name, init in zip(self.features, self.names, self.kernel_inits):
      x = relu(nn.Conv(features, (3, 3), padding=1, dtype=self.dtype,
                          param_dtype=jnp.float32, kernel_init=init, name=name)(x))
    if self.pool:
      x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    return x


class VGG16(nn.Module):
  """VGG-16's convolutions conv1_1 … conv5_3 (no pool5): the paper's trunk.

  A trunk: ``trunk(images)`` is the feature map the heads (``models.RMA``,
  ``models.Baseline``) work on; ``stride`` and ``channels`` describe it.

  Attributes:
    width: divisor of every channel count (1 = real VGG-16, 14,714,688 conv parameters).
    dtype: computation dtype (parameters stay float32), e.g. ``jnp.bfloat16``.
    remat: recompute each block's activations in the backward pass to save memory.
    init_scheme: initialisation of the convs when training from scratch: 'he' (He normal, as
      torchvision) or 'dirac' (``dirac_init`` for the 9 layers whose channel count does not
      change, He for the other 4), which trains a narrow trunk from scratch much more
      reliably. Irrelevant when ImageNet or stage-1 weights are loaded.
    block: the block of convolutions, ReLU and pooling (``ConvBlock``'s attributes).
  """
  width: int = 1
  dtype: Dtype = jnp.float32
  remat: bool = False
  init_scheme: str = "he"
  block: ModuleDef = ConvBlock

  stride: ClassVar[int] = VGG16_STRIDE

  @property
  def channels(self) -> int:
    """Channels of the feature map (conv5_3)."""
    return VGG16_BLOCKS[-1][-1] // self.width

  def setup(self):
    if self.width < 1 or 64 % self.width:
      raise ValueError(f"width must divide 64, got {self.width}")
    if self.init_scheme not in TRUNK_INITS:
      raise ValueError(f"init_scheme must be one of {TRUNK_INITS}, got {self.init_scheme!r}")
    block = nn.remat(self.block) if self.remat else self.block
    blocks, cin = [], 3
    for b, widths in enumerate(VGG16_BLOCKS):
      features = tuple(c // self.width for c in widths)
      # He init (as torchvision's VGG) keeps activations O(1) through 13 ReLU layers on
      # average; ImageNet or stage-1 weights replace it.
      inits = tuple(dirac_init() if self.init_scheme == "dirac" and i == o else HE_INIT
                    for i, o in zip((cin,) + features[:-1], features))
      names = tuple(f"conv{b + 1}_{i + 1}" for i in range(len(widths)))
      # Blocks 1-4 end in a 2x2 max pool; no pool5: conv5_3 keeps stride 16.
      blocks.append(block(features, names, inits, pool=b < len(VGG16_BLOCKS) - 1,
                          dtype=self.dtype))
      cin = features[-1]
    self.blocks = blocks
    for b in self.blocks:  # conv1_1 … conv5_3 are the trunk's own parameters
      nn.share_scope(self, b)

  def __call__(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) normalised images (H, W multiples of 16) -> (B, H/16, W/16, 512/width)
    conv5_3 map in ``dtype``."""
    x = images.astype(self.dtype)
    for block in self.blocks:
      x = block(x)
    return x
