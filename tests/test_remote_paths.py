"""A run on a bucket (``gs://``), with no network: trained, killed, resumed and reported.

A local GCS emulator (``gcp-storage-emulator``, in memory, in a thread of this process)
stands in for Cloud Storage. gcsfs (etils.epath's fsspec backend) reaches it through
``STORAGE_EMULATOR_HOST``, and ``EPATH_USE_TF=false`` makes epath use gcsfs rather than
``tf.io.gfile`` (its choice when TensorFlow is installed, which has no emulator switch).
Orbax writes its arrays through tensorstore's own GCS driver, which
``TENSORSTORE_GCS_HTTP_URL`` points at the same emulator.

The emulator needs one fix to stand in for GCS: real GCS sends an object's generation in
the ``x-goog-generation`` header of every media download, and tensorstore's OCDBT driver
writes its manifest on the condition of the generation it read. The emulator sends no such
header when a download comes through ``GET .../o/NAME?alt=media`` (tensorstore's way);
without it the second commit to a checkpoint's manifest fails with "Malformed
StorageGeneration" and the save hangs in Orbax's barrier. ``_patch_downloads`` adds it.
The emulator does not enforce ``ifGenerationMatch`` preconditions; one writer per
checkpoint (one host here) never needs them.

Covered: a whole CLI run on the bucket (train, SIGKILL, resume, report); the workdir hold
(a warning: no lock on buckets), the config record and resume check, classes.json,
TensorBoard files, report.json/report.md, checkpoint discovery. Not covered: several hosts
writing one checkpoint to a bucket.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.compat.proto import event_pb2

gcp_emulator = pytest.importorskip("gcp_storage_emulator.server")
pytest.importorskip("gcsfs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "rma-test"


def _download_with_generation(download):
  """The emulator's media download, plus the ``x-goog-generation`` header real GCS sends."""
  def handler(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except Exception:  # pylint: disable=broad-except  # not found: download answers 404
      pass
    return download(request, response, storage, *args, **kwargs)
  handler.with_generation = True
  return handler


def _patch_downloads():
  """Every media download carries the generation: the routes that call ``download`` and
  ``objects.get``'s ``alt=media`` branch, which calls the module's ``download`` by name."""
  objects = sys.modules["gcp_storage_emulator.handlers.objects"]
  if getattr(objects.download, "with_generation", False):
    return
  download = objects.download
  objects.download = _download_with_generation(download)
  for _, handlers in gcp_emulator.HANDLERS:
    for method, fn in list(handlers.items()):
      if fn is download:
        handlers[method] = objects.download


@pytest.fixture(scope="module")
def gcs_env():
  """Env vars that point gcsfs, tensorstore and epath at an in-memory GCS emulator."""
  _patch_downloads()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = gcp_emulator.create_server("127.0.0.1", port, in_memory=True,
                                      default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "EPATH_USE_TF": "false", "GOOGLE_CLOUD_PROJECT": "rma-test",
         "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:1"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # this process reads the bucket back through the same emulator
  # epath caches whether it uses TensorFlow (EPATH_USE_TF) at its first URL: ask again.
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  try:
    yield env
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
    server.stop()


class _Bucket:
  """Reads the emulated bucket back (through epath, as a user would)."""

  def _p(self, path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(f"gs://{path}")

  def cat(self, path):
    return self._p(path).read_bytes()

  def ls(self, path):
    return [f"{path}/{p.name}" for p in self._p(path).iterdir()]

  def glob(self, pattern):
    folder, _, name = pattern.rpartition("/")
    return [f"{folder}/{p.name}" for p in self._p(folder).glob(name)]

  def pipe(self, path, data):
    self._p(path).parent.mkdir(parents=True, exist_ok=True)
    self._p(path).write_bytes(data)


def _bucket():
  return _Bucket()


def test_workdir_records_on_a_bucket(gcs_env, caplog):
  """hold() warns (no lock on buckets), the config record is written there and a resume
  with a changed trajectory field is refused from it; the history grows by rewriting."""
  from rma_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from rma_jax.configs import demo  # pylint: disable=g-import-not-at-top
  wd = f"gs://{BUCKET}/records"
  config = demo.get_config("tiny")
  with caplog.at_level(logging.WARNING):
    with workdir_lib.hold(wd):
      changes = workdir_lib.check_config(config, wd, resuming=False)
      workdir_lib.record_start(config, wd, changes, None)
  assert "remote path without POSIX locks" in caplog.text
  fs = _bucket()
  assert json.loads(fs.cat(f"{BUCKET}/records/config.json"))["seed"] == config.seed
  assert not os.path.exists(os.path.join(os.getcwd(), "gs:")), "gs:// taken as a local path"
  changed = demo.get_config("tiny")
  changed.optim.learning_rate *= 2
  with pytest.raises(workdir_lib.ConfigChangeError, match="learning_rate"):
    workdir_lib.check_config(changed, wd, resuming=True)
  changed.allow_config_change = True
  workdir_lib.record_start(changed, wd, workdir_lib.check_config(changed, wd, True), 4)
  lines = _bucket().cat(f"{BUCKET}/records/config_history.jsonl").decode().splitlines()
  assert [json.loads(l)["resumed_from_step"] for l in lines] == [None, 4]
  assert workdir_lib.recorded_config(wd)["optim"]["learning_rate"] == (
      changed.optim.learning_rate)


def test_classes_and_report_on_a_bucket(gcs_env):
  from rma_jax import evaluate, report  # pylint: disable=g-import-not-at-top
  from rma_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  wd = f"gs://{BUCKET}/report_run"
  data_lib.save_run_classes(wd, ("cat", "dog"), origin="test", dataset="mine")
  assert data_lib.load_run_classes(wd) == ("cat", "dog")
  out = evaluate.report_dir(wd)
  results = {"protocols": {"single_view@64": {"mAP": 0.5, "CF1": 0.25, "OF1": 0.125}},
             "headline": "single_view@64"}
  json_path, _ = report.write_report(results, out, class_names=("cat", "dog"),
                                     dataset_name="mine", card={})
  assert json_path == f"{out}/report.json"
  loaded = report.load_report(json_path)
  assert loaded["class_names"] == ["cat", "dog"]
  assert loaded["results"]["protocols"]["single_view@64"]["mAP"] == 0.5
  fs = _bucket()
  assert fs.cat(f"{BUCKET}/report_run/report/report.md").decode().strip()
  assert not fs.glob(f"{BUCKET}/report_run/report/.tmp-*")


def test_tensorboard_files_on_a_bucket_roll_at_each_flush(gcs_env, tmp_path):
  from rma_jax import metric_writer  # pylint: disable=g-import-not-at-top
  wd = f"gs://{BUCKET}/tb"
  w = metric_writer.create_writer(wd)
  w.write_scalars(2, {"train/loss": 0.75})
  w.flush()  # on a bucket: the file is closed, so the object exists now
  w.write_scalars(4, {"train/loss": 0.5})
  w.close()
  fs = _bucket()
  files = sorted(p for p in fs.ls(f"{BUCKET}/tb") if "events.out.tfevents" in p)
  assert len(files) == 2
  got = []
  for n, p in enumerate(files):
    local = tmp_path / f"events.{n}"
    local.write_bytes(fs.cat(p))
    for raw in event_file_loader.RawEventFileLoader(str(local)).Load():
      e = event_pb2.Event.FromString(raw)
      got += [(e.step, v.simple_value) for v in e.summary.value]
  assert got == [(2, 0.75), (4, 0.5)]


def test_checkpoint_discovery_on_a_bucket(gcs_env):
  """has_steps / find_checkpoint look in the bucket, not in a local 'gs:' folder."""
  from rma_jax import checkpointing  # pylint: disable=g-import-not-at-top
  wd = f"gs://{BUCKET}/ckpt_run"
  assert checkpointing.checkpoint_dir(wd, "latest") == f"{wd}/checkpoints/latest"
  assert not checkpointing.has_steps(wd)
  fs = _bucket()
  fs.pipe(f"{BUCKET}/ckpt_run/checkpoints/latest/3/marker", b"x")
  assert checkpointing.has_steps(wd)
  with pytest.raises(FileNotFoundError, match=f"gs://{BUCKET}/none/checkpoints"):
    checkpointing.find_checkpoint(f"gs://{BUCKET}/none")


def _cli(wd, *extra):
  return [sys.executable, "-m", "rma_jax.main", "--config=configs/demo.py:tiny",
          f"--workdir={wd}", "--config.stage1.num_epochs=0",
          "--config.checkpoint_every_steps=8", "--config.optim.num_epochs=250", *extra]


def _committed_steps(folder):
  """Checkpoint steps whose save finished (Orbax's commit marker on buckets)."""
  import fsspec  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  fsspec.filesystem("gs").invalidate_cache()  # gcsfs caches listings; another process writes
  p = epath.Path(folder)
  if not p.exists():
    return []
  return sorted(int(c.name) for c in p.iterdir()
                if c.name.isdigit() and (c / "commit_success.txt").exists())


@pytest.mark.slow
def test_cli_run_on_a_bucket_is_killed_resumes_and_reports(gcs_env):
  """`python -m rma_jax.main --workdir=gs://...`: killed (SIGKILL) after its first
  checkpoints, started again, it resumes from the bucket's newest complete checkpoint,
  finishes, and writes its report, scores and TensorBoard files to the bucket."""
  wd = f"gs://{BUCKET}/cli_run"
  env = dict(os.environ, **gcs_env, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=1 " + os.environ.get("RMA_TEST_XLA_FLAGS", "")))
  latest = f"{wd}/checkpoints/latest"
  first = subprocess.Popen(_cli(wd, "--config.max_steps=2000"), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  # Killed once its log passes step 40 (saves at 8, 16, ... are asynchronous: some may be
  # in flight). The bucket is not polled meanwhile: listing it from this process while the
  # run saves stalls the emulator, which runs in a thread of this process (a test artefact).
  try:
    deadline = time.time() + 300
    for line in first.stderr:
      if "step 40/2000" in line or time.time() > deadline:
        break
    else:
      pytest.fail(f"the first run ended (rc {first.wait()}) before it was killed")
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stderr.close()
  killed_at = _committed_steps(latest)[-1]
  assert 8 <= killed_at <= 40 and killed_at % 8 == 0
  fs = _bucket()
  assert not fs.glob(f"{BUCKET}/cli_run/report/report.json")  # it never got that far
  resumed = subprocess.run(_cli(wd, f"--config.max_steps={killed_at + 8}"), cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from" in resumed.stderr and f"at step {killed_at}" in resumed.stderr
  assert "Initialised" not in resumed.stderr
  assert _committed_steps(latest)[-1] == killed_at + 8
  history = [json.loads(l) for l in
             fs.cat(f"{BUCKET}/cli_run/config_history.jsonl").decode().splitlines()]
  assert [h["resumed_from_step"] for h in history] == [None, killed_at]
  report = json.loads(fs.cat(f"{BUCKET}/cli_run/report/report.json"))
  assert report["class_names"] == [str(d) for d in range(10)]
  protocols = report["results"]["protocols"]
  assert protocols and all(0.0 <= p["mAP"] <= 1.0 for p in protocols.values())
  assert fs.glob(f"{BUCKET}/cli_run/report/scores.npz")
  assert fs.glob(f"{BUCKET}/cli_run/events.out.tfevents.*")
  assert not os.path.exists(os.path.join(ROOT, "gs:")), "gs:// taken as a local path"
