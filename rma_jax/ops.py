"""The scale-and-translate spatial transformer as two small matrix products (docs/design.md §1).

A transform ``theta = (sx, sy, tx, ty)`` maps output coordinates to input coordinates,
``x_in = sx * x_out + tx`` and ``y_in = sy * y_out + ty``, in coordinates normalised to
[-1, 1] over the feature map with the *align_corners=False* convention of
``torch.nn.functional.affine_grid``/``grid_sample``: -1 and +1 are the outer edges of the
edge pixels. The region covers ``x in [tx - sx, tx + sx]``, ``y in [ty - sy, ty + sy]``;
``(1, 1, 0, 0)`` is the whole map.

Because the transform has no rotation or shear, bilinear sampling is separable: per channel
``out = A_y @ f @ A_x.T`` with tent-weight matrices ``A[i, p] = max(0, 1 - |src_i - p|)``
(written piecewise, see :func:`interpolation_matrix`, so that the derivative at an exact
pixel centre is the right-sided one, as in ``grid_sample``).
Source pixels outside the map have no column in ``A``, which is exactly zero padding. The
two contractions run on matrix units (MXU / tensor cores) instead of gathers, and the
result is differentiable in both the features and ``theta``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IDENTITY_THETA = (1.0, 1.0, 0.0, 0.0)


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def interpolation_matrix(scale: jax.Array, shift: jax.Array, out_size: int,
                         in_size: int) -> jax.Array:
  """Bilinear (tent) weights from ``out_size`` output to ``in_size`` input positions.

  Args:
    scale: (...,) region half-extent in normalised coordinates (``sx`` or ``sy``).
    shift: (...,) region centre in normalised coordinates (``tx`` or ``ty``).
    out_size: number of output samples along the axis.
    in_size: number of input pixels along the axis.

  Returns:
    (..., out_size, in_size) weights, float32 (float64 for float64 ``scale``/``shift``
    under ``jax_enable_x64``); row i interpolates output sample i.
  """
  dtype = jnp.result_type(scale, shift, jnp.float32)
  scale = jnp.asarray(scale, dtype)[..., None]
  shift = jnp.asarray(shift, dtype)[..., None]
  # Output sample centres in [-1, 1] (align_corners=False), mapped into the input.
  out = (2.0 * jnp.arange(out_size, dtype=dtype) + 1.0) / out_size - 1.0
  src = scale * out + shift
  # Normalised -> pixel index: -1 is the left edge of pixel 0, +1 the right edge of the last.
  pix = ((src + 1.0) * in_size - 1.0) / 2.0
  grid = jnp.arange(in_size, dtype=dtype)
  d = pix[..., :, None] - grid
  # The tent 1 - |d| on [-1, 1), one linear piece per side. Written out (not as
  # max(0, 1 - |d|)) so a sample exactly on pixel centre i has the right-sided derivative
  # f[i+1] - f[i], as torch's grid_sample (floor-based) computes; autodiff of abs and max
  # would give 0 and half weights there.
  return jnp.where((d >= -1.0) & (d < 1.0), jnp.where(d >= 0.0, 1.0 - d, 1.0 + d), 0.0)


def sample_regions(features: jax.Array, theta: jax.Array, size: int | Sequence[int],
                   *, precision: jax.lax.PrecisionLike = None) -> jax.Array:
  """Bilinearly samples R regions per image from a feature map (zero outside the map).

  Args:
    features: (B, H, W, C) feature maps (e.g. conv5_3).
    theta: (B, R, 4) transforms ``(sx, sy, tx, ty)``, one per region; see module doc.
    size: output size, an int S (S x S) or a pair (h, w).
    precision: matmul precision passed to the two contractions. ``None`` is the backend's
      default; pass ``jax.lax.Precision.HIGHEST`` for float32-exact sampling on TPU.

  Returns:
    (B, R, h, w, C) sampled regions, in ``features.dtype``.
  """
  if features.ndim != 4:
    raise ValueError(f"features must be (B, H, W, C), got shape {features.shape}")
  if theta.ndim != 3 or theta.shape[-1] != 4 or theta.shape[0] != features.shape[0]:
    raise ValueError(
        f"theta must be (B, R, 4) with B = {features.shape[0]}, got shape {theta.shape}")
  out_h, out_w = _size_pair(size)
  _, in_h, in_w, _ = features.shape
  sx, sy, tx, ty = (theta[..., i] for i in range(4))
  a_y = interpolation_matrix(sy, ty, out_h, in_h).astype(features.dtype)  # (B, R, h, H)
  a_x = interpolation_matrix(sx, tx, out_w, in_w).astype(features.dtype)  # (B, R, w, W)
  # Contract the width first: (B,R,w,W) x (B,H,W,C) -> (B,R,H,w,C), then the height.
  rows = jnp.einsum("brjw,bhwc->brhjc", a_x, features, precision=precision)
  return jnp.einsum("brih,brhjc->brijc", a_y, rows, precision=precision)


def theta_to_boxes(theta: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
  """Converts transforms to boxes ``(x0, y0, x1, y1)`` in normalised [-1, 1] coordinates.

  The one place of this formula: a region covers ``x in [tx - |sx|, tx + |sx|]`` and
  ``y in [ty - |sy|, ty + |sy|]``, -1 and +1 the outer edges (align_corners=False). The
  metrics (``rma_jax.regions``) and the pictures (``rma_jax.visualize``) call it on NumPy.

  Args:
    theta: (..., 4) transforms ``(sx, sy, tx, ty)``: a JAX array (may be traced), or a
      NumPy array, which stays NumPy in its own dtype.

  Returns:
    (..., 4) boxes with ``x0 <= x1`` and ``y0 <= y1`` (a mirrored region, negative scale,
    covers the same box).
  """
  xp = np if isinstance(theta, np.ndarray) else jnp
  half, centre = xp.abs(theta[..., :2]), theta[..., 2:]
  return xp.concatenate([centre - half, centre + half], axis=-1)
