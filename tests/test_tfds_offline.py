"""The real TFDS path, offline: a tiny VOC 2007 written as the two real archives
(VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar: VOCdevkit/VOC2007/...), prepared by
TFDS's own ``voc/2007`` builder as TFRecord and as ArrayRecord, read back through
``data.source=tfds`` and compared with the local reader on the same files, also in Grain
worker processes; then a training run on the TFRecord copy and an evaluation of it on the
ArrayRecord copy, through the CLI.

Where TFDS refuses to run offline, and what the test does instead: the builder downloads its
two archives and checks them against the checksums it ships (``url_checksums/voc.txt``).
Archives in ``manual_dir`` are checked too (``NonMatchingChecksumError``: our archive is not
the real 460 MB one); ``register_checksums=True`` would rewrite that file inside the
installed package (and still downloads what is missing); ``force_checksums_validation`` only
concerns URLs without a checksum. So the test puts the archives in TFDS's download cache
under the names TFDS gives the registered checksums (``resource.get_dl_fname``), with the
``.INFO`` record a download leaves: TFDS then extracts and builds from them itself.
"""

import itertools
import json
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from tensorflow_datasets.core.download import resource as tfds_resource  # noqa: E402

from rma_jax.data import classes, tfds_source, train_batches, voc  # noqa: E402

import data_trees as trees  # noqa: E402

USED = ("bird", "car", "cat", "dog", "person")  # a few of the 20 VOC classes
SPLITS = {"train": [f"{i:06d}" for i in range(1, 7)], "val": [f"{i:06d}" for i in range(7, 13)],
          "test": [f"{i:06d}" for i in range(13, 17)]}
FORMATS = ("tfrecord", "array_record")


def _archives(examples):
  """{archive name: {member: bytes}} in the real VOC 2007 tar layout, class lists included."""
  trainval = {i: examples[i] for i in SPLITS["train"] + SPLITS["val"]}
  test = {i: examples[i] for i in SPLITS["test"]}
  prefix = "VOCdevkit/VOC2007/"
  return {
      "VOCtrainval_06-Nov-2007.tar": trees.voc_files(
          trainval, {"train": SPLITS["train"], "val": SPLITS["val"],
                     "trainval": SPLITS["train"] + SPLITS["val"]},
          class_files=classes.VOC_CLASSES, prefix=prefix),
      "VOCtest_06-Nov-2007.tar": trees.voc_files(
          test, {"test": SPLITS["test"]}, class_files=classes.VOC_CLASSES, prefix=prefix),
  }


def _prepare(data_dir, archives, file_format):
  """Seeds TFDS's download cache with ``archives`` and runs the voc/2007 builder."""
  url_infos = tfds.builder_cls("voc").url_infos
  for fname, members in archives.items():
    url = next(u for u in url_infos if u.endswith("/" + fname))
    info = url_infos[url]
    path = os.path.join(data_dir, "downloads", "voc",
                        tfds_resource.get_dl_fname(url, info.checksum))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    trees.write_tar(path, members)
    with open(path + ".INFO", "w") as f:
      json.dump({"original_fname": fname, "urls": [url], "url_info": info.asdict()}, f)
  builder = tfds.builder("voc/2007", data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare()
  assert builder.info.splits["train"].num_examples == len(SPLITS["train"])
  return builder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds_voc")
  examples = trees.voc_examples(USED, [i for ids in SPLITS.values() for i in ids], seed=5)
  archives = _archives(examples)
  local = root / "local"  # the same files, unpacked for the local reader
  for members in archives.values():
    trees.write_files(str(local), members)
  dirs = {}
  for fmt in FORMATS:
    dirs[fmt] = str(root / fmt)
    builder = _prepare(dirs[fmt], archives, fmt)
    assert builder.info.file_format.value == fmt
  return dict(examples=examples, local=str(local / "VOCdevkit" / "VOC2007"), dirs=dirs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tfds_reads_what_the_local_reader_reads(prepared, fmt):
  for split in ("trainval", "test"):  # trainval = TFDS train+validation
    via_tfds = tfds_source.load_tfds_split("voc2007", split, data_dir=prepared["dirs"][fmt])
    local = voc.load_voc_split(prepared["local"], split)
    assert local.class_names == via_tfds.class_names == classes.VOC_CLASSES
    by_id = {local[i]["id"]: local[i] for i in range(len(local))}
    assert len(via_tfds) == len(local) == len(by_id) and local.skipped.count == 0
    seen = set()
    for i in range(len(via_tfds)):
      ex = via_tfds[i]
      want = by_id[ex["id"]]
      seen.add(ex["id"])
      np.testing.assert_array_equal(ex["labels"], want["labels"])
      np.testing.assert_array_equal(ex["difficult"], want["difficult"])
      np.testing.assert_array_equal(ex["box_labels"], want["box_labels"])
      # TFDS's xmin / W, moved one pixel to the local reader's 0-based (xmin - 1) / W.
      np.testing.assert_allclose(ex["boxes"], want["boxes"], atol=1e-6)
      np.testing.assert_array_equal(ex["image"], want["image"])  # the same JPEG bytes
    assert seen == set(by_id)
  # The comparison means something: difficult-only classes and several labels occur.
  local = voc.load_voc_split(prepared["local"], "trainval")
  assert any(local[i]["difficult"].any() for i in range(len(local)))
  assert any(local[i]["labels"].sum() > 1 for i in range(len(local)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_tfds_sources_read_in_worker_processes(prepared, fmt):
  """A TFDS source travels into Grain's worker processes (pickled with the map function that
  holds it): 2 workers read the batches the main process reads, bitwise, across an epoch."""
  source = tfds_source.load_tfds_split("voc2007", "trainval", data_dir=prepared["dirs"][fmt])
  kw = dict(global_batch_size=4, image_size=32, crop_size=24, seed=3, process_index=0,
            process_count=1)  # 12 images: 3 steps per epoch
  want = list(itertools.islice(train_batches(source, num_workers=0, **kw), 4))
  it = train_batches(source, num_workers=2, **kw)
  got = list(itertools.islice(it, 4))
  it.close()
  assert len(got) == len(want) == 4
  for a, b in zip(want, got):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_cli_trains_on_tfrecord_and_evaluates_on_array_record(prepared, tmp_path):
  wd = tmp_path / "run"
  flags = ["--config.data.name=voc2007", "--config.data.source=tfds",
           "--config.data.train_split=trainval", "--config.data.test_split=test",
           "--config.model.name=baseline", "--config.eval.ap_mode=voc07"]
  r = trees.main_cli(wd, *flags, f"--config.data.data_dir={prepared['dirs']['tfrecord']}")
  assert r.returncode == 0, r.stderr[-3000:]
  with open(wd / "report" / "report.json") as f:
    first = json.load(f)
  assert first["class_names"] == list(classes.VOC_CLASSES)
  assert first["results"]["num_images"] == len(SPLITS["test"])
  r = trees.main_cli(wd, *flags, f"--config.data.data_dir={prepared['dirs']['array_record']}",
                     "--mode=evaluate")
  assert r.returncode == 0, r.stderr[-3000:]
  with open(wd / "report" / "report.json") as f:
    second = json.load(f)
  for name, p in first["results"]["protocols"].items():
    q = second["results"]["protocols"][name]
    for key in ("mAP", "mAP_all", "CP", "CR", "CF1", "OP", "OR", "OF1"):
      assert q[key] == pytest.approx(p[key], abs=1e-6), (name, key)
