"""The CPU kernels (``rma_jax.kernels``): the custom-VJP 3x3 convolution, its Winograd and
im2col forwards and the fused conv1_1 -> conv1_2 pair against independent references; the
VGG block and dense layer that put them into a model, against ``models.ConvBlock`` and
``nn.Dense``; the evaluation-only forms; where the kernels are chosen (when a function is
lowered, per platform); and the CPU outputs of today's model against those of the commit
before the kernels became a building block (a fixture)."""

import functools
import hashlib
import json
import os
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from rma_jax import kernels, models, steps, views
from rma_jax.kernels import cpu
from rma_jax.kernels.cpu import conv, forms as forms_lib, modules, winograd

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _np_conv(x, w, b):
  """Independent float64 reference: 3x3, stride 1, zero padding 1, as 9 shifted products."""
  _, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = np.zeros(x.shape[:3] + (w.shape[-1],))
  for i in range(3):
    for j in range(3):
      y += np.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + wd], w[i, j])
  return y + b


def _rand(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _lax_conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape,chunk_bytes", [
    ((2, 7, 5, 3, 4), conv.DEFAULT_CHUNK_BYTES),  # odd, non-square map: one band per image
    ((2, 12, 6, 4, 5), 9 * 4 * 4 * 6 * 5),        # forces 12 // 5 -> 4-row bands (3 per image)
    ((1, 9, 8, 2, 3), 1),                          # 1-row bands
])
def test_kernel_grad_equals_loop_reference(shape, chunk_bytes):
  b, h, w, cin, cout = shape
  x, dy = _rand(0, (b, h, w, cin)), _rand(1, (b, h, w, cout))
  got = jax.jit(lambda x, dy: conv.kernel_grad(x, dy, chunk_bytes))(x, dy)
  # dW[kh, kw] = sum over pixels of xpad shifted by (kh, kw) times dy: an explicit loop.
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  ref = np.zeros((3, 3, cin, cout))
  for i in range(3):
    for j in range(3):
      ref[i, j] = np.einsum("bhwc,bhwo->co", xp[:, i:i + h, j:j + w], dy)
  assert got.shape == (3, 3, cin, cout) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_chunk_rows_divides_height_and_fits_budget():
  assert conv.chunk_rows(448, 448, 64) == 4   # 4 MiB / (9*64*4 B * 448 px) = 4.06 rows
  assert conv.chunk_rows(28, 28, 512) == 7    # 8.1 rows fit; 7 is the largest divisor <= 8
  assert conv.chunk_rows(7, 5, 3, chunk_bytes=9 * 3 * 4 * 5 * 6) == 1  # 6 fit; 7 is prime
  assert conv.chunk_rows(12, 6, 4, chunk_bytes=9 * 4 * 4 * 6 * 5) == 4  # 5 fit; 5 !| 12
  assert conv.chunk_rows(10, 10, 1000, chunk_bytes=1) == 1  # never below one row
  assert conv.chunk_rows(14, 14, 3) == 14     # never above the image


def test_finite_differences_tiny_case():
  """Custom-VJP gradients against central differences of the float64 loop conv."""
  x, w, b = _rand(2, (1, 4, 5, 2)), _rand(3, (3, 3, 2, 3), 0.5), _rand(4, (3,))
  dy = _rand(5, (1, 4, 5, 3))

  def loss_np(x_, w_, b_):
    return float(np.sum(_np_conv(x_, w_, b_) * dy))

  def numeric(arr, f, eps=1e-3):
    g = np.zeros(arr.shape)
    for idx in np.ndindex(arr.shape):
      hi, lo = arr.astype(np.float64), arr.astype(np.float64)
      hi[idx] += eps
      lo[idx] -= eps
      g[idx] = (f(hi) - f(lo)) / (2 * eps)
    return g

  loss = jax.jit(jax.grad(lambda x, w, b: jnp.sum(conv.conv3x3(x, w, b, impl="patches") * dy),
                          argnums=(0, 1, 2)))
  gx, gw, gb = loss(x, w, b)
  np.testing.assert_allclose(gx, numeric(x, lambda a: loss_np(a, w, b)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gw, numeric(w, lambda a: loss_np(x, a, b)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gb, numeric(b, lambda a: loss_np(x, w, a)), rtol=1e-4, atol=1e-4)
  # The forward too, against the same reference.
  np.testing.assert_allclose(conv.conv3x3(x, w, b, impl="patches"),
                             _np_conv(x, w, b), rtol=1e-5, atol=1e-5)


_HE = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Blocks(nn.Module):
  """Two blocks as VGG16 builds them (shared scope, so ``a1 … b2`` are this module's own
  parameters): a two-conv block with the pool, then a one-conv block; ``block`` is
  ``models.ConvBlock`` or the CPU kernels' ``VGGBlock``."""
  block: Any
  widths: tuple = ((8, 8), (5,))
  remat: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    block = nn.remat(self.block) if self.remat else self.block
    self.blocks = [block(w, tuple(f"{n}{i + 1}" for i in range(len(w))), (_HE,) * len(w),
                         pool=n == "a", dtype=self.dtype)
                   for n, w in zip("ab", self.widths)]
    for b in self.blocks:
      nn.share_scope(self, b)

  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return x


def test_vgg_block_params_and_init_match_conv_block():
  x = jnp.ones((1, 8, 8, 3))
  ours = _Blocks(cpu.VGGBlock).init(jax.random.key(0), x)
  theirs = _Blocks(models.ConvBlock).init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
  assert ours["params"]["a1"]["kernel"].shape == (3, 3, 3, 8)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@pytest.mark.parametrize("impl", ["patches", "winograd", "auto"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vgg_block_matches_conv_block_forward_and_gradients(impl, dtype):
  """Output and all gradients of the CPU kernels' block against ``models.ConvBlock``
  (``nn.Conv``, ``nn.relu``, ``nn.max_pool``) with the same params, under jit.

  float32: equal to rounding. bfloat16 compute (float32 params): the output and input
  gradient come from the same XLA ops as nn.Conv's bf16 ones; the parameter gradients are
  rounded differently (the custom VJP accumulates in float32), so each must be at least as
  close to the float32 gradient (relative L2 error) as nn.Conv's own bf16 one, or within 1 %.
  """
  x = jnp.asarray(_rand(6, (2, 60, 58, 3)))  # 3480 px >= AUTO_MIN_PIXELS: auto -> patches
  dy = jnp.asarray(_rand(7, (2, 30, 29, 5)))
  params = _Blocks(models.ConvBlock).init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape),
                        params)  # nonzero biases

  def run(block, dt=dtype):
    def loss(params, x):
      y = _Blocks(block, dtype=dt).apply({"params": params}, x)
      return jnp.sum(y.astype(jnp.float32) * dy), y
    (gp, gx), y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return {"y": y, "x": gx, "params": gp}

  got, ref = run(kernels.vgg_block(impl)), run(models.ConvBlock)
  assert got["y"].dtype == dtype and got["params"]["a1"]["kernel"].dtype == jnp.float32

  def close(a, b, tol=1e-5 if dtype == jnp.float32 else 1e-2):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())

  close(got["y"], ref["y"])
  close(got["x"], ref["x"])
  if dtype == jnp.float32:
    jax.tree.map(close, got["params"], ref["params"])
  else:
    ref32 = run(models.ConvBlock, jnp.float32)["params"]
    err = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    ours_err = jax.tree.map(err, got["params"], ref32)
    theirs_err = jax.tree.map(err, ref["params"], ref32)
    jax.tree.map(lambda e, e_ref: (e <= max(1.01 * e_ref, 1e-2)) or pytest.fail(
        f"bf16 gradient error {e:.3g} vs nn.Conv's {e_ref:.3g}"), ours_err, theirs_err)


def test_bfloat16_gradients_close_to_float32():
  """bf16 compute with f32 params stays near the f32 gradient (relative to its scale)."""
  x, w, b = _rand(8, (2, 16, 16, 8)), _rand(9, (3, 3, 8, 8), 0.2), _rand(10, (8,))
  dy = _rand(11, (2, 16, 16, 8))

  def grads(dt):
    f = lambda w, b: jnp.sum(conv.conv3x3(x.astype(dt), w.astype(dt), b.astype(dt),
                                          impl="patches").astype(jnp.float32) * dy)
    return jax.jit(jax.grad(f, argnums=(0, 1)))(w, b)

  (gw16, gb16), (gw32, gb32) = grads(jnp.bfloat16), grads(jnp.float32)
  assert gw16.dtype == jnp.float32  # the cast back to the f32 parameter
  for g16, g32 in ((gw16, gw32), (gb16, gb32)):
    assert np.abs(np.asarray(g16) - np.asarray(g32)).max() < 2e-2 * np.abs(g32).max()


def test_remat_gives_same_gradients():
  x = jnp.asarray(_rand(12, (2, 16, 12, 4)))
  params = _Blocks(models.ConvBlock).init(jax.random.key(3), x)["params"]

  def grads(block, remat):
    f = lambda p: jnp.sum(_Blocks(block, remat=remat).apply({"params": p}, x) ** 2)
    return jax.jit(jax.grad(f))(params)

  ref = grads(models.ConvBlock, False)
  for block, remat in ((kernels.vgg_block("patches"), True),
                       (kernels.vgg_block("patches"), False), (models.ConvBlock, True)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4),
                 grads(block, remat), ref)


