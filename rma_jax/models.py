"""VGG-16 trunk and the recurrent memorized-attention model (SPEC §1).

Parameter trees (``width`` divides every channel count; ``width=1`` is the real VGG-16):

* ``VGG16``: ``conv1_1 … conv5_3`` (each ``kernel`` (3, 3, in, out) and ``bias``), and with
  ``num_classes`` set, ``head`` (the baseline's linear classifier after global pooling).
* ``RMA``: ``trunk`` (a ``VGG16`` without head) and ``attention/cell`` with ``fc6`` (W_fx,
  the shape of VGG fc6 on a 7x7x512 input, flattened in (h, w, c) order), ``lstm_x``,
  ``lstm_h`` (gates in the order i, g (forget), o, m), ``hz``, ``zs`` and ``zm``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rma_jax import conv, ops

Dtype = Any

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
"""Output channels of each conv layer of VGG-16, block by block (conv1_1 … conv5_3)."""

VGG16_STRIDE = 16
"""conv5_3 is 16x smaller than the input (four 2x2 max-pools; pool5 is dropped)."""

# Default start box of every predicted region: centred, half the map's width and height,
# i.e. exactly on the scale constraint's threshold alpha = 0.5 (SPEC §2). The anchor
# constraint then moves regions 2..K towards their anchors.
DEFAULT_THETA_BIAS = (0.5, 0.5, 0.0, 0.0)


_HE_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
TRUNK_INITS = ("he", "dirac")


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
    return identity + noise * _HE_INIT(key, shape, dtype)
  return init


def vgg16_layer_names() -> list[str]:
  """``['conv1_1', 'conv1_2', 'conv2_1', …, 'conv5_3']``."""
  return [f"conv{b + 1}_{i + 1}" for b, block in enumerate(VGG16_BLOCKS)
          for i in range(len(block))]


class VGG16(nn.Module):
  """VGG-16 convolutions conv1_1 … conv5_3 (stride 16, no pool5), optional baseline head.

  Attributes:
    width: divisor of every channel count (1 = real VGG-16, 14,714,688 conv parameters).
    num_classes: if set, global average pooling + a linear layer ``head`` give class
      scores (the baseline of SPEC §1.6); if ``None`` the conv5_3 map is returned.
    dtype: computation dtype (parameters stay float32), e.g. ``jnp.bfloat16``.
    remat: recompute each block's activations in the backward pass to save memory.
    head_pool: global pooling before the head, 'avg' or 'max'.
    init_scheme: initialisation of the convs when training from scratch: 'he' (He normal, as
      torchvision) or 'dirac' (:func:`dirac_init` for the 9 layers whose channel count does
      not change, He for the other 4), which trains a narrow trunk from scratch much
      more reliably. Irrelevant when ImageNet or stage-1 weights are loaded.
    conv_impl: algorithm of the 3x3 convs (``rma_jax.conv.Conv3x3``): 'xla' | 'patches' |
      'winograd' | 'auto' (on CPU: Winograd F(4x4, 3x3) when not differentiated, for layers
      with >= 64 input channels and enough work, and the matmul kernel gradient for maps
      >= 56x56; same parameters, and results equal to float32 rounding, either way).
  """
  width: int = 1
  num_classes: int | None = None
  dtype: Dtype = jnp.float32
  remat: bool = False
  head_pool: str = "avg"
  conv_impl: str = "auto"
  init_scheme: str = "he"

  def setup(self):
    if self.width < 1 or 64 % self.width:
      raise ValueError(f"width must divide 64, got {self.width}")
    if self.init_scheme not in TRUNK_INITS:
      raise ValueError(f"init_scheme must be one of {TRUNK_INITS}, got {self.init_scheme!r}")
    channels = [c // self.width for b in VGG16_BLOCKS for c in b]
    for name, cin, cout in zip(vgg16_layer_names(), [3] + channels[:-1], channels):
      # He init (as torchvision's VGG) keeps activations O(1) through 13 ReLU layers on
      # average; ImageNet or stage-1 weights replace it.
      init = dirac_init() if self.init_scheme == "dirac" and cin == cout else _HE_INIT
      # ReLU inside the conv: the Winograd forward applies it while writing its output.
      setattr(self, name, conv.Conv3x3(cout, dtype=self.dtype, param_dtype=jnp.float32,
                                       kernel_init=init, impl=self.conv_impl,
                                       activation=nn.relu, name=name))
    if self.num_classes is not None:
      self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.xavier_uniform(),
                           name="head")

  def _block(self, x: jax.Array, block: int) -> jax.Array:
    for i in range(len(VGG16_BLOCKS[block])):
      x = getattr(self, f"conv{block + 1}_{i + 1}")(x)  # ReLU included
    if block < 4:  # no pool5: conv5_3 keeps stride 16
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x

  def __call__(self, images: jax.Array) -> jax.Array:
    """Runs the trunk (and the head, if any).

    Args:
      images: (B, H, W, 3) normalised images; H and W multiples of 16.

    Returns:
      (B, H/16, W/16, 512/width) conv5_3 features in ``dtype``, or (B, num_classes)
      float32 scores when ``num_classes`` is set.
    """
    block_fn = type(self)._block
    if self.remat:
      block_fn = nn.remat(block_fn, static_argnums=(2,))
    x = images.astype(self.dtype)
    for block in range(len(VGG16_BLOCKS)):
      x = block_fn(self, x, block)
    if self.num_classes is None:
      return x
    pool = jnp.max if self.head_pool == "max" else jnp.mean
    return self.head(pool(x.astype(jnp.float32), axis=(1, 2)))


class AttentionCell(nn.Module):
  """One step k of the recurrent memorized-attention module (Eq. 2, 4, 5).

  Carry ``(c, h, theta)``: LSTM cell (B, hidden), hidden state (B, hidden), and the
  transform (B, 4) that samples this step's region. Returns the new carry and the step's
  ``(s_k, theta_k, z_k)``.
  """
  num_classes: int
  sample_size: int = 7
  x_dim: int = 4096
  hidden_dim: int = 512
  z_dim: int = 512
  standard_lstm: bool = False
  theta_bias: Sequence[float] = DEFAULT_THETA_BIAS
  theta_kernel_scale: float = 0.1
  fixed_regions: Sequence[Sequence[float]] | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, carry, step, features):
    c, h, theta = carry
    if self.fixed_regions is not None:
      # Control of the paper's Table 3: the same module, regions given instead of predicted.
      fixed = jnp.asarray(self.fixed_regions, jnp.float32)
      theta = jnp.broadcast_to(fixed[step], theta.shape)
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=nn.initializers.xavier_uniform())
    region = ops.sample_regions(features, theta[:, None, :], self.sample_size)[:, 0]
    x = nn.relu(dense(self.x_dim, name="fc6")(region.reshape(region.shape[0], -1)))
    gates = dense(4 * self.hidden_dim, name="lstm_x")(x) + dense(
        4 * self.hidden_dim, use_bias=False, name="lstm_h")(h.astype(self.dtype))
    i, g, o, m = jnp.split(gates.astype(jnp.float32), 4, axis=-1)
    c = jax.nn.sigmoid(g) * c + jax.nn.sigmoid(i) * jnp.tanh(m)
    # Eq. 4 has no tanh on the cell (h = o * c); the standard LSTM is behind a flag.
    h = jax.nn.sigmoid(o) * (jnp.tanh(c) if self.standard_lstm else c)
    z = nn.relu(dense(self.z_dim, name="hz")(h))
    s = dense(self.num_classes, name="zs")(z).astype(jnp.float32)
    xavier = nn.initializers.xavier_uniform()
    next_theta = dense(
        4, name="zm",
        kernel_init=lambda *a: self.theta_kernel_scale * xavier(*a),
        bias_init=lambda _, shape, dtype=jnp.float32: jnp.asarray(self.theta_bias, dtype).reshape(shape),
    )(z).astype(jnp.float32)
    return (c, h, next_theta), (s, theta, z.astype(jnp.float32))


class RecurrentAttention(nn.Module):
  """The K+1-step attention module over a conv5_3 map, scanned with ``nn.scan``.

  Attributes: as ``AttentionCell`` plus ``num_regions`` (K).
  """
  num_classes: int
  num_regions: int = 5
  sample_size: int = 7
  x_dim: int = 4096
  hidden_dim: int = 512
  z_dim: int = 512
  standard_lstm: bool = False
  theta_bias: Sequence[float] = DEFAULT_THETA_BIAS
  theta_kernel_scale: float = 0.1
  fixed_regions: Sequence[Sequence[float]] | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """Args: features (B, H, W, C). Returns the dict described in ``RMA.__call__``."""
    if self.num_regions < 1:
      raise ValueError(f"num_regions (K) must be >= 1, got {self.num_regions}")
    batch = features.shape[0]
    scan = nn.scan(AttentionCell, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=(0, nn.broadcast), out_axes=0, length=self.num_regions + 1)
    cell = scan(num_classes=self.num_classes, sample_size=self.sample_size, x_dim=self.x_dim,
                hidden_dim=self.hidden_dim, z_dim=self.z_dim, standard_lstm=self.standard_lstm,
                theta_bias=tuple(self.theta_bias), theta_kernel_scale=self.theta_kernel_scale,
                fixed_regions=(None if self.fixed_regions is None else
                               tuple(tuple(r) for r in self.fixed_regions)),
                dtype=self.dtype, name="cell")
    zeros = jnp.zeros((batch, self.hidden_dim), jnp.float32)
    theta0 = jnp.broadcast_to(jnp.asarray(ops.IDENTITY_THETA, jnp.float32), (batch, 4))
    _, (s, theta, z) = cell((zeros, zeros, theta0), jnp.arange(self.num_regions + 1), features)
    # Step 0 only looks at the whole map to place region 1; its score is dropped (Eq. 5).
    region_scores = jnp.swapaxes(s[1:], 0, 1)  # (B, K, C)
    out = {
        "scores": jnp.max(region_scores, axis=1),  # category-wise max pooling, Eq. 6
        "region_scores": region_scores,
        "theta": jnp.swapaxes(theta, 0, 1),  # (B, K+1, 4); [:, 0] is the identity
    }
    if return_features:
      out["z"] = jnp.swapaxes(z[1:], 0, 1)  # (B, K, z_dim)
    return out


class RMA(nn.Module):
  """VGG-16 trunk + recurrent memorized-attention module (the paper's model).

  Attributes:
    num_classes: C.
    num_regions: K, the number of attentional regions (the module runs K+1 steps).
    sample_size: S, regions are sampled to S x S (7 matches VGG fc6 for ``W_fx``).
    width: trunk channel divisor (1 = real VGG-16).
    x_dim, hidden_dim, z_dim: sizes of x_k (4096 = fc6), the LSTM state and z_k.
    standard_lstm: ``h = o * tanh(c)`` instead of the paper's ``h = o * c``.
    theta_bias: initial ``b_m`` = (sx, sy, tx, ty) every predicted region starts near.
    theta_kernel_scale: multiplies the Xavier init of ``W_zm`` so early regions stay near
      ``theta_bias`` instead of jumping around while the LSTM is untrained.
    fixed_regions: optional (K+1, 4) transforms used instead of the predicted ones.
    dtype: computation dtype (parameters float32).
    remat: rematerialise the trunk's blocks in the backward pass.
    conv_impl: the trunk's 3x3 conv algorithm, see ``VGG16.conv_impl``.
    trunk_init: the trunk's from-scratch initialisation, see ``VGG16.init_scheme``.
  """
  num_classes: int
  num_regions: int = 5
  sample_size: int = 7
  width: int = 1
  x_dim: int = 4096
  hidden_dim: int = 512
  z_dim: int = 512
  standard_lstm: bool = False
  theta_bias: Sequence[float] = DEFAULT_THETA_BIAS
  theta_kernel_scale: float = 0.1
  fixed_regions: Sequence[Sequence[float]] | None = None
  dtype: Dtype = jnp.float32
  remat: bool = False
  conv_impl: str = "auto"
  trunk_init: str = "he"

  def setup(self):
    self.trunk = VGG16(width=self.width, dtype=self.dtype, remat=self.remat,
                       conv_impl=self.conv_impl, init_scheme=self.trunk_init)
    self.attention = RecurrentAttention(
        num_classes=self.num_classes, num_regions=self.num_regions,
        sample_size=self.sample_size, x_dim=self.x_dim, hidden_dim=self.hidden_dim,
        z_dim=self.z_dim, standard_lstm=self.standard_lstm, theta_bias=self.theta_bias,
        theta_kernel_scale=self.theta_kernel_scale, fixed_regions=self.fixed_regions,
        dtype=self.dtype)

  def __call__(self, images: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """Scores a batch of images.

    Args:
      images: (B, H, W, 3) normalised images; H and W multiples of 16.
      return_features: also return the per-region hidden features ``z``.

    Returns:
      ``scores`` (B, C) category-wise max over regions; ``region_scores`` (B, K, C);
      ``theta`` (B, K+1, 4), index 0 the identity and index k the transform of region k;
      with ``return_features``, ``z`` (B, K, z_dim). Scores and theta are float32.
    """
    return self.attend(self.features(images), return_features)

  def features(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) images -> (B, H/16, W/16, 512/width) conv5_3 map."""
    return self.trunk(images)

  def attend(self, features: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """Runs the attention module on (B, h, w, C) conv5_3 maps; returns as ``__call__``."""
    return self.attention(features, return_features)


def fixed_region_thetas(num_regions: int, scale: float = 0.5) -> np.ndarray:
  """(K+1, 4) transforms for the fixed-regions control: step 0 the identity, region 1 the
  centre box and regions 2..K boxes at the anchor points, all of half-size ``scale``."""
  from rma_jax.losses import anchor_points  # local: losses imports nothing from models
  centres = np.concatenate([np.zeros((1, 2)), np.asarray(anchor_points(num_regions))], axis=0)
  thetas = [ops.IDENTITY_THETA] + [(scale, scale, float(cx), float(cy)) for cx, cy in centres]
  return np.asarray(thetas, np.float32)
