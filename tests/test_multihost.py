"""Multi-host data parallelism on one machine: 2 processes x 2 CPU devices vs 1 x 4 (issue 7).

Two JAX processes connected through a local coordinator port run the demo config for a few
steps, exactly as ``python -m rma_jax.main`` does on the hosts of a pod slice (each process
decodes only its half of every global batch). Beside them a single process with 4 devices
runs the same command. Both see the same global batches, so they must end with the same
parameters; the checkpoint the 2-process run wrote collectively must restore in one process.
A third 2-process job is preempted (issue 27): one of its processes gets SIGTERM mid-run, both
save the same step and exit 143, and the same command then finishes it exactly as the
uninterrupted 2-process job.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rma_jax.configs import ablations, demo
from rma_jax import build, checkpointing, optimizer, parallel, steps

pytestmark = pytest.mark.slow  # three JAX processes start and compile: ~1-2 min

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420  # a hung collective must fail the test, not hang the suite
STEPS = 6

# configs/demo.py:tiny (64 training images, global batch 8: 2 per device, a width/16 trunk on
# 48 px crops), one stage of STEPS steps, single-view evaluation; the last step's checkpoint
# is the only periodic one.
OVERRIDES = {
    "max_steps": STEPS,
    "checkpoint_every_steps": 1000,
    "stage1.num_epochs": 0,
    "data.num_workers": 0,
    "eval.ten_view": False,
}

# The process entry point, run as ``python -c``: it records every copy of the parameters this
# process holds (one per local device) each time a checkpoint is saved, then runs
# rma_jax.main exactly as ``python -m rma_jax.main`` would (same argv, run as __main__).
# RMA_TEST_STEP_SECONDS slows every training step (the preemption sync point needs a few of
# them to come round); RMA_TEST_SIGTERM_AFTER=n sends this process SIGTERM after its n-th.
_RECORDING_MAIN = r"""
import os, runpy, signal, sys, time
import numpy as np
import jax
from rma_jax import checkpointing, steps

_jit_train_step = steps.jit_train_step

def jit_train_step(*args, **kwargs):
  fn, taken = _jit_train_step(*args, **kwargs), [0]
  def step(*a):
    out = fn(*a)
    jax.block_until_ready(out)
    taken[0] += 1
    if taken[0] == int(os.environ.get("RMA_TEST_SIGTERM_AFTER", "0")):
      os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(float(os.environ.get("RMA_TEST_STEP_SECONDS", "0")))
    return out
  return step

steps.jit_train_step = jit_train_step

_save = checkpointing.save

def save(manager, step, state, metrics=None, **kwargs):
  _save(manager, step, state, metrics, **kwargs)
  copies = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    for shard in leaf.addressable_shards:
      copies[f"{jax.tree_util.keystr(path)}@device{shard.device.id}"] = np.asarray(shard.data)
  name = f"{os.path.basename(str(manager.directory))}_step{step}_process{jax.process_index()}"
  np.savez(os.path.join(os.environ["RMA_TEST_DUMP_DIR"], name + ".npz"), **copies)

