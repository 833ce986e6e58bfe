"""Options for large runs (issue 7): bfloat16 compute and rematerialisation.

* bfloat16: parameters and optimizer state stay float32, activations are bfloat16; the
  forward pass agrees with float32 within bfloat16 rounding.
* remat: the VGG blocks are recomputed in the backward pass: the same outputs and gradients,
  but far fewer activations kept between the forward and the backward pass.

Gradient accumulation (``optim.grad_accum_steps``) is tested in tests/test_train.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rma_jax.configs import default
from rma_jax import models, optimizer, parallel, steps

SMALL = dict(num_classes=10, num_regions=3, sample_size=3, width=8, x_dim=64, hidden_dim=64,
             z_dim=64)


def _images(key, batch: int, size: int) -> jax.Array:
  return jax.random.uniform(key, (batch, size, size, 3), jnp.float32, -1.0, 1.0)


@pytest.fixture(scope="module")
def f32_model_and_params():
  model = models.RMA(**SMALL)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  return model, params


# --------------------------------------------------------------------------- bfloat16


def test_bfloat16_forward_agrees_with_float32(f32_model_and_params):
  model, params = f32_model_and_params
  bf16 = models.RMA(**SMALL, dtype=jnp.bfloat16)
  # The bf16 model creates float32 parameters of the same tree: one set serves both.
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))

  x = _images(jax.random.key(1), 4, 64)
  # The computation really runs in bfloat16 (else the comparison below would be vacuous).
  fmap = bf16.apply({"params": params}, x, method=models.RMA.features)
  assert fmap.dtype == jnp.bfloat16
  out32 = jax.jit(model.apply)({"params": params}, x)
  out16 = jax.jit(bf16.apply)({"params": params}, x)
  for k in ("scores", "region_scores", "theta"):
    assert out16[k].dtype == jnp.float32, k  # outputs (and the losses) stay float32
    assert out16[k].shape == out32[k].shape
  s32, s16 = np.asarray(out32["scores"]), np.asarray(out16["scores"])
  assert not np.array_equal(s16, s32)
  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%); through 13 convolutions
  # and the LSTM the errors add up to a few of those, well below 5% of the score range.
  scale = np.max(np.abs(s32))
  assert np.max(np.abs(s16 - s32)) <= 0.05 * scale
  np.testing.assert_allclose(out16["region_scores"], out32["region_scores"], atol=0.05 * scale)
  np.testing.assert_allclose(out16["theta"], out32["theta"], atol=2e-2)
  # The ranking of classes, which is what mAP sees, is essentially unchanged.
  assert np.mean(np.argmax(s16, -1) == np.argmax(s32, -1)) >= 0.75


@pytest.mark.slow
def test_bfloat16_training_keeps_float32_parameters_and_optimizer_state():
  config = default.get_config()
  config.data.pixel_convention = "unit"
  config.optim.learning_rate = 1e-3
  # The baseline (same bf16 trunk, a smaller program to compile than the attention model).
  model = models.Baseline(models.VGG16(width=16, dtype=jnp.bfloat16), num_classes=10,
                          pixel_convention="unit")
  tx = optimizer.make_optimizer(config.optim, lambda step: config.optim.learning_rate)
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = steps.create_train_state(model, tx, jax.random.key(0), (32, 32, 3), mesh)
  batch = _uint8_batch(jax.random.key(2), 4, 32)
  step_fn = steps.jit_train_step(steps.LossConfig.from_config(config), mesh)
  state, metrics = step_fn(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 1
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32


# --------------------------------------------------------------------------- remat


def _residual_bytes(fn, *args) -> int:
  """Bytes the compiled forward pass keeps for the backward pass (the vjp's residuals)."""
  compiled = jax.jit(lambda *a: jax.vjp(fn, *a)[1]).lower(*args).compile()
  return int(compiled.memory_analysis().output_size_in_bytes)


@pytest.mark.slow
def test_remat_changes_memory_not_results(f32_model_and_params):
  model, params = f32_model_and_params
  remat = models.RMA(**SMALL, remat=True)
  x = _images(jax.random.key(3), 4, 96)
  y = jax.random.bernoulli(jax.random.key(4), 0.3, (4, 10)).astype(jnp.float32)

  def loss_fn(m):
    def loss(p, images):
      out = m.apply({"params": p}, images)
      return jnp.mean((jax.nn.sigmoid(out["scores"]) - y) ** 2) + 0.1 * jnp.mean(
          out["theta"] ** 2)
    return loss

  out_plain = jax.jit(model.apply)({"params": params}, x)
  out_remat = jax.jit(remat.apply)({"params": params}, x)
  for k in ("scores", "region_scores", "theta"):
    np.testing.assert_allclose(out_remat[k], out_plain[k], rtol=1e-5, atol=1e-6)
  g_plain = jax.jit(jax.grad(loss_fn(model), argnums=(0, 1)))(params, x)
  g_remat = jax.jit(jax.grad(loss_fn(remat), argnums=(0, 1)))(params, x)
  flat_p, flat_r = jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)
  assert len(flat_p) == len(flat_r)
  assert max(float(jnp.max(jnp.abs(g))) for g in flat_p) > 0  # gradients are not all zero
  for gp, gr in zip(flat_p, flat_r):
    np.testing.assert_allclose(gr, gp, rtol=1e-4, atol=1e-7)

  # Without remat every conv activation of the trunk is kept for the backward pass; with it
  # only the block inputs are, and each block is recomputed. (The CPU backend's temp-buffer
  # estimate of the fused grad function does not show this; the kept residuals do, and they
  # are what fills accelerator memory at the paper's 448 px.)
  plain_bytes = _residual_bytes(loss_fn(model), params, x)
  remat_bytes = _residual_bytes(loss_fn(remat), params, x)
  conv1_bytes = 4 * 96 * 96 * (64 // SMALL["width"]) * 4  # one full-resolution activation
  assert plain_bytes - remat_bytes > 2 * conv1_bytes
  assert remat_bytes < 0.5 * plain_bytes


# --------------------------------------------------------------------------- batches


def _uint8_batch(key, batch: int, size: int, num_classes: int = 10) -> dict[str, jax.Array]:
  k1, k2, k3 = jax.random.split(key, 3)
  labels = jax.random.bernoulli(k2, 0.3, (batch, num_classes))
  first = jax.random.randint(k3, (batch,), 0, num_classes)
  labels = labels.at[jnp.arange(batch), first].set(True).astype(jnp.float32)
  images = jax.random.randint(k1, (batch, size, size, 3), 0, 256).astype(jnp.uint8)
  return {"image": images, "labels": labels, "mask": jnp.ones((batch,), jnp.float32)}
