"""The paper's test-time protocols on a model (§5.1, docs/design.md §4): single view, ten views of
one conv5_3 map, and the fusion of scales. Pure JAX, jittable (``make_scores_fn``).

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
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from rma_jax import parallel

NUM_VIEWS = 10



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
    (10, B, h, w, C) in the view order of the module docstring.
  """
  ph, pw = (patch, patch) if isinstance(patch, int) else patch
  _, h, w, _ = fmap.shape
  crops = [fmap[:, y:y + ph, x:x + pw] for y, x in view_offsets(h, w, ph, pw)]
  crops += [c[:, :, ::-1] for c in crops]  # horizontal flip = reverse the width axis
  return jnp.stack(crops, axis=0)


def trunk_features(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
  """(B, H, W, 3) images -> the trunk's (B, H/s, W/s, C') map (``model.features``; s the
  trunk's stride, 16 for VGG-16's conv5_3)."""
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
                       return_features: bool = False) -> dict[str, jax.Array]:
  """Scores whole images (resized to the single-view size, e.g. N - 64).

  Args:
    model: ``models.RMA`` or ``models.Baseline``.
    variables: ``{'params': ...}``.
    images: (B, S, S, 3) images as the model takes them (uint8, normalised by the model to
      its ``pixel_convention``).
    return_features: also return ``features`` (see ``head_outputs``).

  Returns:
    ``scores`` (B, C) raw scores; RMA: ``region_scores`` (B, K, C), ``theta`` (B, K+1, 4);
    optionally ``features`` (B, D).
  """
  fmap = trunk_features(model, variables, images)
  return head_outputs(model, variables, fmap, return_features)


def ten_view_scores(model: nn.Module, variables: Any, images: jax.Array, *, crop_size: int,
                    return_features: bool = False) -> dict[str, jax.Array]:
  """Ten-view scores from one trunk pass per image (paper §5.1, docs/design.md §4).

  Jittable; ``model``, ``crop_size`` and ``return_features`` are static (see
  ``make_scores_fn``).

  Args:
    model: ``models.RMA`` or ``models.Baseline``.
    variables: ``{'params': ...}``.
    images: (B, N, N, 3) images as the model takes them.
    crop_size: the patch size in pixels (N - 64 in the paper); a multiple of the trunk's
      stride (``model.stride``).
    return_features: also return ``features``.

  Returns:
    dict with ``scores`` (B, C): the mean over the ten views of the raw scores (each view's
    scores are already max-pooled over regions); ``view_scores`` (B, 10, C); RMA only:
    ``theta`` (B, 10, K+1, 4) per view, in the view's own frame; with ``return_features``:
    ``features`` (B, D), the view-averaged max-pooled region features (the SVM input).
  """
  if crop_size % model.stride:
    raise ValueError(f"crop_size={crop_size} must be a multiple of the trunk's stride "
                     f"{model.stride}")
  batch = images.shape[0]
  fmap = trunk_features(model, variables, images)
  views = crop_views(fmap, crop_size // model.stride)  # (10, B, p, p, C')
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


def make_scores_fn(model: nn.Module, *, crop_size: int | None, return_features: bool = False,
                   mesh: Mesh | None = None) -> Callable:
  """``fn(variables, images) -> dict``: single view (``crop_size=None``) or ten-view, jitted
  once; with a mesh, variables replicated and the batch sharded over ``data``."""
  if crop_size is None:
    fn = functools.partial(single_view_scores, model, return_features=return_features)
  else:
    fn = functools.partial(ten_view_scores, model, crop_size=crop_size,
                           return_features=return_features)
  if mesh is None:
    return jax.jit(fn)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh))


def fuse_scales(per_scale: Sequence[dict[str, np.ndarray]],
                keys: Sequence[str] = ("scores", "features")) -> dict[str, np.ndarray]:
  """Multi-scale fusion: the mean over scales of each of ``keys`` present in every entry."""
  if not per_scale:
    raise ValueError("fuse_scales needs at least one scale")
  return {k: np.mean([np.asarray(p[k]) for p in per_scale], axis=0)
          for k in keys if all(k in p for p in per_scale)}
