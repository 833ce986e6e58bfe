"""Numerical cross-check against the independent PyTorch implementation (benchmarks/torch_rma.py).

Same weights in (our Flax parameters copied into the torch modules), same scores, region
scores, theta, losses and gradients out. Skipped cleanly when torch is not installed.

Both sides run in **float64**: JAX inside ``jax.enable_x64`` (a fixture around each test; the
models are built with ``dtype=float64``, the float32-initialised parameters cast to float64)
and torch with ``.double()``. Two correct implementations then differ only by float64
rounding (~1e-16 per operation, ~1e-13 after the trunk and the K+1 recurrent steps), so
every comparison is at 1e-8 relative (``RTOL``) and gives the same verdict on every CPU;
in float32 the rounding of the two sides' different operation orders is amplified by the
recurrence to 1e-4 and beyond, which said nothing about correctness. One float32 forward
and backward pass stays as a loose smoke check of the default dtype.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_rma as tr  # noqa: E402
from rma_jax import models, ops, steps, views  # noqa: E402

NUM_CLASSES = 5
DIMS = dict(num_classes=NUM_CLASSES, num_regions=5, sample_size=7, width=16, x_dim=64,
            hidden_dim=64, z_dim=64)
RTOL = 1e-8  # relative; float64 gives ~1e-13 here


@pytest.fixture(autouse=True)
def float64(request):
  """Every test but the float32 smoke check runs with 64-bit JAX types (restored after)."""
  if request.function.__name__.startswith("test_float32"):
    yield
    return
  with jax.enable_x64(True):
    yield


def _flax_model(dtype=jnp.float64, **kw):
  return models.RMA(**{**DIMS, **kw}, dtype=dtype)


def _float64(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def _perturbed_params(model, key, size, kernel_scale=2.0):
  """Random float32 params (He-scaled normal kernels, small random biases; NumPy-drawn, as
  compiling ``model.init`` costs seconds per layer on CPU) with the theta head such that
  regions move around and reach beyond the map, exercising the sampler's interpolation and
  zero padding. (A large ``kernel_scale`` makes the recurrence chaotic; in float64 the two
  sides still agree.) float32 values, so that the torch copy (float32, then ``.double()``)
  is exact."""
  shapes = jax.eval_shape(model.init, key, jnp.zeros((1, size, size, 3), jnp.float32))
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))

  def fill(path, leaf):
    if str(getattr(path[-1], "key", path[-1])) == "bias":
      return jnp.asarray(0.1 * rng.normal(size=leaf.shape), jnp.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in), jnp.float32)

  params = jax.tree_util.tree_map_with_path(fill, shapes)["params"]
  zm = params["attention"]["cell"]["zm"]
  zm["kernel"] = jnp.asarray(kernel_scale * rng.normal(size=zm["kernel"].shape)
                             / np.sqrt(zm["kernel"].shape[0]), jnp.float32)
  zm["bias"] = jnp.asarray([0.6, 0.4, 0.2, -0.3] + 0.1 * rng.normal(size=4), jnp.float32)
  return params


def _torch_model(params, dtype=torch.float64, **kw):
  dims = {**DIMS, **kw}
  m = tr.TorchRMA(dims["num_classes"], dims["num_regions"], dims["sample_size"],
                  dims["width"], dims["x_dim"], dims["hidden_dim"], dims["z_dim"],
                  standard_lstm=dims.get("standard_lstm", False),
                  sampler=kw.get("sampler", "separable"))
  return tr.load_flax_params(m, jax.device_get(params)).to(dtype)


def _inputs(batch=3, size=64, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(0, 40.0, (batch, size, size, 3))
  labels = (rng.random((batch, NUM_CLASSES)) < 0.4).astype(np.float64)
  labels[0, :] = 0.0  # an image without labels: excluded from L_cls by both sides
  labels[1, 2] = 1.0
  return images, labels


def _nchw(x, dtype=torch.float64):
  return torch.from_numpy(np.asarray(x)).to(dtype).permute(0, 3, 1, 2).contiguous()


def _assert_close(ours, theirs, rtol=RTOL, name=""):
  """Element-wise within ``rtol`` of the reference's scale (relative to its largest entry)."""
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.dtype == theirs.dtype == np.float64, (name, ours.dtype, theirs.dtype)
  scale = np.max(np.abs(theirs))
  assert scale > 0, name
  np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("sampler,standard_lstm", [("grid_sample", False),
                                                   ("separable", True)])