checkpointing.save = save
sys.argv = ["rma_jax.main"] + sys.argv[1:]
runpy.run_module("rma_jax.main", run_name="__main__", alter_sys=True)
"""


def _cli(value) -> str:
  return f"({', '.join(map(str, value))},)" if isinstance(value, tuple) else str(value)


def _config():
  return ablations.apply_overrides(demo.get_config("tiny"), OVERRIDES)


def _free_ports(n: int) -> list[int]:
  """n distinct free ports (held open together while chosen, so none is picked twice)."""
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind(("localhost", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def _start(args: list[str], workdir: str, devices: int, log: str, dump_dir: str | None = None,
           **test_env: str) -> subprocess.Popen:
  env = dict(os.environ, **test_env, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                        + os.environ.get("RMA_TEST_XLA_FLAGS", "")),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  entry = ["-m", "rma_jax.main"]
  if dump_dir is not None:
    env["RMA_TEST_DUMP_DIR"] = dump_dir
    entry = ["-c", _RECORDING_MAIN]
  cmd = [sys.executable, *entry, "--config=configs/demo.py:tiny", f"--workdir={workdir}",
         *(f"--config.{k}={_cli(v)}" for k, v in OVERRIDES.items()), *args]
  with open(log, "w") as f:
    # A new session, so that a hung run can be killed with everything it started.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_all(procs: dict[str, tuple[subprocess.Popen, str]], status: int = 0) -> None:
  """Waits for every process; fails the test (with each failed log's end) unless all exit
  with ``status``."""
  deadline = time.monotonic() + TIMEOUT_S
  failed = []
  for name, (p, log) in procs.items():
    try:
      rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      rc = "timeout"
    if rc != status:
      failed.append((name, rc, log))
  if failed:
    report = []
    for name, rc, log in failed:
      with open(log) as f:
        report.append(f"--- {name}: exit {rc} (expected {status}); last lines of {log}:\n"
                      + "".join(f.readlines()[-30:]))
    pytest.fail("\n".join(report))


@pytest.fixture(scope="module")
def runs(shared_once):
  """Runs, once per session, side by side: the 2-process job, the 1-process job, and the
  2-process job whose process 1 gets SIGTERM after its second step (steps slowed to 0.5 s
  each), then the same command again to finish that one. Returns their folders."""
  def build(root):
    folders = {name: root / name for name in (
        "two_processes", "one_process", "dumps", "preempted", "preempted_dumps",
        "resumed_dumps")}
    for name in ("dumps", "preempted_dumps", "resumed_dumps"):
      folders[name].mkdir()
    started = []

    def two_processes(workdir, dumps, tag, port, envs=({}, {})):
      procs = {}
      for i in range(2):
        log = str(root / f"{tag}_{i}.log")
        procs[f"{tag}: process {i} of 2"] = (_start(
            [f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={i}"], str(workdir), devices=2, log=log, dump_dir=str(dumps),
            **envs[i]), log)
      started.extend(p for p, _ in procs.values())
      return procs

    try:
      ports = _free_ports(3)
      reference = two_processes(folders["two_processes"], folders["dumps"], "process", ports[0])
      log = str(root / "single.log")
      reference["single process"] = (_start([], str(folders["one_process"]), devices=4,
                                            log=log), log)
      started.append(reference["single process"][0])
      slow = {"RMA_TEST_STEP_SECONDS": "0.5"}
      _wait_all(two_processes(folders["preempted"], folders["preempted_dumps"], "preempted",
                              ports[1], envs=(slow, dict(slow, RMA_TEST_SIGTERM_AFTER="2"))),
                status=143)
      reference.update(two_processes(folders["preempted"], folders["resumed_dumps"], "resumed",
                                     ports[2]))
      _wait_all(reference)
    finally:  # a failure leaves no process behind
      for p in started:
        if p.poll() is None:
          os.killpg(p.pid, signal.SIGKILL)
          p.wait()
    return {"multi": str(folders["two_processes"]), "single": str(folders["one_process"]),
            "root": str(root), **{k: str(v) for k, v in folders.items()}}
  return shared_once("multihost_runs", build)


def _dump(runs, process: int) -> dict[str, np.ndarray]:
  with np.load(os.path.join(runs["dumps"], f"latest_step{STEPS}_process{process}.npz")) as f:
    return dict(f)


def _flat(params) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def setup():
  """This (single) process's mesh, the data, model and a fresh state as restore target."""
  from rma_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = _config()
  mesh = parallel.make_mesh()
  sources = data_lib.get_sources(config.data, seed=config.seed)
  model = build.build_model(config, len(sources.class_names))
  o = config.optim
  tx = optimizer.make_optimizer(o, optimizer.learning_rate_schedule(o.learning_rate, o, 8, STEPS))
  crop = config.data.crop_size
  # The same seed as the runs: this is also their initialisation.
  state = steps.create_train_state(model, tx, jax.random.key(config.seed), (crop, crop, 3), mesh)
  return dict(config=config, mesh=mesh, sources=sources, state=state)


@pytest.fixture(scope="module")
def restored(runs, setup):
  """The full train states (parameters, Adam moments, step) of both runs, restored into this
  process's topology (1 process, all its devices) from their latest checkpoints."""
  return {name: checkpointing.restore(checkpointing.latest_manager(runs[name]), setup["state"])
          for name in ("multi", "single")}


def test_both_processes_finish_with_identical_parameters(runs):
  p0, p1 = _dump(runs, 0), _dump(runs, 1)
  # Each process holds the replicated parameters on its own 2 devices: 4 copies in all.
  names = {k.rsplit("@", 1)[0] for k in p0}
  assert {k.rsplit("@", 1)[0] for k in p1} == names
  assert len(p0) == len(p1) == 2 * len(names)
  assert not {k.rsplit("@", 1)[1] for k in p0} & {k.rsplit("@", 1)[1] for k in p1}
  for name in names:
    copies = [v for d in (p0, p1) for k, v in d.items() if k.rsplit("@", 1)[0] == name]
    for c in copies[1:]:
      np.testing.assert_array_equal(c, copies[0], err_msg=name)


def test_two_processes_equal_one_process_with_four_devices(runs, setup, restored):
  multi, single = restored["multi"], restored["single"]
  assert int(multi.step) == int(single.step) == STEPS
  pm, ps, init = _flat(multi.params), _flat(single.params), _flat(setup["state"].params)
  assert pm.keys() == ps.keys() == init.keys()
  moved = 0.0
  for name in ps:
    np.testing.assert_allclose(pm[name], ps[name], rtol=1e-5, atol=1e-6, err_msg=name)
    moved = max(moved, float(np.max(np.abs(ps[name] - init[name]))))
  # Training really happened (Adam moves parameters by ~lr per step), so the equality above
  # is not that of two untouched initialisations.
  assert moved > 1e-4
  # Adam's moments and counts too: the optimizer saw the same gradients.
  om, os_ = jax.tree.leaves(multi.opt_state), jax.tree.leaves(single.opt_state)
  assert len(om) == len(os_) > 0
  for a, b in zip(om, os_):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  # What process 0 held in memory at the end is what the collective checkpoint holds.
  dump = _dump(runs, 0)
  for name in pm:
    np.testing.assert_array_equal(dump[f"{name}@device0"], pm[name], err_msg=name)


def test_only_process_zero_writes_logs_and_reports(runs):
  assert len(glob.glob(os.path.join(runs["multi"], "events.out.tfevents.*"))) == 1
  assert os.path.isfile(os.path.join(runs["multi"], "config.json"))
  assert os.path.isfile(os.path.join(runs["multi"], "report", "report.json"))
  with open(os.path.join(runs["root"], "process_1.log")) as f:
    assert f"Training {STEPS} steps" in f.read()  # process 1 trained too, quietly


def test_two_process_checkpoint_resumes_in_one_process(setup, restored):
  """The restored 2-process state trains on in one process exactly like the 1-process one."""
  from rma_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config, mesh = setup["config"], setup["mesh"]
  for a in jax.tree.leaves(restored["multi"]):
    assert a.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), a.ndim)
  step_fn = steps.jit_train_step(steps.LossConfig.from_config(config), mesh)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  # Step 4 of the same data stream, as a resumed run would take it.
  batch = next(data_lib.device_put_batches(data_lib.train_batches(
      setup["sources"].train, global_batch_size=config.optim.batch_size,
      image_size=config.data.image_size, crop_size=config.data.crop_size, seed=config.seed,
      start_step=STEPS, num_workers=0), sharding, prefetch=0))
  # The step donates its input state: give it copies, the fixture is shared.
  after = {name: step_fn(jax.tree.map(jnp.copy, state), batch)
           for name, state in restored.items()}
  for state, metrics in after.values():
    assert int(state.step) == STEPS + 1
    assert np.isfinite(float(metrics["loss"]))
  moved = 0.0
  for a, b, before in zip(jax.tree.leaves(after["multi"][0].params),
                          jax.tree.leaves(after["single"][0].params),
                          jax.tree.leaves(restored["multi"].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    moved = max(moved, float(np.max(np.abs(np.asarray(a) - np.asarray(before)))))
  assert moved > 1e-5  # the resumed step did update the restored parameters


def test_load_params_reads_a_two_process_checkpoint_in_one_process(runs, restored):
  params, step = checkpointing.load_params(runs["multi"], checkpointing.LATEST)
  assert step == STEPS
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored["multi"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _saved_steps(dumps: str) -> dict[int, set[int]]:
  """{process: the steps of its saves to checkpoints/latest}, from the recorded copies."""
  saved: dict[int, set[int]] = {0: set(), 1: set()}
  for name in os.listdir(dumps):
    m = re.fullmatch(r"latest_step(\d+)_process(\d)\.npz", name)
    if m:
      saved[int(m.group(2))].add(int(m.group(1)))
  return saved


def test_a_sigterm_to_one_process_saves_the_same_step_on_both(runs):
  """Process 1 alone got SIGTERM after its second step: through JAX's preemption sync point
  both processes saved the same later step (no periodic checkpoint was due), both exited 143
  (the fixture checks it), and process 0 said where the run stopped and how to go on."""
  saved = _saved_steps(runs["preempted_dumps"])
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  (step,) = saved[0]
  assert 2 <= step < STEPS, step
  latest_dir = checkpointing.checkpoint_dir(runs["preempted"], checkpointing.LATEST)
  with open(os.path.join(runs["root"], "preempted_0.log")) as f:
    lines = f.read().strip().splitlines()
  said = [line for line in lines if "preemption sync point" in line]
  assert len(said) == 1 and said[0].endswith(
      f"SIGTERM reached a process of 2: every process stops after step {step} once it is "
      "saved (JAX's preemption sync point)"), said
  assert lines[-1] == (
      f"SIGTERM: stopped after step {step} of {STEPS}, saved in {latest_dir}. Run the same "
      f"command to continue in {runs['preempted']} (exit status 143: requeue the job)"), lines[-5:]
  with open(os.path.join(runs["root"], "resumed_0.log")) as f:
    resumed = f.read()
  assert re.search(rf"Training {STEPS} steps .* from step {step}\n", resumed), resumed[-2000:]
  assert _saved_steps(runs["resumed_dumps"]) == {0: {STEPS}, 1: {STEPS}}


def test_the_preempted_job_resumes_exactly(runs):
  """The preempted-and-resumed job ends with the uninterrupted 2-process job's parameters,
  Adam state and step, bitwise, and the same test scores."""
  ours = checkpointing.restore_replicated(checkpointing.latest_manager(runs["preempted"]), STEPS)
  theirs = checkpointing.restore_replicated(checkpointing.latest_manager(runs["multi"]), STEPS)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  results = []
  for k in ("preempted", "multi"):
    with open(os.path.join(runs[k], "report", "report.json")) as f:
      results.append({k: v for k, v in json.load(f)["results"].items() if k != "workdir"})
  assert results[0] == results[1] and results[0]["protocols"][results[0]["headline"]]["mAP"] > 0