def test_auto_rule_and_custom_vjp_in_jaxpr():
  assert conv.use_patches((2, 448, 448, 3), "auto")
  assert conv.use_patches((2, 56, 56, 256), "auto")
  assert not conv.use_patches((2, 28, 28, 512), "auto")
  assert conv.use_patches((2, 4, 4, 3), "patches")
  assert not conv.use_patches((2, 448, 448, 3), "xla")
  with pytest.raises(ValueError, match="impl"):
    conv.use_patches((1, 4, 4, 1), "cudnn")
  x, w, b = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 2)), jnp.ones((2,))
  assert "custom_vjp_call" in str(jax.make_jaxpr(
      lambda x: conv.conv3x3(x, w, b, impl="patches"))(x))
  assert "custom_vjp_call" not in str(jax.make_jaxpr(
      lambda x: conv.conv3x3(x, w, b, impl="xla"))(x))


def test_batch_sharded_over_four_devices_matches_xla():
  """Data parallel as in a train step (batch sharded over a mesh): same gradients, and the
  same Winograd forward (conftest forces 4 host devices)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  assert jax.device_count() >= 4
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.normal(size=(8, 12, 10, 3)).astype(np.float32),
                     NamedSharding(mesh, P("data")))
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)).astype(np.float32))
  b = jnp.asarray(rng.normal(size=(4,)).astype(np.float32))

  def grads(impl):
    f = lambda x, w, b: jnp.sum(jnp.sin(conv.conv3x3(x, w, b, impl=impl)))
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, w, b)
  for got, ref in zip(grads("patches"), grads("xla")):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # The Winograd forward, its bands sliced across the sharded batch: same output.
  fwd = lambda impl: jax.jit(lambda x, w, b: conv.conv3x3(x, w, b, impl=impl))(x, w, b)
  got = jax.jit(lambda x, w, b: winograd.winograd_conv3x3(x, w, b, tiles_per_band=3))(x, w, b)
  for y in (fwd("winograd"), got):
    np.testing.assert_allclose(np.asarray(y), np.asarray(fwd("xla")), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- Winograd

VGG_LAYER_CHANNELS = sorted({(cin, cout) for cin, cout in zip(
    [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512],
    [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512])})
"""The 8 distinct (Cin, Cout) of VGG-16's 13 convolutions."""


@pytest.mark.parametrize("tile", winograd.WINOGRAD_TILES)
def test_winograd_matrices_compute_the_correlation(tile):
  """A^T ((G g) * (B^T d)) = sum_k d[i + k] g[k] for random tiles, in float64; in 2-D with
  G g G^T and B^T d B. A^T and B^T are exact in float32 (dyadic entries)."""
  at, g, bt = winograd.winograd_matrices(tile)
  n = tile + 2
  assert at.shape == (tile, n) and g.shape == (n, 3) and bt.shape == (n, n)
  rng = np.random.default_rng(tile)
  d, k = rng.normal(size=n), rng.normal(size=3)
  np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), np.correlate(d, k, "valid"),
                             rtol=1e-12, atol=1e-12)
  d2, k2 = rng.normal(size=(n, n)), rng.normal(size=(3, 3))
  ref = np.array([[np.sum(d2[i:i + 3, j:j + 3] * k2) for j in range(tile)]
                  for i in range(tile)])
  np.testing.assert_allclose(at @ ((g @ k2 @ g.T) * (bt @ d2 @ bt.T)) @ at.T, ref,
                             rtol=1e-12, atol=1e-12)
  for m in (at, bt):
    assert np.array_equal(m.astype(np.float32).astype(np.float64), m)
  with pytest.raises(ValueError, match="tile"):
    winograd.winograd_matrices(3)


