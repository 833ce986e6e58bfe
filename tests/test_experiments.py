"""Tests of the ablation variants (configs/ablations.py) and the runner (rma_jax.experiments).

Every training run of every table is built from a tiny demo config, initialised from a shared
one-step stage-1 baseline and trained for one step; the evaluation-only variants (views, scales) are
evaluated on one of those runs; the table writers are checked on fake results against
means and standard deviations computed independently with ``statistics``.
"""

import json
import os
import statistics
import subprocess
import sys
import zlib

import numpy as np
import pytest

from rma_jax.configs import ablations, demo
from rma_jax import (build, checkpointing, config_checks, evaluate, models, optimizer, paper,
                     parallel, report, steps, train)
from rma_jax.experiments import check, records, runner, tables
from rma_jax import init as init_lib
from rma_jax import run as run_lib


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# On top of configs/demo.py:tiny: N = 48, crop 32 (the demo's N - 16 offset), second scale
# 64; one step per stage.
TINY = {
    "data.demo.canvas_size": 48, "data.image_size": 48, "data.crop_size": 32,
    "eval.scales": (48,), "max_steps": 1, "data.num_workers": 0,
}
TINY_FLAGS = [f"--config.{k}={v}" for k, v in TINY.items()]


def tiny_base():
  """configs/demo.py:tiny with TINY (the same as TINY_FLAGS on a command line)."""
  return ablations.apply_overrides(demo.get_config("tiny"), TINY)


@pytest.fixture(scope="module")
def stage1(shared_once):
  """The shared one-step stage-1 baseline, trained once per session."""
  base = tiny_base()

  def build(root):
    summary = train.train(run_lib.stage1_config(base), str(root / "stage1"))
    assert summary["step"] == 1
    return str(root / "stage1")
  return base, shared_once("experiments_stage1", build)


# --------------------------------------------------------------------------- the variants


def test_tables_cover_the_papers_rows():
  names = {t: [v.name for v in rows] for t, rows in ablations.TABLES.items()}
  assert names[4] == ["null", "S+P", "A+S", "A+P", "A+S+P"]
  assert names[5] == ["null", "A+S+P"]
  assert len(names[6]) == 5 and len(names[3]) == 2
  assert [ablations.RUNS[v.run]["model.num_regions"] for v in ablations.TABLES["K"]] == [
      1, 3, 5, 9]
  # The paper's Table 4 numbers as published (paper.PAPER_TABLE4_VOC2007_MAP).
  assert {v.name: v.paper["voc2007"]["mAP"] for v in ablations.TABLES[4]} == (
      paper.PAPER_TABLE4_VOC2007_MAP)
  assert ablations.parse_table("all") == ablations.table_keys()
  assert ablations.parse_table("3,loss") == [3, "loss"]
  with pytest.raises(ValueError):
    ablations.parse_table("7")


