"""The evaluation-only parameter forms (``rma_jax.eval_params``): what they hold, computed
independently in NumPy; that the modules use them (changed forms change the outputs exactly
as the same change of the parameters does); that the scores with them equal the scores
without; and that the validation step and the train step's gradients are unchanged.

Compared in float64 (``jax.enable_x64``): the prepared and unprepared forwards are the same
arithmetic but for the order of a few sums, so float64 makes equality a 1e-10 check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rma_jax import conv, eval_params, models, steps, views, winograd

C = 4
IMAGE = 64


def tiny_rma(**kw):
  return models.RMA(num_classes=C, num_regions=3, width=16, x_dim=32, hidden_dim=16,
                    z_dim=16, conv_impl="winograd", **kw)


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
  monkeypatch.setattr(eval_params, "MIN_TRANSPOSED_KERNEL_SIZE", 1)


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
    got = _paths(eval_params.forms(params, "winograd"))
    kernels = {p[:-1]: v for p, v in _paths(params).items() if p[-1] == "kernel"}
    g = winograd.winograd_matrices(winograd.DEFAULT_WINOGRAD_TILE)[1]  # (6, 3)
    expected = set()
    for path, k in kernels.items():
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
    # 'xla' and 'patches' never run Winograd: no transformed kernels, the copies only.
    for impl in ("xla", "patches"):
      assert all(p[-1] == "kernel_t" for p in _paths(eval_params.forms(params, impl)))
    # 'auto' transforms only the layers its channel rule can choose (none at width 16).
    auto = _paths(eval_params.forms(params, "auto"))
    assert not [p for p in auto if p[-1] == "winograd_kernel"]


def test_auto_transforms_the_layers_with_64_channels_or_more():
  model = models.VGG16(width=2)  # conv1_1 3 -> 32 ... conv5_3 256 -> 256
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)["params"]
  got = eval_params.forms(params, "auto")
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
    forms = eval_params.forms(params, "winograd")
    forms["trunk"]["conv3_1"]["winograd_kernel"] = winograd.transform_kernel(
        changed["trunk"]["conv3_1"]["kernel"])
    forms["attention"]["cell"]["fc6"]["kernel_t"] = changed["attention"]["cell"]["fc6"]["kernel"].T
    apply = jax.jit(model.apply)
    images = jnp.concatenate([images, images[::-1]])  # fc6 sees 4 rows: its copy is used
    assert images.shape[0] >= models.DENSE_TRANSPOSED_MIN_ROWS
    want = apply({"params": changed}, images)
    got = apply({"params": params, eval_params.COLLECTION: forms}, images)
    plain = apply({"params": params}, images)
    assert np.abs(np.asarray(want["scores"] - plain["scores"])).max() > 1e-3  # a real change
    for k in ("scores", "region_scores", "theta"):
      np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-10,
                                 atol=1e-10)


def test_prepared_ten_view_scores_equal_unprepared(all_dense_transposed):
  with jax.enable_x64(True):
    model = tiny_rma(dtype=jnp.float64)
    variables = {"params": random_params(model)}
    prepared = eval_params.prepare_fn("winograd")(variables)
    assert prepared["params"] is variables["params"] and eval_params.nbytes(prepared) > 0
    images = jax.random.normal(jax.random.key(2), (2, IMAGE + 16, IMAGE + 16, 3), jnp.float64)
    fn = views.make_scores_fn(model, crop_size=IMAGE, pixel_convention=None)
    want, got = fn(variables, images), fn(prepared, images)
    for k in ("scores", "view_scores", "theta"):
      np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-10,
                                 atol=1e-10)


def test_validation_step_with_forms_equals_without_and_train_grads_ignore_them(
    all_dense_transposed):
  with jax.enable_x64(True):
    model = tiny_rma(dtype=jnp.float64)
    params = random_params(model)
    rng = np.random.default_rng(3)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (2, IMAGE, IMAGE, 3), np.uint8)),
             "labels": jnp.asarray([[1, 0, 1, 0], [0, 1, 0, 0]], jnp.float64),
             "mask": jnp.ones((2,), jnp.float64)}
    loss_cfg = steps.LossConfig(pixel_convention="caffe")
    step = jax.jit(lambda p, b, f: steps.eval_step(p, b, f, apply_fn=model.apply,
                                                   loss_cfg=loss_cfg))
    want = step(params, batch, {})
    got = step(params, batch, eval_params.forms(params, "winograd"))
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
