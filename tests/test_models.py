"""VGG-16 structure, the heads on a trunk, and the scanned attention module against an
explicit loop."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rma_jax import losses, models, ops

SMALL = dict(num_classes=6, width=16, x_dim=32, hidden_dim=16, z_dim=16, sample_size=3)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_vgg16_full_width_parameter_count_and_stride():
  model = models.VGG16()
  x = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  params = variables["params"]
  assert list(params) == models.vgg16_layer_names()
  assert _count(params) == 14_714_688
  assert (model.stride, model.channels) == (16, 512)
  out = jax.eval_shape(model.apply, variables, x)
  assert out.shape == (1, 64 // 16, 64 // 16, 512)
  out = jax.eval_shape(model.apply, variables, jnp.zeros((2, 96, 160, 3)))
  assert out.shape == (2, 6, 10, 512)


def test_baseline_on_a_trunk_and_width():
  """The baseline's tree is its trunk's at the top level plus ``head`` (today's checkpoints
  and weight files); its scores are the pooled map through the linear layer."""
  model = models.Baseline(models.VGG16(width=8), num_classes=5)
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  params = variables["params"]
  assert list(params) == models.vgg16_layer_names() + ["head"]
  assert params["conv5_3"]["kernel"].shape == (3, 3, 64, 64)
  assert params["head"]["kernel"].shape == (64, 5)
  out = jax.jit(lambda v: model.apply(v, x, return_features=True))(variables)
  fmap = models.VGG16(width=8).apply({"params": {k: params[k] for k in params if k != "head"}},
                                     x)
  pooled = np.asarray(fmap).mean(axis=(1, 2))
  np.testing.assert_allclose(out["features"], pooled, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["scores"], pooled @ params["head"]["kernel"]
                             + params["head"]["bias"], rtol=1e-5, atol=1e-5)
  assert model.stride == 16
  with pytest.raises(ValueError, match="width"):
    models.VGG16(width=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="pool"):
    models.Baseline(models.VGG16(width=8), num_classes=5, pool="median").init(
        jax.random.key(0), x)


def test_rma_takes_a_trunk_handed_in_with_the_same_tree():
  """``RMA(trunk=VGG16(...))`` and the default trunk built from ``width`` are the same model;
  the default trunk's settings cannot be mixed with a trunk handed in."""
  x = jnp.ones((1, 32, 32, 3))
  given = models.RMA(trunk=models.VGG16(width=16), **{k: v for k, v in SMALL.items()
                                                      if k != "width"})
  default = models.RMA(**SMALL)
  a = jax.eval_shape(given.init, jax.random.key(0), x)
  b = jax.eval_shape(default.init, jax.random.key(0), x)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert sorted(a["params"]) == ["attention", "trunk"]
  assert list(a["params"]["trunk"]) == models.vgg16_layer_names()
  with pytest.raises(ValueError, match="set them on that trunk"):
    models.RMA(trunk=models.VGG16(width=16), **SMALL).init(jax.random.key(0), x)


def _attention_loop(cell_params, features, cfg, num_regions):
  """The same cell stepped by a Python loop: the reference for nn.scan."""
  cell = models.AttentionCell(num_classes=cfg["num_classes"], sample_size=cfg["sample_size"],
                              x_dim=cfg["x_dim"], hidden_dim=cfg["hidden_dim"],
                              z_dim=cfg["z_dim"])
  b = features.shape[0]
  carry = (jnp.zeros((b, cfg["hidden_dim"])), jnp.zeros((b, cfg["hidden_dim"])),
           jnp.tile(jnp.asarray([[1.0, 1.0, 0.0, 0.0]]), (b, 1)))
  scores, thetas = [], []
  for k in range(num_regions + 1):
    carry, (s, theta, _) = cell.apply({"params": cell_params}, carry, k, features)
    scores.append(s)
    thetas.append(theta)
  return jnp.stack(scores[1:], 1), jnp.stack(thetas, 1)


def test_dirac_init_is_identity_conv_plus_he_noise():
  # Noise-free, the kernel is the identity map: a SAME 3x3 conv returns its input.
  x = jax.random.normal(jax.random.key(1), (2, 7, 5, 6))
  kernel = models.dirac_init(0.0)(jax.random.key(2), (3, 3, 6, 6))
  out = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(out, x, atol=1e-6)
  with pytest.raises(ValueError, match="equal input and output channels"):
    models.dirac_init()(jax.random.key(2), (3, 3, 4, 6))


