"""Tests of rma_jax.metrics against scikit-learn, a literal devkit loop and hand-worked examples."""

import jax.numpy as jnp
import numpy as np
import pytest
from clu import metrics as clu_metrics
import flax
from sklearn import metrics as skm

from rma_jax import metrics
from rma_jax import ops
from rma_jax import regions


def _voc07_devkit_loop(scores, labels, ignore):
  """VOCevalcls.m transcribed for one class, element by element (the reference).

  gt = 1 / -1 / 0 (ignored); [~, si] = sort(-out) (stable); tp, fp cumsum; rec = tp/npos;
  prec = tp./(fp+tp); ap = sum over t = 0:0.1:1 of max(prec(rec >= t)) / 11 with NaN
  skipped by max and an empty max counted as 0.
  """
  gt = [0 if ig else (1 if y else -1) for y, ig in zip(labels, ignore)]
  si = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable.
  npos = sum(g > 0 for g in gt)
  tp = fp = 0
  rec, prec = [], []
  for i in si:
    tp += gt[i] > 0
    fp += gt[i] < 0
    rec.append(tp / npos)
    prec.append(tp / (tp + fp) if tp + fp else float("nan"))
  ap = 0.0
  # MATLAB's 0:0.1:1: k*0.1 for the first half, 1 - (10-k)*0.1 for the second half.
  ts = [k * 0.1 for k in range(6)] + [1 - (10 - k) * 0.1 for k in range(6, 11)]
  for t in ts:
    ps = [p for r, p in zip(rec, prec) if r >= t and p == p]
    ap += (max(ps) if ps else 0.0) / 11
  return ap


def _random_case(rng, n=120, c=6, tie_decimals=1):
  scores = np.round(rng.normal(size=(n, c)), tie_decimals)  # rounding creates many ties
  labels = (rng.random((n, c)) < 0.3).astype(np.int32)
  ignore = rng.random((n, c)) < 0.1
  labels[0] = 1  # every class has a positive
  ignore[0] = False
  return scores, labels, ignore


def test_matlab_thresholds():
  # Only 3*0.1 is not the double nearest 0.3; the rest are exactly k/10.
  t = metrics.VOC07_RECALL_THRESHOLDS
  assert len(t) == 11
  assert t[3] == 0.30000000000000004 and t[3] > 0.3
  for k in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10):
    assert t[k] == k / 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_point_ap_equals_sklearn_with_ties_and_ignore(seed):
  rng = np.random.default_rng(seed)
  scores, labels, ignore = _random_case(rng)
  ap = metrics.average_precision(jnp.asarray(scores, jnp.float32), labels, ignore, mode="all")
  s32 = np.asarray(jnp.asarray(scores, jnp.float32), np.float64)
  for c in range(scores.shape[1]):
    keep = ~ignore[:, c]
    ref = skm.average_precision_score(labels[keep, c], s32[keep, c])
    assert ap[c] == pytest.approx(ref, abs=1e-12)
  # Without ignore, the multi-class call of sklearn (average=None) agrees too.
  ap_all = metrics.average_precision(scores, labels, mode="all")
  np.testing.assert_allclose(ap_all, skm.average_precision_score(labels, scores, average=None),
                             atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_voc07_equals_devkit_loop(seed):
  rng = np.random.default_rng(seed)
  scores, labels, ignore = _random_case(rng, n=60, c=4)
  ap = metrics.average_precision(scores, labels, ignore, mode="voc07")
  for c in range(scores.shape[1]):
    ref = _voc07_devkit_loop(scores[:, c].tolist(), labels[:, c].tolist(),
                             ignore[:, c].tolist())
    assert ap[c] == pytest.approx(ref, abs=1e-12)


def test_voc07_hand_worked():
  # Ranking (scores descending): P N P N N P, npos = 3.
  # Points (rec, prec): (1/3, 1) (1/3, 1/2) (2/3, 2/3) (2/3, 1/2) (2/3, 2/5) (1, 1/2).
  # t = 0, .1, .2, .3 -> max prec over all points = 1          (4 thresholds)
  # t = .4, .5, .6   -> max over the last four points = 2/3    (3 thresholds)
  # t = .7 ... 1.0   -> only the last point, 1/2                (4 thresholds)
  # AP = (4 * 1 + 3 * 2/3 + 4 * 1/2) / 11 = 8 / 11.
  scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4]])
  labels = np.array([[1], [0], [1], [0], [0], [1]])
  assert metrics.average_precision(scores, labels, mode="voc07")[0] == pytest.approx(8 / 11)
  # All-point for the same ranking: (1/3) * (1 + 2/3 + 1/2) = 13/18.
  assert metrics.average_precision(scores, labels, mode="all")[0] == pytest.approx(13 / 18)