def test_winograd_bands_divide_the_work():
  assert winograd.winograd_bands(2, 128, 128, 256) == (1, 2)   # conv1_2 at 512: 2-row bands
  assert winograd.winograd_bands(2, 16, 16, 256) == (1, 16)    # conv4 at 64: one image each
  assert winograd.winograd_bands(2, 8, 8, 256) == (2, 8)       # conv5 at 32: all in one band
  assert winograd.winograd_bands(6, 2, 2, 16) == (3, 2)        # 4 images fit; 3 divides 6
  assert winograd.winograd_bands(1, 7, 5, 12) == (1, 1)        # 2 rows fit; 7 is prime
  assert winograd.winograd_bands(1, 3, 300, 256) == (1, 1)     # never below one row


@pytest.mark.parametrize("tile", winograd.WINOGRAD_TILES)
@pytest.mark.parametrize("shape,tiles_per_band", [
    ((2, 9, 7, 3, 4), 1000),   # odd sizes (not multiples of the tile): one band, cropped
    ((1, 1, 1, 2, 3), 1000),   # a single pixel: every tap but the centre is padding
    ((3, 13, 6, 2, 2), 1),     # one tile row per band; the last band past the bottom edge
    ((6, 5, 4, 2, 3), 8),      # several whole images per band
])
def test_winograd_float64_equals_direct_convolution(tile, shape, tiles_per_band):
  """In float64 the algorithm is exact to rounding (1e-12 here): tiling, SAME padding at
  every border, cropping, bands and the fused bias + ReLU, for every tile size."""
  b, h, w, cin, cout = shape
  rng = np.random.default_rng(0)
  x, k, bias = (rng.normal(size=s) for s in ((b, h, w, cin), (3, 3, cin, cout), (cout,)))
  with jax.enable_x64(True):
    for act in (None, jax.nn.relu):
      got = jax.jit(functools.partial(winograd.winograd_conv3x3, tile=tile,
                                      tiles_per_band=tiles_per_band, activation=act))(
          jnp.asarray(x), jnp.asarray(k), jnp.asarray(bias))
      ref = _np_conv(x, k, bias)
      ref = ref if act is None else np.maximum(ref, 0)
      assert got.dtype == jnp.float64 and got.shape == ref.shape
      np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def _winograd_abs_bound(x, k, bias, tile):
  """The float error bound of F(m x m, 3 x 3) as ``winograd_conv3x3`` computes it.

  With exact-coefficient stages (A^T, B^T dyadic; G rounded once), floating-point dot
  products of K terms in any order (Higham, Accuracy and Stability of Numerical
  Algorithms, §3.1) and gamma_K = K u / (1 - K u), u = 2^-24, every output is within

      gamma_K * (|A^T| [sum_c (|G| |g_c| |G|^T) * (|B^T| |d_c| |B|)] |A| + |b|)

  of the exact value, K = 10 (kernel transform: 9 products + G's rounding) + 2n (input
  transform, two stages of <= n terms) + Cin (the matrix product) + 2n (output transform)
  + 1 (bias). The bracket is the algorithm run on absolute values: it grows with the norms
  of the transform matrices, i.e. with the tile (Barabasz et al., "Error analysis and
  improving the accuracy of Winograd convolution for deep neural networks", ACM TOMS 2020),
  which is the known error growth of F(m, r) that a plain tolerance would not track.
  Computed in float64 from the same float32 inputs.
  """
  at, g, bt = (np.abs(m) for m in winograd.winograd_matrices(tile))
  n = tile + 2
  b, h, w, cin = x.shape
  rows, cols = -(-h // tile), -(-w // tile)
  xp = np.abs(np.pad(x.astype(np.float64), ((0, 0), (1, rows * tile + 1 - h),
                                             (1, cols * tile + 1 - w), (0, 0))))
  tiles = np.stack([np.stack([xp[:, i:i + (rows - 1) * tile + 1:tile,
                                 j:j + (cols - 1) * tile + 1:tile] for j in range(n)], -2)
                    for i in range(n)], -3)  # (B, rows, cols, n, n, Cin)
  v = np.einsum("pa,zrcaei,qe->zrcpqi", bt, tiles, bt)
  u = np.einsum("pa,aeio,qe->pqio", g, np.abs(k.astype(np.float64)), g)
  mabs = np.einsum("zrcpqi,pqio->zrcpqo", v, u)
  y = np.einsum("ip,zrcpqo,jq->zricjo", at, mabs, at).reshape(b, rows * tile, cols * tile, -1)
  gamma = lambda k_: k_ * 2.0**-24 / (1 - k_ * 2.0**-24)
  return gamma(10 + 4 * n + cin + 1) * (y[:, :h, :w] + np.abs(bias))


@pytest.mark.parametrize("cin,cout", VGG_LAYER_CHANNELS)
def test_winograd_float32_within_its_error_bound_on_every_vgg_layer(cin, cout):
  """F(4x4, 3x3) in float32 on each VGG-16 (Cin, Cout) at a small odd map (two bands, all
  four borders), against the float64 direct convolution: every output within the
  algorithm's rigorous rounding-error bound (``_winograd_abs_bound``); and against
  lax.conv_general_dilated in float32 within that bound plus the direct convolution's own,
  gamma_{9 Cin + 1} (|x| * |w| + |b|). The bound is a worst case (no cancellation in the
  absolute values, every rounding of the Cin-term sums in the same direction): from 0.08 %
  (Cin = 3) to 9 % (Cin = 512) of the largest output here, where the observed error is
  5e-6 to 9e-6 of it (200-7000x below the bound). It catches precision lost by the
  implementation (a 16-bit intermediate, a badly conditioned transform); exactness of the
  algorithm itself (taps, borders, bands) is the float64 test above."""
  rng = np.random.default_rng(cin + cout)
  x = _rand(cin, (1, 9, 7, cin))
  k = (rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
  bias = _rand(cout, (cout,), 0.1)
  got = np.asarray(jax.jit(functools.partial(winograd.winograd_conv3x3, tiles_per_band=3))(
      x, k, bias), np.float64)  # 3 tile rows of 2 tiles: 3 bands of one row
  ref = _np_conv(x.astype(np.float64), k.astype(np.float64), bias.astype(np.float64))
  bound = _winograd_abs_bound(x, k, bias, winograd.DEFAULT_WINOGRAD_TILE)
  err = np.abs(got - ref)
  assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"
  assert bound.max() < 0.1 * np.abs(ref).max()  # the bound itself is not vacuous
  lax_out = np.asarray(jax.jit(_lax_conv)(x, k) + bias, np.float64)
  direct_bound = (9 * cin + 1) * 2.0**-24 / (1 - (9 * cin + 1) * 2.0**-24) * (
      _np_conv(np.abs(x).astype(np.float64), np.abs(k).astype(np.float64),
               np.abs(bias).astype(np.float64)))
  assert np.all(np.abs(got - lax_out) <= bound + direct_bound)


def test_winograd_bfloat16_inputs_computed_in_float32():
  x, k, bias = _rand(20, (2, 8, 8, 4)), _rand(21, (3, 3, 4, 5), 0.3), _rand(22, (5,))
  as16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  got = jax.jit(winograd.winograd_conv3x3)(as16(x), as16(k), as16(bias))
  assert got.dtype == jnp.bfloat16
  ref = _np_conv(*(np.asarray(as16(a), np.float64) for a in (x, k, bias)))
  # Only the final rounding to bf16 (8 bits): within 2^-8 relative of the exact output.
  np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2**-8,
                             atol=1e-5 * np.abs(ref).max())


def _count_winograd_traces(monkeypatch):
  calls = []
  original = winograd.winograd_conv3x3

  def counting(*args, **kwargs):
    calls.append(args[0].shape)
    return original(*args, **kwargs)
  monkeypatch.setattr(winograd, "winograd_conv3x3", counting)
  return calls


@pytest.mark.parametrize("impl,ref_impl", [("winograd", "xla"), ("auto", "patches")])
def test_winograd_only_when_not_differentiated(monkeypatch, impl, ref_impl):
  """Evaluating runs Winograd; differentiating runs XLA's conv and the backward of
  ``ref_impl`` (what the same impl differentiated before Winograd existed): equal
  gradients, the ReLU's included, and a differentiated forward that never traces
  Winograd."""
  calls = _count_winograd_traces(monkeypatch)
  # 84 x 84 x 128 -> 128: 2.1 GFLOP and 441 tiles, so 'auto' takes Winograd, and >= 56^2
  # pixels, so its backward is the matmul kernel gradient ('patches').
  x = jnp.asarray(_rand(30, (1, 84, 84, 128)))
  k, bias = jnp.asarray(_rand(31, (3, 3, 128, 128), 0.03)), jnp.asarray(_rand(32, (128,), 0.1))
  dy = jnp.asarray(_rand(33, (1, 84, 84, 128)))
  assert conv.use_winograd(x.shape, 128, x.dtype, impl) and (
      conv.use_patches(x.shape, impl) == (ref_impl == "patches"))

  def f(impl_):
    return lambda x, k, b: conv.conv3x3(x, k, b, impl=impl_, activation=jax.nn.relu)

  y = jax.jit(f(impl))(x, k, bias)
  assert len(calls) == 1
  np.testing.assert_allclose(y, jax.nn.relu(_lax_conv(x, k) + bias), rtol=1e-4, atol=1e-4)

  def grads(impl_):
    loss = lambda x, k, b: jnp.sum(f(impl_)(x, k, b) * dy)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, k, bias)
  got = grads(impl)
  assert len(calls) == 1  # the train step never traced the Winograd forward
  for a, b in zip(got, grads(ref_impl)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))