def test_forward_and_losses_match_torch(sampler, standard_lstm):
  # torch's generic F.grid_sample path and its separable sampler, against our separable one.
  model = _flax_model(standard_lstm=standard_lstm)
  params = _perturbed_params(model, jax.random.key(0), 64)
  images, labels = _inputs()

  @jax.jit
  def forward(p, x, y):
    out = model.apply({"params": p}, x)
    return out, steps.LossConfig().total_loss(out, y)
  out, (loss, terms) = forward(_float64(params), images, labels)

  tm = _torch_model(params, standard_lstm=standard_lstm, sampler=sampler)
  with torch.no_grad():
    t_out = tm(_nchw(images))
    t_loss, t_cls, t_loc = tr.total_loss(t_out, torch.from_numpy(labels))

  # Regions really move: not all at the initial box, some beyond the map's edge.
  theta = np.asarray(out["theta"])
  assert np.ptp(theta[:, 1:, 2]) > 0.1
  assert (np.abs(theta[:, 1:, 2]) + np.abs(theta[:, 1:, 0]) > 1).any()
  for key in ("scores", "region_scores", "theta"):
    _assert_close(out[key], t_out[key].numpy(), name=key)
  _assert_close(terms["cls_loss"], t_cls.numpy(), name="cls_loss")
  _assert_close(terms["loc_loss"], t_loc.numpy(), name="loc_loss")
  _assert_close(loss, t_loss.numpy(), name="loss")


def _gradient_pairs(grads, tm):
  pairs = [(f"trunk/{n}/kernel", grads["trunk"][n]["kernel"],
            tm.trunk.convs[n].weight.grad.permute(2, 3, 1, 0))
           for n in models.vgg16_layer_names()]
  pairs += [("trunk/conv5_3/bias", grads["trunk"]["conv5_3"]["bias"],
             tm.trunk.convs["conv5_3"].bias.grad)]
  cell = grads["attention"]["cell"]
  for name in ("fc6", "lstm_x", "lstm_h", "hz", "zs", "zm"):
    pairs.append((f"{name}/kernel", cell[name]["kernel"], getattr(tm.cell, name).weight.grad.T))
  pairs.append(("zm/bias", cell["zm"]["bias"], tm.cell.zm.bias.grad))
  return [(name, np.asarray(ours), theirs.detach().numpy()) for name, ours, theirs in pairs]


def test_gradients_match_torch():
  """The backward pass: d loss / d every parameter, Flax vs torch autograd, in float64.

  The regions are off-centre and partly outside the map (the sampler's zero padding and
  its theta gradient are exercised); a sample landing exactly on a pixel centre, where the
  theta gradient is one-sided, is tested on its own below.
  """
  model = _flax_model()
  params = _perturbed_params(model, jax.random.key(1), 64, kernel_scale=0.3)
  images, labels = _inputs(seed=1)

  def loss_fn(p):
    out = model.apply({"params": p}, jnp.asarray(images))
    return steps.LossConfig().total_loss(out, jnp.asarray(labels))[0]
  grads = jax.jit(jax.grad(loss_fn))(_float64(params))

  tm = _torch_model(params)
  loss, _, _ = tr.total_loss(tm(_nchw(images)), torch.from_numpy(labels))
  loss.backward()
  for name, ours, theirs in _gradient_pairs(grads, tm):
    assert np.linalg.norm(theirs) > 0, name
    rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    assert rel < RTOL, (name, rel)