def test_voc07_recall_exactly_point_three_misses_the_threshold():
  # 10 positives: P P P N then 7 P. After 3 images rec = 0.3 (as a double, < 3*0.1), prec 1.
  # The devkit's t = 0.30000000000000004 therefore needs the later points, whose best
  # precision is the last one, 10/11. t = 0, .1, .2: 1; t = .3 ... 1.0 (8 values): 10/11.
  labels = np.array([1, 1, 1, 0] + [1] * 7)[:, None]
  scores = -np.arange(11.0)[:, None]
  expected = (3 * 1.0 + 8 * 10 / 11) / 11
  assert metrics.average_precision(scores, labels, mode="voc07")[0] == pytest.approx(expected)


def test_ties_voc07_in_image_order_all_grouped():
  # Two images with the same score: the devkit ranks them in input order.
  scores = np.array([[0.5], [0.5]])
  neg_first = np.array([[0], [1]])
  pos_first = np.array([[1], [0]])
  assert metrics.average_precision(scores, neg_first, mode="voc07")[0] == pytest.approx(0.5)
  assert metrics.average_precision(scores, pos_first, mode="voc07")[0] == pytest.approx(1.0)
  # All-point groups the tie: precision 1/2 at recall 1 either way.
  assert metrics.average_precision(scores, neg_first, mode="all")[0] == pytest.approx(0.5)
  assert metrics.average_precision(scores, pos_first, mode="all")[0] == pytest.approx(0.5)


def test_difficult_pairs_are_ignored_for_their_class_only():
  scores = np.array([[0.95, 0.1], [0.9, 0.9], [0.8, 0.2], [0.7, 0.8], [0.6, 0.3]])
  labels = np.array([[0, 0], [1, 1], [0, 0], [1, 1], [0, 0]])
  ignore = np.zeros_like(labels, bool)
  ignore[0, 0] = True  # a "difficult only" image of class 0, ranked first
  for mode in ("voc07", "all"):
    ap = metrics.average_precision(scores, labels, ignore, mode=mode)
    # Same as dropping image 0 for class 0 only.
    ref0 = metrics.average_precision(scores[1:, :1], labels[1:, :1], mode=mode)[0]
    ref1 = metrics.average_precision(scores[:, 1:], labels[:, 1:], mode=mode)[0]
    assert ap[0] == pytest.approx(ref0) and ap[1] == pytest.approx(ref1)
    # Class 0 without image 0: ranking P N P N -> hand: voc07 (6*1 + 5*2/3)/11, all (1+2/3)/2.
    hand = {"voc07": (6 + 5 * 2 / 3) / 11, "all": (1 + 2 / 3) / 2}[mode]
    assert ap[0] == pytest.approx(hand)
    # Counting it as a negative instead lowers the AP.
    assert metrics.average_precision(scores, labels, mode=mode)[0] < ap[0]


def test_no_positive_class_is_nan_and_left_out_of_map():
  scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.5, 0.5, 0.6]])
  labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
  ignore = np.zeros((3, 3), bool)
  ignore[1, 1] = True  # the only positive of class 1 is ignored
  ap = metrics.average_precision(scores, labels, ignore, mode="all")
  assert ap[0] == 1.0 and np.isnan(ap[1]) and np.isnan(ap[2])
  assert metrics.mean_average_precision(scores, labels, ignore, mode="all") == 1.0
  assert np.isnan(metrics.mean_average_precision(scores, labels * 0))


