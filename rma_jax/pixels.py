"""The pixel conventions of pretrained weights, and the normalisation of uint8 images to them.

A model normalises its own input as its first operation (``models.RMA`` and
``models.Baseline`` take ``pixel_convention``), on the device, inside the jitted step: the
host ships uint8 images, 4x fewer bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
CONVENTIONS = ("caffe", "torch", "unit")


def normalize(images: jax.Array, convention: str | None, dtype=jnp.float32) -> jax.Array:
  """Maps uint8 RGB images to the pixel convention of the weights (jittable).

  Args:
    images: (..., H, W, 3) uint8 RGB.
    convention: 'caffe' (Keras/Caffe VGG: RGB -> BGR, subtract the BGR mean, 0..255 scale),
      'torch' (torchvision: /255, then (x - mean) / std per RGB channel) or 'unit' (/255 - 0.5);
      None: ``images`` are normalised already and returned as they are.
    dtype: output dtype (computed in float32 first).

  Returns:
    (..., H, W, 3) ``dtype`` array (``images`` itself for ``convention=None``).
  """
  if convention is None:
    return images
  x = jnp.asarray(images).astype(jnp.float32)
  if convention == "caffe":
    x = x[..., ::-1] - jnp.asarray(CAFFE_BGR_MEAN, jnp.float32)
  elif convention == "torch":
    x = (x / 255.0 - jnp.asarray(TORCH_MEAN, jnp.float32)) / jnp.asarray(TORCH_STD, jnp.float32)
  elif convention == "unit":
    x = x / 255.0 - 0.5
  else:
    raise ValueError(f"pixel convention must be one of {CONVENTIONS}, got {convention!r}")
  return x.astype(dtype)
