"""Winograd's minimal filtering F(m x m, 3 x 3) for the 3x3 'SAME' convolutions of VGG-16.

The evaluation forward of ``conv.conv3x3`` (impl 'winograd', and 'auto' where
``conv.use_winograd`` says it wins): 4x fewer multiplications than the direct convolution
for m = 4, as 36 batched matrix products over channels, in bands of tiles that stay in cache
(``winograd_conv3x3``). Never differentiated: a train step differentiates XLA's conv.
"""

from __future__ import annotations

import fractions
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# F(4x4, 3x3), by measurement (docs/performance.md, "Winograd"): F(2x2, 3x3)'s fewer
# multiplications do not pay for its 4x the transformed data; F(6x6, 3x3) is no faster and
# twice as inexact.
DEFAULT_WINOGRAD_TILE = 4

# Bands of tiles that stay in cache, and of enough products per transform point (tiles x
# C_out) that XLA:CPU runs a band's batched matmul on every core (docs/performance.md,
# "Both cores in the band loops").
MIN_TILES_PER_BAND = 256
MIN_BAND_PRODUCTS = 2**17


def default_tiles_per_band(out_channels: int) -> int:
  """Tiles per band of ``winograd_conv3x3`` for ``out_channels`` (see MIN_BAND_PRODUCTS)."""
  return max(MIN_TILES_PER_BAND, MIN_BAND_PRODUCTS // max(1, out_channels))

WINOGRAD_TILES = (2, 4, 6)
"""Output tile sizes m of the Winograd algorithms F(m x m, 3 x 3) that ``winograd_conv3x3``
implements (input tiles of n = m + 2 pixels, n*n transform points)."""

# Cook-Toom interpolation points of F(m, 3) (plus the point at infinity): the usual small
# ones (Lavin & Gray 2016; NNPACK's for F(6, 3)), which keep the transform matrices' norms,
# and so the float error, lowest.
_WINOGRAD_POINTS = {2: (0, 1, -1), 4: (0, 1, -1, 2, -2),
                    6: (0, 1, -1, 2, -2, fractions.Fraction(1, 2), fractions.Fraction(-1, 2))}


@functools.lru_cache(maxsize=None)
def winograd_matrices(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The transform matrices of F(m, 3) for ``m = tile``, from its Cook-Toom points.

  With n = m + 2, points a_0..a_{n-2} and M(x) = prod_j (x - a_j):
  ``A^T[i, j] = a_j^i`` (output transform), ``G[j, k] = a_j^k / prod_{l != j}(a_j - a_l)``
  (kernel transform) and ``B^T[j]`` = the coefficients of M(x) / (x - a_j) (input
  transform), each with a last column / row for the point at infinity. Then for a 1-D input
  tile d (n,) and filter g (3,), ``A^T ((G g) * (B^T d))[i] = sum_k d[i + k] g[k]``; in 2-D
  ``Y = A^T ((G g G^T) * (B^T d B)) A`` is the m x m output of an n x n tile.

  Returns:
    ``(AT, G, BT)``: float64 arrays of shapes (m, n), (n, 3), (n, n), computed exactly in
    rationals (every entry of ``AT`` and ``BT`` is a dyadic rational, exact in float32).
  """
  if tile not in _WINOGRAD_POINTS:
    raise ValueError(f"Winograd tile must be one of {WINOGRAD_TILES}, got {tile!r}")
  frac = fractions.Fraction
  a = [frac(p) for p in _WINOGRAD_POINTS[tile]]
  n = tile + 2

  def poly_mul(p, q):  # coefficients, lowest degree first
    r = [frac(0)] * (len(p) + len(q) - 1)
    for i, pi in enumerate(p):
      for j, qj in enumerate(q):
        r[i + j] += pi * qj
    return r

  def poly_without(skip):  # prod_{l != skip} (x - a_l)
    p = [frac(1)]
    for l, al in enumerate(a):
      if l != skip:
        p = poly_mul(p, [-al, frac(1)])
    return p

  at = [[aj ** i for aj in a] + [frac(int(i == tile - 1))] for i in range(tile)]
  g = [[aj ** k / np.prod([aj - al for l, al in enumerate(a) if l != j]) for k in range(3)]
       for j, aj in enumerate(a)] + [[frac(0), frac(0), frac(1)]]
  bt = [poly_without(j) + [frac(0)] for j in range(n - 1)] + [poly_without(None)]
  return tuple(np.array([[float(v) for v in row] for row in m_], np.float64)
               for m_ in (at, g, bt))


def _lincomb(coeffs: Sequence[float], terms: Sequence[jax.Array]) -> jax.Array:
  """sum_i coeffs[i] * terms[i], skipping zero coefficients and multiplying by no +-1."""
  out = None
  for c, t in zip(coeffs, terms):
    if c == 0:
      continue
    t = t if c == 1 else -t if c == -1 else float(c) * t
    out = t if out is None else out + t
  return out


def _winograd_input(xt: jax.Array, bt: np.ndarray, rows: int, cols: int) -> jax.Array:
  """(..., rows*m+2, cols*m+2, C) padded band -> (n*n, ..., rows, cols, C): ``B^T d B`` of
  every n x n tile d (tile (i, j) starts at pixel (i*m, j*m); tiles overlap by 2 pixels),
  point (p, q) at index p*n + q.

  Separable, width first: n linear combinations of the n column-strided slices, then n of
  the n row-strided slices of that (all n width points at once). Each stage is one
  elementwise XLA fusion; the first is materialised by an optimisation barrier, else XLA
  recomputes it inside the second. Measured faster here than matmuls with B^T over
  stacked slices, or one combination per transform point.
  """
  n = bt.shape[0]
  m = n - 2
  xcols = [xt[..., :, c:c + (cols - 1) * m + 1:m, :] for c in range(n)]
  half = jax.lax.optimization_barrier(jnp.stack([_lincomb(bt[q], xcols) for q in range(n)]))
  xrows = [half[:, ..., a:a + (rows - 1) * m + 1:m, :, :] for a in range(n)]  # (q, ...)
  v = jnp.stack([_lincomb(bt[p], xrows) for p in range(n)])  # (p, q, ..., rows, cols, C)
  return v.reshape((n * n,) + v.shape[2:])


def transform_kernel(kernel: jax.Array, tile: int = DEFAULT_WINOGRAD_TILE) -> jax.Array:
  """(3, 3, Cin, Cout) HWIO kernel -> (n*n, Cin, Cout): ``G w G^T`` of F(tile x tile, 3 x 3)
  per channel pair, point (p, q) at index p*n + q (n = tile + 2), as one (n*n, 9) @
  (9, Cin*Cout) matmul with kron(G, G); computed in float32 for 16-bit kernels.

  ``winograd_conv3x3`` computes it on every call unless given it (``transformed_kernel``):
  evaluation computes it once per parameter version (``rma_jax.eval_params``).
  """
  g = winograd_matrices(tile)[1]
  kernel = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
  y = jnp.dot(jnp.asarray(np.kron(g, g), kernel.dtype), kernel.reshape(9, -1))
  return y.reshape(-1, *kernel.shape[2:])


def _winograd_output(prod: jax.Array, at: np.ndarray) -> jax.Array:
  """(n*n, ..., rows, cols, Cout) products -> (..., rows*m, cols*m, Cout): ``A^T M A``.

  Separable like ``_winograd_input``: m combinations over the height points (all width
  points at once), materialised, then m over the width points; then the m x m pixels of
  each tile moved into place (fused by XLA with the write of the band). Measured faster
  here than one (m*m, n*n) matmul with kron(A^T, A^T).
  """
  m, n = at.shape
  prod = prod.reshape((n, n) + prod.shape[1:])  # (p, q, ...)
  half = jax.lax.optimization_barrier(
      jnp.stack([_lincomb(at[i], [prod[p] for p in range(n)]) for i in range(m)]))  # (i, q, .)
  y = jnp.stack([_lincomb(at[j], [half[:, q] for q in range(n)]) for j in range(m)])
  nd = y.ndim  # y: (j, i, ..., rows, cols, Cout) -> (..., rows, i, cols, j, Cout)
  y = y.transpose(*range(2, nd - 3), nd - 3, 1, nd - 2, 0, nd - 1)
  *lead, rows, _, cols, _, cout = y.shape
  return y.reshape(*lead, rows * m, cols * m, cout)


def winograd_bands(batch: int, tile_rows: int, tile_cols: int,
                   tiles_per_band: int) -> tuple[int, int]:
  """(images, tile rows) per band of ``winograd_conv3x3``, divisors of ``batch`` and
  ``tile_rows``: whole images, as many as fit in ``tiles_per_band`` tiles, if one does;
  else bands of one image's rows, as many as fit (at least one). Either way the bands,
  stacked in order, are the output's row-major layout: no transpose after the loop.
  """
  per_image = tile_rows * tile_cols
  if per_image <= tiles_per_band:
    images = min(batch, tiles_per_band // per_image)
    while batch % images:
      images -= 1
    return images, tile_rows
  rows = max(1, tiles_per_band // tile_cols)
  while tile_rows % rows:
    rows -= 1
  return 1, rows


def _fill_band(buf: jax.Array, x: jax.Array, image: jax.Array, row: jax.Array) -> jax.Array:
  """Writes the input of one band into ``buf``, the band's zero-padded input buffer.

  ``buf`` (images, rows + 2, width + 2, C) gets rows ``row - 1 .. row + rows`` of images
  ``image ..`` of the unpadded ``x`` (B, H, W, C) at columns 1 .. W, zeros for the rows
  outside the image (the 'SAME' padding); its other columns are never written, so they keep
  the zeros the buffer starts with. In-place updates of a loop carry: no padded copy of the
  whole input is made (a pad, or a concatenate of the slices, measured several times
  slower here).
  """
  images, rows, c = buf.shape[0], buf.shape[1] - 2, buf.shape[3]
  h, w = x.shape[1], x.shape[2]
  buf = jax.lax.dynamic_update_slice(
      buf, jax.lax.dynamic_slice(x, (image, row, 0, 0), (images, rows, w, c)), (0, 1, 1, 0))
  for at, r in ((0, row - 1), (rows + 1, row + rows)):  # the rows above and below
    got = jax.lax.dynamic_slice(x, (image, jnp.clip(r, 0, h - 1), 0, 0), (images, 1, w, c))
    got = jnp.where((r >= 0) & (r < h), got, jnp.zeros_like(got))
    buf = jax.lax.dynamic_update_slice(buf, got, (0, at, 1, 0))
  return buf


def patch_product(t: jax.Array, kernel: jax.Array, bias: jax.Array, rows: int,
                  width: int) -> jax.Array:
  """(..., rows + 2, width + 2, C) zero-padded input rows -> (..., rows, width, Cout): their
  3x3 convolution as one product of the (rows, width, 9 * C) patch matrix (9 shifted slices,
  HWIO order) with the (9 * C, Cout) ``kernel``, plus ``bias``: the im2col form, for few
  input channels (VGG's conv1_1; ``conv.im2col_conv3x3``)."""
  c = t.shape[-1]
  patches = jnp.concatenate([t[..., i:i + rows, j:j + width, :] for i in range(3)
                             for j in range(3)], axis=-1)
  return patches @ kernel.reshape(9 * c, -1) + bias


def _fill_band_from_conv(buf: jax.Array, xp: jax.Array, input_conv: tuple, height: int,
                         image: jax.Array, row: jax.Array) -> jax.Array:
  """``_fill_band`` for a band whose input is the output of a preceding 3x3 convolution.

  ``buf`` (images, R + 2, width + 2, Cin) gets rows ``row - 1 .. row + R`` of
  ``activation0(conv(x0, kernel0) + bias0)`` at columns 1 .. W, computed here by
  ``patch_product`` from ``xp``, the preceding conv's input x0 (B, H, W, C0) zero-padded by 2
  rows above, at least 2 below and 1 column each side; rows outside 0 .. ``height`` - 1 are
  zeros (this conv's 'SAME' padding), and so are the columns never written.
  """
  kernel0, bias0, activation0 = input_conv
  images, r2, w = buf.shape[0], buf.shape[1], xp.shape[2] - 2
  t = jax.lax.dynamic_slice(xp, (image, row, 0, 0), (images, r2 + 2, w + 2, xp.shape[3]))
  y = patch_product(t, kernel0, bias0, r2, w)
  y = y if activation0 is None else activation0(y)
  r = row - 1 + jnp.arange(r2)
  y = jnp.where(((r >= 0) & (r < height))[:, None, None], y, jnp.zeros_like(y))
  return jax.lax.dynamic_update_slice(buf, y.astype(buf.dtype), (0, 0, 1, 0))


def winograd_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array, *,
                     tile: int = DEFAULT_WINOGRAD_TILE,
                     tiles_per_band: int | None = None,
                     activation: Callable[[jax.Array], jax.Array] | None = None,
                     transformed_kernel: jax.Array | None = None,
                     pool: bool = False,
                     input_conv: tuple | None = None) -> jax.Array:
  """3x3 'SAME' convolution (stride 1, zero padding 1) by Winograd's minimal filtering.

  F(m x m, 3 x 3) (Lavin & Gray, "Fast algorithms for convolutional neural networks",
  2016): the zero-padded input is cut into n x n tiles (n = m + 2) overlapping by 2 pixels,
  each transformed to ``V = B^T d B``; the kernel to ``U = G g G^T``; then for each of the
  n*n transform points one matrix product over channels, ``M[p] = V[p] @ U[p]`` of
  (tiles, Cin) by (Cin, Cout) (one batched ``dot_general``); and each m x m output tile is
  ``A^T M A``. That is 9*m*m / (n*n) times fewer multiplications than the direct
  convolution: 2.25x for m = 2, 4x for m = 4, 5.06x for m = 6, in exchange for transforms
  that cost memory traffic and a float error that grows with m (tests/test_conv.py).
  Images whose size is not a multiple of m are padded up to one and cropped.

  The tiles are processed in bands of at most ``tiles_per_band`` tiles (``winograd_bands``,
  a ``lax.scan``), so that a band's input, transformed input and products stay in cache
  from the input slice to the output write; bias and ``activation`` are applied there too,
  so that the output is written once. With no more tiles than that in all, one band and no
  loop.

  Args:
    x: (B, H, W, Cin), or (B, H, W, C0) with ``input_conv``.
    kernel: (3, 3, Cin, Cout) HWIO.
    bias: (Cout,).
    tile: m, one of ``WINOGRAD_TILES``.
    tiles_per_band: band size in tiles; ``None``: ``default_tiles_per_band(Cout)``.
    activation: elementwise function applied to the biased output (e.g. ``jax.nn.relu``).
    transformed_kernel: ``transform_kernel(kernel, tile)`` if already computed, (n*n, Cin,
      Cout); then ``kernel`` is not read.
    pool: then 2x2 max pooling, stride 2 (``nn.max_pool(y, (2, 2), strides=(2, 2))``),
      applied in each band's write for even H and W (the output is written at a quarter of
      its size; VGG's blocks end so), after the loop otherwise.
    input_conv: ``(kernel0, bias0, activation0)``, (3, 3, C0, Cin), (Cin,) and an
      elementwise function or ``None``: then ``x`` (B, H, W, C0) is the input of a
      preceding 3x3 'SAME' convolution, ``activation0(conv(x, kernel0) + bias0)``, whose
      output is this convolution's input. Each band computes its rows of it (im2col
      products, ``patch_product``, 2 halo rows a band), so that its full-size map is never
      stored (VGG's conv1_1 -> conv1_2: 103 MB at 448², batch 2).

  Returns:
    (B, H, W, Cout), or (B, H // 2, W // 2, Cout) with ``pool``, in ``x.dtype``; computed
    in float32 for 16-bit inputs.
  """
  at, _, bt = winograd_matrices(tile)
  n = tile + 2
  b, h, w, cin = x.shape
  cout = bias.shape[-1]
  out_dtype = x.dtype
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  x, bias = x.astype(dtype), bias.astype(dtype)
  if input_conv is not None:
    kernel0, bias0, activation0 = input_conv
    input_conv = (kernel0.astype(dtype), bias0.astype(dtype), activation0)
    cin = kernel0.shape[-1]
  rows, cols = -(-h // tile), -(-w // tile)
  if transformed_kernel is None:
    u = transform_kernel(kernel.astype(dtype), tile)  # (n*n, Cin, Cout)
  elif transformed_kernel.shape != (n * n, cin, cout):
    raise ValueError(f"transformed_kernel of F({tile}x{tile}, 3x3) for {cin} -> {cout} "
                     f"channels must have shape {(n * n, cin, cout)}, got "
                     f"{transformed_kernel.shape}")
  else:
    u = transformed_kernel.astype(dtype)

  # Band heights (r * m rows) are even, so in-band pooling equals pooling the whole output.
  pool_in_bands = pool and h % 2 == 0 and w % 2 == 0

  def band(xt):  # (images, r*m+2, cols*m+2, Cin) -> (images, r*m, w, Cout), pooled: halved
    r = (xt.shape[1] - 2) // tile
    v = _winograd_input(xt, bt, r, cols).reshape(n * n, -1, cin)  # (n*n, tiles, Cin)
    prod = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))  # (n*n, tiles, Cout)
    y = _winograd_output(prod.reshape(n * n, xt.shape[0], r, cols, cout), at)[:, :, :w] + bias
    y = y if activation is None else activation(y)
    return max_pool_2x2(y) if pool_in_bands else y

  if tiles_per_band is None:
    tiles_per_band = default_tiles_per_band(cout)
  images, band_rows = winograd_bands(b, rows, cols, tiles_per_band)
  if input_conv is not None:  # band inputs computed from x (few channels), 2 halo rows each
    xp = jnp.pad(x, ((0, 0), (2, rows * tile + 2 - h), (1, 1), (0, 0)))
    fill = functools.partial(_fill_band_from_conv, xp=xp, input_conv=input_conv, height=h)
  elif rows * tile != h:  # the last band would read past the image: pad the bottom once
    fill = functools.partial(_fill_band, x=jnp.pad(x, ((0, 0), (0, rows * tile - h), (0, 0),
                                                       (0, 0))))
  else:
    fill = functools.partial(_fill_band, x=x)
  if images == b and band_rows == rows:  # one band: no loop
    if input_conv is None:
      xt = jnp.pad(x, ((0, 0), (1, rows * tile + 1 - h), (1, cols * tile + 1 - w), (0, 0)))
    else:
      xt = fill(jnp.zeros((b, rows * tile + 2, cols * tile + 2, cin), dtype), image=0, row=0)
    y = band(xt)
  else:
    row_bands = rows // band_rows

    def step(buf, idx):
      buf = fill(buf, image=idx // row_bands * images, row=idx % row_bands * band_rows * tile)
      return buf, band(buf)

    buf = jnp.zeros((images, band_rows * tile + 2, cols * tile + 2, cin), dtype)
    _, ys = jax.lax.scan(step, buf, jnp.arange(b // images * row_bands))
    scale = 2 if pool_in_bands else 1
    y = ys.reshape(b, rows * tile // scale, w // scale, cout)  # bands in row-major order
    # (rows * tile - h) zero-padded rows at the bottom of x gave rows of junk: cropped.
  if pool_in_bands:
    return y[:, :h // 2].astype(out_dtype)
  y = y[:, :h]
  return (max_pool_2x2(y) if pool else y).astype(out_dtype)


def max_pool_2x2(y: jax.Array) -> jax.Array:
  """(..., H, W, C) -> (..., H // 2, W // 2, C): 2x2 max pooling, stride 2, 'VALID' (a
  trailing odd row or column is dropped, as ``nn.max_pool``)."""
  *lead, h, w, c = y.shape
  y = y[..., :h // 2 * 2, :w // 2 * 2, :]
  return y.reshape(*lead, h // 2, 2, w // 2, 2, c).max(axis=(-4, -2))