def test_all_zero_scores():
  labels = np.array([[1, 0], [0, 0], [1, 1], [0, 0]])
  zeros = np.zeros((4, 2))
  # All tied: all-point AP = prevalence (sklearn's convention too).
  np.testing.assert_allclose(metrics.average_precision(zeros, labels, mode="all"),
                             [0.5, 0.25])
  # voc07 ranks in image order: class 0 is P N P N (see the difficult test: (6+5*2/3)/11).
  assert metrics.average_precision(zeros, labels, mode="voc07")[0] == pytest.approx(
      (6 + 5 * 2 / 3) / 11)
  prf = metrics.multilabel_prf(zeros, labels, k=3, threshold=0.5)
  assert prf == {"CP": 0.0, "CR": 0.0, "CF1": 0.0, "OP": 0.0, "OR": 0.0, "OF1": 0.0}


def test_nan_scores_refused():
  with pytest.raises(ValueError):
    metrics.average_precision(np.array([[np.nan]]), np.array([[1]]))


# Hand-worked Eq. 15 example: 4 images, 3 classes, k = 2, threshold = 0.5.
_S = np.array([[0.9, 0.6, 0.7],   # top-2 {0, 2}, both >= .5 -> {0, 2}
               [0.4, 0.8, 0.3],   # top-2 {1, 0}, 0.4 < .5  -> {1}
               [0.6, 0.6, 0.1],   # tie at .6 -> top-2 {0, 1}
               [0.2, 0.1, 0.3]])  # nothing >= .5 -> {}
_Y = np.array([[1, 0, 1],
               [1, 1, 0],
               [0, 1, 0],
               [0, 0, 1]])
# class 0: predicted {0, 2}, true {0, 1}, correct {0}: Nc 1, Np 2, Ng 2
# class 1: predicted {1, 2}, true {1, 2}, correct {1, 2}: Nc 2, Np 2, Ng 2
# class 2: predicted {0}, true {0, 3}, correct {0}: Nc 1, Np 1, Ng 2


def test_prf_hand_worked():
  prf = metrics.multilabel_prf(_S, _Y, k=2, threshold=0.5)
  cp = (1 / 2 + 2 / 2 + 1 / 1) / 3  # 5/6
  cr = (1 / 2 + 2 / 2 + 1 / 2) / 3  # 2/3
  op = (1 + 2 + 1) / (2 + 2 + 1)    # 4/5
  orr = (1 + 2 + 1) / (2 + 2 + 2)   # 2/3
  assert prf["CP"] == pytest.approx(5 / 6) and cp == pytest.approx(5 / 6)
  assert prf["CR"] == pytest.approx(2 / 3) and cr == pytest.approx(2 / 3)
  assert prf["CF1"] == pytest.approx(20 / 27)  # 2 (5/6)(2/3) / (5/6 + 2/3)
  assert prf["OP"] == pytest.approx(op)
  assert prf["OR"] == pytest.approx(orr)
  assert prf["OF1"] == pytest.approx(8 / 11)  # 2 (4/5)(2/3) / (4/5 + 2/3)
  # CF1 is the F1 of the means, not the mean of per-class F1 (1/2, 1, 2/3 -> 13/18).
  assert prf["CF1"] != pytest.approx(13 / 18)


