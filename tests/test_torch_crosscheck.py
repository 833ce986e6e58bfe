"""Numerical cross-check against the independent PyTorch implementation (benchmarks/torch_rma.py).

Same weights in (our Flax parameters copied into the torch modules), same scores, region
scores, theta, losses and gradients out. Skipped cleanly when torch is not installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rma_jax import bench, evaluate, models, ops, train  # noqa: E402

tr = bench.load_torch_rma()

NUM_CLASSES = 5
DIMS = dict(num_classes=NUM_CLASSES, num_regions=5, sample_size=7, width=16, x_dim=64,
            hidden_dim=64, z_dim=64)


def _flax_model(**kw):
  return models.RMA(**{**DIMS, **kw})


def _perturbed_params(model, key, size, kernel_scale=2.0):
  """Initialised params with the theta head changed so that regions move around and reach
  beyond the map, exercising the sampler's interpolation and zero padding. (A large
  ``kernel_scale`` makes the recurrence chaotic: float32 rounding differences then grow
  over the K steps, so the tolerances below are 1e-3.)"""
  params = model.init(key, jnp.zeros((1, size, size, 3)))["params"]
  k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
  zm = params["attention"]["cell"]["zm"]
  zm = {"kernel": kernel_scale * jax.random.normal(k1, zm["kernel"].shape) / np.sqrt(zm["kernel"].shape[0]),
        "bias": jnp.asarray([0.6, 0.4, 0.2, -0.3]) + 0.1 * jax.random.normal(k2, (4,))}
  params = jax.tree.map(lambda x: x, params)
  params["attention"]["cell"]["zm"] = zm
  return params


def _torch_model(params, **kw):
  dims = {**DIMS, **kw}
  m = tr.TorchRMA(dims["num_classes"], dims["num_regions"], dims["sample_size"],
                  dims["width"], dims["x_dim"], dims["hidden_dim"], dims["z_dim"],
                  standard_lstm=dims.get("standard_lstm", False),
                  sampler=kw.get("sampler", "separable"))
  return tr.load_flax_params(m, jax.device_get(params))


def _inputs(batch=3, size=64, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(0, 40.0, (batch, size, size, 3)).astype(np.float32)
  labels = (rng.random((batch, NUM_CLASSES)) < 0.4).astype(np.float32)
  labels[0, :] = 0.0  # an image without labels: excluded from L_cls by both sides
  labels[1, 2] = 1.0
  return images, labels


def _nchw(x):
  return torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2).contiguous()


def test_forward_and_losses_match_torch(sampler="grid_sample", standard_lstm=False):
  # torch's generic F.grid_sample path against our separable sampler; the separable torch
  # sampler is covered by the gradient and ten-view tests.
  model = _flax_model(standard_lstm=standard_lstm)
  params = _perturbed_params(model, jax.random.key(0), 64)
  images, labels = _inputs()
  out = model.apply({"params": params}, jnp.asarray(images))
  loss, terms = train.LossConfig().total_loss(out, jnp.asarray(labels))

  tm = _torch_model(params, standard_lstm=standard_lstm, sampler=sampler)
  with torch.no_grad():
    t_out = tm(_nchw(images))
    t_loss, t_cls, t_loc = tr.total_loss(t_out, torch.from_numpy(labels))

  # Regions really move: not all at the initial box, some beyond the map's edge.
  theta = np.asarray(out["theta"])
  assert np.ptp(theta[:, 1:, 2]) > 0.1
  for key in ("scores", "region_scores", "theta"):
    np.testing.assert_allclose(np.asarray(out[key]), t_out[key].numpy(), rtol=1e-3, atol=1e-3,
                               err_msg=key)
  np.testing.assert_allclose(float(terms["cls_loss"]), t_cls.item(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(terms["loc_loss"]), t_loc.item(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-4, atol=1e-6)


def test_gradients_match_torch():
  """The backward pass: d loss / d every parameter, Flax vs torch autograd.

  The sampler's gradient in theta jumps where a sample crosses a pixel centre, so a chaotic
  theta head would turn float32 rounding into O(1) gradient differences: here the regions
  are off-centre and partly outside the map but depend smoothly on the image.
  """
  model = _flax_model()
  params = _perturbed_params(model, jax.random.key(1), 64, kernel_scale=0.3)
  images, labels = _inputs(seed=1)

  def loss_fn(p):
    out = model.apply({"params": p}, jnp.asarray(images))
    return train.LossConfig().total_loss(out, jnp.asarray(labels))[0]
  grads = jax.grad(loss_fn)(params)

  tm = _torch_model(params)
  loss, _, _ = tr.total_loss(tm(_nchw(images)), torch.from_numpy(labels))
  loss.backward()
  pairs = [(grads["trunk"][n]["kernel"], tm.trunk.convs[n].weight.grad.permute(2, 3, 1, 0))
           for n in ("conv1_1", "conv3_2", "conv5_3")]
  pairs += [(grads["trunk"]["conv5_3"]["bias"], tm.trunk.convs["conv5_3"].bias.grad)]
  cell = grads["attention"]["cell"]
  for name in ("fc6", "lstm_x", "lstm_h", "hz", "zs", "zm"):
    pairs.append((cell[name]["kernel"], getattr(tm.cell, name).weight.grad.T))
  for ours, theirs in pairs:
    ours, theirs = np.asarray(ours, np.float64), theirs.numpy()
    assert np.linalg.norm(theirs) > 0
    rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    assert rel < 1e-4, rel


def test_ten_view_matches_torch():
  model = _flax_model()
  params = _perturbed_params(model, jax.random.key(2), 96)
  images, _ = _inputs(batch=2, size=96, seed=2)
  ours = evaluate.ten_view_scores(model, {"params": params}, jnp.asarray(images),
                                  crop_size=64)["scores"]
  tm = _torch_model(params)
  with torch.no_grad():
    theirs = tr.ten_view(tm, _nchw(images), crop_size=64)
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-3, atol=1e-3)


def test_sampler_matches_grid_sample():
  """ops.sample_regions (separable) vs torch's generic F.grid_sample, incl. regions that
  leave the map, mirrored and zoomed-in ones, on a non-square map."""
  rng = np.random.default_rng(3)
  fmap = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  theta = np.stack([rng.uniform(-1.2, 1.5, (2, 6)), rng.uniform(-1.2, 1.5, (2, 6)),
                    rng.uniform(-1.5, 1.5, (2, 6)), rng.uniform(-1.5, 1.5, (2, 6))], -1)
  theta = theta.astype(np.float32)
  ours = ops.sample_regions(jnp.asarray(fmap), jnp.asarray(theta), (4, 6),
                            precision=jax.lax.Precision.HIGHEST)
  src = torch.from_numpy(fmap).permute(0, 3, 1, 2).double()
  th = torch.from_numpy(theta).double()
  b, r = theta.shape[:2]
  zero = torch.zeros_like(th[..., 0])
  mats = torch.stack([torch.stack([th[..., 0], zero, th[..., 2]], -1),
                      torch.stack([zero, th[..., 1], th[..., 3]], -1)], -2)
  grid = torch.nn.functional.affine_grid(mats.reshape(b * r, 2, 3), [b * r, 3, 4, 6],
                                         align_corners=False)
  theirs = torch.nn.functional.grid_sample(
      src.repeat_interleave(r, 0), grid, mode="bilinear", padding_mode="zeros",
      align_corners=False).reshape(b, r, 3, 4, 6).permute(0, 1, 3, 4, 2)
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-5)