def test_vgg16_dirac_scheme_changes_only_equal_width_layers():
  x = jnp.zeros((1, 32, 32, 3))
  he = models.VGG16(width=16).init(jax.random.key(0), x)["params"]
  dirac = models.VGG16(width=16, init_scheme="dirac").init(jax.random.key(0), x)["params"]
  changed = []
  for name in models.vgg16_layer_names():
    k_he, k_dirac = he[name]["kernel"], dirac[name]["kernel"]
    if k_he.shape[2] == k_he.shape[3]:
      # The same RNG stream per layer name: dirac = identity + 0.1 * the He draw.
      identity = np.zeros(k_he.shape, np.float32)
      identity[1, 1] = np.eye(k_he.shape[2])
      np.testing.assert_allclose(k_dirac, identity + 0.1 * np.asarray(k_he), atol=1e-6)
      changed.append(name)
    else:
      np.testing.assert_array_equal(k_dirac, k_he)
  assert changed == ["conv1_2", "conv2_2", "conv3_2", "conv3_3", "conv4_2", "conv4_3",
                     "conv5_1", "conv5_2", "conv5_3"]
  with pytest.raises(ValueError, match="init_scheme"):
    models.VGG16(width=16, init_scheme="xavier").init(jax.random.key(0), x)


def test_scan_equals_python_loop_and_region0_is_identity():
  model = models.RMA(num_regions=5, **SMALL)
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  variables = model.init(jax.random.key(0), images)
  # A bias that moves regions around, so the loop is not trivially the same every step.
  params = jax.tree.map(lambda x: x, variables["params"])
  cell = dict(params["attention"]["cell"])
  cell["zm"] = {"kernel": cell["zm"]["kernel"] * 30.0,
                "bias": jnp.asarray([0.4, 0.6, 0.2, -0.3])}
  params["attention"] = {"cell": cell}
  out = model.apply({"params": params}, images, return_features=True)
  fmap = model.apply({"params": params}, images, method=models.RMA.features)
  ref_scores, ref_theta = _attention_loop(cell, fmap, SMALL, 5)
  np.testing.assert_allclose(out["region_scores"], ref_scores, atol=1e-5)
  np.testing.assert_allclose(out["theta"], ref_theta, atol=1e-6)
  np.testing.assert_allclose(out["scores"], ref_scores.max(axis=1), atol=1e-5)
  np.testing.assert_array_equal(out["theta"][:, 0], np.tile([1.0, 1.0, 0.0, 0.0], (2, 1)))
  assert out["z"].shape == (2, 5, SMALL["z_dim"])
  assert float(jnp.std(out["theta"][:, 1:, 2])) > 1e-3  # regions do move
  # unroll=True (the ONNX export's form): the same parameter tree and the same loop.
  unrolled = model.clone(unroll=True)
  assert (jax.tree.structure(unrolled.init(jax.random.key(0), images)["params"])
          == jax.tree.structure(params))
  out_unrolled = unrolled.apply({"params": params}, images, return_features=True)
  np.testing.assert_allclose(out_unrolled["region_scores"], ref_scores, atol=1e-5)
  np.testing.assert_allclose(out_unrolled["theta"], ref_theta, atol=1e-6)


def test_later_steps_cannot_change_earlier_scores():
  images = jax.random.normal(jax.random.key(2), (2, 48, 48, 3))
  long = models.RMA(num_regions=5, **SMALL)
  variables = long.init(jax.random.key(0), images)
  short = models.RMA(num_regions=3, **SMALL)  # same parameters: they are shared over steps
  a = long.apply(variables, images)["region_scores"]
  b = short.apply(variables, images)["region_scores"]
  np.testing.assert_allclose(a[:, :3], b, atol=1e-6)
  # With given regions: moving region 4 changes score 4 only, never scores 1..3.
  fixed = models.fixed_region_thetas(5)
  moved = fixed.copy()
  moved[4] = (0.3, 0.3, -0.6, 0.5)
  run = lambda f: models.RMA(num_regions=5, fixed_regions=tuple(map(tuple, f.tolist())),
                             **SMALL).apply(variables, images)["region_scores"]
  s0, s1 = run(fixed), run(moved)
  np.testing.assert_allclose(s0[:, :3], s1[:, :3], atol=1e-6)
  assert float(jnp.max(jnp.abs(s0[:, 3] - s1[:, 3]))) > 1e-6