def test_every_variant_config_is_valid_and_means_what_its_row_says():
  base = tiny_base()
  n, n2 = ablations.scales(base)
  assert (n, n2) == (48, 64)
  assert ablations.second_scale(112) == 144 and ablations.second_scale(512) == 640
  s1 = run_lib.stage1_config(base)
  for name, v in ablations.variants().items():
    c = ablations.variant_config(base, name, stage1_dir="/s1", seed=3)
    config_checks.validate_config(c, num_devices=1)
    assert c.seed == 3
    kind = ablations.run_kind(v.run)
    flags = (c.loss.use_anchor, c.loss.use_scale, c.loss.use_positive)
    if kind != "stage2":
      # Stage 1 itself and the equal-budget baselines: the stage-1 recipe from the stage-1
      # initialisation (no checkpoint), for stage 1's epochs or stage 1 + stage 2's.
      assert c.model.name == "baseline" and c.init.from_checkpoint == "", name
      assert c.optim.learning_rate == base.stage1.learning_rate == s1.optim.learning_rate
      assert c.optim.schedule == s1.optim.schedule and c.stage1.num_epochs == 0
      epochs = base.stage1.num_epochs + (base.optim.num_epochs if kind == "budget" else 0)
      assert c.optim.num_epochs == epochs, name
      loss = (base.stage1.classification if kind == "stage1" else
              {"baseline_sigmoid_budget": "sigmoid_bce",
               "baseline_softmax_budget": "softmax_euclidean"}[v.run])
      assert c.loss.classification == loss
      assert evaluate.ap_transform(c) == ("sigmoid" if loss == "sigmoid_bce" else "softmax")
    elif v.run.startswith("rma_") or v.run.startswith("fixed"):
      label = v.run.split("_")[1]
      expected = {"ASP": (True,) * 3, "null": (False,) * 3, "SP": (False, True, True),
                  "AS": (True, True, False), "AP": (True, False, True),
                  "anchors": (True,) * 3}[label]
      assert flags == expected, name
      assert c.init.from_checkpoint == "/s1" and c.stage1.num_epochs == 0
      assert c.model.num_regions == int(v.run.split("_K")[1][0])
      assert c.model.fixed_regions == ("anchors" if v.run.startswith("fixed") else "")
      # The 'regions' attempts: exactly one option each on top of A+S+P, K = 5.
      options = (c.loss.anchor_schedule_epochs > 0, c.loss.min_scale > 0,
                 c.model.region_init == "anchors",
                 c.model.sample_size != base.model.sample_size)
      want = {"rma_ASP_K5_anchor_schedule": 0, "rma_ASP_K5_min_scale": 1,
              "rma_ASP_K5_region_init": 2, "rma_ASP_K5_S2x": 3}.get(v.run)
      assert options == tuple(i == want for i in range(4)), name
      if v.run == "rma_ASP_K5_S2x":
        assert c.model.sample_size == 2 * base.model.sample_size
    else:  # the stage-2 baselines: without attention, from the same stage 1
      assert c.model.name == "baseline" and c.init.from_checkpoint == "/s1"
    if kind == "stage2":
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
  assert evaluate.ap_transform(loss["baseline, sigmoid cross-entropy"]) == "sigmoid"
  # The peers' options, each on top of the paper's A+S+P, K = 5 model, with ASL's settings.
  peers = {v.name: ablations.variant_config(base, f"peers/{v.name}")
           for v in ablations.TABLES["peers"]}
  assert [(c.optim.ema_decay, c.loss.classification, evaluate.ap_transform(c))
          for c in peers.values()] == [(0.0, "softmax_euclidean", "softmax"),
                                       (0.9997, "softmax_euclidean", "softmax"),
                                       (0.0, "asl", "sigmoid"), (0.9997, "asl", "sigmoid")]
  assert all((c.loss.gamma_pos, c.loss.gamma_neg, c.loss.clip) == (0.0, 4.0, 0.05)
             for c in peers.values())
  assert loss["baseline, softmax-Euclidean (paper)"].loss.classification == "softmax_euclidean"
  # The paper's default stays the default: no attempt leaks into the base config.
  assert base.loss.anchor_schedule_epochs == 0 and base.loss.min_scale == 0.0
  assert base.model.region_init == ""


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
                                      crop_size=32, seed=0))
  return {k: batch[k] for k in ("image", "labels", "mask")}


# Each run compiles its own train step (~5-10 s on an idle 2-core CPU); the default selection
# keeps one attention run with fixed regions and one baseline, the rest are marked slow
# (``-m "not slow"`` skips them). rma_ASP_K5 is trained by the evaluation test below.
FAST_RUNS = ("fixed_anchors_K5", "baseline_sigmoid", "baseline_sigmoid_budget")


