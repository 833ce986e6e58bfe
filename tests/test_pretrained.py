"""ImageNet VGG-16 import and the two-step initialisation (rma_jax.pretrained, issue 6).

The Keras test builds the real-size ``keras.applications.VGG16(weights=None)`` on the JAX
backend, so this module sets ``KERAS_BACKEND`` before anything imports keras. No test
downloads anything: weight files are written here with random values.
"""

import collections
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from rma_jax import models, pixels  # noqa: E402
from rma_jax import init  # noqa: E402
from rma_jax import pretrained  # noqa: E402
from rma_jax import weights as weights_lib  # noqa: E402

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
CONVS = models.vgg16_layer_names()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vgg16_shapes():
  """Real VGG-16 shapes (HWIO convs, (in, out) fc), written out independently of the module."""
  chans = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  shapes, cin = {}, 3
  for name, cout in zip(CONVS, chans):
    shapes[name] = ((3, 3, cin, cout), (cout,))
    cin = cout
  shapes["fc6"] = ((7 * 7 * 512, 4096), (4096,))
  shapes["fc7"] = ((4096, 4096), (4096,))
  return shapes


def _he(rng, shape, fan_in):
  """He-uniform random weights (uniform: several times cheaper than normal for 10^8 values)."""
  limit = np.float32(np.sqrt(6.0 / fan_in))
  return rng.random(shape, dtype=np.float32) * (2 * limit) - limit


def _trunk(params, images):
  return models.VGG16().apply({"params": {k: params[k] for k in CONVS}}, images)


def _fc(params, conv5_3):
  """fc6/fc7 on pool5 = conv5_3 max-pooled once more, flattened (h, w, c)."""
  pool5 = jax.lax.reduce_window(conv5_3, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                "VALID")
  x = pool5.reshape(pool5.shape[0], -1)
  fc6 = jax.nn.relu(x @ params["fc6"]["kernel"] + params["fc6"]["bias"])
  fc7 = jax.nn.relu(fc6 @ params["fc7"]["kernel"] + params["fc7"]["bias"])
  return fc6, fc7


def _check_normalize(image, convention, expected):
  """The models' normalisation (``rma_jax.pixels``), under the convention the checkpoint
  records, is the preprocessing these weights need."""
  np.testing.assert_allclose(pixels.normalize(image.astype(np.uint8), convention), expected,
                             rtol=1e-6, atol=1e-4)


def _assert_close(ours, ref, rtol=2e-4):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


# --------------------------------------------------------------------------------------------
# Keras.


@pytest.mark.slow
def test_keras_vgg16_h5_gives_keras_activations(tmp_path):
  keras = pytest.importorskip("keras")
  model = keras.applications.VGG16(weights=None)
  rng = np.random.default_rng(0)
  # He-scaled kernels and non-zero biases (Keras' defaults are zero) so every tensor matters.
  for layer in model.layers:
    weights = layer.get_weights()
    if weights:
      kernel, bias = weights
      layer.set_weights([_he(rng, kernel.shape, np.prod(kernel.shape[:-1])),
                         rng.uniform(-0.1, 0.1, bias.shape).astype(np.float32)])
  image = rng.integers(0, 256, (1, 224, 224, 3)).astype(np.float32)  # RGB
  probe = keras.Model(model.inputs, [model.get_layer(n).output
                                     for n in ("block5_conv3", "fc1", "fc2")])
  ref_conv, ref_fc1, ref_fc2 = (np.asarray(a) for a in probe(
      keras.applications.vgg16.preprocess_input(image.copy())))
  path = tmp_path / "vgg16.h5"
  model.save(path)  # the legacy HDF5 layout, like the downloadable file
  del model, probe

  converted = weights_lib.load_weights(path, "keras")
  os.remove(path)
  assert converted["pixel_convention"] == "caffe"
  params = converted["params"]
  assert sorted(params) == sorted(CONVS + ["fc6", "fc7"])
  for name, (kshape, bshape) in _vgg16_shapes().items():
    assert params[name]["kernel"].shape == kshape and params[name]["bias"].shape == bshape
  # Caffe preprocessing written out: RGB -> BGR, minus the BGR mean, no scaling.
  caffe = image[..., ::-1] - CAFFE_MEAN_BGR
  _check_normalize(image, converted["pixel_convention"], caffe)
  conv5_3 = _trunk(params, caffe)
  _assert_close(conv5_3, ref_conv)
  fc6, fc7 = _fc(params, conv5_3)
  _assert_close(fc6, ref_fc1)
  _assert_close(fc7, ref_fc2)


