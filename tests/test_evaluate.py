"""Ten-view / single-view scoring, multi-scale fusion, the SVM head and the end-to-end report.

Every expectation is computed independently: explicit crops and flips in a Python loop,
symmetric kernels (flip-equivariant trunk) for the flipped views, scikit-learn for the SVMs
and the APs.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import average_precision_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.svm import LinearSVC

from rma_jax import (build, checkpointing, evaluate, models, pixels, regions, report, steps,
                     svm)
from rma_jax import views as views_lib
from rma_jax.data import preprocess

K = 3
C = 4
TOL = dict(rtol=1e-4, atol=1e-5)
STATIC = dict(static_argnums=0, static_argnames=("crop_size", "return_features"))
ten_view = jax.jit(views_lib.ten_view_scores, **STATIC)
single_view = jax.jit(views_lib.single_view_scores, static_argnums=0,
                      static_argnames=("return_features",))


def fast_params(model, image_size=32, seed=0):
  """Random variables of ``model`` without compiling its initialisers.

  (Compiling ``model.init`` costs ~1.5 s per layer on CPU because of the random
  initialisers; the shapes come from ``jax.eval_shape`` and the values from NumPy.)
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, image_size, image_size, 3)))
  rng = np.random.default_rng(seed)

  def fill(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 10
    return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in), leaf.dtype)

  variables = jax.tree.map(fill, shapes)
  if "attention" in variables["params"]:
    # Regions near the centre with half the map's size, as the model's own init.
    zm = variables["params"]["attention"]["cell"]["zm"]
    zm["bias"] = jnp.asarray(models.DEFAULT_THETA_BIAS)
    zm["kernel"] = zm["kernel"] * 0.3
  return variables


def tiny_rma(**kw):
  return models.RMA(num_classes=C, num_regions=K, width=16, x_dim=32, hidden_dim=32,
                    z_dim=32, **kw)


@pytest.fixture(scope="module")
def rma_and_vars():
  model = tiny_rma()
  return model, fast_params(model)


def images(n, size, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def test_view_offsets_by_hand():
  assert views_lib.view_offsets(5, 5, 3, 3) == ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))
  assert views_lib.view_offsets(4, 6, 4, 2) == ((0, 0), (0, 4), (0, 0), (0, 4), (0, 2))
  with pytest.raises(ValueError):
    views_lib.view_offsets(4, 4, 5, 2)


def test_ten_views_are_the_crops_and_flips_of_the_map(rma_and_vars):
  model, variables = rma_and_vars
  x = images(2, 80)  # conv5_3 5x5; crop 48 -> patches 3x3
  out = ten_view(model, variables, x, crop_size=48, return_features=True)
  fmap = np.asarray(jax.jit(views_lib.trunk_features, static_argnums=0)(model, variables, x))
  corners = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
  views = [fmap[:, y:y + 3, x0:x0 + 3] for y, x0 in corners]
  views += [np.flip(v, axis=2) for v in views]
  assert out["view_scores"].shape == (2, 10, C)
  assert out["theta"].shape == (2, 10, K + 1, 4)
  expected_feats = []
  attend = jax.jit(lambda v, f: model.apply(v, f, True, method=models.RMA.attend))
  for v, view in enumerate(views):
    ref = attend(variables, jnp.asarray(view))
    np.testing.assert_allclose(out["view_scores"][:, v], ref["scores"], **TOL)
    np.testing.assert_allclose(out["theta"][:, v], ref["theta"], **TOL)
    expected_feats.append(np.max(np.asarray(ref["z"]), axis=1))
  np.testing.assert_allclose(out["scores"], np.mean(out["view_scores"], axis=1), **TOL)
  np.testing.assert_allclose(out["features"], np.mean(expected_feats, axis=0), **TOL)
  # The views really differ (otherwise the comparison above would prove little).
  assert np.abs(np.asarray(out["view_scores"][:, 0] - out["view_scores"][:, 3])).max() > 1e-6


def _count_primitives(jaxpr, name):
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      n += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count_primitives(sub, name)
  return n


def test_trunk_runs_once_per_image(rma_and_vars, monkeypatch):
  model, variables = rma_and_vars
  calls = []
  original = models.RMA.features

  def counting_features(module, x):
    calls.append(x.shape)
    return original(module, x)

  monkeypatch.setattr(models.RMA, "features", counting_features)
  x = images(3, 80)
  fn = lambda v, im: views_lib.ten_view_scores(model, v, im, crop_size=48)
  jaxpr = jax.make_jaxpr(fn)(variables, x)
  assert calls == [(3, 80, 80, 3)]  # one trunk call, on the 3 full images
  # 13 convolutions = one VGG-16 conv stack, each on the batch of 3 (not 30) images.
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert _count_primitives(jaxpr.jaxpr, "conv_general_dilated") == 13
  assert all(e.invars[0].aval.shape[0] == 3 for e in convs)


