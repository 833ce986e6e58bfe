"""Smoke tests of the benchmark (shapes, JSON keys, compile counting); no timing thresholds."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bench, bench_records, bench_torch, timing
from rma_jax.configs import default

TINY = default.get_config("tiny")  # the smoke mode's sizes
N, CROP = TINY.data.image_size, TINY.data.crop_size

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_compile_counter_counts_new_shapes():
  f = jax.jit(lambda x: jnp.sin(x) * 2.0)
  x3, x4, x5 = (np.ones(n, np.float32) for n in (3, 4, 5))  # host arrays: no jnp compiles
  f(x3)
  with timing.CompileCounter() as counter:
    f(x3)  # cached
    assert counter.count == 0
    f(x4)  # new shape -> one compilation
  assert counter.count == 1
  f(x5)  # outside the block: not counted
  assert counter.count == 1


def test_cost_flops_of_a_matmul():
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert timing.cost_flops(compiled) == 2 * 8 * 16 * 4


def test_mesh_for_batch_divides_the_batch():
  devices = jax.devices()
  for batch in (1, 2, 3, 4, 6):
    mesh = bench.mesh_for_batch(batch)
    assert batch % mesh.size == 0
    assert mesh.size == max(d for d in range(1, len(devices) + 1) if batch % d == 0)


def test_settings_from_config_and_bench_config():
  config = bench.load_config()
  s = bench.settings_from_config(config, batch=3, dtype="bfloat16")
  assert (s.image_size, s.crop_size, s.batch, s.dtype) == (512, 448, 3, "bfloat16")
  assert s.num_classes == 20 and s.x_dim == 4096
  c = bench.bench_config(bench.smoke_settings())
  assert (c.model.width, c.data.crop_size, c.optim.batch_size) == (TINY.model.width, CROP, 2)


def test_markdown_table_rows_and_ratio():
  rec = {k: None for k in bench_records.RECORD_KEYS}
  rec.update(case="train", input_size=448, batch=2, dtype="float32", images_per_s=3.0,
             torch_images_per_s=2.0, ratio=1.5, latency_ms=333.3, torch_latency_ms=500.0,
             compile_s=12.0, compiles_after_first_call=0, flops_per_image=2e11,
             achieved_flops_per_s=6e11, flops_utilization=0.5, peak_memory_bytes=2**30,
             torch_peak_memory_bytes=None)
  table = bench_records.markdown_table([rec, dict(rec, case="ten_view", ratio=None)]).splitlines()
  assert len(table) == 4
  n = table[0].count("|")
  assert all(line.count("|") == n for line in table)
  row = [c.strip() for c in table[2].strip("|").split("|")]
  assert row[:8] == ["VGG-16", "train", "448²", "2", "float32", "3", "2", "1.50"]
  assert row[11] == "200" and row[13] == "50.0" and row[14] == "1024 / –"


@pytest.mark.slow
def test_cli_smoke_records_every_case_as_json_and_markdown(tmp_path):
  """``python -m benchmarks.bench --smoke``: one JSON record per case, printed and appended
  to --json_out, with PyTorch beside it where torch is installed, and the Markdown table."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = os.environ.get("RMA_TEST_XLA_FLAGS", "")  # one device
  out_json, out_md = tmp_path / "b.jsonl", tmp_path / "b.md"
  torch = bench_torch.torch_available()
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.bench", "--smoke", "--cases=train,latency",
       f"--torch={str(torch).lower()}", "--repeats=2", f"--json_out={out_json}",
       f"--markdown_out={out_md}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in out_json.read_text().splitlines()]
  printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert printed == records
  assert [r["case"] for r in records] == ["train", "latency_single_view", "latency_ten_view"]
  for r in records:
    assert set(r) == set(bench_records.RECORD_KEYS)
    assert r["width"] == TINY.model.width and r["backend"] == "cpu"
    assert r["repeats"] == len(r["step_s_all"]) == 2
    assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s"])
    # No retracing/recompilation once the step is compiled (donated state, fixed shapes).
    assert r["compiles_after_first_call"] == 0
    assert r["flops_per_image"] > 0 and r["peak_memory_bytes"] > 0
    assert r["flops_utilization"] == pytest.approx(
        r["flops_per_image"] * r["images_per_s"] / (r["peak_flops_per_s"] * r["num_devices"]))
    if torch:
      assert r["ratio"] == pytest.approx(r["images_per_s"] / r["torch_images_per_s"])
      # The evaluation cases compared the two sides' scores before timing them.
      assert (r["torch_max_rel_diff"] is None) == (r["case"] == "train")
    else:
      assert r["ratio"] is None and r["torch_images_per_s"] is None
  train, single, ten = records
  assert (train["batch"], single["batch"], ten["batch"]) == (2, 1, 1)
  assert (train["input_size"], single["input_size"], ten["input_size"]) == (CROP, CROP, N)
  assert single["latency_ms"] == pytest.approx(1000.0 * single["step_s"])
  # Backward ~ 2x forward; ten-view runs the trunk on N x N ((N / crop)^2 the pixels of a
  # crop) plus ten attention passes.
  assert 2.0 * single["flops_per_image"] < train["flops_per_image"]
  assert (N / CROP) ** 2 * single["flops_per_image"] < ten["flops_per_image"]
  table = out_md.read_text()
  assert table.startswith("`python -m benchmarks.bench --smoke")
  assert f"| train | {CROP}² | 2 |" in table and f"| latency_ten_view | {N}² | 1 |" in table


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_cpu():
  """launch/gpu_check.py --smoke: correctness vs the CPU reference passes, one table."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = os.environ.get("RMA_TEST_XLA_FLAGS", "")  # one device
  proc = subprocess.run([sys.executable, "launch/gpu_check.py", "--smoke"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
  records = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  cases = [r["case"] for r in records]
  assert cases[:2] == ["device", "matmul_peak"]
  checks = [r for r in records if r["case"] == "correctness"]
  assert [c["dtype"] for c in checks] == ["float32", "bfloat16"]
  # On CPU the float32 "device" run is the reference itself.
  assert checks[0]["scores_rel_err"] < 1e-5 and checks[0]["ok"]
  assert any(r["case"] == "train" and r["batch"] == 2 for r in records)
  assert any(r["case"] == "ten_view" for r in records)
  assert "| train | 96 | 2 | bfloat16 |" in proc.stdout
  assert "TITAN X" in proc.stdout


def test_torch_resnet_names_are_the_ones_the_converter_reads():
  """``torch_rma.torchvision_resnet_names`` (the benchmark's JAX -> torch copy) is the inverse
  of ``rma_jax.weights.convert.to_flax`` (torch -> JAX) on a ResNet-50 tree of random
  arrays: every name, layout and stacked block back where it was."""
  pytest.importorskip("torch")
  from benchmarks import torch_rma  # pylint: disable=g-import-not-at-top  # needs torch
  from rma_jax import models  # pylint: disable=g-import-not-at-top
  from rma_jax import weights  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(models.ResNet(depth=50).init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  back = weights.to_flax(torch_rma.torchvision_resnet_names(params), "torch")
  assert back["trunk"] == "resnet50"
  flat = jax.tree_util.tree_leaves_with_path(back["params"])
  assert len(flat) == len(jax.tree.leaves(params))
  for path, value in flat:
    want = params
    for key in path:
      want = want[key.key]
    np.testing.assert_array_equal(value, want, err_msg=jax.tree_util.keystr(path))


def test_resnet_bench_torch_side_is_the_same_network():
  """A ResNet config's torch side (configs/voc_resnet101.py:tiny as ResNet-50 at stride 16:
  average-pooled regions, a dilated layer4) gives the JAX side's single-view and ten-view
  scores to within ``bench.AGREEMENT``, batch norm statistics drawn at random; the check
  that ``run_benchmarks`` makes before timing refuses scores further apart."""
  pytest.importorskip("torch")
  from rma_jax import build  # pylint: disable=g-import-not-at-top
  from rma_jax.configs import voc_resnet101  # pylint: disable=g-import-not-at-top
  config = voc_resnet101.get_config("tiny")
  config.model.update(trunk="resnet50", resnet_stride=16)
  settings = bench.settings_from_config(config, batch=2)
  assert (settings.trunk, settings.region_pool, settings.bn) == ("resnet50", "avg", "finetune")
  n, crop = settings.image_size, settings.crop_size  # 64, 32: 4 x 4 and 2 x 2 maps
  model = build.build_model(bench.bench_config(settings, config), settings.num_classes)
  params = bench.randomise_batch_norm(jax.jit(model.init)(
      jax.random.key(0), jnp.zeros((1, crop, crop, 3)))["params"], 0)
  runner = bench_torch.TorchRunner(settings, params, 1, config.data.pixel_convention)
  images = np.random.default_rng(0).integers(0, 256, (2, n, n, 3), np.uint8)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x)["scores"])
  single = lambda: apply(params, images[:, :crop, :crop])
  ten_fn = jax.jit(bench.ten_view_fn(model, crop))
  ten = lambda: ten_fn({"params": params}, images)
  for case, ours, theirs in (("single_view", single, runner.single_view_fn(images[:, :crop, :crop])),
                             ("ten_view", ten, runner.ten_view_fn(images))):
    rel = bench.agreement({"rma_jax": ours, "torch": theirs}, "float32", case)
    assert 0 < rel <= bench.AGREEMENT["float32"], case
  with pytest.raises(RuntimeError, match="not the same network"):
    bench.agreement({"rma_jax": single, "torch": lambda: np.asarray(single()) * 1.01},
                    "float32", "single_view")
