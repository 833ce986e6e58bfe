"""Training on one's own data: VOC-layout trees with classes of their own, COCO-format trees
whose JSONs number images from 1, CSV / JSON-lines lists; the class list recorded by the run
and read back by evaluation and prediction; and loud, early failures on data that cannot be
used (through ``python -m rma_jax.main`` where that is how a user meets them)."""

import json
import logging
import os

import numpy as np
import pytest

from rma_jax.configs import default
from rma_jax import context
from rma_jax.data import DataError, classes, coco, get_sources, imagelist, voc

import data_trees as trees

SHAPES = ("circle", "square", "triangle", "ring")
W, H = 48, 40


def _data_config(**kw):
  c = default.get_config().data
  c.update(kw)
  return c


def _voc_tree(root, *, train_ids=24, test_ids=8, test_classes=SHAPES[:3], bom=False,
              class_files=(), missing_images=()):
  """VOCdevkit/VOC2007 of shapes; the test split has only ``test_classes``."""
  train = trees.voc_examples(SHAPES, [f"{i:06d}" for i in range(1, train_ids + 1)], seed=1)
  test = trees.voc_examples(test_classes, [f"{i:06d}" for i in range(101, 101 + test_ids)],
                            seed=2)
  files = trees.voc_files({**train, **test}, {"trainval": list(train), "test": list(test)},
                          prefix="VOC2007/", class_files=class_files)
  if bom:  # As Windows editors write it.
    files["VOC2007/ImageSets/Main/trainval.txt"] = (
        b"\xef\xbb\xbf" + files["VOC2007/ImageSets/Main/trainval.txt"])
  for id_ in missing_images:
    del files[f"VOC2007/JPEGImages/{id_}.jpg"]
  trees.write_files(str(root / "VOCdevkit"), files)
  return root / "VOCdevkit", train, test


def _names(objects):
  return sorted({o[0] for o in objects})


# ------------------------------------------------------------------------ VOC: the class list