def _symmetrise_kernels(variables):
  """Makes every conv kernel mirror-symmetric in x, so the trunk commutes with a flip."""
  def sym(path, leaf):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if "conv" in name and name.endswith("kernel"):
      return (leaf + leaf[:, ::-1]) / 2
    return leaf
  return jax.tree_util.tree_map_with_path(sym, variables)


def test_equals_single_view_when_crop_is_the_whole_image(rma_and_vars):
  model, variables = rma_and_vars
  variables = _symmetrise_kernels(variables)
  x = images(2, 64, seed=1)
  ten = ten_view(model, variables, x, crop_size=64)
  single = single_view(model, variables, x)
  flipped = single_view(model, variables, x[:, :, ::-1])
  direct = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(single["scores"], direct["scores"], **TOL)
  for v in range(5):
    np.testing.assert_allclose(ten["view_scores"][:, v], single["scores"], **TOL)
    np.testing.assert_allclose(ten["view_scores"][:, 5 + v], flipped["scores"], **TOL)
  np.testing.assert_allclose(ten["scores"], (single["scores"] + flipped["scores"]) / 2, **TOL)


def test_uint8_input_is_normalised_by_the_model_on_device(rma_and_vars):
  """A model with a pixel convention takes uint8 images and normalises them as its first
  operation: the same scores as the model without one on the normalised images."""
  model, variables = rma_and_vars
  raw = jax.random.randint(jax.random.key(3), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
  a = ten_view(model.clone(pixel_convention="caffe"), variables, raw, crop_size=48)
  b = ten_view(model, variables, pixels.normalize(raw, "caffe"), crop_size=48)
  np.testing.assert_allclose(a["scores"], b["scores"], **TOL)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_baseline_ten_view_matches_a_loop(pool):
  """Each view pooled as the baseline's own head pools (model.baseline_pool), by a loop;
  single view and the whole-image view are the model's own forward pass."""
  model = models.Baseline(models.VGG16(width=16), num_classes=C, pool=pool)
  pool_fn = np.max if pool == "max" else np.mean
  variables = fast_params(model, seed=1)
  x = images(2, 80, seed=2)
  out = ten_view(model, variables, x, crop_size=48, return_features=True)
  assert "theta" not in out
  fmap = jax.jit(views_lib.trunk_features, static_argnums=0)(model, variables, x)
  head = variables["params"]["head"]
  pooled_views = []
  for v, (y, x0) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)] * 2):
    view = np.asarray(fmap)[:, y:y + 3, x0:x0 + 3]
    if v >= 5:
      view = view[:, :, ::-1]
    pooled = pool_fn(view, axis=(1, 2))
    pooled_views.append(pooled)
    np.testing.assert_allclose(out["view_scores"][:, v],
                               pooled @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                               **TOL)
  np.testing.assert_allclose(out["features"], np.mean(pooled_views, axis=0), **TOL)
  # crop == N: the unflipped views are the model's own output; so is the single view.
  direct = jax.jit(model.apply)(variables, x)["scores"]
  whole = ten_view(model, variables, x, crop_size=80)
  np.testing.assert_allclose(whole["view_scores"][:, 0], direct, **TOL)
  np.testing.assert_allclose(single_view(model, variables, x)["scores"], direct, **TOL)


def test_fuse_scales_is_the_mean():
  a = {"scores": np.array([[1.0, 2.0]]), "features": np.array([[0.0]]), "theta": 1}
  b = {"scores": np.array([[3.0, -2.0]]), "features": np.array([[4.0]])}
  fused = views_lib.fuse_scales([a, b])
  np.testing.assert_allclose(fused["scores"], [[2.0, 0.0]])
  np.testing.assert_allclose(fused["features"], [[2.0]])
  assert "theta" not in fused