def test_winograd_rule_of_auto():
  f32 = jnp.float32
  assert conv.use_winograd((2, 448, 448, 64), 64, f32, "auto")        # conv1_2
  assert conv.use_winograd((2, 28, 28, 512), 512, f32, "auto")        # 98 tiles
  assert conv.use_winograd((1, 32, 32, 512), 512, f32, "auto")        # 64 tiles
  assert not conv.use_winograd((1, 28, 28, 512), 512, f32, "auto")    # 49 tiles
  assert not conv.use_winograd((2, 448, 448, 3), 64, f32, "auto")     # conv1_1
  assert not conv.use_winograd((32, 12, 12, 64), 64, f32, "auto")     # 0.34 GFLOP
  assert not conv.use_winograd((2, 448, 448, 64), 64, jnp.bfloat16, "auto")
  assert not conv.use_winograd((2, 448, 448, 64), 64, f32, "xla")
  assert not conv.use_winograd((2, 448, 448, 64), 64, f32, "patches")
  assert conv.use_winograd((1, 2, 2, 1), 1, f32, "winograd")
  with pytest.raises(ValueError, match="impl"):
    conv.use_winograd((1, 4, 4, 1), 1, f32, "winograd6")


def test_default_tiles_per_band():
  # At least 2**17 products per transform point, at least 256 tiles (winograd.py).
  assert [winograd.default_tiles_per_band(c) for c in (64, 128, 256, 512)] == [
      2048, 1024, 512, 256]
  assert winograd.default_tiles_per_band(4096) == winograd.MIN_TILES_PER_BAND


@pytest.mark.parametrize("shape,band_pixels", [
    ((2, 9, 7, 3, 64), 2**15),  # odd sizes, one band per image
    ((2, 12, 5, 3, 8), 20),     # 20 // 5 = 4-row bands: 3 per image
    ((1, 7, 6, 2, 3), 6),       # 1-row bands (7 is prime)
    ((1, 1, 1, 3, 2), 2**15),   # a single pixel: every tap but the centre is padding
])
def test_im2col_float64_equals_direct_convolution(shape, band_pixels):
  b, h, w, cin, cout = shape
  x, k, bias = _rand(40, (b, h, w, cin)), _rand(41, (3, 3, cin, cout)), _rand(42, (cout,))
  with jax.enable_x64(True):
    got = jax.jit(functools.partial(conv.im2col_conv3x3, band_pixels=band_pixels,
                                    activation=jax.nn.relu))(
        *(jnp.asarray(a, jnp.float64) for a in (x, k, bias)))
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got), np.maximum(_np_conv(
      *(a.astype(np.float64) for a in (x, k, bias))), 0), rtol=1e-12, atol=1e-12)


def test_im2col_band_rows():
  assert conv.im2col_band_rows(512, 512) == 64   # conv1_1 at 512: 32768 pixels a band
  assert conv.im2col_band_rows(448, 448) == 64   # 73 rows fit; 64 divides 448
  assert conv.im2col_band_rows(7, 10, 35) == 1   # 3 rows fit; 7 is prime
  assert conv.im2col_band_rows(3, 10**6) == 1    # never below one row


def test_im2col_rule_of_auto():
  f32 = jnp.float32
  assert conv.use_im2col((2, 448, 448, 3), 64, f32, "auto")        # conv1_1, 1.4 GFLOP
  assert conv.use_im2col((1, 448, 448, 3), 64, f32, "auto")        # 0.69 GFLOP
  assert not conv.use_im2col((1, 224, 224, 3), 64, f32, "auto")    # 0.17 GFLOP
  assert not conv.use_im2col((100, 112, 112, 3), 8, f32, "auto")   # the width/8 demo
  assert not conv.use_im2col((2, 448, 448, 64), 64, f32, "auto")   # Winograd's
  assert not conv.use_im2col((2, 448, 448, 3), 64, jnp.bfloat16, "auto")
  for impl in ("xla", "patches", "winograd"):
    assert not conv.use_im2col((2, 448, 448, 3), 64, f32, impl)


