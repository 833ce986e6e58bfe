"""The two models on a trunk: the paper's ``RMA`` and the pooled ``Baseline`` (docs/design.md §1).

Each takes a trunk built once and handed in (``models.VGG16``, or any module whose
``trunk(images)`` is a (B, h, w, C) map and whose ``stride`` says how many input pixels a
cell of it spans; docs/architecture.md, "Add a trunk"), normalises uint8 images to its
``pixel_convention`` as its first operation, and has the two methods evaluation uses:
``features(images) -> map`` and ``classify(map, return_features) -> {'scores', ...}``.
``model(images)`` is ``classify(features(images))``.

Parameter trees: ``RMA``: ``trunk/…`` and ``attention/cell/…``; ``Baseline``: the trunk's
own parameters at the top level (``conv1_1`` … for VGG-16) and ``head``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rma_jax import pixels
from rma_jax.models.attention import AttentionSettings, RecurrentAttention, output_dtype
from rma_jax.models.vgg import VGG16

POOLS = ("avg", "max")

HEAD_PARAMS = ("head", "attention")
"""The top-level parameter names of the heads' own layers (``Baseline``'s classifier,
``RMA``'s attention module); every other top-level entry belongs to the trunk."""


def trunk_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
  """The trunk's part of a ``Baseline`` or ``RMA`` parameter tree, and where it sits:
  ``(params['trunk'], ('trunk',))`` for RMA, ``({everything but 'head'}, ())`` for the
  baseline, whose trunk parameters are its top level."""
  if "trunk" in params and "attention" in params:
    return dict(params["trunk"]), ("trunk",)
  return {k: v for k, v in params.items() if k not in HEAD_PARAMS}, ()


def is_trunk_param(path: Sequence[Any]) -> bool:
  """Whether a parameter (its ``jax.tree_util`` key path in a ``Baseline`` or ``RMA`` tree)
  is the trunk's."""
  return str(getattr(path[0], "key", path[0])) not in HEAD_PARAMS


class Baseline(nn.Module):
  """A trunk, global pooling and a linear multi-label classifier: the baseline of the
  paper's tables and stage 1 of its recipe.

  Attributes:
    trunk: the trunk module; its parameters are this model's top level (``nn.share_scope``),
      so a VGG-16 baseline's tree is VGG-16's plus ``head``.
    num_classes: C.
    pool: global pooling of the map before the classifier, 'avg' or 'max'.
    pixel_convention: the normalisation of uint8 input images (``rma_jax.pixels``); None:
      the images are normalised already.
  """
  trunk: nn.Module
  num_classes: int
  pool: str = "avg"
  pixel_convention: str | None = None

  @property
  def stride(self) -> int:
    """Input pixels per cell of the trunk's feature map."""
    return self.trunk.stride

  def setup(self):
    if self.pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
    nn.share_scope(self, self.trunk)
    self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.xavier_uniform())

  def __call__(self, images: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """(B, H, W, 3) images -> ``classify(features(images))``."""
    return self.classify(self.features(images), return_features)

  def features(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) images -> the trunk's (B, h, w, C') map."""
    return self.trunk(pixels.normalize(images, self.pixel_convention))

  def classify(self, fmap: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """Global ``pool`` pooling of (B, h, w, C') maps, then the linear layer.

    Returns:
      ``scores`` (B, num_classes) (float32; float64 for a float64 trunk); with
      ``return_features`` also ``features`` (B, C'), the pooled map (the SVM head's input).
    """
    pool = jnp.max if self.pool == "max" else jnp.mean
    pooled = pool(fmap.astype(output_dtype(fmap.dtype)), axis=(1, 2))
    out = {"scores": self.head(pooled)}
    if return_features:
      out["features"] = pooled
    return out


class RMA(AttentionSettings):
  """A trunk and the recurrent memorized-attention module: the paper's model.

  Attributes:
    num_classes, num_regions, ..., dtype, dense: the attention settings,
      ``models.attention.AttentionSettings``.
    trunk: the trunk module; None builds the paper's, ``VGG16(width=width, dtype=dtype,
      remat=remat, init_scheme=trunk_init)``.
    width, remat, trunk_init: that default VGG-16's settings (set them on ``trunk`` when
      handing one in).
    pixel_convention: the normalisation of uint8 input images (``rma_jax.pixels``); None:
      the images are normalised already.
  """
  trunk: nn.Module | None = None
  width: int = 1
  remat: bool = False
  trunk_init: str = "he"
  pixel_convention: str | None = None

  @property
  def stride(self) -> int:
    """Input pixels per cell of the trunk's feature map."""
    return (VGG16 if self.trunk is None else self.trunk).stride

  def setup(self):
    if self.trunk is None:
      self.backbone = VGG16(width=self.width, dtype=self.dtype, remat=self.remat,
                            init_scheme=self.trunk_init, name="trunk")
    elif (self.width, self.remat, self.trunk_init) != (1, False, "he"):
      raise ValueError("RMA's width, remat and trunk_init configure its default VGG-16 trunk; "
                       "with a trunk handed in, set them on that trunk")
    else:
      self.backbone = self.trunk
    self.attention = RecurrentAttention(**self.attention_settings())

  def __call__(self, images: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """Scores a batch of images: ``attend(features(images))``.

    Args:
      images: (B, H, W, 3) images, uint8 with a ``pixel_convention``; H and W multiples of
        the trunk's stride.
      return_features: also return the per-region hidden features ``z``.

    Returns:
      ``scores`` (B, C) category-wise max over regions; ``region_scores`` (B, K, C);
      ``theta`` (B, K+1, 4), index 0 the identity and index k the transform of region k;
      with ``return_features``, ``z`` (B, K, z_dim). Scores and theta are float32 (float64
      in a float64 model).
    """
    return self.attend(self.features(images), return_features)

  def features(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) images -> the trunk's (B, h, w, C') map (conv5_3 for VGG-16)."""
    return self.backbone(pixels.normalize(images, self.pixel_convention))

  def attend(self, features: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """Runs the attention module on (B, h, w, C') maps; returns as ``__call__``."""
    return self.attention(features, return_features)

  def classify(self, fmap: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """Everything after the trunk, with the interface of ``Baseline.classify``.

    Returns:
      ``scores`` (B, C), ``region_scores`` (B, K, C), ``theta`` (B, K+1, 4); with
      ``return_features`` also ``features`` (B, z_dim): the region features ``z``
      max-pooled over the K regions (the SVM head's input).
    """
    out = dict(self.attend(fmap, return_features))
    if return_features:
      out["features"] = jnp.max(out.pop("z"), axis=1)
    return out
