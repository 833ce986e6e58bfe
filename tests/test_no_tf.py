"""Training without TensorFlow: TF and TFDS are the ``[tfds]`` extra, needed for TFDS data only.

The CLI runs in a subprocess in which ``tensorflow`` and ``tensorflow_datasets`` (and their
submodules) cannot be imported, as in a fresh ``pip install -e .``: a tiny demo trains,
evaluates and writes TensorBoard files (read back with tensorboard's own EventAccumulator and
compared with the scalars the run logged), and ``data.source=tfds`` stops at once, naming the
extra. The writer's event files are also read back on their own (``rma_jax.metric_writer``).
"""

import glob
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
# tensorboard's readers use TensorFlow's file layer when TensorFlow is installed (seconds to
# import); this module, when present, makes them use their own TF-free layer instead.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
from tensorboard.backend.event_processing import event_file_loader  # noqa: E402
from tensorboard.compat.proto import event_pb2  # noqa: E402

from rma_jax import metric_writer  # noqa: E402
import hidden  # noqa: E402  (tests/hidden.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child: every import of tensorflow* / tensorflow_datasets* fails as it does where they
# are not installed; then the CLI runs as `python -m`.
HIDE_TF = hidden.hiding(("tensorflow", "tensorflow_datasets"), """
    sys.argv = ["rma_jax.main"] + sys.argv[1:]
    runpy.run_module("rma_jax.main", run_name="__main__", alter_sys=True)
""")


def _run_without_tf(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-c", HIDE_TF, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _logged_scalars(stderr: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from the writer's ``[step] a = 1, b = 2`` lines (--verbosity=1)."""
  out = {}
  for step, rest in re.findall(r"\] \[(\d+)\] (.*)$", stderr, flags=re.M):
    for name, value in re.findall(r"([\w/]+) = ([-+0-9.eEinfa]+)", rest):
      out.setdefault(name, {})[int(step)] = float(value)
  return out


@pytest.mark.slow
def test_tiny_demo_trains_and_writes_tensorboard_files_without_tensorflow(tmp_path):
  """The tiny demo trains and writes TensorBoard files without TensorFlow, here with the
  peers' options --config.optim.ema_decay=0.999 --config.loss.classification=asl (their CLI
  run, shared to save the suite's time): each validation scores the parameters and their moving
  average, the report's metric card names the loss and which parameters it scored, and the
  scores are read with the sigmoid (eval.score_transform='auto')."""
  wd = str(tmp_path / "wd")
  # One stage (no stage-1 baseline) and single-view evaluation keep it short.
  out = _run_without_tf("--config=configs/demo.py:tiny", f"--workdir={wd}", "--verbosity=1",
                        "--config.stage1.num_epochs=0", "--config.eval.ten_view=False",
                        "--config.optim.ema_decay=0.999", "--config.loss.classification=asl")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "LEAKED" not in out.stderr, out.stderr[-3000:]
  assert re.search(r"step 4: val loss [\d.]+, val mAP [\d.]+, the best so far \(EMA: val "
                   r"loss [\d.]+, val mAP [\d.]+; the (EMA|plain parameters) selected\)",
                   out.stderr), out.stderr[-3000:]
  with open(os.path.join(wd, "report", "report.json")) as f:
    card = json.load(f)["metric_card"]
  assert card["classification_loss"].startswith("asl: the asymmetric loss (ASL"), card
  assert "gamma_pos=0.0, gamma_neg=4.0, clip=0.05" in card["classification_loss"]
  assert "exponential moving average (EMA)" in card["parameters"], card
  assert card["score_transform"] == card["prf_score_transform"] == "sigmoid"
  with open(os.path.join(wd, "report", "report.md")) as f:
    md = f.read()
  assert "- **classification_loss**: asl: " in md and "- **parameters**: the " in md
  files = glob.glob(os.path.join(wd, "events.out.tfevents.*"))
  assert files, os.listdir(wd)
  acc = event_accumulator.EventAccumulator(wd)
  acc.Reload()
  tags = acc.Tags()["scalars"]
  assert {"train/loss", "train/learning_rate", "val/loss", "val/mAP"} <= set(tags), tags
  logged = _logged_scalars(out.stderr)
  assert logged.get("train/loss"), out.stderr[-3000:]
  for tag in ("train/loss", "train/learning_rate", "val/loss", "val/mAP"):
    events = {e.step: e.value for e in acc.Scalars(tag)}
    assert sorted(events) == sorted(logged[tag]), tag
    # The log prints 6 significant digits; the event file holds the float32 value.
    np.testing.assert_allclose([events[s] for s in sorted(events)],
                               [logged[tag][s] for s in sorted(events)], rtol=1e-5, err_msg=tag)
  assert sorted(logged["train/loss"]) == [2, 4]
  assert "hparams" in acc.Tags()["tensors"]


def test_tfds_source_without_tfds_names_the_extra(tmp_path):
  wd = tmp_path / "wd"
  out = _run_without_tf("--config=configs/demo.py:tiny", f"--workdir={wd}",
                        "--config.data.source=tfds", "--config.data.name=voc2007",
                        timeout=120)
  assert out.returncode != 0
  assert 'pip install -e ".[tfds]"' in out.stderr and "rma_jax[tfds]" in out.stderr, (
      out.stderr[-3000:])
  assert "tensorflow_datasets" in out.stderr
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  # Stopped at the config check: nothing trained, no checkpoint folder.
  assert not (wd / "checkpoints").exists()


def _read_events(path):
  """The Event protos of one file as written (the raw loader does not migrate them)."""
  return [event_pb2.Event.FromString(r)
          for r in event_file_loader.RawEventFileLoader(path).Load()]


def test_writer_event_files_read_back_exactly(tmp_path):
  w = metric_writer.SummaryWriter(str(tmp_path))
  values = {1: {"a": 0.5, "b/c": -3.25}, 7: {"a": 1e-7}, 10: {"b/c": 12345.0}}
  for step, scalars in values.items():
    w.write_scalars(step, scalars)
  w.write_hparams({"lr": 1e-3, "name": "rma"})
  w.flush()
  path = str(w.path)
  # Readable after flush, before close (TensorBoard reads a running job's file).
  events = _read_events(path)
  assert events[0].file_version == "brain.Event:2"
  got = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value
         if v.HasField("simple_value")]
  want = [(s, k, float(np.float32(v))) for s, d in values.items() for k, v in d.items()]
  assert got == want
  w.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("a")] == [(1, 0.5), (7, float(np.float32(1e-7)))]
  text = acc.Tensors("hparams")[0].tensor_proto.string_val[0].decode()
  assert "| lr | 0.001 |" in text and "| name | 'rma' |" in text


def test_rolling_writer_continues_in_new_files_read_as_one_stream(tmp_path):
  """On buckets every flush closes the file (object stores publish a file when it closes);
  TensorBoard reads the folder's files in name order as one stream."""
  w = metric_writer.SummaryWriter(str(tmp_path), roll_on_flush=True)
  for step in range(1, 5):
    w.write_scalars(step, {"x": float(step)})
    w.flush()
    assert w.path is None
  w.close()
  files = sorted(glob.glob(str(tmp_path / "events.out.tfevents.*")))
  assert len(files) == 4
  assert all(isinstance(e, event_pb2.Event) for f in files for e in _read_events(f))
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("x")] == [(s, float(s)) for s in range(1, 5)]
