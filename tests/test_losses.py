"""Each loss term of Eq. 7–14 against a hand computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rma_jax import losses


def test_anchor_points_k5_and_k9():
  # K = 5: the paper's list, "(0.5, 0.5), (0.5, -0.5), (-0.5, 0.5), and (-0.5, -0.5),
  # respectively" for regions 2..5.
  np.testing.assert_array_equal(losses.anchor_points(5),
                                [[0.5, 0.5], [0.5, -0.5], [-0.5, 0.5], [-0.5, -0.5]])
  r = math.sqrt(2) / 2
  want9 = [[r * math.cos(math.radians(45 + 45 * j)), r * math.sin(math.radians(45 + 45 * j))]
           for j in range(8)]
  got9 = losses.anchor_points(9)
  np.testing.assert_allclose(got9, want9, atol=1e-6)
  np.testing.assert_allclose(got9[1], [0.0, r], atol=1e-6)  # 90 degrees: straight down
  assert losses.anchor_points(1).shape == (0, 2)
  with pytest.raises(ValueError):
    losses.anchor_points(0)


def test_classification_loss_by_hand_and_masking():
  scores = jnp.asarray([[0.0, math.log(3.0), 0.0], [1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
  labels = jnp.asarray([[1, 1, 0], [0, 0, 0], [1, 0, 0]], jnp.float32)
  # Image 0: p = (1/5, 3/5, 1/5), target (1/2, 1/2, 0): 0.09 + 0.01 + 0.04 = 0.14.
  # Image 1 has no labels: left out. Image 2: p = (e^5, 1, 1)/(e^5 + 2), target (1, 0, 0).
  z = math.exp(5) + 2
  img2 = (math.exp(5) / z - 1) ** 2 + 2 * (1 / z) ** 2
  got = losses.classification_loss(scores, labels)
  np.testing.assert_allclose(float(got), (0.14 + img2) / 2, rtol=1e-5)
  masked = losses.classification_loss(scores, labels, mask=jnp.asarray([1.0, 1.0, 0.0]))
  np.testing.assert_allclose(float(masked), 0.14, rtol=1e-5)
  # Invariant to a constant added to an image's scores (why mAP is scored on softmax).
  np.testing.assert_allclose(float(losses.classification_loss(scores + 7.0, labels)),
                             float(got), rtol=1e-5)


def test_localization_terms_by_hand():
  # Two regions (K = 2): region 1 has no anchor, region 2's anchor is (0.5, 0.5).
  theta = jnp.asarray([[[0.8, -0.2, 0.3, 0.1], [0.05, 0.6, 0.1, 0.9]]])
  t = losses.localization_terms(theta, alpha=0.5, beta=0.1)
  anchor = 0.5 * ((0.1 - 0.5) ** 2 + (0.9 - 0.5) ** 2)
  scale = (0.8 - 0.5) ** 2 + 0.0 + 0.0 + (0.6 - 0.5) ** 2  # |sy| = 0.2 and 0.05: under alpha
  positive = (0.0 + (0.1 + 0.2)) + ((0.1 - 0.05) + 0.0)
  np.testing.assert_allclose(float(t["anchor"][0]), anchor, rtol=1e-5)
  np.testing.assert_allclose(float(t["scale"][0]), scale, rtol=1e-5)
  np.testing.assert_allclose(float(t["positive"][0]), positive, rtol=1e-5)
  full = losses.localization_loss(theta, lambda_anchor=0.01, lambda_positive=0.1)
  np.testing.assert_allclose(float(full), scale + 0.01 * anchor + 0.1 * positive, rtol=1e-5)
  only_anchor = losses.localization_loss(theta, use_scale=False, use_positive=False)
  np.testing.assert_allclose(float(only_anchor), 0.01 * anchor, rtol=1e-5)
  none = losses.localization_loss(theta, use_anchor=False, use_scale=False, use_positive=False)
  assert float(none) == 0.0


def test_min_scale_lower_bound_by_hand():
  # |s| = 0.8, 0.2 (region 1) and 0.05, 0.6 (region 2); bound 0.3: only 0.2 and 0.05 are under.
  theta = jnp.asarray([[[0.8, -0.2, 0.3, 0.1], [0.05, 0.6, 0.1, 0.9]]])
  t = losses.localization_terms(theta, alpha=0.5, beta=0.1, min_scale=0.3)
  small = (0.3 - 0.2) ** 2 + (0.3 - 0.05) ** 2
  np.testing.assert_allclose(float(t["min_scale"][0]), small, rtol=1e-5)
  paper = losses.localization_loss(theta)
  bounded = losses.localization_loss(theta, min_scale=0.3)
  np.testing.assert_allclose(float(bounded), float(paper) + small, rtol=1e-5)
  # Off by default: min_scale = 0 adds nothing, and the term is 0 there.
  assert float(losses.localization_terms(theta)["min_scale"][0]) == 0.0
  assert float(losses.localization_loss(theta, min_scale=0.0)) == float(paper)
  # Its gradient pushes a small scale up (the loss falls as |sy| of region 1 grows).
  g = jax.grad(lambda th: losses.localization_loss(th, min_scale=0.3, use_anchor=False,
                                                   use_scale=False, use_positive=False))(theta)
  np.testing.assert_allclose(float(g[0, 0, 1]), 2 * (0.3 - 0.2), rtol=1e-5)  # sy < 0: d|sy|=-1
  np.testing.assert_allclose(float(g[0, 1, 0]), -2 * (0.3 - 0.05), rtol=1e-5)
  assert float(g[0, 0, 0]) == 0.0 and float(g[0, 1, 1]) == 0.0


def test_anchor_term_k5_uses_each_anchor_once():
  anchors = losses.anchor_points(5)
  theta = np.zeros((1, 5, 4), np.float32)
  theta[0, :, :2] = 0.3
  theta[0, 1:, 2:] = anchors  # regions 2..5 sit exactly on their anchors
  theta[0, 0, 2:] = (0.9, -0.9)  # region 1 is free
  assert float(losses.localization_terms(jnp.asarray(theta))["anchor"][0]) == pytest.approx(0)
  theta[0, 3, 2:] = (0.0, 0.0)  # region 4 off its anchor (-0.5, 0.5)
  assert float(losses.localization_terms(jnp.asarray(theta))["anchor"][0]) == pytest.approx(
      0.5 * (0.25 + 0.25))


def test_total_loss_and_finite_gradient_for_all_zero_labels():
  scores = jnp.asarray([[0.3, -0.2], [0.1, 0.4]])
  labels = jnp.zeros((2, 2))
  theta = jnp.asarray([[[0.7, 0.7, 0.0, 0.0], [0.2, 0.2, 0.1, 0.1]]] * 2)
  loss, grads = jax.value_and_grad(
      lambda s, t: losses.total_loss(s, labels, t, gamma=0.1), argnums=(0, 1))(scores, theta)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_allclose(float(loss), 0.1 * float(losses.localization_loss(theta)),
                             rtol=1e-6)
  assert float(jnp.abs(grads[0]).sum()) == 0.0  # label-less images: no classification signal


def test_sigmoid_cross_entropy_matches_formula():
  s = jnp.asarray([[2.0, -1.0]])
  y = jnp.asarray([[1.0, 0.0]])
  want = -math.log(1 / (1 + math.exp(-2))) - math.log(1 - 1 / (1 + math.exp(1)))
  np.testing.assert_allclose(float(losses.sigmoid_cross_entropy_loss(s, y)), want, rtol=1e-5)


def _asl_by_the_paper(s, y, gamma_pos, gamma_neg, m, detach):
  """ASL (Ridnik et al., ICCV 2021) as the paper writes it: p = sigmoid(s), the shifted
  probability p_m = max(p - m, 0) (Eq. 4), L+ = (1 - p)^gamma+ log(p) and
  L- = p_m^gamma- log(1 - p_m) (Eq. 5), L = -sum_c (y L+ + (1 - y) L-), mean over images; the
  focusing weights held constant where ``detach`` (ASL's disable_torch_grad_focal_loss)."""
  p = 1.0 / (1.0 + jnp.exp(-s))
  p_m = jnp.maximum(p - m, 0.0)
  w_pos, w_neg = (1.0 - p) ** gamma_pos, p_m ** gamma_neg
  if detach:
    w_pos, w_neg = jax.lax.stop_gradient(w_pos), jax.lax.stop_gradient(w_neg)
  per_class = y * w_pos * jnp.log(p) + (1.0 - y) * w_neg * jnp.log(1.0 - p_m)
  return -jnp.mean(jnp.sum(per_class, axis=-1))


ASL_SETTINGS = ((0.0, 4.0, 0.05), (1.0, 2.5, 0.2))  # (gamma+, gamma-, m): ASL's, and others


def test_asymmetric_loss_and_its_gradient_are_the_papers_formula():
  """Value and gradient, with the focusing weights detached (as ASL trains) and
  differentiated, equal the paper's formula written out, in float64 to 1e-6, for ASL's
  settings and others; row 0 has no positive label, row 1 only positives, and two negatives
  fall under either margin (p <= m: no loss, no gradient)."""
  rng = np.random.default_rng(0)
  scores = 3.0 * rng.normal(size=(6, 7))
  scores[2, :3] = (-4.0, -3.5, 8.0)  # p = 0.018, 0.029 (under either margin), 0.9997
  labels = (rng.random((6, 7)) < 0.4).astype(np.float64)
  labels[0], labels[1], labels[2, :3] = 0.0, 1.0, 0.0
  cases = [(g_pos, g_neg, m, detach) for g_pos, g_neg, m in ASL_SETTINGS
           for detach in (True, False)]

  @jax.jit
  def both(s, y):  # one compilation for every case
    out = []
    for g_pos, g_neg, m, detach in cases:
      settings = dict(gamma_pos=g_pos, gamma_neg=g_neg, clip=m, asl_detach_focus=detach)
      out.append((jax.value_and_grad(lambda s: losses.asymmetric_loss(s, y, **settings))(s),
                  jax.value_and_grad(
                      lambda s: _asl_by_the_paper(s, y, g_pos, g_neg, m, detach))(s),
                  losses.total_loss(s, y, classification="asl", **settings)))
    return out

  with jax.enable_x64(True):
    results = both(jnp.asarray(scores, jnp.float64), jnp.asarray(labels, jnp.float64))
  for case, ((value, grad), (want, want_grad), total) in zip(cases, results):
    assert value.dtype == jnp.float64
    np.testing.assert_allclose(float(value), float(want), rtol=1e-6, atol=0, err_msg=case)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-6, atol=1e-12,
                               err_msg=str(case))
    np.testing.assert_allclose(float(total), float(want), rtol=1e-6, err_msg=case)
    assert float(grad[2, 0]) == 0.0 and float(grad[2, 1]) == 0.0, case
  # Detaching changes the gradient, not the value.
  for detached, differentiated in (results[0:2], results[2:4]):
    assert float(detached[0][0]) == pytest.approx(float(differentiated[0][0]), rel=1e-12)
    assert np.abs(np.asarray(detached[0][1]) - np.asarray(differentiated[0][1])).max() > 1e-3


def test_asymmetric_loss_without_focus_or_margin_is_the_sigmoid_cross_entropy():
  s = jnp.asarray([[2.0, -1.0, 30.0], [-40.0, 0.5, 0.0]])
  y = jnp.asarray([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])

  @jax.jit
  def check(s):
    plain = losses.asymmetric_loss(s, y, gamma_pos=0.0, gamma_neg=0.0, clip=0.0)
    # Finite in float32, also where a sigmoid underflows and under a fractional exponent.
    grad = jax.grad(lambda s: losses.asymmetric_loss(
        s, y, gamma_pos=0.5, gamma_neg=0.5, asl_detach_focus=False))(s)
    return plain, losses.sigmoid_cross_entropy_loss(s, y), grad

  plain, bce, grad = check(s)
  np.testing.assert_allclose(float(plain), float(bce), rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(grad)))
