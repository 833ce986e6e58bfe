"""``--mode=export`` (rma_jax.export) and ``rma_jax.load_run`` (rma_jax.trained).

The session's trained tiny run (test_train's ``finished_run``) is exported once through the
CLI; its artifacts are checked against the model on real photos (scikit-learn's
``china.jpg`` and ``flower.jpg``) and demo test images: the deserialised StableHLO function
against ``model.apply`` at two batch sizes from one artifact, the ONNX model in ONNX Runtime
(the ``.[export]`` extra; ``.ci/export.sh`` runs these tests where it is installed), the
convolutions of a GPU / TPU lowering made on this CPU host, the serving example in a process
where rma_jax and Flax cannot be imported, and the refusals.
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.datasets
from sklearn.datasets import load_sample_image

import rma_jax
from rma_jax import build, checkpointing, export, trained, visualize
from rma_jax.configs import demo as demo_config
from rma_jax.data import demo
import hidden  # tests/hidden.py
from test_train import _main, finished_run  # noqa: F401  (the session's trained tiny run)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("jax2onnx", "onnxruntime"))
PHOTOS = ("china.jpg", "flower.jpg")


@pytest.fixture(scope="module")
def exported(finished_run, shared_once):  # noqa: F811
  """(the trained workdir, its export folder, export.json) from one ``--mode=export`` per
  session; tests read them (and copy them to change them)."""
  def build(root):
    wd = str(root / "run")
    shutil.copytree(finished_run[0], wd)
    formats = "stablehlo,onnx" if HAS_ONNX else "stablehlo"
    result = _main(wd, "--mode=export", f"--formats={formats}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for view in export.VIEWS:
      assert re.search(rf"export: {view}\.stablehlo \([\d.]+ MiB, for cpu, cuda, tpu\)",
                       result.stdout), result.stdout
    return {"workdir": wd, "out": os.path.join(wd, "export")}
  paths = shared_once("export", build)
  with open(os.path.join(paths["out"], export.MANIFEST)) as f:
    return paths["workdir"], paths["out"], json.load(f)


def _photos_and_demo(run, ten_view=False):
  """The two photos and one demo test canvas, as the model takes them (B=3)."""
  images = [load_sample_image(name) for name in PHOTOS]
  images.append(demo.make_demo_split("test", 1).records[0].image)
  return np.stack([run.preprocess(im, ten_view) for im in images])


def _deserialized(out, view):
  with open(os.path.join(out, f"{view}.stablehlo"), "rb") as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  with open(os.path.join(out, export.MANIFEST)) as f:
    order = json.load(f)["stablehlo"]["parameter_order"]
  with np.load(os.path.join(out, export.PARAMS_FILE)) as arrays:
    return exp, [arrays[n] for n in order]


def test_stablehlo_artifact_equals_the_model_at_two_batch_sizes(exported):
  wd, out, manifest = exported
  run = rma_jax.load_run(wd)  # the config the workdir recorded
  assert manifest["class_names"] == list(run.class_names)
  assert manifest["checkpoint_step"] == run.step == 4  # the best checkpoint (validated at 4)
  # The parameters its validation selected (the moving average where it won).
  assert manifest["ema"] == run.ema == checkpointing.load_selected_params(wd).ema
  for name, entry in manifest["files"].items():
    with open(os.path.join(out, name), "rb") as f:
      assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"], name
  variables = {"params": run.params}
  for view in export.VIEWS:
    exp, params = _deserialized(out, view)
    assert exp.platforms == export.PLATFORMS
    images = _photos_and_demo(run, ten_view=view == "ten_view")
    for batch in (1, 3):  # one artifact, the batch size symbolic
      got = jax.device_get(exp.call(params, images[:batch]))
      if view == "single_view":  # the model itself, as training builds it
        want = run.model.apply(variables, jnp.asarray(images[:batch]))
        np.testing.assert_allclose(got["boxes"], visualize.theta_to_pixel_boxes(
            want["theta"][:, 1:], 1, 1), atol=1e-5)
        np.testing.assert_allclose(got["region_scores"], want["region_scores"], atol=1e-5)
      else:
        want = {"scores": run.outputs(images[:batch], ten_view=True)["scores"]}
      np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5, rtol=1e-5)
      e = np.exp(np.float64(want["scores"]) - np.max(want["scores"], -1, keepdims=True))
      np.testing.assert_allclose(got["probabilities"], e / e.sum(-1, keepdims=True), atol=1e-6)
      assert got["scores"].shape == (batch, len(run.class_names))


@pytest.mark.skipif(not HAS_ONNX, reason="the .[export] extra (jax2onnx, onnxruntime); "
                    ".ci/export.sh runs it")
def test_onnx_model_in_onnxruntime_equals_the_model(exported):
  import onnxruntime  # pylint: disable=g-import-not-at-top
  wd, out, manifest = exported
  run = rma_jax.load_run(wd)
  for view in export.VIEWS:
    session = onnxruntime.InferenceSession(os.path.join(out, f"{view}.onnx"),
                                           providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert sorted(names) == sorted(manifest["outputs"][view])
    images = _photos_and_demo(run, ten_view=view == "ten_view")
    for batch in (1, 3):
      got = dict(zip(names, session.run(None, {"images": images[:batch]})))
      want = run.outputs(images[:batch], ten_view=view == "ten_view")
      for key in names:
        np.testing.assert_allclose(got[key], want[key], atol=1e-4, err_msg=f"{view} {key}")
  # The ONNX serving example, without JAX.
  lines, photos = _serve("serve_onnx.py", out, ("jax", "jaxlib", "rma_jax", "flax"))
  _check_lines(lines, run, photos)


def test_a_gpu_or_tpu_export_made_on_this_cpu_holds_the_trunks_convolutions(exported):
  run = rma_jax.load_run(exported[0])
  for platform in ("cuda", "tpu"):
    module = export.stablehlo(run, "single_view", (platform,)).mlir_module()
    assert module.count("stablehlo.convolution") == 13, platform  # VGG-16's 13
  # Several platforms in one module: JAX lowers each convolution once per platform, in a
  # branch chosen by the platform the artifact is called on.
  exp, _ = _deserialized(exported[1], "single_view")
  assert exp.mlir_module().count("stablehlo.convolution") == 13 * len(export.PLATFORMS)


def _serve(script, out, hide):
  """examples/<script> on the two photos in a process where ``hide`` cannot be imported:
  (its lines, the photos' paths)."""
  photos = [os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", n)
            for n in PHOTOS]
  code = hidden.hiding(hide, """
      sys.argv = sys.argv[1:]
      runpy.run_path(sys.argv[0], run_name="__main__")
  """)
  result = subprocess.run(
      [sys.executable, "-c", code, os.path.join(ROOT, "examples", script), out, *photos],
      cwd="/", capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0 and "LEAKED" not in result.stderr, result.stderr[-2000:]
  return result.stdout.splitlines(), photos


def _check_lines(lines, run, photos):
  """The examples' lines are each photo's top 3 labels as ``run.outputs`` scores them, each
  probability to the 3 decimals printed."""
  probs = run.outputs(np.stack([run.preprocess(load_sample_image(n)) for n in PHOTOS])
                      )["probabilities"]
  assert len(lines) == len(photos), lines
  for line, photo, p in zip(lines, photos, probs):
    name, labels = line.rsplit(": ", 1)
    top = np.argsort(-p, kind="stable")[:3]
    assert name == photo
    assert [pair.split(" ")[0] for pair in labels.split(", ")] == [
        run.class_names[c] for c in top], (line, p)
    np.testing.assert_allclose([float(pair.split(" ")[1]) for pair in labels.split(", ")],
                               p[top], atol=1e-3)


def test_the_serving_example_labels_photos_without_rma_jax_or_flax(exported):
  wd, out, _ = exported
  lines, photos = _serve("serve_stablehlo.py", out, ("rma_jax", "flax", "optax", "orbax"))
  _check_lines(lines, rma_jax.load_run(wd), photos)


def test_export_refuses_a_run_without_best_checkpoint_and_an_existing_export(exported,
                                                                             tmp_path):
  wd, out, manifest = exported
  before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
  again = _main(wd, "--mode=export")
  assert again.returncode == 2, again.stderr[-2000:]
  assert again.stderr.strip().splitlines()[-1] == (
      f"error: {out} holds an export already (export.json); pass --overwrite to replace it, "
      "or another --out")
  assert before == {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}

  fresh = str(tmp_path / "run")
  shutil.copytree(wd, fresh, ignore=shutil.ignore_patterns("export"))
  shutil.rmtree(os.path.join(fresh, "checkpoints", "best"))  # trained, never validated
  refused = _main(fresh, "--mode=export")
  assert refused.returncode == 2
  line = refused.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: cannot export {fresh}: no best checkpoint under "), line
  assert not os.path.exists(os.path.join(fresh, "export"))

  # --overwrite (in-process) replaces it: export.json goes first and comes back last, and
  # the files of the old export that the new one has not are removed.
  copy = str(tmp_path / "export")
  shutil.copytree(out, copy)
  replaced = export.export_run(trained.load_run(wd), copy, overwrite=True, progress=lambda _: 0)
  assert replaced["files"][export.PARAMS_FILE] == manifest["files"][export.PARAMS_FILE]
  assert sorted(os.listdir(copy)) == sorted([export.MANIFEST, *replaced["files"]])


def test_the_baseline_exports_too(tmp_path):
  config = demo_config.get_config("tiny")
  config.model.name = "baseline"
  model = build.build_model(config, 10)
  size = config.data.crop_size
  params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8))["params"]
  run = trained.TrainedRun(config, model, params, tuple("abcdefghij"))
  formats = ("stablehlo", "onnx") if HAS_ONNX else ("stablehlo",)
  manifest = export.export_run(run, str(tmp_path), formats=formats, progress=lambda _: 0)
  assert sorted(manifest["outputs"]["single_view"]) == ["probabilities", "scores"]
  exp, leaves = _deserialized(str(tmp_path), "single_view")
  images = _photos_and_demo(run)[:2]
  want = model.apply({"params": params}, jnp.asarray(images))["scores"]
  np.testing.assert_allclose(exp.call(leaves, images)["scores"], want, atol=1e-5, rtol=1e-5)
  if HAS_ONNX:
    import onnxruntime  # pylint: disable=g-import-not-at-top
    session = onnxruntime.InferenceSession(str(tmp_path / "single_view.onnx"),
                                           providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"images": images})))
    np.testing.assert_allclose(got["scores"], want, atol=1e-4)
