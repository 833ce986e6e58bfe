"""The ResNet trunks (issue 28): torchvision's ResNet-50 through the weight converter against
torch's own forward, the parameter count, batch norm frozen and fine-tuned, and the
ResNet-101 configs through the command line, ``load_run`` and the export.

torchvision is not needed (nor installed here): the torch reference
(``benchmarks.torch_rma.TorchResNet``, which the benchmark runs too) is torchvision's ResNet
written out with its module names, so its ``state_dict()`` has torchvision's keys.
"""

import importlib.util
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_sample_image

import rma_jax
from rma_jax import config_checks, errors, export, init, models, parallel, pixels
from rma_jax import pretrained, steps
from rma_jax import weights as weights_lib
from rma_jax.configs import voc_resnet101
from rma_jax.data.classes import VOC_CLASSES
import data_trees  # tests/data_trees.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- torch reference


def _randomise_batch_norm(torch, net, seed):
  """Non-trivial statistics and affine maps (a fresh BatchNorm2d is the identity), scaled so
  that activations stay O(1) through the residual sums."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.2 + 0.6 * torch.rand(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(1000)


def _photo(size=(64, 96)):
  """sklearn's china.jpg, resized (aspect kept) to a small real photo: (1, h, w, 3) uint8."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.fromarray(load_sample_image("china.jpg")).resize(size[::-1], Image.BILINEAR)
  return np.asarray(image)[None]


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_torchvision_resnet50_converted_by_the_cli_gives_torchs_layer4_map(tmp_path, capsys):
  """A ResNet-50 with torchvision's names and random weights and statistics, saved as a
  state dict and converted by ``python -m rma_jax.pretrained``, gives torch's layer4 map on
  a real photo to 1e-5 of its largest value (float64 on both sides), at stride 32 and at
  stride 16 (layer4 dilated, torchvision's ``replace_stride_with_dilation``), batch norm
  frozen; the checkpoint records the trunk, and a VGG-16 config refuses it."""
  torch = pytest.importorskip("torch")
  from benchmarks import torch_rma  # pylint: disable=g-import-not-at-top  # needs torch
  torch.manual_seed(0)
  net = torch_rma.TorchResNet(50).eval()
  _randomise_batch_norm(torch, net, 1)
  path = tmp_path / "resnet50-random.pth"
  torch.save(net.state_dict(), path)  # as torchvision's file: fc and num_batches_tracked too
  out = tmp_path / "resnet50"
  assert pretrained.main(["--from=torch", str(path), f"--out={out}"]) == 0
  assert "pixel_convention=torch" in capsys.readouterr().out
  params, convention = weights_lib.load_pretrained(out, pixel_convention="torch",
                                                   trunk="resnet50")
  assert convention == "torch"
  assert params["layer3_rest"]["conv2"]["kernel"].shape == (5, 3, 3, 256, 256)
  with pytest.raises(weights_lib.WeightsMismatchError, match="holds ResNet-50 weights"):
    weights_lib.load_pretrained(out, trunk="vgg16")

  photo = _photo()
  x = np.asarray(pixels.normalize(photo, "torch"), np.float64)
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    for stride in (32, 16):
      trunk = models.ResNet(depth=50, output_stride=stride, dtype=jnp.float64)
      got = jax.jit(trunk.apply)({"params": params64}, jnp.asarray(x))
      ref_net = net if stride == 32 else torch_rma.TorchResNet(50, dilate_layer4=True)
      if stride == 16:
        ref_net.load_state_dict(net.state_dict())
      with torch.no_grad():
        ref = ref_net.double().eval()(torch.from_numpy(x.transpose(0, 3, 1, 2)))
      want = ref.numpy().transpose(0, 2, 3, 1)
      assert got.shape == (1, 64 // stride, 96 // stride, 2048)
      assert _rel(got, want) <= 1e-5, stride


def test_resnet_parameter_counts_are_torchvisions_less_fc():
  """ResNet-101: torchvision's 44,549,160 less fc's 2,049,000 (batch-norm scales and biases
  included), its 105,344 batch-norm running statistics apart; ResNet-50: 25,557,032 less
  2,049,000. In 145 arrays (the blocks after a layer's first stacked)."""
  for depth, count, stats in ((101, 44_549_160 - 2_049_000, 105_344),
                              (50, 25_557_032 - 2_049_000, 53_120)):
    shapes = jax.eval_shape(models.ResNet(depth=depth).init, jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3)))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    assert sum(x.size for p, x in leaves if not models.is_batch_stat(p)) == count
    assert sum(x.size for p, x in leaves if models.is_batch_stat(p)) == stats
    assert len(leaves) == 145
  assert models.ResNet(depth=101).channels == 2048 and models.ResNet().stride == 32


