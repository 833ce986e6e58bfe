"""Hostile inputs to the data readers and the weight converter (issue 33): named pipes listed
as images, list entries that climb out of the image root, images above Pillow's own
decompression-bomb limit, and foreign files given to ``--from=torch``.

Everything is built here in ``tmp_path``; nothing is downloaded.
"""

import json
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from rma_jax import errors
from rma_jax.data import BadExampleError, BadImageError, DataError, decode_image
from rma_jax.data import coco, decode, imagelist, voc

import data_trees as trees

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["circle", "square"]

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")


def _png(path, size=(16, 12), colour=(200, 30, 30)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, colour).save(path, format="PNG")
  return str(path)


def _fifo(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  os.mkfifo(path)
  return str(path)


def _without_blocking(fn, *fifos, timeout=30.0):
  """``fn()`` in a thread that must end within ``timeout`` s (opening a pipe for reading
  blocks until a writer comes). A blocked reader is released by opening each pipe for
  writing and closing it (EOF), then the test fails."""
  box = {}

  def target():
    try:
      box["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except  # re-raised below
      box["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    for fifo in fifos:
      try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
      except OSError:
        pass
    thread.join(5)
    pytest.fail(f"blocked for {timeout} s: a named pipe was opened")
  if "error" in box:
    raise box["error"]
  return box.get("value")


# ------------------------------------------------------------------- 4: named pipes as images


@needs_fifo
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_list_file_entry_that_is_a_named_pipe_is_skipped_and_named(tmp_path, suffix):
  _png(tmp_path / "img" / "a.png")
  pipe = _fifo(tmp_path / "img" / "pipe.png")
  rows = [("img/a.png", "circle"), ("img/pipe.png", "square")]
  if suffix == ".csv":
    text = "image,labels\n" + "".join(f"{i},{l}\n" for i, l in rows)
  else:
    text = "".join(json.dumps({"image": i, "labels": [l]}) + "\n" for i, l in rows)
  listing = tmp_path / f"train{suffix}"
  listing.write_text(text)

  def load():
    src = imagelist.load_list_split(str(listing), class_names=CLASSES)
    return src, [src[i]["id"] for i in range(len(src))]

  src, ids = _without_blocking(load, pipe)
  assert ids == [str(tmp_path / "img" / "a.png")]
  (what, reason), = src.skipped.at_scan
  assert what == f"{listing}:{3 if suffix == '.csv' else 2}"  # the CSV has a header row
  assert pipe in reason and "named pipe" in reason and "not opened" in reason, reason
  assert src.skipped.cause_counts() == {"image file not a regular file": 1}


@needs_fifo
def test_image_that_became_a_named_pipe_after_the_scan_is_skipped_when_read(tmp_path):
  """The decoder never opens a pipe either (the file may change between scan and read)."""
  path = _png(tmp_path / "img" / "a.png")
  listing = tmp_path / "train.csv"
  listing.write_text("image,labels\nimg/a.png,circle\n")
  src = imagelist.load_list_split(str(listing), class_names=CLASSES)
  os.remove(path)
  _fifo(path)
  with pytest.raises(BadExampleError, match="named pipe"):
    _without_blocking(lambda: src[0], path)
  assert path in src.skipped.at_read[0]
  with pytest.raises(BadImageError, match="not a regular file"):
    _without_blocking(lambda: decode_image(path), path)
  assert _without_blocking(lambda: decode.image_size(path), path) is None


@needs_fifo
def test_voc_and_coco_trees_skip_named_pipes(tmp_path):
  ids = ["000001", "000002"]
  files = trees.voc_files(trees.voc_examples(CLASSES, ids), {"trainval": ids})
  trees.write_files(tmp_path / "voc", files)
  voc_pipe = str(tmp_path / "voc" / "JPEGImages" / "000002.jpg")
  os.remove(voc_pipe)
  _fifo(voc_pipe)
  xml_pipe = str(tmp_path / "voc" / "Annotations" / "000001.xml")
  os.remove(xml_pipe)
  _fifo(xml_pipe)
  src = _without_blocking(lambda: voc.load_voc_split(str(tmp_path / "voc"), "trainval",
                                                     class_names=CLASSES),
                          voc_pipe, xml_pipe)
  assert len(src) == 0
  reasons = dict(src.skipped.at_scan)
  assert "named pipe" in reasons[voc_pipe] and "named pipe" in reasons[xml_pipe], reasons

  root = tmp_path / "coco"
  _png(root / "train" / "a.jpg")
  coco_pipe = _fifo(root / "train" / "b.jpg")
  (root / "annotations").mkdir()
  (root / "annotations" / "instances_train.json").write_text(trees.coco_json(
      [("a.jpg", 16, 12, [(1, [1, 1, 4, 4])]), ("b.jpg", 16, 12, [(2, [1, 1, 4, 4])])],
      [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]))
  src = _without_blocking(lambda: coco.load_coco_split(str(root), "train"), coco_pipe)
  assert src.ids() == [str(root / "train" / "a.jpg")]
  (what, reason), = src.skipped.at_scan
  assert what == coco_pipe and "named pipe" in reason


# -------------------------------------------------- 15: list entries that leave the image root


def test_list_entry_leaving_the_image_root_is_refused_naming_file_line_and_entry(tmp_path):
  _png(tmp_path / "img" / "a.png")
  lists = tmp_path / "lists"
  lists.mkdir()
  listing = lists / "train.csv"
  # The image root defaults to the list file's folder, lists/: ../img/a.png leaves it.
  listing.write_text("image,labels\n../img/a.png,circle\nsub/../../../../etc/passwd,square\n")
  with pytest.raises(DataError) as info:
    imagelist.load_list_split(str(listing), class_names=CLASSES)
  message = str(info.value)
  assert isinstance(info.value, errors.UserError) and "\n" not in message
  assert message.startswith(f"{listing}, line 2: image '../img/a.png' leaves the image root")
  assert "(and 1 more line)" in message and "data.image_root" in message
  # The fix the message gives: the image root above the images.
  listing.write_text("image,labels\nimg/a.png,circle\n")
  src = imagelist.load_list_split(str(listing), class_names=CLASSES, image_root=str(tmp_path))
  assert src.ids() == [str(tmp_path / "img" / "a.png")]


def test_list_entries_inside_the_root_and_absolute_paths_are_accepted(tmp_path):
  a = _png(tmp_path / "data" / "img" / "a.png")
  b = _png(tmp_path / "elsewhere" / "b.png")  # another disk, named absolutely
  listing = tmp_path / "data" / "train.jsonl"
  listing.write_text("".join(json.dumps(r) + "\n" for r in [
      {"image": "img/./x/../a.png", "labels": ["circle"]},  # normalised, stays inside
      {"image": b, "labels": ["square"]}]))
  src = imagelist.load_list_split(str(listing), class_names=CLASSES)
  assert src.ids() == [a, b] and not src.skipped.at_scan
  # The same entries, with an image root given and the list file elsewhere.
  other = tmp_path / "lists" / "train.jsonl"
  other.parent.mkdir()
  other.write_text(listing.read_text())
  src = imagelist.load_list_split(str(other), class_names=CLASSES,
                                  image_root=str(tmp_path / "data"))
  assert src.ids() == [a, b]


# ------------------------------------------------ 13: data.max_pixels above Pillow's own limit


def test_max_pixels_above_pillows_limit_is_the_limit_that_counts(tmp_path, monkeypatch):
  """Pillow refuses images above twice its global ``Image.MAX_IMAGE_PIXELS`` on its own;
  a larger ``data.max_pixels`` raises that limit for the decode only, and every refusal
  says which limit refused and which config field changes it."""
  path = _png(tmp_path / "img" / "big.png", size=(20, 20))  # 400 pixels
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above 200

  assert decode_image(path, max_pixels=1000).shape == (20, 20, 3)
  assert decode.image_size(path, max_pixels=1000) == (20, 20)
  assert Image.MAX_IMAGE_PIXELS == 100  # restored

  with pytest.raises(BadImageError) as info:  # ours refuses it
    decode_image(path, max_pixels=300)
  assert "max_pixels = 300" in str(info.value) and "data.max_pixels" in str(info.value)
  with pytest.raises(BadImageError) as info:  # below 2x Pillow's: Pillow's check fires first
    decode_image(path, max_pixels=150)
  assert "data.max_pixels = 150" in str(info.value), str(info.value)
  with pytest.raises(BadImageError) as info:  # data.max_pixels unset: Pillow's limit only
    decode_image(path)
  message = str(info.value)
  assert "Pillow's own limit" in message and "MAX_IMAGE_PIXELS = 100" in message, message
  assert "set data.max_pixels" in message
  assert Image.MAX_IMAGE_PIXELS == 100

  # Through a source, as training reads it.
  listing = tmp_path / "train.csv"
  listing.write_text("image,labels\nimg/big.png,circle\n")
  src = imagelist.load_list_split(str(listing), class_names=CLASSES, max_pixels=1000)
  assert src[0]["image"].shape == (20, 20, 3) and not src.skipped.at_read
  assert Image.MAX_IMAGE_PIXELS == 100


def test_pillow_limit_is_restored_when_overlapping_decodes_end(tmp_path, monkeypatch):
  """Two raises that overlap: the limit stays raised until the last ends, then is restored."""
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  with decode._pillow_limit_at_least(500):  # pylint: disable=protected-access
    assert Image.MAX_IMAGE_PIXELS == 500
    with decode._pillow_limit_at_least(1000):  # pylint: disable=protected-access
      assert Image.MAX_IMAGE_PIXELS == 1000
    assert Image.MAX_IMAGE_PIXELS == 1000  # the first still runs: never lowered under it
    with decode._pillow_limit_at_least(150):  # pylint: disable=protected-access
      assert Image.MAX_IMAGE_PIXELS == 1000  # needs no raise
  assert Image.MAX_IMAGE_PIXELS == 100


# ------------------------------------------------------- 10: foreign files to --from=torch


_NO_TORCH = ("import sys; sys.modules['torch'] = None; import runpy; "
             "runpy.run_module('rma_jax.pretrained', run_name='__main__')")


def test_foreign_files_given_to_from_torch_are_one_line_with_or_without_torch(tmp_path):
  """An HDF5 file and plain pickles: the same one line naming the file and the right
  ``--from`` whether torch is installed or not (torch said 'Unsupported operand ...
  Please file an issue', or refused the file as if it were malicious)."""
  pytest.importorskip("torch")
  h5py = pytest.importorskip("h5py")
  with h5py.File(tmp_path / "vgg16.h5", "w") as f:
    f.create_dataset("block1_conv1/kernel", data=np.zeros((3, 3, 3, 4), np.float32))
  (tmp_path / "arrays.pth").write_bytes(
      pickle.dumps({"features.0.weight": np.zeros((4, 3, 3, 3), np.float32)}, protocol=4))
  (tmp_path / "lists.pth").write_bytes(pickle.dumps({"features.0.weight": [1.0, 2.0]},
                                                    protocol=2))
  (tmp_path / "text.pth").write_text("not weights at all\n")
  cases = {"vgg16.h5": "it is an HDF5 file: use --from=keras",
           "arrays.pth": "a Python pickle but not a torch.save file",
           "lists.pth": "a Python pickle but not a torch.save file",
           "text.pth": "neither a zip archive nor a pickle"}
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  procs = {}
  for name in cases:
    args = ["--from=torch", str(tmp_path / name), f"--out={tmp_path / ('out_' + name)}"]
    procs[name, "torch"] = subprocess.Popen(
        [sys.executable, "-m", "rma_jax.pretrained", *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs[name, "no torch"] = subprocess.Popen(
        [sys.executable, "-c", _NO_TORCH, *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = {}
  for (name, mode), proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (name, mode, err)  # the command's status for a refusal
    got = err.strip().splitlines()
    assert len(got) == 1, (name, mode, err)  # one line, no traceback
    lines[name, mode] = got[0]
    path = tmp_path / name
    assert got[0].startswith(f"error: {path}: cannot be read as a torch.save file: "), got[0]
    assert cases[name] in got[0], got[0]
    assert "expected a torchvision .pth state dict" in got[0], got[0]
    assert not (tmp_path / ("out_" + name)).exists()
  for name in cases:
    assert lines[name, "torch"] == lines[name, "no torch"]
