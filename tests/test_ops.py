"""The separable sampler against an independent gather-based bilinear grid sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rma_jax import ops


def grid_sample_reference(features, theta, out_h, out_w):
  """Bilinear grid sampling with gathers, zero padding, align_corners=False (NumPy).

  The same computation as torch's affine_grid + grid_sample for M = [[sx,0,tx],[0,sy,ty]].
  """
  b, h, w, c = features.shape
  r = theta.shape[1]
  out = np.zeros((b, r, out_h, out_w, c), np.float64)
  ys = (2 * np.arange(out_h) + 1) / out_h - 1
  xs = (2 * np.arange(out_w) + 1) / out_w - 1
  for i in range(b):
    for k in range(r):
      sx, sy, tx, ty = theta[i, k]
      gx = ((sx * xs + tx + 1) * w - 1) / 2  # (out_w,) source pixel coordinates
      gy = ((sy * ys + ty + 1) * h - 1) / 2
      px, py = np.meshgrid(gx, gy)  # (out_h, out_w)
      x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
      for dy in (0, 1):
        for dx in (0, 1):
          xi, yi = x0 + dx, y0 + dy
          wgt = (1 - np.abs(px - xi)) * (1 - np.abs(py - yi))
          inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
          vals = features[i, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
          out[i, k] += (wgt * inside)[..., None] * vals
  return out


def _random_thetas(rng, b):
  """Regions of every kind: inside, partly outside, mirrored, tiny, large, identity."""
  rows = [
      (1.0, 1.0, 0.0, 0.0),  # identity
      (0.5, 0.4, 0.7, -0.8),  # partly outside
      (-0.6, 0.5, 0.1, 0.2),  # mirrored in x
      (0.4, -0.7, -0.3, 0.0),  # mirrored in y
      (0.02, 0.03, 0.33, -0.41),  # tiny
      (1.6, 1.3, 0.2, 0.1),  # larger than the map
  ]
  fixed = np.tile(np.asarray(rows, np.float32)[None], (b, 1, 1))
  rand = np.concatenate([rng.uniform(-1.2, 1.2, (b, 4, 2)), rng.uniform(-1, 1, (b, 4, 2))],
                        -1).astype(np.float32)
  return np.concatenate([fixed, rand], axis=1)


@pytest.mark.parametrize("out_size", [7, (3, 5)])
def test_matches_gather_sampler(out_size):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  theta = _random_thetas(rng, 2)
  got = ops.sample_regions(jnp.asarray(feats), jnp.asarray(theta), out_size)
  oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
  want = grid_sample_reference(feats, theta, oh, ow)
  assert got.shape == (2, theta.shape[1], oh, ow, 3)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_identity_returns_map():
  feats = np.random.default_rng(1).normal(size=(3, 6, 8, 4)).astype(np.float32)
  theta = np.tile(np.asarray(ops.IDENTITY_THETA, np.float32), (3, 1, 1))
  got = ops.sample_regions(jnp.asarray(feats), jnp.asarray(theta), (6, 8))
  np.testing.assert_allclose(np.asarray(got[:, 0]), feats, atol=1e-6)


def test_jittable_and_grad_theta_matches_finite_differences():
  rng = np.random.default_rng(2)
  feats = jnp.asarray(rng.normal(size=(2, 7, 7, 3)).astype(np.float32))
  theta = jnp.asarray(rng.uniform(0.2, 0.8, (2, 3, 4)).astype(np.float32)) * jnp.asarray(
      [1, 1, 0.5, 0.5])
  proj = jnp.asarray(rng.normal(size=(2, 3, 5, 5, 3)).astype(np.float32))

  @jax.jit
  def f(t):
    return jnp.sum(ops.sample_regions(feats, t, 5) * proj)

  grad = np.asarray(jax.grad(f)(theta))
  eps = 1e-3
  for idx in np.ndindex(*theta.shape):
    d = np.zeros(theta.shape, np.float32)
    d[idx] = eps
    fd = (float(f(theta + d)) - float(f(theta - d))) / (2 * eps)
    np.testing.assert_allclose(grad[idx], fd, rtol=2e-2, atol=2e-2)
  # The features gradient is linear: check it against the reference's adjoint via a dot test.
  g_feats = jax.grad(lambda x: jnp.sum(ops.sample_regions(x, theta, 5) * proj))(feats)
  lhs = float(jnp.sum(g_feats * feats))
  rhs = float(jnp.sum(ops.sample_regions(feats, theta, 5) * proj))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


def test_bad_shapes_are_clear_errors():
  with pytest.raises(ValueError, match="theta must be"):
    ops.sample_regions(jnp.zeros((2, 4, 4, 1)), jnp.zeros((2, 4)), 3)
  with pytest.raises(ValueError, match="features must be"):
    ops.sample_regions(jnp.zeros((4, 4, 1)), jnp.zeros((1, 1, 4)), 3)


def test_theta_to_boxes():
  boxes = ops.theta_to_boxes(jnp.asarray([[0.5, -0.25, 0.1, -0.2]]))
  np.testing.assert_allclose(np.asarray(boxes), [[-0.4, -0.45, 0.6, 0.05]], atol=1e-6)


def test_theta_gradient_at_exact_pixel_centres_is_right_sided():
  """Identity theta with S = H = W samples exactly on pixel centres (pix = j). The sampler
  is piecewise linear in pix; grid_sample (floor-based) differentiates it from the right:
  d out[i, j] / d tx = (W / 2) (f[i, j+1] - f[i, j]) with f = 0 outside the map, and
  d / d sx adds the factor u_j = (2j + 1) / W - 1 of the output sample's position."""
  rng = np.random.default_rng(3)
  h, w = 4, 8  # powers of two: every sample position is exact in float32
  f = rng.normal(size=(1, h, w, 1)).astype(np.float32)
  probe = rng.normal(size=(1, 1, h, w, 1)).astype(np.float32)  # a linear read-out of out

  def readout(theta):
    out = ops.sample_regions(jnp.asarray(f), theta, (h, w))
    return jnp.sum(out * probe)

  g = np.asarray(jax.grad(readout)(jnp.asarray([[[1.0, 1.0, 0.0, 0.0]]], jnp.float32)))[0, 0]
  fx = np.concatenate([f[0, :, :, 0], np.zeros((h, 1), np.float32)], axis=1)  # f[:, W] = 0
  fy = np.concatenate([f[0, :, :, 0], np.zeros((1, w), np.float32)], axis=0)
  dx = fx[:, 1:] - fx[:, :-1]  # right-sided differences along x, (h, w)
  dy = fy[1:, :] - fy[:-1, :]
  p = probe[0, 0, :, :, 0]
  u_x = (2 * np.arange(w) + 1) / w - 1
  u_y = (2 * np.arange(h) + 1) / h - 1
  want = [np.sum(p * dx * u_x[None, :]) * w / 2, np.sum(p * dy * u_y[:, None]) * h / 2,
          np.sum(p * dx) * w / 2, np.sum(p * dy) * h / 2]
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
