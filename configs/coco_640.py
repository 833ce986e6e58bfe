"""Loads rma_jax/configs/coco_640.py, the shipped config (see there)."""

from rma_jax.configs.coco_640 import get_config  # noqa: F401
