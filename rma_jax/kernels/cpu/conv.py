"""A 3x3 'SAME' convolution for VGG-16 on the CPU: a matmul kernel gradient, a Winograd forward.

Training. XLA:CPU lowers the forward convolution and the input gradient of a 3x3 conv to fast
kernels, but the *kernel* gradient of high-resolution, few-channel layers (VGG blocks 1-2)
becomes a generic convolution whose window is the whole image, preceded by two full
transposes (docs/performance.md). ``conv3x3`` keeps XLA's forward and input gradient (a
``jax.custom_vjp``) and computes the kernel gradient as a matrix product instead:

    dW[(kh, kw, ci), co] = sum_{b,h,w} xpad[b, h + kh, w + kw, ci] * dy[b, h, w, co]
                         = patches(x)^T @ dy,

where ``patches(x)`` is the im2col matrix of 9 shifted slices of the zero-padded input in
HWIO order, so the (9*Cin, Cout) result reshapes straight into the (3, 3, Cin, Cout)
kernel. It is accumulated over bands of image rows so each band's patch tile stays in
cache (``kernel_grad``).

Evaluation. When the convolution is not differentiated (evaluation, prediction), the same
``jax.custom_vjp``'s primal runs instead of its forward rule, and it can be Winograd's
minimal filtering F(4x4, 3x3) (``winograd``): 4x fewer multiplications than the direct
convolution, as 36 batched matrix products over channels; conv1_1 (3 input channels) is
banded im2col products (``im2col_conv3x3``), computed inside conv1_2's Winograd bands where
the two run in a row (``conv3x3_pair``). A train step still differentiates XLA's conv.

Every function here is the CPU's: ``rma_jax.kernels`` decides where they run (the rules of
``impl='auto'``, ``use_*``, are per shape; the platform is chosen when a function is lowered).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from rma_jax.kernels.cpu import winograd

Dtype = Any

IMPLS = ("xla", "patches", "winograd", "auto")
"""Values of ``impl``: plain lax conv + autodiff, the matmul kernel gradient, the Winograd
forward when not differentiated, or a per-shape choice of the last two (see ``conv3x3``)."""

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_PADDING = ((1, 1), (1, 1))

# The rules of impl='auto' (docs/performance.md, "A matmul kernel gradient", "Winograd",
# "Both cores in the band loops"): the matmul kernel gradient from 56x56 pixels up; the
# Winograd forward for layers of >= 64 input channels with enough tiles (its kernel transform
# must be repaid) and enough work (compile time); the banded im2col forward for layers with
# fewer input channels (VGG's conv1_1) and enough work.
AUTO_MIN_PIXELS = 56 * 56
AUTO_WINOGRAD_MIN_CHANNELS = 64
AUTO_WINOGRAD_MIN_TILES = 64
AUTO_WINOGRAD_MIN_FLOPS = 2e9
AUTO_IM2COL_MIN_FLOPS = 5e8
IM2COL_BAND_PIXELS = 2**15
"""Pixels per band of ``im2col_conv3x3``: a (pixels, 9 * Cin) patch tile that stays in cache."""

DEFAULT_CHUNK_BYTES = 4 * 2**20
"""Size of one patch tile of the banded kernel gradient (fits in a CPU's L2/L3)."""


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The forward convolution, exactly as ``nn.Conv`` calls it (NHWC/HWIO, padding 1)."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), _PADDING,
                                      dimension_numbers=_DIMENSION_NUMBERS)


def _patches_t(xt: jax.Array, rows: int, cols: int) -> jax.Array:
  """(C, rows+2, cols+2) padded, channels-major tile -> (9*C, rows*cols) patch matrix.

  Row ``(kh*3 + kw)*C + c`` holds ``xt[c, kh:kh+rows, kw:kw+cols]``: HWIO order, so the
  (9*C, Cout) product with the output gradient reshapes straight into a (3, 3, C, Cout)
  kernel.
  """
  c = xt.shape[0]
  return jnp.concatenate([xt[:, i:i + rows, j:j + cols] for i in range(3) for j in range(3)],
                         axis=0).reshape(9 * c, rows * cols)