def _small_keras_model(keras):
  model = keras.Sequential([
      keras.Input((6, 6, 3)),
      keras.layers.Conv2D(4, 3, name="block1_conv1"),
      keras.layers.MaxPooling2D(name="block1_pool"),
      keras.layers.Flatten(name="flatten"),
      keras.layers.Dense(5, name="fc1"),
      keras.layers.Dense(3, name="predictions"),
  ])
  rng = np.random.default_rng(1)
  for layer in model.layers:
    if layer.get_weights():
      layer.set_weights([rng.standard_normal(w.shape).astype(np.float32)
                         for w in layer.get_weights()])
  expected = {}
  for layer in model.layers:
    if layer.get_weights():
      expected[f"{layer.name}/kernel"], expected[f"{layer.name}/bias"] = layer.get_weights()
  return model, expected


@pytest.mark.parametrize("suffix", [".weights.h5", ".h5", ".keras"])
def test_keras_reader_layouts(tmp_path, suffix):
  keras = pytest.importorskip("keras")
  model, expected = _small_keras_model(keras)
  path = str(tmp_path / f"m{suffix}")
  model.save_weights(path) if suffix == ".weights.h5" else model.save(path)
  got = weights_lib.load_keras_h5(path)
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value)


def test_keras_reader_download_layout(tmp_path):
  """The layout of vgg16_weights_tf_dim_ordering_tf_kernels.h5 (Keras 1/2 save_weights):
  layer groups at the root listed in 'layer_names', Keras-1 weight names, and a
  'weight_names' attribute split into chunks (Keras does this for long lists)."""
  h5py = pytest.importorskip("h5py")
  rng = np.random.default_rng(2)
  k1, b1 = rng.standard_normal((3, 3, 3, 4)), rng.standard_normal(4)
  k2, b2 = rng.standard_normal((16, 5)), rng.standard_normal(5)
  path = tmp_path / "download.h5"
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([b"input_1", b"block1_conv1", b"block1_pool", b"fc1"])
    f.create_group("input_1").attrs["weight_names"] = np.array([], "S1")
    f.create_group("block1_pool").attrs["weight_names"] = np.array([], "S1")
    g = f.create_group("block1_conv1")
    g.attrs["weight_names"] = np.array([b"block1_conv1_W_1:0", b"block1_conv1_b_1:0"])
    g["block1_conv1_W_1:0"], g["block1_conv1_b_1:0"] = k1, b1
    g = f.create_group("fc1")
    g.attrs["weight_names0"] = np.array([b"fc1/kernel:0"])
    g.attrs["weight_names1"] = np.array([b"fc1/bias:0"])
    g.create_group("fc1")
    g["fc1/kernel:0"], g["fc1/bias:0"] = k2, b2
  got = weights_lib.load_keras_h5(path)
  assert sorted(got) == ["block1_conv1/bias", "block1_conv1/kernel", "fc1/bias", "fc1/kernel"]
  for key, value in (("block1_conv1/kernel", k1), ("block1_conv1/bias", b1),
                     ("fc1/kernel", k2), ("fc1/bias", b2)):
    np.testing.assert_array_equal(got[key], value)


# --------------------------------------------------------------------------------------------
# torchvision.


