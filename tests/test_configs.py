"""Every config loads and validates, also shrunk by ``:tiny``; configs ship with the package
and load from any directory; invalid values are clear errors before compilation; the README
documents every field."""

import importlib
import os
import runpy
import subprocess
import sys

import ml_collections
import pytest

from rma_jax import configs
from rma_jax import config_checks
from rma_jax.configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = configs.NAMES


def _flat_items(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flat_items(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _flat_keys(d):
  return (k for k, _ in _flat_items(d))


def _module(name):
  return importlib.import_module(f"rma_jax.configs.{name}")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_validates(name):
  config = _module(name).get_config()
  assert isinstance(config, ml_collections.ConfigDict)
  config_checks.validate_config(config, num_devices=1)
  assert set(_flat_keys(config.to_dict())) == set(
      _flat_keys(default.get_config().to_dict()))


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_shrinks_the_config_and_keeps_the_run(name):
  full, tiny = _module(name).get_config(), _module(name).get_config("tiny")
  config_checks.validate_config(tiny, num_devices=4)  # tests force 4 host devices
  assert set(_flat_keys(tiny.to_dict())) == set(_flat_keys(full.to_dict()))
  # Small: widths, images, splits, batches, one scale, a few steps.
  assert tiny.model.width >= 16 and max(tiny.model.x_dim, tiny.model.hidden_dim) <= 32
  assert tiny.data.image_size <= 64 and tuple(tiny.eval.scales) == (tiny.data.image_size,)
  assert 0 < tiny.max_steps <= 4 and tiny.optim.batch_size <= 8
  assert tiny.data.demo.num_train <= 64
  # Enough data for the checks a run makes: a validation split of at least one eval batch.
  assert tiny.data.demo.num_val >= tiny.eval.batch_size and not tiny.eval.allow_small_val
  # The same run: data set, model, recipe, loss and schedule are the full config's.
  for key in ("data.name", "data.source", "data.pixel_convention", "model.name",
              "model.num_regions", "loss.classification", "stage1.num_epochs",
              "optim.learning_rate", "optim.schedule", "eval.ten_view", "eval.ap_mode"):
    group, field = key.split(".")
    assert tiny[group][field] == full[group][field], key
  assert _module(name).get_config("") == full  # nothing after ':' = the config as it is


def test_demo_resnet50_switch_changes_the_trunk_alone_and_keeps_the_map_sizes():
  """``--config=configs/demo.py:resnet50``: the demo with a width/8 ResNet-50 trunk (stride
  16, batch norm fine-tuned), every other field the VGG demo's; its map is VGG's conv5_3
  size on the demo's 96 px crops (6 x 6) and 112 px evaluation images (7 x 7)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rma_jax import build  # pylint: disable=g-import-not-at-top
  vgg, resnet = _module("demo").get_config(), _module("demo").get_config("resnet50")
  config_checks.validate_config(resnet, num_devices=1)
  flat_vgg, flat_resnet = (dict(_flat_items(c.to_dict())) for c in (vgg, resnet))
  changed = {k for k in flat_vgg if flat_vgg[k] != flat_resnet[k]}
  assert changed == {"model.trunk", "model.resnet_stride", "model.bn"}
  assert (resnet.model.trunk, resnet.model.width, resnet.model.resnet_stride) == (
      "resnet50", 8, 16)
  for config in (vgg, resnet):
    trunk = build.build_model(config, 10).trunk
    for size, cells in ((resnet.data.crop_size, 6), (resnet.eval.scales[0], 7)):
      fmap = jax.eval_shape(trunk.init_with_output, jax.random.key(0),
                            jnp.zeros((1, size, size, 3)))[0]
      assert fmap.shape[1:3] == (cells, cells), (config.model.trunk, size)


def test_unknown_config_argument_is_a_clear_error():
  with pytest.raises(ValueError, match=r"unknown config argument 'small'.*tiny"):
    _module("demo").get_config("small")


@pytest.mark.parametrize("name", CONFIGS)
def test_repository_shim_is_the_shipped_config_and_the_docstring_runs_it(name):
  # configs/NAME.py at the repository root, run as ml_collections runs a config file.
  shim = runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))
  assert shim["get_config"] is _module(name).get_config
  doc = _module(name).__doc__
  if name == "ablations":  # variants of a base config, run by rma_jax.experiments
    assert "python -m rma_jax.experiments --config=configs/" in doc
  else:
    assert f"python -m rma_jax.main --config=configs/{name}.py " in doc
  shims = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                 if f.endswith(".py") and not f.startswith("_"))
  assert shims == sorted(CONFIGS)


def test_resolve_config_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = os.path.join(os.path.dirname(configs.__file__), "demo.py")
  argv = ["prog", "--config=configs/demo.py:tiny", "--workdir=configs/demo.py"]
  assert configs.resolve_config_path(argv) == [
      "prog", f"--config={shipped}:tiny", "--workdir=configs/demo.py"]
  assert argv[1] == "--config=configs/demo.py:tiny"  # a new list
  assert configs.resolve_config_path(["p", "--config", "./configs/demo.py"]) == [
      "p", "--config", shipped]
  # Not a shipped config, or a path that exists here: left to ml_collections as given.
  for value in ("configs/mine.py", "other/demo.py", "/abs/configs/demo.py"):
    assert configs.resolve_config_path(["p", f"--config={value}"]) == ["p", f"--config={value}"]
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "demo.py").write_text("def get_config(arg=None): return {}\n")
  assert configs.resolve_config_path(["p", "--config=configs/demo.py"])[1] == (
      "--config=configs/demo.py")
  with pytest.raises(ValueError, match="no shipped config 'mine'"):
    configs.config_file("mine")


def test_cli_loads_configs_from_any_directory(tmp_path):
  """``--config=configs/demo.py:tiny`` outside the repository root used to fail (no such
  file; an absolute path then failed on ``from configs import default``)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  # An invalid override stops the run in validate_config, right after the config loaded.
  result = subprocess.run(
      [sys.executable, "-m", "rma_jax.main", "--config=configs/demo.py:tiny",
       f"--workdir={tmp_path / 'run'}", "--config.data.crop_size=64"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  # The demo shrunk by :tiny (image_size 64, not 112) was loaded.
  assert "data.crop_size=64 must be smaller than data.image_size=64" in result.stderr, (
      result.stderr[-3000:])
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_paper_settings_in_voc_and_coco():
  for name in ("voc", "coco"):
    c = _module(name).get_config()
    assert (c.data.image_size, c.data.crop_size, c.optim.batch_size) == (512, 448, 16)
    assert (c.optim.learning_rate, tuple(c.optim.decay_epochs), c.optim.num_epochs) == (
        1e-5, (30,), 45)
    assert (c.model.num_regions, c.model.sample_size, c.loss.gamma) == (5, 7, 0.1)
    assert (c.loss.alpha, c.loss.beta, c.loss.lambda_anchor, c.loss.lambda_positive) == (
        0.5, 0.1, 0.01, 0.1)


@pytest.mark.parametrize("field,value,message", [
    ("data.crop_size", 512, "must be smaller than data.image_size"),
    ("model.num_regions", 0, "num_regions"),
    ("data.name", "imagenet", "unknown data set"),
    ("optim.batch_size", 6, "divisible by the 4 devices"),
    ("data.crop_size", 440, "multiple of 16"),
    ("loss.classification", "hinge", "classification"),
    ("optim.learning_rate", float("inf"), "optim.learning_rate=inf must be a finite"),
    ("optim.trunk_lr_multiplier", -1.0, "trunk_lr_multiplier=-1.0 must be a finite"),
    ("optim.decay_factor", float("nan"), "decay_factor=nan must be a finite"),
    ("data.val_fraction", 1.0, r"val_fraction=1.0 must be in \[0, 1\)"),
    # The evaluation settings, checked before training (the final evaluation cannot fail):
    ("eval.scales", (-112,), r"eval.scales entry -112: N and N - 64 .* multiples of 16"),
    ("eval.scales", (512, 520), r"eval.scales entry 520"),
    ("eval.scales", (512.0,), r"eval.scales entry 512.0"),
    ("eval.ap_mode", "11point", r"eval.ap_mode='11point': one of \('voc07', 'all'\)"),
    ("eval.score_transform", "softplus", "eval.score_transform='softplus'"),
    ("eval.prf_score_transform", "max", "eval.prf_score_transform='max'"),
    ("eval.top_k", -1, r"eval.top_k=-1 must be an integer >= 0"),
    ("eval.threshold", float("nan"), "eval.threshold=nan must be a finite"),
    # The moving average and the asymmetric loss:
    ("optim.ema_decay", 1.0, r"optim.ema_decay=1.0 must be in \[0, 1\)"),
    ("optim.ema_decay", -0.5, r"optim.ema_decay=-0.5 must be in \[0, 1\)"),
    ("optim.ema_warmup_steps", -1, r"optim.ema_warmup_steps=-1 must be a number >= 0"),
    ("loss.gamma_neg", -4.0, r"loss.gamma_neg=-4.0 must be a finite number >= 0"),
    ("loss.gamma_pos", float("inf"), r"loss.gamma_pos=inf must be a finite number >= 0"),
    ("loss.clip", 1.0, r"loss.clip=1.0 must be in \[0, 1\)"),
])
def test_invalid_values_are_clear_errors(field, value, message):
  config = _module("voc").get_config()
  group, key = field.split(".")
  config[group][key] = value
  with pytest.raises(ValueError, match=message):
    config_checks.validate_config(config, num_devices=4)


def test_docs_document_every_field():
  with open(os.path.join(ROOT, "docs", "configs.md"), encoding="utf-8") as f:
    page = f.read()
  config = default.get_config()
  missing = [k for k in _flat_keys(config.to_dict()) if f"| `{k}` |" not in page]
  assert not missing, f"docs/configs.md's field table lacks {missing}"


def test_help_exits_0_with_the_modes_and_every_config_field():
  """``--help`` (it exited with 1) lists the modes, the flags and every config field with its
  default, of configs/default.py or of the --config given; --mode=show_config prints the
  config a run would use, overrides applied."""
  import subprocess
  import sys
  from rma_jax.configs import demo

  def main(*args):
    return subprocess.run([sys.executable, "-m", "rma_jax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))

  out = main("--help")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "--mode: <train|evaluate|predict|export|fuse|show_config>" in out.stdout
  assert "Library INFO lines (Orbax, clu, JAX): --verbosity=1" in out.stdout
  defaults = default.get_config()
  for key in _flat_keys(defaults.to_dict()):
    assert f"  --config.{key}=" in out.stdout, key
  assert "  --config.optim.learning_rate=1e-05\n" in out.stdout
  out = main("--config=configs/demo.py", "--help")
  assert out.returncode == 0 and "  --config.model.trunk_init='dirac'\n" in out.stdout
  out = main("--config=configs/demo.py", "--mode=show_config", "--config.optim.batch_size=8")
  assert out.returncode == 0, out.stderr[-2000:]
  expected = demo.get_config()
  expected.optim.batch_size = 8
  assert out.stdout.strip() == str(expected).strip()
  assert "  batch_size: 8\n" in out.stdout and "  trunk_init: dirac\n" in out.stdout


def test_one_stage1_recipe():
  """configs/voc_baseline.py is exactly the first stage that configs/voc.py runs with
  --config.stage1.num_epochs=20 (it was another recipe: step decay at 15 of 20 epochs, vs a
  cosine inside the two-stage job): the paper's Adam recipe shortened, the decay at the same
  fraction of the run, 30 of 45 epochs -> 13.3 of 20."""
  from rma_jax.configs import coco, coco_baseline, demo, voc, voc_baseline
  from rma_jax import run
  for full, baseline in ((voc, voc_baseline), (coco, coco_baseline)):
    c = full.get_config()
    c.stage1.num_epochs = 20
    (_, first, wd), (_, second, _) = run.stages(c, "/w")
    assert baseline.get_config().to_dict() == first.to_dict() and wd == "/w/stage1"
    assert second.init.from_checkpoint == "/w/stage1" and second.model.name == "rma"
    b = baseline.get_config()
    assert (b.model.name, b.optim.schedule, b.optim.num_epochs) == ("baseline", "step", 20)
    assert b.optim.decay_epochs == pytest.approx((30 * 20 / 45,))
    assert b.optim.learning_rate == c.stage1.learning_rate and b.stage1.num_epochs == 0
  d = demo.get_config()
  s1 = run.stage1_config(d)
  assert s1.optim.schedule == "constant" and s1.optim.decay_epochs == d.optim.decay_epochs
  assert (s1.optim.num_epochs, s1.optim.learning_rate, s1.loss.classification) == (
      12, 1e-3, "sigmoid_bce")
