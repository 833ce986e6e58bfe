"""The recurrent memorized-attention module (paper §3.2-3.3, docs/design.md §1).

``RecurrentAttention`` scans ``AttentionCell`` over K+1 steps on a feature map: each step
samples a region with the spatial transformer (``ops.sample_regions``), updates the LSTM,
scores the region and predicts the next transform. Parameter tree of ``RecurrentAttention``:
``cell`` with ``fc6`` (W_fx, the shape of VGG fc6 on a 7x7x512 input, flattened in (h, w, c)
order; (C, x_dim) with ``region_pool='avg'``), ``lstm_x``, ``lstm_h`` (gates in the order i,
g (forget), o, m), ``hz``, ``zs`` and ``zm`` (and ``zm_step`` with ``step_theta_init``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rma_jax import losses, ops

Dtype = Any
ModuleDef = Any

REGION_POOLS = ("flatten", "avg")
"""``AttentionSettings.region_pool``: how a sampled region becomes ``W_fx``'s input."""

# Default start box of every predicted region: centred, half the map's width and height,
# i.e. exactly on the scale constraint's threshold alpha = 0.5 (docs/design.md §2). The anchor
# constraint then moves regions 2..K towards their anchors.
DEFAULT_THETA_BIAS = (0.5, 0.5, 0.0, 0.0)


def output_dtype(dtype: Dtype) -> jnp.dtype:
  """The dtype of scores, theta, the LSTM state and pooled features for a compute ``dtype``:
  float32 for float32 and bfloat16 compute, float64 for float64 (under ``jax_enable_x64``,
  as the float64 cross-checks use)."""
  return jnp.promote_types(dtype, jnp.float32)


class AttentionSettings(nn.Module):
  """The settings of the recurrent memorized-attention module, declared once.

  ``AttentionCell``, ``RecurrentAttention`` and ``models.RMA`` inherit these fields, and
  each builds the next module down from ``attention_settings()``, so a setting given to
  ``RMA`` reaches the cell unchanged.

  Attributes:
    num_classes: C.
    num_regions: K, the number of attentional regions (the module runs K+1 steps).
    sample_size: S, regions are sampled to S x S (7 matches VGG fc6 for ``W_fx``).
    region_pool: what ``W_fx`` sees of a sampled S x S x C region (``REGION_POOLS``):
      'flatten' (the paper: all of it, S*S*C inputs, VGG fc6's shape) or 'avg' (its mean
      over the S x S samples, C inputs: the pooling a ResNet's own classifier applies, for
      wide maps where flattening would make W_fx huge; docs/design.md §7).
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
    dense: the cell's linear layers (``nn.Dense``'s attributes and parameters);
      ``rma_jax.kernels`` may pass a platform-specific one.
    unroll: run the K+1 steps as a Python loop instead of ``nn.scan``: the same parameters
      and numbers, for converters that take no scan (jax2onnx; ``rma_jax.export``).
  """
  num_classes: int
  num_regions: int = 5
  sample_size: int = 7
  region_pool: str = "flatten"
  x_dim: int = 4096
  hidden_dim: int = 512
  z_dim: int = 512
  standard_lstm: bool = False
  theta_bias: Sequence[float] = DEFAULT_THETA_BIAS
  theta_kernel_scale: float = 0.1
  fixed_regions: Sequence[Sequence[float]] | None = None
  step_theta_init: Sequence[Sequence[float]] | None = None
  dtype: Dtype = jnp.float32
  dense: ModuleDef = nn.Dense
  unroll: bool = False

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
    dense = functools.partial(self.dense, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=nn.initializers.xavier_uniform())
    region = ops.sample_regions(features, theta[:, None, :], self.sample_size)[:, 0]
    if self.region_pool == "avg":
      region = jnp.mean(region.astype(out_dtype), axis=(1, 2)).astype(region.dtype)
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
  """The K+1-step attention module over a feature map, scanned with ``nn.scan``.

  Attributes: ``AttentionSettings``.
  """

  @nn.compact
  def __call__(self, features: jax.Array, return_features: bool = False) -> dict[str, jax.Array]:
    """Args: features (B, H, W, C). Returns the dict described in ``models.RMA.__call__``."""
    if self.num_regions < 1:
      raise ValueError(f"num_regions (K) must be >= 1, got {self.num_regions}")
    if self.region_pool not in REGION_POOLS:
      raise ValueError(f"region_pool must be one of {REGION_POOLS}, got {self.region_pool!r}")
    batch = features.shape[0]
    out_dtype = output_dtype(self.dtype)
    zeros = jnp.zeros((batch, self.hidden_dim), out_dtype)
    theta0 = jnp.broadcast_to(jnp.asarray(ops.IDENTITY_THETA, out_dtype), (batch, 4))
    steps = self.num_regions + 1
    if self.unroll:
      cell = AttentionCell(**self.attention_settings(), name="cell")
      carry, outs = (zeros, zeros, theta0), []
      for step in range(steps):
        carry, out = cell(carry, step, features)
        outs.append(out)
      s, theta, z = (jnp.stack(o) for o in zip(*outs))
    else:
      # Every variable collection (the parameters, and any forms of them that a building
      # block was given) is the same at every step.
      scan = nn.scan(AttentionCell, variable_broadcast=True, split_rngs={"params": False},
                     in_axes=(0, nn.broadcast), out_axes=0, length=steps)
      cell = scan(**self.attention_settings(), name="cell")
      _, (s, theta, z) = cell((zeros, zeros, theta0), jnp.arange(steps), features)
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