def test_svm_head_on_separable_features_picks_c_by_validation_map():
  rng = np.random.default_rng(0)
  n_classes, dim = 3, 16
  centres = rng.normal(size=(n_classes, dim)) * 3

  def make(n):
    y = (rng.random((n, n_classes)) < 0.4).astype(np.float32)
    y[y.sum(1) == 0, 0] = 1
    return y @ centres + rng.normal(size=(n, dim)) * 0.5, y

  (xt, yt), (xv, yv), (xs, ys) = make(150), make(60), make(60)
  Cs = (1e-4, 1e-2, 1.0)
  head = svm.fit_svm_head(xt, yt, xv, yv, Cs=Cs)
  # Independent: scikit-learn's own one-vs-rest wrapper and AP.
  l2 = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  val_maps = {}
  for c in Cs:
    ovr = OneVsRestClassifier(LinearSVC(C=c, dual="auto", max_iter=5000)).fit(l2(xt), yt)
    val_maps[c] = np.mean([average_precision_score(yv[:, j], s) for j, s in
                           enumerate(ovr.decision_function(l2(xv)).T)])
  assert head.C == max(Cs, key=lambda c: val_maps[c])
  for c in Cs:
    assert head.val_map[c] == pytest.approx(val_maps[c], abs=1e-6)
  ovr = OneVsRestClassifier(LinearSVC(C=head.C, dual="auto", max_iter=5000)).fit(l2(xt), yt)
  scores = svm.svm_scores(head, xs)
  np.testing.assert_allclose(scores, ovr.decision_function(l2(xs)), rtol=1e-4, atol=1e-4)
  test_map = np.mean([average_precision_score(ys[:, j], scores[:, j])
                      for j in range(n_classes)])
  assert test_map > 0.95 > ys.mean() + 0.3  # far above chance (the positive rate)


def test_svm_head_survives_a_class_without_positives():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(30, 5))
  y = np.stack([(x[:, 0] > 0), np.zeros(30, bool)], axis=1).astype(np.float32)
  head = svm.fit_svm_head(x, y, x, y, Cs=(1.0,))
  s = svm.svm_scores(head, x)
  assert np.all(s[:, 1] == -1.0) and np.isfinite(s).all()


def demo_config(workdir_scales=(64, 80), svm=True):
  """configs/demo.py:tiny (N = 64, crop 48) with 12 test images, K regions, ``workdir_scales``."""
  from rma_jax.configs import demo
  config = demo.get_config("tiny")
  config.data.demo.num_train, config.data.demo.num_val, config.data.demo.num_test = 8, 8, 12
  config.data.num_workers = 0
  config.data.pixel_convention = "unit"
  config.model.num_regions = K
  config.eval.scales = workdir_scales
  config.eval.svm = svm
  config.eval.ap_mode = "voc07"
  return config


