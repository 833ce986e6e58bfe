"""``--mode=predict``: label images from files or folders and draw their attentional regions.

    python -m rma_jax.main --config=configs/demo.py --workdir=/tmp/rma_demo --mode=predict \\
        --inputs=photos/,extra.png --out=/tmp/preds

For each image: the top labels are printed, ``predictions.json`` gets its scores per class,
top labels, the K attentional boxes in pixels of the ORIGINAL image and, for each predicted
label, the region that gave it (``k* = argmax_k s_k^c``, the region whose score the
category-wise max pooling kept; ``rma_jax.regions.pointing_regions``), and ``<name>.png``
shows the boxes in distinct colours, each labelled ``<step>: <the predicted labels it gave>``
(``<step>: (<its top class>)`` in parentheses when it gave none).

Images are read with Pillow in any format and mode it knows (converted to RGB). An image
with more than ``config.data.max_pixels`` pixels is refused from its header, without being
decoded (decompression bombs); a file that cannot be read is named and skipped. Nothing is
skipped silently: ``skipped`` in ``predictions.json`` lists every file that cannot be read,
every entry that is not a regular file (named pipes, sockets, devices: never opened), every
file of a folder without an image extension (``notes.txt``), hidden entries and linked
folders (not searched), missing paths and empty folders. ``predictions.json`` is written even
when a run stops half-way, for the images labelled so far; ``--mode=predict`` exits non-zero
when no image at all was labelled. The images are resized to the single-view size
(``config.data.crop_size``) and scored in fixed-size batches by one jitted function.

The files are read, decoded and resized in ``config.data.num_workers`` worker processes
(``rma_jax.data.pipeline.map_in_workers``, in file order; each also sends the image's size and
the copy its picture is drawn on, so the main process decodes nothing), as training and
evaluation read theirs; with one batch of files or fewer they are read in the main process,
where a worker's start (seconds) would cost more than it saves. The results are the same
either way.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, Iterable, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image

from rma_jax import paths as paths_lib
from rma_jax import (build, context, evaluate, kernels, metrics, regions, trained, views,
                     visualize)
from rma_jax.data import decode, pipeline, preprocess

_DRAW_MAX_SIDE = 1024  # pictures of larger images are drawn on a downscaled copy


def _not_regular(path: str) -> str | None:
  """Why ``path`` must not be opened as an image file, or None for a regular file.

  Only the inode is looked at (``os.stat``): opening a named pipe would block for ever."""
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    return f"cannot be read: {e.strerror}" + (" (a broken link)" if os.path.islink(path) else "")
  if stat.S_ISREG(mode):
    return None
  kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
          else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
  return f"not a regular file ({kind}); not opened"


def list_inputs(inputs: Iterable[str]) -> tuple[list[str], list[dict[str, str]]]:
  """Expands folders (recursively, sorted, files with an image extension Pillow knows) and
  keeps named files as given (any name: Pillow detects the format from the bytes).

  Returns:
    (files to read, skipped): ``skipped`` has a ``{'file', 'reason'}`` for every input or
    folder entry not taken: missing paths, empty folders, entries that are not regular files
    (never opened), files of a folder without an image extension, hidden entries and links
    to folders (not searched).
  """
  exts = {e.lower() for e in Image.registered_extensions()}
  files: list[str] = []
  skipped: list[dict[str, str]] = []

  def skip(path: str, reason: str) -> None:
    skipped.append({"file": path, "reason": reason})

  for item in inputs:
    if os.path.isdir(item):
      found = False
      for root, dirs, names in os.walk(item):
        for d in sorted(dirs):
          if d.startswith("."):
            skip(os.path.join(root, d), "hidden folder; not searched")
          elif os.path.islink(os.path.join(root, d)):
            skip(os.path.join(root, d), "link to a folder; not followed (name it to search it)")
        dirs[:] = sorted(d for d in dirs
                         if not d.startswith(".") and not os.path.islink(os.path.join(root, d)))
        for n in sorted(names):
          path, found = os.path.join(root, n), True
          reason = _not_regular(path)
          if reason is None and n.startswith("."):
            reason = "hidden file; not read (name it to read it)"
          if reason is None and os.path.splitext(n)[1].lower() not in exts:
            reason = ("not an image file name; a folder is searched for the image extensions "
                      "Pillow knows (name the file to read it anyway)")
          if reason is None:
            files.append(path)
          else:
            skip(path, reason)
      if not found:
        skip(item, "empty folder: no file found in it")
    elif not os.path.lexists(item):
      skip(item, "no such file or folder")
    else:
      reason = _not_regular(item)
      if reason is None:
        files.append(item)
      else:
        skip(item, reason)
  return files, skipped


def _unique_png(out_dir: str, path: str, used: set[str]) -> str:
  stem = os.path.splitext(os.path.basename(path))[0] or "image"
  name, i = f"{stem}.png", 1
  while name in used or name == "predictions.json":
    name, i = f"{stem}_{i}.png", i + 1
  used.add(name)
  return os.path.join(out_dir, name)


def _draw_scale(width: int, height: int) -> float:
  return min(1.0, _DRAW_MAX_SIDE / max(height, width))


class _ReadImage:
  """File index -> what labelling it needs (a Grain map function, pickled into the worker
  processes): ``input`` (size, size, 3) uint8, the image as the model sees it
  (``preprocess.eval_transform``); ``width``, ``height``; ``drawn``, the image its picture
  shows, downscaled to at most ``_DRAW_MAX_SIDE`` where regions are drawn on it (``regions``)
  and whole otherwise. ``error``: why the file cannot be read (instead of the rest)."""

  def __init__(self, files: Sequence[str], size: int, max_pixels: int | None, regions: bool):
    self.files, self.size, self.max_pixels, self.regions = list(files), size, max_pixels, \
        regions

  def __call__(self, index: int) -> dict[str, Any]:
    try:
      # The size is read from the header and checked against max_pixels before decoding.
      image = decode.decode_image(self.files[int(index)], max_pixels=self.max_pixels)
    except decode.BadImageError as e:
      return {"error": str(e)}
    h, w = image.shape[:2]
    drawn, scale = image, _draw_scale(w, h)
    if self.regions and scale < 1.0:
      drawn = np.asarray(Image.fromarray(image).resize(
          (max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))
    return {"input": preprocess.eval_transform(image, self.size), "width": w, "height": h,
            "drawn": drawn}


def _picture(drawn: np.ndarray, width: int, height: int, boxes_px: np.ndarray,
             labels: Sequence[str]) -> Image.Image:
  """The regions of a ``width`` x ``height`` image drawn on ``drawn`` (``_ReadImage``'s)."""
  return visualize.draw_regions(Image.fromarray(drawn),
                                np.asarray(boxes_px) * _draw_scale(width, height), labels)


def predict_arrays(fn: Any, variables: Any, inputs: Sequence[np.ndarray], *,
                   batch_size: int) -> dict[str, np.ndarray]:
  """Scores images resized for the model (``preprocess.eval_transform``: (size, size, 3)
  uint8 each) with a jitted single-view function.

  Every batch is padded to ``batch_size`` so ``fn`` compiles once.

  Returns:
    host arrays over the images, e.g. ``scores`` (n, C), ``region_scores`` (n, K, C),
    ``theta`` (n, K+1, 4) for RMA.
  """
  chunks: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(inputs), batch_size):
    part = inputs[start:start + batch_size]
    batch = np.zeros((batch_size, *part[0].shape), np.uint8)
    batch[:len(part)] = np.stack(part)
    out = jax.device_get(fn(variables, batch))
    for k, v in out.items():
      chunks.setdefault(k, []).append(np.asarray(v)[:len(part)])
  return {k: np.concatenate(v) for k, v in chunks.items()}