def test_im2col_only_when_not_differentiated(monkeypatch):
  """'auto' evaluates conv1_1-like layers by im2col; differentiated, it is XLA's forward
  and the matmul kernel gradient ('patches'), as before: equal gradients, ReLU included,
  and a differentiated forward that never traces the im2col product."""
  calls = []
  original = conv.im2col_conv3x3
  monkeypatch.setattr(conv, "im2col_conv3x3",
                      lambda *a, **kw: calls.append(a[0].shape) or original(*a, **kw))
  x = jnp.asarray(_rand(43, (1, 400, 400, 3)))  # 0.55 GFLOP with 64 outputs
  k, bias = jnp.asarray(_rand(44, (3, 3, 3, 64), 0.2)), jnp.asarray(_rand(45, (64,), 0.1))
  dy = jnp.asarray(_rand(46, (1, 400, 400, 64)))
  assert conv.use_im2col(x.shape, 64, x.dtype, "auto") and conv.use_patches(x.shape, "auto")

  def f(impl):
    return lambda x, k, b: conv.conv3x3(x, k, b, impl=impl, activation=jax.nn.relu)
  y = jax.jit(f("auto"))(x, k, bias)
  assert len(calls) == 1
  np.testing.assert_allclose(y, jax.nn.relu(_lax_conv(x, k) + bias), rtol=1e-5, atol=1e-5)

  def grads(impl):
    loss = lambda x, k, b: jnp.sum(f(impl)(x, k, b) * dy)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, k, bias)
  got = grads("auto")
  assert len(calls) == 1
  for a, b in zip(got, grads("patches")):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize("shape,tiles_per_band", [
    ((2, 12, 8, 3, 4), 1000),  # one band
    ((1, 16, 12, 2, 3), 3),    # 1-tile-row bands (4 output rows: 2 pooled)
    ((3, 10, 6, 2, 2), 2),     # the last band past the bottom edge: junk rows cropped
    ((1, 9, 7, 2, 3), 4),      # odd sizes: pooled after the loop, the last row/column dropped
])
def test_winograd_pool_equals_max_pool_of_the_output(shape, tiles_per_band):
  b, h, w, cin, cout = shape
  x, k, bias = _rand(50, (b, h, w, cin)), _rand(51, (3, 3, cin, cout)), _rand(52, (cout,))
  with jax.enable_x64(True):
    args = [jnp.asarray(a, jnp.float64) for a in (x, k, bias)]
    got = jax.jit(functools.partial(winograd.winograd_conv3x3, tiles_per_band=tiles_per_band,
                                    activation=jax.nn.relu, pool=True))(*args)
  ref = np.maximum(_np_conv(*(a.astype(np.float64) for a in (x, k, bias))), 0)
  ref = ref[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, cout).max((2, 4))
  assert got.shape == ref.shape
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["winograd", "auto", "patches", "xla"])
def test_conv3x3_pool_equals_nn_max_pool_forward_and_gradients(impl):
  """pool=True is relu(conv) then nn.max_pool, evaluated (Winograd pools in its bands) and
  differentiated (autodiff of nn.max_pool)."""
  x = jnp.asarray(_rand(53, (1, 84, 84, 128)))  # 'auto' takes Winograd (2.1 GFLOP, 441 tiles)
  k, bias = jnp.asarray(_rand(54, (3, 3, 128, 128), 0.03)), jnp.asarray(_rand(55, (128,), 0.1))
  dy = jnp.asarray(_rand(56, (1, 42, 42, 128)))
  assert conv.use_winograd(x.shape, 128, x.dtype, impl) == (impl in ("winograd", "auto"))
  fused = lambda x, k, b: conv.conv3x3(x, k, b, impl=impl, activation=jax.nn.relu, pool=True)
  plain = lambda x, k, b: nn.max_pool(jax.nn.relu(_lax_conv(x, k) + b), (2, 2), strides=(2, 2))
  np.testing.assert_allclose(jax.jit(fused)(x, k, bias), plain(x, k, bias), rtol=1e-4,
                             atol=1e-4)

  def grads(f):
    return jax.jit(jax.grad(lambda x, k, b: jnp.sum(f(x, k, b) * dy), argnums=(0, 1, 2)))(
        x, k, bias)
  for a, b in zip(grads(fused), grads(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("shape,tiles_per_band,pool", [
    ((2, 9, 7, 3, 4, 5), 1000, False),  # odd sizes: one band, no loop, cropped
    ((3, 13, 6, 2, 3, 2), 1, True),     # 1-tile-row bands; the last past the bottom edge
    ((6, 5, 4, 2, 3, 3), 8, False),     # several whole images per band
    ((1, 16, 12, 3, 4, 2), 3, True),    # pooled in the bands
    ((1, 1, 1, 3, 2, 2), 1000, False),  # a single pixel
])
def test_winograd_input_conv_float64_equals_the_two_convolutions(shape, tiles_per_band, pool):
  """``input_conv``: the preceding conv computed band by band (im2col rows with a 2-row
  halo, zeros outside the image as this conv's SAME padding) is exact to rounding."""
  b, h, w, c0, c1, c2 = shape
  rng = np.random.default_rng(60)
  x, k0, b0, k, bias = (rng.normal(size=s) for s in (
      (b, h, w, c0), (3, 3, c0, c1), (c1,), (3, 3, c1, c2), (c2,)))
  with jax.enable_x64(True):
    got = jax.jit(lambda x, k0, b0, k, bias: winograd.winograd_conv3x3(
        x, k, bias, tiles_per_band=tiles_per_band, activation=jax.nn.relu, pool=pool,
        input_conv=(k0, b0, jax.nn.relu)))(*map(jnp.asarray, (x, k0, b0, k, bias)))
    assert got.dtype == jnp.float64
  ref = np.maximum(_np_conv(np.maximum(_np_conv(x, k0, b0), 0), k, bias), 0)
  if pool:
    ref = ref[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c2).max((2, 4))
  assert got.shape == ref.shape
  np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def _pair_operands():
  # conv1_1 -> conv1_2 of VGG at 400^2: 'auto' evaluates the first by im2col (0.55 GFLOP)
  # and the second by Winograd, so use_fused_pair holds.
  x = jnp.asarray(_rand(61, (1, 400, 400, 3)))
  k1, b1 = jnp.asarray(_rand(62, (3, 3, 3, 64), 0.2)), jnp.asarray(_rand(63, (64,), 0.1))
  k2, b2 = jnp.asarray(_rand(64, (3, 3, 64, 64), 0.05)), jnp.asarray(_rand(65, (64,), 0.1))
  assert conv.use_fused_pair(x.shape, 64, 64, x.dtype, "auto")
  return x, k1, b1, k2, b2


def test_use_fused_pair_rule():
  f32 = jnp.float32
  assert conv.use_fused_pair((2, 448, 448, 3), 64, 64, f32, "auto")       # VGG conv1_1 -> 1_2
  assert not conv.use_fused_pair((100, 112, 112, 3), 8, 8, f32, "auto")   # the width/8 demo
  assert not conv.use_fused_pair((1, 224, 224, 3), 64, 64, f32, "auto")   # conv1_1 on XLA's
  for impl in ("xla", "patches", "winograd"):
    assert not conv.use_fused_pair((2, 448, 448, 3), 64, 64, f32, impl)


def test_conv3x3_pair_fused_only_when_not_differentiated(monkeypatch):
  """Evaluated, one Winograd forward with ``input_conv`` and no im2col of the whole map;
  differentiated, exactly the two ``conv3x3`` calls: the same gradients, and the fused
  forward never traced."""
  calls = _count_winograd_traces(monkeypatch)
  x, k1, b1, k2, b2 = _pair_operands()
  dy = jnp.asarray(_rand(66, (1, 200, 200, 64)))
  pair = lambda x, k1, b1, k2, b2: conv.conv3x3_pair(x, k1, b1, k2, b2, activation=jax.nn.relu,
                                                     pool=True)
  chained = lambda x, k1, b1, k2, b2: conv.conv3x3(
      conv.conv3x3(x, k1, b1, activation=jax.nn.relu), k2, b2, activation=jax.nn.relu,
      pool=True)
  plain = lambda x, k1, b1, k2, b2: nn.max_pool(jax.nn.relu(_lax_conv(
      jax.nn.relu(_lax_conv(x, k1) + b1), k2) + b2), (2, 2), strides=(2, 2))
  y = jax.jit(pair)(x, k1, b1, k2, b2)
  assert len(calls) == 1 and calls[0] == x.shape  # the 3-channel input went in
  ref = plain(x, k1, b1, k2, b2)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))

  def grads(f):
    loss = lambda *a: jnp.sum(f(*a) * dy)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, k1, b1, k2, b2)
  got = grads(pair)
  assert len(calls) == 1
  for a, b in zip(got, grads(chained)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))


