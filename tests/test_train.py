"""Training: the sharded step equals the 1-device step, the main job resumes (also after a
kill), non-finite losses stop the run, the loss goes down on the demo data, the step's loss
is Eq. 14 by hand, and gradient accumulation is exact and counts optimizer steps."""

import glob
import os
import signal
import subprocess
import sys
import time

from clu import metric_writers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo
from rma_jax import checkpointing, losses, train
from rma_jax import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model.width=16", "--config.model.x_dim=32", "--config.model.hidden_dim=16",
    "--config.model.z_dim=16", "--config.data.image_size=64", "--config.data.crop_size=48",
    "--config.data.demo.num_train=64", "--config.data.demo.num_val=16",
    "--config.data.demo.num_test=16", "--config.data.demo.canvas_size=64",
    "--config.optim.batch_size=8", "--config.eval.batch_size=8", "--config.eval.scales=(64,)",
    "--config.stage1.num_epochs=0", "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=2", "--config.eval_every_epochs=100",
]


def tiny_config(**overrides):
  """configs/demo.py with the TINY overrides (and ``overrides``) applied in-process."""
  c = demo.get_config()
  items = [f[len("--config."):].split("=", 1) for f in TINY] + list(overrides.items())
  for key, value in items:
    *path, last = key.split(".")
    target = c
    for p in path:
      target = target[p]
    if isinstance(value, str) and not isinstance(target[last], str):
      value = eval(value)  # the flag's literal, as ml_collections would parse it
    target[last] = value
  return c


def _main(workdir, *extra, env=None, **kw):
  cmd = [sys.executable, "-m", "rma_jax.main", "--config=configs/demo.py",
         f"--workdir={workdir}", *TINY, *extra]
  full_env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                  JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, **kw)


def test_sharded_step_equals_single_device_step():
  assert jax.device_count() >= 4, "conftest forces 4 host devices"
  config = tiny_config()
  sources = data_lib.get_sources(config.data, seed=0)
  model = train.build_model(config, 10)
  batches = list(zip(range(3), data_lib.train_batches(
      sources.train, global_batch_size=8, image_size=64, crop_size=48, seed=0)))
  loss_cfg = train.LossConfig.from_config(config)
  finals = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    mesh = train.make_mesh(devices)
    tx = train.make_optimizer(config.optim, train.learning_rate_schedule(
        1e-3, config.optim, 8, 3))
    state = train.create_train_state(model, tx, jax.random.key(0), (48, 48, 3), mesh)
    step = train.jit_train_step(loss_cfg, mesh)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    for _, batch in batches:
      batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
      state, metrics = step(state, batch)
    assert len(state.params["trunk"]["conv1_1"]["kernel"].sharding.device_set) == len(devices)
    finals.append(jax.device_get(state.params))
  for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
    # Adam's normalised update turns reduction-order noise in near-zero gradients into
    # differences of ~1e-6 (a step is up to 1e-3 here).
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), finals[0],
                                       jax.device_get(train.create_train_state(
                                           model, tx, jax.random.key(0), (48, 48, 3),
                                           train.make_mesh(jax.devices()[:1])).params)))
  assert max(moved) > 1e-4