def test_prf_threshold_only_and_k_tie_break():
  # k=None: every score >= .5: image 0 now also predicts class 1 (a false positive).
  prf = metrics.multilabel_prf(_S, _Y, k=None, threshold=0.5)
  # class 1: predicted {0, 1, 2}, correct {1, 2}: precision 2/3.
  assert prf["CP"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
  assert prf["OP"] == pytest.approx(4 / 6)
  # k=1 on a tie: the lower class index wins.
  pred = metrics.predicted_labels(np.array([[0.6, 0.6, 0.6]]), k=1, threshold=0.5)
  np.testing.assert_array_equal(pred, [[True, False, False]])
  pred = metrics.predicted_labels(np.array([[0.1, 0.7, 0.7, 0.9]]), k=2, threshold=0.0)
  np.testing.assert_array_equal(pred, [[False, True, False, True]])


def test_prf_edge_cases():
  # Class 2 is never predicted (precision 0, counted); class 1 has no positive (recall 0,
  # counted, and its predictions are false positives).
  scores = np.array([[0.9, 0.8, 0.0], [0.1, 0.9, 0.2]])
  labels = np.array([[1, 0, 1], [0, 0, 1]])
  prf = metrics.multilabel_prf(scores, labels, k=3, threshold=0.5)
  # class 0: Nc 1 Np 1 Ng 1; class 1: Nc 0 Np 2 Ng 0; class 2: Nc 0 Np 0 Ng 2.
  assert prf["CP"] == pytest.approx(1 / 3)
  assert prf["CR"] == pytest.approx(1 / 3)
  assert prf["OP"] == pytest.approx(1 / 3)
  assert prf["OR"] == pytest.approx(1 / 3)
  # Ignoring a pair removes it from every count: class 1's predictions on both images.
  ignore = np.array([[False, True, False], [False, True, False]])
  prf = metrics.multilabel_prf(scores, labels, k=3, threshold=0.5, ignore=ignore)
  assert prf["CP"] == pytest.approx(1 / 3) and prf["OP"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_prf_matches_sklearn_conventions(seed):
  rng = np.random.default_rng(seed)
  scores = rng.random((50, 7))
  labels = (rng.random((50, 7)) < 0.25).astype(int)
  labels[:, 3] = 0  # a class with no positive
  scores[:, 5] = 0.0  # a class never predicted
  pred = metrics.predicted_labels(scores, k=3, threshold=0.4).astype(int)
  prf = metrics.multilabel_prf(scores, labels, k=3, threshold=0.4)
  kw = dict(zero_division=0)
  assert prf["CP"] == pytest.approx(skm.precision_score(labels, pred, average="macro", **kw))
  assert prf["CR"] == pytest.approx(skm.recall_score(labels, pred, average="macro", **kw))
  assert prf["OP"] == pytest.approx(skm.precision_score(labels, pred, average="micro", **kw))
  assert prf["OR"] == pytest.approx(skm.recall_score(labels, pred, average="micro", **kw))
  assert prf["OF1"] == pytest.approx(skm.f1_score(labels, pred, average="micro", **kw))
  # The top-k rule by a loop: each image's k best (stable order), kept if >= threshold.
  for i in range(50):
    best = sorted(range(7), key=lambda c: -scores[i, c])[:3]
    expect = {c for c in best if scores[i, c] >= 0.4}
    assert set(np.flatnonzero(pred[i])) == expect


def test_score_transform():
  s = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])
  soft = metrics.score_transform(jnp.asarray(s), "softmax")
  np.testing.assert_allclose(soft[0], np.exp(s[0]) / np.exp(s[0]).sum())
  np.testing.assert_allclose(soft.sum(-1), 1.0)
  np.testing.assert_allclose(metrics.score_transform(s + 7.0, "softmax"), soft, atol=1e-15)
  sig = metrics.score_transform(s, "sigmoid")
  np.testing.assert_allclose(sig[0], 1.0 / (1.0 + np.exp(-s[0])))
  assert np.all(np.isfinite(sig)) and sig[1, 0] == 1.0 and sig[1, 2] == pytest.approx(0.0)
  np.testing.assert_array_equal(metrics.score_transform(s, "none"), s)
  with pytest.raises(ValueError):
    metrics.score_transform(s, "tanh")


def test_attention_recall_hand_examples():
  theta = np.array([[[0.5, 0.5, 0.0, 0.0],      # centre region: [0.25, 0.75]^2 in [0, 1]
                     [0.2, 0.2, -0.8, -0.8]]])  # top-left corner: [0, 0.2]^2
  gt = np.array([[[0.4, 0.4, 0.6, 0.6],     # centre (.5, .5): inside region 1
                  [0.0, 0.0, 0.2, 0.2],     # centre (.1, .1): inside region 2
                  [0.8, 0.0, 1.0, 0.2],     # centre (.9, .1): in neither
                  [0.5, 0.5, 1.0, 1.0],     # centre (.75, .75): on region 1's corner -> inside
                  [0.4, 0.4, 0.6, 0.6]]])   # padding
  mask = np.array([[True, True, True, True, False]])
  assert regions.attention_recall(theta, gt, mask) == pytest.approx(3 / 4)
  # A mirrored region (negative scale) covers the same box.
  assert regions.attention_recall(theta * np.array([-1, -1, 1, 1]), gt, mask) == pytest.approx(
      3 / 4)
  assert np.isnan(regions.attention_recall(theta, gt, np.zeros_like(mask)))


