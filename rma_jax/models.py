"""VGG-16 trunk and the recurrent memorized-attention model (docs/design.md §1).

Parameter trees (``width`` divides every channel count; ``width=1`` is the real VGG-16):

* ``VGG16``: ``conv1_1 … conv5_3`` (each ``kernel`` (3, 3, in, out) and ``bias``), and with
  ``num_classes`` set, ``head`` (the baseline's linear classifier after global pooling).
* ``RMA``: ``trunk`` (a ``VGG16`` without head) and ``attention/cell`` with ``fc6`` (W_fx,
  the shape of VGG fc6 on a 7x7x512 input, flattened in (h, w, c) order), ``lstm_x``,
  ``lstm_h`` (gates in the order i, g (forget), o, m), ``hz``, ``zs`` and ``zm``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rma_jax import conv, losses, ops

Dtype = Any

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
"""Output channels of each conv layer of VGG-16, block by block (conv1_1 … conv5_3)."""

VGG16_STRIDE = 16
"""conv5_3 is 16x smaller than the input (four 2x2 max-pools; pool5 is dropped)."""

# Default start box of every predicted region: centred, half the map's width and height,
# i.e. exactly on the scale constraint's threshold alpha = 0.5 (docs/design.md §2). The anchor
# constraint then moves regions 2..K towards their anchors.
DEFAULT_THETA_BIAS = (0.5, 0.5, 0.0, 0.0)


_HE_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
TRUNK_INITS = ("he", "dirac")


def output_dtype(dtype: Dtype) -> jnp.dtype:
  """The dtype of scores, theta, the LSTM state and pooled features for a compute ``dtype``:
  float32 for float32 and bfloat16 compute, float64 for float64 (under ``jax_enable_x64``,
  as the float64 cross-checks use)."""
  return jnp.promote_types(dtype, jnp.float32)


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

  The forward pass is ``classify(features(images))``, the same two methods as ``RMA``, so
  evaluation (ten views of one conv5_3 map, SVM features) runs either model the same way.

  Attributes:
    width: divisor of every channel count (1 = real VGG-16, 14,714,688 conv parameters).
    num_classes: if set, global pooling (``head_pool``) + a linear layer ``head`` give
      class scores (the baseline of docs/design.md §1); if ``None`` the conv5_3 map is returned.
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
    # Blocks 1-4 end in a 2x2 max pool, inside their last conv (the Winograd forward pools
    # while writing its bands); no pool5: conv5_3 keeps stride 16.
    pooled = {f"conv{b + 1}_{len(VGG16_BLOCKS[b])}" for b in range(4)}
    for name, cin, cout in zip(vgg16_layer_names(), [3] + channels[:-1], channels):
      # He init (as torchvision's VGG) keeps activations O(1) through 13 ReLU layers on
      # average; ImageNet or stage-1 weights replace it.
      init = dirac_init() if self.init_scheme == "dirac" and cin == cout else _HE_INIT
      # ReLU inside the conv: the Winograd forward applies it while writing its output.
      setattr(self, name, conv.Conv3x3(cout, dtype=self.dtype, param_dtype=jnp.float32,
                                       kernel_init=init, impl=self.conv_impl,
                                       activation=nn.relu, pool=name in pooled,
                                       name=name))
    if self.num_classes is not None:
      self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.xavier_uniform(),
                           name="head")

  def _block(self, x: jax.Array, block: int) -> jax.Array:
    layers = [getattr(self, f"conv{block + 1}_{i + 1}") for i in range(len(VGG16_BLOCKS[block]))]
    if block == 0:  # 'auto' on CPU evaluates conv1_1 inside conv1_2's Winograd bands
      return conv.apply_pair(*layers, x)
    for layer in layers:
      x = layer(x)  # ReLU (and the block's pool) included
    return x

  def __call__(self, images: jax.Array) -> jax.Array:
    """Runs the trunk (and the head, if any).

    Args:
      images: (B, H, W, 3) normalised images; H and W multiples of 16.

    Returns:
      (B, H/16, W/16, 512/width) conv5_3 features in ``dtype``, or (B, num_classes)
      float32 scores when ``num_classes`` is set.
    """
    fmap = self.features(images)
    if self.num_classes is None:
      return fmap
    return self.classify(fmap)["scores"]

  def features(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) normalised images -> (B, H/16, W/16, 512/width) conv5_3 map in ``dtype``."""
    block_fn = type(self)._block
    if self.remat:
      block_fn = nn.remat(block_fn, static_argnums=(2,))
    x = images.astype(self.dtype)
    for block in range(len(VGG16_BLOCKS)):
      x = block_fn(self, x, block)
    return x

  def classify(self, fmap: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """The baseline's head on (B, h, w, C') conv5_3 maps: global ``head_pool`` pooling, then
    the linear layer.

    Returns:
      ``scores`` (B, num_classes) float32; with ``return_features`` also ``features``
      (B, C'), the pooled map (the SVM head's input).
    """
    if self.num_classes is None:
      raise ValueError("VGG16.classify needs a head: build the VGG16 with num_classes")
    pool = jnp.max if self.head_pool == "max" else jnp.mean
    pooled = pool(fmap.astype(output_dtype(self.dtype)), axis=(1, 2))
    out = {"scores": self.head(pooled)}
    if return_features:
      out["features"] = pooled
    return out


# From this many rows on, fc6's product is faster with its (out, in) copy on XLA:CPU (20
# rows: 82 vs 145 ms; 4 rows: 40 vs 84 ms in an ad hoc run); at 2 rows it is slower (68 vs
# 48 ms), so there the stored layout stays (benchmarks/eval_params_ab.py, docs/performance.md).
DENSE_TRANSPOSED_MIN_ROWS = 4


class Dense(nn.Dense):
  """``nn.Dense`` (same parameters, initialisers and numerics) that multiplies by the
  evaluation copy of its kernel in (features, in) layout, ``kernel_t`` of the
  ``conv.INFERENCE_COLLECTION`` collection, where one is given (``rma_jax.eval_params``)
  and the input has at least ``DENSE_TRANSPOSED_MIN_ROWS`` rows: the same product, in the
  layout XLA:CPU's small-batch matmul runs fastest with."""

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """(..., in) -> (..., features)."""
    rows = int(np.prod(inputs.shape[:-1]))
    if (rows < DENSE_TRANSPOSED_MIN_ROWS
        or not self.has_variable(conv.INFERENCE_COLLECTION, "kernel_t")):
      return super().__call__(inputs)
    kernel_t = self.get_variable(conv.INFERENCE_COLLECTION, "kernel_t")
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel_t, bias = self.promote_dtype(inputs, kernel_t, bias, dtype=self.dtype)
    y = jax.lax.dot_general(inputs, kernel_t, (((inputs.ndim - 1,), (1,)), ((), ())),
                            precision=self.precision)
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


class AttentionSettings(nn.Module):
  """The settings of the recurrent memorized-attention module, declared once.

  ``AttentionCell``, ``RecurrentAttention`` and ``RMA`` inherit these fields, and each
  builds the next module down from ``attention_settings()``, so a setting given to ``RMA``
  reaches the cell unchanged.

  Attributes:
    num_classes: C.
    num_regions: K, the number of attentional regions (the module runs K+1 steps).
    sample_size: S, regions are sampled to S x S (7 matches VGG fc6 for ``W_fx``).
    x_dim, hidden_dim, z_dim: sizes of x_k (4096 = fc6), the LSTM state and z_k.
    standard_lstm: ``h = o * tanh(c)`` instead of the paper's ``h = o * c``.
    theta_bias: initial ``b_m`` = (sx, sy, tx, ty) every predicted region starts near.
    theta_kernel_scale: multiplies the Xavier init of ``W_zm`` so early regions stay near
      ``theta_bias`` instead of jumping around while the LSTM is untrained.
    fixed_regions: optional (K+1, 4) transforms used instead of the predicted ones.
    step_theta_init: optional (K+1, 4) initial value of a learned per-step bias
      ``attention/cell/zm_step`` added to ``b_m`` at each step (a step embedding of the
      region transform): row k is added when step k predicts region k+1 (the last row is
      unused). ``anchor_step_offsets`` starts region 1 at the centre box and region k at
      its anchor. ``None`` (default, the paper): one ``b_m`` for every step.
    dtype: computation dtype (parameters float32).
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
  step_theta_init: Sequence[Sequence[float]] | None = None
  dtype: Dtype = jnp.float32

  def attention_settings(self) -> dict[str, Any]:
    """The fields of ``AttentionSettings`` as keyword arguments, sequences as (nested)
    tuples (``nn.scan`` hashes a module's attributes)."""
    return {name: _as_tuples(getattr(self, name)) for name in ATTENTION_FIELDS}


ATTENTION_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionSettings)
                         if f.init and f.name not in ("parent", "name"))