def test_anchor_weight_schedule_and_the_step_that_takes_it():
  import dataclasses
  config = tiny_config()
  assert train.anchor_weight_schedule(config.loss, 10) is None  # off by default
  config.loss.anchor_schedule_epochs = 2
  config.loss.lambda_anchor_start = 1.0
  config.loss.lambda_anchor = 0.01
  weight = train.anchor_weight_schedule(config.loss, 10)
  # Geometric, one value per epoch: 1 for epoch 0, sqrt(1 * 0.01) for epoch 1, then 0.01.
  assert [weight(s) for s in (0, 9, 10, 19, 20, 500)] == pytest.approx(
      [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
  train.validate_config(config, num_devices=1)
  config.loss.lambda_anchor_start = 0.0
  with pytest.raises(ValueError, match="lambda_anchor_start"):
    train.validate_config(config, num_devices=1)

  # The step's lambda_anchor argument is the config's lambda_anchor, step by step.
  model = train.build_model(config, 10)
  mesh = train.make_mesh(jax.devices()[:1])
  tx = train.make_optimizer(config.optim, lambda _: 1e-3)
  batch = next(data_lib.train_batches(data_lib.get_sources(config.data, seed=0).train,
                                      global_batch_size=8, image_size=64, crop_size=48,
                                      seed=0))
  cfg = train.LossConfig.from_config(config)
  scheduled = train.jit_train_step(cfg, mesh, scheduled_anchor=True)
  fixed = train.jit_train_step(dataclasses.replace(cfg, lambda_anchor=1.0), mesh)
  first = train.create_train_state(model, tx, jax.random.key(0), (48, 48, 3), mesh)
  new_state = lambda: jax.tree.map(jnp.copy, first)  # the steps donate their input state
  a_state, a = scheduled(new_state(), batch, np.float32(1.0))
  b_state, b = fixed(new_state(), batch)
  _, c = scheduled(new_state(), batch, np.float32(0.01))
  assert float(a["loc_loss"]) == pytest.approx(float(b["loc_loss"]), rel=1e-6)
  assert float(a["loc_loss"]) > float(c["loc_loss"]) > 0  # regions start off their anchors
  assert float(a["lambda_anchor"]) == 1.0 and "lambda_anchor" not in b
  for x, y in zip(jax.tree.leaves(a_state.params), jax.tree.leaves(b_state.params)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_training_loop_with_the_anchor_schedule(tmp_path):
  """The loop feeds the scheduled weight to the step (the run completes and resumes)."""
  config = tiny_config(**{"loss.anchor_schedule_epochs": 1, "loss.lambda_anchor_start": 1.0,
                          "max_steps": 2})
  assert train.train(config, str(tmp_path))["step"] == 2


def test_main_job_resumes_and_writes_checkpoints_and_events(tmp_path):
  wd = str(tmp_path / "run")
  first = _main(wd, "--config.max_steps=4", timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "Initialised from scratch" in first.stderr
  assert checkpointing.latest_manager(wd).latest_step() == 4
  assert glob.glob(os.path.join(wd, "events.out.tfevents.*"))
  assert os.path.exists(os.path.join(wd, "report", "report.json"))
  second = _main(wd, "--config.max_steps=8", timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resumed from" in second.stderr and "at step 4" in second.stderr
  assert "Initialised" not in second.stderr  # no re-initialisation
  assert checkpointing.latest_manager(wd).latest_step() == 8


def test_killed_run_resumes_from_last_complete_checkpoint(tmp_path):
  wd = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "rma_jax.main", "--config=configs/demo.py", f"--workdir={wd}",
         *TINY, "--config.max_steps=400"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt = os.path.join(wd, "checkpoints", "latest")
  deadline = time.time() + 300
  while time.time() < deadline:
    done = [d for d in glob.glob(os.path.join(ckpt, "*")) if os.path.basename(d).isdigit()]
    if len(done) >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = checkpointing.latest_manager(wd).latest_step()
  assert killed_at is not None and killed_at < 400
  resumed = _main(wd, "--config.max_steps=%d" % (killed_at + 6), timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"at step {killed_at}" in resumed.stderr
  assert checkpointing.latest_manager(wd).latest_step() == killed_at + 6


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  wd = str(tmp_path / "nan")
  result = _main(wd, "--config.max_steps=40", "--config.optim.learning_rate=1e30",
                 "--config.optim.grad_clip_norm=0", timeout=600)
  assert result.returncode != 0
  assert "non-finite loss at step" in result.stderr
  manager = checkpointing.latest_manager(wd)
  if manager.latest_step() is not None:  # whatever was saved is finite
    params, _ = train.load_params(wd, checkpointing.LATEST)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_invalid_config_fails_before_compiling(tmp_path):
  result = _main(str(tmp_path / "bad"), "--config.data.crop_size=64", timeout=120)
  assert result.returncode != 0
  assert "must be smaller than data.image_size" in result.stderr
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_baseline_learns_beyond_the_class_priors():
  """A real learning signal: the demo's baseline (its Dirac-initialised trunk included) fits
  32 canvases far below the loss of the best constant predictor, the training priors, which
  learning the head's biases alone would reach."""
  config = tiny_config(**{"model.name": "baseline", "loss.classification": "sigmoid_bce"})
  config.data.demo.num_train = 32
  sources = data_lib.get_sources(config.data, seed=0)
  labels = np.stack([sources.train[i]["labels"] for i in range(len(sources.train))])
  prior = labels.mean(0)
  prior_loss = -np.sum(prior * np.log(prior) + (1 - prior) * np.log(1 - prior))
  model = train.build_model(config, 10)
  mesh = train.make_mesh(jax.devices()[:1])
  tx = train.make_optimizer(config.optim, lambda _: 1e-3)
  state = train.create_train_state(model, tx, jax.random.key(0), (48, 48, 3), mesh)
  step = train.jit_train_step(train.LossConfig.from_config(config), mesh)
  losses = []
  it = data_lib.train_batches(sources.train, global_batch_size=8, image_size=64, crop_size=48,
                              seed=0, random_flip=False)
  for _, batch in zip(range(280), it):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  last = np.mean(losses[-40:])
  assert last < 0.8 * prior_loss, (prior_loss, losses[:5], last)


# --------------------------------------------------------------------------- loss and accumulation

NUM_REGIONS = 5
# The paper's anchors of regions 2..5 (§4.2), typed from the paper for the hand computation.
PAPER_ANCHORS = np.array([(0.5, 0.5), (0.5, -0.5), (-0.5, 0.5), (-0.5, -0.5)])


class _ScoresAndTheta(nn.Module):
  """A conv and two linear layers giving scores and K+1 transforms: the train step treats it
  like RMA, and it compiles in a fraction of the time. The transforms start far outside the
  constraints (sx > alpha, sy < beta, off the anchors), so L_loc is large."""

  @nn.compact
  def __call__(self, images):
    x = jnp.mean(nn.relu(nn.Conv(4, (3, 3), strides=2)(images)), axis=(1, 2))
    bias = jnp.tile(jnp.asarray([0.9, 0.05, 0.3, -0.2]), NUM_REGIONS + 1)
    theta = nn.Dense(4 * (NUM_REGIONS + 1), bias_init=lambda *_: bias)(x)
    return {"scores": nn.Dense(10)(x), "theta": theta.reshape(-1, NUM_REGIONS + 1, 4)}


def _uneven_batch():
  """8 uint8 images; rows 0, 2, 3 have no label and row 6 is padding (mask 0), so any split
  into two halves gives micro-batches with different numbers of counted images."""
  rng = np.random.default_rng(0)
  labels = (rng.random((8, 10)) < 0.3).astype(np.float32)
  labels[:, 7] = 1.0
  labels[[0, 2, 3]] = 0.0
  mask = np.ones(8, np.float32)
  mask[6] = 0.0
  return {"image": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), "labels": labels,
          "mask": mask}


def _eq14_by_hand(scores, theta, labels, mask, gamma, alpha=0.5, beta=0.1, lambda1=0.01,
                  lambda2=0.1):
  """Eq. 7-14 written out from the paper (jnp, so that it can be differentiated too)."""
  num_pos = labels.sum(-1)
  counted = mask * (num_pos > 0)
  p = jax.nn.softmax(scores, axis=-1)
  per_cls = jnp.sum((p - labels / jnp.maximum(num_pos, 1)[:, None]) ** 2, axis=-1)
  l_cls = jnp.sum(per_cls * counted) / jnp.sum(counted)
  sx, sy, tx, ty = (theta[:, 1:, i] for i in range(4))  # regions 1..K
  l_s = jnp.sum(jnp.maximum(jnp.abs(sx) - alpha, 0) ** 2
                + jnp.maximum(jnp.abs(sy) - alpha, 0) ** 2, 1)
  l_a = 0.5 * jnp.sum((tx[:, 1:] - PAPER_ANCHORS[:, 0]) ** 2
                      + (ty[:, 1:] - PAPER_ANCHORS[:, 1]) ** 2, 1)  # regions 2..K
  l_p = jnp.sum(jnp.maximum(beta - sx, 0) + jnp.maximum(beta - sy, 0), 1)
  l_loc = jnp.sum((l_s + lambda1 * l_a + lambda2 * l_p) * mask) / jnp.sum(mask)
  return l_cls + gamma * l_loc, l_cls, l_loc


def _sgd_state(model, mesh):
  """SGD with rate 1: the parameter update of a step is minus the gradient it used."""
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  return train.create_train_state(model, tx, jax.random.key(0), (16, 16, 3), mesh)


def test_train_step_loss_and_gradient_are_eq14_by_hand():
  """The value the jitted train step reports and the gradient it applies are those of
  L_cls + gamma L_loc computed by hand (no torch): dropping gamma or L_loc would fail."""
  config = tiny_config(**{"loss.gamma": 0.5, "data.pixel_convention": "unit"})
  loss_cfg = train.LossConfig.from_config(config)
  mesh = train.make_mesh(jax.devices()[:1])
  model = _ScoresAndTheta()
  state = _sgd_state(model, mesh)
  params = jax.device_get(state.params)
  batch = _uneven_batch()
  new_state, metrics = train.jit_train_step(loss_cfg, mesh)(state, batch)
  new_params = jax.device_get(new_state.params)

  def hand(p):
    out = model.apply({"params": p}, data_lib.normalize(jnp.asarray(batch["image"]), "unit"))
    return _eq14_by_hand(out["scores"], out["theta"], jnp.asarray(batch["labels"]),
                         jnp.asarray(batch["mask"]), gamma=0.5)

  loss, l_cls, l_loc = jax.jit(hand)(params)
  assert float(l_loc) > 0.5 and float(l_cls) > 0.01  # both terms matter
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["cls_loss"]), float(l_cls), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loc_loss"]), float(l_loc), rtol=1e-5)
  grads = jax.jit(jax.grad(lambda p: hand(p)[0]))(params)
  for g, p0, p1 in zip(jax.tree.leaves(grads), jax.tree.leaves(params),
                       jax.tree.leaves(new_params)):
    np.testing.assert_allclose(p0 - p1, g, rtol=1e-4, atol=1e-6)


def test_accumulated_gradient_equals_the_full_batch_gradient():
  """grad_accum_steps=2 on 4 devices gives the full-batch gradient and loss terms, though
  the two halves count different numbers of labelled and real images (a mean of the two
  halves' means would not). Clipping and Adam come after the accumulation, so they see the
  full-batch gradient."""
  config = tiny_config(**{"data.pixel_convention": "unit"})
  loss_cfg = train.LossConfig.from_config(config)
  mesh = train.make_mesh(jax.devices()[:4])
  model = _ScoresAndTheta()
  batch = _uneven_batch()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
  init = jax.device_get(_sgd_state(model, mesh).params)
  results = {}
  for accum in (1, 2):
    state, metrics = train.jit_train_step(loss_cfg, mesh, accum)(_sgd_state(model, mesh), batch)
    grads = jax.tree.map(lambda a, b: a - b, init, jax.device_get(state.params))
    results[accum] = grads, jax.device_get(metrics)
  (g1, m1), (g2, m2) = results[1], results[2]
  for key in ("loss", "cls_loss", "loc_loss", "grad_norm"):
    # float32 sums of the same terms in another order: relative differences ~1e-7.
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
    assert np.linalg.norm(b) > 0
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


class _RecordingWriter(metric_writers.LoggingWriter):
  """The run's metric writer, keeping every scalar it is given."""

  def __init__(self):
    super().__init__()
    self.scalars = {}

  def write_scalars(self, step, scalars):
    for k, v in scalars.items():
      self.scalars.setdefault(k, {})[int(step)] = float(v)


def test_accumulated_run_decays_at_the_first_optimizer_step_of_the_epoch(tmp_path, monkeypatch):
  """grad_accum_steps=2, a step decay at epoch 3: 32 images in global batches of 8 are 4
  optimizer steps per epoch, so the learning rate the optimizer applied (logged from its
  state) is 1e-3 for steps 1..12 and 1e-4 from step 13, the first of epoch 3; max_steps and
  the checkpoints count optimizer steps too."""
  writer = _RecordingWriter()
  monkeypatch.setattr(metric_writers, "create_default_writer", lambda *a, **k: writer)
  config = tiny_config(**{"model.name": "baseline", "loss.classification": "sigmoid_bce"})
  config.data.demo.num_train = 32
  config.optim.update(grad_accum_steps=2, schedule="step", decay_epochs=(3,),
                      decay_factor=0.1, learning_rate=1e-3, num_epochs=10)
  config.update(max_steps=14, log_every_steps=1, checkpoint_every_steps=1000)
  wd = str(tmp_path / "accum")
  result = train.train(config, wd)
  assert result["step"] == 14
  assert checkpointing.latest_manager(wd).latest_step() == 14
  lr = writer.scalars["train/learning_rate"]
  assert sorted(lr) == list(range(1, 15))
  np.testing.assert_allclose([lr[s] for s in range(1, 13)], 1e-3, rtol=1e-6)
  np.testing.assert_allclose([lr[13], lr[14]], 1e-4, rtol=1e-6)
  # The latest checkpoint's optimizer state holds the rate of its last update.
  restored = checkpointing.restore_replicated(*checkpointing.find_checkpoint(
      wd, checkpointing.LATEST))
  np.testing.assert_allclose(
      float(restored["opt_state"]["hyperparams"]["learning_rate"]), 1e-4, rtol=1e-6)


def test_train_step_differentiates_losses_total_loss(monkeypatch):
  """One Eq. 14: the loss the train step reports and differentiates is losses.total_loss
  (a change there, here a factor 3, reaches the step)."""
  config = tiny_config(**{"data.pixel_convention": "unit"})
  loss_cfg = train.LossConfig.from_config(config)
  mesh = train.make_mesh(jax.devices()[:1])
  model = _ScoresAndTheta()
  batch = _uneven_batch()
  plain = jax.device_get(train.jit_train_step(loss_cfg, mesh)(_sgd_state(model, mesh), batch)[1])
  original = losses.total_loss

  def tripled(*args, **kwargs):
    loss, terms = original(*args, **kwargs)
    return 3 * loss, dict(terms, loss=3 * loss)

  monkeypatch.setattr(losses, "total_loss", tripled)
  scaled = jax.device_get(train.jit_train_step(loss_cfg, mesh)(_sgd_state(model, mesh), batch)[1])
  np.testing.assert_allclose(scaled["loss"], 3 * plain["loss"], rtol=1e-6)
  np.testing.assert_allclose(scaled["grad_norm"], 3 * plain["grad_norm"], rtol=1e-5)