def chunk_rows(height: int, width: int, in_channels: int, itemsize: int = 4,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
  """Rows of the image per band of the chunked kernel gradient.

  Returns:
    The largest divisor of ``height`` whose (9*in_channels, rows*width) patch tile of
    ``itemsize``-byte elements fits in ``chunk_bytes``; at least 1.
  """
  rows = max(1, min(height, chunk_bytes // (9 * in_channels * itemsize * width)))
  while height % rows:
    rows -= 1
  return rows


def kernel_grad(x: jax.Array, dy: jax.Array,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> jax.Array:
  """Gradient of ``sum(conv3x3(x, W) * dy)`` in ``W``, as matrix products.

  A ``lax.scan`` over bands of ``chunk_rows`` image rows: each step builds the band's
  (9*Cin, rows*W) patch tile from 9 shifted slices of the padded, channels-major input and
  adds tile @ dy_band (rows*W, Cout) to the (9*Cin, Cout) accumulator. XLA:CPU's fastest
  matmul form is (M, K) @ (K, N) with row-major operands, and a 9x-inflated patch matrix of a
  whole 448x448 image (hundreds of MB) would make building it memory-bound; a band of a few
  MB stays in cache between its construction and its matmul. Only x is transposed (once,
  fused with the padding); dy bands are contiguous reshapes.

  Under a mesh with the batch axis sharded, the scan slices across that axis, so XLA gathers
  ``x`` on every device (fine on a CPU; ``impl='auto'`` never takes this path elsewhere).

  Args:
    x: (B, H, W, Cin) input of the convolution.
    dy: (B, H, W, Cout) cotangent of its output.
    chunk_bytes: patch-tile size.

  Returns:
    (3, 3, Cin, Cout) kernel gradient in ``x.dtype``, accumulated in float32 (float64 for
    float64 inputs).
  """
  b, h, w, cin = x.shape
  cout = dy.shape[-1]
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  rows = chunk_rows(h, w, cin, x.dtype.itemsize, chunk_bytes)
  bands = h // rows
  xt = jnp.pad(x.transpose(0, 3, 1, 2), ((0, 0), (0, 0), (1, 1), (1, 1)))  # B,C,H+2,W+2
  dy_bands = dy.reshape(b * bands, rows * w, cout)

  def band(acc, inputs):
    idx, dy_band = inputs
    tile = jax.lax.dynamic_slice(xt, (idx // bands, 0, (idx % bands) * rows, 0),
                                 (1, cin, rows + 2, w + 2))[0]
    return acc + jnp.einsum("kp,po->ko", _patches_t(tile, rows, w), dy_band,
                            preferred_element_type=acc_dtype), None

  dw, _ = jax.lax.scan(band, jnp.zeros((9 * cin, cout), acc_dtype),
                       (jnp.arange(b * bands), dy_bands))
  return dw.reshape(3, 3, cin, cout).astype(x.dtype)


def im2col_band_rows(height: int, width: int, band_pixels: int = IM2COL_BAND_PIXELS) -> int:
  """The largest divisor of ``height`` whose bands of that many rows hold at most
  ``band_pixels`` pixels; at least 1."""
  rows = max(1, min(height, band_pixels // width))
  while height % rows:
    rows -= 1
  return rows


def im2col_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array, *,
                   activation: Callable[[jax.Array], jax.Array] | None = None,
                   band_pixels: int = IM2COL_BAND_PIXELS) -> jax.Array:
  """3x3 'SAME' convolution as banded matrix products: for each band of image rows, the
  (rows * W, 9 * Cin) patch matrix of 9 shifted slices of the zero-padded input (HWIO
  order) times the (9 * Cin, Cout) kernel, plus bias, then ``activation``, in a ``lax.scan``
  so that each band's patches stay in cache; the evaluation forward of few-channel layers.

  Args:
    x: (B, H, W, Cin).
    kernel: (3, 3, Cin, Cout) HWIO.
    bias: (Cout,).
    activation: elementwise function applied to the biased output.
    band_pixels: at most this many output pixels per band (``im2col_band_rows``).

  Returns:
    (B, H, W, Cout) in ``x.dtype``.
  """
  b, h, w, cin = x.shape
  cout = kernel.shape[-1]
  rows = im2col_band_rows(h, w, band_pixels)
  bands = h // rows
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # small: few channels

  def band(_, idx):
    t = jax.lax.dynamic_slice(xp, (idx // bands, idx % bands * rows, 0, 0),
                              (1, rows + 2, w + 2, cin))[0]
    return None, _activate(activation, winograd.patch_product(t, kernel, bias, rows, w))

  _, ys = jax.lax.scan(band, None, jnp.arange(b * bands))
  return ys.reshape(b, h, w, cout)


def _activate(activation, y, pool=False):
  if activation is not None and y.dtype == jnp.bfloat16:
    # XLA:CPU of jaxlib 0.12 (its YNNPACK fusions) turns two or more jitted bfloat16 convs,
    # each with a bf16 max(z, 0), followed by any reduction (the blocks' max pool, a mean)
    # into NaN/inf. A float32 ReLU is not fused so: op by op it gives the same values and
    # gradient, bitwise; jitted, XLA may round to bf16 at other places (scores differ
    # within bf16's rounding).
    y = activation(y.astype(jnp.float32)).astype(y.dtype)
  elif activation is not None:
    y = activation(y)
  # nn.max_pool, exactly as models.ConvBlock applies it (and so its gradient in a train step).
  return nn.max_pool(y, (2, 2), strides=(2, 2)) if pool else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _conv3x3_custom(x, kernel, bias, u, tile, backward, activation, pool):
  # The primal is what runs when the convolution is NOT differentiated (evaluation,
  # prediction): Winograd's F(tile x tile, 3 x 3) if a tile is given (with ``u``, its
  # transformed kernel, if precomputed), the banded im2col product for tile 'im2col', else
  # XLA's conv. Differentiated (a train step), JAX runs _fwd and _bwd instead: XLA's forward
  # always, and ``u`` gets a zero cotangent.
  if tile == "im2col":
    return _activate(None, im2col_conv3x3(x, kernel, bias, activation=activation), pool)
  if tile:
    return winograd.winograd_conv3x3(x, kernel, bias, tile=tile, activation=activation,
                                     transformed_kernel=u, pool=pool)
  return _activate(activation, _conv(x, kernel) + bias, pool)


def _fwd(x, kernel, bias, u, tile, backward, activation, pool):
  del tile, backward
  z = _conv(x, kernel) + bias
  keep_z = activation is not None or pool
  return _activate(activation, z, pool), (x, kernel, bias, z if keep_z else None,
                                          None if u is None else jnp.zeros_like(u))


def _bwd(tile, backward, activation, pool, res, dy):
  del tile
  x, kernel, bias, z, du = res
  if z is not None:  # exactly autodiff of activation(z) and the pooling, as applied outside
    dy = jax.vjp(lambda z_: _activate(activation, z_, pool), z)[1](dy)[0]
  if backward == "xla":  # exactly autodiff of the plain forward (impl='xla')
    return (*jax.vjp(lambda x_, k_, b_: _conv(x_, k_) + b_, x, kernel, bias)[1](dy), du)
  # Input gradient: the transposed convolution, exactly what autodiff of the forward gives
  # (XLA already sends it to its fast kernels).
  (dx,) = jax.linear_transpose(lambda x_: _conv(x_, kernel), x)(dy)
  dw = kernel_grad(x, dy)
  db = jnp.sum(dy, axis=(0, 1, 2), dtype=jnp.promote_types(dy.dtype, jnp.float32)
               ).astype(dy.dtype)
  return dx, dw, db, du


_conv3x3_custom.defvjp(_fwd, _bwd)


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def use_patches(in_shape: tuple[int, ...], impl: str) -> bool:
  """Whether ``impl`` means the matmul kernel gradient for an input of ``in_shape``
  (B, H, W, Cin) when the convolution is differentiated."""
  _check_impl(impl)
  if impl == "auto":
    _, h, w, _ = in_shape
    return h * w >= AUTO_MIN_PIXELS
  return impl == "patches"


def use_winograd(in_shape: tuple[int, ...], out_channels: int, dtype: Dtype,
                 impl: str) -> bool:
  """Whether ``impl`` means the Winograd forward for an input of ``in_shape`` (B, H, W, Cin)
  when the convolution is not differentiated ('auto': float32 only, where it wins by
  measurement)."""
  _check_impl(impl)
  if impl == "auto":
    b, h, w, cin = in_shape
    tile = winograd.DEFAULT_WINOGRAD_TILE
    tiles = b * -(-h // tile) * -(-w // tile)
    flops = 2 * 9 * b * h * w * cin * out_channels
    return (jnp.dtype(dtype) == jnp.float32 and cin >= AUTO_WINOGRAD_MIN_CHANNELS
            and tiles >= AUTO_WINOGRAD_MIN_TILES and flops >= AUTO_WINOGRAD_MIN_FLOPS)
  return impl == "winograd"


def use_im2col(in_shape: tuple[int, ...], out_channels: int, dtype: Dtype, impl: str) -> bool:
  """Whether ``impl`` means the banded im2col forward (``im2col_conv3x3``) for an input of
  ``in_shape`` (B, H, W, Cin) when the convolution is not differentiated: 'auto' only,
  float32, for layers with too few input channels for Winograd, at least as many output
  channels and ``AUTO_IM2COL_MIN_FLOPS`` (VGG's conv1_1)."""
  _check_impl(impl)
  b, h, w, cin = in_shape
  flops = 2 * 9 * b * h * w * cin * out_channels
  return (impl == "auto" and jnp.dtype(dtype) == jnp.float32
          and cin < AUTO_WINOGRAD_MIN_CHANNELS <= out_channels
          and flops >= AUTO_IM2COL_MIN_FLOPS)


def _for_tile(winograd_kernel: jax.Array | None, tile: int) -> jax.Array | None:
  """A precomputed transformed kernel if it is F(tile x tile, 3 x 3)'s, else ``None`` (then
  the Winograd forward transforms the kernel itself)."""
  if winograd_kernel is not None and winograd_kernel.shape[0] != (tile + 2) ** 2:
    return None
  return winograd_kernel


def conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, impl: str = "auto",
            tile: int = winograd.DEFAULT_WINOGRAD_TILE,
            activation: Callable[[jax.Array], jax.Array] | None = None,
            winograd_kernel: jax.Array | None = None, pool: bool = False) -> jax.Array:
  """3x3 convolution, stride 1, zero padding 1, plus bias, then ``activation``.

  Args:
    x: (B, H, W, Cin) input.
    kernel: (3, 3, Cin, Cout), same dtype as ``x``.
    bias: (Cout,), same dtype as ``x``.
    impl: 'xla' (``lax.conv_general_dilated`` + autodiff), 'patches' (same forward and
      input gradient, matmul kernel gradient via ``jax.custom_vjp``), 'winograd'
      (``winograd.winograd_conv3x3`` when not differentiated; differentiated, exactly
      'xla') or 'auto' (Winograd when not differentiated where ``use_winograd`` says it
      wins, the banded im2col product where ``use_im2col`` does (conv1_1), and the matmul
      kernel gradient for inputs of at least ``AUTO_MIN_PIXELS`` pixels; XLA otherwise).
    tile: Winograd output tile m of F(m x m, 3 x 3) (see ``winograd.winograd_conv3x3``).
    activation: optional elementwise function of the biased output (e.g. ``jax.nn.relu``);
      the Winograd forward applies it while writing each band, once; differentiated, its
      gradient is autodiff's.
    winograd_kernel: ``winograd.transform_kernel(kernel, tile)``, if precomputed (evaluation
      computes it once per parameter version, ``forms``); used only where the Winograd
      forward runs, ignored elsewhere.
    pool: then 2x2 max pooling, stride 2 (``nn.max_pool(y, (2, 2), strides=(2, 2))``);
      the Winograd forward applies it in each band's write, so that the full-size output is
      never written (VGG's blocks end so); differentiated, its gradient is autodiff's.

  Returns:
    (B, H, W, Cout), or (B, H // 2, W // 2, Cout) with ``pool``, in ``x.dtype``.
  """
  forward_winograd = use_winograd(x.shape, kernel.shape[-1], x.dtype, impl)
  backward = "patches" if use_patches(x.shape, impl) else "xla"
  if forward_winograd:
    return _conv3x3_custom(x, kernel, bias, _for_tile(winograd_kernel, tile), tile, backward,
                           activation, pool)
  if use_im2col(x.shape, kernel.shape[-1], x.dtype, impl):
    return _conv3x3_custom(x, kernel, bias, None, "im2col", backward, activation, pool)
  if backward == "xla":
    return _activate(activation, _conv(x, kernel) + bias, pool)
  return _activate(activation,
                   _conv3x3_custom(x, kernel, bias, None, None, backward, None, False), pool)


def use_fused_pair(in_shape: tuple[int, ...], mid_channels: int, out_channels: int,
                   dtype: Dtype, impl: str) -> bool:
  """Whether ``conv3x3_pair`` computes its first convolution inside the second's Winograd
  bands for an input of ``in_shape`` (B, H, W, Cin) when not differentiated: where 'auto'
  would evaluate the first by im2col (``use_im2col``) and the second by Winograd
  (``use_winograd``), i.e. VGG's conv1_1 -> conv1_2."""
  b, h, w, _ = in_shape
  return (use_im2col(in_shape, mid_channels, dtype, impl)
          and use_winograd((b, h, w, mid_channels), out_channels, dtype, impl))


def _chained(settings, x, kernel1, bias1, kernel2, bias2, winograd_kernel=None):
  impl, tile, activation, pool = settings
  y = conv3x3(x, kernel1, bias1, impl=impl, tile=tile, activation=activation)
  return conv3x3(y, kernel2, bias2, impl=impl, tile=tile, activation=activation,
                 winograd_kernel=winograd_kernel, pool=pool)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _pair_custom(x, kernel1, bias1, kernel2, bias2, u, settings):
  # Not differentiated: the second conv's Winograd forward computes the first's output band
  # by band. Differentiated: _fwd/_bwd of exactly the two convolutions (``u``: zero
  # cotangent).
  _, tile, activation, pool = settings
  return winograd.winograd_conv3x3(x, kernel2, bias2, tile=tile, activation=activation,
                                   transformed_kernel=u, pool=pool,
                                   input_conv=(kernel1, bias1, activation))


def _pair_fwd(x, kernel1, bias1, kernel2, bias2, u, settings):
  y, vjp = jax.vjp(functools.partial(_chained, settings), x, kernel1, bias1, kernel2, bias2)
  return y, (vjp, None if u is None else jnp.zeros_like(u))


def _pair_bwd(settings, res, dy):
  del settings
  vjp, du = res
  return (*vjp(dy), du)


_pair_custom.defvjp(_pair_fwd, _pair_bwd)


def conv3x3_pair(x: jax.Array, kernel1: jax.Array, bias1: jax.Array, kernel2: jax.Array,
                 bias2: jax.Array, *, impl: str = "auto",
                 tile: int = winograd.DEFAULT_WINOGRAD_TILE,
                 activation: Callable[[jax.Array], jax.Array] | None = None,
                 winograd_kernel: jax.Array | None = None, pool: bool = False) -> jax.Array:
  """Two 3x3 convolutions in a row: ``conv3x3(conv3x3(x, kernel1, bias1, activation),
  kernel2, bias2, activation, winograd_kernel, pool)``, both with ``impl`` and ``tile`` (see
  ``conv3x3``).

  Not differentiated, where ``use_fused_pair`` holds (VGG's conv1_1 -> conv1_2 under
  'auto'), the first one's output is computed band by band inside the second's Winograd
  forward, by im2col products with 2 halo rows a band (``winograd.winograd_conv3x3``'s
  ``input_conv``), and its full-size map is never stored; differentiated, and elsewhere,
  exactly the two calls.

  Args:
    x: (B, H, W, Cin).
    kernel1, bias1: (3, 3, Cin, Cmid), (Cmid,).
    kernel2, bias2: (3, 3, Cmid, Cout), (Cout,).
    winograd_kernel: the second conv's transformed kernel, if precomputed.

  Returns:
    (B, H, W, Cout), or (B, H // 2, W // 2, Cout) with ``pool``, in ``x.dtype``.
  """
  settings = (impl, tile, activation, pool)
  if not use_fused_pair(x.shape, kernel1.shape[-1], kernel2.shape[-1], x.dtype, impl):
    return _chained(settings, x, kernel1, bias1, kernel2, bias2, winograd_kernel)
  return _pair_custom(x, kernel1, bias1, kernel2, bias2, _for_tile(winograd_kernel, tile),
                      settings)
