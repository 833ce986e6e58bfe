"""Sources: local VOC and COCO trees written here in the real formats, bad files included,
the TFDS feature mapping on real-shaped records (no download), the decoder, the demo set and
the validation done by get_sources."""

import io
import json
import logging
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from rma_jax.data import BadExampleError, BadImageError, decode_image, get_sources
from rma_jax.data import coco, demo, voc



def _rgb(h=40, w=50, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg_bytes(arr, mode=None):
  buf = io.BytesIO()
  img = Image.fromarray(arr)
  if mode:
    img = img.convert(mode)
  img.save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _png_bytes(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


# ---------------------------------------------------------------------------------- VOC tree

# id -> (objects [(name, difficult, (xmin, ymin, xmax, ymax))], image kind). Size 50 x 40.
VOC_TRAINVAL = {
    "000001": ([("dog", 0, (1, 2, 25, 20)), ("person", 1, (10, 10, 50, 40))], "rgb"),
    "000002": ([("cat", 1, (5, 5, 10, 10)), ("cat", 0, (0, 0, 50, 40)),
                ("chair", 1, (20, 20, 30, 30))], "rgb"),
    "000003": ([("car", 0, (5, 5, 45, 35))], "gray"),
    "000004": ([("bus", 0, (5, 5, 45, 35))], "cmyk"),
    "000005": ([("train", 0, (5, 5, 45, 35))], "png"),
    "000006": ([("bird", 0, (5, 5, 45, 35))], "truncated"),
    "000007": ([("boat", 0, (5, 5, 45, 35))], "garbage"),
    "000008": ([("unicorn", 0, (5, 5, 45, 35)), ("dog", 0, (1, 1, 9, 9))], "rgb"),
    "000009": (None, "rgb"),  # listed, no annotation file
    "000010": ([], "rgb"),  # no objects
    "000011": ([("sofa", 0, (5, 5, 45, 35))], None),  # annotation, no image file
}
VOC_TEST = {
    "000012": ([("tvmonitor", 0, (5, 5, 45, 35))], "rgb"),
    "000013": ([("aeroplane", 1, (5, 5, 45, 35))], "rgb"),
    "000014": ([("person", 0, (0, 0, 50, 40)), ("horse", 0, (3, 4, 20, 30))], "rgb"),
}
W, H = 50, 40


def _write_voc_xml(path, objects):
  root = ET.Element("annotation")
  ET.SubElement(root, "filename").text = os.path.basename(path)[:-4] + ".jpg"
  size = ET.SubElement(root, "size")
  ET.SubElement(size, "width").text = str(W)
  ET.SubElement(size, "height").text = str(H)
  ET.SubElement(size, "depth").text = "3"
  for name, difficult, box in objects:
    o = ET.SubElement(root, "object")
    ET.SubElement(o, "name").text = name
    ET.SubElement(o, "pose").text = "Unspecified"
    ET.SubElement(o, "truncated").text = "0"
    ET.SubElement(o, "difficult").text = str(difficult)
    bb = ET.SubElement(o, "bndbox")
    for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
      ET.SubElement(bb, k).text = str(v)
  ET.ElementTree(root).write(path)


def _image_file_bytes(kind, seed):
  arr = _rgb(H, W, seed)
  if kind == "rgb":
    return _jpeg_bytes(arr)
  if kind == "gray":
    return _jpeg_bytes(arr[..., 0])
  if kind == "cmyk":
    return _jpeg_bytes(np.full((H, W, 3), (200, 40, 90), np.uint8), mode="CMYK")
  if kind == "png":
    return _png_bytes(arr)
  if kind == "truncated":
    b = _jpeg_bytes(arr)
    return b[:len(b) // 2]
  if kind == "garbage":
    return b"this is not an image" * 10
  raise ValueError(kind)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("vocdata") / "VOCdevkit" / "VOC2007"
  for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
    (root / sub).mkdir(parents=True)
  for i, (id_, (objects, kind)) in enumerate({**VOC_TRAINVAL, **VOC_TEST}.items()):
    if objects is not None:
      _write_voc_xml(str(root / "Annotations" / f"{id_}.xml"), objects)
    if kind is not None:
      (root / "JPEGImages" / f"{id_}.jpg").write_bytes(_image_file_bytes(kind, i))
  ids = list(VOC_TRAINVAL)
  lists = {"trainval": ids, "train": ids[:5], "val": ids[5:], "test": list(VOC_TEST)}
  for split, split_ids in lists.items():
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(split_ids) + "\n")
  for c in voc.VOC_CLASSES:  # A real VOC tree's per-class lists: it has the 20 VOC classes.
    (root / "ImageSets" / "Main" / f"{c}_trainval.txt").write_text(
        "".join(f"{i} -1\n" for i in ids))
  return root


def _expected_voc(objects):
  names = voc.VOC_CLASSES
  labels = np.zeros(20, np.float32)
  easy = np.zeros(20, bool)
  for name, difficult, _ in objects:
    labels[names.index(name)] = 1
    easy[names.index(name)] |= not difficult
  return labels, (labels > 0) & ~easy


def test_voc_class_order_is_alphabetical_like_tfds():
  assert voc.VOC_CLASSES == tuple(sorted(voc.VOC_CLASSES)) and len(voc.VOC_CLASSES) == 20


def test_voc_local_labels_difficult_boxes_and_bad_files(voc_root, caplog):
  caplog.set_level(logging.WARNING)
  src = voc.load_voc_split(voc.find_voc_root(str(voc_root.parent)), "trainval")
  # Skipped at scan: unknown class (8), missing annotation (9), missing image (11).
  good_ids = ["000001", "000002", "000003", "000004", "000005", "000006", "000007", "000010"]
  assert src.ids() == good_ids and len(src) == 8
  scan = dict(src.skipped.at_scan)
  assert any("000008.xml" in k and "unicorn" in v for k, v in scan.items())
  assert any("000009.xml" in k and "missing" in v for k, v in scan.items())
  assert any("000011.jpg" in k and "missing" in v for k, v in scan.items())
  assert "000008.xml" in caplog.text and "000009.xml" in caplog.text
  assert "000011.jpg" in caplog.text

  for i, id_ in enumerate(good_ids):
    objects, kind = VOC_TRAINVAL[id_]
    if kind in ("truncated", "garbage"):
      caplog.clear()
      with pytest.raises(BadExampleError, match=f"{id_}.jpg"):
        src[i]
      assert f"{id_}.jpg" in caplog.text  # The warning names the file.
      continue
    ex = src[i]
    labels, difficult = _expected_voc(objects)
    np.testing.assert_array_equal(ex["labels"], labels)
    np.testing.assert_array_equal(ex["difficult"], difficult)
    assert ex["id"] == id_ and ex["labels"].dtype == np.float32 and ex["difficult"].dtype == bool
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (H, W, 3)
    # VOC pixels are 1-based and inclusive: xmin=5..xmax=24 is [4, 24) continuous.
    want_boxes = np.clip((np.asarray([b for _, _, b in objects], np.float32).reshape(-1, 4)
                          - [1, 1, 0, 0]) / [W, H, W, H], 0, 1)
    np.testing.assert_allclose(ex["boxes"], want_boxes, atol=1e-6)
    np.testing.assert_array_equal(ex["box_labels"],
                                  [voc.VOC_CLASSES.index(n) for n, _, _ in objects])
    assert ex["box_labels"].dtype == np.int32
  assert src.skipped.count == 5 and len(src.skipped.at_read) == 2
  assert "5 examples skipped" in src.skipped.summary()
  # An image with no objects is kept, all labels zero.
  assert src[good_ids.index("000010")]["labels"].sum() == 0


def test_voc_decodes_gray_cmyk_and_png_named_jpg_to_rgb(voc_root):
  src = voc.load_voc_split(str(voc_root), "train")
  ids = src.ids()
  gray = src[ids.index("000003")]["image"]
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  want_gray = _rgb(H, W, 2)[..., 0].astype(int)  # Written with seed = its position (2).
  assert np.abs(gray[..., 0].astype(int) - want_gray).mean() < 8  # JPEG error only.
  cmyk = src[ids.index("000004")]["image"]
  assert np.abs(cmyk.reshape(-1, 3).mean(0) - (200, 40, 90)).max() < 6
  png = src[ids.index("000005")]["image"]
  np.testing.assert_array_equal(png, _rgb(H, W, 4))  # PNG is lossless: exact.


def test_voc_test_split_and_union(voc_root):
  test = voc.load_voc_split(str(voc_root), "test")
  assert test.ids() == list(VOC_TEST)
  ex = test[1]
  np.testing.assert_array_equal(ex["difficult"], ex["labels"] > 0)  # Only a difficult plane.
  union = voc.load_voc_split(str(voc_root), "train+val")
  assert union.ids() == voc.load_voc_split(str(voc_root), "trainval").ids()


def test_voc_missing_split_list_and_wrong_path(voc_root, tmp_path):
  with pytest.raises(FileNotFoundError, match="nosuchsplit.txt"):
    voc.load_voc_split(str(voc_root), "nosuchsplit")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    voc.find_voc_root(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="not a VOC2007 folder"):
    voc.find_voc_root(str(tmp_path))


def test_max_pixels_refuses_large_images(voc_root, monkeypatch):
  src = voc.load_voc_split(str(voc_root), "test", max_pixels=W * H - 1)
  with pytest.raises(BadExampleError, match="max_pixels"):
    src[0]
  # Pillow's own bomb check (a global limit, restored by monkeypatch) is caught too.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  path = voc_root / "JPEGImages" / "000012.jpg"
  with pytest.raises(BadImageError, match="000012.jpg"):
    decode_image(str(path))


# --------------------------------------------------------------------------------- COCO tree

COCO_CATS = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
             {"id": 7, "name": "train"}, {"id": 3, "name": "car"}]  # Written out of order.


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("coco")
  (root / "annotations").mkdir()
  splits = {
      "train": {
          11: [(1, 0, (10, 5, 20, 10)), (3, 0, (0, 0, 64, 48))],
          12: [(90, 1, (1, 2, 3, 4))],  # crowd: still a label
          13: [],  # no annotations: kept, unlabeled
          14: [(5, 0, (1, 1, 2, 2))],  # unknown category -> skipped
          15: [(7, 0, (1, 1, 2, 2))],  # image file missing -> skipped
          16: [(7, 0, (0, 0, 10, 10))],  # truncated JPEG -> skipped when read
      },
      "val": {21: [(7, 0, (32, 24, 32, 24))], 22: [(1, 0, (0, 0, 1, 1))]},
  }
  ann_id = 0
  for split, images in splits.items():
    (root / f"{split}2014").mkdir()
    data = {"images": [], "annotations": [], "categories": COCO_CATS}
    for image_id, anns in images.items():
      fname = f"COCO_{split}2014_{image_id:012d}.jpg"
      data["images"].append({"id": image_id, "file_name": fname, "width": 64, "height": 48})
      if image_id != 15:
        b = _jpeg_bytes(_rgb(48, 64, image_id))
        (root / f"{split}2014" / fname).write_bytes(b[:len(b) // 2] if image_id == 16 else b)
      for cat, crowd, bbox in anns:
        ann_id += 1
        data["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": cat,
                                    "iscrowd": crowd, "bbox": list(bbox), "area": 1.0})
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
  return root


def test_coco_local_class_order_labels_and_bad_files(coco_root, caplog):
  caplog.set_level(logging.WARNING)
  src = coco.load_coco_split(str(coco_root), "train")
  assert src.class_names == ("person", "car", "train", "toothbrush")  # category-id order
  # Ids are the image files (two JSONs may both number their images from 1).
  assert src.ids() == [str(coco_root / "train2014" / f"COCO_train2014_{i:012d}.jpg")
                       for i in (11, 12, 13, 16)]
  assert "000000000014.jpg" in caplog.text and "000000000015.jpg" in caplog.text
  ex = src[0]
  np.testing.assert_array_equal(ex["labels"], [1, 1, 0, 0])
  np.testing.assert_array_equal(ex["box_labels"], [0, 1])
  np.testing.assert_allclose(ex["boxes"], [[10 / 64, 5 / 48, 30 / 64, 15 / 48], [0, 0, 1, 1]],
                             atol=1e-6)
  assert not ex["difficult"].any() and ex["image"].shape == (48, 64, 3)
  np.testing.assert_array_equal(src[1]["labels"], [0, 0, 0, 1])  # the crowd annotation
  assert src[2]["labels"].sum() == 0 and src[2]["boxes"].shape == (0, 4)
  with pytest.raises(BadExampleError, match="000000000016.jpg"):
    src[3]
  assert src.skipped.count == 3
  val = coco.load_coco_split(str(coco_root), "validation")
  assert [os.path.basename(i) for i in val.ids()] == [
      "COCO_val2014_000000000021.jpg", "COCO_val2014_000000000022.jpg"]
  assert val.class_names == src.class_names


def test_coco_names_match_tfds_order():
  assert len(coco.COCO_CLASSES) == 80 and coco.COCO_CLASSES[:3] == ("person", "bicycle", "car")
  assert coco.COCO_CLASSES[-1] == "toothbrush"


def test_coco_missing_paths(coco_root, tmp_path):
  with pytest.raises(FileNotFoundError, match="instances_test2014.json"):
    coco.load_coco_split(str(coco_root), "test")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
    coco.load_coco_split(str(tmp_path / "absent"), "train")


# ------------------------------------------------------------------------------ get_sources

def _data_config(**kw):
  from rma_jax.configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config().data
  c.max_skip_fraction = 1.0  # the trees above hold bad files on purpose
  c.update(kw)
  return c


def test_get_sources_voc_local_val_slice_and_errors(voc_root, tmp_path):
  cfg = _data_config(source="local", data_dir=str(voc_root), val_fraction=0.25)
  s = get_sources(cfg, seed=3)
  assert s.class_names == voc.VOC_CLASSES
  assert len(s.train) + len(s.val) == 8 and len(s.val) == 2
  assert s.train.skipped.count == 3 and s.val.skipped.count == 0  # scan skips counted once
  assert not set(s.train.ids()) & set(s.val.ids())
  assert s.test.ids() == list(VOC_TEST)
  assert get_sources(cfg, seed=3).val.ids() == s.val.ids()  # deterministic per seed
  assert any(get_sources(cfg, seed=k).val.ids() != s.val.ids() for k in range(4, 10))
  # Reading through a held-out view gives the parent's example.
  assert s.val[0]["id"] == s.val.ids()[0]

  s2 = get_sources(_data_config(source="local", data_dir=str(voc_root), train_split="train",
                                val_split="val"), seed=0)
  assert s2.val.ids() == ["000006", "000007", "000010"]  # 8, 9, 11 skipped at scan
  with pytest.raises(ValueError, match="share"):  # val inside trainval
    get_sources(_data_config(source="local", data_dir=str(voc_root), val_split="val"), seed=0)
  with pytest.raises(ValueError, match="test split"):
    get_sources(_data_config(source="local", data_dir=str(voc_root), val_split="test"), seed=0)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
    get_sources(_data_config(source="local", data_dir=str(tmp_path / "missing")), seed=0)
  with pytest.raises(FileNotFoundError, match="bogus.txt"):
    get_sources(_data_config(source="local", data_dir=str(voc_root), test_split="bogus"), seed=0)
  with pytest.raises(ValueError, match="data.name"):
    get_sources(_data_config(name="imagenet"), seed=0)
  with pytest.raises(ValueError, match="goes with data.source='demo'"):
    get_sources(_data_config(name="demo", source="local"), seed=0)


def test_get_sources_coco_local(coco_root):
  s = get_sources(_data_config(name="coco2014", source="local", data_dir=str(coco_root),
                               train_split="train", test_split="val", val_fraction=0.25),
                  seed=0)
  assert s.class_names == ("person", "car", "train", "toothbrush")
  assert len(s.train) == 3 and len(s.val) == 1
  assert [os.path.basename(i)[-6:-4] for i in s.test.ids()] == ["21", "22"]


def test_get_sources_tfds_missing_data_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
    get_sources(_data_config(source="tfds", data_dir=str(tmp_path / "nope")), seed=0)
  # An existing but empty data_dir: not prepared, and nothing is downloaded.
  with pytest.raises(FileNotFoundError, match="tfds build voc/2007"):
    get_sources(_data_config(source="tfds", data_dir=str(tmp_path)), seed=0)
  assert not any(p.is_file() for p in tmp_path.rglob("*"))


# ------------------------------------------------------------------------------------- TFDS

def _tfds_voc_example():
  return {
      "image": _jpeg_bytes(_rgb(40, 50, 7)),
      "image/filename": b"000042.jpg",
      "labels": np.array([1, 14], np.int64),  # bicycle (difficult only), person
      "labels_no_difficult": np.array([14], np.int64),
      "objects/label": np.array([14, 1, 14], np.int64),
      "objects/bbox": np.array([[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1], [0.2, 0.3, 0.4, 0.9]],
                               np.float32),  # (ymin, xmin, ymax, xmax)
      "objects/is_difficult": np.array([False, True, True]),
      "objects/is_truncated": np.array([False, False, True]),
      "objects/pose": np.array([0, 1, 4], np.int64),
  }


def test_voc_tfds_mapping_on_flat_and_nested_examples():
  from rma_jax.data.tfds_source import voc_example_from_tfds  # pylint: disable=g-import-not-at-top
  flat = _tfds_voc_example()
  nested = {k: v for k, v in flat.items() if not k.startswith("objects/")}
  nested["objects"] = {k[8:]: v for k, v in flat.items() if k.startswith("objects/")}
  for example in (flat, nested):
    ex = voc_example_from_tfds(example)
    want = np.zeros(20, np.float32)
    want[[1, 14]] = 1
    np.testing.assert_array_equal(ex["labels"], want)
    np.testing.assert_array_equal(np.flatnonzero(ex["difficult"]), [1])
    np.testing.assert_allclose(ex["boxes"], [[0.2, 0.1, 0.6, 0.5], [0, 0, 1, 1],
                                             [0.3, 0.2, 0.9, 0.4]])
    np.testing.assert_array_equal(ex["box_labels"], [14, 1, 14])
    assert ex["id"] == "000042"


def test_coco_tfds_mapping():
  from rma_jax.data.tfds_source import coco_example_from_tfds  # pylint: disable=g-import-not-at-top
  ex = coco_example_from_tfds({
      "image": b"", "image/id": np.int64(139), "image/filename": b"COCO_val2014_139.jpg",
      "objects": {"label": np.array([0, 79, 0]), "bbox": np.zeros((3, 4), np.float32),
                  "is_crowd": np.array([False, True, False]), "area": np.ones(3, np.int64),
                  "id": np.arange(3)}})
  assert ex["id"] == "139" and np.flatnonzero(ex["labels"]).tolist() == [0, 79]
  assert ex["labels"].shape == (80,) and not ex["difficult"].any()
  empty = coco_example_from_tfds({"image": b"", "image/id": 5,
                                  "objects": {"label": np.zeros(0, np.int64),
                                              "bbox": np.zeros((0, 4), np.float32)}})
  assert empty["labels"].sum() == 0 and empty["boxes"].shape == (0, 4)


def test_tfds_records_read_by_offset_and_deserialized_without_download(tmp_path):
  """Real voc/2007 features (offline builder info) -> serialized records in TFRecord files ->
  random access through the offset index -> the model's example dict."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from rma_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  features = tfds.builder("voc/2007", data_dir=str(tmp_path)).info.features
  examples = []
  for k in range(5):
    img = _rgb(30 + k, 20, k)
    examples.append({"image": img, "image/filename": f"{k:06d}.jpg",
                     "objects": {"label": [k], "bbox": np.array([[0.1, 0.2, 0.3, 0.4]],
                                                                np.float32),
                                 "pose": [0], "is_truncated": [False],
                                 "is_difficult": [k % 2 == 1]},
                     "labels": [k], "labels_no_difficult": [] if k % 2 else [k]})
  files = [str(tmp_path / "voc-train.tfrecord-00000"), str(tmp_path / "voc-train.tfrecord-00001")]
  for path, chunk in ((files[0], examples[:3]), (files[1], examples[3:])):
    with tf.io.TFRecordWriter(path) as w:
      for ex in chunk:
        w.write(features.serialize_example(ex))

  class FI:  # Shaped like tfds FileInstruction.
    def __init__(self, filename, skip, take):
      self.filename, self.skip, self.take = filename, skip, take

  index = tfds_source.TFRecordIndex([FI(files[0], 1, 2), FI(files[1], 0, -1)])
  assert len(index) == 4
  src = tfds_source.TfdsSource("voc2007:test", index, features,
                               tfds_source.voc_example_from_tfds, voc.VOC_CLASSES)
  for i, k in enumerate([1, 2, 3, 4]):
    ex = src[i]
    assert ex["id"] == f"{k:06d}"
    np.testing.assert_array_equal(ex["image"], examples[k]["image"])  # TFDS stores PNG
    assert np.flatnonzero(ex["labels"]).tolist() == [k]
    assert ex["difficult"][k] == (k % 2 == 1)
    # TFDS stores xmin / W of the 1-based VOC pixel; the source moves the left and top edges
    # one pixel back to the local reader's 0-based frame (the image is 20 x (30 + k)).
    np.testing.assert_allclose(ex["boxes"], [[0.2 - 1 / 20, 0.1 - 1 / (30 + k), 0.4, 0.3]],
                               rtol=1e-6)


# ------------------------------------------------------------------------------------- demo

def test_demo_is_deterministic_disjoint_and_consistent():
  a = demo.make_demo_split("train", 40, seed=1)
  b = demo.make_demo_split("train", 40, seed=1)
  c = demo.make_demo_split("train", 40, seed=2)
  for i in range(40):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
  assert any((a[i]["image"] != c[i]["image"]).any() for i in range(40))
  pools = [set(demo.digit_pool(s, seed=1).tolist()) for s in ("train", "val", "test")]
  assert not (pools[0] & pools[1] or pools[0] & pools[2] or pools[1] & pools[2])
  assert sum(map(len, pools)) == 1797
  counts = []
  for i in range(40):
    ex = a[i]
    assert ex["image"].shape == (96, 96, 3) and ex["image"].dtype == np.uint8
    k = len(ex["box_labels"])
    counts.append(k)
    assert 1 <= k <= 4
    want = np.zeros(10, np.float32)
    want[ex["box_labels"]] = 1
    np.testing.assert_array_equal(ex["labels"], want)
    px = ex["boxes"] * 96
    sizes = px[:, 2] - px[:, 0]
    assert ((sizes >= 20) & (sizes <= 40)).all()
    np.testing.assert_allclose(sizes, px[:, 3] - px[:, 1])
    for box in px.astype(int):  # A bright digit inside every box, a dark background.
      assert ex["image"][box[1]:box[3], box[0]:box[2]].max() > 140
    mask = np.ones((96, 96), bool)
    for box in px.astype(int):
      mask[box[1]:box[3], box[0]:box[2]] = False
    assert ex["image"][mask].max() <= 55
  assert set(counts) >= {1, 2, 3, 4}


def test_demo_via_get_sources():
  cfg = _data_config(name="demo", source="demo")
  cfg.demo.update(num_train=30, num_val=10, num_test=20, canvas_size=64)
  s = get_sources(cfg, seed=0)
  assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 20)
  assert s.class_names == tuple("0123456789") and s.test[0]["image"].shape == (64, 64, 3)


def test_importing_the_pipeline_does_not_import_tensorflow():
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  code = ("import sys, rma_jax.data, rma_jax.data.pipeline, rma_jax.data.demo, "
          "rma_jax.data.voc, rma_jax.data.coco, rma_jax.data.tfds_source\n"
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]\n"
          "assert not bad, bad\nprint('OK')")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
