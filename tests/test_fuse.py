"""``--mode=fuse`` (rma_jax.fuse) refusals: the same run given twice, an output folder that is
(or is inside, or holds) one of its inputs, and damaged report files (issue 33, items 2, 3,
7).

The evaluated workdirs are written by hand (``report/report.json`` and ``report/scores.npz``
as ``rma_jax.evaluate`` writes them, with what ``fuse.load_evaluated`` reads), so no model is
built or evaluated here; ``tests/test_evaluate.py`` fuses really evaluated runs.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rma_jax import errors, fuse

PROTOCOL = "ten_view@64"
CLASSES = [f"class{i}" for i in range(5)]
NUM_IMAGES = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_evaluated_workdir(workdir, seed: int) -> str:
  """An evaluated workdir as ``evaluate.evaluate_and_report`` leaves it: the headline
  protocol's raw scores, labels, difficult flags and image ids in ``report/scores.npz`` and
  its metric settings in ``report/report.json``. Runs of different seeds score the same images
  (same ids, labels) differently."""
  workdir = str(workdir)
  report_dir = os.path.join(workdir, "report")
  os.makedirs(report_dir)
  labels_rng = np.random.default_rng(1234)  # the same images in every run
  labels = (labels_rng.random((NUM_IMAGES, len(CLASSES))) < 0.4).astype(np.float32)
  labels[np.arange(NUM_IMAGES), np.arange(NUM_IMAGES) % len(CLASSES)] = 1.0
  difficult = np.zeros_like(labels, dtype=bool)
  ids = np.asarray([f"img{i:03d}" for i in range(NUM_IMAGES)])
  scores = np.random.default_rng(seed).normal(size=labels.shape).astype(np.float32)
  np.savez_compressed(os.path.join(report_dir, "scores.npz"), **{
      f"{PROTOCOL}/scores": scores, f"{PROTOCOL}/labels": labels,
      f"{PROTOCOL}/difficult": difficult, f"{PROTOCOL}/id": ids})
  settings = {"score_transform": "softmax", "prf_score_transform": "softmax_max",
              "ap_mode": "voc07", "top_k": 3, "threshold": 0.5}
  results = {"workdir": os.path.abspath(workdir), "checkpoint": "latest", "step": 100 + seed,
             "split": "test", "data": "demo", "model": "rma", "class_names": CLASSES,
             **settings, "protocols": {PROTOCOL: {**settings, "mAP": 0.5}},
             "headline": PROTOCOL}
  with open(os.path.join(report_dir, "report.json"), "w") as f:
    json.dump({"dataset": "demo", "method": "This run (rma)", "class_names": CLASSES,
               "results": results}, f)
  return workdir


@pytest.fixture
def runs(tmp_path):
  """Two evaluated workdirs (different seeds) under tmp_path/runs."""
  return [write_evaluated_workdir(tmp_path / "runs" / f"seed{s}", s) for s in (0, 1)]


def _snapshot(workdir):
  """Every file under ``workdir`` and its bytes."""
  out = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", "rma_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _refused_on_one_line(result, *names):
  """The CLI refused: exit status 2, the message one line starting with ``error:`` and
  naming ``names``, no traceback."""
  assert result.returncode == errors.EXIT_STATUS, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  errors_lines = [line for line in lines if line.startswith("error:")]
  assert len(errors_lines) == 1 and lines[-1] == errors_lines[0], lines
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  for name in names:
    assert name in lines[-1], (name, lines[-1])
  return lines[-1]


def _one_line_user_error(excinfo, *names):
  message = str(excinfo.value)
  assert isinstance(excinfo.value, errors.UserError), repr(excinfo.value)
  assert "\n" not in message, message
  for name in names:
    assert name in message, (name, message)
  return message


def test_two_different_runs_fuse(runs, tmp_path):
  """The hand-made runs are fusable (so the refusals below are about what they test)."""
  results = fuse.fuse_workdirs(runs, str(tmp_path / "fused"))
  assert results["headline"] == "fused" and len(results["inputs"]) == 2
  assert os.path.exists(tmp_path / "fused" / "report" / "report.json")


# ------------------------------------------------------------- item 2: the same run twice


def test_the_same_run_twice_is_refused_whatever_its_spelling(runs, tmp_path, monkeypatch):
  a, _ = runs
  link = str(tmp_path / "link_to_seed0")
  os.symlink(a, link)
  monkeypatch.chdir(tmp_path)
  relative = os.path.join(".", "runs", "seed0")
  spellings = [(a, link), (a, a + os.sep), (relative, a), (a, os.path.join(a, ".")),
               (link + os.sep, relative)]
  for i, (first, second) in enumerate(spellings):
    out = tmp_path / f"out{i}"
    with pytest.raises(errors.UserError) as excinfo:
      fuse.fuse_workdirs([first, second], str(out))
    message = _one_line_user_error(excinfo, first, second)
    assert "same" in message
    assert not out.exists(), (first, second)


def test_a_copy_of_a_run_is_refused_as_the_same_run(runs, tmp_path):
  """A copied folder (or the run evaluated twice) has the same scores: its fusion would be
  the run's own numbers, reported as two runs'."""
  import shutil
  a, b = runs
  copy = str(tmp_path / "copy_of_seed0")
  shutil.copytree(a, copy)
  with pytest.raises(errors.UserError) as excinfo:
    fuse.fuse_workdirs([a, b, copy], str(tmp_path / "out"))
  message = _one_line_user_error(excinfo, a, copy)
  assert "same" in message
  assert not (tmp_path / "out").exists()


def test_the_same_remote_run_twice_is_refused_before_reading_it(tmp_path, monkeypatch):
  def no_reading(workdir):
    raise AssertionError(f"read {workdir}")
  monkeypatch.setattr(fuse, "load_evaluated", no_reading)
  for first, second in [("gs://bucket/runs/a", "gs://bucket/runs/a/"),
                        ("gs://bucket/runs/a", "gs://bucket/runs/./a"),
                        ("gs://bucket/runs/a", "gs://bucket//runs/b/../a")]:
    with pytest.raises(errors.UserError) as excinfo:
      fuse.fuse_workdirs([first, second], str(tmp_path / "out"))
    _one_line_user_error(excinfo, first, second)


# ------------------------------------------------- item 3: the output folder is an input


def test_writing_the_fusion_into_an_input_is_refused_through_the_cli(runs, tmp_path):
  """--workdir resolving to one of the inputs (a symlink to it): exit status 2, one line, and
  the input's report files byte-identical afterwards."""
  a, b = runs
  before = _snapshot(a)
  link = str(tmp_path / "link_to_seed0")
  os.symlink(a, link)
  result = _cli("--mode=fuse", f"--fuse_workdirs={a},{b}", f"--workdir={link}")
  _refused_on_one_line(result, link, a)
  assert _snapshot(a) == before


