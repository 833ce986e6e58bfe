"""Evaluation as in the paper (§5.1-5.3, docs/design.md §4): every protocol of ``rma_jax.views`` over
a split, the optional SVM head (``rma_jax.svm``), attention recall and the pointing game
(``rma_jax.regions``), and the report (``rma_jax.report``).

``evaluate_and_report`` restores a run's best checkpoint (its selected parameters,
``checkpointing.load_selected_params``: the moving average where it won the validation),
scores the test split once per protocol (one jitted function per input size), computes every
metric of ``rma_jax.metrics`` and writes ``WORKDIR/report/``: ``report.json``, ``report.md``
and ``scores.npz`` (the raw per-image scores of every protocol, with the images' ids).

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import io
import math
import os
from collections import deque
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np
import tqdm

from rma_jax import (build, checkpointing, config_checks, context, kernels, losses, metrics,
                     models, parallel, paths, regions, report, steps, svm, views)
from rma_jax import data as data_lib
from rma_jax import workdir as workdir_lib

REPORT_DIR = "report"


def report_dir(workdir: str) -> str:
  """WORKDIR/report: report.json, report.md, scores.npz."""
  return os.path.join(workdir, REPORT_DIR)


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



def score_source(fn: Callable, variables: Any, source: Any, *, image_size: int,
                 batch_size: int, mesh: Mesh, num_workers: int = 2, prefetch: int = 2,
                 desc: str = "eval", stop: Any = None) -> dict[str, np.ndarray]:
  """Runs a jitted ``make_scores_fn`` over a whole split; ``stop`` (a
  ``preemption.StopSignals``), when it is signalled, ends the pass before it starts or between
  two batches (the ``Preempted`` error it makes).

  Returns host arrays over the real (unpadded) images, in split order: the model outputs
  (``scores``, ``theta``, ``features``, ... as produced) and ``labels`` (N, C),
  ``difficult`` (N, C) bool, ``boxes`` (N, M, 4), ``box_labels`` (N, M) int (-1 = padding)
  and ``box_mask`` (N, M) (``box_labels >= 0``) when the batches carry boxes, ``index`` (N,)
  (the position in ``source``) and ``id`` (N,) str, the examples' ids.
  """
  sharding = parallel.batch_sharding(mesh)
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
  put = data_lib.device_put_batches(images_only(), sharding, prefetch)
  # A bar on a terminal only (disable=None): in a log file it would be a line per update.
  batches = tqdm.tqdm(put, total=total, desc=desc, leave=False,
                      disable=None if jax.process_index() == 0 else True)

  def stop_if_requested() -> None:
    if stop is not None and stop.requested:
      # The worker processes and the batches in flight end now, not when the interpreter
      # exits (the error's traceback keeps this frame alive).
      put.close()
      raise stop.stopped(f"stopped during the evaluation ({desc}), before its report was "
                         "written")

  stop_if_requested()  # a stopped run starts no pass (nor its worker processes)
  for i, batch in enumerate(batches):
    stop_if_requested()
    out = fn(variables, batch["image"])
    host = {k: parallel.to_host(v) for k, v in out.items()}
    m = meta.popleft()
    if jax.process_count() > 1:
      m = {k: parallel.to_host(v) for k, v in m.items()}
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
    raise data_lib.DataError(f"{desc}: 0 of {len(source)} images of {source.name} could be scored; "
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


def validation_fn(model: Any, config: ml_collections.ConfigDict, mesh: Mesh
                  ) -> Callable[[Any, Any], dict[str, float]]:
  """A training run's validation pass: ``fn(params, source) -> {'loss', 'mAP'}``, the
  validation loss (the paper's model-selection criterion) and single-view mAP.

  One jitted evaluation step (``steps.jit_eval_step``) for the whole run; each call prepares
  the parameters' evaluation-only forms once (``kernels.prepare_fn``) for all its batches.
  """
  loss_cfg = steps.LossConfig.from_config(config)
  eval_fn = steps.jit_eval_step(model.apply, loss_cfg, mesh)
  prepare = kernels.prepare_fn(config.model.conv_impl, mesh, trunk=config.model.trunk)
  sharding = parallel.batch_sharding(mesh)

  def validate(params: Any, source: Any) -> dict[str, float]:
    variables = prepare({"params": params})
    batches = data_lib.device_put_batches(
        data_lib.eval_batches(source, global_batch_size=config.eval.batch_size,
                              image_size=config.data.crop_size,
                              num_workers=config.data.num_workers),
        sharding, prefetch=config.data.prefetch)
    total, weight = 0.0, 0.0
    scores, labels, masks = [], [], []
    for batch in batches:
      out = eval_fn(variables, batch)
      w = float(out["weight"])
      total += float(out["loss"]) * w
      weight += w
      scores.append(parallel.to_host(out["scores"]))
      labels.append(parallel.to_host(batch["labels"]))
      masks.append(parallel.to_host(batch["mask"]) > 0)
    keep = np.concatenate(masks)
    if weight == 0:
      # A loss of 0/0 would be kept as the best one: the model would be chosen on nothing.
      raise data_lib.DataError(
          f"validation pass over {source.name}: 0 of {len(source)} images scored "
          f"({int(keep.sum())} read, none with a label the loss counts); no checkpoint can be "
          f"chosen on it. {source.skipped.summary()}")
    s = metrics.score_transform(np.concatenate(scores)[keep], ap_transform(config))
    y = np.concatenate(labels)[keep]
    return {"loss": total / weight,
            "mAP": float(metrics.mean_average_precision(s, y, mode="all"))}
  return validate


def ap_transform(config: Any) -> str:
  """The transform of the scores before AP (``config.eval.score_transform``); 'auto': the
  one that reads the run's loss's scores as probabilities, softmax after the
  softmax-Euclidean loss, sigmoid after sigmoid_bce and asl (``losses.score_transforms``)."""
  return losses.score_transforms(config.loss.classification, config.eval.score_transform)[0]


def prf_transform(config: Any) -> str:
  """The scale CP…OF1 are thresholded on (``config.eval.prf_score_transform``); 'auto':
  ``softmax_max`` after the softmax-Euclidean loss, ``sigmoid`` after sigmoid_bce and asl."""
  return losses.score_transforms(config.loss.classification,
                                 prf=config.eval.get("prf_score_transform", "auto"))[1]


def compute_metrics(scores: np.ndarray, labels: np.ndarray, difficult: np.ndarray | None, *,
                    ap_mode: str, k: int | None, threshold: float,
                    transform: str, prf: str | None = None) -> dict[str, Any]:
  """All numbers of one protocol (``rma_jax.metrics``), VOC difficult pairs ignored."""
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
  fixed = np.broadcast_to(models.fixed_region_thetas(num_regions)[1:],
                          (theta.shape[0], num_regions, 4))
  return {"model_regions": regions.attention_recall(theta[:, 1:], boxes, box_mask),
          "fixed_anchor_boxes": regions.attention_recall(fixed, boxes, box_mask)}


POINTING_CHANCE_SEED = 0
POINTING_CHANCE_DRAWS = 10


def pointing_scores(scored: Mapping[str, np.ndarray], *, seed: int = POINTING_CHANCE_SEED,
                    num_draws: int = POINTING_CHANCE_DRAWS) -> dict[str, dict[str, Any]]:
  """The pointing game (``regions.pointing_game``) of a single-view pass, with its chance
  control (``regions.pointing_chance``: the same regions' sizes at random places).

  Args:
    scored: a ``score_source`` result of an RMA model on data with boxes:
      ``region_scores`` (N, K, C), ``theta`` (N, K+1, 4), ``labels``, ``difficult``,
      ``boxes``, ``box_labels``.
    seed, num_draws: of the chance control.

  Returns:
    ``{"model_regions": ..., "chance": ...}``, each a ``pointing_game`` dict.
  """
  args = (scored["region_scores"], scored["theta"][:, 1:], scored["labels"], scored["boxes"],
          scored["box_labels"], scored["difficult"])
  return {"model_regions": regions.pointing_game(*args),
          "chance": regions.pointing_chance(*args, seed=seed, num_draws=num_draws)}


# --------------------------------------------------------------------------- the report


def evaluate_and_report(config: ml_collections.ConfigDict, workdir: str, *,
                        which: str = "best", split: str = "test",
                        ctx: context.RunContext | None = None, stop: Any = None
                        ) -> dict[str, Any]:
  """Evaluates a run's checkpoint on a split and writes WORKDIR/report/.

  Protocols (each with every metric of ``rma_jax.metrics``; scores after
  ``config.eval.score_transform``, 'auto' resolved by ``ap_transform``; AP in
  ``config.eval.ap_mode`` with the other variant reported too; VOC difficult pairs ignored):

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
    config: the run's config (configs/default.py), checked.
    workdir: the run's folder (checkpoints are read from it, the report written into it).
    which: 'best' (lowest validation loss) or 'latest' checkpoint.
    split: 'test' (default), 'val' or 'train'.
    ctx: the run's opened data (``context.open_run``); default: opened here, with the class
      list the run recorded.
    stop: a held ``preemption.StopSignals``: a signal ends the evaluation between batches,
      before anything is written (``preemption.Preempted``).

  Returns:
    the results dict that is written to report.json.
  """
  ev = config.eval
  workdir_lib.check_architecture(config, workdir, "evaluate")
  selected = checkpointing.load_selected_params(workdir, which)
  params, step = selected.params, selected.step
  ctx = ctx if ctx is not None else context.open_run(config, [workdir], check=False)
  sources, mesh = ctx.sources, ctx.mesh
  source = getattr(sources, split)
  class_names = list(ctx.class_names)
  model = build.build_model(config, len(class_names))
  variables = jax.device_put({"params": params}, parallel.replicated(mesh))
  # Once for every pass below: the parameters in the forms the CPU kernels want.
  variables = kernels.prepare_fn(config.model.conv_impl, mesh,
                                 trunk=config.model.trunk)(variables)
  want_features = bool(ev.get("svm", False))
  common = dict(batch_size=ev.batch_size, mesh=mesh, num_workers=config.data.num_workers,
                prefetch=config.data.prefetch, stop=stop)
  logging.info("Evaluating %s checkpoint (step %d%s) of %s on %s (%d images)", which, step,
               ", the moving average of its parameters" if selected.ema else "", workdir,
               split, len(source))

  passes: dict[str, dict[str, np.ndarray]] = {}
  scales = config_checks.eval_scales(config, model.stride)

  compiled: dict[tuple[int, bool], Callable] = {}  # one jitted function per (size, views)

  def run_protocol(src, name: str, n: int, crop: int, ten: bool) -> dict[str, np.ndarray]:
    if (crop, ten) not in compiled:
      compiled[crop, ten] = views.make_scores_fn(
          model, crop_size=crop if ten else None, return_features=want_features, mesh=mesh)
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
    fused = views.fuse_scales([passes[f"ten_view@{n}"] for n, _ in scales])
    passes[name] = dict(fused, labels=first["labels"], difficult=first["difficult"],
                        id=first["id"])
  headline = list(passes)[-1] if ev.ten_view else f"single_view@{scales[0][1]}"

  metric_args = dict(ap_mode=ev.ap_mode, k=(ev.top_k if ev.top_k else None),
                     threshold=ev.threshold)
  transform = ap_transform(config)
  results: dict[str, Any] = {
      "workdir": paths.absolute(workdir), "checkpoint": which, "step": int(step),
      # Whether the parameters evaluated are the moving average (it won the validation).
      "ema": selected.ema, "has_ema": selected.has_ema,
      "split": split, "data": config.data.name, "model": config.model.name,
      "classification_loss": config.loss.classification,
      "architecture": workdir_lib.architecture(config),
      "class_names": class_names, "num_images": int(first["labels"].shape[0]),
      "score_transform": transform, "prf_score_transform": prf_transform(config),
      "ap_mode": ev.ap_mode, "top_k": ev.top_k,
      "threshold": ev.threshold, "protocols": {},
  }
  # Classes without a positive (non-difficult) image: out of mAP, in CP/CR/CF1 (recall 0).
  has_positive = ((first["labels"] > 0) & ~first["difficult"]).any(axis=0)
  results["classes_without_positives"] = [n for n, p in zip(class_names, has_positive)
                                          if not p]
  for name, p in passes.items():
    results["protocols"][name] = compute_metrics(
        p["scores"], p["labels"], p["difficult"], transform=transform,
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

  results = report.to_jsonable(results, strict=False)
  out_dir = report_dir(workdir)
  if jax.process_index() == 0:
    paths.path(out_dir).mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # written whole: a stopped process leaves no partial file
    np.savez_compressed(buffer, **{f"{name}/{k}": v for name, p in passes.items()
                                   for k, v in p.items()
                                   if k in ("scores", "labels", "difficult", "index", "id")})
    paths.write_atomic(os.path.join(out_dir, "scores.npz"), buffer.getvalue())
    report.write_evaluation_report(results, config, out_dir, scales)
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
  logging.info("Wrote %s (report.json and scores.npz beside it)",
               os.path.join(paths.absolute(out_dir), "report.md"))
  return results


def _svm_protocol(config, sources, scales, headline, test_pass, run_protocol):
  """Features of train and val under the headline protocol, the SVMs, the test scores."""
  def features(src, tag):
    if headline.startswith("single_view@"):
      n, crop = scales[0]
      return run_protocol(src, f"{tag}:{headline}", n, crop, False)
    per_scale = [run_protocol(src, f"{tag}:ten_view@{n}", n, crop, True) for n, crop in
                 scales if headline == f"ten_view@{n}" or "+" in headline]
    fused = views.fuse_scales(per_scale)
    return dict(fused, labels=per_scale[0]["labels"], difficult=per_scale[0]["difficult"])

  tr, va = features(sources.train, "train"), features(sources.val, "val")
  head = svm.fit_svm_head(tr["features"], tr["labels"], va["features"], va["labels"],
                      val_ignore=va["difficult"])
  info = {"features_of": headline, "C": head.C,
          "val_mAP_all_by_C": {str(c): m for c, m in head.val_map.items()},
          "num_train": int(tr["labels"].shape[0]), "num_val": int(va["labels"].shape[0])}
  logging.info("SVM head: C = %g (validation mAP by C: %s)", head.C, head.val_map)
  return info, svm.svm_scores(head, test_pass["features"])