def _torchvision_state_dict(rng, with_classifier=True):
  """Random weights with the names and layouts of torchvision's vgg16() state dict."""
  torch = pytest.importorskip("torch")
  sd = collections.OrderedDict()
  cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"]
  i, cin = 0, 3
  for v in cfg:  # torchvision.models.vgg.make_layers: Conv2d, ReLU pairs; MaxPool2d
    if v == "M":
      i += 1
      continue
    sd[f"features.{i}.weight"] = torch.from_numpy(_he(rng, (v, cin, 3, 3), 9 * cin))
    sd[f"features.{i}.bias"] = torch.from_numpy(rng.uniform(-0.1, 0.1, v).astype(np.float32))
    i, cin = i + 2, v
  if not with_classifier:
    return sd
  for j, (cout, cin) in zip((0, 3, 6), ((4096, 25088), (4096, 4096), (1000, 4096))):
    sd[f"classifier.{j}.weight"] = torch.from_numpy(_he(rng, (cout, cin), cin))
    sd[f"classifier.{j}.bias"] = torch.from_numpy(rng.uniform(-0.1, 0.1, cout).astype(np.float32))
  return sd


def _nchw_trunk(sd, x):
  """conv1_1 … conv5_3 computed in NCHW/OIHW straight from the torch layout."""
  idx = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
  pool_after = {2, 7, 14, 21}  # last conv of blocks 1-4 (pool5 is not part of the trunk)
  for i in idx:
    w, b = sd[f"features.{i}.weight"].numpy(), sd[f"features.{i}.bias"].numpy()
    x = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    x = jax.nn.relu(x + b[None, :, None, None])
    if i in pool_after:
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
  return x


def test_torchvision_state_dict_matches_nchw_reference(tmp_path):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  sd = _torchvision_state_dict(rng)
  path = tmp_path / "vgg16-random.pth"
  torch.save(sd, path)  # as torchvision's file: an OrderedDict of tensors
  converted = weights_lib.load_weights(path, "torch")
  assert converted["pixel_convention"] == "torch"
  params = converted["params"]
  for name, (kshape, bshape) in _vgg16_shapes().items():
    assert params[name]["kernel"].shape == kshape and params[name]["bias"].shape == bshape

  # Conv outputs: torch preprocessing (RGB / 255, mean/std), NHWC model vs NCHW reference.
  image = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
  x = ((image / 255.0 - TORCH_MEAN) / TORCH_STD).astype(np.float32)
  _check_normalize(image, converted["pixel_convention"], x)
  ours = _trunk(params, x)
  ref = _nchw_trunk(sd, jnp.asarray(x.transpose(0, 3, 1, 2)))
  _assert_close(ours, np.asarray(ref).transpose(0, 2, 3, 1))

  # fc6 flatten order: torch flattens pool5 as (c, h, w), ours as (h, w, c).
  pool5 = rng.standard_normal((512, 7, 7)).astype(np.float32)
  w6, b6 = sd["classifier.0.weight"].numpy(), sd["classifier.0.bias"].numpy()
  w7, b7 = sd["classifier.3.weight"].numpy(), sd["classifier.3.bias"].numpy()
  ref6 = np.maximum(w6.astype(np.float64) @ pool5.reshape(-1) + b6, 0)
  ours6 = np.maximum(pool5.transpose(1, 2, 0).reshape(-1) @ params["fc6"]["kernel"]
                     + params["fc6"]["bias"], 0)
  _assert_close(ours6, ref6)
  _assert_close(ours6 @ params["fc7"]["kernel"] + params["fc7"]["bias"], w7 @ ref6 + b7)


