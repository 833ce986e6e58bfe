"""Evaluation as in the paper (§5.1-5.3, SPEC §4): single view, ten-view on the conv5_3 map,
multi-scale fusion, the optional LIBLINEAR SVM head, attention recall, the pointing game, and
the report.

Ten-view evaluation does not run the trunk ten times. The image is resized to N x N, the
trunk runs **once** per image, and its conv5_3 map (N/16 x N/16) is cropped at the four
corners and the centre to the patch size ``crop_size / 16`` and each crop is flipped
horizontally. The ten maps are stacked along the batch axis and the attention module runs
on all of them in one call; its scores are max-pooled over regions (inside the model, Eq. 6)
and averaged over the ten views. Everything from uint8 pixels to the averaged scores is one
jitted function per batch.

**What is averaged.** ``ten_view_scores`` averages the *raw* scores of the ten views; the
metrics' ``config.eval.score_transform`` (a softmax by default) is applied afterwards, to the
average. For a softmax this is the normalised geometric mean of the views' probabilities.
Scales are fused the same way (mean of the raw ten-view scores of each scale). The SVM
head's image representation is the view-averaged max-pooled region feature ``z``, exactly as
the paper describes.

View order (index ``v`` of ``view_scores`` / ``theta``): 0 top-left, 1 top-right,
2 bottom-left, 3 bottom-right, 4 centre, then 5..9 the same five crops flipped horizontally.
The regions ``theta`` of a view are in the [-1, 1] frame of that view's (flipped) crop.

Nothing here imports TensorFlow: the input pipeline is imported inside
``evaluate_and_report``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections import deque
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from rma_jax import models

NUM_VIEWS = 10
VIEW_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "centre",
              "top_left_flip", "top_right_flip", "bottom_left_flip", "bottom_right_flip",
              "centre_flip")


# --------------------------------------------------------------------------- views


def view_offsets(map_h: int, map_w: int, patch_h: int, patch_w: int
                 ) -> tuple[tuple[int, int], ...]:
  """(y0, x0) of the five crops of a map: the four corners and the centre.

  The centre offset is rounded down when the margin is odd (it never is when N and N-64
  are multiples of 32; with multiples of 16 the margin (N - crop)/16 can be odd).
  """
  if not (0 < patch_h <= map_h and 0 < patch_w <= map_w):
    raise ValueError(f"patch {patch_h}x{patch_w} does not fit in the map {map_h}x{map_w}")
  dy, dx = map_h - patch_h, map_w - patch_w
  return ((0, 0), (0, dx), (dy, 0), (dy, dx), (dy // 2, dx // 2))


def crop_views(fmap: jax.Array, patch: int | tuple[int, int]) -> jax.Array:
  """The ten views of a feature map: 5 crops and their horizontal flips.

  Args:
    fmap: (B, H, W, C) conv5_3 maps.
    patch: crop size on the map (``crop_size // 16``), an int or (h, w).

  Returns:
    (10, B, h, w, C) in the order of ``VIEW_NAMES``.
  """
  ph, pw = (patch, patch) if isinstance(patch, int) else patch
  _, h, w, _ = fmap.shape
  crops = [fmap[:, y:y + ph, x:x + pw] for y, x in view_offsets(h, w, ph, pw)]
  crops += [c[:, :, ::-1] for c in crops]  # horizontal flip = reverse the width axis
  return jnp.stack(crops, axis=0)


# --------------------------------------------------------------------------- model pieces


def _normalize(images: jax.Array, pixel_convention: str | None) -> jax.Array:
  if pixel_convention is None:
    return images
  from rma_jax.data import preprocess  # pure jnp, TF-free
  return preprocess.normalize(images, pixel_convention)


def trunk_features(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
  """(B, H, W, 3) normalised images -> (B, H/16, W/16, C') conv5_3 map (``model.features``)."""
  return model.apply(variables, images, method="features")


def head_outputs(model: nn.Module, variables: Any, fmaps: jax.Array,
                 return_features: bool = False) -> dict[str, jax.Array]:
  """Runs everything after the trunk on (B, h, w, C') maps (``model.classify``).

  Returns ``scores`` (B, C); for RMA also ``region_scores`` (B, K, C) and ``theta``
  (B, K+1, 4); with ``return_features`` also ``features`` (B, D): the region features ``z``
  max-pooled over the K regions (RMA, D = z_dim) or the map pooled as the baseline's head
  pools it (``model.head_pool``; D = C').
  """
  return dict(model.apply(variables, fmaps, return_features, method="classify"))


def single_view_scores(model: nn.Module, variables: Any, images: jax.Array, *,
                       pixel_convention: str | None = None,
                       return_features: bool = False) -> dict[str, jax.Array]:
  """Scores whole images (resized to the single-view size, e.g. N - 64).

  Args:
    model: ``RMA`` or the ``VGG16`` baseline (with ``num_classes``).
    variables: ``{'params': ...}``.
    images: (B, S, S, 3), uint8 when ``pixel_convention`` is given (normalised here, on
      device), else already-normalised floats.
    pixel_convention: 'caffe' | 'torch' | 'unit', or None.
    return_features: also return ``features`` (see ``head_outputs``).

  Returns:
    ``scores`` (B, C) raw scores; RMA: ``region_scores`` (B, K, C), ``theta`` (B, K+1, 4);
    optionally ``features`` (B, D).
  """
  fmap = trunk_features(model, variables, _normalize(images, pixel_convention))
  return head_outputs(model, variables, fmap, return_features)


def ten_view_scores(model: nn.Module, variables: Any, images: jax.Array, *, crop_size: int,
                    pixel_convention: str | None = None,
                    return_features: bool = False) -> dict[str, jax.Array]:
  """Ten-view scores from one trunk pass per image (paper §5.1, SPEC §4).

  Jittable; ``model``, ``crop_size``, ``pixel_convention`` and ``return_features`` are
  static (see ``make_scores_fn``).

  Args:
    model: ``RMA`` or the ``VGG16`` baseline (with ``num_classes``).
    variables: ``{'params': ...}``.
    images: (B, N, N, 3), uint8 when ``pixel_convention`` is given, else normalised floats.
    crop_size: the patch size in pixels (N - 64 in the paper); a multiple of 16.
    pixel_convention: 'caffe' | 'torch' | 'unit', or None.
    return_features: also return ``features``.

  Returns:
    dict with ``scores`` (B, C): the mean over the ten views of the raw scores (each view's
    scores are already max-pooled over regions); ``view_scores`` (B, 10, C); RMA only:
    ``theta`` (B, 10, K+1, 4) per view, in the view's own frame; with ``return_features``:
    ``features`` (B, D), the view-averaged max-pooled region features (the SVM input).
  """
  if crop_size % models.VGG16_STRIDE:
    raise ValueError(f"crop_size={crop_size} must be a multiple of {models.VGG16_STRIDE}")
  batch = images.shape[0]
  fmap = trunk_features(model, variables, _normalize(images, pixel_convention))
  views = crop_views(fmap, crop_size // models.VGG16_STRIDE)  # (10, B, p, p, C')
  # One attention call on all views: the batch axis is (view, image), view-major.
  out = head_outputs(model, variables, views.reshape(NUM_VIEWS * batch, *views.shape[2:]),
                     return_features)
  per_view = {k: jnp.swapaxes(v.reshape(NUM_VIEWS, batch, *v.shape[1:]), 0, 1)
              for k, v in out.items()}  # (B, 10, ...)
  result = {"scores": jnp.mean(per_view["scores"], axis=1), "view_scores": per_view["scores"]}
  if "theta" in per_view:
    result["theta"] = per_view["theta"]
  if return_features:
    result["features"] = jnp.mean(per_view["features"], axis=1)
  return result


def make_scores_fn(model: nn.Module, *, crop_size: int | None, pixel_convention: str | None,
                   return_features: bool = False, mesh: Mesh | None = None) -> Callable:
  """``fn(variables, images) -> dict``: single view (``crop_size=None``) or ten-view, jitted
  once; with a mesh, variables replicated and the batch sharded over ``data``."""
  if crop_size is None:
    fn = functools.partial(single_view_scores, model, pixel_convention=pixel_convention,
                           return_features=return_features)
  else:
    fn = functools.partial(ten_view_scores, model, crop_size=crop_size,
                           pixel_convention=pixel_convention, return_features=return_features)
  if mesh is None:
    return jax.jit(fn)
  return jax.jit(fn, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
                 out_shardings=NamedSharding(mesh, P("data")))


def fuse_scales(per_scale: Sequence[dict[str, np.ndarray]],
                keys: Sequence[str] = ("scores", "features")) -> dict[str, np.ndarray]:
  """Multi-scale fusion: the mean over scales of each of ``keys`` present in every entry."""
  if not per_scale:
    raise ValueError("fuse_scales needs at least one scale")
  return {k: np.mean([np.asarray(p[k]) for p in per_scale], axis=0)
          for k in keys if all(k in p for p in per_scale)}


# --------------------------------------------------------------------------- SVM head


@dataclasses.dataclass
class SVMHead:
  """One-vs-rest linear SVMs (LIBLINEAR) on image features.

  Attributes:
    coef: (C, D) weights; intercept: (C,); C: the chosen regularisation constant;
    val_map: mAP (all-point) on the validation data for every C tried;
    normalize: whether features are L2-normalised before the SVM.
  """
  coef: np.ndarray
  intercept: np.ndarray
  C: float
  val_map: dict[float, float]
  normalize: bool = True


def _l2(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _fit_ovr(feats: np.ndarray, labels: np.ndarray, C: float, max_iter: int
             ) -> tuple[np.ndarray, np.ndarray]:
  from sklearn.svm import LinearSVC
  y = np.asarray(labels) > 0
  coef = np.zeros((y.shape[1], feats.shape[1]))
  intercept = np.zeros(y.shape[1])
  for c in range(y.shape[1]):
    if y[:, c].all() or not y[:, c].any():
      # One value only: no hyperplane to fit; a constant score (+1 / -1) ranks nothing.
      intercept[c] = 1.0 if y[:, c].all() else -1.0
      continue
    svm = LinearSVC(C=C, loss="squared_hinge", dual="auto", max_iter=max_iter)
    svm.fit(feats, y[:, c])
    coef[c], intercept[c] = svm.coef_[0], svm.intercept_[0]
  return coef, intercept


def fit_svm_head(train_feats: Any, train_labels: Any, val_feats: Any, val_labels: Any,
                 Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), *, normalize: bool = True,
                 val_ignore: Any = None, max_iter: int = 5000) -> SVMHead:
  """Fits one ``sklearn.svm.LinearSVC`` (LIBLINEAR) per class, C chosen on validation mAP.

  The paper (§5.1) trains one-vs-rest SVMs with LIBLINEAR on the view-averaged features and
  does not give C; we try each of ``Cs``, keep the one with the best validation mAP
  (all-point AP; the first of equal ones), and refit on train with it.

  Args:
    train_feats, val_feats: (N, D) features (``ten_view_scores(..., return_features=True)``).
    train_labels, val_labels: (N, C) {0, 1}.
    Cs: the grid of C values.
    normalize: L2-normalise features first (the usual practice with linear SVMs on CNN
      features; scores then do not depend on the feature scale).
    val_ignore: optional (N_val, C) bool pairs ignored in the validation mAP (VOC difficult).
    max_iter: LIBLINEAR iterations.

  Returns:
    an ``SVMHead``; score images with ``svm_scores``.
  """
  from rma_jax import metrics
  prep = _l2 if normalize else (lambda x: np.asarray(x, np.float64))
  xt, xv = prep(train_feats), prep(val_feats)
  val_map: dict[float, float] = {}
  best = None
  for C in Cs:
    coef, b = _fit_ovr(xt, train_labels, float(C), max_iter)
    m = metrics.mean_average_precision(xv @ coef.T + b, val_labels, val_ignore, mode="all")
    val_map[float(C)] = float(m)
    if best is None or (np.isfinite(m) and not m <= best[0]):
      best = (m, float(C), coef, b)
  _, C, coef, b = best
  return SVMHead(coef=coef, intercept=b, C=C, val_map=val_map, normalize=normalize)


def svm_scores(head: SVMHead, feats: Any) -> np.ndarray:
  """(N, D) features -> (N, C) SVM decision values (signed distances; 0 = the boundary)."""
  x = _l2(feats) if head.normalize else np.asarray(feats, np.float64)
  return x @ head.coef.T + head.intercept


# --------------------------------------------------------------------------- data passes

ID_BYTES = 256


def encode_ids(ids: Sequence[str]) -> np.ndarray:
  """Example ids as a (b, ID_BYTES) uint8 array (UTF-8, zero-padded), so that they travel
  with the other per-image arrays, across processes too."""
  out = np.zeros((len(ids), ID_BYTES), np.uint8)
  for i, s in enumerate(ids):
    raw = str(s).encode("utf-8")
    if len(raw) > ID_BYTES:
      raise ValueError(f"example id {str(s)[:40]!r}... is {len(raw)} bytes long; "
                       f"evaluation keeps ids of up to {ID_BYTES} bytes")
    out[i, :len(raw)] = np.frombuffer(raw, np.uint8)
  return out


def decode_ids(encoded: np.ndarray) -> np.ndarray:
  """Inverse of ``encode_ids``: (b,) str array."""
  return np.asarray([bytes(row).rstrip(b"\0").decode("utf-8") for row in encoded], dtype=str)



def _to_host(x: Any) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def score_source(fn: Callable, variables: Any, source: Any, *, image_size: int,
                 batch_size: int, mesh: Mesh, num_workers: int = 2, prefetch: int = 2,
                 desc: str = "eval") -> dict[str, np.ndarray]:
  """Runs a jitted ``make_scores_fn`` over a whole split.

  Returns host arrays over the real (unpadded) images, in split order: the model outputs
  (``scores``, ``theta``, ``features``, ... as produced) and ``labels`` (N, C),
  ``difficult`` (N, C) bool, ``boxes`` (N, M, 4), ``box_labels`` (N, M) int (-1 = padding)
  and ``box_mask`` (N, M) (``box_labels >= 0``) when the batches carry boxes, ``index`` (N,)
  (the position in ``source``) and ``id`` (N,) str, the examples' ids.
  """
  from rma_jax import data as data_lib
  sharding = NamedSharding(mesh, P("data"))
  meta: deque = deque()

  def images_only() -> Iterator[dict[str, np.ndarray]]:
    # Only pixels go to the devices; labels and boxes stay on the host, in order (FIFO).
    for batch in data_lib.eval_batches(source, global_batch_size=batch_size,
                                       image_size=image_size, num_workers=num_workers):
      # ``id`` (a list of str) travels as bytes: only arrays are gathered across processes.
      m = {k: np.asarray(v) for k, v in batch.items() if k not in ("image", "id")}
      meta.append(dict(m, id=encode_ids(batch["id"])))
      yield {"image": batch["image"]}

  total = math.ceil(len(source) / batch_size)
  chunks: dict[str, list[np.ndarray]] = {}
  batches = data_lib.device_put_batches(images_only(), sharding, prefetch)
  try:
    from tqdm import tqdm
    batches = tqdm(batches, total=total, desc=desc, disable=jax.process_index() > 0,
                   leave=False)
  except ImportError:
    pass
  for i, batch in enumerate(batches):
    out = fn(variables, batch["image"])
    host = {k: _to_host(v) for k, v in out.items()}
    m = meta.popleft()
    if jax.process_count() > 1:
      m = {k: _to_host(v) for k, v in m.items()}
    keep = np.asarray(m["mask"]) > 0
    for k, v in host.items():
      chunks.setdefault(k, []).append(v[keep])
    chunks.setdefault("labels", []).append(np.asarray(m["labels"])[keep])
    chunks.setdefault("difficult", []).append(np.asarray(m["difficult"]).astype(bool)[keep])
    chunks.setdefault("index", []).append(np.asarray(m["index"])[keep])
    chunks.setdefault("id", []).append(decode_ids(np.asarray(m["id"])[keep]))
    if "boxes" in m and "box_labels" in m:
      box_labels = np.asarray(m["box_labels"])[keep]
      chunks.setdefault("boxes", []).append(np.asarray(m["boxes"])[keep])
      chunks.setdefault("box_labels", []).append(box_labels)
      chunks.setdefault("box_mask", []).append(box_labels >= 0)
    if (i + 1) % 50 == 0:
      logging.info("%s: %d / %d batches", desc, i + 1, total)
  if not chunks or not sum(len(v) for v in chunks["index"]):
    raise ValueError(f"{desc}: 0 of {len(source)} images of {source.name} could be scored; "
                     f"no metric can be computed. {source.skipped.summary()}")
  out = {}
  for k, v in chunks.items():
    if k in ("boxes", "box_labels", "box_mask"):
      # Padded to each batch's own max boxes: pad to the max (box_labels with -1).
      m_max = max(a.shape[1] for a in v)
      v = [np.pad(a, [(0, 0), (0, m_max - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                  constant_values=-1 if k == "box_labels" else 0) for a in v]
    out[k] = np.concatenate(v, axis=0)
  return out


def prf_transform(config: Any) -> str:
  """The scale CP…OF1 are thresholded on (``config.eval.prf_score_transform``); 'auto':
  ``softmax_max`` after the softmax-Euclidean loss, ``sigmoid`` after sigmoid_bce."""
  kind = config.eval.get("prf_score_transform", "auto")
  if kind != "auto":
    return kind
  return "sigmoid" if config.loss.classification == "sigmoid_bce" else "softmax_max"


def compute_metrics(scores: np.ndarray, labels: np.ndarray, difficult: np.ndarray | None, *,
                    ap_mode: str, k: int | None, threshold: float,
                    transform: str, prf: str | None = None) -> dict[str, Any]:
  """All numbers of one protocol (``rma_jax.metrics``), VOC difficult pairs ignored."""
  from rma_jax import metrics
  collected = metrics.MultiLabelMetrics.empty().update(
      scores=scores, labels=labels, ignore=difficult)
  out = collected.compute(ap_mode=ap_mode, k=k, threshold=threshold,
                          score_transform=transform, prf_score_transform=prf)
  return {k_: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v)
          for k_, v in out.items()}


def attention_recalls(theta: np.ndarray, boxes: np.ndarray, box_mask: np.ndarray,
                      num_regions: int) -> dict[str, float]:
  """Attention recall of the model's K regions and of K fixed boxes at the anchors.

  Args:
    theta: (N, K+1, 4) single-view transforms (index 0 the identity, dropped here).
    boxes: (N, M, 4) ground-truth boxes in [0, 1]; box_mask (N, M).
    num_regions: K.
  """
  from rma_jax import metrics
  fixed = np.broadcast_to(models.fixed_region_thetas(num_regions)[1:],
                          (theta.shape[0], num_regions, 4))
  return {"model_regions": metrics.attention_recall(theta[:, 1:], boxes, box_mask),
          "fixed_anchor_boxes": metrics.attention_recall(fixed, boxes, box_mask)}


POINTING_CHANCE_SEED = 0
POINTING_CHANCE_DRAWS = 10


def pointing_scores(scored: Mapping[str, np.ndarray], *, seed: int = POINTING_CHANCE_SEED,
                    num_draws: int = POINTING_CHANCE_DRAWS) -> dict[str, dict[str, Any]]:
  """The pointing game (``metrics.pointing_game``) of a single-view pass, with its chance
  control (``metrics.pointing_chance``: the same regions' sizes at random places).

  Args:
    scored: a ``score_source`` result of an RMA model on data with boxes:
      ``region_scores`` (N, K, C), ``theta`` (N, K+1, 4), ``labels``, ``difficult``,
      ``boxes``, ``box_labels``.
    seed, num_draws: of the chance control.

  Returns:
    ``{"model_regions": ..., "chance": ...}``, each a ``pointing_game`` dict.
  """
  from rma_jax import metrics
  args = (scored["region_scores"], scored["theta"][:, 1:], scored["labels"], scored["boxes"],
          scored["box_labels"], scored["difficult"])
  return {"model_regions": metrics.pointing_game(*args),
          "chance": metrics.pointing_chance(*args, seed=seed, num_draws=num_draws)}


# --------------------------------------------------------------------------- the report


def _scales(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
  """(N, crop) per evaluation scale, keeping the config's image_size - crop_size offset."""
  offset = config.data.image_size - config.data.crop_size
  scales = list(config.eval.get("scales", ()) or (config.data.image_size,))
  out = []
  for n in scales:
    n = int(n)
    crop = n - offset
    if crop <= 0 or crop % models.VGG16_STRIDE or n % models.VGG16_STRIDE:
      raise ValueError(f"eval.scales entry {n}: N and N - {offset} must be positive "
                       f"multiples of {models.VGG16_STRIDE}")
    out.append((n, crop))
  return out


def evaluate_and_report(config: ml_collections.ConfigDict, workdir: str, *,
                        which: str = "best", split: str = "test") -> dict[str, Any]:
  """Evaluates a run's checkpoint on a split and writes WORKDIR/report/.

  Protocols (each with every metric of ``rma_jax.metrics``; scores after
  ``config.eval.score_transform``; AP in ``config.eval.ap_mode`` with the other variant
  reported too; VOC difficult pairs ignored):

  * ``single_view@S``: the whole image resized to S = N - 64 for each scale N;
  * ``ten_view@N`` (if ``config.eval.ten_view``): ten views of the N x N image;
  * ``ten_view@N1+N2``: the mean of the raw ten-view scores of all scales (if > 1 scale);
  * ``svm`` (if ``config.eval.svm``): LIBLINEAR SVMs on the features of the headline
    protocol, C chosen on the validation split; its precision/recall use the decision
    boundary 0 as threshold.

  The headline is the fused ten-view protocol (or the first single view without
  ``ten_view``), or ``svm`` when enabled. Attention recall (data with boxes; RMA only) is
  computed on the first single-view pass, for the model's regions and for K fixed boxes at
  the anchors, and so is the pointing game (``pointing_scores``: does the region behind each
  label's score contain an object of that label?) with its chance control. Per-image scores
  of every protocol go to ``report/scores.npz``.

  Args:
    config: the run's config (configs/default.py).
    workdir: the run's folder (checkpoints are read from it, the report written into it).
    which: 'best' (lowest validation loss) or 'latest' checkpoint.
    split: 'test' (default), 'val' or 'train'.

  Returns:
    the results dict that is written to report.json.
  """
  from rma_jax import data as data_lib
  from rma_jax import train

  ev = config.eval
  params, step = train.load_params(workdir, which)
  # The trained run's classes (recorded at training time; None for older workdirs).
  sources = data_lib.get_sources(
      config.data, seed=config.seed, class_names=data_lib.load_run_classes(workdir),
      class_origin=os.path.join(workdir, data_lib.RUN_CLASSES_FILE))
  source = getattr(sources, split)
  class_names = list(sources.class_names)
  model = train.build_model(config, len(class_names))
  mesh = train.make_mesh()
  variables = jax.device_put({"params": params}, NamedSharding(mesh, P()))
  convention = config.data.pixel_convention
  want_features = bool(ev.get("svm", False))
  common = dict(batch_size=ev.batch_size, mesh=mesh, num_workers=config.data.num_workers,
                prefetch=config.data.prefetch)
  logging.info("Evaluating %s checkpoint (step %d) of %s on %s (%d images)", which, step,
               workdir, split, len(source))

  passes: dict[str, dict[str, np.ndarray]] = {}
  scales = _scales(config)

  compiled: dict[tuple[int, bool], Callable] = {}  # one jitted function per (size, views)

  def run_protocol(src, name: str, n: int, crop: int, ten: bool) -> dict[str, np.ndarray]:
    if (crop, ten) not in compiled:
      compiled[crop, ten] = make_scores_fn(
          model, crop_size=crop if ten else None, pixel_convention=convention,
          return_features=want_features, mesh=mesh)
    fn = compiled[crop, ten]
    return score_source(fn, variables, src, image_size=n if ten else crop,
                        desc=f"{split}:{name}" if src is source else name, **common)

  for n, crop in scales:
    passes[f"single_view@{crop}"] = run_protocol(source, f"single_view@{crop}", n, crop, False)
    if ev.ten_view:
      passes[f"ten_view@{n}"] = run_protocol(source, f"ten_view@{n}", n, crop, True)
  first = passes[f"single_view@{scales[0][1]}"]
  if ev.ten_view and len(scales) > 1:
    name = "ten_view@" + "+".join(str(n) for n, _ in scales)
    fused = fuse_scales([passes[f"ten_view@{n}"] for n, _ in scales])
    passes[name] = dict(fused, labels=first["labels"], difficult=first["difficult"],
                        id=first["id"])
  headline = list(passes)[-1] if ev.ten_view else f"single_view@{scales[0][1]}"

  metric_args = dict(ap_mode=ev.ap_mode, k=(ev.top_k if ev.top_k else None),
                     threshold=ev.threshold)
  results: dict[str, Any] = {
      "workdir": os.path.abspath(workdir), "checkpoint": which, "step": int(step),
      "split": split, "data": config.data.name, "model": config.model.name,
      "class_names": class_names, "num_images": int(first["labels"].shape[0]),
      "score_transform": ev.score_transform, "prf_score_transform": prf_transform(config),
      "ap_mode": ev.ap_mode, "top_k": ev.top_k,
      "threshold": ev.threshold, "protocols": {},
  }
  # Classes without a positive (non-difficult) image: out of mAP, in CP/CR/CF1 (recall 0).
  has_positive = ((first["labels"] > 0) & ~first["difficult"]).any(axis=0)
  results["classes_without_positives"] = [n for n, p in zip(class_names, has_positive)
                                          if not p]
  for name, p in passes.items():
    results["protocols"][name] = compute_metrics(
        p["scores"], p["labels"], p["difficult"], transform=ev.score_transform,
        prf=prf_transform(config), **metric_args)

  if want_features:
    results["svm"], svm_test = _svm_protocol(
        config, sources, scales, headline, passes[headline], run_protocol)
    passes["svm"] = dict(scores=svm_test, labels=first["labels"], difficult=first["difficult"],
                         id=first["id"])
    results["protocols"]["svm"] = compute_metrics(
        svm_test, first["labels"], first["difficult"], transform="none",
        **dict(metric_args, threshold=0.0))
    headline = "svm"
  results["headline"] = headline

  if "boxes" in first and "theta" in first and first["box_mask"].any():
    results["attention_recall"] = attention_recalls(
        first["theta"], first["boxes"], first["box_mask"], config.model.num_regions)
    results["pointing"] = pointing_scores(first)

  results = _jsonable(results)
  report_dir = os.path.join(workdir, "report")
  if jax.process_index() == 0:
    os.makedirs(report_dir, exist_ok=True)
    np.savez_compressed(
        os.path.join(report_dir, "scores.npz"),
        **{f"{name}/{k}": v for name, p in passes.items() for k, v in p.items()
           if k in ("scores", "labels", "difficult", "index", "id")})
    _write_report(results, config, report_dir, scales)
  h = results["protocols"][headline]
  logging.info("%s %s: mAP %.4f (%s), mAP_all %.4f, CF1 %.4f, OF1 %.4f", split, headline,
               h["mAP"], ev.ap_mode, h["mAP_all"], h["CF1"], h["OF1"])
  if "attention_recall" in results:
    logging.info("attention recall: model regions %.3f, fixed anchor boxes %.3f",
                 results["attention_recall"]["model_regions"],
                 results["attention_recall"]["fixed_anchor_boxes"])
    logging.info("pointing hit rate: model regions %.3f, chance %.3f",
                 results["pointing"]["model_regions"]["hit_rate"],
                 results["pointing"]["chance"]["hit_rate"])
  return results


def _svm_protocol(config, sources, scales, headline, test_pass, run_protocol):
  """Features of train and val under the headline protocol, the SVMs, the test scores."""
  def features(src, tag):
    if headline.startswith("single_view@"):
      n, crop = scales[0]
      return run_protocol(src, f"{tag}:{headline}", n, crop, False)
    per_scale = [run_protocol(src, f"{tag}:ten_view@{n}", n, crop, True) for n, crop in
                 scales if headline == f"ten_view@{n}" or "+" in headline]
    fused = fuse_scales(per_scale)
    return dict(fused, labels=per_scale[0]["labels"], difficult=per_scale[0]["difficult"])

  tr, va = features(sources.train, "train"), features(sources.val, "val")
  head = fit_svm_head(tr["features"], tr["labels"], va["features"], va["labels"],
                      val_ignore=va["difficult"])
  info = {"features_of": headline, "C": head.C,
          "val_mAP_all_by_C": {str(c): m for c, m in head.val_map.items()},
          "num_train": int(tr["labels"].shape[0]), "num_val": int(va["labels"].shape[0])}
  logging.info("SVM head: C = %g (validation mAP by C: %s)", head.C, head.val_map)
  return info, svm_scores(head, test_pass["features"])


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, np.generic)):
    return _jsonable(x.tolist())
  return x


def _write_report(results: dict[str, Any], config: ml_collections.ConfigDict,
                  report_dir: str, scales: Sequence[tuple[int, int]]) -> None:
  """report.json + report.md through ``rma_jax.report``: the headline protocol in the
  paper's table layout, every protocol's numbers, attention recall and the metric card
  (with notes on how the protocols were computed)."""
  from rma_jax import report
  headline = results["headline"]
  h = results["protocols"][headline]
  ten = headline.startswith("ten_view") or (headline == "svm" and config.eval.ten_view)
  if headline.startswith("single_view@"):
    used = [n for n, c in scales if headline == f"single_view@{c}"]
  elif headline == "svm" and not ten:  # SVM on the first scale's single-view features
    used = [scales[0][0]]
  else:
    used = [n for n, _ in scales]
  notes = [
      f"headline protocol: {headline} on the {results['split']} split, checkpoint "
      f"{results['checkpoint']} (step {results['step']})",
      "ten-view: the trunk runs once on the N x N image; conv5_3 is cropped at the 4 corners "
      "and the centre to (N-64)/16 and flipped; raw scores (max over regions) are averaged "
      "over views, then over scales, and score_transform is applied to the average",
      "single_view@S: the whole image resized to S x S",
  ]
  if "svm" in results:
    notes.append(f"svm: one-vs-rest LinearSVC (LIBLINEAR) on L2-normalised view-averaged "
                 f"max-pooled region features, C = {results['svm']['C']} chosen by "
                 "validation mAP; scores are decision values (no transform), predicted "
                 "labels use threshold 0 (the SVM boundary)")
  missing = results.get("classes_without_positives") or []
  if missing:
    c = len(results["class_names"])
    notes.append(f"classes: CP, CR and CF1 average over all {c} classes, {len(missing)} of "
                 f"which have no positive image in the {results['split']} split "
                 f"({', '.join(missing)}; their recall counts as 0); mAP averages over the "
                 f"other {c - len(missing)}")
  if "attention_recall" in results:
    notes.append("attention recall: share of ground-truth objects whose box centre lies in "
                 "at least one of the K regions (single view), beside K fixed boxes of "
                 "half-size 0.5 at the centre and the anchor points. It measures coverage, "
                 "not localisation: boxes that tile the image (the K = 5 fixed boxes do) "
                 "reach 100 % by construction")
  if "pointing" in results:
    chance = results["pointing"]["chance"]
    notes.append("pointing game (Zhang et al., ECCV 2016, adapted; rma_jax.metrics."
                 "pointing_game), single view: for every test image and every class c it "
                 "contains (VOC difficult-only classes left out), k* = argmax_k s_k^c, the "
                 "region whose score the category-wise max pooling kept; a hit when the "
                 "centre of some ground-truth box of class c lies inside region k* (borders "
                 "inside). hit_rate = hits / (image, class) pairs; mean_class_hit_rate = "
                 "the mean of the per-class rates; mean_iou = the mean over pairs of the "
                 "IoU of region k* (clipped to the image) with the best-overlapping box of "
                 "class c. Chance control: the same with every region moved to a centre "
                 "drawn uniformly over the positions where a box of its own size lies "
                 f"inside the image (seed {chance['seed']}, mean of {chance['num_draws']} "
                 "draws)")
  # The transforms as recorded by the metrics of the headline protocol: what was computed.
  svm_scores_text = "none (SVM decision values)"
  card = report.metric_card_from_config(
      config, views="ten-view" if ten else "single-view", scales=tuple(used),
      num_images=h.get("num_images"),
      num_images_without_labels=h.get("num_images_without_labels"),
      score_transform=svm_scores_text if headline == "svm" else h["score_transform"],
      prf_score_transform=svm_scores_text if headline == "svm" else h["prf_score_transform"],
      threshold=0.0 if headline == "svm" else config.eval.threshold,
      dataset=f"{config.data.name} ({results['split']} split)", notes=notes)
  # The tables show the headline protocol; every protocol, the SVM's C and the attention
  # recalls are listed below them and kept in report.json.
  report.write_report(results, report_dir, class_names=results["class_names"],
                      dataset_name=config.data.name, card=card,
                      method_name=f"This run ({config.model.name})")
