"""Loads rma_jax/configs/coco.py, the shipped config (see there)."""

from rma_jax.configs.coco import get_config  # noqa: F401