def test_attention_recall_matches_theta_to_boxes_loop():
  rng = np.random.default_rng(0)
  theta = np.concatenate([rng.uniform(-0.6, 0.6, (8, 3, 2)), rng.uniform(-1, 1, (8, 3, 2))], -1)
  xy0 = rng.uniform(0, 0.8, (8, 4, 2))
  gt = np.concatenate([xy0, xy0 + rng.uniform(0.05, 0.2, (8, 4, 2))], -1)
  mask = rng.random((8, 4)) < 0.8
  boxes = np.asarray(ops.theta_to_boxes(jnp.asarray(theta)))  # (x0, y0, x1, y1) in [-1, 1]
  hit = total = 0
  for n in range(8):
    for m in range(4):
      if not mask[n, m]:
        continue
      total += 1
      cx = 2 * (gt[n, m, 0] + gt[n, m, 2]) / 2 - 1
      cy = 2 * (gt[n, m, 1] + gt[n, m, 3]) / 2 - 1
      hit += any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in boxes[n])
  assert regions.attention_recall(theta, gt, mask) == pytest.approx(hit / total, abs=1e-6)
  assert 0 < hit < total  # the random case exercises both outcomes


# --------------------------------------------------------------------------- pointing game


def _pointing_loop(region_scores, theta, labels, boxes, box_labels, ignore):
  """The pointing game written out pair by pair (the reference): hits, pairs, IoU sums."""
  n, k, c = region_scores.shape
  hits, pairs, iou = np.zeros(c), np.zeros(c), np.zeros(c)
  for i in range(n):
    for cls in range(c):
      if not labels[i, cls] or ignore[i, cls]:
        continue
      own = [m for m in range(boxes.shape[1]) if box_labels[i, m] == cls]
      if not own:
        continue
      kstar = max(range(k), key=lambda r: (region_scores[i, r, cls], -r))  # first of ties
      sx, sy, tx, ty = theta[i, kstar]
      rx0, rx1 = tx - abs(sx), tx + abs(sx)
      ry0, ry1 = ty - abs(sy), ty + abs(sy)
      pairs[cls] += 1
      hit, best = False, 0.0
      for m in own:
        x0, y0, x1, y1 = (2 * v - 1 for v in boxes[i, m])
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        hit |= rx0 <= cx <= rx1 and ry0 <= cy <= ry1
        cx0, cy0, cx1, cy1 = max(rx0, -1), max(ry0, -1), min(rx1, 1), min(ry1, 1)
        inter = max(0, min(cx1, x1) - max(cx0, x0)) * max(0, min(cy1, y1) - max(cy0, y0))
        union = (cx1 - cx0) * (cy1 - cy0) + (x1 - x0) * (y1 - y0) - inter
        best = max(best, inter / union if union > 0 else 0.0)
      hits[cls] += hit
      iou[cls] += best
  return hits, pairs, iou


def _pointing_hand_case():
  # Region 1: the centre box [0.25, 0.75]^2 of the image; region 2: the corner [0, 0.2]^2.
  theta = np.array([[[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, -0.8, -0.8]]] * 2)
  labels = np.array([[1, 1, 0], [1, 1, 1]])
  ignore = np.array([[False] * 3, [True, False, False]])  # image 1: class 0 difficult-only
  boxes = np.array([[[0.4, 0.4, 0.6, 0.6],    # class 0, centre (.5, .5): in region 1
                     [0.0, 0.0, 0.2, 0.2],    # class 1, centre (.1, .1): in region 2 only
                     [0.0, 0.0, 0.0, 0.0]],   # padding
                    [[0.8, 0.8, 1.0, 1.0],    # class 2, centre (.9, .9): in neither
                     [0.0, 0.0, 0.2, 0.2],    # class 2, centre (.1, .1): in region 2
                     [0.4, 0.4, 0.6, 0.6]]])  # class 0 (ignored in this image)
  box_labels = np.array([[0, 1, -1], [2, 2, 0]])  # image 1's class 1 has no box
  scores = np.zeros((2, 2, 3))
  scores[0, 0, 0] = 1.0  # class 0 -> region 1: hit
  scores[0, 0, 1] = 1.0  # class 1 -> region 1: miss (its object is in region 2)
  scores[1, 1, 2] = 1.0  # class 2 -> region 2: hit through the second box
  scores[1, 1, 0] = 1.0  # class 0 -> region 2: a miss, but the pair is ignored
  return scores, theta, labels, boxes, box_labels, ignore