def test_ten_view_matches_torch():
  model = _flax_model()
  params = _perturbed_params(model, jax.random.key(2), 96)
  images, _ = _inputs(batch=2, size=96, seed=2)
  ours = jax.jit(lambda v, x: views.ten_view_scores(model, v, x, crop_size=64)["scores"])(
      {"params": _float64(params)}, jnp.asarray(images))
  tm = _torch_model(params)
  with torch.no_grad():
    theirs = tr.ten_view(tm, _nchw(images), crop_size=64)
  _assert_close(ours, theirs.numpy(), name="ten-view scores")


def _grid_sample(fmap_nchw, theta, size):
  """torch's generic sampler for (B, R, 4) transforms: ``F.affine_grid`` + ``F.grid_sample``."""
  b, r = theta.shape[:2]
  zero = torch.zeros_like(theta[..., 0])
  mats = torch.stack([torch.stack([theta[..., 0], zero, theta[..., 2]], -1),
                      torch.stack([zero, theta[..., 1], theta[..., 3]], -1)], -2)
  c = fmap_nchw.shape[1]
  grid = torch.nn.functional.affine_grid(mats.reshape(b * r, 2, 3), [b * r, c, *size],
                                         align_corners=False)
  out = torch.nn.functional.grid_sample(
      fmap_nchw.repeat_interleave(r, 0), grid, mode="bilinear", padding_mode="zeros",
      align_corners=False)
  return out.reshape(b, r, c, *size).permute(0, 1, 3, 4, 2)


def test_sampler_matches_grid_sample():
  """ops.sample_regions (separable) vs torch's generic F.grid_sample, incl. regions that
  leave the map, mirrored and zoomed-in ones, on a non-square map; values and both
  gradients."""
  rng = np.random.default_rng(3)
  fmap = rng.normal(size=(2, 5, 7, 3))
  theta = np.stack([rng.uniform(-1.2, 1.5, (2, 6)), rng.uniform(-1.2, 1.5, (2, 6)),
                    rng.uniform(-1.5, 1.5, (2, 6)), rng.uniform(-1.5, 1.5, (2, 6))], -1)
  probe = rng.normal(size=(2, 6, 4, 6, 3))
  ours, (g_f, g_t) = jax.jit(jax.value_and_grad(
      lambda f, t: jnp.sum(ops.sample_regions(f, t, (4, 6)) * probe), argnums=(0, 1)))(
          jnp.asarray(fmap), jnp.asarray(theta))
  src = torch.from_numpy(fmap).permute(0, 3, 1, 2).requires_grad_()
  th = torch.from_numpy(theta).requires_grad_()
  theirs = _grid_sample(src, th, (4, 6))
  (theirs * torch.from_numpy(probe)).sum().backward()
  _assert_close(ops.sample_regions(jnp.asarray(fmap), jnp.asarray(theta), (4, 6)),
                theirs.detach().numpy(), name="regions")
  _assert_close(ours, (theirs * torch.from_numpy(probe)).sum().detach().numpy(), name="sum")
  _assert_close(g_f, src.grad.permute(0, 2, 3, 1).numpy(), name="d/d features")
  _assert_close(g_t, th.grad.numpy(), name="d/d theta")


