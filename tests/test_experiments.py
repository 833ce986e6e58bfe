"""Tests of the ablation variants (configs/ablations.py) and the runner (rma_jax.experiments).

Every training run of every table is built from a tiny demo config, initialised from a shared
one-step stage-1 baseline and trained for one step; the evaluation-only variants (views, scales) are
evaluated on one of those runs; the table writers are checked on fake results against
means and standard deviations computed independently with ``statistics``.
"""

import json
import os
import statistics
import zlib

import numpy as np
import pytest

from configs import ablations, demo
from rma_jax import experiments, models, train


def tiny_base():
  c = demo.get_config()
  c.data.demo.num_train = 64
  c.data.demo.num_val = 16
  c.data.demo.num_test = 16
  c.data.demo.canvas_size = 48
  c.data.image_size = 48  # N = 48, crop 32 (the demo's N - 16 offset), second scale 64
  c.data.crop_size = 32
  c.model.width = 16
  c.model.x_dim = 64
  c.model.hidden_dim = 64
  c.model.z_dim = 64
  c.optim.batch_size = 8
  c.eval.batch_size = 8
  c.eval.scales = (48,)
  c.max_steps = 1
  c.data.num_workers = 1
  return c


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  base = tiny_base()
  workdir = str(tmp_path_factory.mktemp("abl") / "stage1")
  summary = train.train(ablations.stage1_config(base), workdir)
  assert summary["step"] == 1
  return base, workdir


# --------------------------------------------------------------------------- the variants


def test_tables_cover_the_papers_rows():
  names = {t: [v.name for v in rows] for t, rows in ablations.TABLES.items()}
  assert names[4] == ["null", "S+P", "A+S", "A+P", "A+S+P"]
  assert names[5] == ["null", "A+S+P"]
  assert len(names[6]) == 5 and len(names[3]) == 2
  assert [ablations.RUNS[v.run]["model.num_regions"] for v in ablations.TABLES["K"]] == [
      1, 3, 5, 9]
  # The paper's Table 4 numbers as published (report.PAPER_TABLE4_VOC2007_MAP).
  from rma_jax import report
  assert {v.name: v.paper["voc2007"]["mAP"] for v in ablations.TABLES[4]} == (
      report.PAPER_TABLE4_VOC2007_MAP)
  assert ablations.parse_table("all") == ablations.table_keys()
  assert ablations.parse_table("3,loss") == [3, "loss"]
  with pytest.raises(ValueError):
    ablations.parse_table("7")


def test_every_variant_config_is_valid_and_means_what_its_row_says():
  base = tiny_base()
  n, n2 = ablations.scales(base)
  assert (n, n2) == (48, 64)
  assert ablations.second_scale(112) == 144 and ablations.second_scale(512) == 640
  for name, v in ablations.variants().items():
    c = ablations.variant_config(base, name, stage1_dir="/s1", seed=3)
    train.validate_config(c, num_devices=1)
    assert c.seed == 3
    flags = (c.loss.use_anchor, c.loss.use_scale, c.loss.use_positive)
    if v.run.startswith("rma_") or v.run.startswith("fixed"):
      label = v.run.split("_")[1]
      expected = {"ASP": (True,) * 3, "null": (False,) * 3, "SP": (False, True, True),
                  "AS": (True, True, False), "AP": (True, False, True),
                  "anchors": (True,) * 3}[label]
      assert flags == expected, name
      assert c.init.from_checkpoint == "/s1" and c.stage1.num_epochs == 0
      assert c.model.num_regions == int(v.run[-1])
      assert c.model.fixed_regions == ("anchors" if v.run.startswith("fixed") else "")
    else:  # the baselines: stage 2 without attention, from the same stage 1
      assert c.model.name == "baseline" and c.init.from_checkpoint == "/s1"
    assert c.optim.learning_rate == base.optim.learning_rate
    assert c.optim.num_epochs == base.optim.num_epochs
    single = v.protocol in (ablations.SINGLE_N, ablations.SINGLE_N2)
    assert c.eval.ten_view == (not single)
    expected_scales = {ablations.SINGLE_N: (n,), ablations.SINGLE_N2: (n2,),
                       ablations.TEN_N: (n,), ablations.TEN_N2: (n2,),
                       ablations.TEN_BOTH: (n, n2)}[v.protocol]
    assert tuple(c.eval.scales) == expected_scales, name
  loss = {v.name: ablations.variant_config(base, f"loss/{v.name}")
          for v in ablations.TABLES["loss"]}
  assert loss["baseline, sigmoid cross-entropy"].loss.classification == "sigmoid_bce"
  assert loss["baseline, sigmoid cross-entropy"].eval.score_transform == "sigmoid"
  assert loss["baseline, softmax-Euclidean (paper)"].loss.classification == "softmax_euclidean"