def test_pointing_game_hand_example():
  scores, theta, labels, boxes, box_labels, ignore = _pointing_hand_case()
  got = regions.pointing_game(scores, theta, labels, boxes, box_labels, ignore)
  assert got["num_pairs"] == 3 and got["num_pairs_without_box"] == 1
  assert got["hit_rate"] == pytest.approx(2 / 3)
  np.testing.assert_allclose(got["hit_rate_per_class"], [1.0, 0.0, 1.0])
  np.testing.assert_array_equal(got["num_pairs_per_class"], [1, 1, 1])
  assert got["mean_class_hit_rate"] == pytest.approx(2 / 3)
  # IoU: region 1 ([-.5, .5]^2, area 1) with the class-0 box ([-.2, .2]^2, area .16): .16;
  # region 1 with the class-1 box: 0; region 2 with the second class-2 box: identical, 1.
  np.testing.assert_allclose(got["mean_iou_per_class"], [0.16, 0.0, 1.0], atol=1e-12)
  assert got["mean_iou"] == pytest.approx(1.16 / 3)
  # Attention recall of the same regions ignores which region gave which label: the
  # class-1 object lies in region 2, so every object of image 0 is "covered".
  assert regions.attention_recall(theta[:1], boxes[:1], box_labels[:1] >= 0) == 1.0
  # Without the ignore mask the difficult-only pair counts (and misses).
  assert regions.pointing_game(scores, theta, labels, boxes, box_labels)["hit_rate"] == (
      pytest.approx(2 / 4))
  # Mirrored regions (negative scales) are the same boxes; one image at a time, too.
  mirrored = regions.pointing_game(scores, theta * np.array([-1, -1, 1, 1]), labels, boxes,
                                   box_labels, ignore, chunk=1)
  assert mirrored["hit_rate"] == got["hit_rate"] and mirrored["mean_iou"] == got["mean_iou"]
  assert np.isnan(regions.pointing_game(scores, theta, np.zeros_like(labels), boxes,
                                        box_labels)["hit_rate"])


def test_tiling_boxes_have_full_attention_recall_and_zero_pointing():
  """The K = 5 fixed boxes cover the whole image, so every object is 'recalled'; when each
  label's score comes from the region on the opposite side, not one label is pointed at."""
  from rma_jax import models
  fixed = models.fixed_region_thetas(5)[1:]  # centre, then anchors (.5,.5) (.5,-.5) ...
  # One object per image near each corner, in [0, 1]: (x, y) centres and the fixed region
  # on the opposite side of the image (regions 2..5 are indices 1..4).
  corners = [((0.85, 0.85), 4), ((0.85, 0.15), 3), ((0.15, 0.85), 2), ((0.15, 0.15), 1),
             ((0.45, 0.45), 1)]  # near the centre: region 2 ([0, 1]^2 in map units) misses it
  n = len(corners)
  theta = np.broadcast_to(fixed, (n, 5, 4))
  boxes = np.array([[[x - 0.05, y - 0.05, x + 0.05, y + 0.05]] for (x, y), _ in corners])
  box_labels = np.arange(n)[:, None] % 3
  labels = np.zeros((n, 3))
  labels[np.arange(n), box_labels[:, 0]] = 1
  scores = np.zeros((n, 5, 3))
  for i, (_, wrong) in enumerate(corners):
    scores[i, wrong, box_labels[i, 0]] = 1.0
  assert regions.attention_recall(theta, boxes, np.ones((n, 1), bool)) == 1.0
  got = regions.pointing_game(scores, theta, labels, boxes, box_labels)
  assert got["num_pairs"] == n and got["hit_rate"] == 0.0
  # The right regions instead: every label is pointed at.
  right = np.zeros_like(scores)
  for i, (x, y) in enumerate(xy for xy, _ in corners):
    k = 0 if (x, y) == (0.45, 0.45) else 1 + [(.85, .85), (.85, .15), (.15, .85),
                                            (.15, .15)].index((x, y))
    right[i, k, box_labels[i, 0]] = 1.0
  assert regions.pointing_game(right, theta, labels, boxes, box_labels)["hit_rate"] == 1.0


