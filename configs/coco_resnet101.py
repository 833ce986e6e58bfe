"""Loads rma_jax/configs/coco_resnet101.py, the shipped config (see there)."""

from rma_jax.configs.coco_resnet101 import get_config  # noqa: F401