def test_vgg_block_fuses_conv1_1_into_conv1_2_and_uses_the_forms(monkeypatch):
  """The CPU kernels' block for VGG's block 1 (3 -> 64 -> 64, pooled): the same parameters
  and output as ``models.ConvBlock``, one Winograd forward with conv1_1 inside it, and the
  prepared Winograd kernel of the forms used."""
  x = _pair_operands()[0]
  block = lambda b: _Blocks(b, widths=((64, 64),))
  variables = block(models.ConvBlock).init(jax.random.key(0), x)
  calls = _count_winograd_traces(monkeypatch)
  u = winograd.transform_kernel(variables["params"]["a2"]["kernel"])
  prepared = {**variables, cpu.COLLECTION: {"a2": {"winograd_kernel": u}}}
  ref = jax.jit(block(models.ConvBlock).apply)(variables, x)
  ours = jax.jit(block(cpu.VGGBlock).apply)
  for v in (variables, prepared):
    got = ours(v, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
  assert len(calls) == 2 and all(c == x.shape for c in calls)  # 3 channels in: fused
  # The prepared kernel is the one used: a zero one leaves relu(bias) everywhere.
  zero = {**variables, cpu.COLLECTION: {"a2": {"winograd_kernel": 0 * u}}}
  got = ours(zero, x)
  np.testing.assert_array_equal(got, jnp.broadcast_to(
      jax.nn.relu(variables["params"]["a2"]["bias"]), got.shape))


# ----------------------------------------------------------------------------- the forms
# Compared in float64 (``jax.enable_x64``): the prepared and unprepared forwards are the same
# arithmetic but for the order of a few sums, so float64 makes equality a 1e-10 check.

C = 4
IMAGE = 64


def tiny_rma(impl="winograd", **kw):
  """A width/16 RMA with the CPU kernels of ``impl`` (float64 in these tests)."""
  dtype = kw.pop("dtype", jnp.float32)
  trunk = models.VGG16(width=16, dtype=dtype, block=kernels.vgg_block(impl))
  return models.RMA(trunk=trunk, num_classes=C, num_regions=3, x_dim=32, hidden_dim=16,
                    z_dim=16, dtype=dtype, dense=kernels.dense(impl), **kw)


def random_params(model, seed=0):
  """He-scaled random parameters of ``model`` (float64 under x64), theta bias as the model's."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))
  rng = np.random.default_rng(seed)

  def fill(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 10
    return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in))

  params = jax.tree.map(fill, shapes)["params"]
  params["attention"]["cell"]["zm"]["bias"] = jnp.asarray(models.DEFAULT_THETA_BIAS)
  return params


@pytest.fixture
def all_dense_transposed(monkeypatch):
  """Every dense kernel gets its (out, in) copy, so the tiny model exercises all of them."""
  monkeypatch.setattr(forms_lib, "MIN_TRANSPOSED_KERNEL_SIZE", 1)


def _paths(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_paths(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def test_forms_are_the_winograd_transforms_and_transposes(all_dense_transposed):
  with jax.enable_x64(True):
    model = tiny_rma(dtype=jnp.float64)
    params = random_params(model)
    got = _paths(cpu.evaluation_forms(params, "winograd"))
    kernel_leaves = {p[:-1]: v for p, v in _paths(params).items() if p[-1] == "kernel"}
    g = winograd.winograd_matrices(winograd.DEFAULT_WINOGRAD_TILE)[1]  # (6, 3)
    expected = set()
    for path, k in kernel_leaves.items():
      k = np.asarray(k)
      if k.ndim == 4:  # U[p, q, i, o] = sum_{h, w} G[p, h] k[h, w, i, o] G[q, w]
        u = np.einsum("ph,hwio,qw->pqio", g, k, g).reshape(36, *k.shape[2:])
        np.testing.assert_allclose(np.asarray(got[path + ("winograd_kernel",)]), u,
                                   rtol=0, atol=1e-12 * np.abs(u).max())
        expected.add(path + ("winograd_kernel",))
      else:
        np.testing.assert_array_equal(np.asarray(got[path + ("kernel_t",)]), k.T)
        expected.add(path + ("kernel_t",))
    assert set(got) == expected
    assert sum(p[-1] == "winograd_kernel" for p in got) == 13
    # 'patches' never runs Winograd: no transformed kernels, the copies only.
    assert all(p[-1] == "kernel_t" for p in _paths(cpu.evaluation_forms(params, "patches")))
    # 'auto' transforms only the layers its channel rule can choose (none at width 16).
    auto = _paths(cpu.evaluation_forms(params, "auto"))
    assert not [p for p in auto if p[-1] == "winograd_kernel"]


def test_auto_transforms_the_layers_with_64_channels_or_more():
  model = models.VGG16(width=2)  # conv1_1 3 -> 32 ... conv5_3 256 -> 256
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)["params"]
  got = cpu.evaluation_forms(params, "auto")
  want = [n for n in models.vgg16_layer_names()
          if params[n]["kernel"].shape[2] >= conv.AUTO_WINOGRAD_MIN_CHANNELS]
  assert sorted(got) == sorted(want) and "conv2_1" not in want and "conv2_2" in want


def test_the_modules_use_the_forms(all_dense_transposed):
  """Forms of changed kernels give exactly the scores of the changed parameters: the
  Winograd kernel of conv3_1 of 2x its kernel, and fc6's copy of 3x its kernel."""
  with jax.enable_x64(True):
    model = tiny_rma(dtype=jnp.float64)
    params = random_params(model)
    images = jax.random.normal(jax.random.key(1), (2, IMAGE, IMAGE, 3), jnp.float64)
    changed = jax.tree.map(lambda x: x, params)
    changed["trunk"]["conv3_1"]["kernel"] = 2 * params["trunk"]["conv3_1"]["kernel"]
    changed["attention"]["cell"]["fc6"]["kernel"] = 3 * params["attention"]["cell"]["fc6"]["kernel"]
    forms = cpu.evaluation_forms(params, "winograd")
    forms["trunk"]["conv3_1"]["winograd_kernel"] = winograd.transform_kernel(
        changed["trunk"]["conv3_1"]["kernel"])
    forms["attention"]["cell"]["fc6"]["kernel_t"] = changed["attention"]["cell"]["fc6"]["kernel"].T
    apply = jax.jit(model.apply)
    images = jnp.concatenate([images, images[::-1]])  # fc6 sees 4 rows: its copy is used
    assert images.shape[0] >= modules.DENSE_TRANSPOSED_MIN_ROWS
    want = apply({"params": changed}, images)
    got = apply({"params": params, cpu.COLLECTION: forms}, images)
    plain = apply({"params": params}, images)
    assert np.abs(np.asarray(want["scores"] - plain["scores"])).max() > 1e-3  # a real change
    for k in ("scores", "region_scores", "theta"):
      np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-10,
                                 atol=1e-10)


