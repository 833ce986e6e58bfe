"""predict.run on generated images of several sizes and modes, a corrupt file and an image over
the pixel limit, in the main process and in worker processes; the CLI on a named pipe, ignored
files, a missing path and an empty folder; theta_to_pixel_boxes and draw_regions by hand."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image, ImageFile

from rma_jax import build, checkpointing, context, predict, steps, visualize
from rma_jax import data as data_lib
from rma_jax.data import preprocess
from test_evaluate import K, demo_config, fast_params


def test_theta_to_pixel_boxes_by_hand():
  theta = np.array([[1.0, 1.0, 0.0, 0.0],      # the whole image
                    [0.5, 0.5, 0.0, 0.0],      # the centre half
                    [-0.25, 0.5, 0.5, -0.5],   # mirrored x: same box as +0.25
                    [1.0, 1.0, 1.5, 0.0]])     # mostly outside: clipped
  boxes = visualize.theta_to_pixel_boxes(theta, 100, 60)
  np.testing.assert_allclose(boxes, [[0, 0, 100, 60], [25, 15, 75, 45],
                                     [62.5, 0, 87.5, 30], [75, 0, 100, 60]])


def test_draw_regions_colours_and_size():
  image = np.zeros((400, 300, 3), np.uint8)
  boxes = np.array([[50, 100, 250, 300], [0, 0, 300, 400]], float)
  out = visualize.draw_regions(image, boxes, ["1: dog", "2: cat"])
  assert out.size == (384, 512)  # shorter side enlarged to min_side=384: scale 1.28
  px = np.asarray(out)
  # The bottom edge of box 1, away from its label, has colour 1; the inside is untouched.
  y = round(300 * 1.28) - 2
  np.testing.assert_array_equal(px[y, round(150 * 1.28)], visualize.REGION_COLOURS[0])
  np.testing.assert_array_equal(px[round(200 * 1.28), round(150 * 1.28)], [0, 0, 0])
  np.testing.assert_array_equal(px[-1, 150], visualize.REGION_COLOURS[1])
  with pytest.raises(ValueError):
    visualize.draw_regions(image, boxes, ["only one"])


def _disjoint(rects):
  return all(not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
             for i, a in enumerate(rects) for b in rects[i + 1:])


def test_labels_of_clustered_boxes_never_overlap():
  """Nine regions starting at nearly the same corner, low in the picture (where moving a
  label down runs out of room), with labels of different widths: every label rectangle is
  disjoint from the others, inside the picture, of its own size, the first at its corner."""
  rng = np.random.default_rng(0)
  corners = [(10 + rng.uniform(0, 3), 300 + rng.uniform(0, 3)) for _ in range(9)]
  sizes = [(120 + 10 * k, 22) for k in range(9)]
  rects, strip = visualize.place_labels(corners, sizes, 384, 384)
  assert strip == 0 and _disjoint(rects)
  assert all(0 <= x0 and x1 <= 384 and 0 <= y0 and y1 <= 384 for x0, y0, x1, y1 in rects)
  np.testing.assert_allclose([(x1 - x0, y1 - y0) for x0, y0, x1, y1 in rects], sizes)
  assert rects[0][:2] == corners[0]
  # More labels than the picture holds: the rest go to a strip below it, still disjoint.
  big = [(300, 100)] * 9
  rects, strip = visualize.place_labels(corners, big, 384, 384)
  assert strip > 0 and _disjoint(rects)
  assert all(y1 <= 384 + strip and x1 <= 384 for _, _, x1, y1 in rects)
  image = np.zeros((384, 384, 3), np.uint8)
  boxes = [(x, y, x + 40, y + 40) for x, y in corners]
  labels = [f"{k + 1}: " + "class " * 6 for k in range(9)]
  out = visualize.draw_regions(image, boxes, labels)
  assert out.size[0] == 384 and out.size[1] >= 384


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  inputs = root / "inputs"
  inputs.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(inputs / "a_rgb.jpg")
  Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8), "L").save(inputs / "b_gray.png")
  Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(
      inputs / "c_rgba.png")
  Image.fromarray(rng.integers(0, 256, (40, 200, 3), dtype=np.uint8)).convert(
      "CMYK").save(inputs / "d_cmyk.jpg")
  Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)).convert(
      "P").save(inputs / "e_palette.gif")
  (inputs / "f_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
  Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(root / "big.png")
  # Wider than a picture is drawn (1,024 px), under max_pixels: drawn on a downscaled copy.
  Image.fromarray(rng.integers(0, 256, (50, 1100, 3), dtype=np.uint8)).save(root / "wide.png")
  (inputs / "notes.txt").write_text("not an image; a folder listing skips it")
  return root


def test_predict_end_to_end(run_dir, monkeypatch, tmp_path):
  config = demo_config()
  config.data.max_pixels = 250 * 250  # big.png (300 x 300) is over it
  config.eval.batch_size = 4  # 5 readable images: two batches, the second padded
  model = build.build_model(config, 10)
  params = fast_params(model)["params"]
  wd = str(tmp_path / "run")
  state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
  manager = checkpointing.latest_manager(wd)
  checkpointing.save(manager, 3, state)
  manager.wait_until_finished()

  loaded_sizes = []
  original_load = ImageFile.ImageFile.load

  def spy_load(self):
    loaded_sizes.append(self.size)
    return original_load(self)

  monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
  out_dir = str(tmp_path / "out")
  inputs = [str(run_dir / "inputs"), str(run_dir / "big.png"), str(run_dir / "wide.png")]
  result = predict.run(config, wd, inputs, out_dir)
  monkeypatch.undo()

  assert result["checkpoint_step"] == 3
  names = [os.path.basename(e["file"]) for e in result["images"]]
  assert names == ["a_rgb.jpg", "b_gray.png", "c_rgba.png", "d_cmyk.jpg", "e_palette.gif",
                   "wide.png"]
  skipped = {os.path.basename(s["file"]): s["reason"] for s in result["skipped"]}
  assert set(skipped) == {"f_corrupt.jpg", "big.png", "notes.txt"}
  assert "f_corrupt.jpg" in skipped["f_corrupt.jpg"]
  assert "not an image file name" in skipped["notes.txt"]
  assert "max_pixels" in skipped["big.png"] and "refused" in skipped["big.png"]
  assert (300, 300) not in loaded_sizes  # the bomb was never decoded

  with open(os.path.join(out_dir, "predictions.json")) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  sizes = {"a_rgb.jpg": (120, 90), "b_gray.png": (50, 70), "c_rgba.png": (64, 64),
           "d_cmyk.jpg": (200, 40), "e_palette.gif": (47, 33), "wide.png": (1100, 50)}
  for e in result["images"]:
    w, h = sizes[os.path.basename(e["file"])]
    assert (e["width"], e["height"]) == (w, h)
    assert sum(e["scores"].values()) == pytest.approx(1.0, abs=1e-5)  # softmax
    assert len(e["top"]) == config.eval.top_k
    assert [r["step"] for r in e["regions"]] == list(range(1, K + 1))
    for r in e["regions"]:
      x0, y0, x1, y1 = r["box"]
      assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
      assert r["top_class"] in e["scores"]
    with Image.open(e["picture"]) as pic:
      pic.verify()

  # Independent check of one image: the model on the resized RGB array, boxes by hand.
  e = result["images"][1]
  gray = np.asarray(Image.open(e["file"]).convert("RGB"))
  x = jnp.asarray(preprocess.eval_transform(gray, 48))[None]  # the model normalises it
  ref = jax.jit(model.apply)({"params": params}, x)
  np.testing.assert_allclose(e["raw_scores"], ref["scores"][0], rtol=1e-4, atol=1e-5)
  sx, sy, tx, ty = np.asarray(ref["theta"][0, 1])
  expected = [(tx - abs(sx) + 1) / 2 * 50, (ty - abs(sy) + 1) / 2 * 70,
              (tx + abs(sx) + 1) / 2 * 50, (ty + abs(sy) + 1) / 2 * 70]
  expected = np.clip(expected, 0, [50, 70, 50, 70])
  np.testing.assert_allclose(e["regions"][0]["box"], expected, rtol=1e-4, atol=1e-3)
  # Which region gave each listed label: the argmax over regions of that class's score.
  names = list(e["scores"])
  listed = {n for n, _ in e["top"]} | set(e["predicted"])
  assert set(e["label_regions"]) == listed
  for n in listed:
    assert e["label_regions"][n] == 1 + int(np.argmax(np.asarray(ref["region_scores"])[
        0, :, names.index(n)]))
  for r in e["regions"]:
    assert r["gave"] == [n for n in e["predicted"] if e["label_regions"][n] == r["step"]]
  with Image.open(result["images"][-1]["picture"]) as pic:
    # wide.png drawn on a 1,024 x 47 copy, whose short side draw_regions enlarges to 384.
    assert pic.size == (round(1024 * 384 / 47), 384)

  # The files read in 2 worker processes (8 files: more than one batch), as data.num_workers
  # says: the same predictions and the same pictures, byte for byte.
  config.data.num_workers = 2
  workers = []
  read = predict.pipeline.map_in_workers
  monkeypatch.setattr(predict.pipeline, "map_in_workers",
                      lambda fn, n, num_workers: workers.append(num_workers) or read(
                          fn, n, num_workers))
  again = predict.run(config, wd, inputs, str(tmp_path / "out_workers"))
  assert workers == [2]
  pictures = [(e.pop("picture"), f.pop("picture"))
              for e, f in zip(result["images"], again["images"])]
  assert again == result
  for ours, theirs in pictures:
    with open(ours, "rb") as a, open(theirs, "rb") as b:
      assert a.read() == b.read(), ours


def test_list_inputs_keeps_named_files_and_filters_folders(run_dir):
  files, skipped = predict.list_inputs([str(run_dir / "inputs"),
                                        str(run_dir / "inputs" / "notes.txt")])
  names = [os.path.basename(f) for f in files]
  assert names[-1] == "notes.txt" and names.count("notes.txt") == 1
  assert "f_corrupt.jpg" in names and "a_rgb.jpg" in names
  assert [os.path.basename(s["file"]) for s in skipped] == ["notes.txt"]  # from the folder


def test_predict_cli_skips_pipes_and_says_what_it_ignored(tmp_path):
  """A named pipe in an input folder used to hang predict for ever (and no predictions.json
  was written); ignored files, a missing path and an empty folder went unmentioned."""
  from test_train import ROOT, TINY, _ENV, tiny_config
  config = tiny_config()
  model = build.build_model(config, 10)
  state = steps.TrainState.create(apply_fn=model.apply, params=fast_params(model)["params"],
                                  tx=optax.adam(1e-3))
  wd = str(tmp_path / "run")
  manager = checkpointing.latest_manager(wd)
  checkpointing.save(manager, 1, state)
  manager.wait_until_finished()
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(inputs / "good.png")
  os.mkfifo(inputs / "stream.png")  # opening it would block until someone writes
  (inputs / "notes.txt").write_text("not an image")
  (inputs / ".hidden.png").write_bytes(b"")
  (tmp_path / "empty").mkdir()
  missing = str(tmp_path / "missing.jpg")

  def predict_cli(out, *items):
    cmd = [sys.executable, "-m", "rma_jax.main", "--config=configs/demo.py:tiny",
           f"--workdir={wd}", *TINY, "--mode=predict", f"--inputs={','.join(items)}", f"--out={out}"]
    result = subprocess.run(cmd, cwd=ROOT, env=_ENV, capture_output=True, text=True,
                            timeout=300)
    with open(os.path.join(out, "predictions.json")) as f:
      return result, json.load(f)

  result, written = predict_cli(str(tmp_path / "out"), str(inputs), missing,
                                str(tmp_path / "empty"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert [os.path.basename(e["file"]) for e in written["images"]] == ["good.png"]
  reasons = {os.path.basename(s["file"]): s["reason"] for s in written["skipped"]}
  assert set(reasons) == {"stream.png", "notes.txt", ".hidden.png", "missing.jpg", "empty"}
  assert "not a regular file (a named pipe); not opened" in reasons["stream.png"]
  assert "not an image file name" in reasons["notes.txt"]
  assert "hidden file" in reasons[".hidden.png"]
  assert reasons["missing.jpg"] == "no such file or folder"
  assert reasons["empty"].startswith("empty folder")
  assert f"skipped {inputs / 'stream.png'}: not a regular file" in result.stdout
  # Nothing to label at all: predictions.json says why, and the exit status is non-zero.
  result, written = predict_cli(str(tmp_path / "none"), missing, str(tmp_path / "empty"))
  assert result.returncode != 0
  assert "no image was labelled" in result.stderr
  assert written["images"] == [] and len(written["skipped"]) == 2


def test_class_names_for_each_data_set(tmp_path):
  """Without a workdir's record, the fixed list of data.name; with one, the record."""
  config = demo_config()
  assert context.trained_class_names(config, None) == tuple("0123456789")
  config.data.name = "voc2007"
  assert context.trained_class_names(config, str(tmp_path))[:2] == ("aeroplane", "bicycle")
  config.data.name = "coco2014"
  assert len(context.trained_class_names(config, None)) == 80
  data_lib.save_run_classes(str(tmp_path), ["cat", "dog"], origin="test", dataset="mine")
  config.data.name = "mine"
  assert context.trained_class_names(config, str(tmp_path)) == ("cat", "dog")
  with pytest.raises(ValueError, match="no class list"):
    context.trained_class_names(config, None)