def test_pointing_game_matches_a_loop_on_random_cases():
  rng = np.random.default_rng(1)
  n, k, c, m = 12, 3, 4, 5
  scores = rng.normal(size=(n, k, c))
  scores[0, :, 0] = 0.5  # ties: the first region wins
  theta = np.concatenate([rng.uniform(-0.7, 0.7, (n, k, 2)), rng.uniform(-1.2, 1.2, (n, k, 2))],
                         -1)
  xy0 = rng.uniform(0, 0.7, (n, m, 2))
  boxes = np.concatenate([xy0, xy0 + rng.uniform(0.05, 0.3, (n, m, 2))], -1)
  box_labels = np.where(rng.random((n, m)) < 0.8, rng.integers(0, c, (n, m)), -1)
  labels = np.zeros((n, c), int)
  for i in range(n):
    labels[i, box_labels[i][box_labels[i] >= 0]] = 1
  labels[1, :] = 1  # classes without boxes in image 1
  ignore = rng.random((n, c)) < 0.15
  hits, pairs, iou = _pointing_loop(scores, theta, labels, boxes, box_labels, ignore)
  got = regions.pointing_game(scores, theta, labels, boxes, box_labels, ignore, chunk=5)
  assert got["num_pairs"] == pairs.sum() and 0 < hits.sum() < pairs.sum()
  assert got["hit_rate"] == pytest.approx(hits.sum() / pairs.sum())
  np.testing.assert_allclose(got["hit_rate_per_class"], hits / pairs)
  assert got["mean_iou"] == pytest.approx(iou.sum() / pairs.sum(), abs=1e-12)
  np.testing.assert_allclose(got["mean_iou_per_class"], iou / pairs, atol=1e-12)
  assert 0 < got["mean_iou"] < 1
  np.testing.assert_array_equal(regions.pointing_regions(scores)[0, 0], 0)


def test_pointing_chance_is_deterministic_and_draws_what_it_says():
  scores, theta, labels, boxes, box_labels, ignore = _pointing_hand_case()
  args = (scores, theta, labels, boxes, box_labels, ignore)
  a = regions.pointing_chance(*args, seed=3, num_draws=5)
  b = regions.pointing_chance(*args, seed=3, num_draws=5)
  assert a["hit_rate"] == b["hit_rate"] and a["mean_iou"] == b["mean_iou"]
  np.testing.assert_array_equal(a["hit_rate_per_class"], b["hit_rate_per_class"])
  assert a["seed"] == 3 and a["num_draws"] == 5 and a["num_pairs"] == 3
  draws = regions.random_region_thetas(theta, seed=3, num_draws=5)
  again = regions.random_region_thetas(theta, seed=3, num_draws=5)
  np.testing.assert_array_equal(draws, again)
  assert not np.array_equal(draws, regions.random_region_thetas(theta, seed=4, num_draws=5))
  # The mean over draws is the mean of pointing_game on each draw.
  per_draw = [regions.pointing_game(scores, t, labels, boxes, box_labels, ignore)["hit_rate"]
              for t in draws]
  assert a["hit_rate"] == pytest.approx(np.mean(per_draw))
  # Same sizes as the model's regions, every box inside the image.
  np.testing.assert_array_equal(draws[..., :2], np.broadcast_to(np.abs(theta[..., :2]),
                                                                draws[..., :2].shape))
  box = regions.region_boxes(draws)
  assert box.min() >= -1.0 and box.max() <= 1.0
  # A box larger than the image keeps containing it.
  big = regions.region_boxes(regions.random_region_thetas(
      np.array([[[1.5, 1.2, 0.0, 0.0]]]), seed=0, num_draws=50))
  assert (big[..., :2] <= -1.0).all() and (big[..., 2:] >= 1.0).all()