def test_prepared_ten_view_scores_equal_unprepared(all_dense_transposed):
  with jax.enable_x64(True):
    model = tiny_rma(dtype=jnp.float64)
    variables = {"params": random_params(model)}
    prepared = kernels.prepare_fn("winograd")(variables)
    assert prepared["params"] is variables["params"] and kernels.nbytes(prepared) > 0
    images = jax.random.normal(jax.random.key(2), (2, IMAGE + 16, IMAGE + 16, 3), jnp.float64)
    fn = views.make_scores_fn(model, crop_size=IMAGE)
    want, got = fn(variables, images), fn(prepared, images)
    for k in ("scores", "view_scores", "theta"):
      np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-10,
                                 atol=1e-10)
  # Nothing to prepare for the plain model, nor where an evaluation runs off the CPU.
  assert kernels.prepare_fn("xla")(variables) == variables


def test_validation_step_with_forms_equals_without_and_train_grads_ignore_them(
    all_dense_transposed):
  with jax.enable_x64(True):
    model = tiny_rma(dtype=jnp.float64, pixel_convention="caffe")
    params = random_params(model)
    rng = np.random.default_rng(3)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (2, IMAGE, IMAGE, 3), np.uint8)),
             "labels": jnp.asarray([[1, 0, 1, 0], [0, 1, 0, 0]], jnp.float64),
             "mask": jnp.ones((2,), jnp.float64)}
    step = jax.jit(functools.partial(steps.eval_step, apply_fn=model.apply,
                                     loss_cfg=steps.LossConfig()))
    want = step({"params": params}, batch)
    got = step({"params": params, cpu.COLLECTION: cpu.evaluation_forms(params, "winograd")}, batch)
    for k in ("loss", "weight", "scores"):
      np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-10)

  # Differentiated, a Winograd conv given its transformed kernel is XLA's conv: the kernel
  # gets the gradient, the transformed kernel none (float32; the same computation).
  x = jax.random.normal(jax.random.key(4), (2, 12, 12, 8))
  k = jax.random.normal(jax.random.key(5), (3, 3, 8, 8)) * 0.2
  b = jnp.linspace(-1, 1, 8)

  def loss(k, u):
    y = conv.conv3x3(x, k, b, impl="winograd", activation=jax.nn.relu, winograd_kernel=u)
    return jnp.sum(jnp.sin(y))

  dk_with, du = jax.grad(loss, argnums=(0, 1))(k, winograd.transform_kernel(k))
  dk_without = jax.grad(lambda k: loss(k, None))(k)
  np.testing.assert_array_equal(np.asarray(dk_with), np.asarray(dk_without))
  assert not np.any(np.asarray(du))


# ----------------------------------------------------------------------------- per platform


def _convolutions(exported) -> int:
  return exported.mlir_module().count("stablehlo.convolution")