@pytest.mark.parametrize("standard", [False, True])
def test_lstm_step_matches_hand_computation(standard):
  """Eq. 4 by hand: the paper's h = o * c (no tanh) by default, o * tanh(c) behind a flag."""
  cfg = dict(SMALL, sample_size=2)
  cell = models.AttentionCell(standard_lstm=standard, **{k: v for k, v in cfg.items()
                                                          if k != "width"})
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.normal(size=(2, 4, 4, 5)).astype(np.float32))
  c0 = jnp.asarray(rng.normal(scale=2.0, size=(2, 16)).astype(np.float32))
  h0 = jnp.asarray(rng.normal(size=(2, 16)).astype(np.float32))
  theta = jnp.asarray([[0.5, 0.5, 0.2, -0.1], [1.0, 1.0, 0.0, 0.0]], jnp.float32)
  params = cell.init(jax.random.key(0), (c0, h0, theta), 0, feats)["params"]
  (c, h, next_theta), (s, used_theta, z) = cell.apply({"params": params}, (c0, h0, theta), 0,
                                                      feats)
  p = jax.tree.map(np.asarray, params)
  region = np.asarray(ops.sample_regions(feats, theta[:, None], 2))[:, 0].reshape(2, -1)
  x = np.maximum(region @ p["fc6"]["kernel"] + p["fc6"]["bias"], 0)
  gates = x @ p["lstm_x"]["kernel"] + p["lstm_x"]["bias"] + np.asarray(h0) @ p["lstm_h"]["kernel"]
  i, g, o, m = np.split(gates, 4, axis=-1)
  sig = lambda v: 1 / (1 + np.exp(-v))
  c_ref = sig(g) * np.asarray(c0) + sig(i) * np.tanh(m)
  h_ref = sig(o) * (np.tanh(c_ref) if standard else c_ref)
  z_ref = np.maximum(h_ref @ p["hz"]["kernel"] + p["hz"]["bias"], 0)
  np.testing.assert_allclose(c, c_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s, z_ref @ p["zs"]["kernel"] + p["zs"]["bias"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(next_theta, z_ref @ p["zm"]["kernel"] + p["zm"]["bias"], rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(used_theta, theta)
  np.testing.assert_allclose(p["zm"]["bias"], models.DEFAULT_THETA_BIAS)


def test_fixed_region_thetas_use_anchors():
  t = models.fixed_region_thetas(5, scale=0.4)
  assert t.shape == (6, 4)
  np.testing.assert_allclose(t[0], ops.IDENTITY_THETA)
  np.testing.assert_allclose(t[1], [0.4, 0.4, 0.0, 0.0])
  np.testing.assert_allclose(t[2:, 2:], losses.anchor_points(5), atol=1e-6)


def test_region_init_at_anchors_starts_every_region_at_its_fixed_box():
  """model.region_init='anchors': with W_zm = 0 the initial regions are exactly the
  fixed-regions layout (centre box, then the anchors), at the sizes of b_m."""
  from rma_jax.configs import demo
  from rma_jax import build
  images = jax.random.normal(jax.random.key(1), (2, 48, 48, 3))
  offsets = models.anchor_step_offsets(5)
  np.testing.assert_allclose(offsets[0], 0.0)  # region 1: b_m itself, the centre box
  np.testing.assert_allclose(offsets[1:5, 2:], losses.anchor_points(5))
  np.testing.assert_allclose(offsets[5], 0.0)
  config = demo.get_config("tiny")
  config.model.region_init = "anchors"
  config.model.theta_kernel_scale = 0.0
  model = build.build_model(config, 10)
  variables = model.init(jax.random.key(0), images)
  np.testing.assert_allclose(variables["params"]["attention"]["cell"]["zm_step"], offsets)
  out = model.apply(jax.device_get(variables), images)  # host (NumPy) parameters work too
  want = np.broadcast_to(models.fixed_region_thetas(5), (2, 6, 4))
  np.testing.assert_allclose(out["theta"], want, atol=1e-6)
  # Other sizes of b_m are kept: only the centres move.
  bias = (0.3, 0.4, 0.1, -0.2)
  off = models.anchor_step_offsets(3, bias)
  np.testing.assert_allclose(off[:3, :2], 0.0)
  np.testing.assert_allclose(off[0, 2:] + bias[2:], 0.0, atol=1e-7)
  np.testing.assert_allclose(off[1:3, 2:] + bias[2:], losses.anchor_points(3), atol=1e-6)
  # Default: no per-step parameter (the paper's single b_m).
  config.model.region_init = ""
  assert "zm_step" not in build.build_model(config, 10).init(
      jax.random.key(0), images)["params"]["attention"]["cell"]


def test_jitted_forward_backward_full_model():
  model = models.RMA(num_classes=4, num_regions=5, width=16, x_dim=64, hidden_dim=32,
                     z_dim=32, sample_size=7)
  images = jax.random.normal(jax.random.key(0), (2, 96, 96, 3))
  labels = jnp.asarray([[1, 0, 1, 0], [0, 0, 0, 0]], jnp.float32)
  params = model.init(jax.random.key(1), images)["params"]

  @jax.jit
  def loss_and_grad(p):
    def loss_fn(p):
      out = model.apply({"params": p}, images)
      return losses.total_loss(out["scores"], labels, out["theta"][:, 1:])
    return jax.value_and_grad(loss_fn)(p)

  loss, grads = loss_and_grad(params)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["trunk"]["conv1_1"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["attention"]["cell"]["zm"]["kernel"]).sum()) > 0


def test_bfloat16_compute_keeps_float32_params():
  model = models.RMA(num_regions=2, dtype=jnp.bfloat16, **SMALL)
  images = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  variables = model.init(jax.random.key(1), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = model.apply(variables, images)
  ref = models.RMA(num_regions=2, **SMALL).apply(variables, images)
  assert out["scores"].dtype == jnp.float32
  np.testing.assert_allclose(out["scores"], ref["scores"], atol=0.05, rtol=0.05)


def test_core_modules_do_not_import_tensorflow():
  code = ("import sys, rma_jax, rma_jax.models, rma_jax.ops, rma_jax.losses, rma_jax.metrics, "
          "rma_jax.train, rma_jax.checkpointing\n"
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]\n"
          "assert not bad, bad\n")
  subprocess.run([sys.executable, "-c", code], check=True)