def test_cli_checkpoint_round_trip(tmp_path):
  torch = pytest.importorskip("torch")
  sd = _torchvision_state_dict(np.random.default_rng(7), with_classifier=False)  # small: convs
  path = tmp_path / "vgg16-random.pth"
  torch.save(sd, path, _use_new_zipfile_serialization=False)  # the 2017 file's format
  params = weights_lib.to_flax(weights_lib.load_torch_state_dict(path, use_torch=False),
                              "torch")["params"]
  for i, name in zip([0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28], CONVS):
    np.testing.assert_array_equal(params[name]["kernel"],
                                  sd[f"features.{i}.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params[name]["bias"], sd[f"features.{i}.bias"].numpy())

  out = tmp_path / "imagenet"
  assert pretrained.main(["--from=torch", str(path), f"--out={out}"]) == 0
  loaded, convention = weights_lib.load_pretrained(out)
  assert convention == "torch"
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  with pytest.raises(ValueError, match="pixel_convention='torch'"):
    weights_lib.load_pretrained(out, pixel_convention="caffe")
  assert pretrained.main(["--from=torch", str(path), f"--out={out}"]) == 2  # never overwrites
  assert sorted(os.listdir(tmp_path)) == ["imagenet", "vgg16-random.pth"]  # no temp leftovers


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_reader_without_torch_handles_views_and_dtypes(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  base = torch.randn(6, 5)
  sd = collections.OrderedDict(
      a=torch.randn(3, 4), transposed=base.t(), view=base[2:4, 1:],
      ints=torch.arange(5), half=torch.randn(2, 3).half(), bf16=torch.randn(3).bfloat16(),
      param=torch.nn.Parameter(torch.ones(2)))
  path = tmp_path / "x.pth"
  torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  got = weights_lib.load_torch_state_dict(path, use_torch=False)
  assert list(got) == list(sd)
  for key, value in sd.items():
    if value.dtype == torch.bfloat16:
      assert got[key].dtype == jnp.bfloat16
      expected = value.float().numpy()
    else:
      expected = value.detach().numpy()
      assert got[key].dtype == expected.dtype
    np.testing.assert_array_equal(got[key].astype(expected.dtype), expected)


# --------------------------------------------------------------------------------------------
# Untrusted files.


class _Payload:
  """Unpickling this would create the marker file (a stand-in for arbitrary code)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("use_torch", [True, False])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, zip_format, use_torch):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "executed"
  path = tmp_path / "evil.pth"
  torch.save(collections.OrderedDict([("features.0.weight", torch.ones(64, 3, 3, 3)),
                                      ("features.0.bias", _Payload(str(marker)))]),
             path, _use_new_zipfile_serialization=zip_format)
  with pytest.raises(pickle.UnpicklingError):
    weights_lib.load_torch_state_dict(path, use_torch=use_torch)
  assert not marker.exists()
  out = tmp_path / "out"
  assert pretrained.main(["--from=torch", str(path), f"--out={out}"]) == 2
  assert not marker.exists() and not out.exists()


def _fake_torchvision(torch):
  """Real-shaped tensors without real memory: one stored value, expanded (stride 0)."""
  sd = collections.OrderedDict()
  shapes = _vgg16_shapes()
  for i, name in zip([0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28], CONVS):
    k, b = shapes[name]
    sd[f"features.{i}.weight"] = torch.zeros(1).expand(k[3], k[2], 3, 3)
    sd[f"features.{i}.bias"] = torch.zeros(1).expand(*b)
  for j, shape in ((0, (4096, 25088)), (3, (4096, 4096)), (6, (1000, 4096))):
    sd[f"classifier.{j}.weight"] = torch.zeros(1).expand(*shape)
    sd[f"classifier.{j}.bias"] = torch.zeros(1).expand(shape[0])
  return sd


def test_bad_torch_file_names_every_problem_and_writes_nothing(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  sd = _fake_torchvision(torch)
  del sd["features.28.bias"]
  sd["features.1.running_mean"] = torch.zeros(64)
  sd["classifier.3.weight"] = torch.zeros(1).expand(4096, 4095)
  path = tmp_path / "bad.pth"
  torch.save(sd, path)
  out = tmp_path / "out"
  assert pretrained.main(["--from=torch", str(path), f"--out={out}"]) == 2
  err = capsys.readouterr().err
  for needle in ("missing: features.28.bias", "unexpected: features.1.running_mean",
                 "classifier.3.weight (4096, 4095) (expected (4096, 4096))"):
    assert needle in err
  assert sorted(os.listdir(tmp_path)) == ["bad.pth"]


def test_unreadable_weight_files_are_one_line_naming_the_file(tmp_path):
  """Through ``python -m rma_jax.pretrained``: each used to end in a traceback or in an
  error without the file's name ([Errno 22], a bare EOFError, 'file signature not found',
  KeyError: 'model.weights.h5')."""
  torch = pytest.importorskip("torch")
  good = tmp_path / "vgg16.pth"
  torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, good)
  data = good.read_bytes()
  (tmp_path / "truncated.pth").write_bytes(data[:len(data) // 2])
  (tmp_path / "empty.pth").write_bytes(b"")
  (tmp_path / "garbage.h5").write_bytes(b"no HDF5 here" * 20)
  with zipfile.ZipFile(tmp_path / "no_weights.keras", "w") as z:
    z.writestr("config.json", "{}")
  cases = [("torch", "truncated.pth", "its end is missing: truncated?", "torchvision .pth"),
           ("torch", "empty.pth", "the file is empty", "torchvision .pth"),
           ("keras", "garbage.h5", "file signature not found", "Keras weight file"),
           ("keras", "vgg16.pth", "use --from=torch", "Keras weight file"),
           ("keras", "no_weights.keras", "without model.weights.h5", "Keras weight file")]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "rma_jax.pretrained", f"--from={origin}", str(tmp_path / name),
       f"--out={tmp_path / ('out_' + name)}"], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for origin, name, _, _ in cases]
  for proc, (origin, name, why, expected) in zip(procs, cases):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith(f"error: {tmp_path / name}: "), lines[0]
    assert why in lines[0] and f"expected a {expected}" in lines[0], lines[0]
    assert not (tmp_path / ("out_" + name)).exists()


def test_keras_names_checked_and_notop_accepted():
  shapes = _vgg16_shapes()
  keras_names = {name: f"block{name[4]}_conv{name[6]}" for name in CONVS}
  weights = {}
  for name, src in keras_names.items():
    weights[f"{src}/kernel"] = np.broadcast_to(np.float32(0), shapes[name][0])
    weights[f"{src}/bias"] = np.broadcast_to(np.float32(0), shapes[name][1])
  notop = weights_lib.to_flax(weights, "keras")  # vgg16_..._notop.h5: convs only
  assert sorted(notop["params"]) == sorted(CONVS)
  assert notop["pixel_convention"] == "caffe"

  bad = dict(weights)
  del bad["block5_conv3/bias"]
  bad["block1_conv1_bn/gamma"] = np.zeros(64)
  bad["fc1/kernel"] = np.broadcast_to(np.float32(0), (4096, 25088))  # (out, in): transposed
  bad["fc1/bias"] = np.zeros(4096)
  with pytest.raises(weights_lib.WeightsMismatchError) as info:
    weights_lib.to_flax(bad, "keras")
  message = str(info.value)
  for needle in ("block5_conv3/bias", "fc2/kernel", "fc2/bias", "block1_conv1_bn/gamma",
                 "fc1/kernel (4096, 25088) (expected (25088, 4096))"):
    assert needle in message
  with pytest.raises(ValueError, match="origin"):
    weights_lib.to_flax(weights, "caffe")


# --------------------------------------------------------------------------------------------
# Initialisation.


def _random_imagenet(rng, with_fc=True):
  return {name: {"kernel": rng.random(k, dtype=np.float32),
                 "bias": rng.random(b, dtype=np.float32)}
          for name, (k, b) in _vgg16_shapes().items() if with_fc or name in CONVS}


def _random_like(model, images, seed):
  """A parameter tree of ``model`` filled with NumPy random values: the structure comes from
  ``jax.eval_shape``, so no XLA compile of the model's init (tens of seconds on 2 CPUs)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  return jax.tree.map(lambda s: rng.random(s.shape, dtype=np.float32), abstract)


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_init_trunk_from_pretrained_rma_width1_copies_convs_and_fc6():
  rng = np.random.default_rng(4)
  imagenet = _random_imagenet(rng)
  model = models.RMA(num_classes=3, num_regions=2, hidden_dim=16, z_dim=16)  # S 7, x_dim 4096
  # The real-size tree's structure without paying for its 10^8-value random init: fc6's
  # kernel is zeros, every other leaf random.
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  fresh = jax.tree.map(lambda s: (np.zeros(s.shape, s.dtype) if s.size > 10**7 else
                                  rng.random(s.shape, dtype=np.float32)), abstract)
  before = _leaves(fresh)
  new = init.init_trunk_from_pretrained(fresh, imagenet)
  for name in CONVS:
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(new["trunk"][name][leaf], imagenet[name][leaf])
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(new["attention"]["cell"]["fc6"][leaf], imagenet["fc6"][leaf])
  for key, value in _leaves(new).items():
    if "trunk" not in key and "'fc6'" not in key:
      np.testing.assert_array_equal(value, before[key])  # LSTM, hz, zs, zm untouched
  jax.tree.map(np.testing.assert_array_equal, _leaves(fresh), before)  # input not mutated
  assert jax.tree.map(np.shape, new) == jax.tree.map(lambda s: s.shape, abstract)


def test_init_trunk_from_pretrained_thin_baseline_and_errors():
  rng = np.random.default_rng(5)
  imagenet = _random_imagenet(rng, with_fc=False)
  fresh = {"params": _random_like(models.Baseline(models.VGG16(width=8), num_classes=4),
                                  jnp.zeros((1, 32, 32, 3)), 1)}
  new = init.init_trunk_from_pretrained(fresh, imagenet, width=8)
  assert set(new) == {"params"}
  cin = 3
  for name in CONVS:
    cout = _vgg16_shapes()[name][1][0] // 8
    np.testing.assert_array_equal(new["params"][name]["kernel"],
                                  imagenet[name]["kernel"][:, :, :cin, :cout])
    np.testing.assert_array_equal(new["params"][name]["bias"], imagenet[name]["bias"][:cout])
    cin = cout
  jax.tree.map(np.testing.assert_array_equal, new["params"]["head"], fresh["params"]["head"])

  with pytest.raises(weights_lib.WeightsMismatchError, match="conv1_2/kernel: pretrained") as info:
    init.init_trunk_from_pretrained(fresh, imagenet)  # width 1: no thinning allowed
  assert "conv5_3/bias" in str(info.value)
  del imagenet["conv4_2"]
  with pytest.raises(weights_lib.WeightsMismatchError, match="conv4_2: missing"):
    init.init_trunk_from_pretrained(fresh, imagenet, width=8)


def test_init_rma_from_baseline_stage2():
  images = jnp.zeros((2, 32, 32, 3))
  rma = models.RMA(num_classes=5, num_regions=3, width=8, sample_size=2, x_dim=32,
                   hidden_dim=16, z_dim=16)
  # Fresh RMA params: the attention module's real (Xavier) init — the same module RMA builds
  # — next to a trunk of arbitrary values; initialising the trunk too would only add an XLA
  # compile of 13 convolutions.
  attention = models.RecurrentAttention(num_classes=5, num_regions=3, sample_size=2, x_dim=32,
                                        hidden_dim=16, z_dim=16)
  init_attention = jax.jit(attention.init)
  features = jnp.zeros((2, 2, 2, 64))

  def fresh_init():
    return {"trunk": _random_like(models.VGG16(width=8), images, 0),
            "attention": init_attention(jax.random.key(0), features)["params"]}

  fresh = fresh_init()
  assert jax.tree.structure(fresh) == jax.tree.structure(
      jax.eval_shape(rma.init, jax.random.key(0), images)["params"])
  stage1 = _random_like(models.Baseline(models.VGG16(width=8), num_classes=5), images, 1)
  fresh_before, stage1_before = _leaves(fresh), _leaves(stage1)

  new = init.init_rma_from_baseline(fresh, stage1)

  # A fresh init computed independently of the tree that was passed in.
  reference = _leaves(fresh_init())
  got = _leaves(new)
  assert sorted(got) == sorted(reference)
  for name in CONVS:
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(new["trunk"][name][leaf], stage1[name][leaf])
  others = [k for k in got if "trunk" not in k]
  assert len(others) == 11  # fc6 (W_fx), lstm_x (kernel, bias), lstm_h (kernel), hz, zs, zm
  for key in others:
    np.testing.assert_array_equal(got[key], reference[key])
  # Inputs untouched; the stage-1 head is not used.
  jax.tree.map(np.testing.assert_array_equal, _leaves(fresh), fresh_before)
  jax.tree.map(np.testing.assert_array_equal, _leaves(stage1), stage1_before)

  # Mismatches are named.
  wide = _random_like(models.VGG16(width=4), images, 2)
  with pytest.raises(weights_lib.WeightsMismatchError, match="trunk/conv3_1/kernel"):
    init.init_rma_from_baseline(fresh, wide)