def test_the_kernels_are_chosen_when_lowering_per_platform():
  """With conv_impl='auto', a function exported on this CPU host for CUDA or TPU has XLA's
  13 convolutions in the evaluation forward and, in the train step, as many as the plain
  model's (38: 13 forward, 12 input and 13 kernel gradients); lowered for the CPU, the same
  model runs the kernels: its train step computes the kernel gradients of the maps of
  >= 56x56 pixels as matrix products, and its full-width evaluation forward is Winograd and
  im2col products. Lowering only: nothing is compiled."""
  def model(impl, width=16):
    return models.RMA(trunk=models.VGG16(width=width, block=kernels.vgg_block(impl)),
                      dense=kernels.dense(impl), num_classes=5, num_regions=3, sample_size=3,
                      x_dim=32, hidden_dim=16, z_dim=16, pixel_convention="caffe")

  def exports(impl, platform, width=16, train=True):
    m = model(impl, width)
    params = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 448, 448, 3)))["params"]
    images = jax.ShapeDtypeStruct((2, 448, 448, 3), jnp.uint8)
    forward = export.export(jax.jit(lambda p, x: views.single_view_scores(
        m, {"params": p}, x)["scores"]), platforms=(platform,))(params, images)
    if not train:
      return _convolutions(forward), None
    tx = steps.optax.inject_hyperparams(steps.optax.sgd)(learning_rate=0.1)
    state = jax.eval_shape(lambda p: steps.TrainState.create(apply_fn=m.apply, params=p,
                                                             tx=tx), params)
    batch = {"image": images, "labels": jax.ShapeDtypeStruct((2, 5), jnp.float32),
             "mask": jax.ShapeDtypeStruct((2,), jnp.float32)}
    train = export.export(jax.jit(steps.train_step), platforms=(platform,))(
        state, batch, steps.LossConfig().as_arrays())
    return _convolutions(forward), _convolutions(train)

  assert exports("auto", "cuda") == exports("xla", "cpu") == (13, 38)
  assert exports("auto", "tpu") == (13, 38)
  forward, train = exports("auto", "cpu")
  assert train == 38 - 10  # conv1_1 ... conv4_3's kernel gradients at 448 ... 56 px
  # Full width at 448 px: the evaluation forward's Winograd and im2col products replace
  # every convolution.
  assert exports("auto", "cpu", width=1, train=False)[0] == 0


def _leaf_summary(x, seed):
  x = np.asarray(x, np.float32)
  r = np.random.default_rng(seed).standard_normal((3, x.size))
  return {"sha256": hashlib.sha256(x.tobytes()).hexdigest(),
          "norm": float(np.linalg.norm(x.astype(np.float64))),
          "proj": [float(v) for v in r @ x.reshape(-1).astype(np.float64)]}


def _cpu_flags() -> list[str]:
  with open("/proc/cpuinfo") as f:
    flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  return sorted(f for f in flags if f.startswith(("avx", "fma", "sse4")))


def kernel_outputs() -> dict[str, Any]:
  """The outputs ``kernels_dd9a62e.json`` holds, computed now (JSON-able): single-view and
  ten-view scores with the forms, and one train step's loss and gradients (their SHA-256,
  norm and three random projections per leaf)."""
  model = models.RMA(trunk=models.VGG16(width=1, block=kernels.vgg_block("auto")),
                     dense=kernels.dense("auto"), num_classes=5, num_regions=3, sample_size=3,
                     x_dim=1024, hidden_dim=32, z_dim=32, pixel_convention="caffe")
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  rng = np.random.default_rng(0)
  single = rng.integers(0, 256, (2, 272, 272, 3), dtype=np.uint8)
  ten = rng.integers(0, 256, (2, 288, 288, 3), dtype=np.uint8)
  train = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  labels = np.zeros((2, 5), np.float32)
  labels[0, 1] = labels[1, 3] = labels[1, 4] = 1
  variables = kernels.prepare_fn("auto")({"params": params})
  got = {"single_view": jax.jit(lambda v, x: views.single_view_scores(model, v, x))(
             variables, single),
         "ten_view": jax.jit(lambda v, x: views.ten_view_scores(model, v, x, crop_size=272))(
             variables, ten)}
  loss, grads = jax.jit(jax.value_and_grad(lambda p: steps.LossConfig().total_loss(
      model.apply({"params": p}, train), labels)[0]))(params)
  out = {"loss": float(loss), "cpu_flags": _cpu_flags(), "cpus": os.cpu_count(),
         "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  for protocol, values in got.items():
    out[protocol] = {k: np.asarray(v).tolist() for k, v in values.items()}
    out[f"{protocol}_sha256"] = {k: hashlib.sha256(np.asarray(v).tobytes()).hexdigest()
                                 for k, v in values.items()}
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
  out["grads"] = {name: _leaf_summary(flat[name], i) for i, name in enumerate(sorted(flat))}
  return out


@pytest.mark.slow
def test_cpu_outputs_equal_those_before_the_kernels_became_a_building_block():
  """tests/fixtures/kernels_dd9a62e.json: single-view and ten-view scores (with the forms)
  and one train step's loss and gradients of a full-width VGG-16 RMA whose evaluation runs
  the Winograd, im2col and fused-pair forwards and the transposed fc6 product, and whose
  gradient runs the matmul kernel gradient, as computed at dd9a62e (conv_impl='auto', the
  kernels inside the model). Computed as users compile it (XLA's default optimisation level,
  in a process of its own). The same kernels run now: bitwise equal on the CPU kind, core
  count and JAX the fixture was made with; elsewhere (other vector units round
  differently) equal to 1e-4."""
  with open(os.path.join(FIXTURES, "kernels_dd9a62e.json")) as f:
    fx = json.load(f)
  # The user's XLA flags, not the suite's faster-compiling ones (conftest.TEST_COMPILE_FLAGS).
  flags = [f for f in os.environ.get("RMA_TEST_XLA_FLAGS", "").split()
           if not f.startswith(("--xla_backend_optimization_level",
                                "--xla_cpu_use_fusion_emitters"))]
  root = os.path.dirname(FIXTURES)
  proc = subprocess.run(
      [sys.executable, "-c", "import json, test_kernels; "
       "print(json.dumps(test_kernels.kernel_outputs()))"],
      cwd=root, env=dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu",
                         PYTHONPATH=root + os.pathsep + os.path.dirname(root)),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.splitlines()[-1])
  # XLA:CPU emits code for the CPU's vector units unless told otherwise
  # (XLA_FLAGS=--xla_cpu_max_isa=AVX2 on an AVX-512 machine emulates an AVX2 one), and its
  # matrix products split their work by the number of cores.
  exact = (fx["cpu_flags"] == got["cpu_flags"] and fx["jax"] == got["jax"]
           and fx["cpus"] == got["cpus"] and not got["xla_flags"])
  for protocol in ("single_view", "ten_view"):
    for k, v in fx[protocol].items():
      if exact:
        assert got[f"{protocol}_sha256"][k] == fx[f"{protocol}_sha256"][k], (protocol, k)
      np.testing.assert_allclose(np.asarray(got[protocol][k], np.float32),
                                 np.asarray(v, np.float32), rtol=1e-4, atol=1e-4)
  assert got["loss"] == fx["loss"] if exact else abs(got["loss"] - fx["loss"]) < 1e-5
  assert sorted(got["grads"]) == sorted(fx["grads"])
  for name, want in fx["grads"].items():
    summary = got["grads"][name]
    if exact:
      assert summary["sha256"] == want["sha256"], name
    np.testing.assert_allclose(summary["norm"], want["norm"], rtol=1e-4)
    np.testing.assert_allclose(summary["proj"], want["proj"], rtol=0, atol=1e-3 * want["norm"])
