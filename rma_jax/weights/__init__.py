"""ImageNet weights (VGG-16; torchvision's ResNet-50/101): the Keras and torchvision readers
and the conversion to an Orbax checkpoint for ``config.init.pretrained`` (``python -m
rma_jax.pretrained`` is the command).

Modules: ``keras_h5`` and ``torch_pth`` (the readers, which never run pickled code),
``convert`` (names, layouts and shapes; the checkpoint), ``files`` (one-line errors about
files that cannot be read). Copying the weights into a model's parameters is
``rma_jax.init``.
"""

from rma_jax.weights.convert import (FC6_INPUT_SHAPE, ORIGINS, PIXEL_CONVENTION, TRUNK_NAMES,
                                     WeightsMismatchError, convert, load_pretrained,
                                     load_weights, save_pretrained, to_flax, trunk_of)
from rma_jax.weights.keras_h5 import load_keras_h5
from rma_jax.weights.torch_pth import RefusedPickleError, load_torch_state_dict

__all__ = [
    "FC6_INPUT_SHAPE", "ORIGINS", "PIXEL_CONVENTION", "RefusedPickleError", "TRUNK_NAMES",
    "WeightsMismatchError", "convert", "load_keras_h5", "load_pretrained",
    "load_torch_state_dict", "load_weights", "save_pretrained", "to_flax", "trunk_of",
]
