r"""Convert ImageNet weights to an Orbax checkpoint for ``config.init.pretrained``.

    python -m rma_jax.pretrained --from=keras vgg16_weights_tf_dim_ordering_tf_kernels.h5 \
        --out=weights/vgg16_keras
    python -m rma_jax.pretrained --from=torch vgg16-397923af.pth --out=weights/vgg16_torch
    python -m rma_jax.pretrained --from=torch resnet101-63fe2227.pth --out=weights/resnet101

Two public VGG-16 weight files are supported: Keras's
``vgg16_weights_tf_dim_ordering_tf_kernels.h5`` (and its ``_notop`` variant; pixel convention
``caffe``) and torchvision's ``vgg16-397923af.pth`` (convention ``torch``); and torchvision's
ResNet-50/101 files (V1 or V2 weights; convention ``torch``), told apart by their names.
OUT is written as an Orbax checkpoint of ``{conv1_1 ... conv5_3, fc6, fc7}`` (or the
ResNet's layers) with the pixel convention and the trunk in its metadata, and appears only
once complete. The readers and the conversion are
``rma_jax.weights``; initialising a model from the checkpoint is ``rma_jax.init``.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from typing import Sequence

from rma_jax import errors, weights


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m rma_jax.pretrained",
      description="Convert ImageNet weights (VGG-16: Keras .h5 or torchvision .pth; "
                  "ResNet-50/101: torchvision .pth) to an Orbax checkpoint for "
                  "config.init.pretrained.")
  parser.add_argument("--from", dest="origin", choices=weights.ORIGINS, required=True,
                      help="keras: vgg16_weights_tf_dim_ordering_tf_kernels[_notop].h5; "
                           "torch: torchvision vgg16-397923af.pth, resnet50-*.pth, "
                           "resnet101-*.pth")
  parser.add_argument("file", help="the weight file")
  parser.add_argument("--out", required=True, help="checkpoint folder to create")
  args = parser.parse_args(argv)
  try:
    out = weights.convert(args.file, args.origin, args.out)
  except (OSError, ValueError, pickle.UnpicklingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.EXIT_STATUS
  print(f"wrote {out} (pixel_convention={weights.PIXEL_CONVENTION[args.origin]}); "
        f"train with --config.init.pretrained={out} "
        f"--config.data.pixel_convention={weights.PIXEL_CONVENTION[args.origin]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