def run(config: ml_collections.ConfigDict, workdir: str, inputs: Sequence[str], out_dir: str,
        *, which: str = "best", top_k: int | None = None, batch_size: int | None = None,
        params: Any = None) -> dict[str, Any]:
  """Labels images and draws their attentional regions.

  Args:
    config: the run's config (model, data.name for the class names, data.crop_size,
      data.pixel_convention, data.max_pixels, eval.score_transform/top_k/threshold,
      loss.classification for eval.score_transform='auto').
    workdir: the run whose ``which`` checkpoint is loaded (ignored if ``params`` is given):
      its selected parameters (``checkpointing.load_selected_params``; the moving average
      where it won the validation).
    inputs: image files and/or folders.
    out_dir: receives ``predictions.json`` and one PNG per image.
    which: 'best' or 'latest'.
    top_k: labels printed/listed per image (default ``config.eval.top_k`` or 3).
    batch_size: images per jitted call (default ``config.eval.batch_size``).
    params: use these parameters instead of loading a checkpoint (tests, notebooks).

  Returns:
    the dict written to ``predictions.json``: ``checkpoint_step`` and ``ema`` (whether the
    parameters are the moving average), ``images`` (one entry per image read:
    ``file``, ``width``, ``height``, ``scores`` {class: score after score_transform},
    ``raw_scores``, ``top`` [[class, score], ...], ``predicted`` (top-k with score >=
    threshold), RMA only: ``label_regions`` {class: step of the region that gave its score}
    for every class in ``top`` or ``predicted``, ``regions`` [{``step``, ``box`` [x0, y0,
    x1, y1] in original pixels, ``top_class``, ``score``, ``gave`` (the predicted labels
    whose score is this region's)}], and ``picture``) and ``skipped`` [{``file``,
    ``reason``}] (see ``list_inputs``, and every file that could not be decoded). Written
    even when an error stops the run, for the images labelled until then.
  """
  if params is None:
    loaded = trained.load_run(workdir, config, which=which, purpose="predict with")
  else:
    names = context.trained_class_names(config, workdir)
    loaded = trained.TrainedRun(config, build.build_model(config, len(names)), params, names)
  model, params, names = loaded.model, loaded.params, loaded.class_names
  step, ema = loaded.step, loaded.ema
  size = config.data.crop_size
  batch_size = batch_size or config.eval.batch_size
  top_k = top_k or config.eval.get("top_k") or 3
  transform = evaluate.ap_transform(config)
  max_pixels = config.data.get("max_pixels") or None

  paths_lib.path(out_dir).mkdir(parents=True, exist_ok=True)  # local or gs://
  result: dict[str, Any] = {
      "workdir": paths_lib.absolute(workdir) if workdir else None, "checkpoint_step": step,
      "ema": ema,
      "model": config.model.name, "class_names": list(names), "score_transform": transform,
      "input_size": size, "images": [], "skipped": []}
  fn = views.make_scores_fn(model, crop_size=None)
  variables = {"params": params}
  used: set[str] = set()

  def label(paths: list[str], images: list[dict[str, Any]]) -> None:
    out = predict_arrays(fn, variables, [im["input"] for im in images], batch_size=batch_size)
    probs = metrics.score_transform(out["scores"], transform)
    predicted = metrics.predicted_labels(probs, k=top_k, threshold=config.eval.threshold)
    for i, (path, image) in enumerate(zip(paths, images)):
      w, h = image["width"], image["height"]
      order = np.argsort(-probs[i], kind="stable")[:top_k]
      entry = {
          "file": path, "width": int(w), "height": int(h),
          "scores": {n: float(p) for n, p in zip(names, probs[i])},
          "raw_scores": [float(s) for s in out["scores"][i]],
          "top": [[names[c], float(probs[i, c])] for c in order],
          "predicted": [names[c] for c in np.flatnonzero(predicted[i])],
          "regions": [],
      }
      if "theta" in out:
        # The model saw a resized copy; the normalised frame is the whole image either way.
        boxes = visualize.theta_to_pixel_boxes(out["theta"][i, 1:], w, h)
        region_cls = np.argmax(out["region_scores"][i], axis=-1)
        kstar = regions.pointing_regions(out["region_scores"][i:i + 1])[0]  # (C,)
        shown = sorted(set(order.tolist()) | set(np.flatnonzero(predicted[i]).tolist()))
        entry["label_regions"] = {names[c]: int(kstar[c]) + 1 for c in shown}
        for k, (box, c) in enumerate(zip(boxes, region_cls)):
          entry["regions"].append({
              "step": k + 1, "box": [float(v) for v in box], "top_class": names[c],
              "score": float(out["region_scores"][i, k, c]),
              "gave": [n for n in entry["predicted"] if entry["label_regions"][n] == k + 1]})
        picture = _picture(image["drawn"], w, h, boxes, [
            f"{r['step']}: " + (", ".join(r["gave"]) if r["gave"] else f"({r['top_class']})")
            for r in entry["regions"]])
      else:
        picture = Image.fromarray(image["drawn"])
      png = _unique_png(out_dir, path, used)
      with paths_lib.path(png).open("wb") as f:
        picture.save(f, format="PNG")
      entry["picture"] = png
      result["images"].append(entry)
      print(f"{path}: " + ", ".join(f"{n} {p:.3f}" for n, p in entry["top"]))

  files, skipped = list_inputs(inputs)
  result["skipped"] = skipped
  if -(-len(files) // batch_size) >= kernels.MIN_CALLS:
    variables = kernels.prepare_fn(config.model.conv_impl, trunk=config.model.trunk)(variables)
  for s in skipped:
    print(f"skipped {s['file']}: {s['reason']}")
  # Stream: one batch of images is held here, and a few in flight from the workers.
  read = pipeline.map_in_workers(
      _ReadImage(files, size, max_pixels, regions=config.model.name == "rma"), len(files),
      config.data.num_workers if len(files) > batch_size else 0)
  try:
    paths, images = [], []
    for path, image in zip(files, read):
      if "error" in image:
        skipped.append({"file": path, "reason": image["error"]})
        print(f"skipped {path}: {image['error']}")
      else:
        images.append(image)
        paths.append(path)
      if len(images) == batch_size:
        label(paths, images)
        paths, images = [], []
    if images:
      label(paths, images)
  finally:
    read.close()  # the worker processes
    paths_lib.path(os.path.join(out_dir, "predictions.json")).write_text(
        json.dumps(result, indent=2))
  logging.info("predict: %d images labelled, %d inputs skipped; wrote %s",
               len(result["images"]), len(skipped), out_dir)
  if skipped:
    print(f"{len(skipped)} input(s) skipped, listed under 'skipped' in "
          f"{os.path.join(out_dir, 'predictions.json')}")
  return result
