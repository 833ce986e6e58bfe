"""A trained run as a library object: ``load_run(WORKDIR)`` -> model, parameters, class names
and preprocessing, ready to score images in another JAX program.

    import numpy as np, rma_jax
    from PIL import Image
    run = rma_jax.load_run("/tmp/rma_demo")                      # its best checkpoint
    images = np.stack([run.preprocess(np.asarray(Image.open("photo.jpg").convert("RGB")))])
    out = run.outputs(images)      # probabilities (1, C), scores, boxes (1, K, 4), ...

``serving_outputs`` defines what a scored batch returns (the probabilities as the report
computes them, the raw scores, the regions as boxes); ``--mode=export`` (``rma_jax.export``)
serialises it, so an exported artifact computes exactly what ``load_run(W).outputs`` does.
``--mode=predict`` and export load a run through ``load_run``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rma_jax import build, checkpointing, context, errors, evaluate, metrics, ops, views
from rma_jax import workdir as workdir_lib
from rma_jax.data import preprocess


def region_boxes(theta: jax.Array) -> jax.Array:
  """(..., K+1, 4) transforms -> (..., K, 4) boxes ``(x0, y0, x1, y1)`` of the K regions as
  fractions of the image's width and height, clipped to [0, 1] (step 0, the whole map, is
  dropped): multiply by (w, h, w, h) for pixels of the original image, as
  ``visualize.theta_to_pixel_boxes`` does."""
  return jnp.clip((ops.theta_to_boxes(theta[..., 1:, :]) + 1) / 2, 0, 1)


def serving_outputs(model: nn.Module, variables: Any, images: jax.Array, *,
                    score_transform: str, crop_size: int | None = None
                    ) -> dict[str, jax.Array]:
  """What a scored batch returns to a user (predict, export, ``TrainedRun.outputs``).

  Args:
    model: ``models.RMA`` or ``models.Baseline``.
    variables: ``{'params': ...}``.
    images: (B, S, S, 3) uint8 RGB, resized to the view's size (``TrainedRun.preprocess``).
    score_transform: ``metrics.score_transform``'s kind (the report's ``eval.score_transform``).
    crop_size: None for the single view; the ten-view protocol's crop otherwise
      (``views.ten_view_scores``; then S is the ten-view size N).

  Returns:
    ``probabilities`` (B, C): ``scores`` after ``score_transform``; ``scores`` (B, C) raw;
    single view of RMA: ``region_scores`` (B, K, C), ``boxes`` (B, K, 4) (``region_boxes``);
    ten views: ``view_scores`` (B, 10, C).
  """
  if crop_size is None:
    out = views.single_view_scores(model, variables, images)
  else:
    out = views.ten_view_scores(model, variables, images, crop_size=crop_size)
  result = {"probabilities": metrics.score_transform(out["scores"], score_transform, xp=jnp),
            "scores": out["scores"]}
  if crop_size is None and "theta" in out:
    result["region_scores"] = out["region_scores"]
    result["boxes"] = region_boxes(out["theta"])
  if crop_size is not None:
    result["view_scores"] = out["view_scores"]
  return result


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A trained model with what it needs to score images.

  Attributes:
    config: the run's config (the one recorded in its workdir unless one was given).
    model: the model the checkpoint holds (``build.build_model``).
    params: its parameters (the best checkpoint's selected ones unless asked otherwise).
    class_names: the C class names in the model's order.
    step: the checkpoint's step (None for parameters handed in).
    workdir: the workdir it was loaded from (None for parameters handed in).
    ema: whether ``params`` is the moving average of the parameters (the run's validation
      chose it; ``checkpointing.load_selected_params``).
  """
  config: ml_collections.ConfigDict
  model: nn.Module
  params: Any
  class_names: tuple[str, ...]
  step: int | None = None
  workdir: str | None = None
  ema: bool = False

  @property
  def input_size(self) -> int:
    """The single view's square input size S (``data.crop_size``)."""
    return int(self.config.data.crop_size)

  @property
  def ten_view_size(self) -> int:
    """The ten-view protocol's input size N (``data.image_size``)."""
    return int(self.config.data.image_size)

  @property
  def score_transform(self) -> str:
    """The transform from raw scores to the report's probabilities (``eval.score_transform``,
    'auto' resolved from the run's loss: ``evaluate.ap_transform``)."""
    return evaluate.ap_transform(self.config)

  def preprocess(self, image: np.ndarray, ten_view: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (S, S, 3) uint8, resized as evaluation resizes (bilinear,
    aspect ratio not kept); the model normalises the pixels itself."""
    size = self.ten_view_size if ten_view else self.input_size
    return preprocess.eval_transform(np.asarray(image, np.uint8), size)

  def outputs_fn(self, ten_view: bool = False) -> Callable[[Any, jax.Array], dict]:
    """``fn(variables, images) -> serving_outputs(...)``, jitted once per run and view."""
    return _outputs_fn(self.model, self.score_transform,
                       self.input_size if ten_view else None)

  def outputs(self, images: Any, ten_view: bool = False) -> dict[str, np.ndarray]:
    """Scores (B, S, S, 3) uint8 images (``preprocess``): ``serving_outputs`` on the host."""
    fn = self.outputs_fn(ten_view)
    return jax.device_get(fn({"params": self.params}, jnp.asarray(images, jnp.uint8)))


@functools.lru_cache(maxsize=8)
def _outputs_fn(model: nn.Module, score_transform: str, crop_size: int | None) -> Callable:
  return jax.jit(functools.partial(serving_outputs, model, score_transform=score_transform,
                                   crop_size=crop_size))


def load_run(workdir: str, config: ml_collections.ConfigDict | None = None, *,
             which: str = checkpointing.BEST, fallback: bool = True,
             purpose: str = "load") -> TrainedRun:
  """Loads a trained run: its ``which`` checkpoint, model, class names and config.

  Args:
    workdir: the run's folder (``--workdir`` of its training).
    config: the config to build the model from; None takes the one the workdir recorded
      (the last start in ``config_history.jsonl``). A given config must describe the same
      model (``workdir.check_architecture``).
    which: 'best' (the checkpoint validation chose) or 'latest'.
    fallback: take the latest checkpoint where ``which='best'`` finds none (a run not
      validated yet); False refuses instead (``export``).
    purpose: what the caller does, for the refusals' wording ('predict with', 'export').

  Raises:
    errors.UserError (one line, naming the folder and the fix): no such checkpoint, no
    recorded config where none is given, or a config of another model.
  """
  if config is None:
    recorded = workdir_lib.recorded_config(workdir)
    if recorded is None:
      raise errors.ConfigError(
          f"cannot {purpose} {workdir}: it records no config (no {workdir_lib.CONFIG_FILE}); "
          "pass the config it was trained with")
    config = ml_collections.ConfigDict(recorded)
  else:
    workdir_lib.check_architecture(config, workdir, purpose)
  selected = checkpointing.load_selected_params(workdir, which, fallback)
  names = context.trained_class_names(config, workdir)
  return TrainedRun(config=config, model=build.build_model(config, len(names)),
                    params=selected.params, class_names=names, step=selected.step,
                    workdir=workdir, ema=selected.ema)