def _random_variables(trunk, shape, seed=0):
  """Random parameters of ``trunk`` drawn with NumPy (compiling ``init`` costs seconds): He
  normal kernels, batch-norm affine maps and statistics near the identity."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1].key)
    if name == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[-3:-1])), leaf.shape)
    low, high = {"scale": (0.5, 1.0), "var": (0.5, 1.5)}.get(name, (-0.1, 0.1))
    return rng.uniform(low, high, leaf.shape)

  shapes = jax.eval_shape(trunk.init, jax.random.key(0), jnp.zeros(shape))
  return jax.tree_util.tree_map_with_path(lambda p, s: draw(p, s).astype(np.float32), shapes)


def test_unrolled_blocks_equal_the_scanned_ones():
  """``ResNet(unroll=True)`` (what the ONNX export traces) runs the stacked parameters of the
  scanned blocks one block after the other, and ``scan_unroll`` (the default: the scans'
  loops compiled written out) runs the same scans: the same map (at stride 16, where the
  blocks of layer4 after its first are dilated)."""
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  rolled = models.ResNet(depth=50, width=32, output_stride=16, scan_unroll=False)
  variables = _random_variables(rolled, x.shape)
  want = jax.jit(rolled.apply)(variables, x)
  tol = dict(rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  for trunk in (rolled.clone(scan_unroll=True), rolled.clone(unroll=True)):
    got = jax.jit(trunk.apply)(variables, x)
    assert got.shape == (2, 2, 2, 64)
    np.testing.assert_allclose(got, want, **tol)


# --------------------------------------------------------------------------- batch norm


def test_batch_norm_frozen_and_finetuned():
  """Frozen: no gradient reaches scale, bias or the statistics, and a training apply changes
  nothing. Fine-tuned: a training apply normalises by the batch and reports torch's running
  averages (momentum 0.1, unbiased variance), which ``merge_batch_stats`` writes into the
  parameters; otherwise it normalises by them."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(2.0, 3.0, (4, 3, 3, 5)), jnp.float32)
  params = {"scale": jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=5), jnp.float32),
            "mean": jnp.asarray(rng.normal(size=5), jnp.float32),
            "var": jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32)}
  running = ((x - params["mean"]) * params["scale"] / jnp.sqrt(params["var"] + 1e-5)
             + params["bias"])

  def apply(mode, p, train):
    bn = models.BatchNorm(mode=mode)
    return bn.apply({"params": p}, x, mutable=[models.BN_STATS] if train else False)

  frozen_out, frozen_stats = apply("frozen", params, True)
  np.testing.assert_allclose(frozen_out, running, rtol=1e-5, atol=1e-5)
  assert not frozen_stats
  grads = jax.grad(lambda p: jnp.sum(apply("frozen", p, True)[0] ** 2))(params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))

  np.testing.assert_allclose(apply("finetune", params, False), running, rtol=1e-5, atol=1e-5)
  out, mutated = apply("finetune", params, True)
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  np.testing.assert_allclose(out, (x - mean) * params["scale"] / jnp.sqrt(var + 1e-5)
                             + params["bias"], rtol=1e-4, atol=1e-4)
  stats = mutated[models.BN_STATS]
  np.testing.assert_allclose(stats["mean"], 0.9 * params["mean"] + 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 * params["var"] + 0.1 * var * 36 / 35,
                             rtol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(apply("finetune", p, True)[0] ** 2))(params)
  assert float(jnp.abs(grads["scale"]).max()) > 0 and float(jnp.abs(grads["mean"]).max()) == 0
  merged = models.merge_batch_stats({"bn": params, "head": {"kernel": x}}, {"bn": stats})
  assert merged["bn"]["mean"] is stats["mean"] and merged["head"]["kernel"] is x
  assert merged["bn"]["scale"] is params["scale"]


class _BNTrunk(nn.Module):
  """A convolution and fine-tuned batch norm: the smallest trunk whose step computes batch
  statistics."""
  stride = 16

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(8, (4, 4), strides=16, use_bias=False, name="conv")(images)
    return nn.relu(models.BatchNorm(mode="finetune", name="bn")(x))