def test_voc_tree_classes_from_annotations_file_config_or_real_voc(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  devkit, train, test = _voc_tree(tmp_path / "a")
  s = get_sources(_data_config(name="shapes", source="voc", data_dir=str(devkit)), seed=0)
  assert s.class_names == tuple(sorted(SHAPES))  # the sorted <name>s of the training split
  assert "annotations of split 'trainval'" in s.class_origin
  assert "4 classes from the <name>s in the annotations" in caplog.text
  every = {**train, **test}
  for split in (s.train, s.val, s.test):
    for i, id_ in enumerate(split.ids()):
      want = np.isin(s.class_names, _names(every[id_][0]))
      np.testing.assert_array_equal(split[i]["labels"] > 0, want)
  # The test split has no ring: recorded, logged, and said to be in CP/CR/CF1.
  assert s.missing_classes.get("test") == ("ring",)
  assert "no positive example of 1 classes that the training split has: ['ring']" in caplog.text

  # classes.txt beside VOC2007/ fixes the order; a class not in it makes its images skipped.
  (devkit / "classes.txt").write_text("# my classes\ntriangle\nsquare\n\ncircle\n")
  s = get_sources(_data_config(name="shapes", source="voc", data_dir=str(devkit),
                               max_skip_fraction=1.0), seed=0)
  assert s.class_names == ("triangle", "square", "circle")
  assert s.class_origin == str(devkit / "classes.txt")
  with_ring = [i for i, (objs, _) in train.items() if "ring" in _names(objs)]
  skipped = dict(s.train.skipped.at_scan)
  assert len(skipped) == len(with_ring) > 0
  assert all(any(f"{i}.xml" in k and "'ring'" in v for k, v in skipped.items())
             for i in with_ring)
  # data.class_names wins over classes.txt (given on the command line as a,b,c).
  s = get_sources(_data_config(name="shapes", source="local", data_dir=str(devkit),
                               class_names="ring,circle,square,triangle"), seed=0)
  assert s.class_names == ("ring", "circle", "square", "triangle")
  assert s.class_origin == "data.class_names"

  # A real VOC tree (its per-class lists) keeps the 20 VOC classes, even if few are used.
  devkit, _, _ = _voc_tree(tmp_path / "b", class_files=classes.VOC_CLASSES)
  src = voc.load_voc_split(str(devkit / "VOC2007"), "test")
  assert src.class_names == classes.VOC_CLASSES and "real VOC tree" in src.class_origin


def test_split_list_with_bom_and_latin1(tmp_path, caplog):
  """Issue 17 item 9: a BOM is stripped (it used to become part of the first id, which was
  then 'missing'); a Latin-1 list names the file and the line."""
  devkit, train, _ = _voc_tree(tmp_path, bom=True)
  src = voc.load_voc_split(str(devkit / "VOC2007"), "trainval")
  assert src.ids() == list(train) and src.skipped.count == 0
  main = devkit / "VOC2007" / "ImageSets" / "Main"
  (main / "latin.txt").write_bytes(b"000001\n00000\xe9\n")
  with pytest.raises(ValueError, match=r"latin\.txt, line 2: not UTF-8"):
    voc.load_voc_split(str(devkit / "VOC2007"), "latin")
  (tmp_path / "classes.txt").write_bytes("circle\nsquare\n".encode("utf-16"))
  assert classes.read_class_file(tmp_path / "classes.txt") == ("circle", "square")


# -------------------------------------------------------------------------------- list files

def _images(root, names, seed=0):
  (root / "img").mkdir(parents=True, exist_ok=True)
  for k, name in enumerate(names):
    (root / "img" / name).write_bytes(trees.draw([], SHAPES, W, H, seed + k))


def test_list_files_csv_and_jsonl_rows_named_and_skipped(tmp_path, caplog):
  _images(tmp_path, [f"{k}.jpg" for k in range(8)])
  (tmp_path / "train.csv").write_text(
      "image,labels,boxes,notes\n"                                    # 1
      "img/0.jpg,circle;square,,first\n"                              # 2
      'img/1.jpg,square|triangle,"[[0.1, 0.2, 0.5, 0.6, ""ring""]]",\n'  # 3 box adds ring
      "img/2.jpg,,,no labels: kept\n"                                 # 4
      "img/3.jpg,circle,,too,many\n"                                  # 5 malformed
      'img/4.jpg,"circle,,\n'                                          # 6 unterminated quote
      "img/missing.jpg,circle,,\n"                                    # 7 missing image
      "img/0.jpg,triangle,,second row of img/0: merged\n"            # 8
      "\n"
      'img/5.jpg,"[""circle"", ""ring""]",,JSON list\n'               # 10
      'img/6.jpg,circle,"[[0.1, 0.2, 0.5]]",\n')                      # 11 malformed boxes
  (tmp_path / "test.jsonl").write_text(
      '{"image": "img/7.jpg", "labels": ["triangle"]}\n'                      # 1
      '{"image": "img/6.jpg", "labels": "circle|unicorn"}\n'                  # 2 unknown
      '{"image": "img/5.jpg", "labels": []}\n'                                # 3 kept
      '{"image": "img/4.jpg"}\n'                                              # 4 no labels key
      "not json at all\n"                                                     # 5
      '{"image": "img/3.jpg", "labels": "square", "boxes": [[0, 0, 1, 1, "square"]]}\n')
  caplog.set_level(logging.WARNING)
  train = imagelist.load_list_split(str(tmp_path / "train.csv"), split="train")
  assert train.class_names == ("circle", "ring", "square", "triangle")  # incl. box labels
  root = str(tmp_path)
  assert train.ids() == [os.path.join(root, "img", f"{k}.jpg") for k in (0, 1, 2, 5)]
  want = {0: ["circle", "square", "triangle"], 1: ["ring", "square", "triangle"], 2: [],
          5: ["circle", "ring"]}
  for i, k in enumerate((0, 1, 2, 5)):
    ex = train[i]
    assert [train.class_names[c] for c in np.flatnonzero(ex["labels"])] == want[k]
    assert not ex["difficult"].any() and ex["image"].shape == (H, W, 3)
  np.testing.assert_allclose(train[1]["boxes"], [[0.1, 0.2, 0.5, 0.6]])
  assert train[1]["box_labels"].tolist() == [1]
  skipped = dict(train.skipped.at_scan)
  csv_path = str(tmp_path / "train.csv")
  assert set(skipped) == {f"{csv_path}:{n}" for n in (5, 6, 7, 11)}
  assert "5 fields, the header has 4" in skipped[f"{csv_path}:5"] and "malformed" in skipped[f"{csv_path}:6"]
  assert "missing.jpg missing" in skipped[f"{csv_path}:7"]
  assert "[x0, y0, x1, y1, label]" in skipped[f"{csv_path}:11"]
  assert train.skipped.cause_counts() == {"malformed line": 3, "image file missing": 1}
  assert f"{csv_path}:7" in caplog.text  # logged by file and line

  test = imagelist.load_list_split(str(tmp_path / "test.jsonl"), split="test",
                                   class_names=train.class_names)
  assert [os.path.basename(i) for i in test.ids()] == ["7.jpg", "5.jpg", "3.jpg"]
  assert test[1]["labels"].sum() == 0  # an empty list: kept without labels
  skipped = dict(test.skipped.at_scan)
  jl = str(tmp_path / "test.jsonl")
  assert set(skipped) == {f"{jl}:{n}" for n in (2, 4, 5)}
  assert "unknown label(s) ['unicorn']" in skipped[f"{jl}:2"]
  assert test.skipped.cause_counts() == {"malformed line": 2, "unknown label": 1}

  # Split names: a stem finds <stem>.csv or .jsonl; a missing one names what exists.
  assert imagelist.find_list_file(root, "test") == jl
  with pytest.raises(FileNotFoundError, match=r"val\.csv or .*val\.jsonl.*\['test\.jsonl', "
                     r"'train\.csv'\]"):
    imagelist.find_list_file(root, "val")
  (tmp_path / "bad_header.csv").write_text("path,tags\nimg/0.jpg,circle\n")
  with pytest.raises(ValueError, match="bad_header.csv: the header row"):
    imagelist.load_list_split(str(tmp_path / "bad_header.csv"))


# ------------------------------------------------------------------------------------- COCO

CATS = [{"id": 7, "name": "circle"}, {"id": 3, "name": "square"}, {"id": 11, "name": "triangle"}]


def _coco_tree(root, n_train=20, n_val=8):
  """A 3-class COCO-format tree whose train and val JSONs both number images from 1."""
  ids = {c["name"]: c["id"] for c in CATS}
  names = [c["name"] for c in CATS]
  rng = np.random.default_rng(3)
  for split, n in (("train", n_train), ("val", n_val)):
    (root / split).mkdir(parents=True)
    images = []
    for k in range(n):
      objects = trees.random_objects(rng, names, W, H)
      fname = f"{split}_{k:03d}.jpg"
      (root / split / fname).write_bytes(trees.draw(objects, names, W, H, 100 * k))
      images.append((fname, W, H, [(ids[o[0]], (o[2][0] - 1, o[2][1] - 1,
                                                o[2][2] - o[2][0] + 1, o[2][3] - o[2][1] + 1))
                                   for o in objects]))
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(trees.coco_json(images, CATS))
  return root


def test_coco_tree_numbering_from_1_duplicates_and_bad_entries(tmp_path):
  root = _coco_tree(tmp_path / "coco")
  s = get_sources(_data_config(name="shapes", source="local", data_dir=str(root),
                               train_split="train", test_split="val"), seed=0)
  assert s.class_names == ("square", "circle", "triangle")  # category-id order: 3, 7, 11
  assert len(s.train) + len(s.val) == 20 and len(s.test) == 8  # image ids 1.. in both
  first = json.loads((root / "annotations" / "instances_val.json").read_text())
  cat_name = {c["id"]: c["name"] for c in CATS}
  for i, im in enumerate(first["images"]):  # in image-id order, read by name
    ex = s.test[i]
    assert ex["id"] == str(root / "val" / im["file_name"])
    want = {cat_name[a["category_id"]] for a in first["annotations"] if a["image_id"] == im["id"]}
    assert {s.class_names[c] for c in np.flatnonzero(ex["labels"])} == want

  ann = root / "annotations" / "instances_train.json"
  good = json.loads(ann.read_text())

  def refused(data, *patterns):
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
      coco.load_coco_split(str(root), "train")
    for p in (str(ann), *patterns):
      assert p in str(e.value), str(e.value)

  dup = json.loads(json.dumps(good))
  dup["images"][4]["id"] = dup["images"][2]["id"]  # = 3
  refused(dup, "duplicate image id", "id 3 is both 'train_002.jpg' and 'train_004.jpg'")
  dup = json.loads(json.dumps(good))
  dup["categories"].append({"id": 3, "name": "hexagon"})
  refused(dup, "duplicate category id", "id 3 is both 'square'", "'hexagon'")

  bad = json.loads(json.dumps(good))
  del bad["annotations"][0]["category_id"]  # image 1: skipped, labels unknown
  img1 = bad["annotations"][0]["image_id"]
  j = next(k for k, a in enumerate(bad["annotations"]) if a["image_id"] not in (img1, 6))
  bad["annotations"][j]["bbox"] = [1, 2, 3]  # kept: its class counts, without a box
  del bad["images"][5]["file_name"]  # image id 6
  ann.write_text(json.dumps(bad))
  src = coco.load_coco_split(str(root), "train")
  skipped = src.skipped.at_scan
  assert any(f"image id {img1}" in what and str(ann) in what and "annotation 1 has no "
             "category_id" in why for what, why in skipped), skipped
  assert any(f"{ann} image id 6" == what and "without file_name" in why
             for what, why in skipped), skipped
  aj = bad["annotations"][j]
  assert any(str(ann) in what and f"annotation {aj['id']}" in what and "[1, 2, 3]" in why
             for what, why in src.skipped.notes), src.skipped.notes
  ex = src[src.ids().index(str(root / "train" / bad["images"][aj["image_id"] - 1]
                               ["file_name"]))]
  assert ex["labels"][src.class_names.index(cat_name[aj["category_id"]])] == 1
  others = [a for a in bad["annotations"] if a["image_id"] == aj["image_id"] and a is not aj]
  assert len(ex["boxes"]) == len(others)
  assert {cat_name[a["category_id"]] for a in bad["annotations"] if a["image_id"] ==
          aj["image_id"]} == {src.class_names[c] for c in np.flatnonzero(ex["labels"])}
  assert len(src) == 18 and src.skipped.cause_counts() == {
      "annotation without category_id": 1, "image without file_name": 1}


# --------------------------------------------------------------------- unusable splits, early

def test_unusable_splits_are_errors_naming_causes_and_files(tmp_path):
  devkit, train, _ = _voc_tree(tmp_path / "all", missing_images=[f"{i:06d}" for i in
                                                                 range(1, 25)])
  with pytest.raises(DataError) as e:
    get_sources(_data_config(name="shapes", source="voc", data_dir=str(devkit)), seed=0)
  msg = str(e.value)
  assert "shapes:trainval (data.train_split) has no usable examples" in msg
  assert "all 24 examples were skipped: 24 image file missing" in msg
  assert "000001.jpg (image file missing)" in msg and "000005.jpg" in msg

  # 2 of 20 (10 %) missing: over the default max_skip_fraction (5 %), which can be raised.
  devkit, _, _ = _voc_tree(tmp_path / "some", train_ids=20,
                           missing_images=["000003", "000017"])
  cfg = _data_config(name="shapes", source="voc", data_dir=str(devkit))
  with pytest.raises(DataError, match=r"2 of 20 examples \(10.0%\) were skipped .* more than "
                     r"data.max_skip_fraction = 0.05: 2 image file missing.*000003.jpg.*"
                     r"--config.data.max_skip_fraction=0.1"):
    get_sources(cfg, seed=0)
  cfg.max_skip_fraction = 0.1
  assert len(get_sources(cfg, seed=0).train) == 16  # 18 readable, 2 held out for val


# ------------------------------------------------------------------ the run's class record

def test_run_class_record_is_what_predict_and_evaluation_read(tmp_path):
  config = default.get_config()
  config.data.name = "shapes"
  with pytest.raises(ValueError, match="no fixed class list"):
    context.trained_class_names(config, str(tmp_path))
  classes.save_run_classes(tmp_path, ("b", "a"), origin="test", dataset="shapes")
  assert classes.load_run_classes(tmp_path) == ("b", "a")
  assert context.trained_class_names(config, str(tmp_path)) == ("b", "a")
  config.data.name = "coco2014"  # an old workdir without the record: the fixed list
  assert len(context.trained_class_names(config, str(tmp_path / "old"))) == 80
  # A run's list overrides the tree's own; a fixed data set must match it.
  devkit, _, _ = _voc_tree(tmp_path / "t")
  s = get_sources(_data_config(name="shapes", source="voc", data_dir=str(devkit)), seed=0,
                  class_names=("triangle", "circle", "square", "ring"))
  assert s.class_names == ("triangle", "circle", "square", "ring")
  with pytest.raises(ValueError, match="fixed classes"):
    get_sources(_data_config(name="demo", source="demo"), seed=0, class_names=("a",))


# --------------------------------------------------------------------------- through the CLI

def _report(workdir):
  with open(os.path.join(workdir, "report", "report.json")) as f:
    return json.load(f), open(os.path.join(workdir, "report", "report.md")).read()


@pytest.mark.slow
def test_cli_voc_tree_of_own_classes_trains_and_reports_them(tmp_path):
  devkit, _, _ = _voc_tree(tmp_path, bom=True)
  wd = tmp_path / "run"
  r = trees.main_cli(wd, "--config.data.name=shapes", "--config.data.source=voc",
                     f"--config.data.data_dir={devkit}", "--config.data.train_split=trainval",
                     "--config.data.test_split=test")
  assert r.returncode == 0, r.stderr[-3000:]
  names = ["circle", "ring", "square", "triangle"]
  assert json.loads((wd / "classes.json").read_text())["class_names"] == names
  assert "annotation file missing" not in r.stderr  # the BOM did not spoil the first id
  assert "no positive example of 1 classes that the training split has: ['ring']" in r.stderr
  rep, md = _report(wd)
  assert rep["class_names"] == names and rep["paper"] == {}
  assert "| Methods | circle | ring | square | triangle | mAP |" in md
  assert "Paper" not in md and "aero" not in md
  assert rep["results"]["classes_without_positives"] == ["ring"]
  assert "no positive image in the test split (ring; their recall counts as 0)" in md


@pytest.mark.slow
def test_cli_coco_tree_of_3_classes_trains_evaluates_and_predicts(tmp_path):
  root = _coco_tree(tmp_path / "coco")
  wd = tmp_path / "run"
  flags = ["--config.data.name=shapes", "--config.data.source=coco",
           f"--config.data.data_dir={root}", "--config.data.train_split=train",
           "--config.data.test_split=val", "--config.model.name=baseline"]  # compiles faster
  r = trees.main_cli(wd, *flags)
  assert r.returncode == 0, r.stderr[-3000:]
  rep, md = _report(wd)
  assert rep["class_names"] == ["square", "circle", "triangle"] and rep["paper"] == {}
  assert rep["results"]["num_images"] == 8 and "| Methods | square | circle | triangle |" in md
  out = tmp_path / "pred"
  r = trees.main_cli(wd, *flags, "--mode=predict", f"--inputs={root / 'val'}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  pred = json.loads((out / "predictions.json").read_text())
  assert pred["class_names"] == ["square", "circle", "triangle"] and len(pred["images"]) == 8
  assert all(set(im["scores"]) == {"square", "circle", "triangle"} for im in pred["images"])


def test_cli_list_files_train_csv_test_jsonl(tmp_path):
  names = [f"{k:03d}.jpg" for k in range(32)]
  _images(tmp_path, names)
  rng = np.random.default_rng(0)
  rows = ["image,labels"] + [f"img/{n},{';'.join(rng.choice(SHAPES[:3], 2, replace=False))}"
                             for n in names[:24]] + ["img/gone.jpg,circle"]  # 1 of 25 bad
  (tmp_path / "lists").mkdir()
  (tmp_path / "lists" / "train.csv").write_text("\n".join(rows) + "\n")
  (tmp_path / "lists" / "test.jsonl").write_text("".join(
      json.dumps({"image": f"img/{n}", "labels": [str(rng.choice(SHAPES[:3]))]}) + "\n"
      for n in names[24:]))
  wd = tmp_path / "run"
  r = trees.main_cli(wd, "--config.data.name=shapes", "--config.data.source=list",
                     f"--config.data.data_dir={tmp_path / 'lists'}",
                     f"--config.data.image_root={tmp_path}",
                     "--config.data.train_split=train.csv", "--config.data.test_split=test",
                     "--config.model.name=baseline")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"train.csv:26: image file {tmp_path / 'img' / 'gone.jpg'} missing" in r.stderr
  rep, md = _report(wd)
  assert rep["class_names"] == ["circle", "square", "triangle"]
  assert rep["results"]["num_images"] == 8


@pytest.mark.parametrize("case", ["all_bad", "ten_percent_bad", "duplicate_image_id"])
def test_cli_bad_data_stops_before_training(tmp_path, case):
  if case == "duplicate_image_id":
    root = _coco_tree(tmp_path / "coco", n_train=6, n_val=2)
    ann = root / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    data["images"][3]["id"] = 2
    ann.write_text(json.dumps(data))
    flags = ["--config.data.source=local", f"--config.data.data_dir={root}",
             "--config.data.train_split=train", "--config.data.test_split=val"]
    want = [f"{ann}: duplicate image id(s): id 2 is both 'train_001.jpg' and 'train_003.jpg'"]
  elif case == "all_bad":
    devkit, _, _ = _voc_tree(tmp_path, train_ids=12, missing_images=[f"{i:06d}" for i in
                                                                     range(1, 13)])
    flags = ["--config.data.source=voc", f"--config.data.data_dir={devkit}"]
    want = ["shapes:trainval (data.train_split) has no usable examples",
            "12 image file missing", "000001.jpg (image file missing)"]
  else:
    names = [f"{k:03d}.jpg" for k in range(18)]
    _images(tmp_path, names)
    rows = ["image,labels"] + [f"img/{n},circle" for n in names] + [
        "img/gone1.jpg,square", "img/gone2.jpg,circle"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("image,labels\nimg/000.jpg,circle\n")
    flags = ["--config.data.source=list", f"--config.data.data_dir={tmp_path}",
             "--config.data.train_split=train"]
    want = ["2 of 20 examples (10.0%) were skipped", "data.max_skip_fraction = 0.05",
            "--config.data.max_skip_fraction=0.1", "gone1.jpg"]
  wd = tmp_path / "run"
  r = trees.main_cli(wd, "--config.data.name=shapes", *flags, timeout=300)
  assert r.returncode != 0
  for w in want:
    assert w in r.stderr, (w, r.stderr[-3000:])
  assert "Training" not in r.stderr and not (wd / "checkpoints").exists()