def test_writing_the_fusion_into_or_over_an_input_is_refused(runs, tmp_path):
  a, b = runs
  before = {w: _snapshot(w) for w in runs}
  # out's report/ would hold an input; an input's report/ would be out's; out inside an input.
  held = str(tmp_path / "outer" / "report" / "seed1")
  write_evaluated_workdir(held, 1)
  os.makedirs(tmp_path / "linked")
  os.symlink(os.path.join(a, "report"), tmp_path / "linked" / "report")
  for inputs, out in [([a, b], a), ([a, b], b + os.sep), ([a, b], os.path.join(a, "fused")),
                      ([a, held], str(tmp_path / "outer")),
                      ([a, b], str(tmp_path / "linked"))]:
    with pytest.raises(errors.UserError) as excinfo:
      fuse.fuse_workdirs(inputs, out)
    _one_line_user_error(excinfo, out)
    assert {w: _snapshot(w) for w in runs} == before, out
  assert not os.path.exists(os.path.join(a, "fused"))
  assert sorted(os.listdir(tmp_path / "outer" / "report")) == ["seed1"]
  # A folder that merely holds the inputs is a fine output: its report/ is not theirs.
  results = fuse.fuse_workdirs([a, b], str(tmp_path / "runs"))
  assert results["headline"] == "fused"
  assert {w: _snapshot(w) for w in runs} == before


# --------------------------------------------------------- item 7: damaged report files


@pytest.mark.parametrize("damage", ["truncated", "random_bytes"])
def test_a_damaged_scores_npz_is_one_line_naming_it_through_the_cli(runs, tmp_path, damage):
  a, b = runs
  path = os.path.join(b, "report", "scores.npz")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2] if damage == "truncated"
            else np.random.default_rng(0).bytes(len(data)))
  out = tmp_path / "out"
  result = _cli("--mode=fuse", f"--fuse_workdirs={a},{b}", f"--workdir={out}")
  line = _refused_on_one_line(result, path, "--mode=evaluate")
  assert "damaged" in line
  assert "allow_pickle" not in line
  assert not out.exists()


def test_damaged_report_files_are_user_errors_naming_them(runs, tmp_path):
  a, b = runs
  report_json = os.path.join(b, "report", "report.json")
  with open(report_json) as f:
    text = f.read()
  for damaged in (text[:len(text) // 2], "", "\x00\xff garbage", "[1, 2]"):
    with open(report_json, "w", encoding="latin-1") as f:
      f.write(damaged)
    with pytest.raises(errors.UserError) as excinfo:
      fuse.fuse_workdirs([a, b], str(tmp_path / "out"))
    message = _one_line_user_error(excinfo, report_json, "--mode=evaluate")
    assert "damaged" in message
  with open(report_json, "w") as f:
    f.write(text)
  # A zip whose member is cut short, and an empty file.
  npz = os.path.join(b, "report", "scores.npz")
  with open(npz, "rb") as f:
    data = f.read()
  for damaged in (data[:-30], data[:40] + data[60:], b""):
    with open(npz, "wb") as f:
      f.write(damaged)
    with pytest.raises(errors.UserError) as excinfo:
      fuse.fuse_workdirs([a, b], str(tmp_path / "out"))
    message = _one_line_user_error(excinfo, npz, "--mode=evaluate")
    assert "damaged" in message
  assert not (tmp_path / "out").exists()