"""The names of the attention settings (``AttentionSettings``' fields)."""


def _as_tuples(value: Any) -> Any:
  if isinstance(value, (list, tuple, np.ndarray)):
    return tuple(_as_tuples(v) for v in value)
  return value


class AttentionCell(AttentionSettings):
  """One step k of the recurrent memorized-attention module (Eq. 2, 4, 5).

  Carry ``(c, h, theta)``: LSTM cell (B, hidden), hidden state (B, hidden), and the
  transform (B, 4) that samples this step's region. Returns the new carry and the step's
  ``(s_k, theta_k, z_k)``. Attributes: ``AttentionSettings`` (``num_regions`` unused).
  """

  @nn.compact
  def __call__(self, carry, step, features):
    c, h, theta = carry
    out_dtype = output_dtype(self.dtype)
    if self.fixed_regions is not None:
      # Control of the paper's Table 3: the same module, regions given instead of predicted.
      fixed = jnp.asarray(self.fixed_regions, out_dtype)
      theta = jnp.broadcast_to(fixed[step], theta.shape)
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=nn.initializers.xavier_uniform())
    region = ops.sample_regions(features, theta[:, None, :], self.sample_size)[:, 0]
    x = nn.relu(dense(self.x_dim, name="fc6")(region.reshape(region.shape[0], -1)))
    gates = dense(4 * self.hidden_dim, name="lstm_x")(x) + dense(
        4 * self.hidden_dim, use_bias=False, name="lstm_h")(h.astype(self.dtype))
    i, g, o, m = jnp.split(gates.astype(out_dtype), 4, axis=-1)
    c = jax.nn.sigmoid(g) * c + jax.nn.sigmoid(i) * jnp.tanh(m)
    # Eq. 4 has no tanh on the cell (h = o * c); the standard LSTM is behind a flag.
    h = jax.nn.sigmoid(o) * (jnp.tanh(c) if self.standard_lstm else c)
    z = nn.relu(dense(self.z_dim, name="hz")(h))
    s = dense(self.num_classes, name="zs")(z).astype(out_dtype)
    xavier = nn.initializers.xavier_uniform()
    next_theta = dense(
        4, name="zm",
        kernel_init=lambda *a: self.theta_kernel_scale * xavier(*a),
        bias_init=lambda _, shape, dtype=jnp.float32: jnp.asarray(
            self.theta_bias, dtype).reshape(shape),
    )(z).astype(out_dtype)
    if self.step_theta_init is not None:
      # A learned per-step bias (a step embedding added to b_m): step k places region k+1.
      step_bias = self.param(
          "zm_step", lambda _: jnp.asarray(self.step_theta_init, jnp.float32))
      next_theta = next_theta + jnp.asarray(step_bias, out_dtype)[step]  # params may be NumPy
    return (c, h, next_theta), (s, theta, z.astype(out_dtype))