def test_evaluate_and_report_end_to_end(tmp_path):
  config = demo_config()
  wd = str(tmp_path)
  model = build.build_model(config, 10)
  # The state steps.create_train_state makes, with fast_params (its jitted init is slow).
  state = steps.TrainState.create(apply_fn=model.apply, params=fast_params(model)["params"],
                                  tx=optax.adam(1e-3))
  manager = checkpointing.latest_manager(wd)
  checkpointing.save(manager, 0, state)
  manager.wait_until_finished()

  results = evaluate.evaluate_and_report(config, wd)
  protocols = results["protocols"]
  assert set(protocols) == {"single_view@48", "single_view@64", "ten_view@64", "ten_view@80",
                            "ten_view@64+80", "svm"}
  assert results["headline"] == "svm" and results["num_images"] == 12

  # Independent single-view mAP: the model on resized images, softmax, sklearn's AP.
  from rma_jax import data as data_lib
  test = data_lib.get_sources(config.data, seed=config.seed).test
  ex = [test[i] for i in range(len(test))]
  x = np.stack([preprocess.eval_transform(e["image"], 48) for e in ex])
  y = np.stack([e["labels"] for e in ex])
  out = jax.jit(model.apply)({"params": jax.device_get(state.params)}, jnp.asarray(x))
  probs = np.asarray(jax.nn.softmax(out["scores"], axis=-1))
  aps = [average_precision_score(y[:, c], probs[:, c]) for c in range(10) if y[:, c].any()]
  assert protocols["single_view@48"]["mAP_all"] == pytest.approx(np.mean(aps), abs=1e-5)

  # Attention recall of the fixed anchor boxes, by a loop over the objects.
  fixed = models.fixed_region_thetas(K)[1:]
  hits = total = 0
  for e in ex:
    for x0, y0, x1, y1 in e["boxes"]:
      cx, cy = x0 + x1 - 1, y0 + y1 - 1
      total += 1
      hits += any(abs(cx - tx) <= sx and abs(cy - ty) <= sy for sx, sy, tx, ty in fixed)
  assert results["attention_recall"]["fixed_anchor_boxes"] == pytest.approx(hits / total)
  assert 0.0 <= results["attention_recall"]["model_regions"] <= 1.0

  # The pointing game on the model's own single-view outputs and the examples' boxes (the
  # metric itself is checked against a loop in test_metrics): the report wires the region
  # scores, regions 1..K and every box with its class.
  m_max = max(len(e["boxes"]) for e in ex)
  boxes = np.zeros((len(ex), m_max, 4))
  box_labels = np.full((len(ex), m_max), -1)
  for i, e in enumerate(ex):
    boxes[i, :len(e["boxes"])] = e["boxes"]
    box_labels[i, :len(e["boxes"])] = e["box_labels"]
  want = regions.pointing_game(np.asarray(out["region_scores"]), np.asarray(out["theta"])[:, 1:],
                               y, boxes, box_labels)
  got = results["pointing"]["model_regions"]
  assert got["num_pairs"] == want["num_pairs"] == int(y.sum())
  assert got["hit_rate"] == pytest.approx(want["hit_rate"])
  assert got["mean_iou"] == pytest.approx(want["mean_iou"], abs=1e-5)
  chance = results["pointing"]["chance"]
  assert chance["num_draws"] == evaluate.POINTING_CHANCE_DRAWS and 0 <= chance["hit_rate"] <= 1

  # Multi-scale fusion = mean of the per-scale ten-view scores.
  npz = np.load(os.path.join(wd, "report", "scores.npz"))
  np.testing.assert_allclose(npz["ten_view@64+80/scores"],
                             (npz["ten_view@64/scores"] + npz["ten_view@80/scores"]) / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(npz["single_view@48/scores"], np.asarray(out["scores"]),
                             rtol=1e-4, atol=1e-5)

  report = json.load(open(os.path.join(wd, "report", "report.json")))
  assert report["results"]["headline"] == "svm"
  for name in ("svm", "ten_view@64+80", "single_view@48"):
    for key in ("mAP", "mAP_all", "mAP_voc07", "CP", "CR", "CF1", "OP", "OR", "OF1", "ap"):
      assert key in report["results"]["protocols"][name], (name, key)
  assert report["results"]["protocols"]["single_view@48"]["mAP_all"] == pytest.approx(
      np.mean(aps), abs=1e-5)
  assert report["metric_card"]["ap_mode"] == "voc07"
  md = open(os.path.join(wd, "report", "report.md")).read()
  assert "Metric card" in md and "attention recall" in md and "C-F1" in md
  assert "## Pointing game" in md and "100 % by construction" in md
  assert f"| the model's regions | {100 * got['hit_rate']:.1f} |" in md
  assert report["results"]["pointing"]["chance"]["seed"] == evaluate.POINTING_CHANCE_SEED


def test_metric_card_states_the_transforms_that_were_computed(tmp_path):
  """After the softmax-Euclidean loss CP…OF1 threshold softmax/max: the card must say
  softmax_max (as the headline's metrics record it), not the AP transform 'softmax'."""
  config = demo_config(workdir_scales=(64,), svm=False)
  assert evaluate.prf_transform(config) == "softmax_max"
  rng = np.random.default_rng(0)
  scores, labels = rng.normal(size=(12, 10)), (rng.random((12, 10)) < 0.3).astype(np.float32)
  metrics = evaluate.compute_metrics(scores, labels, None, ap_mode="all", k=3, threshold=0.5,
                                     transform="softmax", prf=evaluate.prf_transform(config))
  results = {"headline": "ten_view@64", "protocols": {"ten_view@64": metrics},
             "split": "test", "checkpoint": "best", "step": 3,
             "class_names": [str(c) for c in range(10)], "num_images": 12}
  report.write_evaluation_report(results, config, str(tmp_path), [(64, 48)])
  card = json.load(open(tmp_path / "report.json"))["metric_card"]
  assert card["score_transform"] == "softmax"
  assert card["prf_score_transform"] == metrics["prf_score_transform"] == "softmax_max"
  md = open(tmp_path / "report.md").read()
  assert "- **prf_score_transform**: softmax_max" in md


# --------------------------------------------------------------------------- fusion of runs


@pytest.fixture(scope="module")
def two_evaluated_runs(tmp_path_factory):
  """Two evaluated demo workdirs: two seeds of parameters stand in for models trained at two
  scales, each evaluated (ten-view headline) on the same 12 test images."""
  config = demo_config(workdir_scales=(64,), svm=False)
  model = build.build_model(config, 10)
  workdirs = []
  for seed in (0, 1):
    wd = str(tmp_path_factory.mktemp(f"seed{seed}"))
    state = steps.TrainState.create(apply_fn=model.apply,
                                    params=fast_params(model, seed=seed)["params"],
                                    tx=optax.adam(1e-3))
    manager = checkpointing.latest_manager(wd)
    checkpointing.save(manager, 0, state)
    manager.wait_until_finished()
    assert evaluate.evaluate_and_report(config, wd)["headline"] == "ten_view@64"
    workdirs.append(wd)
  return workdirs


def _cli(*args):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", "rma_jax.main", *args], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300)


def test_fusing_two_runs_reports_the_map_of_their_mean_raw_scores(two_evaluated_runs, tmp_path):
  a, b = two_evaluated_runs
  out = str(tmp_path / "fused")
  result = _cli("--mode=fuse", f"--fuse_workdirs={a},{b}", f"--workdir={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  # Recomputed here: the mean of both runs' raw ten-view scores, softmax, sklearn's AP.
  npz = [np.load(os.path.join(w, "report", "scores.npz")) for w in (a, b)]
  np.testing.assert_array_equal(npz[0]["ten_view@64/id"], npz[1]["ten_view@64/id"])
  assert len(set(npz[0]["ten_view@64/id"].tolist())) == 12
  y = npz[0]["ten_view@64/labels"]
  mean = (npz[0]["ten_view@64/scores"] + npz[1]["ten_view@64/scores"]) / 2
  probs = np.asarray(jax.nn.softmax(mean, axis=-1))
  aps = [average_precision_score(y[:, c], probs[:, c]) for c in range(10) if y[:, c].any()]
  from rma_jax import metrics
  payload = json.load(open(os.path.join(out, "report", "report.json")))
  fused = payload["results"]["protocols"]["fused"]
  assert payload["results"]["headline"] == "fused"
  assert fused["mAP_all"] == pytest.approx(np.mean(aps), abs=1e-6)
  assert fused["mAP"] == pytest.approx(metrics.mean_average_precision(probs, y, mode="voc07"),
                                       abs=1e-6)
  # Each input's row is its own evaluation's headline; the two differ from the fusion.
  for w in (a, b):
    own = json.load(open(os.path.join(w, "report", "report.json")))["results"]
    row = payload["results"]["protocols"][f"{w}:ten_view@64"]
    assert row["mAP_all"] == pytest.approx(own["protocols"]["ten_view@64"]["mAP_all"], abs=1e-9)
    assert row["mAP_all"] != pytest.approx(fused["mAP_all"], abs=1e-6)
  assert payload["metric_card"]["prf_score_transform"] == "softmax_max"
  assert payload["results"]["paper_table6_two_scales_ten_crop"]["voc2007"] == 91.9
  md = open(os.path.join(out, "report", "report.md")).read()
  assert f"| {a} | ten_view@64 |" in md and f"| {b} | ten_view@64 |" in md
  assert "| **fused** |" in md and "| Paper: two scales + ten-crop (VOC 2007" in md
  assert "91.9" in md
  saved = np.load(os.path.join(out, "report", "scores.npz"))
  np.testing.assert_allclose(saved["fused/scores"], mean, rtol=1e-6)


def test_fusion_needs_the_same_images(two_evaluated_runs, tmp_path):
  import shutil
  from rma_jax import fuse
  a, b = two_evaluated_runs
  # The same images in another order: aligned by id, the same fused numbers.
  shuffled = str(tmp_path / "shuffled")
  shutil.copytree(b, shuffled)
  path = os.path.join(shuffled, "report", "scores.npz")
  arrays = dict(np.load(path))
  order = np.random.default_rng(0).permutation(12)
  np.savez(path, **{k: v[order] for k, v in arrays.items()})
  same = fuse.fuse_workdirs([a, b], str(tmp_path / "ab"))["protocols"]["fused"]
  again = fuse.fuse_workdirs([a, shuffled], str(tmp_path / "ab2"))["protocols"]["fused"]
  assert again["mAP_all"] == pytest.approx(same["mAP_all"], abs=1e-9)
  # Different images: a clear error naming both workdirs and the ids that differ.
  arrays["ten_view@64/id"] = arrays["ten_view@64/id"].copy()
  arrays["ten_view@64/id"][[3, 5]] = ["not_in_a_1", "not_in_a_2"]
  np.savez(path, **arrays)
  result = _cli("--mode=fuse", f"--fuse_workdirs={a},{shuffled}",
                f"--workdir={tmp_path / 'bad'}")
  assert result.returncode != 0
  assert "cannot fuse runs evaluated on different images" in result.stderr
  assert a in result.stderr and shuffled in result.stderr and "not_in_a_1" in result.stderr
  assert not os.path.exists(tmp_path / "bad" / "report" / "report.json")
  # scores.npz of an older version, without ids.
  np.savez(path, **{k: v for k, v in arrays.items() if not k.endswith("/id")})
  with pytest.raises(ValueError, match="no test-image ids"):
    fuse.fuse_workdirs([a, shuffled], str(tmp_path / "old"))