def test_pointing_chance_matches_the_uniform_centre_probability():
  # One region of half-size 0.5 and one object centred at x = 0.9 (map units), y = 0: the
  # random centre tx ~ U[-0.5, 0.5] puts the object inside iff tx >= 0.4 (probability
  # 0.1); in y it is always inside. The IoU by hand is not needed: the hit rate is.
  scores = np.ones((1, 1, 1))
  theta = np.array([[[0.5, 0.5, -0.7, 0.3]]])
  boxes = np.array([[[0.9, 0.45, 1.0, 0.55]]])  # centre (0.95, 0.5) -> (0.9, 0.0)
  got = regions.pointing_chance(scores, theta, np.ones((1, 1)), boxes, np.zeros((1, 1)),
                                seed=0, num_draws=4000)
  assert got["hit_rate"] == pytest.approx(0.1, abs=0.02)


def test_streaming_equals_one_shot_with_padding():
  rng = np.random.default_rng(3)
  scores, labels, ignore = _random_case(rng, n=70, c=5)
  acc = metrics.MultiLabelMetrics.empty()
  for lo, hi in ((0, 32), (32, 64), (64, 70)):
    pad = 32 - (hi - lo)  # the last batch is padded to the batch size with garbage rows
    s = np.concatenate([scores[lo:hi], rng.normal(size=(pad, 5)) + 5.0])
    y = np.concatenate([labels[lo:hi], np.ones((pad, 5), np.int32)])
    ig = np.concatenate([ignore[lo:hi], np.zeros((pad, 5), bool)])
    mask = np.arange(32) < hi - lo
    acc = acc.update(scores=jnp.asarray(s), labels=jnp.asarray(y), ignore=jnp.asarray(ig),
                     mask=jnp.asarray(mask))
  out = acc.compute(ap_mode="voc07", k=2, threshold=0.3, score_transform="sigmoid")
  sig = metrics.score_transform(scores, "sigmoid")
  for mode in ("voc07", "all"):
    np.testing.assert_allclose(out[f"ap_{mode}"],
                               metrics.average_precision(sig, labels, ignore, mode=mode))
    assert out[f"mAP_{mode}"] == pytest.approx(
        metrics.mean_average_precision(sig, labels, ignore, mode=mode))
  np.testing.assert_array_equal(out["ap"], out["ap_voc07"])
  prf = metrics.multilabel_prf(sig, labels, k=2, threshold=0.3, ignore=ignore)
  for key, value in prf.items():
    assert out[key] == pytest.approx(value)
  assert out["num_images"] == 70
  assert out["num_images_without_labels"] == int((labels.sum(1) == 0).sum())


def test_streaming_in_clu_collection_and_empty():
  @flax.struct.dataclass
  class Collection(clu_metrics.Collection):
    ml: metrics.MultiLabelMetrics
  rng = np.random.default_rng(0)
  s, y = rng.random((6, 3)), np.eye(3, dtype=int)[[0, 1, 2, 0, 1, 2]]
  col = Collection.empty()
  # Extra outputs (loss) are passed to every metric and ignored; ignore/mask default.
  col = col.merge(Collection.single_from_model_output(scores=s[:4], labels=y[:4], loss=1.0))
  col = col.merge(Collection.single_from_model_output(scores=s[4:], labels=y[4:], loss=1.0))
  out = col.compute()["ml"]
  assert out["mAP"] == pytest.approx(metrics.mean_average_precision(s, y))
  with pytest.raises(ValueError):
    metrics.MultiLabelMetrics.empty().compute()


def test_softmax_max_transform_thresholds_relative_to_top_label():
  s = np.log(np.asarray([[4.0, 2.0, 1.0, 1.0]]))  # softmax = [.5, .25, .125, .125]
  got = metrics.score_transform(s, "softmax_max")
  np.testing.assert_allclose(got, [[1.0, 0.5, 0.25, 0.25]])
  pred = metrics.predicted_labels(got, k=3, threshold=0.5)
  np.testing.assert_array_equal(np.asarray(pred, bool), [[True, True, False, False]])
