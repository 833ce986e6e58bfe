"""rma_jax.conv: the custom-VJP 3x3 convolution equals nn.Conv, forward and gradients."""

import functools
import os
import subprocess
import sys
import textwrap
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rma_jax import conv, winograd


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


@pytest.mark.parametrize("method", ["chunked", "concat", "lax_patches"])
@pytest.mark.parametrize("shape,chunk_bytes", [
    ((2, 7, 5, 3, 4), conv.DEFAULT_CHUNK_BYTES),  # odd, non-square map: one band per image
    ((2, 12, 6, 4, 5), 9 * 4 * 4 * 6 * 5),        # forces 12 // 5 -> 4-row bands (3 per image)
    ((1, 9, 8, 2, 3), 1),                          # 1-row bands
])
def test_kernel_grad_equals_loop_reference(method, shape, chunk_bytes):
  b, h, w, cin, cout = shape
  x, dy = _rand(0, (b, h, w, cin)), _rand(1, (b, h, w, cout))
  got = jax.jit(lambda x, dy: conv.kernel_grad(x, dy, method, chunk_bytes))(x, dy)
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


def test_params_and_init_match_nn_conv():
  x = jnp.ones((1, 8, 8, 3))
  ours = conv.Conv3x3(6).init(jax.random.key(0), x)
  theirs = nn.Conv(6, (3, 3), padding=1).init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
  assert ours["params"]["kernel"].shape == (3, 3, 3, 6)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)


class _TwoConvs(nn.Module):
  """conv(8) -> ReLU -> conv(5), each layer built by ``make(features, name)``."""
  make: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.make(8, name="a")(x))
    return self.make(5, name="b")(x)


@pytest.mark.parametrize("impl", ["xla", "patches", "winograd", "auto"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_nn_conv_forward_and_gradients(impl, dtype):
  """Output and all gradients against nn.Conv with the same params, under jit.

  float32: equal to rounding. bfloat16 compute (float32 params): the output and input
  gradient come from the same XLA ops as nn.Conv's bf16 ones; the parameter gradients are
  rounded differently (the custom VJP accumulates in float32), so each must be at least as
  close to the float32 gradient (relative L2 error) as nn.Conv's own bf16 one, or within 1 %.
  """
  def ours(f, name, dt=dtype):
    return conv.Conv3x3(f, dtype=dt, param_dtype=jnp.float32, name=name, impl=impl)

  def theirs(f, name, dt=dtype):
    return nn.Conv(f, (3, 3), padding=1, dtype=dt, param_dtype=jnp.float32, name=name)

  x = jnp.asarray(_rand(6, (2, 60, 58, 3)))  # 3480 px >= AUTO_MIN_PIXELS: auto -> patches
  dy = jnp.asarray(_rand(7, (2, 60, 58, 5)))
  params = _TwoConvs(theirs).init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape),
                        params)  # nonzero biases

  def run(make):
    def loss(params, x):
      y = _TwoConvs(make).apply({"params": params}, x)
      return jnp.sum(y.astype(jnp.float32) * dy), y
    (gp, gx), y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return {"y": y, "x": gx, "params": gp}

  got, ref = run(ours), run(theirs)
  assert got["y"].dtype == dtype and got["params"]["a"]["kernel"].dtype == jnp.float32

  def close(a, b, tol=1e-5 if dtype == jnp.float32 else 1e-2):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())

  close(got["y"], ref["y"])
  close(got["x"], ref["x"])
  if dtype == jnp.float32:
    jax.tree.map(close, got["params"], ref["params"])
  else:
    ref32 = run(functools.partial(theirs, dt=jnp.float32))["params"]
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
  class Block(nn.Module):
    impl: str
    remat: bool

    @nn.compact
    def __call__(self, x):
      def body(mdl, x):
        x = nn.relu(conv.Conv3x3(8, impl=mdl.impl, name="c1")(x))
        return nn.relu(conv.Conv3x3(8, impl=mdl.impl, name="c2")(x))
      fn = nn.remat(body) if self.remat else body
      return fn(self, x)

  x = jnp.asarray(_rand(12, (2, 16, 12, 4)))
  params = Block("xla", False).init(jax.random.key(3), x)["params"]

  def grads(impl, remat):
    f = lambda p: jnp.sum(Block(impl, remat).apply({"params": p}, x) ** 2)
    return jax.jit(jax.grad(f))(params)

  ref = grads("xla", False)
  for impl, remat in (("patches", True), ("patches", False), ("xla", True)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4),
                 grads(impl, remat), ref)


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
  """Data parallel as in rma_jax.train (batch sharded over a mesh): same gradients, and the
  same Winograd forward."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from rma_jax import conv, winograd
      assert jax.device_count() == 4
      mesh = Mesh(np.array(jax.devices()), ("data",))
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
      print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


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


def test_apply_pair_equals_the_two_modules(monkeypatch):
  """``conv.apply_pair`` in a parent module (as VGG16's block 1): the same parameters as
  two ``Conv3x3`` calls, the same output, the prepared Winograd kernel used."""

  class Pair(nn.Module):
    fuse: bool

    def setup(self):
      self.a = conv.Conv3x3(64, activation=nn.relu)
      self.b = conv.Conv3x3(64, activation=nn.relu, pool=True)

    def __call__(self, x):
      return conv.apply_pair(self.a, self.b, x) if self.fuse else self.b(self.a(x))

  x = _pair_operands()[0]
  variables = Pair(True).init(jax.random.key(0), x)
  assert (jax.tree.map(jnp.shape, variables)
          == jax.tree.map(jnp.shape, Pair(False).init(jax.random.key(0), x)))
  calls = _count_winograd_traces(monkeypatch)
  u = winograd.transform_kernel(variables["params"]["b"]["kernel"])
  prepared = {**variables, conv.INFERENCE_COLLECTION: {"b": {"winograd_kernel": u}}}
  ref = jax.jit(Pair(False).apply)(variables, x)
  for v in (variables, prepared):
    got = jax.jit(Pair(True).apply)(v, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
  assert len(calls) == 3 and all(c == x.shape for c in calls[1:])  # ref's: 64 channels
  # The prepared kernel is the one used: a zero one leaves relu(bias) everywhere.
  zero = {**variables, conv.INFERENCE_COLLECTION: {"b": {"winograd_kernel": 0 * u}}}
  got = jax.jit(Pair(True).apply)(zero, x)
  np.testing.assert_array_equal(got, jnp.broadcast_to(
      jax.nn.relu(variables["params"]["b"]["bias"]), got.shape))