class RecurrentAttention(AttentionSettings):
  """The K+1-step attention module over a conv5_3 map, scanned with ``nn.scan``.

  Attributes: ``AttentionSettings``.
  """

  @nn.compact
  def __call__(self, features: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """Args: features (B, H, W, C). Returns the dict described in ``RMA.__call__``."""
    if self.num_regions < 1:
      raise ValueError(f"num_regions (K) must be >= 1, got {self.num_regions}")
    batch = features.shape[0]
    # The evaluation-only parameter forms (rma_jax.eval_params) are broadcast like params.
    scan = nn.scan(AttentionCell, variable_broadcast=["params", conv.INFERENCE_COLLECTION],
                   split_rngs={"params": False},
                   in_axes=(0, nn.broadcast), out_axes=0, length=self.num_regions + 1)
    cell = scan(**self.attention_settings(), name="cell")
    out_dtype = output_dtype(self.dtype)
    zeros = jnp.zeros((batch, self.hidden_dim), out_dtype)
    theta0 = jnp.broadcast_to(jnp.asarray(ops.IDENTITY_THETA, out_dtype), (batch, 4))
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


class RMA(AttentionSettings):
  """VGG-16 trunk + recurrent memorized-attention module (the paper's model).

  Attributes:
    num_classes, num_regions, ..., dtype: the attention settings, ``AttentionSettings``.
    width: trunk channel divisor (1 = real VGG-16).
    remat: rematerialise the trunk's blocks in the backward pass.
    conv_impl: the trunk's 3x3 conv algorithm, see ``VGG16.conv_impl``.
    trunk_init: the trunk's from-scratch initialisation, see ``VGG16.init_scheme``.
  """
  width: int = 1
  remat: bool = False
  conv_impl: str = "auto"
  trunk_init: str = "he"

  def setup(self):
    self.trunk = VGG16(width=self.width, dtype=self.dtype, remat=self.remat,
                       conv_impl=self.conv_impl, init_scheme=self.trunk_init)
    self.attention = RecurrentAttention(**self.attention_settings())

  def __call__(self, images: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """Scores a batch of images: ``attend(features(images))``.

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
    return self.trunk.features(images)

  def attend(self, features: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """Runs the attention module on (B, h, w, C) conv5_3 maps; returns as ``__call__``."""
    return self.attention(features, return_features)

  def classify(self, fmap: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """Everything after the trunk, with the interface of ``VGG16.classify``.

    Returns:
      ``scores`` (B, C), ``region_scores`` (B, K, C), ``theta`` (B, K+1, 4); with
      ``return_features`` also ``features`` (B, z_dim): the region features ``z``
      max-pooled over the K regions (the SVM head's input).
    """
    out = dict(self.attend(fmap, return_features))
    if return_features:
      out["features"] = jnp.max(out.pop("z"), axis=1)
    return out


def fixed_region_thetas(num_regions: int, scale: float = 0.5) -> np.ndarray:
  """(K+1, 4) transforms for the fixed-regions control: step 0 the identity, region 1 the
  centre box and regions 2..K boxes at the anchor points, all of half-size ``scale``."""
  centres = np.concatenate([np.zeros((1, 2)), np.asarray(losses.anchor_points(num_regions))],
                           axis=0)
  thetas = [ops.IDENTITY_THETA] + [(scale, scale, float(cx), float(cy)) for cx, cy in centres]
  return np.asarray(thetas, np.float32)


def anchor_step_offsets(num_regions: int,
                        theta_bias: Sequence[float] = DEFAULT_THETA_BIAS) -> np.ndarray:
  """(K+1, 4) initial per-step biases (``RMA.step_theta_init``) that start each region at
  its place in the fixed-regions layout: with ``W_zm z`` near 0, step 0 predicts region 1
  at the centre and step k-1 region k at anchor k (``losses.anchor_points``), all with the
  half-sizes of ``theta_bias``. Row k is ``target_{k+1} - theta_bias``; the last row (step
  K predicts nothing that is used) is 0."""
  bias = np.asarray(theta_bias, np.float32)
  targets = fixed_region_thetas(num_regions)[1:].copy()  # regions 1..K
  targets[:, :2] = bias[:2]
  return np.concatenate([targets - bias, np.zeros((1, 4), np.float32)], axis=0)