def test_finetuned_batch_norm_statistics_are_the_global_batchs_on_two_devices():
  """The same step on 1 and on 2 (forced host) devices, the batch sharded: the batch-norm
  statistics are the global batch's (synchronised batch norm), and the step is the same
  (SGD: linear in the gradient, as test_train's sharding test)."""
  assert jax.device_count() >= 2, "conftest forces 4 host devices"
  model = models.Baseline(_BNTrunk(), num_classes=3, pixel_convention="unit")
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
           "labels": (rng.random((8, 3)) < 0.5).astype(np.float32)}
  batch["labels"][:, 0] = 1
  loss_cfg = steps.LossConfig(classification="sigmoid_bce")
  initial = jax.device_get(steps.create_train_state(
      model, tx, jax.random.key(0), (32, 32, 3), parallel.make_mesh(jax.devices()[:1])).params)
  finals = []
  for devices in (jax.devices()[:1], jax.devices()[:2]):
    mesh = parallel.make_mesh(devices)
    state = steps.TrainState.create(apply_fn=model.apply, tx=tx,
                                    params=jax.device_put(initial, parallel.replicated(mesh)))
    sharded = {k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in batch.items()}
    state, _ = steps.jit_train_step(loss_cfg, mesh)(state, sharded)
    finals.append(jax.device_get(state.params))
  # The statistics of the whole batch of 8, whichever device holds which images.
  x = pixels.normalize(batch["image"], "unit")
  conv = nn.Conv(8, (4, 4), strides=16, use_bias=False).apply(
      {"params": initial["conv"]}, x)
  mean = np.asarray(conv).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(finals[0]["bn"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


# --------------------------------------------------------------------------- configs, errors


def test_resnet_config_fields_refusals_and_weights():
  config = voc_resnet101.get_config()
  assert (config.model.trunk, config.data.crop_size, config.data.pixel_convention) == (
      "resnet101", 448, "torch")
  for field, value, message in (("resnet_stride", 8, r"model.resnet_stride=8: one of"),
                                ("bn", "sync", r"model.bn='sync': one of"),
                                ("region_pool", "max", r"model.region_pool='max': one of")):
    c = voc_resnet101.get_config()
    c.model[field] = value
    with pytest.raises(errors.ConfigError, match=message):
      config_checks.validate_config(c, num_devices=1)
  c = voc_resnet101.get_config()
  c.data.crop_size = 432  # a multiple of 16, not of 32
  with pytest.raises(errors.ConfigError, match=r"crop_size=432 must be a positive multiple "
                     r"of 32 \(the stride of model.trunk='resnet101'\)"):
    config_checks.validate_config(c, num_devices=1)
  c.model.resnet_stride = 16
  config_checks.validate_config(c, num_devices=1)
  # Frozen batch norm from scratch would never normalise anything: refused before step 0.
  with pytest.raises(errors.ConfigError, match=r"model.bn='frozen' keeps the batch-norm "
                     r"statistics as loaded, but this resnet101 starts from scratch"):
    init.initial_params(voc_resnet101.get_config(), {})
  # A torchvision state dict that is neither ResNet-50 nor -101.
  with pytest.raises(weights_lib.WeightsMismatchError, match="layer3 has 3 blocks"):
    weights_lib.to_flax({f"layer{i}.{j}.conv1.weight": np.zeros(1) for i in (1, 3)
                         for j in range(3)}, "torch")


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def resnet_run(shared_once):
  """``configs/voc_resnet101.py:tiny`` through the command line, both stages, on a VOC tree
  written here, once per session (``shared_once``): (workdir, its stderr)."""
  def build(root):
    ids = {"trainval": [f"{i:06d}" for i in range(24)],
           "test": [f"{i:06d}" for i in range(24, 32)]}
    examples = data_trees.voc_examples(list(VOC_CLASSES), ids["trainval"] + ids["test"])
    data_trees.write_files(root / "VOC2007", data_trees.voc_files(examples, ids))
    workdir = str(root / "run")
    result = _train_voc_resnet101_tiny(root / "VOC2007", workdir, "--config.max_steps=2")
    return {"workdir": workdir, "stderr": result.stderr}
  run = shared_once("resnet_run", build)
  return run["workdir"], run["stderr"]


def _train_voc_resnet101_tiny(data_dir, workdir: str, *flags: str):
  """``python -m rma_jax.main --config=configs/voc_resnet101.py:tiny`` on the VOC tree in
  ``data_dir``, both stages; fails the test unless it exits 0."""
  cmd = [sys.executable, "-m", "rma_jax.main", "--config=configs/voc_resnet101.py:tiny",
         f"--workdir={workdir}", "--config.data.source=local",
         f"--config.data.data_dir={data_dir}", "--config.data.num_workers=0",
         "--config.data.class_names=" + ",".join(VOC_CLASSES),  # 3 have no image here
         "--config.eval.allow_small_val=True", "--config.eval.ten_view=False", *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=(
      "--xla_force_host_platform_device_count=1 " + os.environ.get("RMA_TEST_XLA_FLAGS", "")))
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow
def test_voc_resnet101_tiny_trains_both_stages_and_reports(resnet_run):
  workdir, stderr = resnet_run
  assert "Stage 1 of 2: the baseline" in stderr
  assert "Stage 2 of 2: the attention model" in stderr
  assert "Initialised trunk from stage-1 checkpoint" in stderr
  assert os.path.exists(os.path.join(workdir, "report", "report.md"))
  run = rma_jax.load_run(workdir)
  assert isinstance(run.model.trunk, models.ResNet) and run.model.trunk.bn == "finetune"
  # Fine-tuned batch norm: the running statistics moved from their initial (0, 1) in
  # stage 1 and stage 2 started from them.
  trunk = run.params["trunk"]
  assert float(np.abs(np.asarray(trunk["layer3_rest"]["bn2"]["mean"])).max()) > 0
  assert run.params["attention"]["cell"]["fc6"]["kernel"].shape == (128, 32)  # avg-pooled


@pytest.mark.slow
def test_voc_resnet101_tiny_at_stride_16_trains_stage_2_and_reports(resnet_run, tmp_path):
  """The same command with ``model.resnet_stride=16`` (layer4 dilated): stage 2 from the
  stride-32 run's stage-1 checkpoint (``init.from_checkpoint``: the stride changes no
  parameter, and a stage 1 of its own would train the same baseline code on the same trunk,
  compiled again), one step, the report; the attention samples a 2 x 2 map (stride 32's is
  1 x 1 at 32 px)."""
  workdir = str(tmp_path / "run16")
  data_dir = os.path.join(os.path.dirname(resnet_run[0]), "VOC2007")
  stage1 = os.path.join(resnet_run[0], "stage1")
  result = _train_voc_resnet101_tiny(data_dir, workdir, "--config.max_steps=1",
                                     "--config.model.resnet_stride=16",
                                     "--config.stage1.num_epochs=0",
                                     f"--config.init.from_checkpoint={stage1}")
  assert f"Initialised trunk from stage-1 checkpoint {stage1} (step 2)" in result.stderr
  assert "Training 1 steps" in result.stderr and "RMA," in result.stderr
  assert os.path.exists(os.path.join(workdir, "report", "report.md"))
  run = rma_jax.load_run(workdir)
  assert run.model.trunk.output_stride == 16
  fmap = run.model.trunk.apply({"params": run.params["trunk"]}, jnp.zeros((1, 32, 32, 3)))
  assert fmap.shape == (1, 2, 2, 128)


def test_a_resnet_run_exports_and_the_artifact_equals_the_model(resnet_run, tmp_path):
  """``load_run`` of the trained ResNet run, ``export_run`` to StableHLO: the deserialised
  artifact gives the scores the run's report computed with the model on its test images."""
  from rma_jax.data import decode  # pylint: disable=g-import-not-at-top
  workdir = resnet_run[0]
  run = rma_jax.load_run(workdir)
  manifest = export.export_run(run, str(tmp_path), platforms=("cpu",), progress=lambda _: 0)
  assert manifest["trunk"] == "resnet101"
  with open(tmp_path / "single_view.stablehlo", "rb") as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  with np.load(tmp_path / export.PARAMS_FILE) as arrays:
    leaves = [arrays[n] for n in manifest["stablehlo"]["parameter_order"]]
  with np.load(os.path.join(workdir, "report", "scores.npz")) as report:
    ids, want = report["single_view@32/id"], report["single_view@32/scores"]
  jpegs = os.path.join(os.path.dirname(workdir), "VOC2007", "JPEGImages")
  images = np.stack([run.preprocess(decode.decode_image(os.path.join(jpegs, f"{i}.jpg")))
                     for i in ids])
  got = exp.call(leaves, images)
  np.testing.assert_allclose(got["scores"], want, rtol=1e-5, atol=1e-5)
  if all(importlib.util.find_spec(m) for m in ("jax2onnx", "onnxruntime")):  # .[export]
    import onnxruntime  # pylint: disable=g-import-not-at-top
    # The ONNX leg: jax2onnx's max_pool once dropped the stem pool's padding (a 0.44 error).
    export.export_run(run, str(tmp_path / "onnx"), formats=("onnx",), progress=lambda _: 0)
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "single_view.onnx"),
                                           providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    onnx_scores = session.run(None, {"images": images})[names.index("scores")]
    np.testing.assert_allclose(onnx_scores, want, rtol=1e-4, atol=1e-4)