def _random_params(model, config):
  """Random parameters of ``model`` (He-scaled normal; the regions' transform near its
  initial box, as the model's own initialisation), on the host, without compiling
  ``model.init``."""
  import jax
  import jax.numpy as jnp
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  rng = np.random.default_rng(zlib.crc32(repr(config.model).encode()))

  def fill(path, leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 10
    value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
    if jax.tree_util.keystr(path).endswith("['zm']['kernel']"):
      value *= config.model.theta_kernel_scale
    if jax.tree_util.keystr(path).endswith("['zm']['bias']"):
      value = np.asarray(config.model.theta_bias)
    return value.astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


# The runs with a moving average train the model and loss of a run without one (their step
# adds the average: tests/test_train.py's closed form and CLI runs): not stepped again here.
STEPPED_RUNS = [r for r, o in ablations.RUNS.items() if not o.get("optim.ema_decay")]


@pytest.mark.parametrize("run", [
    r if r in FAST_RUNS else pytest.param(r, marks=pytest.mark.slow) for r in STEPPED_RUNS])
def test_every_training_run_takes_one_step_from_the_shared_stage1(stage1, demo_batch, run):
  """Each run's config builds its model, initialises it the way the runner does (trunk from
  stage 1, or for the equal-budget baselines stage 1's own initialisation) and takes one
  jitted train step on a real demo batch."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  base, stage1_dir = stage1
  s1_params, _ = checkpointing.load_params(stage1_dir)
  mesh = parallel.make_mesh()
  batch = jax.device_put(demo_batch, NamedSharding(mesh, P("data")))
  lr = base.optim.learning_rate
  config = ablations.run_config(base, run, stage1_dir=stage1_dir)
  model = build.build_model(config, 10)
  tx = optimizer.make_optimizer(config.optim, lambda _: lr)
  # The runner's initialisation order (rma_jax.init) on fresh parameters of the model's
  # shapes; the fresh values are random here, not the model's initialisers, whose compiled
  # code (seconds per model structure) tests/test_models.py checks.
  fresh = _random_params(model, config)
  params, note = init_lib.initial_params(config, fresh)
  state = steps.TrainState.create(apply_fn=model.apply, tx=tx,
                                  params=jax.device_put(fresh, parallel.replicated(mesh)))
  if ablations.run_kind(run) == "budget":
    # Not from stage 1's weights but from its initialisation: the same module, seed, init.
    s1 = ablations.run_config(base, ablations.STAGE1)
    assert note.startswith("from scratch"), run
    assert build.build_model(config, 10) == build.build_model(s1, 10)
    assert config.seed == s1.seed and config.init == s1.init
    assert config.optim.learning_rate == s1.optim.learning_rate
    state, metrics = steps.jit_train_step(steps.LossConfig.from_config(config), mesh)(
        state, batch)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])), run
    return
  assert "stage-1" in note, run
  params = jax.device_put(params, parallel.replicated(mesh))
  state = state.replace(params=params, opt_state=tx.init(params))
  state, metrics = steps.jit_train_step(steps.LossConfig.from_config(config), mesh)(
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
  images = np.zeros((1, 32, 32, 3), np.uint8)
  out = jax.eval_shape(model.apply, {"params": new}, images)
  assert out["theta"].shape == (1, config.model.num_regions + 1, 4)
  if config.model.fixed_regions == "anchors":
    theta = jax.jit(model.apply)({"params": new}, images)["theta"]
    np.testing.assert_allclose(np.asarray(theta[0]),
                               models.fixed_region_thetas(config.model.num_regions),
                               atol=1e-6)


def test_a_finished_run_is_skipped_and_an_evaluation_resumes(tmp_path, monkeypatch):
  from rma_jax import evaluate
  base = tiny_base()
  results_dir = str(tmp_path / "results")
  rec = fake_results(0, "rma_AP_K5", base)
  records.write_json(records.record_path(results_dir, 0, "rma_AP_K5"), rec)

  def boom(*args, **kwargs):
    raise AssertionError("a finished run must not be trained or evaluated again")
  monkeypatch.setattr(train, "train", boom)
  monkeypatch.setattr(evaluate, "evaluate_and_report", boom)
  got = runner.run_one(base, "rma_AP_K5", str(tmp_path / "w"), results_dir, 0)
  assert got["protocols"] == rec["protocols"]

  # Trained already (train_timing.json) but not evaluated (no record): evaluated only, and
  # the record keeps the first session's training time.
  run_dir = tmp_path / "w" / "seed0" / "rma_SP_K5"
  timing = {"wall_s": 120.0, "cpu_s": 200.0, "loadavg_start": [1.0, 1.0, 1.0],
            "loadavg_end": [1.1, 1.0, 1.0], "summary": {"step": 9, "start_step": 0}}
  records.write_json(str(run_dir / "train_timing.json"), timing)
  fake = fake_results(0, "rma_SP_K5", base)
  fake = {k: v for k, v in fake.items() if k in ("protocols", "headline", "pointing",
                                                 "attention_recall")}
  monkeypatch.setattr(evaluate, "evaluate_and_report", lambda config, workdir: fake)
  got = runner.run_one(base, "rma_SP_K5", str(run_dir), results_dir, 0, "/s1")
  path = records.record_path(results_dir, 0, "rma_SP_K5")
  saved = records.load_record(path)
  assert saved["timing"]["train_wall_s"] == 120.0 and saved["timing"]["train_cpu_s"] == 200.0
  assert saved["timing"]["wall_s"] == pytest.approx(120.0 + saved["timing"]["eval_wall_s"])
  assert saved["timing"]["comparable"] and saved["timing"]["loadavg_start"] == [1.0] * 3
  assert saved["status"] == "complete" and saved["kind"] == "stage2" and saved["seed"] == 0
  assert saved["config"]["loss"]["use_anchor"] is False  # S+P: the full run config
  assert saved["config"]["init"]["from_checkpoint"] == "/s1"
  assert saved["pointing"] == json.loads(json.dumps(fake["pointing"]))
  assert set(saved["git"]) == {"commit", "dirty"} and saved["git"]["commit"]
  assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp")]
  # A record that is not final is refused, not silently used.
  with open(path, "w") as f:
    json.dump({"status": "running"}, f)
  with pytest.raises(ValueError, match="not a finished run record"):
    records.load_record(path)


# --------------------------------------------------------------------------- the writers


def fake_results(seed: int, run: str, base) -> dict:
  """A deterministic fake run record with every protocol of the tiny base."""
  rng = np.random.default_rng(zlib.crc32(f"{seed}/{run}".encode()))
  protocols = {ablations.protocol_name(base, p): {
      "mAP": float(rng.uniform(0.5, 0.9)), "CF1": float(rng.uniform(0.3, 0.8)),
      "OF1": float(rng.uniform(0.3, 0.8))} for p in ablations.PROTOCOLS}
  out = {"status": "complete", "run": run, "seed": seed, "protocols": protocols,
         "headline": ablations.protocol_name(base, ablations.TEN_BOTH),
         "timing": {"wall_s": float(rng.uniform(60, 900))}}
  if not run.startswith("baseline") and run != ablations.STAGE1:
    out["attention_recall"] = {"model_regions": float(rng.uniform(0.4, 1.0)),
                               "fixed_anchor_boxes": 1.0}
    out["pointing"] = {"model_regions": {"hit_rate": float(rng.uniform(0.2, 0.9)),
                                         "mean_iou": float(rng.uniform(0.05, 0.5))},
                       "chance": {"hit_rate": float(rng.uniform(0.2, 0.5)),
                                  "mean_iou": float(rng.uniform(0.05, 0.2))}}
  return out


def expected_value(per_seed, seed, run, protocol, metric):
  """A metric of a fake record, read independently of tables.metric_value."""
  rec = per_seed[seed][run]
  nan = float("nan")
  if metric in ("mAP", "CF1", "OF1"):
    return rec["protocols"][protocol][metric]
  if metric == "attention_recall":
    return rec.get("attention_recall", {}).get("model_regions", nan)
  if metric.startswith("pointing"):
    if "pointing" not in rec:
      return nan
    p = rec["pointing"]["chance" if metric == "pointing_chance" else "model_regions"]
    return p["mean_iou" if metric == "pointing_iou" else "hit_rate"]
  wall = rec["timing"]["wall_s"] / 60
  if metric == "wall_min":
    return wall
  assert metric == "wall_min_total"
  if ablations.run_kind(run) == "stage2":
    wall += per_seed[seed][ablations.STAGE1]["timing"]["wall_s"] / 60
  return wall


ALL_RUNS = list(ablations.RUNS) + [ablations.STAGE1]


def test_wall_times_only_of_runs_timed_alone():
  """A run that shared the machine (--concurrent_trainings=2) or resumed keeps its record,
  metrics and raw timing, but the tables' wall time is the mean of the runs timed alone."""
  base = tiny_base()
  seeds = [0, 1, 2]
  per_seed = {s: {r: fake_results(s, r, base) for r in ALL_RUNS} for s in seeds}
  run = "rma_ASP_K5"
  per_seed[1][run]["timing"].update(comparable=False, concurrent_trainings=2)
  per_seed[2][run]["timing"].update(comparable=False, resumed_from_step=40)
  table = tables.collect_table(base, 3, per_seed)
  row = next(r for r in table["rows"] if r["run"] == run)
  alone = per_seed[0][run]["timing"]["wall_s"] / 60
  assert row["mean"]["wall_min"] == pytest.approx(alone) and np.isnan(row["std"]["wall_min"])
  maps = [per_seed[s][run]["protocols"][row["protocol"]]["mAP"] for s in seeds]
  assert row["mean"]["mAP"] == pytest.approx(statistics.mean(maps))
  # The runner records what it was told: two trainings sharing the machine.
  rec = records.run_record(run=run, seed=1, config=base, results=fake_results(1, run, base),
                           train_timing={"wall_s": 60.0, "cpu_s": 50.0, "summary": {}},
                           eval_timing={"wall_s": 5.0, "cpu_s": 5.0},
                           concurrent_trainings=2)
  assert rec["timing"]["concurrent_trainings"] == 2 and not rec["timing"]["comparable"]
  assert np.isnan(tables.metric_value(rec, row["protocol"], "wall_min"))


@pytest.mark.parametrize("dataset", ["demo", "voc2007"])
def test_table_writers_on_fake_results(tmp_path, dataset):
  base = tiny_base()
  base.data.name = dataset
  seeds = [0, 1, 2]
  per_seed = {s: {r: fake_results(s, r, base) for r in ALL_RUNS} for s in seeds}
  for t in ablations.table_keys():
    table = tables.collect_table(base, t, per_seed)
    assert not table["partial"]
    paths = tables.write_table(table, str(tmp_path))
    md = open(paths["md"], encoding="utf-8").read()
    for v, row in zip(ablations.TABLES[t], table["rows"]):
      protocol = ablations.protocol_name(base, v.protocol)
      for m in ablations.TABLE_METRICS[t]:
        vals = [expected_value(per_seed, s, v.run, protocol, m) for s in seeds]
        if any(np.isnan(vals)):
          assert np.isnan(row["mean"][m]) and m not in ("mAP", "CF1", "OF1")
          continue
        mean, std = statistics.mean(vals), statistics.stdev(vals)
        assert row["mean"][m] == pytest.approx(mean) and row["std"][m] == pytest.approx(std)
        scale = 1 if m.startswith("wall") else 100
        assert f"{scale * mean:.1f} ± {scale * std:.1f}" in md, (t, m)
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
  budget = open(tmp_path / "table_budget.md", encoding="utf-8").read()
  e1, e2 = base.stage1.num_epochs, base.optim.num_epochs
  assert f"baseline, stage 1 only ({e1} epochs)" in budget
  assert f"sigmoid cross-entropy, {e1 + e2} epochs in one go" in budget
  regions = open(tmp_path / "table_regions.md", encoding="utf-8").read()
  assert f"S = {2 * base.model.sample_size}" in regions and "pointing, chance" in regions


def test_mean_std_of_one_seed_and_missing_values():
  mean, std = tables.mean_std([0.25])
  assert mean == 0.25 and np.isnan(std)
  assert tables.format_mean_std(0.25, float("nan")) == "25.0"
  assert tables.format_mean_std(float("nan"), float("nan")) == "—"
  mean, std = tables.mean_std([0.2, float("nan"), 0.4])
  assert mean == pytest.approx(0.3) and std == pytest.approx(statistics.stdev([0.2, 0.4]))


def test_write_tables_from_the_records_only_and_marks_partial_tables(tmp_path):
  base = tiny_base()
  results = tmp_path / "results"
  for s in (0, 1):
    for r in ALL_RUNS:
      records.write_json(records.record_path(str(results), s, r),
                         fake_results(s, r, base))
  # Seed 2 has only one run: tables that need more are written from seeds 0 and 1.
  records.write_json(records.record_path(str(results), 2, "rma_ASP_K5"),
                     fake_results(2, "rma_ASP_K5", base))
  # A workdir report is not a record: ignored.
  d = tmp_path / "seed2" / "fixed_anchors_K5" / "report"
  d.mkdir(parents=True)
  (d / "report.json").write_text(json.dumps({"results": fake_results(2, "x", base)}))
  written = tables.write_tables(base, str(results), ablations.table_keys(), [0, 1, 2])
  assert written[4]["seeds"] == [0, 1] and written[4]["partial"]
  assert written[6]["seeds"] == [0, 1, 2] and not written[6]["partial"]  # only rma_ASP_K5
  md4 = (results / "table_4.md").read_text()
  assert "**Partial: 2 of 3 seeds finished** (seeds [0, 1] of [0, 1, 2])" in md4
  assert "Partial" not in (results / "table_6.md").read_text()
  assert json.loads((results / "table_4.json").read_text())["partial"] is True
  for png in ("attention_recall.png", "pointing.png"):
    assert (results / png).stat().st_size < 150_000
  summary = (results / "summary.md").read_text()
  assert "Table 4" in summary and "table_4.png" in summary and "pointing.png" in summary


def _page_with_tables(tmp_path, base):
  results = tmp_path / "docs" / "ablations"
  for s in (0, 1):
    for r in ALL_RUNS:
      records.write_json(records.record_path(str(results), s, r),
                         fake_results(s, r, base))
  page = tmp_path / "docs" / "ablations.md"
  page.write_text("# Ablations\n\nHand-written text with 12.3 outside any table.\n\n"
                  f"{tables.GENERATED_BEGIN}\nold\n{tables.GENERATED_END}\n\n"
                  "## After\n")
  tables.write_tables(base, str(results), ablations.table_keys(), [0, 1],
                      page=str(page))
  return page, results


def test_page_is_regenerated_from_the_records_and_checked(tmp_path):
  base = tiny_base()
  page, results = _page_with_tables(tmp_path, base)
  text = page.read_text()
  assert text.startswith("# Ablations") and text.rstrip().endswith("## After")
  assert "old" not in text and text.count(tables.GENERATED_BEGIN) == 1
  assert "](ablations/table_4.png)" in text and "](ablations/pointing.png)" in text
  numbers = check.table_numbers(text)
  assert len(numbers) > 100 and "12.3" not in {n for _, n in numbers}
  assert check.check_page(str(page), str(results)) == []

  # A number in a table that no JSON has: caught, with its line.
  table_4 = json.loads((results / "table_4.json").read_text())
  shown = f"{100 * table_4['rows'][0]['mean']['mAP']:.1f}"
  line = next(l for l in text.splitlines() if l.startswith("| null |"))
  bad = line.replace(f"| {shown} ±", "| 1234.5 ±", 1)  # no percentage or wall time is
  assert bad != line
  page.write_text(text.replace(line, bad, 1))  # tables 4 and 5 share this row
  problems = check.check_page(str(page), str(results))
  assert len(problems) == 1 and "1234.5 is in no table JSON" in problems[0]
  assert f"ablations.md:{text.splitlines().index(line) + 1}:" in problems[0]

  # A table JSON that no longer follows from the records (a record changed): caught.
  page.write_text(text)
  path = records.record_path(str(results), 1, "rma_null_K5")
  rec = json.loads(open(path).read())
  rec["protocols"]["ten_view@48"]["mAP"] += 0.05
  records.write_json(path, rec)
  problems = check.check_page(str(page), str(results))
  assert problems and all("rma" in p or "null" in p for p in problems)
  assert any("table_4.json: row 'null', mAP" in p for p in problems)
  # Regenerating from the records fixes both.
  tables.write_tables(base, str(results), ablations.table_keys(), [0, 1], page=str(page))
  assert check.check_page(str(page), str(results)) == []


@pytest.mark.slow
def test_write_only_and_check_through_the_cli(tmp_path):
  base = tiny_base()
  page, results = _page_with_tables(tmp_path, base)
  (results / "table_4.md").unlink()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  common = [sys.executable, "-m", "rma_jax.experiments", "--config=configs/demo.py:tiny",
            "--table=all", "--seeds=2", f"--results_dir={results}", f"--page={page}",
            *TINY_FLAGS]
  out = subprocess.run(common + ["--write_only"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (results / "table_4.md").exists()
  ok = subprocess.run(common + ["--check"], cwd=ROOT, env=env, capture_output=True,
                      text=True, timeout=300)
  assert ok.returncode == 0 and "every table number follows" in ok.stdout, ok.stderr[-3000:]
  text = page.read_text()
  line = next(l for l in text.splitlines() if l.startswith("| ") and " ± " in l)
  page.write_text(text.replace(line, line.replace(" ± ", " ± 1234.5 ", 1), 1))
  bad = subprocess.run(common + ["--check"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0 and "is in no table JSON" in bad.stdout


@pytest.mark.slow
def test_runner_smoke_table_3_one_seed_then_resume(tmp_path, monkeypatch):
  """The whole runner at test size: stage 1, the two runs of Table 3, one step each, every
  protocol evaluated; records, tables and the page written; a second call trains nothing."""
  from rma_jax import evaluate
  base = tiny_base()
  workdir, results = str(tmp_path / "work"), str(tmp_path / "docs" / "ablations")
  page = str(tmp_path / "docs" / "ablations.md")
  written = runner.run_experiments(base, workdir, [3], [0], results_dir=results,
                                   page=page)
  for run in ("stage1", "fixed_anchors_K5", "rma_ASP_K5"):
    rec = records.load_record(records.record_path(results, 0, run))
    assert rec["train"]["step"] == 1 and rec["timing"]["train_wall_s"] > 0
    assert rec["timing"]["cpu_s"] > 0 and len(rec["timing"]["loadavg_end"]) == 3
    assert set(rec["protocols"]) == {ablations.protocol_name(base, p)
                                     for p in ablations.PROTOCOLS}
    assert rec["config"]["seed"] == 0 and rec["kind"] == ablations.run_kind(run)
    if run != "stage1":
      p = rec["pointing"]
      assert 0 <= p["model_regions"]["hit_rate"] <= 1 and p["chance"]["num_draws"] == 10
      assert rec["config"]["init"]["from_checkpoint"].endswith("seed0/stage1")
  # The fixed-regions model's regions are the anchor boxes, scored like any other.
  fixed = records.load_record(records.record_path(results, 0, "fixed_anchors_K5"))
  assert fixed["attention_recall"]["model_regions"] == fixed["attention_recall"][
      "fixed_anchor_boxes"]
  table = written[3]
  assert [r["run"] for r in table["rows"]] == ["fixed_anchors_K5", "rma_ASP_K5"]
  assert table["rows"][1]["values"]["pointing"] == [
      records.load_record(records.record_path(results, 0, "rma_ASP_K5"))[
          "pointing"]["model_regions"]["hit_rate"]]
  assert check.check_page(page, results) == []

  _check_protocols_of_one_checkpoint(base, os.path.join(workdir, "seed0", "rma_ASP_K5"),
                                     os.path.join(workdir, "seed0", "stage1"))

  def boom(*args, **kwargs):
    raise AssertionError("finished runs must not be trained or evaluated again")
  monkeypatch.setattr(train, "train", boom)
  monkeypatch.setattr(evaluate, "evaluate_and_report", boom)
  again = runner.run_experiments(base, workdir, [3], [0], results_dir=results)
  assert report.to_jsonable(again[3]["rows"]) == report.to_jsonable(table["rows"])


def _check_protocols_of_one_checkpoint(base, run_dir, stage1_dir):
  """The runner's one evaluation of a run computed every protocol right (sklearn's AP on
  the saved scores), and a row's own evaluation config gives the same numbers."""
  from rma_jax import evaluate
  from sklearn.metrics import average_precision_score
  every = json.load(open(os.path.join(run_dir, "report", "report.json")))["results"]
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
  assert tables.metric_value(every, "", "attention_recall") == (
      every["attention_recall"]["model_regions"])
  assert tables.metric_value(every, "", "pointing") == (
      every["pointing"]["model_regions"]["hit_rate"])


def test_docs_ablations_page_follows_from_the_committed_json():
  """Every number in docs/ablations.md's tables is in docs/ablations/'s JSON, and every
  table JSON there follows from the per-run records. Regenerate both with the command at
  the top of docs/ablations.md (or only the page: the same command with --write_only)."""
  problems = check.check_page(os.path.join(ROOT, "docs", "ablations.md"),
                              os.path.join(ROOT, "docs", "ablations"))
  assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems)"