def test_theta_gradient_at_exact_pixel_centres_matches_grid_sample():
  """Samples exactly on pixel centres, where the tent weights have a kink: our theta
  gradient is grid_sample's (right-sided, floor-based) one.

  The grid is built here from exactly representable numbers (S = 4 samples, a power of two,
  on maps of 8 x 4 pixels), so every sample position is an exact pixel index in both
  implementations; F.affine_grid's own base grid is (linspace * (S-1)/S), which rounds.
  """
  rng = np.random.default_rng(4)
  h, w, s = 4, 8, 4
  fmap = rng.normal(size=(1, h, w, 2))
  # x pixel of sample j: 2 sx u_j * 4 + 4 tx + 3.5, y: 2 sy u_i * 2 + 2 ty + 1.5. Regions:
  # x at pixels 2..5 | 3..6 | 5..2 (mirrored) | 4..7 (the last one, whose right neighbour
  # is padding), y at 0..3, except the last region's 1..4 (4 is outside the map).
  theta = np.array([[[0.5, 1.0, 0.0, 0.0], [0.5, 1.0, 0.25, 0.0], [-0.5, 1.0, 0.0, 0.0],
                     [0.5, 1.0, 0.5, 0.5]]])
  u = (2 * np.arange(s) + 1) / s - 1  # output sample positions, exact
  probe = rng.normal(size=(1, theta.shape[1], s, s, 2))

  def readout(t):
    return jnp.sum(ops.sample_regions(jnp.asarray(fmap), t, s) * probe)
  g = np.asarray(jax.jit(jax.grad(readout))(jnp.asarray(theta)))

  th = torch.from_numpy(theta).requires_grad_()
  ut = torch.from_numpy(u)
  gx = th[..., 0, None, None] * ut[None, :] + th[..., 2, None, None]  # (1, R, 1, S): x
  gy = th[..., 1, None, None] * ut[:, None] + th[..., 3, None, None]  # (1, R, S, 1): y
  grid = torch.stack(torch.broadcast_tensors(gx, gy), -1).reshape(-1, s, s, 2)
  pix_x = ((grid[..., 0].detach().numpy() + 1) * w - 1) / 2
  pix_y = ((grid[..., 1].detach().numpy() + 1) * h - 1) / 2
  assert np.all(pix_x == np.round(pix_x)) and np.all(pix_y == np.round(pix_y))  # on centres
  src = torch.from_numpy(fmap).permute(0, 3, 1, 2).repeat_interleave(theta.shape[1], 0)
  out = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                                        align_corners=False)  # (R, C, S, S)
  (out.permute(0, 2, 3, 1)[None] * torch.from_numpy(probe)).sum().backward()
  assert np.abs(th.grad.numpy()).max() > 0.1
  _assert_close(g, th.grad.numpy(), name="d/d theta at pixel centres")
  # The symmetric (central) difference, what autodiff of max(0, 1 - |d|) gave, differs.
  central = jax.jit(jax.grad(lambda t: jnp.sum(
      jnp.einsum("brih,bhwc,brjw->brijc",
                 _central_tent(t[..., 1], t[..., 3], s, h), jnp.asarray(fmap),
                 _central_tent(t[..., 0], t[..., 2], s, w)) * probe)))(jnp.asarray(theta))
  assert np.abs(np.asarray(central) - g).max() > 1e-3


def _central_tent(scale, shift, out_size, in_size):
  """max(0, 1 - |d|) as autodiff sees it (0 and half weights at d = 0): the old weights."""
  out = (2.0 * jnp.arange(out_size) + 1.0) / out_size - 1.0
  pix = ((scale[..., None] * out + shift[..., None] + 1.0) * in_size - 1.0) / 2.0
  return jnp.maximum(0.0, 1.0 - jnp.abs(pix[..., :, None] - jnp.arange(in_size)))


def test_float32_smoke():
  """The default float32 path against torch in float32, loosely: a gross error (a wrong
  layer, a transposed kernel) shows up as O(1) differences, rounding as < 1e-3."""
  model = _flax_model(dtype=jnp.float32)
  params = _perturbed_params(model, jax.random.key(1), 64, kernel_scale=0.3)
  images, labels = _inputs(seed=1)
  images, labels = images.astype(np.float32), labels.astype(np.float32)

  def loss_fn(p):
    out = model.apply({"params": p}, jnp.asarray(images))
    return steps.LossConfig().total_loss(out, jnp.asarray(labels))[0], out
  (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert out["scores"].dtype == grads["trunk"]["conv1_1"]["kernel"].dtype == jnp.float32

  tm = _torch_model(params, dtype=torch.float32)
  t_out = tm(_nchw(images, torch.float32))
  t_loss, _, _ = tr.total_loss(t_out, torch.from_numpy(labels))
  t_loss.backward()
  np.testing.assert_allclose(np.asarray(out["scores"]), t_out["scores"].detach().numpy(),
                             rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-3)
  for name, ours, theirs in _gradient_pairs(grads, tm):
    rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    assert rel < 1e-2, (name, rel)