def test_apply_overrides_rejects_unknown_fields():
  with pytest.raises(KeyError):
    ablations.apply_overrides(tiny_base(), {"loss.use_anchr": False})


# --------------------------------------------------------------------------- one step each


@pytest.fixture(scope="module")
def demo_batch(stage1):
  """One real training batch of the tiny demo data, as host arrays."""
  from rma_jax import data as data_lib
  base, _ = stage1
  sources = data_lib.get_sources(base.data, seed=0)
  batch = next(data_lib.train_batches(sources.train, global_batch_size=8, image_size=48,
                                      crop_size=32, seed=0, num_workers=1))
  return {k: batch[k] for k in ("image", "labels", "mask")}


# Each run compiles its own train step (~5-10 s on an idle 2-core CPU); the default selection
# keeps one attention run with fixed regions and one baseline, the rest are marked slow
# (``-m "not slow"`` skips them). rma_ASP_K5 is trained by the evaluation test below.
FAST_RUNS = ("fixed_anchors_K5", "baseline_sigmoid")


@pytest.mark.parametrize("run", [
    r if r in FAST_RUNS else pytest.param(r, marks=pytest.mark.slow) for r in ablations.RUNS])
def test_every_training_run_takes_one_step_from_the_shared_stage1(stage1, demo_batch, run):
  """Each run's config builds its model, initialises it the way the runner does (trunk from
  stage 1) and takes one jitted train step on a real demo batch."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  base, stage1_dir = stage1
  s1_params, _ = train.load_params(stage1_dir)
  mesh = train.make_mesh()
  batch = jax.device_put(demo_batch, NamedSharding(mesh, P("data")))
  lr = base.optim.learning_rate
  config = ablations.run_config(base, run, stage1_dir=stage1_dir)
  model = train.build_model(config)
  tx = train.make_optimizer(config.optim, lambda _: lr)
  state = train.create_train_state(model, tx, jax.random.key(0), (32, 32, 3), mesh)
  params, note = train._initial_params(config, jax.device_get(state.params))
  assert "stage-1" in note, run
  state = state.replace(params=params, opt_state=tx.init(params))
  state, metrics = train.jit_train_step(train.LossConfig.from_config(config), mesh)(
      state, batch)
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])), run
  new = jax.device_get(state.params)
  trunk = new["trunk"] if config.model.name == "rma" else new
  # Initialised from stage 1, then one Adam step: every trunk weight moved by at most
  # about the learning rate (Adam's first step is ~lr per coordinate).
  for layer in ("conv1_1", "conv5_3"):
    diff = np.abs(np.asarray(trunk[layer]["kernel"]) - np.asarray(s1_params[layer]["kernel"]))
    assert diff.max() <= 1.01 * lr, (run, layer)
  if config.model.name == "baseline":
    assert "head" in new and "trunk" not in new
    return
  if run.startswith("rma_null") or config.model.fixed_regions:
    # No constraint, or boxes that satisfy all three exactly (half-size 0.5 = alpha,
    # > beta, centres on the anchors): no localisation loss at all.
    assert float(metrics["loc_loss"]) == pytest.approx(0.0, abs=1e-7)
  elif config.loss.use_anchor and config.model.num_regions > 1:
    assert float(metrics["loc_loss"]) > 0.0, run  # regions start near the centre
  out = model.apply({"params": new}, np.zeros((1, 32, 32, 3), np.float32))
  assert out["theta"].shape == (1, config.model.num_regions + 1, 4)
  if config.model.fixed_regions == "anchors":
    np.testing.assert_allclose(np.asarray(out["theta"][0]),
                               models.fixed_region_thetas(config.model.num_regions),
                               atol=1e-6)


def test_eval_variants_evaluate_one_checkpoint_under_each_protocol(stage1, tmp_path):
  from rma_jax import evaluate
  from sklearn.metrics import average_precision_score
  base, stage1_dir = stage1
  run_dir = str(tmp_path / "rma_ASP_K5")
  # What the runner does for a run: one training (here one step), one evaluation that
  # computes every protocol.
  config = ablations.run_config(base, "rma_ASP_K5", stage1_dir=stage1_dir)
  assert train.train(config, run_dir)["step"] == 1
  every = evaluate.evaluate_and_report(config, run_dir)
  assert set(every["protocols"]) == {ablations.protocol_name(base, p)
                                     for p in ablations.PROTOCOLS}
  saved = np.load(os.path.join(run_dir, "report", "scores.npz"))
  for v in ablations.TABLES[6]:
    protocol = ablations.protocol_name(base, v.protocol)
    # Independent AP: sklearn on the softmax of the scores the report saved.
    s, y = saved[f"{protocol}/scores"], saved[f"{protocol}/labels"]
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    aps = [average_precision_score(y[:, c], p[:, c]) for c in range(y.shape[1])
           if y[:, c].any()]
    assert every["protocols"][protocol]["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)
  # The all-protocols evaluation is the config of the two-scale ten-view row; a single-view
  # row alone has its protocol as headline, with the same numbers as inside the former.
  assert every["headline"] == ablations.protocol_name(base, ablations.TEN_BOTH)
  name = "6/s=N2 + single-crop"
  results = evaluate.evaluate_and_report(
      ablations.variant_config(base, name, stage1_dir=stage1_dir), run_dir)
  protocol = ablations.protocol_name(base, ablations.variants()[name].protocol)
  assert protocol == "single_view@48"  # N2 = 64, minus the demo's 16-pixel crop margin
  assert results["headline"] == protocol and list(results["protocols"]) == [protocol]
  assert results["protocols"][protocol]["mAP"] == pytest.approx(
      every["protocols"][protocol]["mAP"], abs=1e-6)
  assert "attention_recall" in every
  assert experiments.metric_value(every, "", "attention_recall") == (
      every["attention_recall"]["model_regions"])


def test_a_finished_run_is_skipped(tmp_path, monkeypatch):
  base = tiny_base()
  run_dir = tmp_path / "seed0" / "rma_AP_K5" / "report"
  run_dir.mkdir(parents=True)
  fake = {"protocols": {"ten_view@48": {"mAP": 0.5}}, "headline": "ten_view@48"}
  (run_dir / "report.json").write_text(json.dumps({"results": fake}))

  def boom(*args, **kwargs):
    raise AssertionError("a finished run must not be trained again")
  monkeypatch.setattr(train, "train", boom)
  got = experiments.run_one(base, "rma_AP_K5", str(tmp_path / "seed0"), 0, "")
  assert got == fake


# --------------------------------------------------------------------------- the writers


def fake_results(seed: int, run: str, base) -> dict:
  """Deterministic fake evaluation results with every protocol of the tiny base."""
  rng = np.random.default_rng(zlib.crc32(f"{seed}/{run}".encode()))
  protocols = {ablations.protocol_name(base, p): {
      "mAP": float(rng.uniform(0.5, 0.9)), "CF1": float(rng.uniform(0.3, 0.8)),
      "OF1": float(rng.uniform(0.3, 0.8))} for p in ablations.PROTOCOLS}
  out = {"protocols": protocols, "headline": ablations.protocol_name(base, ablations.TEN_BOTH)}
  if not run.startswith("baseline"):
    out["attention_recall"] = {"model_regions": float(rng.uniform(0.4, 1.0)),
                               "fixed_anchor_boxes": 1.0}
  return out


@pytest.mark.parametrize("dataset", ["demo", "voc2007"])
def test_table_writers_on_fake_results(tmp_path, dataset):
  base = tiny_base()
  base.data.name = dataset
  seeds = [0, 1, 2]
  per_seed = {s: {r: fake_results(s, r, base) for r in ablations.RUNS} for s in seeds}
  for t in ablations.table_keys():
    table = experiments.collect_table(base, t, per_seed)
    paths = experiments.write_table(table, str(tmp_path))
    md = open(paths["md"], encoding="utf-8").read()
    for v, row in zip(ablations.TABLES[t], table["rows"]):
      protocol = ablations.protocol_name(base, v.protocol)
      for m in ablations.TABLE_METRICS[t]:
        vals = [per_seed[s][v.run]["protocols"][protocol][m] if m != "attention_recall"
                else per_seed[s][v.run].get("attention_recall", {}).get("model_regions",
                                                                        float("nan"))
                for s in seeds]
        if any(np.isnan(vals)):
          assert np.isnan(row["mean"][m])
          continue
        mean, std = statistics.mean(vals), statistics.stdev(vals)
        assert row["mean"][m] == pytest.approx(mean) and row["std"][m] == pytest.approx(std)
        assert f"{100 * mean:.1f} ± {100 * std:.1f}" in md
    # JSON: strict (no NaN), the same numbers.
    loaded = json.load(open(paths["json"], encoding="utf-8"))
    assert loaded["rows"][0]["values"]["mAP"] == pytest.approx(
        table["rows"][0]["values"]["mAP"])
    png = open(paths["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 150_000
  md4 = open(tmp_path / "table_4.md", encoding="utf-8").read()
  if dataset == "voc2007":  # the paper's Table 4 beside the measured numbers
    assert "| 91.3 |" in md4 and "| 89.9 |" in md4
  else:
    assert "91.3" not in md4 and "—" in md4


def test_mean_std_of_one_seed_and_missing_values():
  mean, std = experiments.mean_std([0.25])
  assert mean == 0.25 and np.isnan(std)
  assert experiments.format_mean_std(0.25, float("nan")) == "25.0"
  assert experiments.format_mean_std(float("nan"), float("nan")) == "—"
  mean, std = experiments.mean_std([0.2, float("nan"), 0.4])
  assert mean == pytest.approx(0.3) and std == pytest.approx(statistics.stdev([0.2, 0.4]))


def test_write_tables_from_finished_runs(tmp_path):
  base = tiny_base()
  for s in (0, 1):
    for r in ablations.RUNS:
      d = tmp_path / f"seed{s}" / r / "report"
      d.mkdir(parents=True)
      (d / "report.json").write_text(json.dumps({"results": fake_results(s, r, base)}))
  # Seed 2 has only one run: tables that need more are written from seeds 0 and 1.
  d = tmp_path / "seed2" / "rma_ASP_K5" / "report"
  d.mkdir(parents=True)
  (d / "report.json").write_text(json.dumps({"results": fake_results(2, "rma_ASP_K5", base)}))
  written = experiments.write_tables(base, str(tmp_path), ablations.table_keys(), [0, 1, 2])
  assert written[4]["seeds"] == [0, 1]
  assert written[6]["seeds"] == [0, 1, 2]  # only rma_ASP_K5
  assert (tmp_path / "attention_recall.png").stat().st_size < 150_000
  summary = (tmp_path / "summary.md").read_text()
  assert "Table 4" in summary and "table_4.png" in summary
