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

from rma_jax import conv


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


@pytest.mark.parametrize("impl", ["xla", "patches", "auto"])
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
  """Data parallel as in rma_jax.train (batch sharded over a mesh): same gradients."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from rma_jax import conv
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
      print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
